// Speed: the Mixtral-8x7B layer at T = 1, 16, 128, 512, 4096, beside a device-to-device copy measured in
// the same run.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace fmoe_selftest {

struct BenchRow {
  int64_t T;
  int iters;
  size_t experts_used;
  double ms;       // per forward, back to back: n enqueue_device calls then one wait, over n; median of 5
  double ms_call;  // one forward_device call between CUDA events (its own launches and wait included)
  double ms_min, ms_host, weight_gb, gbps, tflops;
};

// Copy ceiling, then the layer (weights from torch_baseline.py in io_dir when given, else generated; with
// io_dir its output for x.f32 goes to io_dir/out.f32), the table on stdout, and cuda_bench.json / .txt in
// out_dir when given. Returns 0, or 2 when the weights cannot be read or the output cannot be written.
// batch_sizes: the T values timed, in order.
int run_bench(const std::string& io_dir, const std::string& out_dir, const std::string& json_head,
              const std::vector<int64_t>& batch_sizes);

}  // namespace fmoe_selftest
