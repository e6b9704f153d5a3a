// The attention tile kernel at NEON width (attention_simd.h), for arm64.
#if defined(__aarch64__)
#include "attention_simd.h"
#include "ops_neon.h"

namespace fmoe {
namespace {
constexpr AttentionTileKernels kAttnNeon = attn::Tile<OpsNeon>::make(Isa::Neon);
}  // namespace
const AttentionTileKernels* attention_kernels_neon() { return &kAttnNeon; }
}  // namespace fmoe
#else
#include "attention_kernels.h"
namespace fmoe {
const AttentionTileKernels* attention_kernels_neon() { return nullptr; }
}  // namespace fmoe
#endif
