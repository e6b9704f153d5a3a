// Weight-only quantization of expert weights at load: the one definition every kernel set and the
// tests follow.
//
// Symmetric, per group of `group` consecutive weights along the reduction axis (k = H for w1/w3, F for
// w2), one float32 scale per (output column, group):
//   scale = amax / qmax (float32 division),   qmax = 127 (int8) or 7 (int4)
//   code  = nearbyint(v / scale) (float32 division, ties to even), clamped to [-qmax, qmax]
//   value = code * scale
// amax == 0: scale 0 and every code 0. A group holding NaN or +-Inf gets a NaN scale (codes 0), so the
// non-finite weight shows up as NaN in the outputs it feeds instead of vanishing.
// When the axis is not a multiple of the group size the last group is shorter (only the real weights,
// so its scale is their own amax); nothing is padded into a scale.
#pragma once
#include <cmath>
#include <cstdint>

#include "options.h"

namespace fmoe {

inline int quant_qmax(Quant q) { return q == Quant::Int8 ? 127 : 7; }

// Quantizes n values; returns the scale and writes n codes in [-qmax, qmax].
inline float quantize_group(const float* v, int64_t n, int qmax, int8_t* codes) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = 0; i < n; i++) {
    if (!std::isfinite(v[i])) finite = false;
    else amax = std::fabs(v[i]) > amax ? std::fabs(v[i]) : amax;
  }
  if (!finite || amax == 0.0f) {
    for (int64_t i = 0; i < n; i++) codes[i] = 0;
    return finite ? 0.0f : NAN;
  }
  const float scale = amax / float(qmax);
  if (scale == 0.0f) {  // amax so small that the division underflows: every value rounds to 0
    for (int64_t i = 0; i < n; i++) codes[i] = 0;
    return 0.0f;
  }
  for (int64_t i = 0; i < n; i++) {
    float q = std::nearbyint(v[i] / scale);  // default rounding mode: to nearest, ties to even
    q = q > float(qmax) ? float(qmax) : q < -float(qmax) ? -float(qmax) : q;
    codes[i] = int8_t(q);
  }
  return scale;
}

}  // namespace fmoe
