// Vector operations of the AVX-512F sets, for kernels_simd.h. Included only by units built with
// -mavx512f (and friends); the struct sits in an anonymous namespace (see kernels_simd.h).
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fmoe {
namespace {

struct OpsAvx512 {
  using V = __m512;
  using Raw = __m512i;
  static constexpr int W = 16;
  static constexpr int kAcc = 24;
  // Vector registers, and how many of them the integer dot products hold besides accumulators, codes
  // and broadcasts (the nibble mask, vpmaddubsw's pair sums and the ones of vpmaddwd).
  static constexpr int kRegs = 32;
  static constexpr int kDotTemps = 3;
  static constexpr size_t kManyRowsAhead = 0;  // int4 tiles of 5+ rows: prefetch_code_bytes (simd_micro.h)
  static constexpr size_t kOneRowAhead = 0;    // the one-row integer tile: prefetch_code_bytes (simd_micro.h)

  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  // 16 bf16 values as floats (exact: a bf16 is the high half of a float).
  static V load_bf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V neg(V a) {
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(int(0x80000000u))));
  }
  static V round(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^n for integral n.
  static V pow2(V p, V n) { return _mm512_scalef_ps(p, n); }

  static V load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // 16 lanes of bf16 pairs: the low halves (even k) and the high halves (odd k) as floats.
  static V bf16_lo(const char* p) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(p), 16)); }
  static V bf16_hi(const char* p) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(p), _mm512_set1_epi32(int(0xffff0000u))));
  }
  // ---- integer dot products for quantized experts (kI4Dot, kI8Dot in kernels_simd.h) ----
  // 64 bytes of quads (packing.h): the low nibbles (k = b of each lane's byte b) and the high ones.
  static void load_u4(const char* p, Raw& lo, Raw& hi) {
    const __m512i r = _mm512_loadu_si512(p), mask = _mm512_set1_epi8(0x0f);
    lo = _mm512_and_si512(r, mask);
    hi = _mm512_and_si512(_mm512_srli_epi16(r, 4), mask);
  }
  static Raw izero() { return _mm512_setzero_si512(); }
  static Raw iset1(int32_t v) { return _mm512_set1_epi32(v); }
  static Raw iadd(Raw a, Raw b) { return _mm512_add_epi32(a, b); }
  // acc[i] += sum over the lane's 4 bytes of u (unsigned, < 16) times the lane's 4 signed bytes of x
  // (|x| <= 127): vpmaddubsw's pair sums stay far from int16 saturation (at most 2 * 15 * 127).
  static Raw dot_u8s8(Raw acc, Raw u, Raw x) {
    const __m512i pairs = _mm512_maddubs_epi16(u, x);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
  }
  // The four activation bytes at x4 in every lane, for dot_u8s8.
  static Raw bcast_x4(const int32_t* x4) { return _mm512_set1_epi32(*x4); }
  static V to_float(Raw acc) { return _mm512_cvtepi32_ps(acc); }
  // 32 bytes of int8 code pairs (packing.h, Dot order), sign-extended to words.
  static Raw load_s8_pairs(const char* p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // A pair of int16 activations in every 32-bit lane.
  static Raw bcast_word_pair(const int32_t* x2) { return _mm512_set1_epi32(*x2); }
  // acc[i] += w.word[2i] * x.word[2i] + w.word[2i+1] * x.word[2i+1] (signed words, |x| <= 32767).
  static Raw dot_s16(Raw acc, Raw w, Raw x) { return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x)); }
  // quant.h's group rule for activations (the float32 scale, not rounded to half), vectorised with the
  // same bits: scale = amax / qmax (float division), code = round-to-nearest-even(v / scale) clamped to
  // +-qmax (vcvtps2dq under the default rounding mode); NaN or Inf -> NaN scale, zero (or underflowing)
  // amax -> scale 0, codes 0.
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

}  // namespace
}  // namespace fmoe
