// One body for every SIMD kernel set. Each ISA translation unit defines a small `Ops` struct (vector
// type, width, load / broadcast / fma / convert, compiled with that unit's flags) and instantiates
// `Kernels<Ops, ...>`; nothing here is compiled at the baseline instruction set.
//
// Both expert GEMMs are C[M, N] = A[M, K] . B[N, K]^T with B packed in panels of W = Ops::W columns
// (packing.h): SwiGLU reads w1 and w3 of a panel in one pass (NMAT = 2) and fuses silu(g) * u in
// registers; down reads one matrix (NMAT = 1).
//
// Determinism: every output element is one accumulator, zeroed once, that takes the products in
// ascending k order (for vdpbf16ps, pairs (2i, 2i+1) in ascending i). The micro-tile shapes (rows MR,
// panels NP) only change which elements are computed side by side, never the order of any element's
// chain; a cache block over k stores the accumulators and reloads them, which is exact. So a token's
// output bits do not depend on M, on its neighbours in the tile, or on the column split.
//
// Everything here sits in an anonymous namespace and the Ops structs do too: a function instantiated in
// an ISA unit must never be merged by the linker with a same-named copy built for another ISA (an
// AVX-512 copy of a shared inline function would crash a CPU without it). For the same reason this code
// avoids std:: containers and algorithms, whose out-of-line instantiations are shared symbols.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "../core/kernels.h"
#include "packing.h"

namespace fmoe {
namespace simd {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// A per-thread scratch buffer that grows and is reused across calls.
struct Scratch {
  void* ptr = nullptr;
  size_t bytes = 0;
  ~Scratch() { std::free(ptr); }
  void* get(size_t want) {
    if (want > bytes) {
      std::free(ptr);
      bytes = (want + 4095) / 4096 * 4096;
      ptr = std::aligned_alloc(64, bytes);
      if (!ptr) {
        bytes = 0;
        throw std::bad_alloc();
      }
    }
    return ptr;
  }
};

// How the weights of a dtype are read.
enum Mode {
  kF32 = 0,      // float32, one k per step
  kF16 = 1,      // IEEE half, converted on load
  kBF16 = 2,     // bf16 k-pairs, split into two float vectors by shift / mask
  kBF16Dot = 3,  // bf16 k-pairs fed to a bf16 dot-product instruction; activations rounded to bf16
  kI8 = 4,       // int8 codes + per-group scales (quant.h), sign-extended and converted (NEON)
  kI4 = 5,       // int4 code pairs + per-group scales, both nibbles of a byte per load (NEON)
  kI4Dot = 6,    // int4 code quads . int8 activations through an unsigned x signed byte dot product
  kI8Dot = 7,    // int8 code pairs . int16 activations through a signed word dot product
};

constexpr bool is_quant(int mode) { return mode >= kI8; }
constexpr bool is_dot(int mode) { return mode == kI4Dot || mode == kI8Dot; }

template <int MODE> struct ModeInfo {
  static constexpr int es = MODE == kF32 ? 4 : 2;                       // bytes per stored element
  static constexpr int kg = (MODE == kBF16 || MODE == kBF16Dot) ? 2 : 1;  // k per packed step
};

// silu(g) * u, lane by lane, with a Cephes-style exp: |rel err| ~1e-7 over the clamped range.
// The clamp keeps 2^n finite; beyond it silu is 0 or g to float precision anyway. NaN in g stays NaN
// through the final product.
template <class O>
inline typename O::V silu_mul(typename O::V g, typename O::V u) {
  using V = typename O::V;
  const V x = O::max(O::min(O::neg(g), O::set1(88.0f)), O::set1(-87.0f));
  const V n = O::round(O::mul(x, O::set1(1.44269504088896341f)));
  V r = O::fma(n, O::set1(-0.693359375f), x);
  r = O::fma(n, O::set1(2.12194440e-4f), r);
  V p = O::set1(1.9875691500e-4f);
  p = O::fma(p, r, O::set1(1.3981999507e-3f));
  p = O::fma(p, r, O::set1(8.3334519073e-3f));
  p = O::fma(p, r, O::set1(4.1665795894e-2f));
  p = O::fma(p, r, O::set1(1.6666665459e-1f));
  p = O::fma(p, r, O::set1(5.0000001201e-1f));
  p = O::fma(p, O::mul(r, r), O::add(r, O::set1(1.0f)));
  const V e = O::pow2(p, n);  // exp(-g)
  return O::mul(O::div(g, O::add(O::set1(1.0f), e)), u);
}

// Activations are packed per row block before the GEMM: block m0 (rows m0 .. m0+mr) holds, for every k
// step, its mr values side by side ([k][mr], 4 bytes each: a float, or for kBF16Dot a bf16 pair), so
// the micro-kernel broadcasts from one sequential stream through one pointer.
// The micro-kernel: MR rows x NP panels x NMAT matrices of W-wide accumulators over k in [k0, k1).
// c holds the accumulators between calls ([MR][NP][NMAT][W] floats): loaded when `carry`, always
// stored. `b` points at the first panel, panels are `pstride` bytes apart. K is the real reduction
// length (odd K: the kBF16 tail uses only the low half of the last pair; kBF16Dot gets padded rows).
template <class O, int MODE, int NMAT, int MR, int NP, bool PF>
static void micro(const char* ap, int64_t K, int64_t k0, int64_t k1, const char* b, size_t pstride, float* c,
                  bool carry) {
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

  if constexpr (MODE == kF32 || MODE == kF16) {
    for (int64_t k = k0; k < k1; k++) {
      const char* bk = b + size_t(k) * step;
      if (PF) {
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++) O::prefetch(bk + p * pstride + 16 * step);
      }
      V w[NP][NMAT];
#pragma GCC unroll 8
      for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
        for (int q = 0; q < NMAT; q++) {
          const char* src = bk + p * pstride + q * W * es;
          if constexpr (MODE == kF32) w[p][q] = O::load(reinterpret_cast<const float*>(src));
          else w[p][q] = O::load_f16(reinterpret_cast<const uint16_t*>(src));
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
      const char* bk = b + size_t(k / 2) * step;
      if (PF) {
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++) O::prefetch(bk + p * pstride + 16 * step);
      }
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
          for (int m = 0; m < MR; m++)
            acc[m][p][q] = O::fma(O::bcast(af + k * MR + m), w, acc[m][p][q]);
        }
    }
  } else {  // kBF16Dot: rows are bf16, K padded to even with zeros on both sides
    for (int64_t k = k0; k < k1; k += 2) {
      const char* bk = b + size_t(k / 2) * step;
      if (PF) {
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++) O::prefetch(bk + p * pstride + 16 * step);
      }
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
template <class O, int MODE, int NMAT, int MR, int NP>
static void micro_q(const char* ap, int64_t K, int64_t k0, int64_t k1, int64_t gsz, const char* b, size_t pstride,
                    float* c, bool carry) {
  using V = typename O::V;
  constexpr int W = O::W;
  constexpr size_t cstep = size_t(NMAT) * W;  // code bytes of one k step of one panel
  constexpr size_t sbytes = cstep * 4;        // scale bytes of one group of one panel
  const size_t gbytes = sbytes + size_t(MODE == kI8 ? gsz : gsz / 2) * cstep;
  const float* af = reinterpret_cast<const float*>(ap);
  if (!carry)
    for (int i = 0; i < MR * NP * NMAT; i++) O::store(c + i * W, O::zero());
  for (int64_t g0 = k0; g0 < k1; g0 += gsz) {
    const int64_t gl = imin(gsz, K - g0);
    const char* bg = b + size_t(g0 / gsz) * gbytes;
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
        const V sv = O::load(reinterpret_cast<const float*>(bg + p * pstride) + q * W);
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
//   kI8Dot: int16 activations . int8 codes sign-extended to words (pairs order): one vpmaddwd adds two
//           code * x products per lane.
// A group's sum is an exact int32 (|.| < 2^31 for groups of at most 128), then c += (float(sum) * sx) *
// scale: one conversion and two roundings per group, whatever the tile, so batch invariance holds.
template <class O, int MODE, int NMAT, int MR, int NP>
static void micro_qdot(const char* ap, int64_t K, int64_t k0, int64_t k1, int64_t gsz, const char* b, size_t pstride,
                       float* c, bool carry) {
  using V = typename O::V;
  using I = typename O::Raw;
  constexpr int W = O::W;
  constexpr int kstep = MODE == kI4Dot ? 8 : 2;                   // k per step
  constexpr int words = MODE == kI4Dot ? 2 : 1;                    // activation words per step and row
  constexpr size_t cstep = size_t(NMAT) * W * (MODE == kI4Dot ? 4 : 2);  // code bytes of one step of one panel
  constexpr size_t sbytes = size_t(NMAT) * W * 4;                  // scale bytes of one group of one panel
  const size_t gbytes = sbytes + size_t(gsz / kstep) * cstep;
  const int64_t Kp = (K + kstep - 1) / kstep * kstep, ng = (K + gsz - 1) / gsz;
  const int32_t* aq = reinterpret_cast<const int32_t*>(ap);  // [Kp / kstep * words][MR] words of codes
  const float* asx = reinterpret_cast<const float*>(aq + Kp / kstep * words * MR);  // [ng][MR]
  const int32_t* acorr = reinterpret_cast<const int32_t*>(asx + ng * MR);         // [ng][MR], kI4Dot
  if (!carry)
    for (int i = 0; i < MR * NP * NMAT; i++) O::store(c + i * W, O::zero());
  for (int64_t g0 = k0; g0 < k1; g0 += gsz) {
    const int64_t gi = g0 / gsz, steps = (imin(gsz, K - g0) + kstep - 1) / kstep;
    const char* bg = b + size_t(gi) * gbytes;
    const char* bc = bg + sbytes;
    const int32_t* aqg = aq + g0 / kstep * words * MR;
    I acc[MR][NP][NMAT];
#pragma GCC unroll 16
    for (int m = 0; m < MR; m++)
#pragma GCC unroll 8
      for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
        for (int q = 0; q < NMAT; q++) acc[m][p][q] = O::izero();
    for (int64_t s = 0; s < steps; s++) {
      const char* bk = bc + size_t(s) * cstep;
      const int32_t* x0 = aqg + s * words * MR;
      if constexpr (MODE == kI4Dot) {  // k = 8s .. 8s+3 of every row, then 8s+4 .. 8s+7
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
          for (int q = 0; q < NMAT; q++) {
            I lo, hi;  // two registers per panel: unpacked one panel at a time
            O::load_u4(bk + p * pstride + q * W * 4, lo, hi);
#pragma GCC unroll 16
            for (int m = 0; m < MR; m++)
              acc[m][p][q] = O::dot_u8s8(O::dot_u8s8(acc[m][p][q], lo, x0 + m), hi, x0 + MR + m);
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
#pragma GCC unroll 8
    for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
      for (int q = 0; q < NMAT; q++) {
        const V sv = O::load(reinterpret_cast<const float*>(bg + p * pstride) + q * W);
#pragma GCC unroll 16
        for (int m = 0; m < MR; m++) {
          float* cm = c + ((m * NP + p) * NMAT + q) * W;
          const V sum = O::sub_to_float(acc[m][p][q], MODE == kI4Dot ? acorr[gi * MR + m] : 0);
          O::store(cm, O::fma(O::mul(sum, O::set1(asx[gi * MR + m])), sv, O::load(cm)));
        }
      }
  }
}

// Bytes per row of integer-dot activations (pack_act): the codes (K padded to a whole step), then per
// group a scale (and for kI4Dot a correction).
template <int MODE>
size_t dot_act_row_bytes(int64_t K, int64_t gsz) {
  const int64_t ng = (K + gsz - 1) / gsz;
  if constexpr (MODE == kI4Dot) return size_t((K + 7) / 8 * 2 + 2 * ng) * 4;
  else return size_t((K + 1) / 2 + ng) * 4;
}

// micro<..., mr, NP> (or micro_q) for a run-time mr in [1, MR].
template <class O, int MODE, int NMAT, int MR, int NP, bool PF>
static void micro_rows(int mr, const char* a, int64_t K, int64_t k0, int64_t k1, int64_t gsz, const char* b,
                       size_t pstride, float* c, bool carry) {
  if constexpr (MR > 1) {
    if (mr < MR) return micro_rows<O, MODE, NMAT, MR - 1, NP, PF>(mr, a, K, k0, k1, gsz, b, pstride, c, carry);
  }
  if constexpr (is_dot(MODE)) micro_qdot<O, MODE, NMAT, MR, NP>(a, K, k0, k1, gsz, b, pstride, c, carry);
  else if constexpr (is_quant(MODE)) micro_q<O, MODE, NMAT, MR, NP>(a, K, k0, k1, gsz, b, pstride, c, carry);
  else micro<O, MODE, NMAT, MR, NP, PF>(a, K, k0, k1, b, pstride, c, carry);
}

// Tile shapes. Accumulators: O::kAcc vector registers (the rest hold weights and a broadcast).
//   prefill: many rows share each weight load; NP panels x MR rows, k blocked by kc so the panels'
//            block stays in L2 while every row block of the call passes over it.
//   decode:  few rows; more panels side by side so enough independent chains hide the FMA latency
//            while the weights stream from memory once, with software prefetch ahead of the loads.
template <class O, int NMAT> struct Shapes {
  static constexpr int kNpPrefill = 2;
  static constexpr int kMrPrefill = O::kAcc / (NMAT * kNpPrefill);
  static constexpr int kNpDecode = 8 / NMAT;
  static constexpr int kMrDecode = O::kAcc / 8 > 0 ? O::kAcc / 8 : 1;
};

// At most this many rows per expert take the decode shape, chosen by measurement (`bench.js --switch`,
// one Mixtral expert, 2 Zen 4 cores): decode wins for M <= 3 (bf16 M=3: 10.5 vs 11.0 ms; f32 M=1: 21.2
// vs 23.7 ms), the prefill shape from M = 4 (bf16 12.6 vs 11.1 ms; f32 25.5 vs 23.0 ms).
// FUSED_MOE_DECODE_ROWS overrides it, for tuning on other machines.
constexpr int kDecodeRows = 3;
inline int decode_rows_limit() {
  static const int limit = [] {
    const char* env = std::getenv("FUSED_MOE_DECODE_ROWS");
    const int v = env ? std::atoi(env) : -1;
    return v >= 0 && v <= 4096 ? v : kDecodeRows;
  }();
  return limit;
}

template <class O, int MODE, int NMAT, int MR, int NP, bool PF, class Epi>
static void sweep(const char* a, int64_t M, int64_t K, int64_t kc, int64_t gsz, const char* b, size_t pstride,
                  int64_t p_begin, int64_t p_end, Epi&& epi) {
  constexpr int W = O::W;
  constexpr int kg = ModeInfo<MODE>::kg;
  const int64_t Kr = MODE == kBF16Dot ? (K + 1) / 2 * 2 : K;  // k range the loop covers
  size_t arow = size_t(MODE == kBF16Dot ? Kr / 2 : K) * 4;  // packed activation bytes per row
  if constexpr (is_dot(MODE)) arow = dot_act_row_bytes<MODE>(K, gsz);
  kc = imax(kg, kc / kg * kg);
  // Panel groups per column block: the block's accumulators (M rows) stay in L2 across its k blocks,
  // so each k slice of the activations is read from L2 by every group of the block, not from L3.
  const int64_t mpad = (M + MR - 1) / MR * MR;
  const int64_t gsize = mpad * NP * NMAT * W;  // floats of one group's accumulators
  const int64_t nb = kc >= Kr ? 1 : imax(1, int64_t(128 * 1024 / sizeof(float)) / gsize);
  static thread_local Scratch cbuf;
  float* c = static_cast<float*>(cbuf.get(size_t(nb * gsize) * sizeof(float)));
  auto run = [&](auto np_tag, int64_t p0, int64_t ng) {  // ng groups of np panels from panel p0
    constexpr int np = decltype(np_tag)::value;
    for (int64_t k0 = 0; k0 < Kr; k0 += kc) {
      const int64_t k1 = imin(Kr, k0 + kc);
      for (int64_t g = 0; g < ng; g++) {
        const int64_t pg = p0 + g * np;
        const char* bp = b + size_t(pg) * pstride;
        float* cg = c + g * gsize;
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
          const int mr = int(imin(MR, M - m0));
          float* cm = cg + m0 * np * NMAT * W;
          micro_rows<O, MODE, NMAT, MR, np, PF>(mr, a + size_t(m0) * arow, K, k0, k1, gsz, bp, pstride, cm, k0 > 0);
          if (k1 == Kr) epi(cm, m0, mr, pg, np);
        }
      }
    }
  };
  // Blocks of up to nb groups of NP panels, then the leftover panels one by one.
  int64_t p = p_begin;
  for (; p + NP <= p_end; p += nb * NP) {
    const int64_t ng = imin(nb, (p_end - p) / NP);
    run(std::integral_constant<int, NP>(), p, ng);
    if (ng < nb) {
      p += ng * NP;
      break;
    }
  }
  for (; p < p_end; p += nb) run(std::integral_constant<int, 1>(), p, imin(nb, p_end - p));
}

// Packs M rows of K floats (row stride ldx) into row blocks of MR (see above), in a per-thread buffer.
// kBF16Dot rounds to bf16 first and pads K to even with zeros. kI4Dot / kI8Dot quantize each row's groups
// of gsz to int8 / int16 exactly as quant.h quantizes weights (qmax 127 / 32767) and lay out, per row
// block of mr rows: the codes as [Kp / 4 or Kp / 2][mr] 32-bit words (four int8 or two int16; K padded
// with zeros to a whole step, 8 or 2), the scales [ng][mr], and for kI4Dot corr = 8 * sum(codes) per
// group [ng][mr], which removes the nibbles' offset of 8.
template <class O, int MODE>
static const char* pack_act_into(Scratch& sbuf, const float* x, int64_t ldx, int64_t M, int64_t K, int MR,
                                 int64_t gsz) {
  static thread_local Scratch rbuf;
  if constexpr (is_dot(MODE)) {
    using Code = std::conditional_t<MODE == kI4Dot, int8_t, int16_t>;
    constexpr int64_t kstep = MODE == kI4Dot ? 8 : 2, per_word = 4 / sizeof(Code);
    const int64_t Kp = (K + kstep - 1) / kstep * kstep, ng = (K + gsz - 1) / gsz;
    const size_t arow = dot_act_row_bytes<MODE>(K, gsz);
    char* buf = static_cast<char*>(sbuf.get(size_t(M) * arow));
    Code* row = static_cast<Code*>(rbuf.get(size_t(Kp) * sizeof(Code)));
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int64_t mr = imin(MR, M - m0);
      int32_t* codes = reinterpret_cast<int32_t*>(buf + size_t(m0) * arow);
      float* sx = reinterpret_cast<float*>(codes + Kp / per_word * mr);
      int32_t* corr = reinterpret_cast<int32_t*>(sx + ng * mr);  // kI4Dot only
      for (int64_t m = 0; m < mr; m++) {
        const float* src = x + (m0 + m) * ldx;
        std::memset(row + K, 0, size_t(Kp - K) * sizeof(Code));
        for (int64_t gi = 0; gi < ng; gi++) {
          const int64_t k0 = gi * gsz, n = imin(gsz, K - k0);
          if constexpr (MODE == kI4Dot) {
            int32_t sum = 0;
            sx[gi * mr + m] = O::quantize_i8(src + k0, n, row + k0, &sum);
            corr[gi * mr + m] = 8 * sum;
          } else {
            sx[gi * mr + m] = O::quantize_i16(src + k0, n, row + k0);
          }
        }
        for (int64_t i = 0; i < Kp / per_word; i++) std::memcpy(codes + i * mr + m, row + per_word * i, 4);
      }
    }
    return buf;
  } else if constexpr (MODE != kBF16Dot) {
    float* buf = static_cast<float*>(sbuf.get(size_t(M * K) * sizeof(float)));
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int64_t mr = imin(MR, M - m0);
      float* dst = buf + m0 * K;
      for (int64_t m = 0; m < mr; m++) {
        const float* src = x + (m0 + m) * ldx;
        for (int64_t k = 0; k < K; k++) dst[k * mr + m] = src[k];
      }
    }
    return reinterpret_cast<const char*>(buf);
  } else {
    const int64_t Kh = (K + 1) / 2;  // pairs per row
    uint32_t* buf = static_cast<uint32_t*>(sbuf.get(size_t(M * Kh) * sizeof(uint32_t)));
    uint16_t* row = static_cast<uint16_t*>(rbuf.get(size_t(2 * Kh) * sizeof(uint16_t)));
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      const int64_t mr = imin(MR, M - m0);
      uint32_t* dst = buf + m0 * Kh;
      for (int64_t m = 0; m < mr; m++) {
        O::round_bf16(x + (m0 + m) * ldx, K, row);
        row[2 * Kh - 1] = K & 1 ? 0 : row[2 * Kh - 1];
        for (int64_t i = 0; i < Kh; i++) dst[i * mr + m] = uint32_t(row[2 * i]) | uint32_t(row[2 * i + 1]) << 16;
      }
    }
    return reinterpret_cast<const char*>(buf);
  }
}

// pack_act_into through the per-thread cache (kernels.h): the column tiles of one expert in one phase
// pack its rows once.
template <class O, int MODE>
static const char* pack_act(const float* x, int64_t ldx, int64_t M, int64_t K, int MR, int64_t gsz) {
  struct Key {
    const float* x;
    int64_t ldx, M, K, MR, gsz;
    uint64_t epoch;
  };
  static thread_local Scratch sbuf;
  static thread_local Key last{};
  const Key key{x, ldx, M, K, MR, gsz, activation_epoch()};
  if (key.epoch != 0 && std::memcmp(&key, &last, sizeof key) == 0) return static_cast<const char*>(sbuf.ptr);
  last = Key{};  // packing may throw (allocation): never leave a key without its data
  const char* a = pack_act_into<O, MODE>(sbuf, x, ldx, M, K, MR, gsz);
  last = key;
  return a;
}

// K for the k blocks of the prefill shape: the NP panels' slice of k (192 KiB) stays in L2 across row
// blocks. On 2 Zen 4 cores this ran the Mixtral float32 prefill a few percent faster than 64 KiB blocks
// and no slower than 384 KiB; `node bench/bench.js --cases mixtral-f32` repeats the comparison.
template <int MODE, int NMAT, int NP, int W>
constexpr int64_t prefill_kc() {
  return int64_t(192 * 1024) / (int64_t(NP) * NMAT * W * ModeInfo<MODE>::es) / 64 * 64;
}

// The quantized modes: a multiple of the group size, so k blocks never split a group.
template <int MODE, int NMAT, int NP, int W>
int64_t prefill_kc_quant(int64_t gsz) {
  const int64_t per_k = int64_t(NP) * NMAT * W;  // code bytes per k (int4: half that)
  const int64_t kc = int64_t(64 * 1024) * (MODE == kI8 || MODE == kI8Dot ? 1 : 2) / per_k / gsz * gsz;
  return kc > gsz ? kc : gsz;
}

// Bytes of one packed panel of NMAT matrices over a reduction of K.
template <int MODE, int NMAT>
size_t panel_bytes(int64_t K, int64_t gsz, int W) {
  if constexpr (is_quant(MODE)) {
    return quant_panel_bytes(NMAT, K, W, MODE == kI8 || MODE == kI8Dot ? Quant::Int8 : Quant::Int4, gsz,
                             is_dot(MODE) ? CodeOrder::Dot : CodeOrder::Plain);
  } else {
    constexpr int kg = ModeInfo<MODE>::kg;
    return size_t((K + kg - 1) / kg) * NMAT * W * kg * ModeInfo<MODE>::es;
  }
}

template <class O, int MODE, int NMAT, class Epi>
static void gemm(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t gsz, const char* b, size_t pstride,
                 int64_t p_begin, int64_t p_end, Epi&& epi) {
  using S = Shapes<O, NMAT>;
  const bool decode = M <= decode_rows_limit();
  const char* a = pack_act<O, MODE>(x, ldx, M, K, decode ? S::kMrDecode : S::kMrPrefill, gsz);
  if (decode) {
    sweep<O, MODE, NMAT, S::kMrDecode, S::kNpDecode, false>(a, M, K, int64_t(1) << 40, gsz, b, pstride, p_begin,
                                                            p_end, epi);
  } else {
    int64_t kc;
    if constexpr (is_quant(MODE)) kc = prefill_kc_quant<MODE, NMAT, S::kNpPrefill, O::W>(gsz);
    else kc = prefill_kc<MODE, NMAT, S::kNpPrefill, O::W>();
    sweep<O, MODE, NMAT, S::kMrPrefill, S::kNpPrefill, false>(a, M, K, kc, gsz, b, pstride, p_begin, p_end, epi);
  }
}

// The KernelSet functions for one ISA. BF16_MODE: kBF16 (shift) or kBF16Dot; I8_MODE / I4_MODE: kI8 /
// kI4 (float activations, Plain code order) or kI8Dot / kI4Dot (integer activations, Dot order).
template <class O, int BF16_MODE, int I8_MODE = kI8, int I4_MODE = kI4>
struct Kernels {
  static_assert(is_dot(I8_MODE) == is_dot(I4_MODE), "one code order per set");
  static constexpr int W = O::W;
  static constexpr CodeOrder kOrder = is_dot(I4_MODE) ? CodeOrder::Dot : CodeOrder::Plain;

  static bool pairs(DType dt) { return dt == DType::BF16; }
  static size_t w13_bytes(int64_t H, int64_t F, DType dt) { return packed_w13_bytes(H, F, dt, W, pairs(dt)); }
  static size_t w2_bytes(int64_t H, int64_t F, DType dt) { return packed_w2_bytes(H, F, dt, W, pairs(dt)); }
  static void pack13(const void* w1, const void* w3, int64_t H, int64_t F, DType dt, void* dst) {
    pack_w13(w1, w3, H, F, dt, W, pairs(dt), dst);
  }
  static void pack2(const void* w2, int64_t H, int64_t F, DType dt, void* dst) {
    pack_w2(w2, H, F, dt, W, pairs(dt), dst);
  }

  static size_t q13_bytes(int64_t H, int64_t F, Quant q, int64_t g) { return quant_w13_bytes(H, F, W, q, g, kOrder); }
  static size_t q2_bytes(int64_t H, int64_t F, Quant q, int64_t g) { return quant_w2_bytes(H, F, W, q, g, kOrder); }
  static void qpack13(const void* w1, const void* w3, int64_t H, int64_t F, DType dt, Quant q, int64_t g, void* dst) {
    pack_w13_quant(w1, w3, H, F, dt, W, q, g, kOrder, dst);
  }
  static void qpack2(const void* w2, int64_t H, int64_t F, DType dt, Quant q, int64_t g, void* dst) {
    pack_w2_quant(w2, H, F, dt, W, q, g, kOrder, dst);
  }

  template <int MODE>
  static void swiglu_mode(const float* x, int64_t ldx, int64_t M, int64_t H, int64_t F, const void* w13,
                          int64_t f_begin, int64_t f_end, float* act, int64_t ldact, int64_t gsz = 0) {
    const size_t pstride = panel_bytes<MODE, 2>(H, gsz, W);
    auto epi = [&](const float* c, int64_t m0, int mr, int64_t p0, int np) {
      for (int m = 0; m < mr; m++)
        for (int p = 0; p < np; p++) {
          const float* cg = c + size_t((m * np + p) * 2) * W;
          const typename O::V r = silu_mul<O>(O::load(cg), O::load(cg + W));
          const int64_t f0 = (p0 + p) * W;
          float* dst = act + (m0 + m) * ldact + f0;
          if (f0 + W <= F) {
            O::store(dst, r);
          } else {
            float tmp[W];
            O::store(tmp, r);
            std::memcpy(dst, tmp, size_t(F - f0) * sizeof(float));
          }
        }
    };
    gemm<O, MODE, 2>(x, ldx, M, H, gsz, static_cast<const char*>(w13), pstride, f_begin / W, (f_end + W - 1) / W,
                     epi);
  }

  template <int MODE>
  static void down_mode(const float* act, int64_t ldact, int64_t M, int64_t H, int64_t F, const void* w2,
                        int64_t h_begin, int64_t h_end, float* y, int64_t ldy, int64_t gsz = 0) {
    const size_t pstride = panel_bytes<MODE, 1>(F, gsz, W);
    auto epi = [&](const float* c, int64_t m0, int mr, int64_t p0, int np) {
      for (int m = 0; m < mr; m++)
        for (int p = 0; p < np; p++) {
          const float* cg = c + size_t(m * np + p) * W;
          const int64_t h0 = (p0 + p) * W;
          float* dst = y + (m0 + m) * ldy + h0;
          if (h0 + W <= H) O::store(dst, O::load(cg));
          else std::memcpy(dst, cg, size_t(H - h0) * sizeof(float));
        }
    };
    gemm<O, MODE, 1>(act, ldact, M, F, gsz, static_cast<const char*>(w2), pstride, h_begin / W, (h_end + W - 1) / W,
                     epi);
  }

  static void swiglu(const float* x, int64_t ldx, int64_t M, int64_t H, int64_t F, const void* w13, DType dt,
                     int64_t f_begin, int64_t f_end, float* act, int64_t ldact) {
    if (M <= 0 || f_begin >= f_end) return;
    switch (dt) {
      case DType::F32: return swiglu_mode<kF32>(x, ldx, M, H, F, w13, f_begin, f_end, act, ldact);
      case DType::F16: return swiglu_mode<kF16>(x, ldx, M, H, F, w13, f_begin, f_end, act, ldact);
      case DType::BF16: return swiglu_mode<BF16_MODE>(x, ldx, M, H, F, w13, f_begin, f_end, act, ldact);
    }
  }

  static void down(const float* act, int64_t ldact, int64_t M, int64_t H, int64_t F, const void* w2, DType dt,
                   int64_t h_begin, int64_t h_end, float* y, int64_t ldy) {
    if (M <= 0 || h_begin >= h_end) return;
    switch (dt) {
      case DType::F32: return down_mode<kF32>(act, ldact, M, H, F, w2, h_begin, h_end, y, ldy);
      case DType::F16: return down_mode<kF16>(act, ldact, M, H, F, w2, h_begin, h_end, y, ldy);
      case DType::BF16: return down_mode<BF16_MODE>(act, ldact, M, H, F, w2, h_begin, h_end, y, ldy);
    }
  }

  static void swiglu_q(const float* x, int64_t ldx, int64_t M, int64_t H, int64_t F, const void* w13, Quant q,
                       int64_t g, int64_t f_begin, int64_t f_end, float* act, int64_t ldact) {
    if (M <= 0 || f_begin >= f_end) return;
    if (q == Quant::Int8) swiglu_mode<I8_MODE>(x, ldx, M, H, F, w13, f_begin, f_end, act, ldact, g);
    else swiglu_mode<I4_MODE>(x, ldx, M, H, F, w13, f_begin, f_end, act, ldact, g);
  }

  static void down_q(const float* act, int64_t ldact, int64_t M, int64_t H, int64_t F, const void* w2, Quant q,
                     int64_t g, int64_t h_begin, int64_t h_end, float* y, int64_t ldy) {
    if (M <= 0 || h_begin >= h_end) return;
    if (q == Quant::Int8) down_mode<I8_MODE>(act, ldact, M, H, F, w2, h_begin, h_end, y, ldy, g);
    else down_mode<I4_MODE>(act, ldact, M, H, F, w2, h_begin, h_end, y, ldy, g);
  }

  static constexpr KernelSet make(Isa isa, const char* name) {
    return KernelSet{isa,       name,     W,       w13_bytes, w2_bytes, pack13,
                     pack2,     swiglu,   down,    q13_bytes, q2_bytes, qpack13,
                     qpack2,    swiglu_q, down_q,  I8_MODE == kI8Dot ? "int16" : "float32",
                     I4_MODE == kI4Dot ? "int8" : "float32"};
  }
};

// FMA peak probe: 16 independent accumulators (more than latency x ports) so the loop runs at the FMA
// units' throughput. acc = acc * b + acc with b = 2^-30 leaves acc unchanged after rounding, so values
// stay normal forever, and needs no register but the accumulators (b can be a memory operand: AVX2 has
// only 16 registers). Returns float operations done (2 per lane per FMA).
template <class O>
double probe_fma_loop(int64_t iters) {
  static volatile float tiny = 9.3132257e-10f;  // 2^-30, opaque to the compiler
  typename O::V acc[16];
  for (int i = 0; i < 16; i++) acc[i] = O::set1(1.0f + float(i));
  const typename O::V b = O::set1(tiny);
  for (int64_t it = 0; it < iters; it++) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) acc[i] = O::fma(acc[i], b, acc[i]);
  }
  typename O::V s = acc[0];
  for (int i = 1; i < 16; i++) s = O::add(s, acc[i]);
  float out[O::W];
  O::store(out, s);
  volatile float sink = out[0];
  (void)sink;
  return double(iters) * 16 * O::W * 2;
}

}  // namespace
}  // namespace simd
}  // namespace fmoe
