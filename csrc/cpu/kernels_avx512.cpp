// AVX-512F kernel set: 16-wide float vectors, 32 registers (24 accumulators). bf16 weights are read as
// k-pairs and split by shift / mask; fp16 weights go through vcvtph2ps. Quantized experts use integer
// dot products (int8 activations for int4 weights, int16 for int8) built from AVX-512BW's vpmaddubsw /
// vpmaddwd; the avx512bf16 set does the same sums with VNNI.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "../probes/probe_loops.h"
#include "../probes/probes.h"
#include "kernels_simd.h"
#include "ops_avx512.h"

namespace fmoe {
namespace {
using Set = simd::Kernels<OpsAvx512, simd::kBF16, simd::kI8Dot, simd::kI4Dot>;
constexpr KernelSet kAvx512 = Set::make(Isa::Avx512, "avx512");
}  // namespace

const KernelSet* kernels_avx512() { return &kAvx512; }

// The FMA peak probe's inner loop at this width (probes.cpp times it).
double probe_fma_loop_avx512(int64_t iters) { return simd::probe_fma_loop<OpsAvx512>(iters); }

namespace {
// S sequential streams, each a slice of [p, p + bytes), read with 64-byte loads; AHEAD > 0: each load's
// line AHEAD bytes on is asked for first, non-temporally (as the integer-dot decode tiles fetch).
template <int S, size_t AHEAD>
uint64_t read_streams(const void* p, size_t bytes) {
  const size_t per = bytes / 64 / S;  // 64-byte vectors per stream
  const __m512i* v = static_cast<const __m512i*>(p);
  __m512i s[S];
  for (int j = 0; j < S; j++) s[j] = _mm512_setzero_si512();
  for (size_t i = 0; i < per; i++) {
#pragma GCC unroll 8
    for (int j = 0; j < S; j++) {
      if constexpr (AHEAD > 0) _mm_prefetch(reinterpret_cast<const char*>(v + j * per + i) + AHEAD, _MM_HINT_NTA);
      s[j] = _mm512_add_epi64(s[j], _mm512_load_si512(v + j * per + i));
    }
  }
  for (size_t i = per * S; i < bytes / 64; i++) s[0] = _mm512_add_epi64(s[0], _mm512_load_si512(v + i));
  for (int j = 1; j < S; j++) s[0] = _mm512_xor_si512(s[0], s[j]);
  alignas(64) uint64_t out[8];
  _mm512_store_si512(out, s[0]);
  return out[0] ^ out[7];
}
}  // namespace

// The read-bandwidth probe's loop at this width, for each of probes.h's read patterns.
uint64_t probe_read_avx512(const void* p, size_t bytes, int pattern) {
  return with_read_pattern(pattern,
                           [&](auto streams, auto ahead) { return read_streams<streams(), ahead()>(p, bytes); });
}

}  // namespace fmoe
#else
#include "kernels.h"
namespace fmoe {
const KernelSet* kernels_avx512() { return nullptr; }
double probe_fma_loop_avx512(int64_t) { return 0; }
uint64_t probe_read_avx512(const void*, size_t, int) { return 0; }
}  // namespace fmoe
#endif
