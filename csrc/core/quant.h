// Weight-only quantization of projection weights at load: the one definition every kernel set and the
// tests follow.
//
// Symmetric, per group of `group` consecutive weights along the reduction axis (k = H for w1/w3, F for
// w2), one IEEE half scale per (output column, group), as 16-bit scales halve what a group's scale costs
// to read (int4 at group 32: 0.5625 bytes a weight instead of 0.625):
//   scale = half(amax / qmax)   the float32 quotient rounded to half, to nearest even,
//                               qmax = 127 (int8) or 7 (int4)
//   code  = nearbyint(v / scale) (float32 division by the half scale, ties to even), clamped to
//           [-qmax, qmax]
//   value = code * scale        exactly, as the kernels compute with it
// The codes are taken against the rounded scale, so the half rounding moves no weight by more than
// round to nearest does. Where the rounding lowered the scale, amax / scale may pass qmax a little;
// the clamp keeps the extreme codes at +-qmax.
// Special groups:
//   amax == 0: scale 0 and every code 0.
//   NaN or +-Inf in the group: a NaN scale (codes 0), so the non-finite weight shows up as NaN in the
//     outputs it feeds instead of vanishing.
//   amax / qmax at most 2^-25 (half of half's smallest subnormal), which rounds to 0: scale 0, codes 0;
//     such weights are below what the format can hold.
//   amax / qmax above half's largest finite value (rounding past 65504, so |w| > about 8.3e6 for int8,
//     4.6e5 for int4): an infinite scale and codes 0. Every output the group feeds becomes NaN (0 times
//     infinity), the same signal as a non-finite weight; nothing traps.
// When the axis is not a multiple of the group size the last group is shorter (only the real weights,
// so its scale is their own amax); nothing is padded into a scale.
// Kernel sets that quantize activations for an integer dot product (kernels.h) take the same groups and
// codes with the float32 scale amax / qmax as it is: those scales live for one call and are never
// stored, so rounding them to half would only add error.
#pragma once
#include <cmath>
#include <cstdint>

#include "dtype.h"
#include "options.h"

namespace fmoe {

inline int quant_qmax(Quant q) { return q == Quant::Int8 ? 127 : 7; }

// Quantizes n values; returns the scale (a half value, as float: f32_to_f16 stores it exactly) and
// writes n codes in [-qmax, qmax].
inline float quantize_group(const float* v, int64_t n, int qmax, int8_t* codes) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < n; i++) {
    if (!std::isfinite(v[i]))
      finite = false;
    else
      amax = std::fabs(v[i]) > amax ? std::fabs(v[i]) : amax;
  }
  const float scale = !finite ? NAN : f16_to_f32(f32_to_f16(amax / float(qmax)));
  if (!(scale > 0.0f) || std::isinf(scale)) {  // NaN, zero (or rounded to zero), overflowed: codes 0
    for (int64_t i = 0; i < n; i++) codes[i] = 0;
    return scale;
  }
  // Rounding to an integer by adding and taking away 1.5 * 2^23: the sum has no bits below 1, so the
  // addition rounds v / scale to nearest, ties to even, as nearbyint does in the default mode, for any
  // |v / scale| < 2^22 (here at most qmax and a little). Unlike a call to nearbyint, which the baseline
  // x86-64 target cannot inline, the loop vectorises: the Mixtral-width bench model loaded with int4 in
  // 7.3 s instead of 10.3-12.6 s (`node bench/model.js --models mixtral --formats int4 --engines ours`).
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  for (int64_t i = 0; i < n; i++) {
    float q = (v[i] / scale + kRound) - kRound;
    q = q > float(qmax) ? float(qmax) : q < -float(qmax) ? -float(qmax) : q;
    codes[i] = int8_t(q);
  }
  return scale;
}

}  // namespace fmoe
