// Machine ceilings measured by the benchmark in the same run: read bandwidth and FMA peak. Benchmark
// support, exported as binding.bench: not part of the package API.
#pragma once
#include <cstddef>
#include <type_traits>
#include <vector>

#include "../cpu/kernels.h"

namespace fmoe {
// The read probe's patterns, 0 to kReadPatterns - 1: 8, 4 or 2 sequential streams a thread, or 4 with
// each line asked for 2 KiB ahead. Calls fn(streams, ahead) with both as compile-time constants
// (std::integral_constant), for each width's loop (probes.cpp, kernels_avx512.cpp).
constexpr int kReadPatterns = 4;
template <class Fn>
auto with_read_pattern(int pattern, Fn&& fn) {
  using S8 = std::integral_constant<int, 8>;
  using S4 = std::integral_constant<int, 4>;
  using S2 = std::integral_constant<int, 2>;
  using None = std::integral_constant<size_t, 0>;
  using Ahead = std::integral_constant<size_t, 2048>;
  switch (pattern) {
    case 0:
      return fn(S8{}, None{});
    case 1:
      return fn(S4{}, None{});
    case 2:
      return fn(S2{}, None{});
    default:
      return fn(S4{}, Ahead{});
  }
}

// GB/s of streaming reads over `bytes` of memory by `threads` threads: the fastest of a few read
// patterns (streams a thread, fetching ahead), each the median of three passes. The buffer is kept for
// the next call with the same size and threads. per_pattern: where given, each pattern's GB/s.
double probe_read_bandwidth(size_t bytes, int threads, std::vector<double>* per_pattern = nullptr);
// float32 GFLOP/s (2 per FMA lane) of the given ISA's FMA units on `threads` threads; 0 if unsupported.
// For Isa::Avx512Bf16 it is the bf16 dot-product peak instead (vdpbf16ps: 4 float operations per lane),
// the ceiling of bf16 weights on that set.
double probe_fma_peak(Isa isa, int threads);
// The int8 dot-product peak (vpdpbusd) of the avx512bf16 set, whose int8 and int4 kernels run on it, in
// GFLOP/s (2 per multiply-add, as the benchmark counts a quantized layer's work); 0 if unsupported.
// group 32 or 128: the peak with each group's scaling (a conversion, a multiply and an FMA per
// accumulator and group), the quantized tiles' ceiling at that group size; any other value: bare.
double probe_int8_dot_peak(int threads, int group = 0);
}  // namespace fmoe
