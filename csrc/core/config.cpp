#include "config.h"

#include "error.h"

namespace fmoe {

static void check_range(const char* name, int64_t v, int64_t lo, int64_t hi) {
  if (v < lo || v > hi)
    fail(ErrorCode::Invalid, std::string(name) + " must be an integer in [" + std::to_string(lo) + ", " +
                                 std::to_string(hi) + "], got " + std::to_string(v));
}

void validate_config(const MoeConfig& c) {
  check_range("hiddenSize", c.hidden, 1, kMaxDim);
  check_range("intermediateSize", c.intermediate, 1, kMaxDim);
  check_range("numExperts", c.num_experts, 1, kMaxExperts);
  check_range("topK", c.top_k, 1, c.num_experts);
  check_range("threads", c.threads, 0, 1024);
  if (c.routing != Routing::SoftmaxTopkRenorm && c.routing != Routing::SoftmaxTopk)
    fail(ErrorCode::Invalid, "routing must be 'softmax-topk-renorm' or 'softmax-topk'");
  if (c.weight_dtype != DType::F32 && c.weight_dtype != DType::BF16 && c.weight_dtype != DType::F16)
    fail(ErrorCode::Dtype, "weightDtype must be 'float32', 'bfloat16' or 'float16'");
  if (c.quant != Quant::None && c.quant != Quant::Int8 && c.quant != Quant::Int4)
    fail(ErrorCode::Invalid, "quantize must be 'none', 'int8' or 'int4'");
  if (!quant_group_ok(c.quant_group))
    fail(ErrorCode::Invalid, "quantGroupSize must be 32, 64 or 128, got " + std::to_string(c.quant_group));
  // E * F * H must fit comfortably in memory arithmetic.
  checked_mul(checked_mul(c.num_experts, c.intermediate, "numExperts*intermediateSize"), c.hidden,
              "numExperts*intermediateSize*hiddenSize");
}

int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  if (a < 0 || b < 0 || (a != 0 && b > (int64_t(1) << 52) / a))
    fail(ErrorCode::Invalid, std::string(what) + " is too large (overflows 2^52)");
  return a * b;
}

}  // namespace fmoe
