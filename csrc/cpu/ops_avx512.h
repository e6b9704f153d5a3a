// Vector operations of the AVX-512F sets, for kernels_simd.h. Included only by units built with
// -mavx512f (and friends); the struct sits in an anonymous namespace (see kernels_simd.h).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace fmoe {
namespace {

struct OpsAvx512 {
  using V = __m512;
  using Raw = __m512i;
  static constexpr int W = 16;
  static constexpr int kAcc = 24;

  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V bcast(const float* p) { return _mm512_set1_ps(*p); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V neg(V a) { return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(int(0x80000000u)))); }
  static V round(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // p * 2^n for integral n.
  static V pow2(V p, V n) { return _mm512_scalef_ps(p, n); }
  static void prefetch(const char* p) { _mm_prefetch(p, _MM_HINT_T0); }

  static V load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // 16 lanes of bf16 pairs: the low halves (even k) and the high halves (odd k) as floats.
  static V bf16_lo(const char* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(p), 16));
  }
  static V bf16_hi(const char* p) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(p), _mm512_set1_epi32(int(0xffff0000u))));
  }
  // 16 int8 codes, sign-extended and converted.
  static V load_i8(const char* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  // 16 bytes of offset-binary int4 pairs. vpermps reads only the low 4 bits of each index, so a table of
  // the 16 code values turns a nibble into its float in one instruction, with no mask and no convert.
  static void load_i4(const char* p, V& lo, V& hi) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m512 lut = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    lo = _mm512_permutexvar_ps(b, lut);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut);
  }
};

}  // namespace
}  // namespace fmoe
