// One body for every attention tile kernel (attention_kernels.h), on an Ops struct (vector type, width,
// load / broadcast / fma, ...): the ISA units instantiate it with their Ops, attention.cpp with a scalar
// one. Everything sits in an anonymous namespace, as kernels_simd.h explains: a copy per ISA unit.
//
// The scores are GEMM-shaped: the keys are transposed, so one vector holds a row's scores for W keys and
// each takes its products in ascending d; several rows share every key load. The weighted values are
// vectorised over d: rows that see the same keys (the query heads of one token) share every value load.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "attention_kernels.h"
#include "simd_exp.h"

namespace fmoe {
namespace attn {
namespace {

// Runs f(std::integral_constant<int, n>) for a run-time n in [1, N].
template <int N, class F>
inline void with_count(int n, F&& f) {
  if (n == N)
    f(std::integral_constant<int, N>());
  else if constexpr (N > 1)
    with_count<N - 1>(n, f);
}

// A vector of keys or values: float (a widened tile) or bf16 (the cache's own elements), the same floats.
template <class O, class E>
inline typename O::V load_elems(const E* p) {
  if constexpr (std::is_same_v<E, float>)
    return O::load(p);
  else
    return O::load_bf16(p);
}

// Walks a FetchAhead (attention_kernels.h) in `chunks` runs of 8 cache lines, spread evenly over
// `steps` calls of step().
struct AheadCursor {
  const FetchAhead& ahead;
  int64_t chunks = 0, steps = 1;
  int64_t credit = 0, run = 0, off = 0;
  void step() {
    for (credit += chunks; credit >= steps && run < ahead.count; credit -= steps) {
      const char* p = ahead.runs[run] + off;
      const int64_t lines = (ahead.bytes - off + 63) / 64;
      for (int64_t l = 0; l < 8 && l < lines; l++) __builtin_prefetch(p + 64 * l, 0, 3);
      off += 512;
      if (off >= ahead.bytes) {
        off = 0;
        run++;
      }
    }
  }
};

// s[m][c] = scale * (q_m . k_c) for MR rows and NV vectors of keys, vector n's row d at kp[n] + d * ldk;
// every eighth d asks the cursor for more of the lines ahead.
template <class O, int MR, int NV, class E>
inline void qk_block(const float* q, int64_t ldq, int64_t D, float scale, const E* const* kp, int64_t ldk, float* s,
                     int64_t lds, AheadCursor& ahead) {
  using V = typename O::V;
  constexpr int W = O::W;
  V acc[MR][NV];
  for (int m = 0; m < MR; m++)
    for (int n = 0; n < NV; n++) acc[m][n] = O::zero();
  for (int64_t d = 0; d < D; d++) {
    if ((d & 7) == 0) ahead.step();
    V k[NV];
    for (int n = 0; n < NV; n++) k[n] = load_elems<O>(kp[n] + d * ldk);
    for (int m = 0; m < MR; m++) {
      const V qb = O::bcast(q + m * ldq + d);
      for (int n = 0; n < NV; n++) acc[m][n] = O::fma(qb, k[n], acc[m][n]);
    }
  }
  const V sc = O::set1(scale);
  for (int m = 0; m < MR; m++)
    for (int n = 0; n < NV; n++) O::store(s + m * lds + n * W, O::mul(acc[m][n], sc));
}

// acc[m][c] = sum over keys j in [lo, hi) of p[m][j] * v_j[col + c], for MR rows and NV vectors of
// values; key j is slot j % ldk of block j / ldk, whose values are vb[j / ldk] ([slot][ldv]). Every
// eighth key asks the cursor for more of the lines ahead.
template <class O, int MR, int NV, class E>
inline void pv_block(const float* p, int64_t ldp, int64_t lo, int64_t hi, const E* const* vb, int64_t ldk, int64_t ldv,
                     int64_t col, float* acc, int64_t ldacc, AheadCursor& ahead) {
  using V = typename O::V;
  constexpr int W = O::W;
  V a[MR][NV];
  for (int m = 0; m < MR; m++)
    for (int n = 0; n < NV; n++) a[m][n] = O::zero();
  for (int64_t j = lo; j < hi;) {
    const int64_t b = j / ldk, end = hi < (b + 1) * ldk ? hi : (b + 1) * ldk;
    const E* v = vb[b] + (j - b * ldk) * ldv + col;  // key j's values
    for (; j < end; j++, v += ldv) {
      if (((j - lo) & 7) == 0) ahead.step();
      V vv[NV];
      for (int n = 0; n < NV; n++) vv[n] = load_elems<O>(v + n * W);
      for (int m = 0; m < MR; m++) {
        const V pb = O::bcast(p + m * ldp + j);
        for (int n = 0; n < NV; n++) a[m][n] = O::fma(pb, vv[n], a[m][n]);
      }
    }
  }
  for (int m = 0; m < MR; m++)
    for (int n = 0; n < NV; n++) O::store(acc + m * ldacc + n * W, a[m][n]);
}

template <class O>
struct Tile {
  using V = typename O::V;
  static constexpr int W = O::W;
  // Register tiles: scores 8 rows x 1 vector or 4 x 2; weighted values kMrPv rows x 4 vectors.
  static constexpr int kMrPv = O::kAcc >= 16 ? 4 : 2;
  static constexpr int kNvPv = 4;

  template <int NV, int MR, class E>
  static void qk_rows(int64_t R, const float* q, int64_t ldq, int64_t D, float scale, const E* const* kp, int64_t ldk,
                      float* s, int64_t lds, AheadCursor& ahead) {
    int64_t r = 0;
    for (; r + MR <= R; r += MR) qk_block<O, MR, NV>(q + r * ldq, ldq, D, scale, kp, ldk, s + r * lds, lds, ahead);
    if (r < R)
      with_count<MR - 1>(int(R - r), [&](auto mr) {
        qk_block<O, decltype(mr)::value, NV>(q + r * ldq, ldq, D, scale, kp, ldk, s + r * lds, lds, ahead);
      });
  }

  // Lanes of x in order: the largest, and the sum (fixed orders, the same in every call).
  static float lanes_max(V x) {
    float f[W];
    O::store(f, x);
    float mx = f[0];
    for (int i = 1; i < W; i++) mx = mx < f[i] ? f[i] : mx;
    return mx;
  }
  static float lanes_sum(V x) {
    float f[W];
    O::store(f, x);
    float sum = f[0];
    for (int i = 1; i < W; i++) sum += f[i];
    return sum;
  }

  // Rows from r that share row r's keys and one weighted-values tile (at most kMrPv); 0 where row r
  // sees no key.
  static int pv_group(int64_t r, int64_t R, const int32_t* lo, const int32_t* hi) {
    if (lo[r] >= hi[r]) return 0;
    int g = 1;
    while (g < kMrPv && r + g < R && lo[r + g] == lo[r] && hi[r + g] == hi[r]) g++;
    return g;
  }

  // partials (attention_kernels.h) over keys and values of element type E: float, or bf16.
  template <class E>
  static void partials_of(const float* q, int64_t ldq, int64_t R, int64_t D, float scale, const E* const* kt,
                          const E* const* v, int64_t ldk, int64_t ldv, const int32_t* lo, const int32_t* hi, float* s,
                          int64_t lds, float* m, float* l, float* acc, int64_t ldacc, const FetchAhead& ahead) {
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
    // Scores of every row over the key vectors any row sees; a vector lies in one block (ldk is a
    // multiple of W).
    int64_t top = 0;
    for (int64_t r = 0; r < R; r++) top = hi[r] > top ? hi[r] : top;
    const int64_t nk = (top + W - 1) / W;
    auto keys = [&](int64_t c) { return kt[c * W / ldk] + c * W % ldk; };  // key vector c, row 0
    // The lines ahead, spread evenly over the whole call: its steps are one per eight d of every
    // qk_block and one per eight keys of every pv_block (the row groups below).
    const int64_t nv = ldv / W;
    int64_t steps = ((nk / 2) * ((R + 3) / 4) + (nk % 2) * ((R + 7) / 8)) * ((D + 7) / 8);
    for (int64_t r = 0; r < R;) {
      const int g = pv_group(r, R, lo, hi);
      if (g > 0) steps += (nv + kNvPv - 1) / kNvPv * ((hi[r] - lo[r] + 7) / 8);
      r += g > 0 ? g : 1;
    }
    AheadCursor cursor{ahead, ahead.count * ((ahead.bytes + 511) / 512), steps > 0 ? steps : 1};
    int64_t c = 0;
    for (; c + 2 <= nk; c += 2) {
      const E* kp[2] = {keys(c), keys(c + 1)};
      qk_rows<2, 4>(R, q, ldq, D, scale, kp, ldk, s + c * W, lds, cursor);
    }
    if (c < nk) {
      const E* kp[1] = {keys(c)};
      qk_rows<1, 8>(R, q, ldq, D, scale, kp, ldk, s + c * W, lds, cursor);
    }
    // Each row's max, exponentials (in place of its scores) and their sum, over its own keys, lane by
    // lane over the vectors they lie in; the lanes outside [lo, hi) are set aside first (-inf for the
    // max, 0 for the sum). Each lane sees the same keys wherever the span starts, as spans start on
    // whole blocks.
    for (int64_t r = 0; r < R; r++) {
      m[r] = kNegInf;
      l[r] = 0;
      if (lo[r] >= hi[r]) continue;
      float* sr = s + r * lds;
      const int64_t j0 = lo[r] / W * W, j1 = (hi[r] + W - 1) / W * W;
      for (int64_t j = j0; j < lo[r]; j++) sr[j] = kNegInf;
      for (int64_t j = hi[r]; j < j1; j++) sr[j] = kNegInf;
      V mv = O::load(sr + j0);
      for (int64_t j = j0 + W; j < j1; j += W) mv = O::max(mv, O::load(sr + j));
      const float mx = lanes_max(mv);
      const V neg_mx = O::set1(-mx);
      for (int64_t j = j0; j < j1; j += W) O::store(sr + j, vexp<O>(O::add(O::load(sr + j), neg_mx)));
      for (int64_t j = j0; j < lo[r]; j++) sr[j] = 0;
      for (int64_t j = hi[r]; j < j1; j++) sr[j] = 0;
      V sv = O::load(sr + j0);
      for (int64_t j = j0 + W; j < j1; j += W) sv = O::add(sv, O::load(sr + j));
      m[r] = mx;
      l[r] = lanes_sum(sv);
    }
    // Weighted values; consecutive rows with the same keys share the value loads.
    for (int64_t r = 0; r < R;) {
      const int g = pv_group(r, R, lo, hi);
      if (g == 0) {
        r++;
        continue;
      }
      for (int64_t c0 = 0; c0 < nv; c0 += kNvPv) {
        const int nc = int(nv - c0 < kNvPv ? nv - c0 : kNvPv);
        with_count<kMrPv>(g, [&](auto mr) {
          with_count<kNvPv>(nc, [&](auto ncv) {
            pv_block<O, decltype(mr)::value, decltype(ncv)::value>(s + r * lds, lds, lo[r], hi[r], v, ldk, ldv, c0 * W,
                                                                   acc + r * ldacc + c0 * W, ldacc, cursor);
          });
        });
      }
      r += g;
    }
  }

  static void partials(const float* q, int64_t ldq, int64_t R, int64_t D, float scale, const float* const* kt,
                       const float* const* v, int64_t ldk, int64_t ldv, const int32_t* lo, const int32_t* hi, float* s,
                       int64_t lds, float* m, float* l, float* acc, int64_t ldacc, const FetchAhead& ahead) {
    partials_of(q, ldq, R, D, scale, kt, v, ldk, ldv, lo, hi, s, lds, m, l, acc, ldacc, ahead);
  }
  static void partials_bf16(const float* q, int64_t ldq, int64_t R, int64_t D, float scale, const uint16_t* const* kt,
                            const uint16_t* const* v, int64_t ldk, int64_t ldv, const int32_t* lo, const int32_t* hi,
                            float* s, int64_t lds, float* m, float* l, float* acc, int64_t ldacc,
                            const FetchAhead& ahead) {
    partials_of(q, ldq, R, D, scale, kt, v, ldk, ldv, lo, hi, s, lds, m, l, acc, ldacc, ahead);
  }

  static void merge(float* m, float* l, float* acc, float mt, float lt, const float* acct, int64_t n) {
    if (mt == -std::numeric_limits<float>::infinity()) return;
    const float mn = *m > mt ? *m : mt;
    const float a = std::exp(*m - mn), b = std::exp(mt - mn);
    const V av = O::set1(a), bv = O::set1(b);
    for (int64_t d = 0; d < n; d += W)
      O::store(acc + d, O::add(O::mul(O::load(acc + d), av), O::mul(O::load(acct + d), bv)));
    *l = *l * a + lt * b;
    *m = mn;
  }

  // Cache elements to float, at this unit's width: bf16 by a shift and float32 by a copy, which the
  // compiler vectorises, fp16 through O's conversion (the scalar set: dtype.h's). The keys and values of
  // every tile pass through here at every step; the portable loop ran at baseline width.
  static void widen(const void* src, DType dt, int64_t n, float* dst) {
    if (dt == DType::F32) {
      std::memcpy(dst, src, size_t(n) * sizeof(float));
      return;
    }
    const uint16_t* s = static_cast<const uint16_t*>(src);
    if (dt == DType::BF16) {
      for (int64_t i = 0; i < n; i++) {
        const uint32_t u = uint32_t(s[i]) << 16;
        std::memcpy(dst + i, &u, sizeof u);
      }
      return;
    }
    if constexpr (W == 1) {
      for (int64_t i = 0; i < n; i++) dst[i] = f16_to_f32(s[i]);
    } else {
      int64_t i = 0;
      for (; i + W <= n; i += W) O::store(dst + i, O::load_f16(s + i));
      if (i < n) {  // the tail through a padded copy
        uint16_t part[W] = {};
        float out[W];
        std::memcpy(part, s + i, size_t(n - i) * sizeof(uint16_t));
        O::store(out, O::load_f16(part));
        std::memcpy(dst + i, out, size_t(n - i) * sizeof(float));
      }
    }
  }

  static constexpr AttentionTileKernels make(Isa isa) {
    return AttentionTileKernels{isa, W, partials, partials_bf16, merge, widen};
  }
};

}  // namespace
}  // namespace attn
}  // namespace fmoe
