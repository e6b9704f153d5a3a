// Softmax / top-k / renormalisation over router logits, NaN-safe.
#pragma once
#include <cstdint>

#include "config.h"

namespace fmoe {

// logits: [T, E] floats. experts: [T, k] indices, always in [0, E). weights: [T, k].
// Picks the k largest probabilities, ties to the lower index; a NaN logit is never picked over a finite
// one. Rows of experts are in descending order of probability.
void route_topk(const float* logits, int64_t T, int64_t E, int64_t k, Routing routing, int32_t* experts,
                float* weights);

// logits[t*E + e] = gate_e . x_t: eight float32 partial sums over strided lanes, added in double with
// the tail, stored as float.
void gate_logits(const float* x, int64_t T, int64_t H, const float* gate, int64_t E, float* logits);

}  // namespace fmoe
