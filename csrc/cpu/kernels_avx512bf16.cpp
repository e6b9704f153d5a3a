// AVX-512 BF16 kernel set: as avx512, except that the narrow weights go through dot-product instructions
// with activations narrowed to match:
//   bf16 weights: vdpbf16ps (two k per lane per instruction, twice the products of an FMA), activations
//                 rounded to bf16;
//   int4 weights: vpdpbusd (AVX-512 VNNI; four k per lane, unsigned nibble x signed byte), activations
//                 quantized to int8 per group. Unpacking nibbles for float FMAs costs more than reading
//                 them from memory; this costs one mask (and a shift) per 128 weights;
//   int8 weights: vpdpwssd (two k per lane, signed words), activations quantized to int16 per group, whose
//                 error (about 1e-5) is far below the weights' own: one sign extension per 32 weights
//                 instead of a sign extension and a conversion per 16.
// Float32 and fp16 weights keep the avx512 path and float activations. Every CPU with AVX512-BF16 also
// has AVX512-VNNI; the set asks for both (isa_select.cpp).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "kernels_simd.h"
#include "ops_avx512.h"

namespace fmoe {
namespace {

struct OpsAvx512Bf16 : OpsAvx512 {
  static Raw load_raw(const char* p) { return _mm512_loadu_si512(p); }
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
  // 64 bytes of quads (packing.h): the low nibbles (k = b of each lane's byte b) and the high ones.
  static void load_u4(const char* p, Raw& lo, Raw& hi) {
    const __m512i r = _mm512_loadu_si512(p), mask = _mm512_set1_epi8(0x0f);
    lo = _mm512_and_si512(r, mask);
    hi = _mm512_and_si512(_mm512_srli_epi16(r, 4), mask);
  }
  static Raw izero() { return _mm512_setzero_si512(); }
  // acc[i] += sum over the lane's 4 bytes of u (unsigned) times the 4 signed bytes at x4.
  static Raw dot_u8s8(Raw acc, Raw u, const int32_t* x4) { return _mm512_dpbusd_epi32(acc, u, _mm512_set1_epi32(*x4)); }
  static V sub_to_float(Raw acc, int32_t corr) { return _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, _mm512_set1_epi32(corr))); }
  // 32 bytes of int8 code pairs (packing.h, Dot order), sign-extended to words.
  static Raw load_s8_pairs(const char* p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // A pair of int16 activations in every 32-bit lane.
  static Raw bcast_word_pair(const int32_t* x2) { return _mm512_set1_epi32(*x2); }
  // acc[i] += w.word[2i] * x.word[2i] + w.word[2i+1] * x.word[2i+1] (signed words).
  static Raw dot_s16(Raw acc, Raw w, Raw x) { return _mm512_dpwssd_epi32(acc, w, x); }
  // quant.h's group rule for activations, vectorised with the same bits: scale = amax / qmax (float
  // division), code = round-to-nearest-even(v / scale) clamped to +-qmax (vcvtps2dq under the default
  // rounding mode); NaN or Inf -> NaN scale, zero (or underflowing) amax -> scale 0, codes 0.
  // quantize_i8 (qmax 127) also returns the sum of the codes.
  // amax / qmax of a group (float division), or NaN when the group holds NaN or +-Inf.
  static float group_scale(const float* x, int64_t n, float qmax) {
    __m512 amax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 mk = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(mk, x + i);
      bad |= _mm512_fpclass_ps_mask(v, 0x99);  // QNaN | +Inf | -Inf | SNaN
      amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    }
    return bad ? NAN : _mm512_reduce_max_ps(amax) / qmax;
  }
  static float quantize_i8(const float* x, int64_t n, int8_t* codes, int32_t* sum) {
    const float scale = group_scale(x, n, 127.0f);
    *sum = 0;
    if (!(scale > 0.0f)) {  // zero, underflowed or NaN: codes 0
      std::memset(codes, 0, size_t(n));
      return scale;
    }
    const __m512 sv = _mm512_set1_ps(scale);
    const __m512i lim = _mm512_set1_epi32(127), nlim = _mm512_set1_epi32(-127);
    __m512i s = _mm512_setzero_si512();
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 mk = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
      __m512i q = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_maskz_loadu_ps(mk, x + i), sv));
      q = _mm512_max_epi32(_mm512_min_epi32(q, lim), nlim);
      s = _mm512_add_epi32(s, q);
      _mm512_mask_cvtepi32_storeu_epi8(codes + i, mk, q);
    }
    *sum = _mm512_reduce_add_epi32(s);
    return scale;
  }
  // The same rule with qmax 32767, to int16 codes.
  static float quantize_i16(const float* x, int64_t n, int16_t* codes) {
    const float scale = group_scale(x, n, 32767.0f);
    if (!(scale > 0.0f)) {  // zero, underflowed or NaN: codes 0
      std::memset(codes, 0, size_t(n) * sizeof(int16_t));
      return scale;
    }
    const __m512 sv = _mm512_set1_ps(scale);
    const __m512i lim = _mm512_set1_epi32(32767), nlim = _mm512_set1_epi32(-32767);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 mk = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
      __m512i q = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_maskz_loadu_ps(mk, x + i), sv));
      q = _mm512_max_epi32(_mm512_min_epi32(q, lim), nlim);
      _mm512_mask_cvtepi32_storeu_epi16(codes + i, mk, q);
    }
    return scale;
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

using Set = simd::Kernels<OpsAvx512Bf16, simd::kBF16Dot, simd::kI8Dot, simd::kI4Dot>;
constexpr KernelSet kAvx512Bf16 = Set::make(Isa::Avx512Bf16, "avx512bf16");

}  // namespace

const KernelSet* kernels_avx512bf16() { return &kAvx512Bf16; }
double probe_dot_loop_avx512bf16(int64_t iters) { return dot_peak_loop(iters); }

}  // namespace fmoe
#else
#include "../core/kernels.h"
namespace fmoe {
const KernelSet* kernels_avx512bf16() { return nullptr; }
double probe_dot_loop_avx512bf16(int64_t) { return 0; }
}  // namespace fmoe
#endif
