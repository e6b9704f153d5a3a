// AVX2 + FMA kernel set: 8-wide float vectors, 16 registers (12 accumulators). fp16 weights go through
// F16C (vcvtph2ps); bf16 weights are read as k-pairs and split by shift / mask.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "kernels_simd.h"
#include "ops_avx2.h"

namespace fmoe {
namespace {

// Quantized experts use integer dot products (int8 activations for int4 weights, int16 for int8)
// built from vpmaddubsw / vpmaddwd.
using Set = simd::Kernels<OpsAvx2, simd::kBF16, simd::kI8Dot, simd::kI4Dot>;
constexpr KernelSet kAvx2 = Set::make(Isa::Avx2, "avx2");

}  // namespace

const KernelSet* kernels_avx2() { return &kAvx2; }
// AVX2 has 16 registers, so 16 accumulators leave none for the multiplier: written out in assembly with
// the multiplier as a memory operand (compilers keep it in a register and spill an accumulator instead,
// which puts a store / reload in a chain). acc = acc * 2^-30 + acc keeps every value unchanged.
double probe_fma_loop_avx2(int64_t iters) {
  if (iters <= 0) return 0;
  alignas(32) static const float one[8] = {1, 1, 1, 1, 1, 1, 1, 1};
  alignas(32) static const float tiny[8] = {9.3132257e-10f, 9.3132257e-10f, 9.3132257e-10f, 9.3132257e-10f,
                                            9.3132257e-10f, 9.3132257e-10f, 9.3132257e-10f, 9.3132257e-10f};
  int64_t n = iters;
#define FMOE_ACC(r) "vmovaps (%[one]), %%ymm" #r "\n"
#define FMOE_FMA(r) "vfmadd231ps (%[b]), %%ymm" #r ", %%ymm" #r "\n"
  __asm__ volatile(
      FMOE_ACC(0) FMOE_ACC(1) FMOE_ACC(2) FMOE_ACC(3) FMOE_ACC(4) FMOE_ACC(5) FMOE_ACC(6) FMOE_ACC(7)
      FMOE_ACC(8) FMOE_ACC(9) FMOE_ACC(10) FMOE_ACC(11) FMOE_ACC(12) FMOE_ACC(13) FMOE_ACC(14) FMOE_ACC(15)
      "1:\n"
      FMOE_FMA(0) FMOE_FMA(1) FMOE_FMA(2) FMOE_FMA(3) FMOE_FMA(4) FMOE_FMA(5) FMOE_FMA(6) FMOE_FMA(7)
      FMOE_FMA(8) FMOE_FMA(9) FMOE_FMA(10) FMOE_FMA(11) FMOE_FMA(12) FMOE_FMA(13) FMOE_FMA(14) FMOE_FMA(15)
      "dec %[n]\n"
      "jnz 1b\n"
      "vzeroupper\n"
      : [n] "+r"(n)
      : [one] "r"(one), [b] "r"(tiny)
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
        "xmm13", "xmm14", "xmm15", "cc", "memory");
#undef FMOE_ACC
#undef FMOE_FMA
  return double(iters) * 16 * 8 * 2;
}

}  // namespace fmoe
#else
#include "kernels.h"
namespace fmoe {
const KernelSet* kernels_avx2() { return nullptr; }
double probe_fma_loop_avx2(int64_t) { return 0; }
}  // namespace fmoe
#endif
