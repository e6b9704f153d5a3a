// The FMA peak probe's inner loop, instantiated by each SIMD kernel unit with its own Ops (and flags) and
// timed by probes.cpp. Benchmark support only: no layer runs it.
#pragma once
#include <cstdint>

namespace fmoe {
namespace simd {
namespace {

// FMA peak probe: 16 independent accumulators (more than latency x ports) so the loop runs at the FMA
// units' throughput. acc = acc * b + acc with b = 2^-30 leaves acc unchanged after rounding, so values
// stay normal forever, and needs no register but the accumulators (b can be a memory operand: AVX2 has
// only 16 registers). Returns float operations done (2 per lane per FMA).
template <class O>
double probe_fma_loop(int64_t iters) {
  static volatile float tiny = 9.3132257e-10f;  // 2^-30, opaque to the compiler
  typename O::V acc[16];
  for (int i = 0; i < 16; i++) acc[i] = O::set1(1.0f + float(i));
  const typename O::V b = O::set1(tiny);
  for (int64_t it = 0; it < iters; it++) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) acc[i] = O::fma(acc[i], b, acc[i]);
  }
  typename O::V s = acc[0];
  for (int i = 1; i < 16; i++) s = O::add(s, acc[i]);
  float out[O::W];
  O::store(out, s);
  volatile float sink = out[0];
  (void)sink;
  return double(iters) * 16 * O::W * 2;
}

}  // namespace
}  // namespace simd
}  // namespace fmoe
