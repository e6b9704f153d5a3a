// Placeholder: replaced by the real loader.
#include "cuda_loader.h"
#include "error.h"
namespace fmoe {
const CudaStatus& cuda_status() {
  static CudaStatus s = [] { CudaStatus c; c.reason = "the CUDA backend is not built"; return c; }();
  return s;
}
std::unique_ptr<Backend> make_cuda_backend(const MoeConfig&, const WeightsView&, int) {
  fail(ErrorCode::NoDevice, cuda_status().reason);
}
}  // namespace fmoe
