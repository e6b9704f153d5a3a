#include "config.h"

#include <cmath>

#include "error.h"

namespace fmoe {

static void check_range(const char* name, int64_t v, int64_t lo, int64_t hi) {
  if (v < lo || v > hi)
    fail(ErrorCode::Invalid, std::string(name) + " must be an integer in [" + std::to_string(lo) + ", " +
                                 std::to_string(hi) + "], got " + std::to_string(v));
}

template <class E, size_t N>
static void check_enum(const char* name, const EnumName<E> (&table)[N], E v) {
  if (!enum_known(table, v)) fail(ErrorCode::Invalid, std::string(name) + " must be " + enum_choices(table));
}

void validate_config(const MoeConfig& c) {
  check_range("hiddenSize", c.hidden, 1, kMaxDim);
  check_range("intermediateSize", c.intermediate, 1, kMaxDim);
  check_range("numExperts", c.num_experts, 1, kMaxExperts);
  check_range("topK", c.top_k, 1, c.num_experts);
  check_range("threads", c.threads, 0, kMaxThreads);
  check_enum("routing", kRoutingNames, c.routing);
  check_enum("weightDtype", kDTypeNames, c.weight_dtype);
  check_enum("quantize", kQuantNames, c.quant);
  if (!quant_group_ok(c.quant_group)) {
    std::string sizes;
    const size_t n = sizeof kQuantGroupSizes / sizeof kQuantGroupSizes[0];
    for (size_t i = 0; i < n; i++)
      sizes += (i ? (i + 1 == n ? " or " : ", ") : "") + std::to_string(kQuantGroupSizes[i]);
    fail(ErrorCode::Invalid, "quantGroupSize must be " + sizes + ", got " + std::to_string(c.quant_group));
  }
  if (!(std::isfinite(c.routed_scale) && c.routed_scale > 0))
    fail(ErrorCode::Invalid, "routedScale must be a finite number > 0, got " + std::to_string(c.routed_scale));
  if (c.groups.count != 0) {
    check_range("expertGroups.count", c.groups.count, 1, c.num_experts);
    if (c.num_experts % c.groups.count != 0)
      fail(ErrorCode::Invalid, "expertGroups.count must divide numExperts (" + std::to_string(c.num_experts) +
                                   "), got " + std::to_string(c.groups.count));
    check_range("expertGroups.topK", c.groups.top_k, 1, c.groups.count);
    check_enum("expertGroups.score", kGroupScoreNames, c.groups.score);
    const int64_t per_group = c.num_experts / c.groups.count;
    if (c.groups.score == GroupScore::Top2Sum && per_group < 2)
      fail(ErrorCode::Invalid,
           "expertGroups.score 'top2-sum' needs at least 2 experts per group, got " + std::to_string(per_group));
    // Only the chosen groups' experts can be picked: they must hold at least k.
    check_range("topK (at most expertGroups.topK * numExperts / expertGroups.count)", c.top_k, 1,
                c.groups.top_k * per_group);
  }
  check_range("sharedIntermediateSize", c.shared_intermediate, 0, kMaxDim);
  if (c.shared_gate && c.shared_intermediate == 0)
    fail(ErrorCode::Invalid, "sharedGate needs a shared expert (sharedIntermediateSize > 0)");
  checked_mul(c.shared_intermediate, c.hidden, "sharedIntermediateSize*hiddenSize");
  // The largest weight tensor, E * F * H elements, must stay within kMaxElements.
  checked_mul(checked_mul(c.num_experts, c.intermediate, "numExperts*intermediateSize"), c.hidden,
              "numExperts*intermediateSize*hiddenSize");
}

int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  if (a < 0 || b < 0 || (a != 0 && b > kMaxElements / a))
    fail(ErrorCode::Invalid, std::string(what) + " is too large (overflows 2^52)");
  return a * b;
}

}  // namespace fmoe
