// The panel layout shared by the scalar kernels (and by any SIMD set that reads the same layout).
#pragma once
#include <cstddef>
#include <cstdint>

#include "../core/dtype.h"

namespace fmoe {

constexpr int64_t kPanel = 16;

size_t panel_w13_bytes(int64_t H, int64_t F, DType dt);
size_t panel_w2_bytes(int64_t H, int64_t F, DType dt);
void pack_w13_panels(const void* w1, const void* w3, int64_t H, int64_t F, DType dt, void* dst);
void pack_w2_panels(const void* w2, int64_t H, int64_t F, DType dt, void* dst);

}  // namespace fmoe
