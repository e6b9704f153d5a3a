// Layer configuration and its validation: every size is checked here before anything is allocated.
#pragma once
#include <cstdint>
#include <string>

#include "options.h"

namespace fmoe {

// Group-limited routing: the experts form `count` equal groups, the `top_k` best groups (by `score`)
// compete and the others are never picked. count 0: no groups.
struct ExpertGroups {
  int64_t count = 0;
  int64_t top_k = 0;
  GroupScore score = GroupScore::Max;
};

struct MoeConfig {
  int64_t hidden = 0;        // H, hidden size
  int64_t intermediate = 0;  // F, expert FFN size
  int64_t num_experts = 0;   // E
  int64_t top_k = 0;         // k, 1 <= k <= E
  Routing routing = Routing::SoftmaxTopkRenorm;
  DType weight_dtype = DType::F32;
  int threads = 0;            // at most this many threads per pool job; 0: the pool's size (physical cores)
  Quant quant = Quant::None;  // expert weights quantized at load (quant.h); CPU only
  int64_t quant_group = kDefaultQuantGroup;  // weights per scale along the reduction axis (kQuantGroupSizes)
  double routed_scale = 1.0;                 // every routing weight is multiplied by it, after renormalising
  ExpertGroups groups;
  int64_t shared_intermediate = 0;  // Fs: a SwiGLU shared expert every token runs; 0: none
  bool shared_gate = false;         // the shared expert's output is scaled by sigmoid(gate . x) per token
};

// Throws MoeException(Invalid) naming the field when a value is out of range (limits in options.h).
void validate_config(const MoeConfig& cfg);

// a * b for sizes; throws MoeException(Invalid) naming `what` when either is negative or the product
// passes kMaxElements.
int64_t checked_mul(int64_t a, int64_t b, const char* what);

}  // namespace fmoe
