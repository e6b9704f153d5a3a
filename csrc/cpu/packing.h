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
// shorter when K is not a multiple of g), one block each: nmat * nr IEEE half scales (matrix by matrix),
// then the group's codes in steps, each step matrix by matrix, column by column. Two orders:
//   Plain (float dequantization in registers):
//     int8: one k per step, a byte per column: the signed code;
//     int4: two k per step, a byte per column: k even in the low nibble, k odd in the high one,
//           offset-binary (nibble = code + 8);
//   Dot (integer dot-product instructions, VNNI):
//     int8: two k per step, two bytes per column (k even, k odd): sign-extended to 16 bits they are
//           the word pair vpmaddwd multiplies;
//     int4: eight k per step, a 32-bit lane per column: byte b holds k = b in its low nibble and
//           k = 4 + b in its high one (offset-binary), so one mask (and a shift) gives a column's four
//           consecutive unsigned codes per lane, the operand of vpdpbusd.
//   Vnni (vpdpbusd for int8 too): int4 as in Dot;
//     int8: four k per step, a 32-bit lane per column: byte b holds k = b offset-binary (code + 128),
//           so one load gives a column's four unsigned codes per lane, the operand of vpdpbusd.
// Codes past the end of a short last group are code 0. Scales sit in front of their codes so a decode
// kernel reads one stream per panel; `static` keeps a private copy in each unit (the ISA units include
// this header too, see kernels_simd.h).
enum class CodeOrder : int { Plain = 0, Dot = 1, Vnni = 2 };
constexpr size_t kScaleBytes = 2;  // one IEEE half per column and group
static inline size_t quant_group_bytes(int nmat, int64_t nr, Quant q, int64_t gl, CodeOrder order) {
  int64_t code_bytes;
  if (q == Quant::Int8)
    code_bytes = order == CodeOrder::Plain ? gl : order == CodeOrder::Dot ? (gl + 1) / 2 * 2 : (gl + 3) / 4 * 4;
  else
    code_bytes = order == CodeOrder::Plain ? (gl + 1) / 2 : (gl + 7) / 8 * 4;
  return size_t(nmat) * size_t(nr) * (kScaleBytes + size_t(code_bytes));
}
// Bytes of one panel: K / g full groups and the shorter rest.
static inline size_t quant_panel_bytes(int nmat, int64_t K, int64_t nr, Quant q, int64_t g, CodeOrder order) {
  return size_t(K / g) * quant_group_bytes(nmat, nr, q, g, order) +
         (K % g ? quant_group_bytes(nmat, nr, q, K % g, order) : 0);
}
size_t quant_w13_bytes(int64_t H, int64_t F, int64_t nr, Quant q, int64_t g, CodeOrder order);
size_t quant_w2_bytes(int64_t H, int64_t F, int64_t nr, Quant q, int64_t g, CodeOrder order);
// Quantizes and packs one expert, group by group straight from the source (no float copy of it).
void pack_w13_quant(const void* w1, const void* w3, int64_t H, int64_t F, DType dt, int64_t nr, Quant q, int64_t g,
                    CodeOrder order, void* dst);
void pack_w2_quant(const void* w2, int64_t H, int64_t F, DType dt, int64_t nr, Quant q, int64_t g, CodeOrder order,
                   void* dst);

}  // namespace fmoe
