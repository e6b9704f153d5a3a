// AVX-512F kernel set: 16-wide float vectors, 32 registers (24 accumulators). bf16 weights are read as
// k-pairs and split by shift / mask; fp16 weights go through vcvtph2ps.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include "kernels_simd.h"
#include "ops_avx512.h"

namespace fmoe {
namespace {
using Set = simd::Kernels<OpsAvx512, simd::kBF16>;
const KernelSet kAvx512 = Set::make(Isa::Avx512, "avx512");
}  // namespace

const KernelSet* kernels_avx512() { return &kAvx512; }

// The FMA peak probe's inner loop at this width (probes.cpp times it).
double probe_fma_loop_avx512(int64_t iters) { return simd::probe_fma_loop<OpsAvx512>(iters); }

}  // namespace fmoe
#else
#include "../core/kernels.h"
namespace fmoe {
const KernelSet* kernels_avx512() { return nullptr; }
double probe_fma_loop_avx512(int64_t) { return 0; }
}  // namespace fmoe
#endif
