// The attention tile kernel at AVX2 + FMA width (attention_simd.h).
#if defined(__x86_64__) || defined(_M_X64)
#include "attention_simd.h"
#include "ops_avx2.h"

namespace fmoe {
namespace {
constexpr AttentionTileKernels kAttnAvx2 = attn::Tile<OpsAvx2>::make(Isa::Avx2);
}  // namespace
const AttentionTileKernels* attention_kernels_avx2() { return &kAttnAvx2; }
}  // namespace fmoe
#else
#include "attention_kernels.h"
namespace fmoe {
const AttentionTileKernels* attention_kernels_avx2() { return nullptr; }
}  // namespace fmoe
#endif
