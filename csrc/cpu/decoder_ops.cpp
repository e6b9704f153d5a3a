#include "decoder_ops.h"

#include <cmath>
#include <vector>

namespace fmoe {

void rms_norm(const float* x, int64_t rows, int64_t n, int64_t ldx, const float* w, float eps, float* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; r++) {
    const float* xr = x + r * ldx;
    float* yr = y + r * ldy;
    // Eight chains of sums, added in a fixed order at the end: one chain of n dependent double additions
    // took a few microseconds a row (4,096 times the adder's latency), on the step's critical path.
    double part[8] = {};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      for (int c = 0; c < 8; c++) part[c] += double(xr[i + c]) * double(xr[i + c]);
    for (; i < n; i++) part[0] += double(xr[i]) * double(xr[i]);
    const double ss = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    const float scale = float(1.0 / std::sqrt(ss / double(n) + double(eps)));
    for (int64_t j = 0; j < n; j++) yr[j] = (xr[j] * scale) * w[j];
  }
}

void rope_tables(const int64_t* pos, int64_t T, int64_t dim, double theta, float* cos, float* sin) {
  const int64_t half = dim / 2;
  std::vector<double> inv_freq(static_cast<size_t>(half));  // the same for every token: one pow each
  for (int64_t i = 0; i < half; i++) inv_freq[size_t(i)] = std::pow(theta, -2.0 * double(i) / double(dim));
  for (int64_t t = 0; t < T; t++)
    for (int64_t i = 0; i < half; i++) {
      const double angle = double(pos[t]) * inv_freq[size_t(i)];
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
