// Vector operations of the AVX2 + FMA set, for kernels_simd.h and the attention tiles. Included only by
// units built with -mavx2 -mfma -mf16c; the struct sits in an anonymous namespace (see kernels_simd.h).
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fmoe {
namespace {

struct OpsAvx2 {
  using V = __m256;
  static constexpr int W = 8;
  static constexpr int kAcc = 12;
  static constexpr int kRegs = 16;             // vector registers
  static constexpr int kDotTemps = 3;          // dot-product constants and temporaries (ops_avx512.h)
  static constexpr size_t kManyRowsAhead = 0;  // int4 tiles of 5+ rows: prefetch_code_bytes (simd_micro.h)
  static constexpr size_t kOneRowAhead = 0;    // the one-row integer tile: prefetch_code_bytes (simd_micro.h)

  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  // 8 bf16 values as floats (exact: a bf16 is the high half of a float).
  static V load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V neg(V a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
  static V round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^n for integral n in [-126, 127] (vexp's clamp in simd_exp.h keeps n there).
  static V pow2(V p, V n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }

  static V load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static V bf16_lo(const char* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 16));
  }
  static V bf16_hi(const char* p) {
    return _mm256_castsi256_ps(
        _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), _mm256_set1_epi32(int(0xffff0000u))));
  }
  // ---- integer dot products for quantized experts (kI4Dot, kI8Dot in kernels_simd.h) ----
  using Raw = __m256i;
  static Raw izero() { return _mm256_setzero_si256(); }
  static Raw iset1(int32_t v) { return _mm256_set1_epi32(v); }
  static Raw iadd(Raw a, Raw b) { return _mm256_add_epi32(a, b); }
  // 32 bytes of quads (packing.h): the low nibbles (k = b of each lane's byte b) and the high ones.
  static void load_u4(const char* p, Raw& lo, Raw& hi) {
    const __m256i r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), mask = _mm256_set1_epi8(0x0f);
    lo = _mm256_and_si256(r, mask);
    hi = _mm256_and_si256(_mm256_srli_epi16(r, 4), mask);
  }
  // acc[i] += sum over the lane's 4 bytes of u (unsigned, < 16) times the lane's 4 signed bytes of x
  // (|x| <= 127): vpmaddubsw's pair sums stay far from int16 saturation (at most 2 * 15 * 127).
  static Raw dot_u8s8(Raw acc, Raw u, Raw x) {
    const __m256i pairs = _mm256_maddubs_epi16(u, x);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
  static Raw bcast_x4(const int32_t* x4) { return _mm256_set1_epi32(*x4); }
  // 16 bytes of int8 code pairs (packing.h, Dot order), sign-extended to words.
  static Raw load_s8_pairs(const char* p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static Raw bcast_word_pair(const int32_t* x2) { return _mm256_set1_epi32(*x2); }
  // acc[i] += w.word[2i] * x.word[2i] + w.word[2i+1] * x.word[2i+1] (signed words, |x| <= 32767).
  static Raw dot_s16(Raw acc, Raw w, Raw x) { return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x)); }
  static V to_float(Raw acc) { return _mm256_cvtepi32_ps(acc); }

  // quant.h's group rule for activations, vectorised with the same bits (ops_avx512.h has the rule).
  // A short tail goes through a zero-padded copy, so every value takes the vector path.
  static __m256 load_part(const float* x, int64_t m) {
    if (m >= 8) return _mm256_loadu_ps(x);
    alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(t, x, size_t(m) * sizeof(float));
    return _mm256_load_ps(t);
  }
  static float group_scale(const float* x, int64_t n, float qmax) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
      const __m256 v = load_part(x + i, n - i);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(v, v), _mm256_setzero_ps(), _CMP_NEQ_UQ));  // NaN, Inf
      amax = _mm256_max_ps(amax, _mm256_and_ps(v, absmask));
    }
    if (_mm256_movemask_ps(bad)) return NAN;
    alignas(32) float a[8];
    _mm256_store_ps(a, amax);
    float m = a[0];
    for (int j = 1; j < 8; j++) m = a[j] > m ? a[j] : m;
    return m / qmax;
  }
  // Codes of one group as int32, clamped to +-qmax; scale > 0.
  template <typename Emit>
  static void quantize_with(const float* x, int64_t n, float scale, int qmax, Emit&& emit) {
    const __m256 sv = _mm256_set1_ps(scale);
    const __m256i lim = _mm256_set1_epi32(qmax), nlim = _mm256_set1_epi32(-qmax);
    for (int64_t i = 0; i < n; i += 8) {
      __m256i q = _mm256_cvtps_epi32(_mm256_div_ps(load_part(x + i, n - i), sv));
      q = _mm256_max_epi32(_mm256_min_epi32(q, lim), nlim);
      alignas(32) int32_t c[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(c), q);
      for (int64_t j = 0; j < 8 && i + j < n; j++) emit(i + j, c[j]);
    }
  }
  static float quantize_i8(const float* x, int64_t n, int8_t* codes, int32_t* sum) {
    const float scale = group_scale(x, n, 127.0f);
    *sum = 0;
    if (!(scale > 0.0f)) {  // zero, underflowed or NaN: codes 0
      std::memset(codes, 0, size_t(n));
      return scale;
    }
    int32_t s = 0;
    quantize_with(x, n, scale, 127, [&](int64_t i, int32_t c) {
      codes[i] = int8_t(c);
      s += c;
    });
    *sum = s;
    return scale;
  }
  static float quantize_i16(const float* x, int64_t n, int16_t* codes) {
    const float scale = group_scale(x, n, 32767.0f);
    if (!(scale > 0.0f)) {
      std::memset(codes, 0, size_t(n) * sizeof(int16_t));
      return scale;
    }
    quantize_with(x, n, scale, 32767, [&](int64_t i, int32_t c) { codes[i] = int16_t(c); });
    return scale;
  }
};

}  // namespace
}  // namespace fmoe
