// What every part of the CUDA self-test shares: the library's C ABI (opened with dlopen), the record of
// checks, fatal-error helpers and device buffers of this program's own CUDA runtime.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "fused_moe_cuda.h"

namespace fmoe_selftest {

constexpr int kExitSkip = 77;  // no CUDA device: ctest reports the test as skipped

// The library's entry points, resolved by open_library.
struct Api {
  fmoe_cuda_abi_version_fn abi_version;
  fmoe_cuda_versions_fn versions;
  fmoe_cuda_device_count_fn device_count;
  fmoe_cuda_device_info_fn device_info;
  fmoe_cuda_layer_create_fn create;
  fmoe_cuda_layer_forward_fn forward;
  fmoe_cuda_layer_forward_device_fn forward_device;
  fmoe_cuda_layer_enqueue_device_fn enqueue_device;
  fmoe_cuda_layer_synchronize_fn synchronize;
  fmoe_cuda_layer_route_fn route;
  fmoe_cuda_layer_bytes_fn bytes;
  fmoe_cuda_layer_destroy_fn destroy;
};
extern Api api;

// dlopen's the library and fills api; false (after a message on stderr) when it cannot.
bool open_library(const std::string& path);

extern int g_failures;
extern int g_checks;
extern std::string g_checks_json;  // comma-separated JSON objects
extern std::string g_report;       // the human-readable log, also written to the output folder
extern uint64_t g_seed;            // base seed of this run

// printf to stdout, also appended to g_report.
void say(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// Records one check: a line on stdout and an entry of the JSON.
void check(bool ok, const std::string& name, const std::string& detail);

[[noreturn]] void die_rc(int rc, const char* what, const char* err);
void cuda_check(cudaError_t e, const char* what);

double now_s();
std::string fmt(const char* f, double v);

// Runs fn(i) for i in [0, n) on all cores.
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn);

bool same_bits(const void* a, const void* b, size_t n);

// Device memory of this program's runtime, freed on scope exit.
struct Dev {
  void* p = nullptr;
  size_t bytes = 0;
  explicit Dev(size_t b) : bytes(b) { cuda_check(cudaMalloc(&p, b ? b : 16), "cudaMalloc"); }
  ~Dev() {
    if (p) cudaFree(p);
  }
  Dev(const Dev&) = delete;
  Dev& operator=(const Dev&) = delete;
  template <typename T>
  T* as() const {
    return static_cast<T*>(p);
  }
  // poison and put wait for the device before they return: the layer works on its own non-blocking stream,
  // which is not ordered after this program's default stream, where cudaMemset is asynchronous and a
  // cudaMemcpy from pageable memory may return before the data has landed.
  // 0xFF makes every float a NaN and every int32 -1; 0x7F makes every int32 a large positive number.
  void poison(int byte) {
    cuda_check(cudaMemset(p, byte, bytes), "cudaMemset (poison)");
    cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize (after cudaMemset)");
  }
  void put(const void* src, size_t n) {
    cuda_check(cudaMemcpy(p, src, n, cudaMemcpyHostToDevice), "cudaMemcpy H2D");
    cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize (after cudaMemcpy H2D)");
  }
  template <typename T>
  std::vector<T> get(size_t n) const {
    std::vector<T> v(n);
    cuda_check(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return v;
  }
};

// Waits for the stage launched on the default stream; a launch or kernel error is fatal (the context may
// be unusable after it), after the failure is recorded.
void stage_sync(cudaError_t launch, const std::string& name);

}  // namespace fmoe_selftest
