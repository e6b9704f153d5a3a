// Vector operations of the NEON set (arm64), for kernels_simd.h and attention_simd.h. Included only by
// units built for aarch64; the struct sits in an anonymous namespace (see kernels_simd.h).
#pragma once
#include <arm_neon.h>

#include <cstdint>
#include <cstring>

namespace fmoe {
namespace {

struct OpsNeon {
  using V = float32x4_t;
  static constexpr int W = 4;
  static constexpr int kAcc = 24;
  static constexpr int kRegs = 32;  // vector registers (simd_gemm.h Shapes)

  static V zero() { return vdupq_n_f32(0.0f); }
  static V set1(float v) { return vdupq_n_f32(v); }
  static V bcast(const float* p) { return vld1q_dup_f32(p); }
  static V load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, V v) { vst1q_f32(p, v); }
  static V fma(V a, V b, V c) { return vfmaq_f32(c, a, b); }
  static V add(V a, V b) { return vaddq_f32(a, b); }
  static V mul(V a, V b) { return vmulq_f32(a, b); }
  static V div(V a, V b) { return vdivq_f32(a, b); }
  static V min(V a, V b) { return vminq_f32(a, b); }
  static V max(V a, V b) { return vmaxq_f32(a, b); }
  static V neg(V a) { return vnegq_f32(a); }
  static V round(V a) { return vrndnq_f32(a); }
  // p * 2^n for integral n in [-126, 127] (vexp's clamp in simd_exp.h keeps n there).
  static V pow2(V p, V n) {
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
  }

  static V load_f16(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
  // 4 bf16 values as floats (exact: a bf16 is the high half of a float).
  static V load_bf16(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
  static V bf16_lo(const char* p) {
    return vreinterpretq_f32_u32(vshlq_n_u32(vld1q_u32(reinterpret_cast<const uint32_t*>(p)), 16));
  }
  static V bf16_hi(const char* p) {
    return vreinterpretq_f32_u32(vandq_u32(vld1q_u32(reinterpret_cast<const uint32_t*>(p)), vdupq_n_u32(0xffff0000u)));
  }
  // 4 int8 codes, sign-extended and converted.
  static V load_i8(const char* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(v))))));
  }
  // 4 bytes of offset-binary int4 pairs: the low nibbles (even k) and the high ones (odd k) as floats.
  static void load_i4(const char* p, V& lo, V& hi) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    const uint32x4_t b = vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(v)))));
    const int32x4_t eight = vdupq_n_s32(8);
    lo = vcvtq_f32_s32(vsubq_s32(vreinterpretq_s32_u32(vandq_u32(b, vdupq_n_u32(15))), eight));
    hi = vcvtq_f32_s32(vsubq_s32(vreinterpretq_s32_u32(vshrq_n_u32(b, 4)), eight));
  }
};

}  // namespace
}  // namespace fmoe
