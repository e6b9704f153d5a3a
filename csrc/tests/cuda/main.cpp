// fmoe_cuda_selftest: checks the CUDA backend on a real GPU against a float64 CPU reference, then times it.
//
//   fmoe_cuda_selftest --lib path/to/libfused_moe_cuda.so [--out DIR] [--seed N] [--no-bench]
//   fmoe_cuda_selftest --lib ... --bench-only [--io DIR] [--out DIR] [--bench-t 1,4096]
//
// Correctness (exit status 1 on any failure; 2 on a setup error; 77 when there is no CUDA device):
//  - every pipeline stage on its own, through the launchers of moe_cuda.cuh linked into this program:
//    gating (E = 8, 16, 60, 64, 256; k = 1, 2, 4, 8; both routings; exact ties; NaN and infinite input; a
//    NaN router row), dispatch (uniform, skewed and sparse expert choices; block_m 16, 64, 128), the
//    input conversion to bf16/fp16 (bit-exact, subnormals, overflow, NaN), the expert FFN (every tile
//    configuration and shape of each weight dtype, and all of them give the same bits) and combine
//    (bit-exact against a host fmaf emulation);
//  - the whole layer through the library's C ABI (dlopen, as the addon does): relative L2 error against
//    float64 on odd sizes, E = 8, 16, 60, 64 (and more), k = 1, 2, 4, 8, both routings, float32/bf16/fp16
//    weights, duplicated router rows (ties), a NaN router row, non-finite tokens; route() against the
//    reference top-k; the device-pointer entry point; batch invariance;
//  - the MoE families through the same ABI: sigmoid scores, a choice bias, group-limited top-k (max and
//    top-2 sum), the routed scale and a shared expert (gated or not, whole and partial slices of F);
//  - every output buffer is filled with NaN bytes (0xFF) before each run, every run is done twice and the
//    two results must have identical bits.
// Inputs are fresh random numbers on each run; the seed is printed (and written to the JSON) so that a
// failure can be replayed with --seed.
//
// Speed (skipped with --no-bench): the Mixtral-8x7B layer (H=4096, F=14336, E=8, k=2, bfloat16) at
// T = 1, 16, 128, 512, 4096 (or those of --bench-t), timed with CUDA events (warm-up, then the median of single calls),
// weight GB/s against a device-to-device copy measured in the same run. With --io DIR the layer uses weights written by
// bench/gpu/torch_baseline.py (meta.txt, gate.f32, w1.bin, w3.bin, w2.bin, x.f32), and its output for x.f32 goes to
// DIR/out.f32 for the comparison on the Python side.
//
// Results: stdout, and with --out (or the environment variable FMOE_SELFTEST_OUT) cuda_selftest.json /
// cuda_selftest.txt (correctness) and cuda_bench.json / cuda_bench.txt (speed).
//
// The library is opened with dlopen; this program's own CUDA runtime runs the stage tests, allocates
// device buffers and measures the copy ceiling (both runtimes share the device's primary context).
//
// The parts: harness (the library's entry points, the record of checks, device buffers), data (cases,
// weights, inputs), reference (float64), stage_tests, layer_tests, bench, report (the JSON and text
// files); this file is the command line.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "bench.h"
#include "fused_moe_cuda.h"
#include "harness.h"
#include "report.h"
#include "suites.h"

using namespace fmoe_selftest;

// "1,16,4096" -> {1, 16, 4096}; false on anything else (empty items, signs, values out of range).
static bool parse_batch_sizes(const std::string& s, std::vector<int64_t>& out) {
  std::vector<int64_t> v;
  size_t i = 0;
  while (i <= s.size()) {
    const size_t j = std::min(s.find(',', i), s.size());
    const std::string item = s.substr(i, j - i);
    if (item.empty() || item.find_first_not_of("0123456789") != std::string::npos || item.size() > 5) return false;
    const long long t = std::stoll(item);
    if (t < 1 || t > 65536) return false;
    v.push_back(t);
    i = j + 1;
  }
  out = v;
  return !out.empty();
}

int main(int argc, char** argv) {
  std::string lib, out_dir, io_dir;
  std::vector<int64_t> bench_t = {1, 16, 128, 512, 4096};  // batch sizes timed
  bool bench = true, correctness = true, seed_given = false;
  for (int i = 1; i < argc; i++) {
    const std::string a = argv[i];
    if (a == "--lib" && i + 1 < argc)
      lib = argv[++i];
    else if (a == "--out" && i + 1 < argc)
      out_dir = argv[++i];
    else if (a == "--io" && i + 1 < argc)
      io_dir = argv[++i];
    else if (a == "--seed" && i + 1 < argc) {
      g_seed = strtoull(argv[++i], nullptr, 0);
      seed_given = true;
    } else if (a == "--no-bench")
      bench = false;
    else if (a == "--bench-t" && i + 1 < argc) {
      if (!parse_batch_sizes(argv[++i], bench_t)) {
        fprintf(stderr, "--bench-t must be a comma-separated list of batch sizes from 1 to 65536, got '%s'\n", argv[i]);
        return 2;
      }
    } else if (a == "--bench-only")
      correctness = false;
    else {
      fprintf(stderr,
              "usage: %s --lib libfused_moe_cuda.so [--out DIR] [--seed N] [--no-bench | --bench-only [--io DIR]] "
              "[--bench-t LIST]\n",
              argv[0]);
      return 2;
    }
  }
  if (out_dir.empty() && getenv("FMOE_SELFTEST_OUT")) out_dir = getenv("FMOE_SELFTEST_OUT");
  if (!seed_given) {
    std::random_device rd;
    g_seed =
        (uint64_t(rd()) << 32) ^ uint64_t(rd()) ^ uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
  }
  if (lib.empty()) {
    fprintf(stderr, "--lib is required\n");
    return 2;
  }
  if (!open_library(lib)) return 2;
  if (api.abi_version() != FMOE_CUDA_ABI_VERSION) {
    fprintf(stderr, "ABI %d, expected %d\n", api.abi_version(), FMOE_CUDA_ABI_VERSION);
    return 2;
  }
  char err[512] = {0};
  int driver = 0, runtime = 0, count = 0;
  int rc = api.versions(&driver, &runtime, err, sizeof err);
  if (rc == FMOE_CUDA_ERR_NO_DEVICE) {
    printf("no CUDA driver: %s (skipped)\n", err);
    return kExitSkip;
  }
  if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_versions", err);
  rc = api.device_count(&count, err, sizeof err);
  if (rc == FMOE_CUDA_ERR_NO_DEVICE || (rc == FMOE_CUDA_OK && count < 1)) {
    printf("no CUDA device: %s (skipped)\n", err);
    return kExitSkip;
  }
  if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_device_count", err);
  fmoe_cuda_device_props props{};
  rc = api.device_info(0, &props, err, sizeof err);
  if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_device_info", err);
  cuda_check(cudaSetDevice(0), "cudaSetDevice");
  say("device 0: %s, sm_%d%d, %d SMs, %.1f GiB; driver %d, runtime %d; seed %llu\n\n", props.name, props.major,
      props.minor, props.multiprocessors, double(props.total_memory) / (1u << 30), driver, runtime,
      (unsigned long long)g_seed);
  const std::string head = json_device_head(props, driver, runtime);

  if (correctness) {
    const double t_start = now_s();
    run_stage_tests();
    run_layer_tests();
    run_family_tests();
    say("correctness: %d check(s), %d failure(s), %.1f s, seed %llu\n", g_checks, g_failures, now_s() - t_start,
        (unsigned long long)g_seed);
    if (!out_dir.empty()) write_selftest_results(out_dir, head);
    say("\n%s\n", g_failures == 0 ? "ALL CHECKS PASSED" : "SOME CHECKS FAILED");
  }

  if (bench) {
    const int bench_rc = run_bench(io_dir, out_dir, head, bench_t);
    if (bench_rc != 0) return bench_rc;
  }
  return g_failures == 0 ? 0 : 1;
}
