// Finds libfused_moe_cuda.so beside the addon (or at $FUSED_MOE_CUDA_LIBRARY), opens it with dlopen, checks
// its ABI version and wraps its C handles in a Backend. Portable C++: the only CUDA-related header is the
// library's C ABI, so this file builds on machines with no CUDA at all.
#include "cuda_backend.h"

#include <cstdlib>
#include <string>

#include "../../core/error.h"
#include "../fused_moe_cuda.h"

#if defined(__linux__)
#include <dlfcn.h>
#endif

namespace fmoe {

namespace {

constexpr const char* kLibraryName = "libfused_moe_cuda.so";
constexpr const char* kBuildHint =
    "the CUDA backend is built by `npm run build:cmake` on a machine where nvcc (the CUDA toolkit) is "
    "installed";

// The library's entry points, resolved once.
struct CudaApi {
  fmoe_cuda_abi_version_fn abi_version = nullptr;
  fmoe_cuda_versions_fn versions = nullptr;
  fmoe_cuda_device_count_fn device_count = nullptr;
  fmoe_cuda_device_info_fn device_info = nullptr;
  fmoe_cuda_layer_create_fn layer_create = nullptr;
  fmoe_cuda_layer_forward_fn layer_forward = nullptr;
  fmoe_cuda_layer_route_fn layer_route = nullptr;
  fmoe_cuda_layer_bytes_fn layer_bytes = nullptr;
  fmoe_cuda_layer_destroy_fn layer_destroy = nullptr;
};

struct Loaded {
  CudaStatus status;
  CudaApi api;
};

ErrorCode error_code_for(int rc) {
  switch (rc) {
    case FMOE_CUDA_ERR_INVALID:
      return ErrorCode::Invalid;
    case FMOE_CUDA_ERR_NO_DEVICE:
      return ErrorCode::NoDevice;
    case FMOE_CUDA_ERR_CUDA:
      return ErrorCode::Cuda;
    case FMOE_CUDA_ERR_OOM:
      return ErrorCode::OutOfMemory;
    case FMOE_CUDA_ERR_ABORTED:
      return ErrorCode::Aborted;
    default:
      return ErrorCode::Internal;
  }
}

#if defined(__linux__)

// The folder of the binary this function lives in (the .node addon), with a trailing slash; empty when
// the loader cannot tell.
std::string addon_dir() {
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&addon_dir), &info) == 0 || !info.dli_fname) return "";
  std::string path = info.dli_fname;
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? std::string("./") : path.substr(0, slash + 1);
}

template <typename Fn>
bool resolve(void* handle, const char* name, Fn& fn, std::string& missing) {
  fn = reinterpret_cast<Fn>(dlsym(handle, name));
  if (!fn) {
    if (!missing.empty()) missing += ", ";
    missing += name;
  }
  return fn != nullptr;
}

Loaded probe() {
  Loaded L;
  CudaStatus& s = L.status;

  const char* env = std::getenv("FUSED_MOE_CUDA_LIBRARY");
  std::string path;
  if (env && *env) {
    path = env;
  } else {
    const std::string dir = addon_dir();
    if (dir.empty()) {
      s.reason = std::string("could not locate the addon binary to look for ") + kLibraryName + " beside it; set " +
                 "FUSED_MOE_CUDA_LIBRARY to its path (" + kBuildHint + ")";
      return L;
    }
    path = dir + kLibraryName;
  }
  s.library_path = path;

  // RTLD_LOCAL: the library's symbols (and its static CUDA runtime) stay out of the global namespace.
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    const char* why = dlerror();
    const std::string what = why ? why : "unknown dlopen error";
    if (what.find("No such file") != std::string::npos || what.find("cannot open shared object") != std::string::npos) {
      s.reason = std::string("the CUDA backend library was not found at ") + path +
                 (env && *env ? " (from FUSED_MOE_CUDA_LIBRARY)" : " (beside the addon)") + "; " + kBuildHint +
                 ", or set FUSED_MOE_CUDA_LIBRARY to the library's path. dlopen said: " + what;
    } else {
      s.reason = "the CUDA backend library at " + path + " could not be loaded: " + what;
    }
    return L;
  }
  // The handle is never closed: layers and the cached status refer into the library for the process life.

  CudaApi& a = L.api;
  std::string missing;
  resolve(handle, "fmoe_cuda_abi_version", a.abi_version, missing);
  resolve(handle, "fmoe_cuda_versions", a.versions, missing);
  resolve(handle, "fmoe_cuda_device_count", a.device_count, missing);
  resolve(handle, "fmoe_cuda_device_info", a.device_info, missing);
  resolve(handle, "fmoe_cuda_layer_create", a.layer_create, missing);
  resolve(handle, "fmoe_cuda_layer_forward", a.layer_forward, missing);
  resolve(handle, "fmoe_cuda_layer_route", a.layer_route, missing);
  resolve(handle, "fmoe_cuda_layer_bytes", a.layer_bytes, missing);
  resolve(handle, "fmoe_cuda_layer_destroy", a.layer_destroy, missing);
  if (!missing.empty()) {
    s.reason = "the CUDA backend library at " + path + " lacks " + missing + "; rebuild it (" + kBuildHint + ")";
    return L;
  }
  const int abi = a.abi_version();
  if (abi != FMOE_CUDA_ABI_VERSION) {
    s.reason = "the CUDA backend library at " + path + " has ABI version " + std::to_string(abi) +
               ", this addon needs " + std::to_string(FMOE_CUDA_ABI_VERSION) +
               "; rebuild both from the same sources (" + kBuildHint + ")";
    return L;
  }

  char err[512] = {0};
  int rc = a.versions(&s.driver_version, &s.runtime_version, err, sizeof err);
  if (rc != FMOE_CUDA_OK) {
    s.reason = std::string("no usable NVIDIA driver: ") + err;
    return L;
  }
  int count = 0;
  rc = a.device_count(&count, err, sizeof err);
  if (rc != FMOE_CUDA_OK) {
    s.reason = std::string("no CUDA device: ") + err;
    return L;
  }
  if (count <= 0) {
    s.reason = "no CUDA device found";
    return L;
  }
  for (int d = 0; d < count; d++) {
    fmoe_cuda_device_props p{};
    rc = a.device_info(d, &p, err, sizeof err);
    if (rc != FMOE_CUDA_OK) {
      s.reason = "could not query CUDA device " + std::to_string(d) + ": " + err;
      s.devices.clear();
      return L;
    }
    CudaDevice dev;
    p.name[sizeof p.name - 1] = '\0';
    dev.name = p.name;
    dev.total_memory = p.total_memory;
    dev.major = p.major;
    dev.minor = p.minor;
    dev.multiprocessors = p.multiprocessors;
    s.devices.push_back(dev);
  }
  s.available = true;
  return L;
}

#else  // not Linux

Loaded probe() {
  Loaded L;
  L.status.reason = "the CUDA backend is only built for Linux";
  return L;
}

#endif

// Probed on first use; C++11 guarantees the static is initialised once even with concurrent callers.
const Loaded& loaded() {
  static const Loaded L = [] {
    try {
      return probe();
    } catch (const std::exception& e) {
      Loaded failed;
      failed.status.reason = std::string("probing the CUDA backend failed: ") + e.what();
      return failed;
    } catch (...) {
      Loaded failed;
      failed.status.reason = "probing the CUDA backend failed";
      return failed;
    }
  }();
  return L;
}

[[noreturn]] void fail_rc(int rc, const char* what, const char* err) {
  std::string msg = std::string("CUDA backend: ") + what + ": " + (err[0] ? err : "unknown error");
  if (rc == FMOE_CUDA_ERR_OOM) msg += " (GPU out of memory: free GPU memory, or use the CPU backend)";
  fail(error_code_for(rc), msg);
}

// Tokens per call into the library. Cancellation stays on this side of the C ABI: forward calls the
// library in slices of this many tokens and checks the caller's flag before each. The library's own
// chunks are no larger, so a slice costs no extra launches.
constexpr int64_t kCancelSliceTokens = 4096;

class CudaBackend final : public Backend {
 public:
  CudaBackend(const CudaApi& api, fmoe_cuda_layer* layer, const MoeConfig& cfg, std::string device_name)
      : api_(api), layer_(layer), cfg_(cfg), device_name_(std::move(device_name)) {}
  ~CudaBackend() override { api_.layer_destroy(layer_); }
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return "cuda"; }
  std::string kernel_name() const override { return device_name_; }
  size_t native_bytes() const override { return api_.layer_bytes(layer_); }
  const MoeConfig& config() const override { return cfg_; }

  void forward(const float* x, int64_t T, float* out, const CancelFlag* cancel) override {
    const int64_t H = cfg_.hidden;
    for (int64_t t0 = 0; t0 < T; t0 += kCancelSliceTokens) {
      if (cancel && cancel->load()) fail(ErrorCode::Aborted, "the operation was aborted");
      const int64_t n = T - t0 < kCancelSliceTokens ? T - t0 : kCancelSliceTokens;
      char err[512] = {0};
      const int rc = api_.layer_forward(layer_, x + t0 * H, n, out + t0 * H, err, sizeof err);
      if (rc != FMOE_CUDA_OK) fail_rc(rc, "forward", err);
    }
  }

  void route(const float* x, int64_t T, int32_t* experts, float* weights) override {
    char err[512] = {0};
    const int rc = api_.layer_route(layer_, x, T, experts, weights, err, sizeof err);
    if (rc != FMOE_CUDA_OK) fail_rc(rc, "route", err);
  }

 private:
  CudaApi api_;
  fmoe_cuda_layer* layer_;
  MoeConfig cfg_;
  std::string device_name_;
};

}  // namespace

const CudaStatus& cuda_status() { return loaded().status; }
bool cuda_available() { return cuda_status().available; }
const std::string& cuda_unavailable_reason() { return cuda_status().reason; }

std::unique_ptr<Backend> make_cuda_backend(const MoeConfig& cfg, const WeightsView& weights, int device) {
  const Loaded& L = loaded();
  const std::string unsupported = cuda_unsupported_reason(cfg);
  if (!unsupported.empty()) fail(ErrorCode::Invalid, unsupported + "; use device 'cpu' (or 'auto')");
  if (!L.status.available) fail(ErrorCode::NoDevice, "the CUDA backend is not available: " + L.status.reason);
  const int count = static_cast<int>(L.status.devices.size());
  if (device < 0 || device >= count)
    fail(ErrorCode::NoDevice,
         "CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(count) + " device(s) found)");
  const size_t E = static_cast<size_t>(cfg.num_experts);
  if (!weights.gate || weights.w1.size() != E || weights.w3.size() != E || weights.w2.size() != E)
    fail(ErrorCode::Invalid, "CUDA backend: the weights do not match num_experts = " + std::to_string(E));

  fmoe_cuda_config c{};
  c.hidden = cfg.hidden;
  c.intermediate = cfg.intermediate;
  c.num_experts = cfg.num_experts;
  c.top_k = cfg.top_k;
  static_assert(int(Routing::SoftmaxTopkRenorm) == FMOE_CUDA_ROUTING_SOFTMAX_TOPK_RENORM &&
                    int(Routing::SoftmaxTopk) == FMOE_CUDA_ROUTING_SOFTMAX_TOPK &&
                    int(Routing::SigmoidTopk) == FMOE_CUDA_ROUTING_SIGMOID_TOPK &&
                    int(Routing::SigmoidTopkRenorm) == FMOE_CUDA_ROUTING_SIGMOID_TOPK_RENORM,
                "the core's Routing and the CUDA ABI's fmoe_cuda_routing must agree");
  static_assert(int(DType::F32) == FMOE_CUDA_DTYPE_F32 && int(DType::BF16) == FMOE_CUDA_DTYPE_BF16 &&
                    int(DType::F16) == FMOE_CUDA_DTYPE_F16,
                "the core's DType and the CUDA ABI's fmoe_cuda_dtype must agree");
  const fmoe_cuda_routing routing = static_cast<fmoe_cuda_routing>(cfg.routing);
  const fmoe_cuda_dtype weight_dtype = static_cast<fmoe_cuda_dtype>(cfg.weight_dtype);
  c.routing = routing;
  c.weight_dtype = weight_dtype;
  c.device = device;
  c.group_count = int32_t(cfg.groups.count);
  c.group_topk = int32_t(cfg.groups.top_k);
  c.group_top2 = cfg.groups.score == GroupScore::Top2Sum ? 1 : 0;
  c.shared_gate = cfg.shared_gate ? 1 : 0;
  c.routed_scale = cfg.routed_scale;
  c.shared_intermediate = cfg.shared_intermediate;
  fmoe_cuda_extras extras{};
  extras.score_bias = weights.score_bias;
  extras.shared_w1 = weights.shared_w1;
  extras.shared_w3 = weights.shared_w3;
  extras.shared_w2 = weights.shared_w2;
  extras.shared_gate = weights.shared_gate;
  char err[512] = {0};
  fmoe_cuda_layer* layer = nullptr;
  const int rc = L.api.layer_create(&c, weights.gate, weights.w1.data(), weights.w3.data(), weights.w2.data(), &extras,
                                    &layer, err, sizeof err);
  if (rc != FMOE_CUDA_OK || !layer) fail_rc(rc != FMOE_CUDA_OK ? rc : FMOE_CUDA_ERR_CUDA, "creating the layer", err);
  return std::unique_ptr<Backend>(new CudaBackend(L.api, layer, cfg, L.status.devices[size_t(device)].name));
}

}  // namespace fmoe
