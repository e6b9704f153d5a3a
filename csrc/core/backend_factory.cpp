#include <new>

#include "backend.h"
#include "error.h"

namespace fmoe {

void LayerBuilder::set_router(const float*) {
  fail(ErrorCode::Invalid, "this backend builds a layer from all its weights at once, not expert by expert");
}
void LayerBuilder::pack_expert(int64_t, const void*, const void*, const void*) {
  fail(ErrorCode::Invalid, "this backend builds a layer from all its weights at once, not expert by expert");
}

std::string cuda_unsupported_reason(const MoeConfig& cfg) {
  if (cfg.quant != Quant::None)
    return std::string("quantize '") + quant_name(cfg.quant) + "' runs on the CPU backend only";
  // The CUDA GEMM runs the shared expert as slices of intermediateSize, each one more expert.
  const int64_t slices = (cfg.shared_intermediate + cfg.intermediate - 1) / cfg.intermediate;
  if (cfg.num_experts + slices > kMaxExperts)
    return "a shared expert of " + std::to_string(slices) + " slices of intermediateSize beside " +
           std::to_string(cfg.num_experts) + " experts runs on the CPU backend only";
  return std::string();
}

BackendChoice choose_backend(const MoeConfig& cfg, DeviceRequest device) {
  BackendChoice c;
  switch (device) {
    case DeviceRequest::Cpu:
      break;
    case DeviceRequest::Cuda:
      c.cuda = true;
      break;
    case DeviceRequest::Auto:
      if (!cuda_unsupported_reason(cfg).empty())
        c.fallback_reason = cuda_unsupported_reason(cfg);
      else if (!cuda_available())
        c.fallback_reason = cuda_unavailable_reason();
      else
        c.cuda = true;
      break;
  }
  return c;
}

namespace {

// A CUDA layer is uploaded in one go: the first step builds it.
class CudaBuilder final : public LayerBuilder {
 public:
  CudaBuilder(const MoeConfig& cfg, int device) : cfg_(cfg), device_(device) {}
  bool step(const WeightsView& weights, double) override {
    if (!built_) built_ = make_cuda_backend(cfg_, weights, device_);
    return true;
  }
  double progress() const override { return built_ ? 1.0 : 0.0; }
  std::unique_ptr<Backend> finish() override {
    if (!built_) fail(ErrorCode::Internal, "the layer is not built yet");
    return std::move(built_);
  }

 private:
  MoeConfig cfg_;
  int device_;
  std::unique_ptr<Backend> built_;
};

// The CPU builder, with the reason an 'auto' request stayed on the CPU.
class FallbackBuilder final : public LayerBuilder {
 public:
  FallbackBuilder(std::unique_ptr<LayerBuilder> inner, std::string reason)
      : inner_(std::move(inner)), reason_(std::move(reason)) {}
  bool step(const WeightsView& weights, double max_seconds) override { return inner_->step(weights, max_seconds); }
  double progress() const override { return inner_->progress(); }
  std::unique_ptr<Backend> finish() override { return inner_->finish(); }
  std::string fallback_reason() const override { return reason_; }

 private:
  std::unique_ptr<LayerBuilder> inner_;
  std::string reason_;
};

}  // namespace

std::unique_ptr<LayerBuilder> make_builder(const MoeConfig& cfg, DeviceRequest device, int cuda_device) {
  validate_config(cfg);
  if (!enum_known(kDeviceNames, device)) fail(ErrorCode::Invalid, "device must be " + enum_choices(kDeviceNames));
  BackendChoice choice = choose_backend(cfg, device);
  if (choice.cuda) return std::make_unique<CudaBuilder>(cfg, cuda_device);
  std::unique_ptr<LayerBuilder> cpu = make_cpu_builder(cfg);
  if (choice.fallback_reason.empty()) return cpu;
  return std::make_unique<FallbackBuilder>(std::move(cpu), std::move(choice.fallback_reason));
}

BuiltBackend make_backend(const MoeConfig& cfg, const WeightsView& weights, DeviceRequest device, int cuda_device) {
  std::unique_ptr<LayerBuilder> builder = make_builder(cfg, device, cuda_device);
  try {
    while (!builder->step(weights, 1e300)) {
    }
  } catch (const std::bad_alloc&) {
    fail(ErrorCode::OutOfMemory, "not enough memory to build the layer's packed weights");
  }
  BuiltBackend built;
  built.fallback_reason = builder->fallback_reason();
  built.backend = builder->finish();
  return built;
}

}  // namespace fmoe
