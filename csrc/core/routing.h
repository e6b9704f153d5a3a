// Router scores (softmax or sigmoid), group-limited top-k, renormalisation and scaling, NaN-safe.
#pragma once
#include <cstdint>

#include "config.h"

namespace fmoe {

// What the router does with a row of E logits, from the layer's config.
struct RouteSpec {
  int64_t num_experts = 0, top_k = 0;
  Routing routing = Routing::SoftmaxTopkRenorm;
  double scale = 1.0;           // routedScale
  ExpertGroups groups;          // count 0: every expert competes
  const float* bias = nullptr;  // [E] added to the scores for the choice only, or null
};

RouteSpec route_spec(const MoeConfig& cfg, const float* bias);

// logits: [T, E] floats. experts: [T, k] indices, always in [0, E). weights: [T, k].
// Scores are softmax(logits) or sigmoid(logits), in double. The choice ranks score + bias: ties to the
// lower index, NaN below every number; with groups, a group ranks by the max (or the sum of the two
// best) of its choice scores and the experts outside the best groups are never picked, NaN or not.
// The weights are the unbiased scores of the picks, renormalised to sum 1 for the -renorm routings,
// then multiplied by the scale. Rows of experts are in descending order of choice score.
void route_topk(const float* logits, int64_t T, const RouteSpec& spec, int32_t* experts, float* weights);

// The plain routings (no bias, groups or scale).
void route_topk(const float* logits, int64_t T, int64_t E, int64_t k, Routing routing, int32_t* experts,
                float* weights);

// logits[t*ld + e] = gate_e . x_t (ld = E when 0): eight float32 partial sums over strided lanes, added
// in double with the tail, stored as float. Each logit's sum order depends on H alone, so the experts
// and tokens may be split over threads in any way.
void gate_logits(const float* x, int64_t T, int64_t H, const float* gate, int64_t E, float* logits, int64_t ld = 0);

// The same logits from a router stored as bf16 (`gate` holds each value's upper 16 bits): bit for bit
// gate_logits on the widened values, in half the bytes where every router value is a bf16 value.
void gate_logits_bf16(const float* x, int64_t T, int64_t H, const uint16_t* gate, int64_t E, float* logits,
                      int64_t ld = 0);

}  // namespace fmoe
