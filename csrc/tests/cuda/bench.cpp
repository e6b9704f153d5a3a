#include "bench.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <set>
#include <string>
#include <vector>

#include "data.h"
#include "harness.h"
#include "report.h"
#include "suites.h"

namespace fmoe_selftest {
namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0.0 : n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Times fn() `iters` times after `warm` untimed calls; CUDA events around each call on this program's
// default stream, median of the calls, in milliseconds.
template <typename Fn>
double time_median_ms(int warm, int iters, Fn fn, double* min_ms = nullptr) {
  for (int i = 0; i < warm; i++) fn();
  cuda_check(cudaDeviceSynchronize(), "warm-up");
  cudaEvent_t e0, e1;
  cuda_check(cudaEventCreate(&e0), "cudaEventCreate");
  cuda_check(cudaEventCreate(&e1), "cudaEventCreate");
  std::vector<double> ms;
  for (int i = 0; i < iters; i++) {
    cuda_check(cudaEventRecord(e0, 0), "cudaEventRecord");
    fn();
    cuda_check(cudaEventRecord(e1, 0), "cudaEventRecord");
    cuda_check(cudaEventSynchronize(e1), "cudaEventSynchronize");
    float m = 0;
    cuda_check(cudaEventElapsedTime(&m, e0, e1), "cudaEventElapsedTime");
    ms.push_back(m);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  if (min_ms) *min_ms = *std::min_element(ms.begin(), ms.end());
  return median(ms);
}

// Device-to-device copy of 1 GiB, read + write bytes counted: the memory ceiling of this run.
double copy_ceiling_gbps() {
  const size_t bytes = size_t(1) << 30;
  Dev a(bytes), b(bytes);
  cuda_check(cudaMemset(a.p, 1, bytes), "cudaMemset");
  const double ms = time_median_ms(
      2, 15, [&] { cuda_check(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice, 0), "cudaMemcpyAsync"); });
  return 2.0 * double(bytes) / (ms * 1e-3) / 1e9;
}

bool read_file(const std::string& path, void* dst, size_t bytes) {
  FILE* f = fopen(path.c_str(), "rb");
  if (!f) {
    fprintf(stderr, "cannot open %s\n", path.c_str());
    return false;
  }
  const size_t got = fread(dst, 1, bytes, f);
  const bool extra = fgetc(f) != EOF;
  fclose(f);
  if (got != bytes || extra) {
    fprintf(stderr, "%s: expected exactly %zu bytes\n", path.c_str(), bytes);
    return false;
  }
  return true;
}

// Weights from bench/gpu/torch_baseline.py: meta.txt "H F E k routing dtype T", gate.f32 [E,H] float32,
// w1.bin / w3.bin [E,F,H] and w2.bin [E,H,F] raw (16-bit for bf16/fp16), x.f32 [T,H] float32.
bool load_io_layer(const std::string& dir, HostLayer& L, std::vector<float>& x) {
  FILE* f = fopen((dir + "/meta.txt").c_str(), "r");
  if (!f) {
    fprintf(stderr, "cannot open %s/meta.txt\n", dir.c_str());
    return false;
  }
  long long H = 0, F = 0, E = 0, k = 0, T = 0;
  int routing = 0, dtype = 0;
  const int n = fscanf(f, "%lld %lld %lld %lld %d %d %lld", &H, &F, &E, &k, &routing, &dtype, &T);
  fclose(f);
  if (n != 7 || H < 1 || F < 1 || E < 1 || k < 1 || k > E || T < 1 || dtype < 0 || dtype > 2) {
    fprintf(stderr, "%s/meta.txt: expected \"H F E k routing dtype T\"\n", dir.c_str());
    return false;
  }
  L.c = Case{"io", H, F, E, k, T, routing, dtype, 0};
  const size_t es = dtype == 0 ? 4 : 2;
  L.gate.resize(size_t(E * H));
  x.resize(size_t(T * H));
  if (!read_file(dir + "/gate.f32", L.gate.data(), L.gate.size() * 4)) return false;
  if (!read_file(dir + "/x.f32", x.data(), x.size() * 4)) return false;
  std::vector<uint8_t> all;
  const char* names[3] = {"w1.bin", "w3.bin", "w2.bin"};
  std::vector<std::vector<uint8_t>>* dst[3] = {&L.w1, &L.w3, &L.w2};
  const size_t per = size_t(F * H) * es;  // bytes per expert matrix
  for (int m = 0; m < 3; m++) {
    all.resize(per * size_t(E));
    if (!read_file(dir + "/" + names[m], all.data(), all.size())) return false;
    dst[m]->resize(size_t(E));
    for (int64_t e = 0; e < E; e++)
      (*dst[m])[size_t(e)].assign(all.begin() + long(per * size_t(e)), all.begin() + long(per * size_t(e + 1)));
  }
  for (int64_t e = 0; e < E; e++) {
    L.p1.push_back(L.w1[size_t(e)].data());
    L.p3.push_back(L.w3[size_t(e)].data());
    L.p2.push_back(L.w2[size_t(e)].data());
  }
  return true;
}

// Device time per forward: n forwards queued back to back (their launches overlap the work in flight),
// one wait, wall time over n; the median of `trials`. What the GPU takes, without one host round trip per
// call: the same basis as the PyTorch timings (CUDA events around work that does not wait inside).
template <typename Fn>
double time_queued_ms(int n, int trials, Fn enqueue, fmoe_cuda_layer* layer) {
  char err[512] = {0};
  std::vector<double> ms;
  for (int t = 0; t <= trials; t++) {  // the first trial warms up
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < n; i++) enqueue();
    const int rc = api.synchronize(layer, err, sizeof err);
    if (rc != FMOE_CUDA_OK) die_rc(rc, "synchronize", err);
    const std::chrono::duration<double, std::milli> d = std::chrono::steady_clock::now() - t0;
    if (t > 0) ms.push_back(d.count() / n);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// Times the layer at each batch size; rows to stdout.
std::vector<BenchRow> bench_layer(fmoe_cuda_layer* layer, const Case& c, double ceiling_gbps,
                                  const std::vector<int64_t>& batch_sizes) {
  std::vector<BenchRow> rows;
  const double es = c.dtype == 0 ? 4.0 : 2.0;
  say("\n%6s %11s %11s %11s %11s %8s %10s %8s %9s\n", "T", "queued us", "per call", "min call", "host-array", "experts",
      "weight GB/s", "of copy", "TFLOP/s");
  for (int64_t T : batch_sizes) {
    Case cT = c;
    cT.T = T;
    const std::vector<float> x = make_input(cT, fresh_seed(1000 + uint64_t(T)));
    std::vector<int32_t> ids(size_t(T * c.k));
    std::vector<float> w(size_t(T * c.k));
    char err[512] = {0};
    int rc = api.route(layer, x.data(), T, ids.data(), w.data(), err, sizeof err);
    if (rc != FMOE_CUDA_OK) die_rc(rc, "route", err);
    const std::set<int32_t> used(ids.begin(), ids.end());
    const double weight_bytes = double(used.size()) * 3.0 * double(c.H) * double(c.F) * es;

    Dev dx(x.size() * 4), dy(x.size() * 4);
    dx.put(x.data(), x.size() * 4);
    BenchRow r;
    r.T = T;
    r.iters = T <= 16 ? 50 : T <= 512 ? 20 : 10;
    r.ms_call = time_median_ms(
        T >= 512 ? 2 : 5, r.iters,
        [&] {
          const int rc2 = api.forward_device(layer, dx.as<float>(), T, dy.as<float>(), err, sizeof err);
          if (rc2 != FMOE_CUDA_OK) die_rc(rc2, "forward_device", err);
        },
        &r.ms_min);
    r.ms = time_queued_ms(
        r.iters, 5,
        [&] {
          const int rc2 = api.enqueue_device(layer, dx.as<float>(), T, dy.as<float>(), err, sizeof err);
          if (rc2 != FMOE_CUDA_OK) die_rc(rc2, "enqueue_device", err);
        },
        layer);
    std::vector<float> y(x.size());
    r.ms_host = time_median_ms(1, 3, [&] {
      const int rc2 = api.forward(layer, x.data(), T, y.data(), err, sizeof err);
      if (rc2 != FMOE_CUDA_OK) die_rc(rc2, "forward", err);
    });
    r.experts_used = used.size();
    r.weight_gb = weight_bytes / 1e9;
    r.gbps = weight_bytes / (r.ms * 1e-3) / 1e9;
    r.tflops = 2.0 * double(T) * double(c.k) * 3.0 * double(c.H) * double(c.F) / (r.ms * 1e-3) / 1e12;
    rows.push_back(r);
    say("%6lld %11.1f %11.1f %11.1f %11.1f %8zu %10.0f %7.1f%% %9.1f\n", (long long)T, r.ms * 1e3, r.ms_call * 1e3,
        r.ms_min * 1e3, r.ms_host * 1e3, used.size(), r.gbps, 100.0 * r.gbps / ceiling_gbps, r.tflops);
  }
  return rows;
}

}  // namespace

int run_bench(const std::string& io_dir, const std::string& out_dir, const std::string& json_head,
              const std::vector<int64_t>& batch_sizes) {
  const size_t report_start = g_report.size();
  const double ceiling = copy_ceiling_gbps();
  say("\ndevice-to-device copy ceiling: %.0f GB/s (1 GiB, read + write, median of 15)\n", ceiling);
  HostLayer L;
  std::vector<float> x_io;
  std::string source = "generated";
  const double t0 = now_s();
  if (!io_dir.empty()) {
    if (!load_io_layer(io_dir, L, x_io)) return 2;
    source = "torch_baseline.py";
  } else {
    L = make_layer(Case{"mixtral_bf16", 4096, 14336, 8, 2, 1, 0, 1, fresh_seed(4321), true});
  }
  fmoe_cuda_layer* layer = create(L);
  say("Mixtral-8x7B layer H=%lld F=%lld E=%lld k=%lld %s, weights %s (%.1f s to load)\n", (long long)L.c.H,
      (long long)L.c.F, (long long)L.c.E, (long long)L.c.k, dtype_name(L.c.dtype), source.c_str(), now_s() - t0);
  L.w1.clear();
  L.w3.clear();
  L.w2.clear();
  if (!io_dir.empty()) {  // output for x.f32, compared on the Python side
    const std::vector<float> y = forward(layer, x_io.data(), L.c.T, L.c.H);
    const std::vector<float> y2 = forward(layer, x_io.data(), L.c.T, L.c.H);
    check(same_bits(y.data(), y2.data(), y.size() * 4), "io/repeatable", "second forward, same bits");
    FILE* f = fopen((io_dir + "/out.f32").c_str(), "wb");
    if (!f || fwrite(y.data(), 4, y.size(), f) != y.size()) {
      fprintf(stderr, "cannot write %s/out.f32\n", io_dir.c_str());
      return 2;
    }
    fclose(f);
  }
  const std::vector<BenchRow> rows = bench_layer(layer, L.c, ceiling, batch_sizes);
  api.destroy(layer);
  if (!out_dir.empty())
    write_bench_results(out_dir, json_head, source, L.c, ceiling, rows, g_report.substr(report_start));
  return 0;
}

}  // namespace fmoe_selftest
