// Portable reference kernels: plain loops over the shared packed layout, written so that a compiler
// vectorises the 16 lanes of a panel at the baseline instruction set.
//
// Packed layout (panel = 16 output columns, the last panel zero-padded):
//   w13: per panel, per k in [0, H): 16 w1 values, then 16 w3 values;
//   w2:  per panel of 16 rows of w2 (outputs h), per f in [0, F): 16 values.
// Elements keep the stored dtype.
#include <cmath>
#include <cstring>

#include "../core/kernels.h"
#include "packing.h"

namespace fmoe {
namespace {

constexpr int64_t P = kPanel;

template <typename LoadT>
void swiglu_impl(const float* x, int64_t ldx, int64_t M, int64_t H, int64_t F, const void* w13, DType dt,
                 int64_t f_begin, int64_t f_end, float* act, int64_t ldact, LoadT load) {
  const size_t es = dtype_size(dt);
  for (int64_t f0 = f_begin; f0 < f_end; f0 += P) {
    const int64_t n = (f_end - f0) < P ? (f_end - f0) : P;
    const char* panel = static_cast<const char*>(w13) + size_t(f0 / P) * size_t(H) * 2 * P * es;
    for (int64_t m = 0; m < M; m++) {
      const float* xm = x + m * ldx;
      float a1[P] = {0}, a3[P] = {0};
      for (int64_t k = 0; k < H; k++) {
        const float xv = xm[k];
        const char* row = panel + size_t(k) * 2 * P * es;
        for (int64_t j = 0; j < P; j++) {
          a1[j] += xv * load(row, j);
          a3[j] += xv * load(row, P + j);
        }
      }
      for (int64_t j = 0; j < n; j++) {
        const float g = a1[j];
        act[m * ldact + f0 + j] = g / (1.0f + std::exp(-g)) * a3[j];
      }
    }
  }
}

template <typename LoadT>
void down_impl(const float* act, int64_t ldact, int64_t M, int64_t H, int64_t F, const void* w2, DType dt,
               int64_t h_begin, int64_t h_end, float* y, int64_t ldy, LoadT load) {
  const size_t es = dtype_size(dt);
  for (int64_t h0 = h_begin; h0 < h_end; h0 += P) {
    const int64_t n = (h_end - h0) < P ? (h_end - h0) : P;
    const char* panel = static_cast<const char*>(w2) + size_t(h0 / P) * size_t(F) * P * es;
    for (int64_t m = 0; m < M; m++) {
      const float* am = act + m * ldact;
      float acc[P] = {0};
      for (int64_t f = 0; f < F; f++) {
        const float av = am[f];
        const char* row = panel + size_t(f) * P * es;
        for (int64_t j = 0; j < P; j++) acc[j] += av * load(row, j);
      }
      for (int64_t j = 0; j < n; j++) y[m * ldy + h0 + j] = acc[j];
    }
  }
}

struct LoadF32 {
  float operator()(const char* row, int64_t j) const { return reinterpret_cast<const float*>(row)[j]; }
};
struct LoadBF16 {
  float operator()(const char* row, int64_t j) const {
    return bf16_to_f32(reinterpret_cast<const uint16_t*>(row)[j]);
  }
};
struct LoadF16 {
  float operator()(const char* row, int64_t j) const {
    return f16_to_f32(reinterpret_cast<const uint16_t*>(row)[j]);
  }
};

void swiglu(const float* x, int64_t ldx, int64_t M, int64_t H, int64_t F, const void* w13, DType dt,
            int64_t f_begin, int64_t f_end, float* act, int64_t ldact) {
  switch (dt) {
    case DType::F32: return swiglu_impl(x, ldx, M, H, F, w13, dt, f_begin, f_end, act, ldact, LoadF32());
    case DType::BF16: return swiglu_impl(x, ldx, M, H, F, w13, dt, f_begin, f_end, act, ldact, LoadBF16());
    case DType::F16: return swiglu_impl(x, ldx, M, H, F, w13, dt, f_begin, f_end, act, ldact, LoadF16());
  }
}

void down(const float* act, int64_t ldact, int64_t M, int64_t H, int64_t F, const void* w2, DType dt,
          int64_t h_begin, int64_t h_end, float* y, int64_t ldy) {
  switch (dt) {
    case DType::F32: return down_impl(act, ldact, M, H, F, w2, dt, h_begin, h_end, y, ldy, LoadF32());
    case DType::BF16: return down_impl(act, ldact, M, H, F, w2, dt, h_begin, h_end, y, ldy, LoadBF16());
    case DType::F16: return down_impl(act, ldact, M, H, F, w2, dt, h_begin, h_end, y, ldy, LoadF16());
  }
}

const KernelSet kScalar = {
    Isa::Scalar, "scalar", kPanel, panel_w13_bytes, panel_w2_bytes, pack_w13_panels, pack_w2_panels, swiglu, down,
};

}  // namespace

const KernelSet* kernels_scalar() { return &kScalar; }

}  // namespace fmoe
