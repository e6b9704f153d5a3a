// cuda_selftest: checks the CUDA backend on a real GPU against a float64 CPU reference, then times it.
//
//   fmoe_cuda_selftest --lib path/to/libfused_moe_cuda.so [--out DIR] [--seed N] [--no-bench]
//   fmoe_cuda_selftest --lib ... --bench-only [--io DIR] [--out DIR]
//
// Correctness (exit status 1 on any failure; 2 on a setup error; 77 when there is no CUDA device):
//  - every pipeline stage on its own, through the launchers of moe_cuda.cuh linked into this program:
//    gating (E = 8, 16, 60, 64, 256; k = 1, 2, 4, 8; both routings; exact ties; NaN and infinite input; a
//    NaN router row), dispatch (uniform, skewed and sparse expert choices; block_m 16, 64, 128), the
//    input conversion to bf16/fp16 (bit-exact, subnormals, overflow, NaN), the expert FFN (every tile
//    configuration of each weight dtype, and all configurations give the same bits) and combine
//    (bit-exact against a host fmaf emulation);
//  - the whole layer through the library's C ABI (dlopen, as the addon does): relative L2 error against
//    float64 on odd sizes, E = 8, 16, 60, 64 (and more), k = 1, 2, 4, 8, both routings, float32/bf16/fp16
//    weights, duplicated router rows (ties), a NaN router row, non-finite tokens; route() against the
//    reference top-k; the device-pointer entry point; batch invariance;
//  - every output buffer is filled with NaN bytes (0xFF) before each run, every run is done twice and the
//    two results must have identical bits.
// Inputs are fresh random numbers on each run; the seed is printed (and written to the JSON) so that a
// failure can be replayed with --seed.
//
// Speed (skipped with --no-bench): the Mixtral-8x7B layer (H=4096, F=14336, E=8, k=2, bfloat16) at
// T = 1, 16, 128, 512, 4096, timed with CUDA events (warm-up, then the median of single calls), weight
// GB/s against a device-to-device copy measured in the same run. With --io DIR the layer uses weights
// written by bench/gpu/torch_baseline.py (meta.txt, gate.f32, w1.bin, w3.bin, w2.bin, x.f32), and its
// output for x.f32 goes to DIR/out.f32 for the comparison on the Python side.
//
// Results: stdout, and with --out (or the environment variable FMOE_SELFTEST_OUT) cuda_selftest.json /
// cuda_selftest.txt (correctness) and cuda_bench.json / cuda_bench.txt (speed).
//
// The library is opened with dlopen; this program's own CUDA runtime runs the stage tests, allocates
// device buffers and measures the copy ceiling (both runtimes share the device's primary context).
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "../fused_moe_cuda.h"
#include "../moe_cuda.cuh"

namespace {

constexpr int kExitSkip = 77;  // no CUDA device: ctest reports the test as skipped

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
Api api;

int g_failures = 0;
int g_checks = 0;
std::string g_checks_json;  // comma-separated JSON objects
std::string g_report;       // the human-readable log, also written to the output folder
uint64_t g_seed = 0;        // base seed of this run

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

std::string json_escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') o += '\\';
    if ((unsigned char)ch < 0x20) continue;
    o += ch;
  }
  return o;
}

void check(bool ok, const std::string& name, const std::string& detail) {
  say("  [%s] %s %s\n", ok ? "ok  " : "FAIL", name.c_str(), detail.c_str());
  g_checks++;
  if (!ok) g_failures++;
  if (!g_checks_json.empty()) g_checks_json += ",\n    ";
  g_checks_json += "{\"name\": \"" + json_escape(name) + "\", \"ok\": " + (ok ? "true" : "false") +
                   ", \"detail\": \"" + json_escape(detail) + "\"}";
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

std::string fmt(const char* f, double v) {
  char b[64];
  snprintf(b, sizeof b, f, v);
  return b;
}

// Runs fn(i) for i in [0, n) on all cores.
void parallel_for(int64_t n, const std::function<void(int64_t)>& fn) {
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(n, std::thread::hardware_concurrency()));
  if (nt == 1) {
    for (int64_t i = 0; i < n; i++) fn(i);
    return;
  }
  std::vector<std::thread> pool;
  for (int64_t w = 0; w < nt; w++)
    pool.emplace_back([&, w] {
      for (int64_t i = w; i < n; i += nt) fn(i);
    });
  for (auto& t : pool) t.join();
}

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
  // 0xFF makes every float a NaN and every int32 -1; 0x7F makes every int32 a large positive number.
  void poison(int byte) { cuda_check(cudaMemset(p, byte, bytes), "cudaMemset (poison)"); }
  void put(const void* src, size_t n) { cuda_check(cudaMemcpy(p, src, n, cudaMemcpyHostToDevice), "cudaMemcpy H2D"); }
  template <typename T>
  std::vector<T> get(size_t n) const {
    std::vector<T> v(n);
    cuda_check(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return v;
  }
};

// Waits for the stage launched on the default stream; a launch or kernel error is fatal (the context may
// be unusable after it), after the failure is recorded.
void stage_sync(cudaError_t launch, const std::string& name) {
  cudaError_t e = launch;
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  if (e != cudaSuccess) {
    check(false, name + "/launch", cudaGetErrorString(e));
    fprintf(stderr, "%s: %s\n", name.c_str(), cudaGetErrorString(e));
    exit(1);
  }
}

bool same_bits(const void* a, const void* b, size_t n) { return memcmp(a, b, n) == 0; }

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
  bool ties = false;            // router rows 1 = 0 and 5 = 4 (exact ties), and token 0 is all zeros
  bool nan_gate = false;        // one router weight of the last expert is NaN (that expert is never picked)
};

// A seed for one case of this run: the case's own number mixed with the run's base seed.
uint64_t fresh_seed(uint64_t s) {
  Rng r(g_seed ^ (s * 0xd1b54a32d192ed03ull));
  return r.next();
}

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
  if (c.ties) {
    for (int64_t e = 1; e + 1 < c.E; e += 4)
      std::copy(&L.gate[size_t((e - 1) * c.H)], &L.gate[size_t(e * c.H)], &L.gate[size_t(e * c.H)]);
  }
  if (c.nan_gate) L.gate[size_t((c.E - 1) * c.H + c.H / 2)] = NAN;
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
  if (c.ties)
    for (int64_t i = 0; i < c.H; i++) x[size_t(i)] = 0.0f;  // all logits 0: every expert ties
  return x;
}

// ---- float64 reference -----------------------------------------------------------------------------

struct RefRoute {
  std::vector<int> ids;
  std::vector<double> w;
  std::vector<double> p;  // probabilities of all experts
  // Smallest gap between neighbours of the descending order, over the first k+1 places, where the two
  // values differ (exact ties are decided by index on both sides, so they are always compared): below
  // about 1e-5 float32 and float64 may legitimately order the two experts differently.
  double margin;
};

RefRoute ref_route_raw(const float* gate, int64_t H, int64_t E, int64_t k, int routing, const float* xt) {
  std::vector<double> logit(static_cast<size_t>(E)), p(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; e++) {
    double s = 0;
    for (int64_t i = 0; i < H; i++) s += double(gate[size_t(e * H + i)]) * double(xt[i]);
    logit[size_t(e)] = s;
  }
  double mx = -INFINITY;
  for (double l : logit)
    if (!std::isnan(l) && l > mx) mx = l;
  double sum = 0;
  for (int64_t e = 0; e < E; e++) {
    const double l = logit[size_t(e)];
    double v = std::isnan(l) ? NAN : (std::isinf(mx) && mx > 0) ? (l == mx ? 1.0 : 0.0) : std::exp(l - mx);
    p[size_t(e)] = v;
    if (!std::isnan(v)) sum += v;
  }
  for (auto& v : p) v /= sum;
  std::vector<int> order(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; e++) order[size_t(e)] = int(e);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    const bool na = std::isnan(p[size_t(a)]), nb = std::isnan(p[size_t(b)]);
    if (na != nb) return nb;
    if (!na && p[size_t(a)] != p[size_t(b)]) return p[size_t(a)] > p[size_t(b)];
    return a < b;
  });
  RefRoute R;
  double picked = 0;
  for (int64_t j = 0; j < k; j++) {
    R.ids.push_back(order[size_t(j)]);
    picked += p[size_t(order[size_t(j)])];
  }
  for (int64_t j = 0; j < k; j++) {
    const double v = p[size_t(R.ids[size_t(j)])];
    R.w.push_back(routing == 0 ? v / picked : v);
  }
  R.margin = 1.0;
  for (int64_t j = 0; j < k && j + 1 < E; j++) {
    const double a = p[size_t(order[size_t(j)])], b = p[size_t(order[size_t(j + 1)])];
    if (std::isnan(a) || std::isnan(b) || a == b) continue;
    R.margin = std::min(R.margin, a - b);
  }
  R.p = p;
  return R;
}

RefRoute ref_route(const HostLayer& L, const float* xt) {
  return ref_route_raw(L.gate.data(), L.c.H, L.c.E, L.c.k, L.c.routing, xt);
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

double rel_l2(const float* y, const double* ref, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; i++) {
    num += (double(y[i]) - ref[i]) * (double(y[i]) - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}
double rel_l2(const std::vector<float>& y, const std::vector<double>& ref) { return rel_l2(y.data(), ref.data(), ref.size()); }

const char* dtype_name(int d) { return d == 0 ? "f32" : d == 1 ? "bf16" : "f16"; }

// ---- stage tests (launchers of moe_cuda.cuh, this program's runtime, default stream) -----------------

// Router: experts and weights of T tokens against ref_route_raw; exact ties, NaN and infinite inputs.
void test_gating(int64_t H, int64_t E, int64_t k, int routing, int64_t T, uint64_t seed) {
  const std::string name = "stage/gating_E" + std::to_string(E) + "_k" + std::to_string(k) + "_r" +
                           std::to_string(routing) + "_T" + std::to_string(T);
  Case c{name, H, 8, E, k, T, routing, 0, fresh_seed(seed)};
  c.ties = true;
  c.nan_gate = E > k + 1;  // the NaN expert must not be needed to fill k picks
  Rng r(c.seed);
  std::vector<float> gate(size_t(E * H));
  for (auto& v : gate) v = r.uniform(2.0f / std::sqrt(float(H)));
  for (int64_t e = 1; e + 1 < E; e += 4)
    std::copy(&gate[size_t((e - 1) * H)], &gate[size_t(e * H)], &gate[size_t(e * H)]);
  if (c.nan_gate) gate[size_t((E - 1) * H + H / 2)] = NAN;
  std::vector<float> x(size_t(T * H));
  for (auto& v : x) v = r.uniform(1.0f);
  // Token 0: zeros (every logit 0, all experts tie); 1: one NaN; 2: one +inf; 3: all -inf.
  if (T > 0) std::fill(x.begin(), x.begin() + H, 0.0f);
  if (T > 1) x[size_t(1 * H + 3)] = NAN;
  if (T > 2) x[size_t(2 * H + 1)] = INFINITY;
  if (T > 3) std::fill(x.begin() + 3 * H, x.begin() + 4 * H, -INFINITY);

  const int64_t Hp = fmoe_round_up(H, FMOE_PAD);
  std::vector<float> xp(size_t(T * Hp), 0.0f), gp(size_t(E * Hp), 0.0f);
  for (int64_t t = 0; t < T; t++) std::copy(&x[size_t(t * H)], &x[size_t(t * H + H)], &xp[size_t(t * Hp)]);
  for (int64_t e = 0; e < E; e++) std::copy(&gate[size_t(e * H)], &gate[size_t(e * H + H)], &gp[size_t(e * Hp)]);
  Dev dx(xp.size() * 4), dg(gp.size() * 4), dids(size_t(T * k) * 4), dw(size_t(T * k) * 4);
  dx.put(xp.data(), xp.size() * 4);
  dg.put(gp.data(), gp.size() * 4);

  std::vector<int32_t> ids[2];
  std::vector<float> w[2];
  for (int run = 0; run < 2; run++) {
    dids.poison(0x7F);
    dw.poison(0xFF);
    stage_sync(gating_cuda(dx.as<float>(), Hp, dg.as<float>(), Hp, Hp, T, int(E), int(k), routing, dids.as<int32_t>(),
                           dw.as<float>(), 0),
               name);
    ids[run] = dids.get<int32_t>(size_t(T * k));
    w[run] = dw.get<float>(size_t(T * k));
  }
  int64_t compared = 0, skipped = 0, bad_ids = 0, bad_w = 0, out_of_range = 0;
  double max_dw = 0;
  for (int64_t t = 0; t < T; t++) {
    std::set<int32_t> distinct;
    for (int64_t j = 0; j < k; j++) {
      const int32_t id = ids[0][size_t(t * k + j)];
      if (id < 0 || id >= E) out_of_range++;
      distinct.insert(id);
    }
    if (int64_t(distinct.size()) != k) out_of_range++;
    const RefRoute R = ref_route_raw(gate.data(), H, E, k, routing, &x[size_t(t * H)]);
    if (R.margin < 1e-5) {
      skipped++;
      continue;
    }
    compared++;
    for (int64_t j = 0; j < k; j++) {
      if (ids[0][size_t(t * k + j)] != R.ids[size_t(j)]) bad_ids++;
      const double g = w[0][size_t(t * k + j)], ref = R.w[size_t(j)];
      if (std::isnan(g) && std::isnan(ref)) continue;
      const double d = std::fabs(g - ref);
      if (!(d <= 1e-5)) bad_w++;
      if (std::isfinite(d)) max_dw = std::max(max_dw, d);
    }
  }
  check(out_of_range == 0 && bad_ids == 0 && bad_w == 0 && compared > 0, name,
        std::to_string(compared) + " tokens compared (" + std::to_string(skipped) + " near ties skipped), " +
            std::to_string(bad_ids) + " id mismatches, " + std::to_string(bad_w) + " weights off, " +
            std::to_string(out_of_range) + " bad id sets, max |dw| " + fmt("%.2e", max_dw));
  check(same_bits(ids[0].data(), ids[1].data(), ids[0].size() * 4) &&
            same_bits(w[0].data(), w[1].data(), w[0].size() * 4),
        name + "/repeatable", "second run, same bits");
}

// Host model of dispatch_cuda: stable counting sort by expert, each run padded to block_m.
struct HostDispatch {
  std::vector<int32_t> sorted_rows, inv, tile_expert;
  int32_t num_tiles = 0;
};

HostDispatch ref_dispatch(const std::vector<int32_t>& experts, int64_t E, int64_t bm) {
  HostDispatch D;
  std::vector<int64_t> count(size_t(E), 0), base(size_t(E), 0), next(size_t(E), 0);
  for (int32_t e : experts) count[size_t(e)]++;
  int64_t total = 0;
  for (int64_t e = 0; e < E; e++) {
    base[size_t(e)] = total;
    total += (count[size_t(e)] + bm - 1) / bm * bm;
  }
  D.num_tiles = int32_t(total / bm);
  D.sorted_rows.assign(size_t(total), -1);
  D.inv.assign(experts.size(), -1);
  D.tile_expert.assign(size_t(D.num_tiles), -1);
  for (int64_t e = 0; e < E; e++)
    for (int64_t t = base[size_t(e)] / bm; t < (base[size_t(e)] + (count[size_t(e)] + bm - 1) / bm * bm) / bm; t++)
      D.tile_expert[size_t(t)] = int32_t(e);
  for (size_t r = 0; r < experts.size(); r++) {
    const int32_t e = experts[r];
    const int64_t pos = base[size_t(e)] + next[size_t(e)]++;
    D.sorted_rows[size_t(pos)] = int32_t(r);
    D.inv[r] = int32_t(pos);
  }
  return D;
}

// k distinct experts per token; mode 0 uniform, 1 skewed (most tokens pick expert 0 first), 2 only even
// experts (the odd ones stay empty).
std::vector<int32_t> random_picks(Rng& r, int64_t T, int64_t E, int64_t k, int mode) {
  std::vector<int32_t> ids(size_t(T * k));
  for (int64_t t = 0; t < T; t++) {
    std::vector<int32_t> pool;
    for (int32_t e = 0; e < E; e++)
      if (mode != 2 || e % 2 == 0 || E < 2 * k) pool.push_back(e);
    for (int64_t j = 0; j < k; j++) {
      size_t i = size_t(r.next() % pool.size());
      if (mode == 1 && j == 0 && r.next() % 5 != 0) i = 0;  // pool[0] is expert 0
      ids[size_t(t * k + j)] = pool[i];
      pool.erase(pool.begin() + long(i));
    }
  }
  return ids;
}

void test_dispatch(int64_t T, int64_t E, int64_t k, int mode, int64_t bm, uint64_t seed) {
  const std::string name = "stage/dispatch_T" + std::to_string(T) + "_E" + std::to_string(E) + "_k" +
                           std::to_string(k) + "_bm" + std::to_string(bm) + "_mode" + std::to_string(mode);
  Rng r(fresh_seed(seed));
  const std::vector<int32_t> picks = random_picks(r, T, E, k, mode);
  const int64_t n_rows = T * k;
  const HostDispatch D = ref_dispatch(picks, E, bm);
  const int64_t rows_cap = fmoe_padded_rows_cap(n_rows, E, bm), tiles_cap = rows_cap / bm;
  Dev dexp(size_t(n_rows) * 4), dsorted(size_t(rows_cap) * 4), dinv(size_t(n_rows) * 4),
      dtile(size_t(tiles_cap) * 4), dnum(4);
  dexp.put(picks.data(), picks.size() * 4);
  std::vector<int32_t> got[2][4];
  for (int run = 0; run < 2; run++) {
    dsorted.poison(0x7F);
    dinv.poison(0x7F);
    dtile.poison(0x7F);
    dnum.poison(0x7F);
    stage_sync(dispatch_cuda(dexp.as<int32_t>(), n_rows, int(E), int(bm), dsorted.as<int32_t>(), dinv.as<int32_t>(),
                             dtile.as<int32_t>(), dnum.as<int32_t>(), 0),
               name);
    got[run][3] = dnum.get<int32_t>(1);
    const int32_t nt = std::min<int32_t>(std::max<int32_t>(got[run][3][0], 0), int32_t(tiles_cap));
    got[run][0] = dsorted.get<int32_t>(size_t(nt * bm));
    got[run][1] = dinv.get<int32_t>(size_t(n_rows));
    got[run][2] = dtile.get<int32_t>(size_t(nt));
  }
  const bool ok = got[0][3][0] == D.num_tiles && got[0][0] == D.sorted_rows && got[0][1] == D.inv &&
                  got[0][2] == D.tile_expert;
  check(ok, name, std::string("num_tiles ") + std::to_string(got[0][3][0]) + " (expected " +
                      std::to_string(D.num_tiles) + "), sorted rows / inverse / tile experts " +
                      (ok ? "identical" : "DIFFER") + " to the stable host sort");
  bool same = true;
  for (int i = 0; i < 4; i++) same = same && got[0][i] == got[1][i];
  check(same, name + "/repeatable", "second run, same bits");
}

// Input conversion to bf16 / fp16: bit-exact against the host rounding (round to nearest even).
void test_convert(int dtype, uint64_t seed) {
  const std::string name = std::string("stage/convert_") + dtype_name(dtype);
  Rng r(fresh_seed(seed));
  const int64_t n = 100003;
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; i++) {
    // magnitudes from 1e-9 (fp16 subnormals and underflow) to 1e6 (fp16 overflow), both signs
    const double mag = std::pow(10.0, -9.0 + 15.0 * double(r.next() >> 11) / double(1ull << 53));
    x[size_t(i)] = float((r.next() & 1) ? mag : -mag);
  }
  x[0] = NAN;
  x[1] = INFINITY;
  x[2] = -INFINITY;
  x[3] = 0.0f;
  x[4] = -0.0f;
  x[5] = 65519.0f;  // fp16: rounds down to 65504
  x[6] = 65520.0f;  // fp16: rounds up to infinity
  Dev dx(size_t(n) * 4), dout(size_t(n) * 2);
  dx.put(x.data(), x.size() * 4);
  std::vector<uint16_t> got[2];
  for (int run = 0; run < 2; run++) {
    dout.poison(0xFF);
    stage_sync(convert_to_16_cuda(dx.as<float>(), n, dtype, dout.as<uint16_t>(), 0), name);
    got[run] = dout.get<uint16_t>(size_t(n));
  }
  int64_t bad = 0;
  for (int64_t i = 0; i < n; i++) {
    const uint16_t g = got[0][size_t(i)];
    if (std::isnan(x[size_t(i)])) {
      const bool is_nan = dtype == 1 ? ((g & 0x7f80) == 0x7f80 && (g & 0x7f)) : ((g & 0x7c00) == 0x7c00 && (g & 0x3ff));
      if (!is_nan) bad++;
      continue;
    }
    const uint16_t want = dtype == 1 ? f32_to_bf16(x[size_t(i)]) : f32_to_f16(x[size_t(i)]);
    if (g != want) bad++;
  }
  check(bad == 0, name, std::to_string(bad) + " of " + std::to_string(n) + " values differ from the host rounding");
  check(got[0] == got[1], name + "/repeatable", "second run, same bits");
}

// Expert FFN on host-made routing: every tile configuration of the dtype against float64 (the reference
// rounds the SwiGLU activations to the weight dtype as the kernels do), and all configurations agree.
void test_ffn(int64_t H, int64_t F, int64_t E, int64_t k, int64_t T, int dtype, uint64_t seed) {
  const std::string name = std::string("stage/ffn_") + dtype_name(dtype) + "_H" + std::to_string(H) + "_F" +
                           std::to_string(F) + "_E" + std::to_string(E) + "_k" + std::to_string(k) + "_T" +
                           std::to_string(T);
  Case c{name, H, F, E, k, T, 0, dtype, fresh_seed(seed)};
  const HostLayer L = make_layer(c);
  Rng r(c.seed + 1);
  const std::vector<int32_t> picks = random_picks(r, T, E, k, int(seed % 3));
  std::vector<float> x(size_t(T * H));
  for (auto& v : x) v = r.uniform(1.0f);
  const int64_t Hp = fmoe_round_up(H, FMOE_PAD), Fp = fmoe_round_up(F, FMOE_PAD);
  const size_t es = dtype == 0 ? 4 : 2;

  // Device operands, zero-padded: x [T, Hp] (float32, or rounded to the dtype), w1/w3 [E, Fp, Hp], w2 [E, Hp, Fp].
  std::vector<float> xe(x.size());  // exact values the kernels see
  std::vector<uint8_t> xs(size_t(T * Hp) * es, 0);
  for (int64_t t = 0; t < T; t++)
    for (int64_t i = 0; i < H; i++) {
      const float v = x[size_t(t * H + i)];
      if (dtype == 0) {
        memcpy(&xs[size_t(t * Hp + i) * 4], &v, 4);
        xe[size_t(t * H + i)] = v;
      } else {
        const uint16_t h = dtype == 1 ? f32_to_bf16(v) : f32_to_f16(v);
        memcpy(&xs[size_t(t * Hp + i) * 2], &h, 2);
        xe[size_t(t * H + i)] = dtype == 1 ? bf16_to_f32(h) : f16_to_f32(h);
      }
    }
  auto pad = [&](const std::vector<std::vector<uint8_t>>& w, int64_t rows, int64_t cols, int64_t rows_p, int64_t cols_p) {
    std::vector<uint8_t> out(size_t(E * rows_p * cols_p) * es, 0);
    for (int64_t e = 0; e < E; e++)
      for (int64_t i = 0; i < rows; i++)
        memcpy(&out[size_t((e * rows_p + i) * cols_p) * es], &w[size_t(e)][size_t(i * cols) * es], size_t(cols) * es);
    return out;
  };
  const std::vector<uint8_t> w1 = pad(L.w1, F, H, Fp, Hp), w3 = pad(L.w3, F, H, Fp, Hp), w2 = pad(L.w2, H, F, Hp, Fp);
  Dev dx(xs.size()), dw1(w1.size()), dw3(w3.size()), dw2(w2.size());
  dx.put(xs.data(), xs.size());
  dw1.put(w1.data(), w1.size());
  dw3.put(w3.data(), w3.size());
  dw2.put(w2.data(), w2.size());

  // Reference per pick row r = t*k + j: y = W2_e (round(silu(W1_e x_t) * W3_e x_t)).
  const int64_t n_rows = T * k;
  std::vector<double> yref(size_t(n_rows * H));
  parallel_for(n_rows, [&](int64_t row) {
    const int64_t t = row / k;
    const size_t e = size_t(picks[size_t(row)]);
    const float* xt = &xe[size_t(t * H)];
    std::vector<double> h(static_cast<size_t>(F));
    for (int64_t f = 0; f < F; f++) {
      double a = 0, b = 0;
      for (int64_t i = 0; i < H; i++) {
        a += double(L.x1[e][size_t(f * H + i)]) * xt[i];
        b += double(L.x3[e][size_t(f * H + i)]) * xt[i];
      }
      double v = a / (1.0 + std::exp(-a)) * b;
      if (dtype == 1) v = bf16_to_f32(f32_to_bf16(float(v)));
      if (dtype == 2) v = f16_to_f32(f32_to_f16(float(v)));
      h[size_t(f)] = v;
    }
    for (int64_t o = 0; o < H; o++) {
      double s = 0;
      for (int64_t f = 0; f < F; f++) s += double(L.x2[e][size_t(o * F + f)]) * h[size_t(f)];
      yref[size_t(row * H + o)] = s;
    }
  });

  const double tol = dtype == 0 ? 1e-5 : 2e-3;
  std::vector<float> first;  // y rows in pick order from the first configuration
  bool agree = true;
  std::string agree_detail;
  const int n_configs = dtype == 0 ? 2 : 3;
  for (int config = 0; config < n_configs; config++) {
    const int64_t bm = ffn_block_m(config);
    const HostDispatch D = ref_dispatch(picks, E, bm);
    const int64_t rows_cap = fmoe_padded_rows_cap(n_rows, E, bm), tiles_cap = rows_cap / bm;
    Dev dsorted(size_t(rows_cap) * 4), dtile(size_t(tiles_cap) * 4), dnum(4), dh(size_t(rows_cap * Fp) * es),
        dy(size_t(rows_cap * Hp) * 4);
    dsorted.poison(0xFF);
    dtile.poison(0);
    dsorted.put(D.sorted_rows.data(), D.sorted_rows.size() * 4);
    dtile.put(D.tile_expert.data(), D.tile_expert.size() * 4);
    dnum.put(&D.num_tiles, 4);
    ffn_problem p;
    p.dtype = dtype;
    p.config = config;
    p.Hp = Hp;
    p.Fp = Fp;
    p.top_k = int(k);
    p.tiles_cap = tiles_cap;
    p.x = dx.p;
    p.w1 = dw1.p;
    p.w3 = dw3.p;
    p.w2 = dw2.p;
    p.sorted_rows = dsorted.as<int32_t>();
    p.tile_expert = dtile.as<int32_t>();
    p.num_tiles = dnum.as<int32_t>();
    p.h = dh.p;
    p.y = dy.as<float>();
    std::vector<float> y[2];
    for (int run = 0; run < 2; run++) {
      dh.poison(0xFF);
      dy.poison(0xFF);
      stage_sync(ffn_cuda(&p, 0), name + "_cfg" + std::to_string(config));
      const std::vector<float> ys = dy.get<float>(size_t(rows_cap * Hp));
      y[run].assign(size_t(n_rows * H), 0.0f);  // back to pick order, H columns
      for (int64_t row = 0; row < n_rows; row++)
        memcpy(&y[run][size_t(row * H)], &ys[size_t(int64_t(D.inv[size_t(row)]) * Hp)], size_t(H) * 4);
    }
    const double err = rel_l2(y[0], yref);
    check(std::isfinite(err) && err < tol, name + "_cfg" + std::to_string(config),
          "block_m " + std::to_string(bm) + ", rel_l2 " + fmt("%.3e", err) + " (tolerance " + fmt("%.0e", tol) + ")");
    check(same_bits(y[0].data(), y[1].data(), y[0].size() * 4),
          name + "_cfg" + std::to_string(config) + "/repeatable", "second run, same bits");
    if (config == 0) first = y[0];
    else if (!same_bits(first.data(), y[0].data(), first.size() * 4)) {
      agree = false;
      agree_detail += " config " + std::to_string(config) + " differs;";
    }
  }
  check(agree, name + "/configs_agree", agree ? "every tile configuration gives the same bits" : agree_detail);
}

// Combine: out[t] = sum_j w[t,j] * y[inv[t,j]] in pick order with fmaf: bit-exact against the host.
void test_combine(int64_t T, int64_t k, int64_t H, uint64_t seed) {
  const std::string name = "stage/combine_T" + std::to_string(T) + "_k" + std::to_string(k) + "_H" + std::to_string(H);
  Rng r(fresh_seed(seed));
  const int64_t ldy = fmoe_round_up(H, FMOE_PAD), rows = T * k + 7;
  std::vector<float> y(size_t(rows * ldy)), w(size_t(T * k));
  for (auto& v : y) v = r.uniform(3.0f);
  for (auto& v : w) v = r.uniform(1.0f);
  std::vector<int32_t> perm(static_cast<size_t>(rows));
  for (int64_t i = 0; i < rows; i++) perm[size_t(i)] = int32_t(i);
  for (int64_t i = rows - 1; i > 0; i--) std::swap(perm[size_t(i)], perm[size_t(r.next() % uint64_t(i + 1))]);
  std::vector<int32_t> inv(perm.begin(), perm.begin() + T * k);
  std::vector<float> want(size_t(T * H));
  std::vector<double> ref(size_t(T * H));
  for (int64_t t = 0; t < T; t++)
    for (int64_t h = 0; h < H; h++) {
      float acc = 0.0f;
      double acc64 = 0.0;
      for (int64_t j = 0; j < k; j++) {
        const float yv = y[size_t(int64_t(inv[size_t(t * k + j)]) * ldy + h)], wv = w[size_t(t * k + j)];
        acc = std::fmaf(wv, yv, acc);
        acc64 += double(wv) * double(yv);
      }
      want[size_t(t * H + h)] = acc;
      ref[size_t(t * H + h)] = acc64;
    }
  Dev dy(y.size() * 4), dinv(inv.size() * 4), dw(w.size() * 4), dout(size_t(T * H) * 4);
  dy.put(y.data(), y.size() * 4);
  dinv.put(inv.data(), inv.size() * 4);
  dw.put(w.data(), w.size() * 4);
  std::vector<float> got[2];
  for (int run = 0; run < 2; run++) {
    dout.poison(0xFF);
    stage_sync(combine_cuda(dy.as<float>(), ldy, dinv.as<int32_t>(), dw.as<float>(), T, int(k), H, dout.as<float>(), 0),
               name);
    got[run] = dout.get<float>(size_t(T * H));
  }
  const double err = rel_l2(got[0], ref);
  check(same_bits(got[0].data(), want.data(), want.size() * 4) && err < 1e-6, name,
        "bit-exact vs host fmaf: " + std::string(same_bits(got[0].data(), want.data(), want.size() * 4) ? "yes" : "NO") +
            ", rel_l2 vs float64 " + fmt("%.2e", err));
  check(same_bits(got[0].data(), got[1].data(), want.size() * 4), name + "/repeatable", "second run, same bits");
}

void run_stage_tests() {
  say("stages (gating, dispatch, conversion, expert FFN, combine) against host references\n");
  uint64_t s = 1000;
  for (int64_t E : {8, 16, 60, 64, 256})
    for (int64_t k : {1, 2, 4, 8}) {
      if (k > E) continue;
      for (int routing = 0; routing < 2; routing++) test_gating(E == 256 ? 200 : 333, E, k, routing, 67, s++);
    }
  test_gating(4096, 8, 2, 0, 300, s++);  // the Mixtral router shape
  for (int64_t bm : {16, 64, 128})
    for (int mode = 0; mode < 3; mode++) {
      test_dispatch(1, 8, 2, mode, bm, s++);
      test_dispatch(37, 60, 4, mode, bm, s++);
      test_dispatch(4096, 8, 2, mode, bm, s++);
      test_dispatch(2048, 64, 8, mode, bm, s++);
    }
  test_dispatch(8000, 1024, 6, 0, 16, s++);
  test_convert(1, s++);
  test_convert(2, s++);
  for (int dtype = 0; dtype < 3; dtype++) {
    test_ffn(136, 200, 8, 2, 37, dtype, s++);
    test_ffn(97, 131, 16, 4, 1, dtype, s++);
    test_ffn(256, 384, 60, 8, 29, dtype, s++);
    test_ffn(130, 257, 64, 1, 300, dtype, s++);
    test_ffn(64, 128, 8, 8, 200, dtype, s++);
  }
  for (int64_t k : {1, 2, 4, 8}) {
    test_combine(1, k, 4096, s++);
    test_combine(37, k, 135, s++);
  }
  test_combine(4096, 2, 1000, s++);
}

// ---- the whole layer through the library's C ABI -----------------------------------------------------

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

// Host forward into an output filled with NaN bytes first.
std::vector<float> forward(fmoe_cuda_layer* layer, const float* x, int64_t T, int64_t H) {
  std::vector<float> y(size_t(T * H));
  memset(y.data(), 0xFF, y.size() * 4);
  char err[512] = {0};
  const int rc = api.forward(layer, x, T, y.data(), err, sizeof err);
  if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_layer_forward", err);
  return y;
}

void run_case(Case c) {
  c.seed = fresh_seed(c.seed);
  say("case %s: H=%lld F=%lld E=%lld k=%lld T=%lld %s routing=%d%s%s\n", c.name.c_str(), (long long)c.H,
      (long long)c.F, (long long)c.E, (long long)c.k, (long long)c.T, dtype_name(c.dtype), c.routing,
      c.ties ? " ties" : "", c.nan_gate ? " nan-router-row" : "");
  const HostLayer L = make_layer(c);
  const std::vector<float> x = make_input(c, c.seed * 7 + 1);
  fmoe_cuda_layer* layer = create(L);
  const std::string tag = "layer/" + c.name + "/";

  const std::vector<float> y = forward(layer, x.data(), c.T, c.H);
  const std::vector<double> ref = ref_forward(L, x);
  const double err = rel_l2(y, ref);
  const double tol = c.dtype == 0 ? 1e-5 : 1e-2;
  check(std::isfinite(err) && err < tol, tag + "rel_l2", fmt("%.3e", err) + " (tolerance " + fmt("%.0e", tol) + ")");

  const std::vector<float> y2 = forward(layer, x.data(), c.T, c.H);
  check(same_bits(y.data(), y2.data(), y.size() * 4), tag + "repeatable", "second forward, same bits");

  bool invariant = true;
  for (int64_t t : {int64_t(0), c.T / 2, c.T - 1}) {
    const std::vector<float> one = forward(layer, &x[size_t(t * c.H)], 1, c.H);
    invariant = invariant && same_bits(one.data(), &y[size_t(t * c.H)], size_t(c.H) * 4);
  }
  check(invariant, tag + "batch_invariant", "tokens 0, T/2, T-1 alone vs in the batch");

  std::vector<int32_t> ids(size_t(c.T * c.k));
  std::vector<float> w(size_t(c.T * c.k));
  memset(ids.data(), 0x7F, ids.size() * 4);
  memset(w.data(), 0xFF, w.size() * 4);
  char errbuf[512] = {0};
  int rc = api.route(layer, x.data(), c.T, ids.data(), w.data(), errbuf, sizeof errbuf);
  if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_layer_route", errbuf);
  int64_t compared = 0, mismatched = 0, bad_sets = 0;
  double max_werr = 0;
  for (int64_t t = 0; t < c.T; t++) {
    std::set<int32_t> distinct;
    for (int64_t j = 0; j < c.k; j++) {
      const int32_t id = ids[size_t(t * c.k + j)];
      if (id < 0 || id >= c.E) bad_sets++;
      distinct.insert(id);
    }
    if (int64_t(distinct.size()) != c.k) bad_sets++;
    const RefRoute R = ref_route(L, &x[size_t(t * c.H)]);
    if (R.margin < 1e-5) continue;  // near tie: float32 and float64 may legitimately disagree
    compared++;
    for (int64_t j = 0; j < c.k; j++) {
      if (ids[size_t(t * c.k + j)] != R.ids[size_t(j)]) mismatched++;
      const double d = std::fabs(double(w[size_t(t * c.k + j)]) - R.w[size_t(j)]);
      max_werr = std::isnan(d) ? INFINITY : std::max(max_werr, d);
    }
  }
  check(mismatched == 0 && bad_sets == 0 && max_werr < 1e-5, tag + "route",
        std::to_string(compared) + " tokens compared, " + std::to_string(mismatched) + " id mismatches, " +
            std::to_string(bad_sets) + " bad id sets, max |dw| " + fmt("%.2e", max_werr));

  // The device-pointer entry point gives the same bits as the host one.
  {
    Dev dx(x.size() * 4), dy(y.size() * 4);
    dx.put(x.data(), x.size() * 4);
    dy.poison(0xFF);
    rc = api.forward_device(layer, dx.as<float>(), c.T, dy.as<float>(), errbuf, sizeof errbuf);
    if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_layer_forward_device", errbuf);
    const std::vector<float> y3 = dy.get<float>(y.size());
    check(same_bits(y.data(), y3.data(), y.size() * 4), tag + "device_entry", "forward_device, same bits");
    // Queued twice without waiting (the second overwrites the first in stream order), then waited for.
    dy.poison(0xFF);
    for (int i = 0; i < 2; i++) {
      rc = api.enqueue_device(layer, dx.as<float>(), c.T, dy.as<float>(), errbuf, sizeof errbuf);
      if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_layer_enqueue_device", errbuf);
    }
    rc = api.synchronize(layer, errbuf, sizeof errbuf);
    if (rc != FMOE_CUDA_OK) die_rc(rc, "fmoe_cuda_layer_synchronize", errbuf);
    const std::vector<float> y4 = dy.get<float>(y.size());
    check(same_bits(y.data(), y4.data(), y.size() * 4), tag + "enqueue_entry", "enqueue_device + synchronize, same bits");
  }
  api.destroy(layer);
}

// Non-finite input: no crash, ids in range, the other tokens unchanged.
void run_nonfinite(int dtype) {
  Case c{std::string("nonfinite_") + dtype_name(dtype), 64, 128, 8, 2, 8, 0, dtype, fresh_seed(99 + uint64_t(dtype))};
  say("case %s\n", c.name.c_str());
  const HostLayer L = make_layer(c);
  std::vector<float> x = make_input(c, c.seed + 5);
  fmoe_cuda_layer* layer = create(L);
  const std::vector<float> clean = forward(layer, x.data(), c.T, c.H);
  x[size_t(2 * c.H + 3)] = NAN;
  x[size_t(5 * c.H + 1)] = INFINITY;
  for (int64_t i = 0; i < c.H; i++) x[size_t(6 * c.H + i)] = -INFINITY;
  const std::vector<float> y = forward(layer, x.data(), c.T, c.H);
  const std::vector<float> y2 = forward(layer, x.data(), c.T, c.H);
  bool others = true;
  for (int64_t t = 0; t < c.T; t++)
    if (t != 2 && t != 5 && t != 6)
      others = others && same_bits(&y[size_t(t * c.H)], &clean[size_t(t * c.H)], size_t(c.H) * 4);
  check(others, "layer/" + c.name + "/others_unchanged", "finite tokens keep their bits");
  check(same_bits(y.data(), y2.data(), y.size() * 4), "layer/" + c.name + "/repeatable", "second forward, same bits");
  std::vector<int32_t> ids(size_t(c.T * c.k));
  std::vector<float> w(size_t(c.T * c.k));
  memset(ids.data(), 0x7F, ids.size() * 4);
  char err[512] = {0};
  const int rc = api.route(layer, x.data(), c.T, ids.data(), w.data(), err, sizeof err);
  bool in_range = rc == FMOE_CUDA_OK;
  for (int32_t id : ids) in_range = in_range && id >= 0 && id < c.E;
  for (int64_t t = 0; t < c.T; t++) in_range = in_range && ids[size_t(t * c.k)] != ids[size_t(t * c.k + 1)];
  check(in_range, "layer/" + c.name + "/ids_in_range", "route ids in [0, E) and distinct per token");
  api.destroy(layer);
}

// The Mixtral-8x7B shape at T = 3 against float64 (one set of expert weights shared by all experts, to
// keep the host reference small; the device holds E separate copies).
void run_mixtral_check() {
  Case c{"mixtral_bf16", 4096, 14336, 8, 2, 3, 0, 1, fresh_seed(1234), true};
  say("case %s: H=4096 F=14336 E=8 k=2 T=3 bf16\n", c.name.c_str());
  const double t0 = now_s();
  const HostLayer L = make_layer(c);
  fmoe_cuda_layer* layer = create(L);
  const std::vector<float> x = make_input(c, c.seed + 77);
  const std::vector<float> y = forward(layer, x.data(), c.T, c.H);
  const std::vector<float> y2 = forward(layer, x.data(), c.T, c.H);
  const double err = rel_l2(y, ref_forward(L, x));
  check(std::isfinite(err) && err < 1e-2, "layer/mixtral_bf16/rel_l2", fmt("%.3e", err) + " (tolerance 1e-02)");
  check(same_bits(y.data(), y2.data(), y.size() * 4), "layer/mixtral_bf16/repeatable", "second forward, same bits");
  api.destroy(layer);
  say("  (%.1f s)\n", now_s() - t0);
}

void run_layer_tests() {
  say("\nthe whole layer (C ABI) against float64\n");
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
    // The expert counts and top-k of the field (Mixtral 8/2, DeepSeek/Qwen 60-64/4-8), odd sizes, both
    // routings, exact ties and a NaN router row.
    uint64_t n = 20;
    for (int64_t E : {8, 16, 60, 64})
      for (int64_t k : {1, 2, 4, 8}) {
        if (k > E) continue;
        const int routing = int((E + k) % 2);
        Case c{"E" + std::to_string(E) + "_k" + std::to_string(k) + "_r" + std::to_string(routing) + "_" + d,
               137, 203, E, k, k >= 4 ? 41 : 131, routing, dt, s + n++};
        c.ties = (k % 2) == 0;
        c.nan_gate = E > k + 1 && k != 2;
        if (c.ties) c.name += "_ties";
        if (c.nan_gate) c.name += "_nan";
        cases.push_back(c);
      }
  }
  cases.push_back({"chunked_bf16", 64, 96, 8, 2, 5000, 0, 1, 500});  // more than one chunk
  for (const Case& c : cases) run_case(c);
  for (int dt = 0; dt < 3; dt++) run_nonfinite(dt);
  run_mixtral_check();
}

// ---- speed -----------------------------------------------------------------------------------------

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
  const double ms = time_median_ms(2, 15, [&] {
    cuda_check(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice, 0), "cudaMemcpyAsync");
  });
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

void write_file(const std::string& path, const std::string& text) {
  FILE* f = fopen(path.c_str(), "w");
  if (!f) return;
  fputs(text.c_str(), f);
  fclose(f);
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
    for (int64_t e = 0; e < E; e++) (*dst[m])[size_t(e)].assign(all.begin() + long(per * size_t(e)), all.begin() + long(per * size_t(e + 1)));
  }
  for (int64_t e = 0; e < E; e++) {
    L.p1.push_back(L.w1[size_t(e)].data());
    L.p3.push_back(L.w3[size_t(e)].data());
    L.p2.push_back(L.w2[size_t(e)].data());
  }
  return true;
}

struct BenchRow {
  int64_t T;
  int iters;
  size_t experts_used;
  double ms;        // per forward, back to back: n enqueue_device calls then one wait, over n; median of 5
  double ms_call;   // one forward_device call between CUDA events (its own launches and wait included)
  double ms_min, ms_host, weight_gb, gbps, tflops;
};

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

// Times the layer at the Mixtral batch sizes; rows to stdout, JSON into *json.
std::vector<BenchRow> bench_layer(fmoe_cuda_layer* layer, const Case& c, double ceiling_gbps) {
  std::vector<BenchRow> rows;
  const double es = c.dtype == 0 ? 4.0 : 2.0;
  say("\n%6s %11s %11s %11s %11s %8s %10s %8s %9s\n", "T", "queued us", "per call", "min call", "host-array",
      "experts", "weight GB/s", "of copy", "TFLOP/s");
  for (int64_t T : {int64_t(1), int64_t(16), int64_t(128), int64_t(512), int64_t(4096)}) {
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
    r.ms_call = time_median_ms(T >= 512 ? 2 : 5, r.iters, [&] {
      const int rc2 = api.forward_device(layer, dx.as<float>(), T, dy.as<float>(), err, sizeof err);
      if (rc2 != FMOE_CUDA_OK) die_rc(rc2, "forward_device", err);
    }, &r.ms_min);
    r.ms = time_queued_ms(r.iters, 5, [&] {
      const int rc2 = api.enqueue_device(layer, dx.as<float>(), T, dy.as<float>(), err, sizeof err);
      if (rc2 != FMOE_CUDA_OK) die_rc(rc2, "enqueue_device", err);
    }, layer);
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

template <typename Fn>
void load(void* h, const char* name, Fn& fn) {
  fn = reinterpret_cast<Fn>(dlsym(h, name));
  if (!fn) {
    fprintf(stderr, "missing symbol %s\n", name);
    exit(2);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string lib, out_dir, io_dir;
  bool bench = true, correctness = true, seed_given = false;
  for (int i = 1; i < argc; i++) {
    const std::string a = argv[i];
    if (a == "--lib" && i + 1 < argc) lib = argv[++i];
    else if (a == "--out" && i + 1 < argc) out_dir = argv[++i];
    else if (a == "--io" && i + 1 < argc) io_dir = argv[++i];
    else if (a == "--seed" && i + 1 < argc) {
      g_seed = strtoull(argv[++i], nullptr, 0);
      seed_given = true;
    } else if (a == "--no-bench") bench = false;
    else if (a == "--bench-only") correctness = false;
    else {
      fprintf(stderr,
              "usage: %s --lib libfused_moe_cuda.so [--out DIR] [--seed N] [--no-bench | --bench-only [--io DIR]]\n",
              argv[0]);
      return 2;
    }
  }
  if (out_dir.empty() && getenv("FMOE_SELFTEST_OUT")) out_dir = getenv("FMOE_SELFTEST_OUT");
  if (!seed_given) {
    std::random_device rd;
    g_seed = (uint64_t(rd()) << 32) ^ uint64_t(rd()) ^ uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
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
  load(h, "fmoe_cuda_layer_enqueue_device", api.enqueue_device);
  load(h, "fmoe_cuda_layer_synchronize", api.synchronize);
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
  char head[1024];
  snprintf(head, sizeof head, "  \"device\": \"%s\",\n  \"sm\": \"%d.%d\",\n  \"driver\": %d,\n  \"runtime\": %d,\n",
           json_escape(props.name).c_str(), props.major, props.minor, driver, runtime);

  if (correctness) {
    const double t_start = now_s();
    run_stage_tests();
    run_layer_tests();
    say("correctness: %d check(s), %d failure(s), %.1f s, seed %llu\n", g_checks, g_failures, now_s() - t_start,
        (unsigned long long)g_seed);
    if (!out_dir.empty()) {
      char b[256];
      snprintf(b, sizeof b, "  \"seed\": %llu,\n  \"checks_total\": %d,\n  \"failures\": %d,\n",
               (unsigned long long)g_seed, g_checks, g_failures);
      write_file(out_dir + "/cuda_selftest.json",
                 "{\n" + std::string(head) + b + "  \"checks\": [\n    " + g_checks_json + "\n  ]\n}\n");
      write_file(out_dir + "/cuda_selftest.txt", g_report);
    }
    say("\n%s\n", g_failures == 0 ? "ALL CHECKS PASSED" : "SOME CHECKS FAILED");
  }

  if (bench) {
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
    const std::vector<BenchRow> rows = bench_layer(layer, L.c, ceiling);
    api.destroy(layer);
    std::string j = "{\n" + std::string(head);
    char b[2048];
    snprintf(b, sizeof b,
             "  \"weights\": \"%s\",\n  \"shape\": {\"H\": %lld, \"F\": %lld, \"E\": %lld, \"k\": %lld, \"dtype\": \"%s\"},\n"
             "  \"timing\": \"us: per forward, forwards queued back to back (enqueue_device) and waited for once, median of 5 "
             "batches; us_per_call: CUDA events around one forward_device call, which waits inside; device input and "
             "output\",\n"
             "  \"copy_GBps\": %.1f,\n  \"rows\": [",
             source.c_str(), (long long)L.c.H, (long long)L.c.F, (long long)L.c.E, (long long)L.c.k,
             dtype_name(L.c.dtype), ceiling);
    j += b;
    for (size_t i = 0; i < rows.size(); i++) {
      const BenchRow& r = rows[i];
      snprintf(b, sizeof b,
               "%s\n    {\"T\": %lld, \"iters\": %d, \"us\": %.2f, \"us_per_call\": %.2f, \"us_min\": %.2f, \"us_host_arrays\": %.2f, "
               "\"experts_used\": %zu, \"weight_GB\": %.4f, \"weight_GBps\": %.1f, \"frac_copy\": %.4f, \"TFLOPs\": %.3f}",
               i ? "," : "", (long long)r.T, r.iters, r.ms * 1e3, r.ms_call * 1e3, r.ms_min * 1e3, r.ms_host * 1e3, r.experts_used,
               r.weight_gb, r.gbps, r.gbps / ceiling, r.tflops);
      j += b;
    }
    j += "\n  ]\n}\n";
    if (!out_dir.empty()) {
      write_file(out_dir + "/cuda_bench.json", j);
      write_file(out_dir + "/cuda_bench.txt", g_report.substr(report_start));
    }
  }
  return g_failures == 0 ? 0 : 1;
}
