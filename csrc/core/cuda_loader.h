// Finds and opens the CUDA backend library at run time (dlopen), beside the addon binary.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "backend.h"

namespace fmoe {

struct CudaDevice {
  std::string name;
  size_t total_memory = 0;
  int major = 0, minor = 0, multiprocessors = 0;
};

struct CudaStatus {
  bool available = false;     // library loaded, driver present, at least one device
  std::string reason;         // why not, when !available
  std::string library_path;   // where the library was found (or looked for)
  int driver_version = 0, runtime_version = 0;
  std::vector<CudaDevice> devices;
};

// Probes once and caches the result (cheap afterwards). Never throws.
const CudaStatus& cuda_status();

// Builds a CUDA layer on `device`; throws MoeException(NoDevice) carrying cuda_status().reason when the
// backend cannot run, Cuda/OutOfMemory on failures.
std::unique_ptr<Backend> make_cuda_backend(const MoeConfig& cfg, const WeightsView& weights, int device);

}  // namespace fmoe
