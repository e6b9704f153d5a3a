// cuda_selftest: checks libfused_moe_cuda.so on a real GPU against a float64 CPU reference, then times it.
//
//   cuda_selftest --lib path/to/libfused_moe_cuda.so [--out DIR] [--no-bench]
//
// Correctness (exit status 1 on any failure): relative L2 error (< 1e-5 for float32 weights, < 1e-2 for
// 16-bit), bit-identical repeated forwards, batch invariance (a token alone gives the same bits as inside
// a batch), route() against the reference top-k, the device-pointer entry point, and non-finite input.
// Speed: the Mixtral-8x7B layer (H=4096, F=14336, E=8, k=2, bfloat16) at decode and prefill batch sizes,
// with weight GB/s against a device-to-device copy ceiling measured in the same run and TFLOP/s against
// the nominal dense bf16 peak. Results go to stdout and, with --out, to cuda_selftest.json / .txt.
//
// The library is opened with dlopen, as the addon does; this program's own CUDA runtime only allocates
// device buffers and measures the copy ceiling (both runtimes share the device's primary context).
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "../fused_moe_cuda.h"

namespace {

constexpr double kPeakBf16Tflops = 990.0;  // H200 dense bf16, nominal

struct Api {
  fmoe_cuda_abi_version_fn abi_version;
  fmoe_cuda_versions_fn versions;
  fmoe_cuda_device_count_fn device_count;
  fmoe_cuda_device_info_fn device_info;
  fmoe_cuda_layer_create_fn create;
  fmoe_cuda_layer_forward_fn forward;
  fmoe_cuda_layer_forward_device_fn forward_device;
  fmoe_cuda_layer_route_fn route;
  fmoe_cuda_layer_bytes_fn bytes;
  fmoe_cuda_layer_destroy_fn destroy;
};
Api api;

int g_failures = 0;
std::string g_checks_json;  // comma-separated JSON objects
std::string g_report;       // the human-readable log, also written to --out

void say(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void say(const char* fmt, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  fputs(buf, stdout);
  fflush(stdout);
  g_report += buf;
}

void check(bool ok, const std::string& name, const std::string& detail) {
  say("  [%s] %s %s\n", ok ? "ok  " : "FAIL", name.c_str(), detail.c_str());
  if (!ok) g_failures++;
  if (!g_checks_json.empty()) g_checks_json += ",\n    ";
  g_checks_json += "{\"name\": \"" + name + "\", \"ok\": " + (ok ? "true" : "false") + ", \"detail\": \"" + detail + "\"}";
}

void die_rc(int rc, const char* what, const char* err) {
  fprintf(stderr, "%s failed (code %d): %s\n", what, rc, err);
  exit(2);
}

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    exit(2);
  }
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Runs fn(i) for i in [0, n) on all cores.
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(n, std::thread::hardware_concurrency()));
  std::vector<std::thread> pool;
  for (int64_t w = 0; w < nt; w++)
    pool.emplace_back([&, w] {
      for (int64_t i = w; i < n; i += nt) fn(i);
    });
  for (auto& t : pool) t.join();
}

// ---- data ------------------------------------------------------------------------------------------

struct Rng {  // splitmix64: small, seeded, reproducible
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed) {}
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [-scale, scale], never exactly zero.
  float uniform(float scale) {
    const double u = double(next() >> 11) / double(1ull << 53);
    float v = float((u * 2.0 - 1.0) * scale);
    return v == 0.0f ? scale * 1e-3f : v;
  }
};

uint16_t f32_to_bf16(float f) {
  uint32_t b;
  memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40);
  b += 0x7fffu + ((b >> 16) & 1u);
  return uint16_t(b >> 16);
}
float bf16_to_f32(uint16_t h) {
  uint32_t b = uint32_t(h) << 16;
  float f;
  memcpy(&f, &b, 4);
  return f;
}
// Normal-range values only (the test data stays far from the half limits); round to nearest even.
uint16_t f32_to_f16(float f) {
  uint32_t b;
  memcpy(&b, &f, 4);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const int exp = int((b >> 23) & 0xff) - 127 + 15;
  uint32_t man = b & 0x7fffffu;
  if (exp <= 0) {  // subnormal half
    if (exp < -10) return uint16_t(sign);
    man |= 0x800000u;
    const int shift = 14 - exp;
    uint32_t r = man >> shift;
    const uint32_t rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) r++;
    return uint16_t(sign | r);
  }
  if (exp >= 31) return uint16_t(sign | 0x7c00u);
  uint32_t h = uint32_t(exp) << 10 | (man >> 13);
  const uint32_t rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
  return uint16_t(sign | h);
}
float f16_to_f32(uint16_t h) {
  const int exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  const float sign = (h & 0x8000) ? -1.0f : 1.0f;
  if (exp == 0) return sign * std::ldexp(float(man), -24);
  if (exp == 31) return man ? NAN : sign * INFINITY;
  return sign * std::ldexp(float(1024 + man), exp - 25);
}

struct Case {
  std::string name;
  int64_t H, F, E, k, T;  // hidden, intermediate, experts, picks, tokens
  int routing;            // 0 softmax-topk-renorm, 1 softmax-topk
  int dtype;              // 0 float32, 1 bfloat16, 2 float16
  uint64_t seed;
  bool shared_experts = false;  // every expert gets the same weights (saves host memory at full size)
};

// A layer's weights as stored (what the library receives) and as exact floats (what the reference uses).
struct HostLayer {
  Case c;
  std::vector<float> gate;                     // [E, H]
  std::vector<std::vector<uint8_t>> w1, w3, w2;  // stored bytes per expert
  std::vector<std::vector<float>> x1, x3, x2;    // exact values per expert
  std::vector<const void*> p1, p3, p2;         // pointers handed to the library
};

void fill_matrix(Rng& r, int64_t n, float scale, int dtype, std::vector<uint8_t>& stored, std::vector<float>& exact) {
  exact.resize(size_t(n));
  stored.resize(size_t(n) * (dtype == 0 ? 4 : 2));
  for (int64_t i = 0; i < n; i++) {
    const float v = r.uniform(scale);
    if (dtype == 0) {
      memcpy(&stored[size_t(i) * 4], &v, 4);
      exact[size_t(i)] = v;
    } else {
      const uint16_t h = dtype == 1 ? f32_to_bf16(v) : f32_to_f16(v);
      memcpy(&stored[size_t(i) * 2], &h, 2);
      exact[size_t(i)] = dtype == 1 ? bf16_to_f32(h) : f16_to_f32(h);
    }
  }
}

HostLayer make_layer(const Case& c) {
  HostLayer L;
  L.c = c;
  Rng r(c.seed);
  L.gate.resize(size_t(c.E * c.H));
  for (auto& v : L.gate) v = r.uniform(2.0f / std::sqrt(float(c.H)));
  const int64_t n_experts_stored = c.shared_experts ? 1 : c.E;
  L.w1.resize(size_t(n_experts_stored));
  L.w3.resize(size_t(n_experts_stored));
  L.w2.resize(size_t(n_experts_stored));
  L.x1.resize(size_t(n_experts_stored));
  L.x3.resize(size_t(n_experts_stored));
  L.x2.resize(size_t(n_experts_stored));
  for (int64_t e = 0; e < n_experts_stored; e++) {
    fill_matrix(r, c.F * c.H, 1.0f / std::sqrt(float(c.H)), c.dtype, L.w1[size_t(e)], L.x1[size_t(e)]);
    fill_matrix(r, c.F * c.H, 1.0f / std::sqrt(float(c.H)), c.dtype, L.w3[size_t(e)], L.x3[size_t(e)]);
    fill_matrix(r, c.H * c.F, 1.0f / std::sqrt(float(c.F)), c.dtype, L.w2[size_t(e)], L.x2[size_t(e)]);
  }
  for (int64_t e = 0; e < c.E; e++) {
    const size_t s = c.shared_experts ? 0 : size_t(e);
    L.p1.push_back(L.w1[s].data());
    L.p3.push_back(L.w3[s].data());
    L.p2.push_back(L.w2[s].data());
  }
  return L;
}

std::vector<float> make_input(const Case& c, uint64_t seed) {
  Rng r(seed);
  std::vector<float> x(size_t(c.T * c.H));
  for (auto& v : x) v = r.uniform(1.0f);
  return x;
}

// ---- float64 reference -----------------------------------------------------------------------------

struct RefRoute {
  std::vector<int> ids;
  std::vector<double> w;
  double margin;  // p of the k-th pick minus p of the best unpicked (how safe the comparison is)
};

RefRoute ref_route(const HostLayer& L, const float* xt) {
  const Case& c = L.c;
  std::vector<double> logit(size_t(c.E)), p(size_t(c.E));
  for (int64_t e = 0; e < c.E; e++) {
    double s = 0;
    for (int64_t i = 0; i < c.H; i++) s += double(L.gate[size_t(e * c.H + i)]) * xt[i];
    logit[size_t(e)] = s;
  }
  double mx = -INFINITY;
  for (double l : logit)
    if (!std::isnan(l) && l > mx) mx = l;
  double sum = 0;
  for (int64_t e = 0; e < c.E; e++) {
    const double l = logit[size_t(e)];
    double v = std::isnan(l) ? NAN : (std::isinf(mx) && mx > 0) ? (l == mx ? 1.0 : 0.0) : std::exp(l - mx);
    p[size_t(e)] = v;
    if (!std::isnan(v)) sum += v;
  }
  for (auto& v : p) v /= sum;
  std::vector<int> order(size_t(c.E));
  for (int64_t e = 0; e < c.E; e++) order[size_t(e)] = int(e);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    const bool na = std::isnan(p[size_t(a)]), nb = std::isnan(p[size_t(b)]);
    if (na != nb) return nb;
    if (!na && p[size_t(a)] != p[size_t(b)]) return p[size_t(a)] > p[size_t(b)];
    return a < b;
  });
  RefRoute R;
  double picked = 0;
  for (int64_t j = 0; j < c.k; j++) {
    R.ids.push_back(order[size_t(j)]);
    picked += p[size_t(order[size_t(j)])];
  }
  for (int64_t j = 0; j < c.k; j++) {
    const double v = p[size_t(R.ids[size_t(j)])];
    R.w.push_back(c.routing == 0 ? v / picked : v);
  }
  R.margin = c.k < c.E ? p[size_t(order[size_t(c.k - 1)])] - p[size_t(order[size_t(c.k)])] : 1.0;
  return R;
}

// One token's output row in float64. `inner` runs a loop over [0, n): in parallel for a single token at
// full size, serially when the caller already spreads tokens over the cores.
void ref_token(const HostLayer& L, const float* xt, double* out,
               const std::function<void(int64_t, const std::function<void(int64_t)>&)>& inner) {
  const Case& c = L.c;
  std::vector<double> h(size_t(c.F));
  const RefRoute R = ref_route(L, xt);
  for (int64_t j = 0; j < c.k; j++) {
    const size_t e = c.shared_experts ? 0 : size_t(R.ids[size_t(j)]);
    const float* w1 = L.x1[e].data();
    const float* w3 = L.x3[e].data();
    const float* w2 = L.x2[e].data();
    inner(c.F, [&](int64_t f) {
      double a = 0, b = 0;
      for (int64_t i = 0; i < c.H; i++) {
        a += double(w1[f * c.H + i]) * xt[i];
        b += double(w3[f * c.H + i]) * xt[i];
      }
      h[size_t(f)] = a / (1.0 + std::exp(-a)) * b;
    });
    const double wj = R.w[size_t(j)];
    inner(c.H, [&](int64_t o) {
      double s = 0;
      for (int64_t f = 0; f < c.F; f++) s += double(w2[o * c.F + f]) * h[size_t(f)];
      out[o] += wj * s;
    });
  }
}

// out[T, H] in float64: tokens spread over the cores, or each token's rows when there are few tokens.
std::vector<double> ref_forward(const HostLayer& L, const std::vector<float>& x) {
  const Case& c = L.c;
  std::vector<double> out(size_t(c.T * c.H), 0.0);
  auto serial = [](int64_t n, const std::function<void(int64_t)>& fn) {
    for (int64_t i = 0; i < n; i++) fn(i);
  };
  if (c.T >= 16) {
    parallel_for(c.T, [&](int64_t t) { ref_token(L, &x[size_t(t * c.H)], &out[size_t(t * c.H)], serial); });
  } else {
    for (int64_t t = 0; t < c.T; t++) ref_token(L, &x[size_t(t * c.H)], &out[size_t(t * c.H)], parallel_for);
  }
  return out;
}

double rel_l2(const std::vector<float>& y, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); i++) {
    num += (double(y[i]) - ref[i]) * (double(y[i]) - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}

// ---- library calls ---------------------------------------------------------------------------------

fmoe_cuda_layer* create(const HostLayer& L) {
  fmoe_cuda_config cfg{};
  cfg.hidden = L.c.H;
  cfg.intermediate = L.c.F;
  cfg.num_experts = L.c.E;
  cfg.top_k = L.c.k;
  cfg.routing = L.c.routing;
  cfg.weight_dtype = L.c.dtype;
  cfg.device = 0;
  char err[512] = {0};
  fmoe_cuda_layer* layer = nullptr;
  const int rc = api.create(&cfg, L.gate.data(), L.p1.data(), L.p3.data(), L.p2.data(), &layer, err, sizeof err);
  if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_layer_create", err);
  return layer;
}

std::vector<float> forward(fmoe_cuda_layer* layer, const float* x, int64_t T, int64_t H) {
  std::vector<float> y(size_t(T * H));
  char err[512] = {0};
  const int rc = api.forward(layer, x, T, y.data(), nullptr, err, sizeof err);
  if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_layer_forward", err);
  return y;
}

std::string fmt(const char* f, double v) {
  char b[64];
  snprintf(b, sizeof b, f, v);
  return b;
}

const char* dtype_name(int d) { return d == 0 ? "f32" : d == 1 ? "bf16" : "f16"; }

void run_case(const Case& c) {
  say("case %s: H=%lld F=%lld E=%lld k=%lld T=%lld %s routing=%d\n", c.name.c_str(), (long long)c.H,
      (long long)c.F, (long long)c.E, (long long)c.k, (long long)c.T, dtype_name(c.dtype), c.routing);
  const HostLayer L = make_layer(c);
  const std::vector<float> x = make_input(c, c.seed * 7 + 1);
  fmoe_cuda_layer* layer = create(L);
  const std::string tag = c.name + "/";

  const std::vector<float> y = forward(layer, x.data(), c.T, c.H);
  const std::vector<double> ref = ref_forward(L, x);
  const double err = rel_l2(y, ref);
  const double tol = c.dtype == 0 ? 1e-5 : 1e-2;
  check(std::isfinite(err) && err < tol, tag + "rel_l2", fmt("%.3e", err) + " (tolerance " + fmt("%.0e", tol) + ")");

  const std::vector<float> y2 = forward(layer, x.data(), c.T, c.H);
  check(memcmp(y.data(), y2.data(), y.size() * 4) == 0, tag + "repeatable", "second forward, same bits");

  bool invariant = true;
  for (int64_t t : {int64_t(0), c.T / 2, c.T - 1}) {
    const std::vector<float> one = forward(layer, &x[size_t(t * c.H)], 1, c.H);
    invariant = invariant && memcmp(one.data(), &y[size_t(t * c.H)], size_t(c.H) * 4) == 0;
  }
  check(invariant, tag + "batch_invariant", "tokens 0, T/2, T-1 alone vs in the batch");

  std::vector<int32_t> ids(size_t(c.T * c.k));
  std::vector<float> w(size_t(c.T * c.k));
  char errbuf[512] = {0};
  int rc = api.route(layer, x.data(), c.T, ids.data(), w.data(), errbuf, sizeof errbuf);
  if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_layer_route", errbuf);
  int64_t compared = 0, mismatched = 0;
  double max_werr = 0;
  for (int64_t t = 0; t < c.T; t++) {
    const RefRoute R = ref_route(L, &x[size_t(t * c.H)]);
    if (R.margin < 1e-5) continue;  // near tie: float32 and float64 may legitimately disagree
    compared++;
    for (int64_t j = 0; j < c.k; j++) {
      if (ids[size_t(t * c.k + j)] != R.ids[size_t(j)]) mismatched++;
      max_werr = std::max(max_werr, std::fabs(double(w[size_t(t * c.k + j)]) - R.w[size_t(j)]));
    }
  }
  check(mismatched == 0 && max_werr < 1e-5, tag + "route",
        std::to_string(compared) + " tokens compared, " + std::to_string(mismatched) + " id mismatches, max |dw| " +
            fmt("%.2e", max_werr));

  // The device-pointer entry point gives the same bits as the host one.
  float *dx = nullptr, *dy = nullptr;
  cuda_check(cudaMalloc(&dx, x.size() * 4), "cudaMalloc");
  cuda_check(cudaMalloc(&dy, y.size() * 4), "cudaMalloc");
  cuda_check(cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
  rc = api.forward_device(layer, dx, c.T, dy, errbuf, sizeof errbuf);
  if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_layer_forward_device", errbuf);
  std::vector<float> y3(y.size());
  cuda_check(cudaMemcpy(y3.data(), dy, y.size() * 4, cudaMemcpyDeviceToHost), "cudaMemcpy");
  cudaFree(dx);
  cudaFree(dy);
  check(memcmp(y.data(), y3.data(), y.size() * 4) == 0, tag + "device_entry", "forward_device, same bits");

  api.destroy(layer);
}

// Non-finite input: no crash, ids in range, the other tokens unchanged.
void run_nonfinite(int dtype) {
  Case c{std::string("nonfinite_") + dtype_name(dtype), 64, 128, 8, 2, 8, 0, dtype, 99};
  say("case %s\n", c.name.c_str());
  const HostLayer L = make_layer(c);
  std::vector<float> x = make_input(c, 5);
  fmoe_cuda_layer* layer = create(L);
  const std::vector<float> clean = forward(layer, x.data(), c.T, c.H);
  x[size_t(2 * c.H + 3)] = NAN;
  x[size_t(5 * c.H + 1)] = INFINITY;
  for (int64_t i = 0; i < c.H; i++) x[size_t(6 * c.H + i)] = -INFINITY;
  const std::vector<float> y = forward(layer, x.data(), c.T, c.H);
  bool others = true;
  for (int64_t t = 0; t < c.T; t++)
    if (t != 2 && t != 5 && t != 6) others = others && memcmp(&y[size_t(t * c.H)], &clean[size_t(t * c.H)], size_t(c.H) * 4) == 0;
  check(others, c.name + "/others_unchanged", "finite tokens keep their bits");
  std::vector<int32_t> ids(size_t(c.T * c.k));
  std::vector<float> w(size_t(c.T * c.k));
  char err[512] = {0};
  const int rc = api.route(layer, x.data(), c.T, ids.data(), w.data(), err, sizeof err);
  bool in_range = rc == FMOE_CUDA_OK;
  for (int32_t id : ids) in_range = in_range && id >= 0 && id < c.E;
  for (int64_t t = 0; t < c.T; t++) in_range = in_range && ids[size_t(t * c.k)] != ids[size_t(t * c.k + 1)];
  check(in_range, c.name + "/ids_in_range", "route ids in [0, E) and distinct per token");
  api.destroy(layer);
}

// ---- speed -----------------------------------------------------------------------------------------

double copy_ceiling_gbps() {
  const size_t bytes = size_t(1) << 30;
  void *a = nullptr, *b = nullptr;
  cuda_check(cudaMalloc(&a, bytes), "cudaMalloc");
  cuda_check(cudaMalloc(&b, bytes), "cudaMalloc");
  cuda_check(cudaMemset(a, 1, bytes), "cudaMemset");
  cuda_check(cudaMemcpy(b, a, bytes, cudaMemcpyDeviceToDevice), "warm-up copy");
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  const int iters = 20;
  cudaEventRecord(e0);
  for (int i = 0; i < iters; i++) cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice);
  cudaEventRecord(e1);
  cuda_check(cudaEventSynchronize(e1), "copy");
  float ms = 0;
  cudaEventElapsedTime(&ms, e0, e1);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * double(bytes) * iters / (ms * 1e-3) / 1e9;  // read + write
}

struct BenchRow {
  int64_t T;
  double ms, ms_host, weight_gb, gbps, tflops;
};

std::vector<BenchRow> bench_mixtral(double ceiling_gbps) {
  Case c{"mixtral_bf16", 4096, 14336, 8, 2, 3, 0, 1, 1234, true};
  say("\nMixtral-8x7B layer (H=4096 F=14336 E=8 k=2 bf16): correctness at T=3, then timing\n");
  const double t0 = now_s();
  const HostLayer L = make_layer(c);
  say("  host weights generated in %.1f s\n", now_s() - t0);
  fmoe_cuda_layer* layer = create(L);
  {
    const std::vector<float> x = make_input(c, 77);
    const std::vector<float> y = forward(layer, x.data(), c.T, c.H);
    const double err = rel_l2(y, ref_forward(L, x));
    check(std::isfinite(err) && err < 1e-2, "mixtral_bf16/rel_l2", fmt("%.3e", err));
  }
  std::vector<BenchRow> rows;
  for (int64_t T : {int64_t(1), int64_t(16), int64_t(512), int64_t(1024)}) {
    Case cT = c;
    cT.T = T;
    const std::vector<float> x = make_input(cT, 1000 + uint64_t(T));
    std::vector<int32_t> ids(size_t(T * c.k));
    std::vector<float> w(size_t(T * c.k));
    char err[512] = {0};
    int rc = api.route(layer, x.data(), T, ids.data(), w.data(), err, sizeof err);
    if (rc != FMOE_CUDA_OK) die_rc(rc, "route", err);
    const std::set<int32_t> used(ids.begin(), ids.end());
    const double weight_bytes = double(used.size()) * 3.0 * double(c.H) * double(c.F) * 2.0;

    float *dx = nullptr, *dy = nullptr;
    cuda_check(cudaMalloc(&dx, x.size() * 4), "cudaMalloc");
    cuda_check(cudaMalloc(&dy, x.size() * 4), "cudaMalloc");
    cuda_check(cudaMemcpy(dx, x.data(), x.size() * 4, cudaMemcpyHostToDevice), "cudaMemcpy");
    const int iters = T <= 16 ? 50 : 10;
    for (int i = 0; i < 3; i++) {
      rc = api.forward_device(layer, dx, T, dy, err, sizeof err);
      if (rc != FMOE_CUDA_OK) die_rc(rc, "forward_device", err);
    }
    double s = now_s();
    for (int i = 0; i < iters; i++) api.forward_device(layer, dx, T, dy, err, sizeof err);
    const double ms = (now_s() - s) / iters * 1e3;
    std::vector<float> y(x.size());
    s = now_s();
    for (int i = 0; i < 3; i++) api.forward(layer, x.data(), T, y.data(), nullptr, err, sizeof err);
    const double ms_host = (now_s() - s) / 3 * 1e3;
    cudaFree(dx);
    cudaFree(dy);

    BenchRow r;
    r.T = T;
    r.ms = ms;
    r.ms_host = ms_host;
    r.weight_gb = weight_bytes / 1e9;
    r.gbps = weight_bytes / (ms * 1e-3) / 1e9;
    r.tflops = 2.0 * double(T) * double(c.k) * 3.0 * double(c.H) * double(c.F) / (ms * 1e-3) / 1e12;
    rows.push_back(r);
    say("  T=%5lld  %8.3f ms (host arrays %8.3f ms)  experts %zu  weights %6.0f GB/s = %4.1f%% of copy ceiling"
        "  %6.1f TFLOP/s = %4.1f%% of %.0f\n",
        (long long)T, ms, ms_host, used.size(), r.gbps, 100.0 * r.gbps / ceiling_gbps, r.tflops,
        100.0 * r.tflops / kPeakBf16Tflops, kPeakBf16Tflops);
  }
  api.destroy(layer);
  return rows;
}

template <typename Fn>
void load(void* h, const char* name, Fn& fn) {
  fn = reinterpret_cast<Fn>(dlsym(h, name));
  if (!fn) {
    fprintf(stderr, "missing symbol %s\n", name);
    exit(2);
  }
}

void write_file(const std::string& path, const std::string& text) {
  FILE* f = fopen(path.c_str(), "w");
  if (!f) return;
  fputs(text.c_str(), f);
  fclose(f);
}

}  // namespace

int main(int argc, char** argv) {
  std::string lib, out_dir;
  bool bench = true;
  for (int i = 1; i < argc; i++) {
    const std::string a = argv[i];
    if (a == "--lib" && i + 1 < argc) lib = argv[++i];
    else if (a == "--out" && i + 1 < argc) out_dir = argv[++i];
    else if (a == "--no-bench") bench = false;
    else {
      fprintf(stderr, "usage: %s --lib libfused_moe_cuda.so [--out DIR] [--no-bench]\n", argv[0]);
      return 2;
    }
  }
  if (lib.empty()) {
    fprintf(stderr, "--lib is required\n");
    return 2;
  }
  void* h = dlopen(lib.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    fprintf(stderr, "dlopen %s: %s\n", lib.c_str(), dlerror());
    return 2;
  }
  load(h, "fmoe_cuda_abi_version", api.abi_version);
  load(h, "fmoe_cuda_versions", api.versions);
  load(h, "fmoe_cuda_device_count", api.device_count);
  load(h, "fmoe_cuda_device_info", api.device_info);
  load(h, "fmoe_cuda_layer_create", api.create);
  load(h, "fmoe_cuda_layer_forward", api.forward);
  load(h, "fmoe_cuda_layer_forward_device", api.forward_device);
  load(h, "fmoe_cuda_layer_route", api.route);
  load(h, "fmoe_cuda_layer_bytes", api.bytes);
  load(h, "fmoe_cuda_layer_destroy", api.destroy);
  if (api.abi_version() != FMOE_CUDA_ABI_VERSION) {
    fprintf(stderr, "ABI %d, expected %d\n", api.abi_version(), FMOE_CUDA_ABI_VERSION);
    return 2;
  }
  char err[512] = {0};
  int driver = 0, runtime = 0, count = 0;
  int rc = api.versions(&driver, &runtime, err, sizeof err);
  if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_versions", err);
  rc = api.device_count(&count, err, sizeof err);
  if (rc != FMOE_CUDA_OK || count < 1) die_rc(rc, "fmoe_cuda_device_count", err);
  fmoe_cuda_device_props props{};
  rc = api.device_info(0, &props, err, sizeof err);
  if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_device_info", err);
  say("device 0: %s, sm_%d%d, %d SMs, %.1f GiB; driver %d, runtime %d\n\n", props.name, props.major, props.minor,
      props.multiprocessors, double(props.total_memory) / (1u << 30), driver, runtime);

  const double t_start = now_s();
  std::vector<Case> cases;
  for (int dt = 0; dt < 3; dt++) {
    const std::string d = dtype_name(dt);
    const uint64_t s = uint64_t(dt) * 100;
    cases.push_back({"odd_" + d, 72, 200, 6, 2, 37, 0, dt, s + 1});
    cases.push_back({"odd_k1_" + d, 72, 200, 6, 1, 37, 0, dt, s + 2});
    cases.push_back({"odd_k4_topk_" + d, 72, 200, 6, 4, 37, 1, dt, s + 3});
    cases.push_back({"tiny_" + d, 33, 17, 3, 3, 5, 0, dt, s + 4});
    cases.push_back({"small_T1_" + d, 256, 512, 8, 2, 1, 0, dt, s + 5});
    cases.push_back({"small_T16_" + d, 256, 512, 8, 2, 16, 0, dt, s + 6});
    cases.push_back({"small_T300_" + d, 256, 512, 8, 2, 300, 0, dt, s + 7});
    cases.push_back({"small_T700_" + d, 256, 512, 8, 2, 700, 1, dt, s + 8});  // 128-row tiles (16-bit)
    cases.push_back({"many_experts_" + d, 40, 24, 256, 8, 9, 0, dt, s + 9});
    cases.push_back({"e1024_" + d, 64, 64, 1024, 6, 40, 0, dt, s + 10});
  }
  cases.push_back({"chunked_bf16", 64, 96, 8, 2, 5000, 0, 1, 500});  // more than one chunk
  for (const Case& c : cases) run_case(c);
  run_nonfinite(0);
  run_nonfinite(1);
  say("correctness: %d failure(s), %.1f s\n", g_failures, now_s() - t_start);

  std::string bench_json = "[]";
  double ceiling = 0;
  if (bench) {
    ceiling = copy_ceiling_gbps();
    say("\ndevice-to-device copy ceiling: %.0f GB/s\n", ceiling);
    const std::vector<BenchRow> rows = bench_mixtral(ceiling);
    bench_json = "[";
    for (size_t i = 0; i < rows.size(); i++) {
      const BenchRow& r = rows[i];
      char b[512];
      snprintf(b, sizeof b,
               "%s\n    {\"T\": %lld, \"ms\": %.4f, \"ms_host_arrays\": %.4f, \"weight_GB\": %.3f, \"weight_GBps\": %.1f, "
               "\"frac_bandwidth\": %.4f, \"TFLOPs\": %.2f, \"frac_peak\": %.4f}",
               i ? "," : "", (long long)r.T, r.ms, r.ms_host, r.weight_gb, r.gbps, r.gbps / ceiling, r.tflops,
               r.tflops / kPeakBf16Tflops);
      bench_json += b;
    }
    bench_json += "\n  ]";
  }

  if (!out_dir.empty()) {
    char head[1024];
    snprintf(head, sizeof head,
             "{\n  \"device\": \"%s\",\n  \"sm\": \"%d.%d\",\n  \"driver\": %d,\n  \"runtime\": %d,\n  \"failures\": %d,\n"
             "  \"copy_ceiling_GBps\": %.1f,\n  \"peak_bf16_TFLOPs\": %.0f,\n",
             props.name, props.major, props.minor, driver, runtime, g_failures, ceiling, kPeakBf16Tflops);
    write_file(out_dir + "/cuda_selftest.json",
               std::string(head) + "  \"checks\": [\n    " + g_checks_json + "\n  ],\n  \"mixtral_bf16\": " + bench_json +
                   "\n}\n");
    write_file(out_dir + "/cuda_selftest.txt", g_report);
  }
  say("\n%s\n", g_failures == 0 ? "ALL CHECKS PASSED" : "SOME CHECKS FAILED");
  return g_failures == 0 ? 0 : 1;
}
