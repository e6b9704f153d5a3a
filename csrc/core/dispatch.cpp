#include "dispatch.h"

namespace fmoe {

void dispatch_by_expert(const int32_t* experts, int64_t T, int64_t k, int64_t E, Dispatch& out) {
  const int64_t n = T * k;
  out.offsets.assign(E + 1, 0);
  out.rows.resize(n);
  for (int64_t r = 0; r < n; r++) out.offsets[experts[r] + 1]++;
  for (int64_t e = 0; e < E; e++) out.offsets[e + 1] += out.offsets[e];
  std::vector<int64_t> cursor(out.offsets.begin(), out.offsets.end() - 1);
  for (int64_t r = 0; r < n; r++) out.rows[cursor[experts[r]]++] = r;
}

}  // namespace fmoe
