// The SIMD tile kernel of attention (attention.cpp): the partial softmax of several query rows over one
// span of keys (a few cache blocks), one set per instruction set, chosen at run time like the expert
// kernels (kernels.h).
//
// Determinism: every row's partial is one fixed computation, whichever rows share the call: its scores
// are chains over d in ascending order, its exponentials lane by lane, its sum of exponentials lane by
// lane over the span's vectors and then over the lanes in order, its weighted values chains over the
// span's keys in ascending order. So a prompt's row gives the same bits streamed with its neighbours as
// alone in a decode split over keys. Different sets may differ in the last bits (vector exp, FMA
// contraction); a process uses one set.
#pragma once
#include <cstdint>

#include "kernels.h"

namespace fmoe {

// Memory a kernel call asks for while it computes (the next span's keys and values): `count` runs of
// `bytes` bytes, at runs[i].
struct FetchAhead {
  const char* const* runs = nullptr;
  int64_t count = 0;
  int64_t bytes = 0;
};

struct AttentionTileKernels {
  Isa isa;
  // Floats per vector: the key tile's and the values' rows are padded to a multiple of it.
  int64_t width;
  // For r < R, query row q + r * ldq (D floats) over the span's keys [lo[r], hi[r]) (lo < hi):
  //   s_j = scale * (q_r . k_j),  m[r] = max_j s_j,  l[r] = sum_j exp(s_j - m[r]),
  //   acc[r * ldacc + d] = sum_j exp(s_j - m[r]) * v_j[d]   (d < ldv; ldacc >= ldv).
  // A span is one or more cache blocks: key j is slot j % ldk of block j / ldk, whose keys are kt[j / ldk]
  // (transposed, [D][ldk] elements) and whose values are v[j / ldk] ([slot][ldv] elements, ldv a multiple
  // of width with zeros past D). ldk is a multiple of width; a span of several blocks has no slots past
  // a block's end (ldk = block_tokens). s: scratch of R * lds floats, lds a multiple of width >= every
  // hi. Rows with lo >= hi get m = -inf, l = 0 and no acc. `ahead`'s lines are fetched a few at a time,
  // spread over the whole call (a span's worth at once stalled the loads behind them).
  void (*partials)(const float* q, int64_t ldq, int64_t R, int64_t D, float scale, const float* const* kt,
                   const float* const* v, int64_t ldk, int64_t ldv, const int32_t* lo, const int32_t* hi, float* s,
                   int64_t lds, float* m, float* l, float* acc, int64_t ldacc, const FetchAhead& ahead);
  // partials with kt and v of bf16 elements (the cache's own, read where they lie: no widening copy),
  // the same computation: a bf16 widens to float exactly.
  void (*partials_bf16)(const float* q, int64_t ldq, int64_t R, int64_t D, float scale, const uint16_t* const* kt,
                        const uint16_t* const* v, int64_t ldk, int64_t ldv, const int32_t* lo, const int32_t* hi,
                        float* s, int64_t lds, float* m, float* l, float* acc, int64_t ldacc, const FetchAhead& ahead);
  // Merges a span's partial (mt, lt, acct) into a row's running state (m, l, acc), n floats of acc (a
  // multiple of width): acc = acc * exp(m - m') + acct * exp(mt - m') with m' = max(m, mt), the same
  // for l. Nothing changes when mt = -inf (the row saw no key of the tile); an empty state (m = -inf,
  // l = 0, acc = 0) takes the partial exactly, so a partial stored and merged later gives the same bits
  // as one merged at once.
  void (*merge)(float* m, float* l, float* acc, float mt, float lt, const float* acct, int64_t n);
  // dst[i] = element i of src (n elements of the cache's dtype) as float: exact for every dtype.
  void (*widen)(const void* src, DType dt, int64_t n, float* dst);
};

// Sets compiled into this binary (nullptr where not built for this architecture).
const AttentionTileKernels* attention_kernels_scalar();
const AttentionTileKernels* attention_kernels_avx2();
const AttentionTileKernels* attention_kernels_avx512();
const AttentionTileKernels* attention_kernels_neon();

// The set for an expert kernel set's instruction set (the widest attention set it can run), so that
// FUSED_MOE_ISA and the tests' forced sets choose both.
const AttentionTileKernels* attention_kernels_for(Isa isa);

}  // namespace fmoe
