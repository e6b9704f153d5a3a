// The check macro of the C++ test programs: a failed condition is printed with its place and counted,
// and the program goes on, so one run reports every failure; main() returns 1 when `failures` > 0. And
// the float64 reference of a matrix product that several of them check against.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>

static int failures = 0;
#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      failures++;                                                                   \
    }                                                                               \
  } while (0)

// The worst error of y[m * N + n] (M x N) against the float64 dot product of row m of x and row n of w
// (each K long), relative to the sum of the products' magnitudes; a NaN in y counts as 1.
inline double worst_dot_error(const float* x, const float* w, const float* y, int64_t M, int64_t N, int64_t K) {
  double worst = 0;
  for (int64_t m = 0; m < M; m++)
    for (int64_t n = 0; n < N; n++) {
      double ref = 0, mag = 0;
      for (int64_t k = 0; k < K; k++) {
        const double p = double(x[m * K + k]) * double(w[n * K + k]);
        ref += p;
        mag += std::fabs(p);
      }
      const double err = std::fabs(double(y[m * N + n]) - ref) / (mag + 1e-30);
      worst = std::isnan(err) ? 1.0 : std::max(worst, err);
    }
  return worst;
}
