#include "harness.h"

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "report.h"

namespace fmoe_selftest {

Api api;

int g_failures = 0;
int g_checks = 0;
std::string g_checks_json;
std::string g_report;
uint64_t g_seed = 0;

namespace {

template <typename Fn>
bool load(void* h, const char* name, Fn& fn) {
  fn = reinterpret_cast<Fn>(dlsym(h, name));
  if (!fn) fprintf(stderr, "missing symbol %s\n", name);
  return fn != nullptr;
}

}  // namespace

bool open_library(const std::string& path) {
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    fprintf(stderr, "dlopen %s: %s\n", path.c_str(), dlerror());
    return false;
  }
  return load(h, "fmoe_cuda_abi_version", api.abi_version) && load(h, "fmoe_cuda_versions", api.versions) &&
         load(h, "fmoe_cuda_device_count", api.device_count) && load(h, "fmoe_cuda_device_info", api.device_info) &&
         load(h, "fmoe_cuda_layer_create", api.create) && load(h, "fmoe_cuda_layer_forward", api.forward) &&
         load(h, "fmoe_cuda_layer_forward_device", api.forward_device) &&
         load(h, "fmoe_cuda_layer_enqueue_device", api.enqueue_device) &&
         load(h, "fmoe_cuda_layer_synchronize", api.synchronize) && load(h, "fmoe_cuda_layer_route", api.route) &&
         load(h, "fmoe_cuda_layer_bytes", api.bytes) && load(h, "fmoe_cuda_layer_destroy", api.destroy);
}

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
  g_checks++;
  if (!ok) g_failures++;
  if (!g_checks_json.empty()) g_checks_json += ",\n    ";
  g_checks_json += "{\"name\": \"" + json_escape(name) + "\", \"ok\": " + (ok ? "true" : "false") + ", \"detail\": \"" +
                   json_escape(detail) + "\"}";
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

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

std::string fmt(const char* f, double v) {
  char b[64];
  snprintf(b, sizeof b, f, v);
  return b;
}

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

bool same_bits(const void* a, const void* b, size_t n) { return memcmp(a, b, n) == 0; }

void stage_sync(cudaError_t launch, const std::string& name) {
  cudaError_t e = launch;
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  if (e != cudaSuccess) {
    check(false, name + "/launch", cudaGetErrorString(e));
    fprintf(stderr, "%s: %s\n", name.c_str(), cudaGetErrorString(e));
    exit(1);
  }
}

}  // namespace fmoe_selftest
