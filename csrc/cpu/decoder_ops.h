// The small per-token operations of a decoder layer: RMSNorm and rotary position embeddings.
#pragma once
#include <cstdint>

namespace fmoe {

// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, for rows of n floats (x at stride ldx, y at stride ldy;
// y may be x). The sum of squares is taken in double, so the norm does not depend on n's rounding.
void rms_norm(const float* x, int64_t rows, int64_t n, int64_t ldx, const float* w, float eps, float* y, int64_t ldy);

// Rotary tables for the step's positions: cos/sin[t][i] of pos[t] * theta^(-2i / dim), i < dim / 2,
// computed in double and rounded once.
void rope_tables(const int64_t* pos, int64_t T, int64_t dim, double theta, float* cos, float* sin);

// Rotates `heads` vectors of head_dim floats per row (rows at stride ld) in the half-split layout of
// Hugging Face checkpoints: dimension i pairs with i + dim / 2, for i < dim / 2 (dim = head_dim).
void rope_apply(float* x, int64_t T, int64_t heads, int64_t head_dim, int64_t ld, const float* cos, const float* sin);

}  // namespace fmoe
