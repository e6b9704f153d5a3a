// Layer configuration and its validation: every size is checked here before anything is allocated.
#pragma once
#include <cstdint>
#include <string>

#include "dtype.h"
#include "quant.h"

namespace fmoe {

enum class Routing : int { SoftmaxTopkRenorm = 0, SoftmaxTopk = 1 };

constexpr int64_t kMaxExperts = 1024;
constexpr int64_t kMaxDim = int64_t(1) << 20;  // hidden or intermediate size

struct MoeConfig {
  int64_t hidden = 0;        // H, hidden size
  int64_t intermediate = 0;  // F, expert FFN size
  int64_t num_experts = 0;   // E
  int64_t top_k = 0;         // k, 1 <= k <= E
  Routing routing = Routing::SoftmaxTopkRenorm;
  DType weight_dtype = DType::F32;
  int threads = 0;  // 0: the pool's default (physical cores)
  Quant quant = Quant::None;   // expert weights quantized at load (quant.h); CPU only
  int64_t quant_group = 128;   // weights per scale along the reduction axis: 32, 64 or 128
};

// Throws MoeException(Invalid) naming the field when a value is out of range.
void validate_config(const MoeConfig& cfg);

// Element counts of each weight tensor for one expert and for the router, overflow-checked.
int64_t checked_mul(int64_t a, int64_t b, const char* what);

}  // namespace fmoe
