// Portable reference kernels: plain loops over the shared packed layout, written so that a compiler
// vectorises the 16 lanes of a panel at the baseline instruction set.
//
// Packed layout (panel = 16 output columns, the last panel zero-padded):
//   w13: per panel, per k in [0, H): 16 w1 values, then 16 w3 values;
//   w2:  per panel of 16 rows of w2 (outputs h), per f in [0, F): 16 values.
// Elements keep the stored dtype. Quantized weights use the quantized panel layout of packing.h at the
// same panel width.
#include <cmath>
#include <cstring>

#include "kernels.h"
#include "packing.h"
#include "vocab_exp.h"

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
  float operator()(const char* row, int64_t j) const { return bf16_to_f32(reinterpret_cast<const uint16_t*>(row)[j]); }
};
struct LoadF16 {
  float operator()(const char* row, int64_t j) const { return f16_to_f32(reinterpret_cast<const uint16_t*>(row)[j]); }
};

void swiglu(const float* x, int64_t ldx, int64_t M, int64_t H, int64_t F, const void* w13, DType dt, int64_t f_begin,
            int64_t f_end, float* act, int64_t ldact, ActEpoch) {  // reads x in place: no cache
  switch (dt) {
    case DType::F32:
      return swiglu_impl(x, ldx, M, H, F, w13, dt, f_begin, f_end, act, ldact, LoadF32());
    case DType::BF16:
      return swiglu_impl(x, ldx, M, H, F, w13, dt, f_begin, f_end, act, ldact, LoadBF16());
    case DType::F16:
      return swiglu_impl(x, ldx, M, H, F, w13, dt, f_begin, f_end, act, ldact, LoadF16());
  }
}

void down(const float* act, int64_t ldact, int64_t M, int64_t H, int64_t F, const void* w2, DType dt, int64_t h_begin,
          int64_t h_end, float* y, int64_t ldy, ActEpoch) {
  switch (dt) {
    case DType::F32:
      return down_impl(act, ldact, M, H, F, w2, dt, h_begin, h_end, y, ldy, LoadF32());
    case DType::BF16:
      return down_impl(act, ldact, M, H, F, w2, dt, h_begin, h_end, y, ldy, LoadBF16());
    case DType::F16:
      return down_impl(act, ldact, M, H, F, w2, dt, h_begin, h_end, y, ldy, LoadF16());
  }
}

// ---- quantized weights (quant.h) ----------------------------------------------------------------
// The code of column j at step s of a group's codes: int8 one k per step; int4 two (low nibble first).
inline float code_at(const uint8_t* codes, int64_t nmat, int64_t mat, int64_t k, int64_t j, bool int4) {
  if (!int4) return float(int8_t(codes[(k * nmat + mat) * P + j]));
  const uint8_t b = codes[((k / 2) * nmat + mat) * P + j];
  return float(int((k & 1) ? b >> 4 : b & 15) - 8);
}

// acc[mat][j] for one row over the whole reduction: per group a sum from zero in ascending k, then
// acc += sum * scale, groups in order (the contract of kernels.h, as the SIMD sets do it).
void quant_dot(const float* xm, int64_t K, const char* panel, int nmat, Quant q, int64_t g, float acc[2][P]) {
  const bool int4 = q == Quant::Int4;
  const size_t gfull = quant_group_bytes(nmat, P, q, g, CodeOrder::Plain);
  for (int mat = 0; mat < nmat; mat++)
    for (int64_t j = 0; j < P; j++) acc[mat][j] = 0.0f;
  for (int64_t g0 = 0; g0 < K; g0 += g) {
    const int64_t gl = K - g0 < g ? K - g0 : g;
    const char* blk = panel + size_t(g0 / g) * gfull;
    const uint16_t* scales = reinterpret_cast<const uint16_t*>(blk);
    const uint8_t* codes = reinterpret_cast<const uint8_t*>(blk) + size_t(nmat) * P * kScaleBytes;
    for (int mat = 0; mat < nmat; mat++) {
      float s[P] = {0};
      for (int64_t k = 0; k < gl; k++) {
        const float xv = xm[g0 + k];
        for (int64_t j = 0; j < P; j++) s[j] += xv * code_at(codes, nmat, mat, k, j, int4);
      }
      for (int64_t j = 0; j < P; j++) acc[mat][j] += s[j] * f16_to_f32(scales[mat * P + j]);
    }
  }
}

void swiglu_q(const float* x, int64_t ldx, int64_t M, int64_t H, int64_t F, const void* w13, Quant q, int64_t g,
              int64_t f_begin, int64_t f_end, float* act, int64_t ldact, ActEpoch) {
  const size_t pbytes = quant_panel_bytes(2, H, P, q, g, CodeOrder::Plain);
  for (int64_t f0 = f_begin; f0 < f_end; f0 += P) {
    const int64_t n = (f_end - f0) < P ? (f_end - f0) : P;
    const char* panel = static_cast<const char*>(w13) + size_t(f0 / P) * pbytes;
    for (int64_t m = 0; m < M; m++) {
      float acc[2][P];
      quant_dot(x + m * ldx, H, panel, 2, q, g, acc);
      for (int64_t j = 0; j < n; j++) {
        const float gv = acc[0][j];
        act[m * ldact + f0 + j] = gv / (1.0f + std::exp(-gv)) * acc[1][j];
      }
    }
  }
}

void down_q(const float* act, int64_t ldact, int64_t M, int64_t H, int64_t F, const void* w2, Quant q, int64_t g,
            int64_t h_begin, int64_t h_end, float* y, int64_t ldy, ActEpoch) {
  const size_t pbytes = quant_panel_bytes(1, F, P, q, g, CodeOrder::Plain);
  for (int64_t h0 = h_begin; h0 < h_end; h0 += P) {
    const int64_t n = (h_end - h0) < P ? (h_end - h0) : P;
    const char* panel = static_cast<const char*>(w2) + size_t(h0 / P) * pbytes;
    for (int64_t m = 0; m < M; m++) {
      float acc[2][P];
      quant_dot(act + m * ldact, F, panel, 1, q, g, acc);
      for (int64_t j = 0; j < n; j++) y[m * ldy + h0 + j] = acc[0][j];
    }
  }
}

size_t q13_bytes(int64_t H, int64_t F, Quant q, int64_t g) { return quant_w13_bytes(H, F, P, q, g, CodeOrder::Plain); }
size_t q2_bytes(int64_t H, int64_t F, Quant q, int64_t g) { return quant_w2_bytes(H, F, P, q, g, CodeOrder::Plain); }
void qpack13(const void* w1, const void* w3, int64_t H, int64_t F, DType dt, Quant q, int64_t g, void* dst) {
  pack_w13_quant(w1, w3, H, F, dt, P, q, g, CodeOrder::Plain, dst);
}
void qpack2(const void* w2, int64_t H, int64_t F, DType dt, Quant q, int64_t g, void* dst) {
  pack_w2_quant(w2, H, F, dt, P, q, g, CodeOrder::Plain, dst);
}

constexpr KernelSet kScalar = {
    Isa::Scalar,
    "scalar",
    kPanel,
    panel_w13_bytes,
    panel_w2_bytes,
    pack_w13_panels,
    pack_w2_panels,
    swiglu,
    down,
    q13_bytes,
    q2_bytes,
    qpack13,
    qpack2,
    swiglu_q,
    down_q,
    "float32",
    "float32",
    nullptr,
    nullptr,
    exp_weights_vec<2>,
    exp_weights_f32_vec<2>,
    first_max_f32_vec<16>,
    first_max_f64_vec<16>,
    widen_logits_vec<2>,
};

}  // namespace

const KernelSet* kernels_scalar() { return &kScalar; }

}  // namespace fmoe
