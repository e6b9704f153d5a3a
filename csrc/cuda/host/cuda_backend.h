// The CUDA backend's host side: finds and opens the CUDA backend library at run time (dlopen), beside the
// addon binary, and wraps it in a Backend. make_cuda_backend and cuda_available are declared in
// core/backend.h (the factory there calls them).
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "../../core/backend.h"

namespace fmoe {

struct CudaDevice {
  std::string name;
  size_t total_memory = 0;
  int major = 0, minor = 0, multiprocessors = 0;
};

struct CudaStatus {
  bool available = false;    // library loaded, driver present, at least one device
  std::string reason;        // why not, when !available
  std::string library_path;  // where the library was found (or looked for)
  int driver_version = 0, runtime_version = 0;
  std::vector<CudaDevice> devices;
};

// Probes once and caches the result (cheap afterwards). Never throws.
const CudaStatus& cuda_status();

// make_cuda_backend (backend.h) throws MoeException(NoDevice) carrying cuda_status().reason when the
// backend cannot run, Cuda/OutOfMemory on failures.

}  // namespace fmoe
