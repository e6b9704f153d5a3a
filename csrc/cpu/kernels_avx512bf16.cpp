// AVX-512 BF16 kernel set: as avx512, except that the narrow weights go through dot-product instructions
// with activations narrowed to match:
//   bf16 weights: vdpbf16ps (two k per lane per instruction, twice the products of an FMA), activations
//                 rounded to bf16;
//   int4 weights: vpdpbusd (AVX-512 VNNI; four k per lane, unsigned nibble x signed byte) where avx512
//                 needs vpmaddubsw + vpmaddwd + vpaddd, on the same int8 activations and the same sums;
//   int8 weights: vpdpbusd too, codes stored offset-binary (code + 128), activations narrowed to int8
//                 (avx512 and avx2 keep int16 activations: without VNNI an unsigned byte times a signed
//                 one saturates vpmaddubsw's pair sums, and the workarounds cost what int16 costs).
//                 That is four products per lane and instruction against vpmaddwd's two, and the
//                 quantization of llama.cpp's Q8_0 (int8 weights and activations, groups of 32).
// Every CPU with AVX512-BF16 also has AVX512-VNNI; the set asks for both, and for GFNI (one instruction
// for int4's high nibbles): every CPU with both BF16 and GFNI (Zen 4 and later, Sapphire Rapids and
// later) takes it, Cooper Lake (BF16 without GFNI) the avx512 set (isa_select.cpp).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cstring>

#include "kernels_simd.h"
#include "ops_avx512.h"

namespace fmoe {
namespace {

struct OpsAvx512Bf16 : OpsAvx512 {
  // The bit matrix of vgf2p8affineqb that moves each byte's high nibble to its low one: output bit i
  // (byte 7 - i of the matrix) takes input bit i + 4 for i < 4, nothing for the upper four.
  static constexpr long long kHighNibble = 0x1020408000000000LL;
  static constexpr int kDotTemps = 1;              // vpdpbusd needs only the nibble mask
  static constexpr size_t kManyRowsAhead = 16384;  // int4 tiles of 5+ rows fetch further ahead (simd_micro.h)
  static constexpr size_t kOneRowAhead = 1024;     // the one-row tile on far-apart panels fetches less far
  static Raw load_raw(const char* p) { return _mm512_loadu_si512(p); }
  // 64 bytes of offset-binary int8 quads (packing.h, Vnni order): the operand of dot_u8s8 as they are.
  static Raw load_u8(const char* p) { return _mm512_loadu_si512(p); }
  // 64 bytes of int4 code pairs (packing.h, Dot order) as two operands of dot_u8s8: the low nibbles by
  // a mask, the high ones by one GFNI affine transform (bits 4-7 of each byte to bits 0-3, the rest
  // zero) where OpsAvx512 shifts and masks. The tiles of 4 to 16 rows spend about 40% of their vector
  // operations outside the dot products (unpacking, and per group a conversion, a multiply and an FMA
  // per accumulator); one fewer per panel and step ran a 16-stream Mixtral int4 step 4.3% faster
  // (`bench/ab-model.js mixtral int4 build OLD NEW 40 16`, both orders, Zen 5, 2 cores: every weight
  // part 0.95).
  static void load_u4(const char* p, Raw& lo, Raw& hi) {
    const __m512i r = _mm512_loadu_si512(p);
    lo = _mm512_and_si512(r, _mm512_set1_epi8(0x0f));
    hi = _mm512_gf2p8affine_epi64_epi8(r, _mm512_set1_epi64(kHighNibble), 0);
  }
  // One (x[k], x[k+1]) bf16 pair in every 32-bit lane.
  static Raw bcast_pair(const uint16_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  // acc[i] += a.pair[i] . b.pair[i]
  static V dot_bf16(V acc, Raw a, Raw b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
  // Round to nearest even (vcvtneps2bf16).
  static void round_bf16(const float* x, int64_t n, uint16_t* dst) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
    if (i < n) {
      const __mmask16 mask = __mmask16((1u << (n - i)) - 1);
      const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, x + i));
      _mm256_mask_storeu_epi16(dst + i, mask, v);
    }
  }
  // The integer dot products in one VNNI instruction each (OpsAvx512 composes them from vpmaddubsw /
  // vpmaddwd); the same sums. Exact for any unsigned byte u: the four products add straight into 32 bits.
  static Raw dot_u8s8(Raw acc, Raw u, Raw x) {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(x));
    return acc;
  }
  // A row's activation word in a register, for every panel of the tile (asm: GCC folds the intrinsic
  // back into each use). Folded into each vpdpbusd as a {1to16} operand, the tile made one broadcast
  // load per vpdpbusd, and those loads, not the dot products, set the pace on Zen 5. One load per row
  // and step instead, `bench/ab-builds.js A B CASE 14 32` on 2 Zen 5 cores, both orders:
  // expert-4tok-int4 0.87, expert-8tok-int4 0.885, expert-64tok-int4 0.92, mixtral-16tok-int4 0.92,
  // mid-prefill-int8 0.91, mixtral-decode-int4 0.95; the int8 decode within noise (0.99). The register
  // form of vpdpbusd is asm too: through the intrinsic GCC 12 copied every accumulator twice per step.
  static Raw bcast_x4(const int32_t* x4) {
    Raw x;
    asm("vpbroadcastd %1, %0" : "=v"(x) : "m"(*x4));
    return x;
  }
};

// Peak of the bf16 dot product: 16 independent accumulators, 4 float operations per lane (2 products,
// 2 adds) per instruction.
double dot_peak_loop(int64_t iters) {
  __m512 acc[16];
  for (int i = 0; i < 16; i++) acc[i] = _mm512_set1_ps(float(i) * 1e-3f);
  const __m512i a = _mm512_set1_epi32(0x3f803f80), b = _mm512_set1_epi32(0x33803380);  // 1.0, ~6e-8
  for (int64_t it = 0; it < iters; it++) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)a, (__m512bh)b);
  }
  __m512 s = acc[0];
  for (int i = 1; i < 16; i++) s = _mm512_add_ps(s, acc[i]);
  float out[16];
  _mm512_storeu_ps(out, s);
  volatile float sink = out[0];
  (void)sink;
  return double(iters) * 16 * 16 * 4;
}

// Peak of the int8 dot product (vpdpbusd), the ceiling of the int8 and int4 kernels on this set: 16
// independent accumulators, 4 multiply-adds (8 operations, counted as the bench counts GFLOP) per lane
// per instruction.
double int8_dot_peak_loop(int64_t iters) {
  __m512i acc[16];
  for (int i = 0; i < 16; i++) acc[i] = _mm512_set1_epi32(i);
  const __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(3);
  for (int64_t it = 0; it < iters; it++) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
  }
  __m512i s = acc[0];
  for (int i = 1; i < 16; i++) s = _mm512_add_epi32(s, acc[i]);
  int32_t out[16];
  _mm512_storeu_si512(out, s);
  volatile int32_t sink = out[0];
  (void)sink;
  return double(iters) * 16 * 16 * 8;
}

// The same dot products with the scaling every quantized group needs (micro_qdot's epilogue): per
// accumulator and group of 4 * DOTS weights, DOTS vpdpbusd, then a conversion, the row scale's multiply
// and the column scale's FMA into a float sum. On Zen 4 and 5 the multiply and the FMA issue on the
// dot products' two pipes (the conversion on others), so at group 32 (8 dot products) this runs at
// about 8/10 of the bare peak: the ceiling of the int4 and int8 tiles, whatever their shape. 12
// accumulators, as the 6-row tile holds.
template <int DOTS>
double int8_group_dot_peak_loop(int64_t iters) {
  constexpr int kAcc = 12;
  __m512 sum[kAcc];
  for (int i = 0; i < kAcc; i++) sum[i] = _mm512_setzero_ps();
  __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(3), start[kAcc];
  for (int i = 0; i < kAcc; i++) start[i] = _mm512_set1_epi32(-i);
  const __m512 col_scale = _mm512_set1_ps(0.5f), row_scale = _mm512_set1_ps(1e-6f);
  for (int64_t it = 0; it < iters; it++) {
    // Opaque to the compiler: no folding of the dot products across groups or accumulators.
    asm volatile("" : "+v"(a), "+v"(b));
    __m512i acc[kAcc];
#pragma GCC unroll 12
    for (int i = 0; i < kAcc; i++) {
      asm volatile("" : "+v"(start[i]));
      acc[i] = start[i];
    }
#pragma GCC unroll 32
    for (int s = 0; s < DOTS; s++)
#pragma GCC unroll 12
      for (int i = 0; i < kAcc; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
#pragma GCC unroll 12
    for (int i = 0; i < kAcc; i++)
      sum[i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[i]), row_scale), col_scale, sum[i]);
  }
  __m512 s = sum[0];
  for (int i = 1; i < kAcc; i++) s = _mm512_add_ps(s, sum[i]);
  float out[16];
  _mm512_storeu_ps(out, s);
  volatile float sink = out[0];
  (void)sink;
  return double(iters) * kAcc * DOTS * 16 * 8;
}

using Set = simd::Kernels<OpsAvx512Bf16, simd::kBF16Dot, simd::kI8Vnni, simd::kI4Dot>;
constexpr KernelSet kAvx512Bf16 = Set::make(Isa::Avx512Bf16, "avx512bf16");

}  // namespace

const KernelSet* kernels_avx512bf16() { return &kAvx512Bf16; }
double probe_dot_loop_avx512bf16(int64_t iters) { return dot_peak_loop(iters); }
double probe_int8_dot_loop_avx512bf16(int64_t iters) { return int8_dot_peak_loop(iters); }
double probe_int8_group32_loop_avx512bf16(int64_t iters) { return int8_group_dot_peak_loop<8>(iters); }
double probe_int8_group128_loop_avx512bf16(int64_t iters) { return int8_group_dot_peak_loop<32>(iters); }

}  // namespace fmoe
#else
#include "kernels.h"
namespace fmoe {
const KernelSet* kernels_avx512bf16() { return nullptr; }
double probe_dot_loop_avx512bf16(int64_t) { return 0; }
double probe_int8_dot_loop_avx512bf16(int64_t) { return 0; }
double probe_int8_group32_loop_avx512bf16(int64_t) { return 0; }
double probe_int8_group128_loop_avx512bf16(int64_t) { return 0; }
}  // namespace fmoe
#endif
