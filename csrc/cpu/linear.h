// A dense projection y = x · Wᵀ (W: [out, in], the checkpoint's nn.Linear layout) on the experts' packed
// GEMM: W is packed as an expert's w2 ([H, F] with H = out, F = in) and run by the same `down` kernels,
// float or quantized, with the same determinism contract (a row's output never depends on the batch).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "../core/dtype.h"
#include "../core/quant.h"
#include "buffers.h"
#include "kernels.h"

namespace fmoe {

class PackedLinear {
 public:
  PackedLinear() = default;
  // Allocates the packed copy of an [out, in] matrix of `dt` elements, quantized when q is not None.
  PackedLinear(const KernelSet* kernels, int64_t out, int64_t in, DType dt, Quant q, int64_t group, const char* what);

  // Packs the matrix from row-major sources stacked along `out` (Q, K and V as one matrix, say): parts[i]
  // holds rows[i] rows; the rows add up to out. Sources may be freed afterwards.
  void pack(const std::vector<const void*>& parts, const std::vector<int64_t>& rows);

  // y[m * ldy + o] = x_m · W_o for m < M, o < out, on the shared pool (at most `threads`, 0: all).
  void forward(const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy, int threads) const;

  int64_t out() const { return out_; }
  int64_t in() const { return in_; }
  size_t bytes() const { return bytes_; }

 private:
  const KernelSet* kernels_ = nullptr;
  int64_t out_ = 0, in_ = 0;
  DType dt_ = DType::F32;
  Quant q_ = Quant::None;
  int64_t group_ = 128;
  size_t bytes_ = 0;
  AlignedBuffer packed_;
};

}  // namespace fmoe
