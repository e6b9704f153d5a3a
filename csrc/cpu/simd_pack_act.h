// Activation packing: the rows a GEMM call reads, laid out for the micro-kernels' broadcasts, and the
// per-thread cache that lets the column tiles of one phase share one packed copy (kernels.h, ActEpoch).
// Everything sits in an anonymous namespace, as kernels_simd.h explains: each ISA unit gets its own copy.
#pragma once
#include "simd_common.h"

namespace fmoe {
namespace simd {
namespace {

// Activations are packed per row block before the GEMM: block m0 (rows m0 .. m0+mr) holds, for every k
// step, its mr values side by side ([k][mr], 4 bytes each: a float, or for kBF16Dot a bf16 pair), so
// the micro-kernel broadcasts from one sequential stream through one pointer.

// Bytes per row of integer-dot activations (pack_act): the codes (K padded to a whole step), then per
// group a scale (and for kI4Dot / kI8Vnni a correction).
template <int MODE>
size_t dot_act_row_bytes(int64_t K, int64_t gsz) {
  const int64_t ng = (K + gsz - 1) / gsz;
  if constexpr (MODE == kI4Dot)
    return size_t((K + 7) / 8 * 2 + 2 * ng) * 4;
  else if constexpr (MODE == kI8Vnni)
    return size_t((K + 3) / 4 + 2 * ng) * 4;
  else
    return size_t((K + 1) / 2 + ng) * 4;
}

// Bytes per packed row in any mode: the integer-dot layout above, bf16 pairs (K padded to even), or floats.
template <int MODE>
size_t act_row_bytes(int64_t K, int64_t gsz) {
  if constexpr (is_dot(MODE)) return dot_act_row_bytes<MODE>(K, gsz);
  return size_t(MODE == kBF16Dot ? (K + 1) / 2 : K) * 4;
}

// Packs M rows of K floats (row stride ldx) into the row blocks of RowBlocks(M, MR) (see above), in a
// per-thread buffer. kBF16Dot rounds to bf16 first and pads K to even with zeros. kI4Dot / kI8Vnni /
// kI8Dot quantize each row's groups of gsz to int8 / int8 / int16 by quant.h's rule with a float32
// scale (qmax 127 / 127 / 32767) and lay out, per row block of mr rows: the codes as [Kp / 4 or Kp / 2]
// [mr] 32-bit words (four int8 or two int16; K padded with zeros to a whole step, 8, 4 or 2), the
// scales [ng][mr], and for kI4Dot / kI8Vnni -corr per group [ng][mr], corr = 8 or 128 * sum(codes),
// which removes the weight codes' offset (8 for nibbles, 128 for bytes). Stored negated, as the
// micro-kernel's accumulators start: a broadcast straight from memory, no negation on the way.
template <class O, int MODE>
static const char* pack_act_into(Scratch& sbuf, const float* x, int64_t ldx, int64_t M, int64_t K, int MR,
                                 int64_t gsz) {
  static thread_local Scratch rbuf;
  if constexpr (is_dot(MODE)) {
    using Code = std::conditional_t<MODE == kI8Dot, int16_t, int8_t>;
    constexpr int64_t kstep = MODE == kI4Dot ? 8 : MODE == kI8Vnni ? 4 : 2, per_word = 4 / sizeof(Code);
    constexpr int32_t offset = MODE == kI4Dot ? 8 : 128;  // of the weight codes
    const int64_t Kp = (K + kstep - 1) / kstep * kstep, ng = (K + gsz - 1) / gsz;
    const size_t arow = dot_act_row_bytes<MODE>(K, gsz);
    char* buf = static_cast<char*>(sbuf.get(size_t(M) * arow));
    Code* row = static_cast<Code*>(rbuf.get(size_t(Kp) * sizeof(Code)));
    const RowBlocks blocks(M, MR);
    for (int64_t bi = 0; bi < blocks.count; bi++) {
      const int64_t m0 = blocks.start(bi), mr = blocks.rows(bi);
      int32_t* codes = reinterpret_cast<int32_t*>(buf + size_t(m0) * arow);
      float* sx = reinterpret_cast<float*>(codes + Kp / per_word * mr);
      int32_t* start = reinterpret_cast<int32_t*>(sx + ng * mr);  // -corr, int8 codes only
      for (int64_t m = 0; m < mr; m++) {
        const float* src = x + (m0 + m) * ldx;
        std::memset(row + K, 0, size_t(Kp - K) * sizeof(Code));
        for (int64_t gi = 0; gi < ng; gi++) {
          const int64_t k0 = gi * gsz, n = imin(gsz, K - k0);
          if constexpr (MODE != kI8Dot) {
            int32_t sum = 0;
            sx[gi * mr + m] = O::quantize_i8(src + k0, n, row + k0, &sum);
            start[gi * mr + m] = -offset * sum;
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
    const RowBlocks blocks(M, MR);
    for (int64_t bi = 0; bi < blocks.count; bi++) {
      const int64_t m0 = blocks.start(bi), mr = blocks.rows(bi);
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
    const RowBlocks blocks(M, MR);
    for (int64_t bi = 0; bi < blocks.count; bi++) {
      const int64_t m0 = blocks.start(bi), mr = blocks.rows(bi);
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

// pack_act_into through the per-thread cache (kernels.h): the column tiles of one expert in one phase,
// called with the phase's epoch, pack its rows once.
template <class O, int MODE>
static const char* pack_act(const float* x, int64_t ldx, int64_t M, int64_t K, int MR, int64_t gsz, ActEpoch epoch) {
  struct Key {
    const float* x;
    int64_t ldx, M, K, MR, gsz;
    ActEpoch epoch;
  };
  static thread_local Scratch sbuf;
  static thread_local Key last{};
  const Key key{x, ldx, M, K, MR, gsz, epoch};
  if (key.epoch != kNoActCache && std::memcmp(&key, &last, sizeof key) == 0) return static_cast<const char*>(sbuf.ptr);
  last = Key{};  // packing may throw (allocation): never leave a key without its data
  const char* a = pack_act_into<O, MODE>(sbuf, x, ldx, M, K, MR, gsz);
  last = key;
  return a;
}

}  // namespace
}  // namespace simd
}  // namespace fmoe
