// The portable attention tile kernel set (attention_simd.h at width 1), which any CPU runs.
//
// Built with -ffp-contract=off (binding.gyp, CMakeLists.txt), as kernels_scalar.cpp is: where the target
// has fused multiply-add (arm64), GCC otherwise fuses a * b + c wherever it pleases after inlining, so
// the same row computed by two instantiations of a tile (4 rows, or a remainder of 3) could differ in
// its last bits, and a prompt read in chunks would no longer match it read whole. Unfused, every
// product and sum rounds on its own, the same in every instantiation.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "attention_simd.h"

namespace fmoe {
namespace {

// attention_simd.h with one float per "vector". min and max return the second operand when one is NaN,
// as the x86 instructions do.
struct OpsScalar {
  using V = float;
  static constexpr int W = 1;
  static constexpr int kAcc = 8;
  static V zero() { return 0.0f; }
  static V set1(float v) { return v; }
  static V bcast(const float* p) { return *p; }
  static V load(const float* p) { return *p; }
  static V load_bf16(const uint16_t* p) {
    const uint32_t u = uint32_t(*p) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static void store(float* p, V v) { *p = v; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }
  static V mul(V a, V b) { return a * b; }
  static V min(V a, V b) { return a < b ? a : b; }
  static V max(V a, V b) { return a > b ? a : b; }
  static V round(V a) { return std::nearbyint(a); }
  static V pow2(V p, V n) { return std::ldexp(p, int(n)); }
};

constexpr AttentionTileKernels kAttnScalar = attn::Tile<OpsScalar>::make(Isa::Scalar);

}  // namespace

const AttentionTileKernels* attention_kernels_scalar() { return &kAttnScalar; }

}  // namespace fmoe
