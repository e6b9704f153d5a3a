// The attention tile kernel at AVX-512F width (attention_simd.h).
#if defined(__x86_64__) || defined(_M_X64)
#include "attention_simd.h"
#include "ops_avx512.h"

namespace fmoe {
namespace {
constexpr AttentionTileKernels kAttnAvx512 = attn::Tile<OpsAvx512>::make(Isa::Avx512);
}  // namespace
const AttentionTileKernels* attention_kernels_avx512() { return &kAttnAvx512; }
}  // namespace fmoe
#else
#include "attention_kernels.h"
namespace fmoe {
const AttentionTileKernels* attention_kernels_avx512() { return nullptr; }
}  // namespace fmoe
#endif
