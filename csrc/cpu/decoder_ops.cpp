#include "decoder_ops.h"

#include <cmath>

namespace fmoe {

void rms_norm(const float* x, int64_t rows, int64_t n, int64_t ldx, const float* w, float eps, float* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; r++) {
    const float* xr = x + r * ldx;
    float* yr = y + r * ldy;
    double ss = 0;
    for (int64_t i = 0; i < n; i++) ss += double(xr[i]) * double(xr[i]);
    const float scale = float(1.0 / std::sqrt(ss / double(n) + double(eps)));
    for (int64_t i = 0; i < n; i++) yr[i] = (xr[i] * scale) * w[i];
  }
}

void rope_tables(const int64_t* pos, int64_t T, int64_t dim, double theta, float* cos, float* sin) {
  const int64_t half = dim / 2;
  for (int64_t t = 0; t < T; t++)
    for (int64_t i = 0; i < half; i++) {
      const double angle = double(pos[t]) * std::pow(theta, -2.0 * double(i) / double(dim));
      cos[t * half + i] = float(std::cos(angle));
      sin[t * half + i] = float(std::sin(angle));
    }
}

void rope_apply(float* x, int64_t T, int64_t heads, int64_t head_dim, int64_t ld, const float* cos, const float* sin) {
  const int64_t half = head_dim / 2;
  for (int64_t t = 0; t < T; t++) {
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int64_t h = 0; h < heads; h++) {
      float* v = x + t * ld + h * head_dim;
      for (int64_t i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
      }
    }
  }
}

}  // namespace fmoe
