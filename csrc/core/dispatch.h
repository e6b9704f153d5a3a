// Dispatch: group the (token, slot) pairs of a routing by expert, in a deterministic order.
#pragma once
#include <cstdint>
#include <vector>

namespace fmoe {

struct Dispatch {
  std::vector<int64_t> offsets;  // [E + 1]: expert e owns rows offsets[e] .. offsets[e+1] of rows
  std::vector<int64_t> rows;     // [T * k]: row = t * k + j (token t, its j-th pick), ascending per expert
};

// Counting sort of experts[T * k] (values in [0, E)); stable, so each expert's rows ascend.
void dispatch_by_expert(const int32_t* experts, int64_t T, int64_t k, int64_t E, Dispatch& out);

}  // namespace fmoe
