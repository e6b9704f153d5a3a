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
//
// The parts: simd_common.h (read modes, scratch), simd_micro.h (micro-kernels), simd_pack_act.h
// (activation packing and its cache), simd_gemm.h (the GEMM driver); this file holds the SwiGLU
// epilogue and the KernelSet entry points.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../core/dtype.h"
#include "simd_exp.h"
#include "simd_gemm.h"
#include "vocab_exp.h"

namespace fmoe {
namespace simd {
namespace {

// silu(g) * u, lane by lane: g / (1 + exp(-g)) * u with simd_exp.h's exp. Beyond its clamp silu is 0 or
// g to float precision anyway. NaN in g stays NaN through the final product.
template <class O>
inline typename O::V silu_mul(typename O::V g, typename O::V u) {
  return O::mul(O::div(g, O::add(O::set1(1.0f), vexp<O>(O::neg(g)))), u);
}

#if defined(__x86_64__)
// The router's logits at this unit's width, bit for bit those of gate_logits (routing.h): each logit is
// eight float sums, lane j taking x[h + j] * g[h + j] for h = 0, 8, 16, ... with each product rounded
// before its add, as the portable code's separate multiply and add do (the empty asm keeps the compiler
// from fusing them into one FMA, which rounds once), then the lanes in order and the tail added in
// double. With AVX-512 one register holds the eight sums of two tokens. The portable code reads the
// whole router (Qwen3's 1 MiB) again for every token, 128 bits at a time; here four tokens share each
// load of four experts' rows.
typedef float GateLanes __attribute__((vector_size(32)));

inline GateLanes gate_load(const float* p) {
  GateLanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// A router stored as bf16 (routing.h gate_logits_bf16): eight values widened exactly, each the high
// half of its float's bits, so every product and sum is the one the float router gives.
inline GateLanes gate_load(const uint16_t* p) {
#if defined(__AVX2__)
  // One widening load and a shift: GCC lowers the generic form below to two 128-bit widenings, a byte
  // shift and an insert, shuffles that made the router twice as slow as its reads.
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return GateLanes(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
#else
  typedef uint16_t Half8 __attribute__((vector_size(16)));
  typedef uint32_t Word8 __attribute__((vector_size(32)));
  Half8 h;
  std::memcpy(&h, p, sizeof h);
  const Word8 w = __builtin_convertvector(h, Word8) << 16;
  GateLanes v;
  std::memcpy(&v, &w, sizeof v);
  return v;
#endif
}

inline float gate_value(const float* g, int64_t i) { return g[i]; }
inline float gate_value(const uint16_t* g, int64_t i) { return bf16_to_f32(g[i]); }

// The logits of one token's eight sums: the lanes in order, then the tail.
template <class G>
inline float gate_finish(const float* lanes, const float* x, const G* g, int64_t h, int64_t H) {
  double sum = 0;
  for (int j = 0; j < 8; j++) sum += lanes[j];
  for (int64_t i = h; i < H; i++) sum += double(x[i]) * gate_value(g, i);
  return float(sum);
}

// TB tokens by EB experts, eight lanes each.
template <int TB, int EB, class G>
inline void gate_tile(const float* x, int64_t H, const G* g, float* logits, int64_t E) {
  GateLanes acc[TB][EB];
#pragma GCC unroll 8
  for (int t = 0; t < TB; t++)
#pragma GCC unroll 8
    for (int e = 0; e < EB; e++) acc[t][e] = GateLanes{};
  int64_t h = 0;
  for (; h + 8 <= H; h += 8) {
    GateLanes gv[EB];
#pragma GCC unroll 8
    for (int e = 0; e < EB; e++) gv[e] = gate_load(g + e * H + h);
#pragma GCC unroll 8
    for (int t = 0; t < TB; t++) {
      const GateLanes xv = gate_load(x + t * H + h);
#pragma GCC unroll 8
      for (int e = 0; e < EB; e++) {
        GateLanes prod = xv * gv[e];
        asm("" : "+x"(prod));
        acc[t][e] += prod;
      }
    }
  }
  for (int t = 0; t < TB; t++)
    for (int e = 0; e < EB; e++) {
      float lanes[8];
      std::memcpy(lanes, &acc[t][e], sizeof lanes);
      logits[t * E + e] = gate_finish(lanes, x + t * H, g + e * H, h, H);
    }
}

#if defined(__AVX512F__)
typedef float GatePairs __attribute__((vector_size(64)));  // [token a's eight lanes | token b's]

// Two pairs of tokens by EB experts.
template <int EB, class G>
inline void gate_tile_pairs(const float* x, int64_t H, const G* g, float* logits, int64_t E) {
  GatePairs acc[2][EB];
#pragma GCC unroll 8
  for (int t = 0; t < 2; t++)
#pragma GCC unroll 8
    for (int e = 0; e < EB; e++) acc[t][e] = GatePairs{};
  int64_t h = 0;
  for (; h + 8 <= H; h += 8) {
    GatePairs xv[2];
#pragma GCC unroll 2
    for (int t = 0; t < 2; t++) {
      const GateLanes a = gate_load(x + (2 * t) * H + h), b = gate_load(x + (2 * t + 1) * H + h);
      xv[t] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    }
#pragma GCC unroll 8
    for (int e = 0; e < EB; e++) {
      const GateLanes gh = gate_load(g + e * H + h);
      const GatePairs gv = __builtin_shufflevector(gh, gh, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
#pragma GCC unroll 2
      for (int t = 0; t < 2; t++) {
        GatePairs prod = xv[t] * gv;
        asm("" : "+v"(prod));
        acc[t][e] += prod;
      }
    }
  }
  for (int t = 0; t < 4; t++)
    for (int e = 0; e < EB; e++) {
      float lanes[16];
      std::memcpy(lanes, &acc[t / 2][e], sizeof lanes);
      logits[t * E + e] = gate_finish(lanes + 8 * (t % 2), x + t * H, g + e * H, h, H);
    }
}
#endif

// Four tokens by four experts: two pairs of tokens with AVX-512.
template <class G>
inline void gate_tile_4x4(const float* x, int64_t H, const G* g, float* logits, int64_t E) {
#if defined(__AVX512F__)
  gate_tile_pairs<4>(x, H, g, logits, E);
#else
  gate_tile<4, 4>(x, H, g, logits, E);
#endif
}

// One token by four experts `apart` rows apart (expert q's row at g + q * apart * H, its logit at
// out[q * apart]): at decode the router comes from memory, and four long streams keep the prefetchers
// going where runs of four adjacent rows a few KiB long barely start them. Each stream's line kAhead
// bytes on is asked for (past a row's end: the stream's next row, which the next call reads).
template <class G>
inline void gate_streams(const float* x, int64_t H, const G* g, int64_t apart, float* out) {
  constexpr int64_t kLine = 64 / sizeof(G), kAhead = 1024 / sizeof(G);
  const int64_t stride = apart * H;
  GateLanes acc[4] = {};
  int64_t h = 0;
  for (; h + 8 <= H; h += 8) {
    if (h % kLine == 0)
#pragma GCC unroll 4
      for (int q = 0; q < 4; q++) __builtin_prefetch(g + q * stride + h + kAhead, 0, 3);
    const GateLanes xv = gate_load(x + h);
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) {
      GateLanes prod = xv * gate_load(g + q * stride + h);
      asm("" : "+x"(prod));
      acc[q] += prod;
    }
  }
  for (int q = 0; q < 4; q++) {
    float lanes[8];
    std::memcpy(lanes, &acc[q], sizeof lanes);
    out[q * apart] = gate_finish(lanes, x, g + q * stride, h, H);
  }
}

// Four tokens by four experts at a time, over blocks of router rows of about
// 256 KiB that stay in L2 while every token of the call meets them. One token (decode): the experts as
// four streams a quarter of them apart (gate_streams).
template <class G>
inline void gate_logits_simd(const float* x, int64_t T, int64_t H, const G* gate, int64_t E, float* logits) {
  if (T == 1) {
    const int64_t quarter = E / 4;
    for (int64_t e = 0; e < quarter; e++) gate_streams(x, H, gate + e * H, quarter, logits + e);
    for (int64_t e = 4 * quarter; e < E; e++) gate_tile<1, 1>(x, H, gate + e * H, logits + e, E);
    return;
  }
  const int64_t rows = H > 0 ? (int64_t(256) << 10) / (H * int64_t(sizeof(G))) / 4 * 4 : E;
  const int64_t block = rows < 4 ? 4 : rows;
  for (int64_t e0 = 0; e0 < E; e0 += block) {
    const int64_t e1 = e0 + block < E ? e0 + block : E;
    for (int64_t t = 0; t < T;) {
      const bool four = T - t >= 4;
      int64_t e = e0;
      for (; e + 4 <= e1; e += 4) {
        const float* xt = x + t * H;
        const G* g = gate + e * H;
        float* out = logits + t * E + e;
        if (four)
          gate_tile_4x4(xt, H, g, out, E);
        else
          gate_tile<1, 4>(xt, H, g, out, E);
      }
      for (; e < e1; e++) {
        if (four)
          gate_tile<4, 1>(x + t * H, H, gate + e * H, logits + t * E + e, E);
        else
          gate_tile<1, 1>(x + t * H, H, gate + e * H, logits + t * E + e, E);
      }
      t += four ? 4 : 1;
    }
  }
}

constexpr void (*kGateLogits)(const float*, int64_t, int64_t, const float*, int64_t, float*) = gate_logits_simd<float>;
constexpr void (*kGateLogitsBf16)(const float*, int64_t, int64_t, const uint16_t*, int64_t,
                                  float*) = gate_logits_simd<uint16_t>;
#else
constexpr void (*kGateLogits)(const float*, int64_t, int64_t, const float*, int64_t, float*) = nullptr;
constexpr void (*kGateLogitsBf16)(const float*, int64_t, int64_t, const uint16_t*, int64_t, float*) = nullptr;
#endif

// The KernelSet functions for one ISA. BF16_MODE: kBF16 (shift) or kBF16Dot; I8_MODE / I4_MODE: kI8 /
// kI4 (float activations, Plain code order) or kI8Dot / kI4Dot (integer activations, Dot order), or
// kI8Vnni / kI4Dot (int8 activations for both, Vnni order).
template <class O, int BF16_MODE, int I8_MODE = kI8, int I4_MODE = kI4>
struct Kernels {
  static_assert(is_dot(I8_MODE) == is_dot(I4_MODE), "one code order per set");
  static constexpr int W = O::W;
  static constexpr CodeOrder kOrder = code_order(I8_MODE);

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
                          int64_t f_begin, int64_t f_end, float* act, int64_t ldact, ActEpoch epoch, int64_t gsz = 0) {
    const size_t pstride = panel_bytes<MODE, 2>(H, gsz, W);
    auto epi = [&](const float* c, int64_t m0, int mr, int64_t p0, int np, int64_t pgap) {
      for (int m = 0; m < mr; m++)
        for (int p = 0; p < np; p++) {
          const float* cg = c + size_t((m * np + p) * 2) * W;
          const typename O::V r = silu_mul<O>(O::load(cg), O::load(cg + W));
          const int64_t f0 = (p0 + p * pgap) * W;
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
    gemm<O, MODE, 2>(x, ldx, M, H, gsz, static_cast<const char*>(w13), pstride, f_begin / W, (f_end + W - 1) / W, epoch,
                     epi);
  }

  template <int MODE>
  static void down_mode(const float* act, int64_t ldact, int64_t M, int64_t H, int64_t F, const void* w2,
                        int64_t h_begin, int64_t h_end, float* y, int64_t ldy, ActEpoch epoch, int64_t gsz = 0) {
    const size_t pstride = panel_bytes<MODE, 1>(F, gsz, W);
    auto epi = [&](const float* c, int64_t m0, int mr, int64_t p0, int np, int64_t pgap) {
      for (int m = 0; m < mr; m++)
        for (int p = 0; p < np; p++) {
          const float* cg = c + size_t(m * np + p) * W;
          const int64_t h0 = (p0 + p * pgap) * W;
          float* dst = y + (m0 + m) * ldy + h0;
          if (h0 + W <= H)
            O::store(dst, O::load(cg));
          else
            std::memcpy(dst, cg, size_t(H - h0) * sizeof(float));
        }
    };
    gemm<O, MODE, 1>(act, ldact, M, F, gsz, static_cast<const char*>(w2), pstride, h_begin / W, (h_end + W - 1) / W,
                     epoch, epi);
  }

  static void swiglu(const float* x, int64_t ldx, int64_t M, int64_t H, int64_t F, const void* w13, DType dt,
                     int64_t f_begin, int64_t f_end, float* act, int64_t ldact, ActEpoch epoch) {
    if (M <= 0 || f_begin >= f_end) return;
    switch (dt) {
      case DType::F32:
        return swiglu_mode<kF32>(x, ldx, M, H, F, w13, f_begin, f_end, act, ldact, epoch);
      case DType::F16:
        return swiglu_mode<kF16>(x, ldx, M, H, F, w13, f_begin, f_end, act, ldact, epoch);
      case DType::BF16:
        return swiglu_mode<BF16_MODE>(x, ldx, M, H, F, w13, f_begin, f_end, act, ldact, epoch);
    }
  }

  static void down(const float* act, int64_t ldact, int64_t M, int64_t H, int64_t F, const void* w2, DType dt,
                   int64_t h_begin, int64_t h_end, float* y, int64_t ldy, ActEpoch epoch) {
    if (M <= 0 || h_begin >= h_end) return;
    switch (dt) {
      case DType::F32:
        return down_mode<kF32>(act, ldact, M, H, F, w2, h_begin, h_end, y, ldy, epoch);
      case DType::F16:
        return down_mode<kF16>(act, ldact, M, H, F, w2, h_begin, h_end, y, ldy, epoch);
      case DType::BF16:
        return down_mode<BF16_MODE>(act, ldact, M, H, F, w2, h_begin, h_end, y, ldy, epoch);
    }
  }

  static void swiglu_q(const float* x, int64_t ldx, int64_t M, int64_t H, int64_t F, const void* w13, Quant q,
                       int64_t g, int64_t f_begin, int64_t f_end, float* act, int64_t ldact, ActEpoch epoch) {
    if (M <= 0 || f_begin >= f_end) return;
    if (q == Quant::Int8)
      swiglu_mode<I8_MODE>(x, ldx, M, H, F, w13, f_begin, f_end, act, ldact, epoch, g);
    else
      swiglu_mode<I4_MODE>(x, ldx, M, H, F, w13, f_begin, f_end, act, ldact, epoch, g);
  }

  static void down_q(const float* act, int64_t ldact, int64_t M, int64_t H, int64_t F, const void* w2, Quant q,
                     int64_t g, int64_t h_begin, int64_t h_end, float* y, int64_t ldy, ActEpoch epoch) {
    if (M <= 0 || h_begin >= h_end) return;
    if (q == Quant::Int8)
      down_mode<I8_MODE>(act, ldact, M, H, F, w2, h_begin, h_end, y, ldy, epoch, g);
    else
      down_mode<I4_MODE>(act, ldact, M, H, F, w2, h_begin, h_end, y, ldy, epoch, g);
  }

  static constexpr KernelSet make(Isa isa, const char* name) {
    return KernelSet{isa,
                     name,
                     W,
                     w13_bytes,
                     w2_bytes,
                     pack13,
                     pack2,
                     swiglu,
                     down,
                     q13_bytes,
                     q2_bytes,
                     qpack13,
                     qpack2,
                     swiglu_q,
                     down_q,
                     I8_MODE == kI8Dot    ? "int16"
                     : I8_MODE == kI8Vnni ? "int8"
                                          : "float32",
                     I4_MODE == kI4Dot ? "int8" : "float32",
                     kGateLogits,
                     kGateLogitsBf16,
                     exp_weights_vec<O::W / 2>,
                     exp_weights_f32_vec<O::W / 2>,
                     first_max_f32_vec<O::W * 4>,
                     first_max_f64_vec<O::W * 4>,
                     widen_logits_vec<O::W / 2>};
  }
};

}  // namespace
}  // namespace simd
}  // namespace fmoe
