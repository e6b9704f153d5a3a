// NEON kernel set (arm64): 4-wide float vectors, 32 registers (24 accumulators). fp16 weights are
// widened with fcvtl; bf16 weights are read as k-pairs and split by shift / mask.
#if defined(__aarch64__)
#include <arm_neon.h>

#include "../probes/probe_loops.h"
#include "kernels_simd.h"
#include "ops_neon.h"

namespace fmoe {
namespace {

using Set = simd::Kernels<OpsNeon, simd::kBF16>;
const KernelSet kNeon = Set::make(Isa::Neon, "neon");

}  // namespace

const KernelSet* kernels_neon() { return &kNeon; }
double probe_fma_loop_neon(int64_t iters) { return simd::probe_fma_loop<OpsNeon>(iters); }

}  // namespace fmoe
#else
#include "kernels.h"
namespace fmoe {
const KernelSet* kernels_neon() { return nullptr; }
double probe_fma_loop_neon(int64_t) { return 0; }
}  // namespace fmoe
#endif
