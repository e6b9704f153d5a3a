// What every part of the SIMD kernels shares: the weight read modes and a per-thread scratch buffer.
// Everything sits in an anonymous namespace, as kernels_simd.h explains: each ISA unit gets its own copy.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "kernels.h"
#include "packing.h"

namespace fmoe {
namespace simd {
namespace {

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

// The row blocks of a GEMM call: as few as MR rows per block allow, their sizes as even as can be
// (26 rows at MR = 12: 9, 9, 8, not 12, 12, 2, whose last tile keeps too few chains busy). Activation
// packing and the sweep both cut rows this way; block i holds rows [start(i), start(i) + rows(i)).
struct RowBlocks {
  int64_t count, base, extra;
  RowBlocks(int64_t M, int64_t MR)
      : count((M + MR - 1) / MR), base(count ? M / count : 0), extra(count ? M % count : 0) {}
  int64_t start(int64_t i) const { return i * base + imin(i, extra); }
  int rows(int64_t i) const { return int(base + (i < extra ? 1 : 0)); }
};

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
  kI8Vnni = 8,   // int8 code quads (offset-binary) . int8 activations through VNNI's vpdpbusd
};

constexpr bool is_quant(int mode) { return mode >= kI8; }
constexpr bool is_dot(int mode) { return mode == kI4Dot || mode == kI8Dot || mode == kI8Vnni; }
constexpr bool is_int8(int mode) { return mode == kI8 || mode == kI8Dot || mode == kI8Vnni; }

template <int MODE>
struct ModeInfo {
  static constexpr int es = MODE == kF32 ? 4 : 2;                         // bytes per stored element
  static constexpr int kg = (MODE == kBF16 || MODE == kBF16Dot) ? 2 : 1;  // k per packed step
};

}  // namespace
}  // namespace simd
}  // namespace fmoe
