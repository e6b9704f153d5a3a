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
#include "../core/quant.h"

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

// Quantized layout (quant.h), per panel of nr columns, per group of g reduction indices (the last group
// shorter when K is not a multiple of g), one block each:
//   nmat * nr float32 scales (matrix by matrix), then the group's codes:
//     int8: one k per step, nmat * nr bytes a step (matrix by matrix, a byte per column), the signed code;
//     int4: offset-binary nibbles (nibble = code + 8), padding nibbles at code 0, in one of two orders:
//       pairs: two k per step, nmat * nr bytes a step: k even in the low nibble, k odd in the high one;
//       quads: eight k per step, nmat * nr * 4 bytes a step (a 32-bit lane per column): byte b of a lane
//              holds k = b in its low nibble and k = 4 + b in its high one, so one mask (and one shift)
//              gives a column's four consecutive unsigned codes per lane, the operand of vpdpbusd.
// Scales sit in front of their codes so a decode kernel reads one stream per panel; `static` keeps a
// private copy in each unit (the ISA units include this header too, see kernels_simd.h).
enum class Int4Order : int { Pairs = 0, Quads = 1 };
static inline size_t quant_group_bytes(int nmat, int64_t nr, Quant q, int64_t gl, Int4Order order) {
  const int64_t code_bytes = q == Quant::Int8 ? gl : order == Int4Order::Pairs ? (gl + 1) / 2 : (gl + 7) / 8 * 4;
  return size_t(nmat) * size_t(nr) * (4 + size_t(code_bytes));
}
// Bytes of one panel: K / g full groups and the shorter rest.
static inline size_t quant_panel_bytes(int nmat, int64_t K, int64_t nr, Quant q, int64_t g, Int4Order order) {
  return size_t(K / g) * quant_group_bytes(nmat, nr, q, g, order) +
         (K % g ? quant_group_bytes(nmat, nr, q, K % g, order) : 0);
}
size_t quant_w13_bytes(int64_t H, int64_t F, int64_t nr, Quant q, int64_t g, Int4Order order);
size_t quant_w2_bytes(int64_t H, int64_t F, int64_t nr, Quant q, int64_t g, Int4Order order);
// Quantizes and packs one expert, group by group straight from the source (no float copy of it).
void pack_w13_quant(const void* w1, const void* w3, int64_t H, int64_t F, DType dt, int64_t nr, Quant q, int64_t g,
                    Int4Order order, void* dst);
void pack_w2_quant(const void* w2, int64_t H, int64_t F, DType dt, int64_t nr, Quant q, int64_t g, Int4Order order,
                   void* dst);

}  // namespace fmoe
