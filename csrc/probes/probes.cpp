// Machine ceilings for the benchmark, measured in its own process: streaming read bandwidth over a
// buffer far larger than the last-level cache, and the FMA throughput of each kernel set's vector width.
// The inner FMA loops live in the ISA units (compiled with their flags); this file only times them.
#include "probes.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fmoe {

double probe_fma_loop_avx2(int64_t iters);
double probe_fma_loop_avx512(int64_t iters);
double probe_dot_loop_avx512bf16(int64_t iters);
double probe_int8_dot_loop_avx512bf16(int64_t iters);
double probe_int8_group32_loop_avx512bf16(int64_t iters);
double probe_int8_group128_loop_avx512bf16(int64_t iters);
double probe_fma_loop_neon(int64_t iters);
uint64_t probe_read_avx512(const void* p, size_t bytes, int pattern);

namespace {

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Runs fn(i) on `threads` fresh threads released together; returns seconds from the release to the
// last finish, so the figure is the whole machine's, not one thread's.
template <class Fn>
double run_together(int threads, Fn fn) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; i++)
    pool.emplace_back([&, i] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      fn(i);
    });
  while (ready.load() < threads) std::this_thread::yield();
  const double t0 = now_s();
  go.store(true, std::memory_order_release);
  for (auto& t : pool) t.join();
  return now_s() - t0;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Sums a slice as 64-bit words in S sequential streams (one chain each: the loads, not the adds, set
// the pace); AHEAD > 0: each load's line AHEAD bytes on is asked for first, non-temporally.
template <int S, size_t AHEAD>
uint64_t read_streams(const uint64_t* p, size_t n) {
  const size_t per = n / S;
  uint64_t s[S] = {};
  for (size_t i = 0; i < per; i++)
    for (int j = 0; j < S; j++) {
      if constexpr (AHEAD > 0)
        if (i % 8 == 0) __builtin_prefetch(p + j * per + i + AHEAD / 8, 0, 0);  // once a line
      s[j] += p[j * per + i];
    }
  for (size_t i = per * S; i < n; i++) s[0] += p[i];
  uint64_t r = 0;
  for (int j = 0; j < S; j++) r ^= s[j];
  return r;
}

// Which of the read patterns (probes.h) reads fastest depends on the machine and the moment. On a 2-core
// Zen 5 VM over 256 MiB, at a fast moment 4 streams a thread read 5-7% more than 8 (the probe's one
// pattern before), 2 streams 0-10% more, 4 fetched ahead up to 14% more, and the int8 decode's LM head
// had streamed at 107% of the 8-stream probe; at a slow moment 8 streams read best (bench/read-probe.js;
// bench/RESULTS.md, thirty-fifth run).
uint64_t read_pattern(const uint64_t* p, size_t n, int pattern) {
  return with_read_pattern(pattern, [&](auto streams, auto ahead) { return read_streams<streams(), ahead()>(p, n); });
}

// The probe's buffer, kept from one call to the next of the same size. Allocating, first-touching and
// freeing 256 MiB of huge pages before each paired forward (bench.js, model.js) slowed the next few
// forwards by up to a third on a 2-core VM, so the pairing pulled the fractions down instead of
// measuring the machine.
struct ProbeBuffer {
  std::mutex mutex;
  uint64_t* data = nullptr;
  size_t bytes = 0;
  int threads = 0;
};

ProbeBuffer& probe_buffer() {
  static ProbeBuffer* b = new ProbeBuffer;  // never freed: it lives as long as the process
  return *b;
}

// Operations a second of `loop` (operations done per call) on `threads` threads together.
double peak_of(double (*loop)(int64_t), int threads) {
  if (loop(1) == 0) return 0;  // not built for this architecture
  // Calibrate to about 0.15 s per thread, then take the median of three runs.
  int64_t iters = 1 << 16;
  for (;;) {
    const double t = run_together(1, [&](int) { loop(iters); });
    if (t > 0.02 || iters > (int64_t(1) << 34)) {
      iters = std::max<int64_t>(iters, int64_t(double(iters) * 0.15 / std::max(t, 1e-6)));
      break;
    }
    iters *= 4;
  }
  std::vector<double> rates;
  for (int r = 0; r < 3; r++) {
    std::atomic<double> flops{0};
    const double t = run_together(threads, [&](int) {
      const double f = loop(iters);
      double cur = flops.load();
      while (!flops.compare_exchange_weak(cur, cur + f)) {
      }
    });
    rates.push_back(flops.load() / t / 1e9);
  }
  return median(rates);
}

}  // namespace

double probe_read_bandwidth(size_t bytes, int threads, std::vector<double>* per_pattern) {
  if (threads < 1) threads = 1;
  constexpr size_t kHuge = size_t(2) << 20;
  bytes = std::max<size_t>(bytes / kHuge * kHuge, kHuge);
  ProbeBuffer& kept = probe_buffer();
  std::lock_guard<std::mutex> lock(kept.mutex);
  // Slices are whole 256-byte blocks so the wide loop needs no tail.
  const size_t words = bytes / 8, per = (words / size_t(threads) + 31) / 32 * 32;
  auto slice = [&](int i, size_t& b, size_t& n) {
    b = std::min(words, per * size_t(i));
    n = std::min(words, b + per) - b;
  };
  if (kept.bytes != bytes || kept.threads != threads) {
    std::free(kept.data);
    kept.data = static_cast<uint64_t*>(std::aligned_alloc(kHuge, bytes));
    kept.bytes = kept.data ? bytes : 0;
    kept.threads = threads;
    if (!kept.data) return 0;
    uint64_t* buf = kept.data;
#ifdef MADV_HUGEPAGE
    // The packed weights live on huge pages too (cpu_backend.cpp): measure the same kind of memory.
    madvise(buf, bytes, MADV_HUGEPAGE);
#endif
    // First touch by the thread that reads the slice later (pages land near it on NUMA machines).
    run_together(threads, [&](int i) {
      size_t b, n;
      slice(i, b, n);
      // Distinct contents everywhere: the host may merge equal pages, and merged pages read from cache.
      uint64_t x = 0x9e3779b97f4a7c15ull ^ (uint64_t(i) << 32);
      for (size_t j = 0; j < n; j++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        buf[b + j] = x;
      }
    });
  }
  const uint64_t* buf = kept.data;
  const bool wide = cpu_supports(Isa::Avx512);
  std::atomic<uint64_t> sink{0};
  // One untimed pass (it warms the TLB and the threads), then three rounds of every pattern in turn: the
  // best pattern's median is the figure, the rate a kernel could stream at.
  std::vector<double> times[kReadPatterns];
  for (int pass = -1; pass < 3 * kReadPatterns; pass++) {
    const int pattern = pass < 0 ? 0 : pass % kReadPatterns;
    const double t = run_together(threads, [&](int i) {
      size_t b, n;
      slice(i, b, n);
      sink.fetch_xor(wide ? probe_read_avx512(buf + b, n * 8, pattern) : read_pattern(buf + b, n, pattern));
    });
    if (pass >= 0) times[pattern].push_back(t);
  }
  double best = 0;
  if (per_pattern) per_pattern->clear();
  for (const auto& t : times) {
    const double gbs = double(bytes) / median(t) / 1e9;
    if (per_pattern) per_pattern->push_back(gbs);
    best = std::max(best, gbs);
  }
  return best;
}

double probe_fma_peak(Isa isa, int threads) {
  if (threads < 1) threads = 1;
  double (*loop)(int64_t) = nullptr;
  if (!cpu_supports(isa)) return 0;
  switch (isa) {
    case Isa::Avx2:
      loop = probe_fma_loop_avx2;
      break;
    case Isa::Avx512:
      loop = probe_fma_loop_avx512;
      break;
    case Isa::Avx512Bf16:
      loop = probe_dot_loop_avx512bf16;
      break;
    case Isa::Neon:
      loop = probe_fma_loop_neon;
      break;
    default:
      return 0;
  }
  return peak_of(loop, threads);
}

double probe_int8_dot_peak(int threads, int group) {
  if (threads < 1) threads = 1;
  if (!cpu_supports(Isa::Avx512Bf16)) return 0;
  if (group == 32) return peak_of(probe_int8_group32_loop_avx512bf16, threads);
  if (group == 128) return peak_of(probe_int8_group128_loop_avx512bf16, threads);
  return peak_of(probe_int8_dot_loop_avx512bf16, threads);
}

}  // namespace fmoe
