// The micro-kernels: one register tile of accumulators over a range of k, for every weight read mode.
// They read activations as simd_pack_act.h lays them out and weights as packing.h does.
// Everything sits in an anonymous namespace, as kernels_simd.h explains: each ISA unit gets its own copy.
#pragma once
#include "simd_common.h"

namespace fmoe {
namespace simd {
namespace {

// Lines of the next block of panels that a micro-kernel call asks for while it computes from the
// current one (sweep): `count` lines from `base + 64 * first` in each of its NP panels (the same pstride
// apart), one line of every panel each `every` k steps. base == nullptr: none.
struct NextLines {
  const char* base = nullptr;
  int64_t first = 0, count = 0, every = 1;
};

// How a micro-kernel call fetches ahead of its loads. kFetchNext: NextLines' share of the next block of
// panels (the prefill shape, several row blocks over each block). kFetchAhead: the lines a little ahead
// in its own panels (prefetch_codes; the few-rows shape, one row block streaming its panels once).
// kFetchNone: the hardware prefetchers alone, except in the integer-dot kernels, which always fetch
// ahead when they do not fetch the next block. kFetchNear: kNearBytes ahead in its own panels (the
// tiles on panels far apart, sweep_streams: the float decode tiles of one to three rows, and the
// integer-dot one-row tile non-temporally, micro_qdot).
constexpr int kFetchNone = 0, kFetchNext = 1, kFetchAhead = 2, kFetchNear = 3;
// The float one-row tile reads four streams a thread (sweep_streams) and asks for each stream's line 1
// KiB ahead, to every level (the tiles of two and three rows likewise: simd_gemm.h Shapes). Against eight adjacent
// panels without it (`bench/ab-model.js MODEL none decodeStreams 0 1`, Zen 5, 2 cores): one Qwen3 bf16 stream's step
// 0.81-0.86, Mixtral's 0.86-0.94, the LM head 0.80-0.83. In a trial: 2 KiB ahead 0.87-0.97, 512 bytes 0.89-0.98,
// nothing ahead 0.99; 1 KiB non-temporally no better than to every level, to L2 only 8% slower; eight far-apart streams
// 12% and two 9% slower than four (bench/RESULTS.md, thirty-eighth run).
constexpr size_t kNearBytes = 1024;

// Issues the next of NextLines' prefetches when its turn has come (once per k step); compiled out of
// the calls that do not fetch the next block (ON false).
template <int NP, bool ON>
struct NextLinesCursor {
  const char* at;
  int64_t left, wait, every;
  explicit NextLinesCursor(const NextLines& n)
      : at(n.base ? n.base + 64 * n.first : nullptr), left(n.base ? n.count : 0), wait(n.every), every(n.every) {}
  inline void step(size_t pstride) {
    if (ON && left > 0 && --wait == 0) {
      wait = every;
      left--;
#pragma GCC unroll 8
      for (int p = 0; p < NP; p++) __builtin_prefetch(at + p * pstride, 0, 3);
      at += 64;
    }
  }
};

// Fetching ahead. The int4 micro-kernel streams the codes from memory once per row block, each panel a
// stream of its own, and the hardware prefetchers alone left the loads waiting: asking for the lines
// ahead in every panel ran the decode 7-12% faster (`bench/ab-builds.js` mixtral- and qwen3-decode-int4,
// Zen 5, 2 cores; 1 KiB ahead gained less, 3 and 4 KiB lost 3-7% against 2 KiB) and the 16-token forward
// of mixtral-16tok-int4, 3 to 6 rows per expert, 10-13% (mid-prefill-int4 6%). What hides the latency is
// the bytes in flight per tile, not per panel: the one-panel tile of the prefill shape (w13) ran 8-12%
// faster again at 4 KiB ahead than at 2 KiB (3 KiB: 5%, 6 KiB: 1-7%). Near the end of its panels a tile
// asks for the start of the next tile's (the same panels NP further on, where the same thread goes next:
// ThreadPool hands out contiguous shares), not for the rest of its own, which it already has; every tile
// but a thread's first then starts warm: 0.91-0.99 on wide-decode-int4, whose w2 is many short panels,
// 0.94-0.99 on qwen3-decode-int4. Hints to L2 (T1) or non-temporal ones lost 0-9% there (but see kLocality in
// micro_qdot). The int8 decode (kI8Vnni without kFetchNext) prefetches the same way: mixtral-decode-int8 0.94-0.96,
// qwen3-decode-int8 0.965-0.98, but l3-decode-int8, whose codes sit in L3, 1.05; its prefill, which fetches the next
// block instead (kFetchNext), ran 4% slower with both. The float modes fetch ahead in the few-rows tile (kFetchAhead):
// one Mixtral expert at 4 rows (16 streams: 4 rows per expert on average) ran 13-17% faster in bf16 (avx512bf16 and
// avx512) and float32, the 16-token Mixtral layer 7-19%
// (`bench/ab-builds.js expert-4tok-bf16`, `expert-4tok-f32`, `mixtral-16tok-bf16`, both orders, Zen 5, 2
// cores). Their decode tiles on eight adjacent panels did not (mixtral-decode-bf16 lost 1-10%); on panels
// far apart and nearer ahead (kFetchNear above) they do.
// The VNNI set's int4 tiles of 5 or more rows (a few-rows expert at continuous batching, and prefill)
// are bound by their dot products, not by the loads, and fetch further ahead: 16 KiB per panel ran
// expert-6tok-int4 at 0.92-0.96, expert-16tok-int4 0.97 and mixtral-16tok-int4 0.93-0.98 of 2 or 4 KiB,
// expert-8tok-int4, expert-64tok-int4 and mid-prefill-int4 within 1% (`bench/ab-builds.js A B CASE 20
// 32`, group 32, Zen 5, 2 cores). The avx512 set, whose dot products take three instructions, lost 2-3%
// on mixtral-16tok-int4 and keeps the short distance (OpsAvx512::kManyRowsAhead 0).
template <int NP>
constexpr size_t prefetch_code_bytes() {
  return NP >= 2 ? 2048 : 4096;
}
// bk: this step's codes in the tile's first panel, which ends at panel_end. LOCALITY: the hint of
// __builtin_prefetch (3: every cache level; 0: non-temporal, for codes read once).
template <size_t CSTEP, int NP, size_t AHEAD = prefetch_code_bytes<NP>(), int LOCALITY = 3>
inline void prefetch_codes(const char* bk, const char* panel_end, size_t pstride) {
  const char* ahead = bk + AHEAD;
  if (ahead >= panel_end) ahead += (NP - 1) * pstride;
#pragma GCC unroll 8
  for (int p = 0; p < NP; p++)
#pragma GCC unroll 4
    for (size_t l = 0; l < CSTEP; l += 64) __builtin_prefetch(ahead + p * pstride + l, 0, LOCALITY);
}

// The micro-kernel: MR rows x NP panels x NMAT matrices of W-wide accumulators over k in [k0, k1).
// c holds the accumulators between calls ([MR][NP][NMAT][W] floats): loaded when `carry`, always
// stored. `b` points at the first panel, panels are `pstride` bytes apart. K is the real reduction
// length (odd K: the kBF16 tail uses only the low half of the last pair; kBF16Dot gets padded rows).
template <class O, int MODE, int NMAT, int MR, int NP, int FETCH>
static void micro(const char* ap, int64_t K, int64_t k0, int64_t k1, const char* b, size_t pstride, float* c,
                  bool carry, const NextLines& next) {
  using V = typename O::V;
  constexpr int W = O::W;
  constexpr int es = ModeInfo<MODE>::es, kg = ModeInfo<MODE>::kg;
  constexpr size_t step = size_t(NMAT) * W * kg * es;  // bytes of one k step of one panel
  V acc[MR][NP][NMAT];
#pragma GCC unroll 16
  for (int m = 0; m < MR; m++)
#pragma GCC unroll 8
    for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
      for (int q = 0; q < NMAT; q++) acc[m][p][q] = carry ? O::load(c + ((m * NP + p) * NMAT + q) * W) : O::zero();
  const float* af = reinterpret_cast<const float*>(ap);
  NextLinesCursor<NP, FETCH == kFetchNext> pf(next);

  if constexpr (MODE == kF32 || MODE == kF16) {
    for (int64_t k = k0; k < k1; k++) {
      pf.step(pstride);
      const char* bk = b + size_t(k) * step;
      if constexpr (FETCH == kFetchAhead) prefetch_codes<step, NP>(bk, b + pstride, pstride);
      if constexpr (FETCH == kFetchNear) prefetch_codes<step, NP, kNearBytes>(bk, b + pstride, pstride);
      V w[NP][NMAT];
#pragma GCC unroll 8
      for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
        for (int q = 0; q < NMAT; q++) {
          const char* src = bk + p * pstride + q * W * es;
          if constexpr (MODE == kF32)
            w[p][q] = O::load(reinterpret_cast<const float*>(src));
          else
            w[p][q] = O::load_f16(reinterpret_cast<const uint16_t*>(src));
        }
#pragma GCC unroll 16
      for (int m = 0; m < MR; m++) {
        const V xv = O::bcast(af + k * MR + m);
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
          for (int q = 0; q < NMAT; q++) acc[m][p][q] = O::fma(xv, w[p][q], acc[m][p][q]);
      }
    }
  } else if constexpr (MODE == kBF16) {
    // One 32-bit lane per column holds (w[2i], w[2i+1]): the low half is w[2i] once shifted up.
    const int64_t kfull = imin(k1, K & ~int64_t(1));
    int64_t k = k0;
    for (; k < kfull; k += 2) {
      pf.step(pstride);
      const char* bk = b + size_t(k / 2) * step;
      if constexpr (FETCH == kFetchAhead) prefetch_codes<step, NP>(bk, b + pstride, pstride);
      if constexpr (FETCH == kFetchNear) prefetch_codes<step, NP, kNearBytes>(bk, b + pstride, pstride);
      V w[NP][NMAT];
#pragma GCC unroll 8
      for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
        for (int q = 0; q < NMAT; q++) w[p][q] = O::bf16_lo(bk + p * pstride + q * W * 4);
#pragma GCC unroll 16
      for (int m = 0; m < MR; m++) {
        const V xv = O::bcast(af + k * MR + m);
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
          for (int q = 0; q < NMAT; q++) acc[m][p][q] = O::fma(xv, w[p][q], acc[m][p][q]);
      }
#pragma GCC unroll 8
      for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
        for (int q = 0; q < NMAT; q++) w[p][q] = O::bf16_hi(bk + p * pstride + q * W * 4);
#pragma GCC unroll 16
      for (int m = 0; m < MR; m++) {
        const V xv = O::bcast(af + (k + 1) * MR + m);
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
          for (int q = 0; q < NMAT; q++) acc[m][p][q] = O::fma(xv, w[p][q], acc[m][p][q]);
      }
    }
    if (k < k1) {  // odd K: last index, the pair's high half is padding
      const char* bk = b + size_t(k / 2) * step;
      for (int p = 0; p < NP; p++)
        for (int q = 0; q < NMAT; q++) {
          const V w = O::bf16_lo(bk + p * pstride + q * W * 4);
          for (int m = 0; m < MR; m++) acc[m][p][q] = O::fma(O::bcast(af + k * MR + m), w, acc[m][p][q]);
        }
    }
  } else {  // kBF16Dot: rows are bf16, K padded to even with zeros on both sides
    for (int64_t k = k0; k < k1; k += 2) {
      pf.step(pstride);
      const char* bk = b + size_t(k / 2) * step;
      if constexpr (FETCH == kFetchAhead) prefetch_codes<step, NP>(bk, b + pstride, pstride);
      if constexpr (FETCH == kFetchNear) prefetch_codes<step, NP, kNearBytes>(bk, b + pstride, pstride);
      typename O::Raw w[NP][NMAT];
#pragma GCC unroll 8
      for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
        for (int q = 0; q < NMAT; q++) w[p][q] = O::load_raw(bk + p * pstride + q * W * 4);
#pragma GCC unroll 16
      for (int m = 0; m < MR; m++) {
        const typename O::Raw xv = O::bcast_pair(reinterpret_cast<const uint16_t*>(af + (k / 2) * MR + m));
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
          for (int q = 0; q < NMAT; q++) acc[m][p][q] = O::dot_bf16(acc[m][p][q], xv, w[p][q]);
      }
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; m++)
#pragma GCC unroll 8
    for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
      for (int q = 0; q < NMAT; q++) O::store(c + ((m * NP + p) * NMAT + q) * W, acc[m][p][q]);
}

// The quantized micro-kernel (kI8 / kI4), same tile and same c as micro(). [k0, k1) starts on a group
// boundary and ends on one or at K. Per group the codes times x are summed from zero in registers
// (ascending k), then c += sum * scale with one FMA: the float weights never exist, and the scale costs
// one FMA per group instead of one multiply per weight. c stays in memory between groups: only the
// group sums and the decoded weights need registers.
template <class O, int MODE, int NMAT, int MR, int NP, int FETCH>
static void micro_q(const char* ap, int64_t K, int64_t k0, int64_t k1, int64_t gsz, const char* b, size_t pstride,
                    float* c, bool carry, const NextLines& next) {
  using V = typename O::V;
  constexpr int W = O::W;
  constexpr size_t cstep = size_t(NMAT) * W;      // code bytes of one k step of one panel
  constexpr size_t sbytes = cstep * kScaleBytes;  // scale bytes of one group of one panel
  const size_t gbytes = sbytes + size_t(MODE == kI8 ? gsz : gsz / 2) * cstep;
  const float* af = reinterpret_cast<const float*>(ap);
  NextLinesCursor<NP, FETCH == kFetchNext> pf(next);
  if (!carry)
    for (int i = 0; i < MR * NP * NMAT; i++) O::store(c + i * W, O::zero());
  for (int64_t g0 = k0, gi = k0 / gsz; g0 < k1; g0 += gsz, gi++) {
    const int64_t gl = imin(gsz, K - g0);
    const char* bg = b + size_t(gi) * gbytes;
    const char* bc = bg + sbytes;
    V acc[MR][NP][NMAT];
#pragma GCC unroll 16
    for (int m = 0; m < MR; m++)
#pragma GCC unroll 8
      for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
        for (int q = 0; q < NMAT; q++) acc[m][p][q] = O::zero();
    if constexpr (MODE == kI8) {
      for (int64_t s = 0; s < gl; s++) {
        pf.step(pstride);
        const char* bk = bc + size_t(s) * cstep;
        V w[NP][NMAT];
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
          for (int q = 0; q < NMAT; q++) w[p][q] = O::load_i8(bk + p * pstride + q * W);
#pragma GCC unroll 16
        for (int m = 0; m < MR; m++) {
          const V xv = O::bcast(af + (g0 + s) * MR + m);
#pragma GCC unroll 8
          for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
            for (int q = 0; q < NMAT; q++) acc[m][p][q] = O::fma(xv, w[p][q], acc[m][p][q]);
        }
      }
    } else {
      const int64_t pairs = gl / 2;
      for (int64_t s = 0; s < pairs; s++) {
        pf.step(pstride);
        const char* bk = bc + size_t(s) * cstep;
        V lo[NP][NMAT], hi[NP][NMAT];
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
          for (int q = 0; q < NMAT; q++) O::load_i4(bk + p * pstride + q * W, lo[p][q], hi[p][q]);
        const int64_t k = g0 + 2 * s;
#pragma GCC unroll 16
        for (int m = 0; m < MR; m++) {
          const V x0 = O::bcast(af + k * MR + m), x1 = O::bcast(af + (k + 1) * MR + m);
#pragma GCC unroll 8
          for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
            for (int q = 0; q < NMAT; q++) acc[m][p][q] = O::fma(x1, hi[p][q], O::fma(x0, lo[p][q], acc[m][p][q]));
        }
      }
      if (gl & 1) {  // odd last group (K odd): its last byte's high nibble is padding, x has no k there
        const char* bk = bc + size_t(pairs) * cstep;
        const int64_t k = g0 + gl - 1;
        for (int p = 0; p < NP; p++)
          for (int q = 0; q < NMAT; q++) {
            V lo, hi;
            O::load_i4(bk + p * pstride + q * W, lo, hi);
            for (int m = 0; m < MR; m++) acc[m][p][q] = O::fma(O::bcast(af + k * MR + m), lo, acc[m][p][q]);
          }
      }
    }
#pragma GCC unroll 8
    for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
      for (int q = 0; q < NMAT; q++) {
        const V sv = O::load_f16(reinterpret_cast<const uint16_t*>(bg + p * pstride) + q * W);
#pragma GCC unroll 16
        for (int m = 0; m < MR; m++) {
          float* cm = c + ((m * NP + p) * NMAT + q) * W;
          O::store(cm, O::fma(acc[m][p][q], sv, O::load(cm)));
        }
      }
  }
}

// The integer dot-product micro-kernels. The activations were quantized per row and group (pack_act:
// codes, scale sx, and for kI4Dot corr = 8 * sum of the codes).
//   kI4Dot: int8 activations . unsigned nibbles u = code + 8 (quads order, packing.h): one vpdpbusd (or
//           vpmaddubsw + vpmaddwd without VNNI) adds four u * x products per 32-bit lane;
//           sum(code * x) = sum(u * x) - corr.
//   kI8Vnni: int8 activations . unsigned bytes u = code + 128 (Vnni order): one vpdpbusd adds four
//           u * x products per lane (exact: no pair sum saturates, unlike vpmaddubsw's); sum(code * x)
//           = sum(u * x) - corr.
//   kI8Dot: int16 activations . int8 codes sign-extended to words (pairs order): one vpmaddwd adds two
//           code * x products per lane.
// A group's sum is an exact int32 (|.| < 2^31 for groups of at most 128), then c += (float(sum) * sx) *
// scale: one conversion and two roundings per group, whatever the tile, so batch invariance holds.
// Registers: the MR x NP x NMAT accumulators, the codes of one step unpacked for every panel, and one
// row's broadcasts (Shapes in simd_gemm.h sizes the tile for that on 32 registers). A step's codes are
// unpacked once, then each row's broadcast, loaded into a register once (O::bcast_x4), meets every
// panel: no broadcast stays live across rows, so the compiler has nothing to hoist and the
// accumulators stay in registers. Where that does not fit (int4 on 16 registers) the codes are
// unpacked one panel at a time. kI4Dot and kI8Vnni accumulators start at -corr, which takes the
// codes' offset out of the sum for free.
// Never inlined: inlined into the sweep, GCC 12 allocated its registers together with the caller's
// loop state and spilled codes and the nibble mask inside the k loop. Kept apart it ran 2-5% faster
// on every quantized case and 7-9% with AVX2 (`bench/ab-builds.js`, Zen 5, 2 cores).
template <class O, int MODE, int NMAT, int MR, int NP, int FETCH>
__attribute__((noinline)) static void micro_qdot(const char* ap, int64_t K, int64_t k0, int64_t k1, int64_t gsz,
                                                 const char* b, size_t pstride, float* c, bool carry,
                                                 const NextLines& next) {
  using V = typename O::V;
  using I = typename O::Raw;
  constexpr int W = O::W;
  constexpr bool kOffset = MODE != kI8Dot;                               // unsigned codes, accumulators at -corr
  constexpr int kstep = MODE == kI4Dot ? 8 : MODE == kI8Vnni ? 4 : 2;    // k per step
  constexpr int words = MODE == kI4Dot ? 2 : 1;                          // activation words per step and row
  constexpr size_t cstep = size_t(NMAT) * W * (MODE == kI8Dot ? 2 : 4);  // code bytes of one step of one panel
  constexpr size_t sbytes = size_t(NMAT) * W * kScaleBytes;              // scale bytes of one group of one panel
  const size_t gbytes = sbytes + size_t(gsz / kstep) * cstep;
  const int64_t Kp = (K + kstep - 1) / kstep * kstep, ng = (K + gsz - 1) / gsz;
  const int32_t* aq = reinterpret_cast<const int32_t*>(ap);  // [Kp / kstep * words][MR] words of codes
  const float* asx = reinterpret_cast<const float*>(aq + Kp / kstep * words * MR);  // [ng][MR]
  const int32_t* astart = reinterpret_cast<const int32_t*>(asx + ng * MR);          // -corr [ng][MR], kOffset
  // int4 on one panel (the decode tile of short panels, and leftover panels): the high nibbles' products
  // go to accumulators of their own, so a step's two dot products do not wait on each other (the group's
  // sum is an exact integer, whatever the order). Only where the extra accumulators fit beside the codes,
  // and only for fewer than 8 accumulators (vpdpbusd's latency times its rate): the prefill tile's 12
  // (w13, 6 rows) already hide it, and split they left c no registers, so every group loaded and stored
  // it: one Mixtral expert at 64 rows ran 10% faster unsplit (`bench/ab-builds.js expert-64tok-int4`).
  constexpr bool kSplit =
      MODE == kI4Dot && NP == 1 && MR * NMAT < 8 && 2 * MR * NMAT + 2 * NMAT + 2 + O::kDotTemps <= O::kRegs;
  constexpr int kAccRegs = MR * NP * NMAT * (kSplit ? 2 : 1);
  // int4: whether the whole tile's codes fit beside the accumulators and two broadcasts.
  constexpr bool kAllCodes = kAccRegs + 2 * NP * NMAT + 2 + O::kDotTemps <= O::kRegs;
  // Whether the tile fetches ahead in its own panels (prefetch_codes), and how far: the int4 tiles of 5
  // or more rows by the set's own distance, where it has one.
  constexpr bool kFetchOwn = (MODE == kI4Dot && kAllCodes) || (MODE == kI8Vnni && FETCH != kFetchNext);
  // The VNNI set's one-row tile on panels far apart (sweep_streams, FETCH kFetchNear) asks for 1 KiB
  // ahead (OpsAvx512Bf16::kOneRowAhead): against 2 KiB, one stream's step (a trial build's run-time
  // switch through `bench/ab-model.js`, Zen 5, 2 cores) Qwen3 int8 0.918-1.006 over four runs, Mixtral
  // int8 0.918, Qwen3 int4 0.962-0.998 over four, Mixtral int4 0.981-0.982; to every level instead,
  // Qwen3 int4 1.002, int8 0.916-0.996. The avx512 set lost with it (Qwen3 int4 1.040, int8 1.013), avx2
  // read 1.00: both keep 2 KiB.
  constexpr size_t kAhead = FETCH == kFetchNear && O::kOneRowAhead           ? O::kOneRowAhead
                            : MODE == kI4Dot && MR >= 5 && O::kManyRowsAhead ? O::kManyRowsAhead
                                                                             : prefetch_code_bytes<NP>();
  // The decode tiles (up to 5 rows) read their codes once: fetched non-temporally, they leave the caches
  // to what the step reads again (activations, the KV cache, the JavaScript between steps). Alone, a
  // kernel gains nothing by it (qwen3-decode-int4 0.97-1.05, `bench/ab-builds.js`); a decode step of one
  // Qwen3 stream ran 2-4% faster (`bench/ab-model.js qwen3moe int4 build`, five runs, both orders each:
  // 0.956-0.983; int8 0.990), Mixtral's 1.003 and at 16 streams 0.986-0.992. The prefill tiles (6 rows,
  // whose row blocks meet the codes again in L2) and the few-rows tile (6 to 8 rows: non-temporal there
  // too, 16 Mixtral streams read 1.000) keep the hint of every level; a prefill's last row block of 5 rows
  // or fewer fetches non-temporally codes its earlier blocks already brought into L2.
  constexpr int kLocality = MR <= 5 ? 0 : 3;
  // Whether c fits in registers too, beside the integer accumulators and the codes: then it is loaded
  // once per call instead of loaded and stored once per group (the same FMAs in the same order).
  constexpr int kCodeRegs = (MODE == kI4Dot ? 2 : 1) * NP * NMAT;
  constexpr bool kRegC = MR * NP * NMAT + kAccRegs + kCodeRegs + 2 + O::kDotTemps <= O::kRegs;
  NextLinesCursor<NP, FETCH == kFetchNext> pf(next);
  V cr[kRegC ? MR : 1][NP][NMAT];
  if constexpr (kRegC) {
#pragma GCC unroll 16
    for (int m = 0; m < MR; m++)
#pragma GCC unroll 8
      for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
        for (int q = 0; q < NMAT; q++) cr[m][p][q] = carry ? O::load(c + ((m * NP + p) * NMAT + q) * W) : O::zero();
  } else if (!carry) {
    for (int i = 0; i < MR * NP * NMAT; i++) O::store(c + i * W, O::zero());
  }
  // gi counts the groups (k0 starts one): a 64-bit division per group cost the int4 and int8 decode
  // 4-9% of their time with the codes in L3 (`bench/ab-builds.js` l3-decode-int4, l3-decode-int8).
  for (int64_t g0 = k0, gi = k0 / gsz; g0 < k1; g0 += gsz, gi++) {
    const int64_t steps = (imin(gsz, K - g0) + kstep - 1) / kstep;
    const char* bg = b + size_t(gi) * gbytes;
    const char* bc = bg + sbytes;
    const int32_t* aqg = aq + g0 / kstep * words * MR;
    I acc[MR][NP][NMAT], acc_hi[kSplit ? MR : 1][kSplit ? NP : 1][kSplit ? NMAT : 1];
#pragma GCC unroll 16
    for (int m = 0; m < MR; m++) {
      const I init = kOffset ? O::iset1(astart[gi * MR + m]) : O::izero();
#pragma GCC unroll 8
      for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
        for (int q = 0; q < NMAT; q++) {
          acc[m][p][q] = init;
          if constexpr (kSplit) acc_hi[m][p][q] = O::izero();
        }
    }
    // The group's scales: a line of each panel that the steps' fetches (codes only) pass over, which
    // the epilogue below then waited for. `bench/ab-builds.js A B CASE 30-40 32`, both orders, Zen 5, 2
    // cores: qwen3-decode-int4 and mixtral-decode-int4 0.96-0.97, mixtral-16tok-int4 0.97,
    // expert-5tok-int4 0.93-0.95, qwen3-decode-int8 0.96-0.99; a decode step (`bench/ab-model.js MODEL int4
    // build`, both orders): one Qwen3 stream 0.956, 16 Mixtral streams 0.976.
    if constexpr (kFetchOwn) prefetch_codes<sbytes, NP, kAhead, kLocality>(bg, b + pstride, pstride);
    for (int64_t s = 0; s < steps; s++) {
      pf.step(pstride);
      const char* bk = bc + size_t(s) * cstep;
      const int32_t* x0 = aqg + s * words * MR;
      if constexpr (MODE == kI4Dot && kAllCodes) {  // k = 8s .. 8s+3 of every row (lo), then 8s+4 .. 8s+7 (hi)
        prefetch_codes<cstep, NP, kAhead, kLocality>(bk, b + pstride, pstride);
        I lo[NP][NMAT], hi[NP][NMAT];
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
          for (int q = 0; q < NMAT; q++) O::load_u4(bk + p * pstride + q * W * 4, lo[p][q], hi[p][q]);
#pragma GCC unroll 16
        for (int m = 0; m < MR; m++) {
          const I xlo = O::bcast_x4(x0 + m);
#pragma GCC unroll 8
          for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
            for (int q = 0; q < NMAT; q++) acc[m][p][q] = O::dot_u8s8(acc[m][p][q], lo[p][q], xlo);
          const I xhi = O::bcast_x4(x0 + MR + m);
#pragma GCC unroll 8
          for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
            for (int q = 0; q < NMAT; q++) {
              if constexpr (kSplit)
                acc_hi[m][p][q] = O::dot_u8s8(acc_hi[m][p][q], hi[p][q], xhi);
              else
                acc[m][p][q] = O::dot_u8s8(acc[m][p][q], hi[p][q], xhi);
            }
        }
      } else if constexpr (MODE == kI8Vnni) {  // k = 4s .. 4s+3: every panel's codes, then each row's broadcast
        if constexpr (kFetchOwn) prefetch_codes<cstep, NP, kAhead, kLocality>(bk, b + pstride, pstride);
        I u[NP][NMAT];
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
          for (int q = 0; q < NMAT; q++) u[p][q] = O::load_u8(bk + p * pstride + q * W * 4);
#pragma GCC unroll 16
        for (int m = 0; m < MR; m++) {
          const I xv = O::bcast_x4(x0 + m);
#pragma GCC unroll 8
          for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
            for (int q = 0; q < NMAT; q++) acc[m][p][q] = O::dot_u8s8(acc[m][p][q], u[p][q], xv);
        }
      } else if constexpr (MODE == kI4Dot) {  // 16 registers: one panel's codes at a time
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
          for (int q = 0; q < NMAT; q++) {
            I lo, hi;
            O::load_u4(bk + p * pstride + q * W * 4, lo, hi);
#pragma GCC unroll 16
            for (int m = 0; m < MR; m++) {
              if constexpr (kSplit) {
                acc[m][p][q] = O::dot_u8s8(acc[m][p][q], lo, O::bcast_x4(x0 + m));
                acc_hi[m][p][q] = O::dot_u8s8(acc_hi[m][p][q], hi, O::bcast_x4(x0 + MR + m));
              } else {
                acc[m][p][q] =
                    O::dot_u8s8(O::dot_u8s8(acc[m][p][q], lo, O::bcast_x4(x0 + m)), hi, O::bcast_x4(x0 + MR + m));
              }
            }
          }
      } else {  // k = 2s, 2s+1: every panel's words first, then one broadcast per row
        I w[NP][NMAT];
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
          for (int q = 0; q < NMAT; q++) w[p][q] = O::load_s8_pairs(bk + p * pstride + q * W * 2);
#pragma GCC unroll 16
        for (int m = 0; m < MR; m++) {
          const I xv = O::bcast_word_pair(x0 + m);
#pragma GCC unroll 8
          for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
            for (int q = 0; q < NMAT; q++) acc[m][p][q] = O::dot_s16(acc[m][p][q], w[p][q], xv);
        }
      }
    }
    // Where c stays in memory, the VNNI set reads it through a pointer the compiler cannot follow from
    // one group to the next: otherwise GCC 12 kept part of c in registers across groups, spilled them to
    // the stack and stored c too, three stores where one will do, and a 512-bit store takes an issue
    // slot of the dot products on Zen 5. Codes in L3 (`bench/ab-builds.js`, both orders):
    // l3-expert-5tok-int4 0.89-0.92, l3-expert-8tok-int4 0.92-1.01; from memory the decode cases read
    // 0.99-1.05. A decode step (`bench/ab-model.js MODEL QUANT build OLD NEW`, both orders):
    // 16 Mixtral int4 streams 0.970 (MoE part 0.959), one Qwen3 int4 stream 0.967, int8 0.988, one
    // Mixtral stream 1.005. The avx512 and avx2 sets ran expert-5tok-int4 3-5% slower with it.
    float* cg = c;
    if constexpr (!kRegC && O::kDotTemps <= 1) asm("" : "+r"(cg));
#pragma GCC unroll 8
    for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
      for (int q = 0; q < NMAT; q++) {
        const V sv = O::load_f16(reinterpret_cast<const uint16_t*>(bg + p * pstride) + q * W);
#pragma GCC unroll 16
        for (int m = 0; m < MR; m++) {
          if constexpr (kSplit) acc[m][p][q] = O::iadd(acc[m][p][q], acc_hi[m][p][q]);
          const V scaled = O::mul(O::to_float(acc[m][p][q]), O::set1(asx[gi * MR + m]));
          if constexpr (kRegC) {
            cr[m][p][q] = O::fma(scaled, sv, cr[m][p][q]);
          } else {
            float* cm = cg + ((m * NP + p) * NMAT + q) * W;
            O::store(cm, O::fma(scaled, sv, O::load(cm)));
          }
        }
      }
  }
  if constexpr (kRegC) {
#pragma GCC unroll 16
    for (int m = 0; m < MR; m++)
#pragma GCC unroll 8
      for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
        for (int q = 0; q < NMAT; q++) O::store(c + ((m * NP + p) * NMAT + q) * W, cr[m][p][q]);
  }
}

// micro<..., mr, NP> (or micro_q) for a run-time mr in [1, MR].
template <class O, int MODE, int NMAT, int MR, int NP, int FETCH>
static void micro_rows(int mr, const char* a, int64_t K, int64_t k0, int64_t k1, int64_t gsz, const char* b,
                       size_t pstride, float* c, bool carry, const NextLines& next) {
  if constexpr (MR > 1) {
    if (mr < MR) return micro_rows<O, MODE, NMAT, MR - 1, NP, FETCH>(mr, a, K, k0, k1, gsz, b, pstride, c, carry, next);
  }
  if constexpr (is_dot(MODE))
    micro_qdot<O, MODE, NMAT, MR, NP, FETCH>(a, K, k0, k1, gsz, b, pstride, c, carry, next);
  else if constexpr (is_quant(MODE))
    micro_q<O, MODE, NMAT, MR, NP, FETCH>(a, K, k0, k1, gsz, b, pstride, c, carry, next);
  else
    micro<O, MODE, NMAT, MR, NP, FETCH>(a, K, k0, k1, b, pstride, c, carry, next);
}

}  // namespace
}  // namespace simd
}  // namespace fmoe
