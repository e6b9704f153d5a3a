// The interface every backend (CPU, CUDA) implements, the weights it is built from, and the one factory
// that picks a backend for a layer (backend_factory.cpp).
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "config.h"

namespace fmoe {

// Caller-owned weights in the checkpoint layout. The backend copies (packs or uploads) them while it is
// built, so the caller may free them afterwards.
struct WeightsView {
  const float* gate = nullptr;         // [E, H] float32
  std::vector<const void*> w1;         // E pointers, each [F, H] of weight_dtype
  std::vector<const void*> w3;         // E pointers, each [F, H]
  std::vector<const void*> w2;         // E pointers, each [H, F]
  const float* score_bias = nullptr;   // [E] float32 added to the scores for the choice only; may be null
  const void* shared_w1 = nullptr;     // [Fs, H] of weight_dtype, when config.shared_intermediate > 0
  const void* shared_w3 = nullptr;     // [Fs, H]
  const void* shared_w2 = nullptr;     // [H, Fs]
  const float* shared_gate = nullptr;  // [H] float32, when config.shared_gate
};

// Set by the caller to ask a running forward to stop at its next chunk boundary.
using CancelFlag = std::atomic<bool>;

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;         // "cpu" or "cuda"
  virtual std::string kernel_name() const = 0;  // e.g. "avx512bf16", or the CUDA device name
  virtual size_t native_bytes() const = 0;      // memory this layer holds (for GC accounting)
  virtual const MoeConfig& config() const = 0;

  // out[T, H] = MoE(x[T, H]). x and out may not overlap. Thread-safe: several forwards may run at once.
  // Throws MoeException(Aborted) if *cancel becomes true before the work is done.
  virtual void forward(const float* x, int64_t T, float* out, const CancelFlag* cancel) = 0;
  // Routing only: experts[T, k], weights[T, k].
  virtual void route(const float* x, int64_t T, int32_t* experts, float* weights) = 0;
  // Adds to counts[E] the tokens each expert received in every forward so far (routing telemetry);
  // a backend that does not count adds nothing.
  virtual void add_routed_tokens(uint64_t* counts) const { (void)counts; }
};

// Builds a CPU layer a part at a time, so a caller on an event loop can spread the packing over many
// short steps, and look up the weight arrays afresh before each one (they may have moved or gone).
// The constructor checks the config and the memory and allocates the packed copy.
class LayerBuilder {
 public:
  virtual ~LayerBuilder() = default;
  // Packs from `weights` (checked against the config) until about `max_seconds` have passed, at least
  // one slice of rows; returns true once every expert is packed.
  virtual bool step(const WeightsView& weights, double max_seconds) = 0;
  // Fraction of the source bytes packed, 0..1.
  virtual double progress() const = 0;
  // The same work for a caller that holds one expert at a time (the model loader): the router [E, H]
  // float32, and expert e whole. finish() then needs the router and every expert.
  // Only the CPU builder supports it (the model runs on the CPU); the others throw.
  virtual void set_router(const float* gate);
  virtual void pack_expert(int64_t e, const void* w1, const void* w3, const void* w2);
  // The layer, once step() has returned true (or every expert was packed); the builder is spent afterwards.
  virtual std::unique_ptr<Backend> finish() = 0;
  // Why a layer asked for with DeviceRequest::Auto runs on the CPU; empty otherwise.
  virtual std::string fallback_reason() const { return std::string(); }
};

// ---- the factory: the one place that chooses between the backends ----------------------------------

// Where a request runs: Cpu on the CPU; Cuda on CUDA (building fails with NoDevice when it cannot run);
// Auto on CUDA when a device is available and the experts are not quantized (CPU only), else on the CPU
// with the reason.
struct BackendChoice {
  bool cuda = false;
  std::string fallback_reason;
};
BackendChoice choose_backend(const MoeConfig& cfg, DeviceRequest device);

// Checks the config, then returns a builder for the chosen backend: a CPU layer is packed over many
// step() calls, a CUDA layer is uploaded whole by the first one.
std::unique_ptr<LayerBuilder> make_builder(const MoeConfig& cfg, DeviceRequest device, int cuda_device);

struct BuiltBackend {
  std::unique_ptr<Backend> backend;
  std::string fallback_reason;  // as LayerBuilder::fallback_reason()
};
// make_builder, stepped to the end at once.
BuiltBackend make_backend(const MoeConfig& cfg, const WeightsView& weights, DeviceRequest device, int cuda_device);

// Why the CUDA backend cannot run this config (empty when it can): quantized experts, or a shared expert
// whose slices would pass the experts limit.
std::string cuda_unsupported_reason(const MoeConfig& cfg);

// The backends' own entry points (cpu/cpu_backend.cpp, cuda/host/cuda_backend.cpp).
std::unique_ptr<LayerBuilder> make_cpu_builder(const MoeConfig& cfg);
bool cuda_available();
const std::string& cuda_unavailable_reason();
std::unique_ptr<Backend> make_cuda_backend(const MoeConfig& cfg, const WeightsView& weights, int device);

}  // namespace fmoe
