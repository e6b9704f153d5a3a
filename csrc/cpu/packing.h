// Packed expert-weight layouts. Every set reads panels of `nr` output columns (one or a few SIMD vectors
// wide), so a micro-kernel streams one contiguous block per panel and never gathers.
//
//   w13 (w1, w3 both [F, H]): per panel of nr rows f, per k step: nr w1 values, then nr w3 values;
//   w2  ([H, F]):             per panel of nr rows h, per f step:  nr values.
//
// With `kpair` (16-bit weights read as k-pairs) a k step covers two reduction indices and each column's
// two values sit next to each other: (w[f][2i], w[f][2i+1]) per column, so one 32-bit lane holds a pair.
// That is the operand order of vdpbf16ps, and a shift / mask turns one load into the two k vectors.
// An odd reduction length and the last partial panel are zero-padded. Elements keep the stored dtype.
#pragma once
#include <cstddef>
#include <cstdint>

#include "../core/dtype.h"

namespace fmoe {

// Panel width of the portable scalar set.
constexpr int64_t kPanel = 16;

size_t packed_w13_bytes(int64_t H, int64_t F, DType dt, int64_t nr, bool kpair);
size_t packed_w2_bytes(int64_t H, int64_t F, DType dt, int64_t nr, bool kpair);
// Packs one expert on the shared thread pool (panels are independent).
void pack_w13(const void* w1, const void* w3, int64_t H, int64_t F, DType dt, int64_t nr, bool kpair, void* dst);
void pack_w2(const void* w2, int64_t H, int64_t F, DType dt, int64_t nr, bool kpair, void* dst);

// The scalar set's layout: nr = kPanel, no pairs.
size_t panel_w13_bytes(int64_t H, int64_t F, DType dt);
size_t panel_w2_bytes(int64_t H, int64_t F, DType dt);
void pack_w13_panels(const void* w1, const void* w3, int64_t H, int64_t F, DType dt, void* dst);
void pack_w2_panels(const void* w2, int64_t H, int64_t F, DType dt, void* dst);

}  // namespace fmoe
