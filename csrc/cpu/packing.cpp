#include "packing.h"

#include <cstring>

namespace fmoe {

static int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

size_t panel_w13_bytes(int64_t H, int64_t F, DType dt) {
  return size_t(round_up(F, kPanel)) * size_t(H) * 2 * dtype_size(dt);
}

size_t panel_w2_bytes(int64_t H, int64_t F, DType dt) {
  return size_t(round_up(H, kPanel)) * size_t(F) * dtype_size(dt);
}

// Copies element src[row * ld + col] to dst, or zero when row is past the end (padding).
static inline void put(char* dst, const char* src, int64_t row, int64_t rows, int64_t col, int64_t ld, size_t es) {
  if (row < rows) std::memcpy(dst, src + (size_t(row) * size_t(ld) + size_t(col)) * es, es);
  else std::memset(dst, 0, es);
}

void pack_w13_panels(const void* w1, const void* w3, int64_t H, int64_t F, DType dt, void* dst) {
  const size_t es = dtype_size(dt);
  const char* a = static_cast<const char*>(w1);
  const char* b = static_cast<const char*>(w3);
  char* out = static_cast<char*>(dst);
  for (int64_t f0 = 0; f0 < F; f0 += kPanel)
    for (int64_t k = 0; k < H; k++) {
      for (int64_t j = 0; j < kPanel; j++, out += es) put(out, a, f0 + j, F, k, H, es);
      for (int64_t j = 0; j < kPanel; j++, out += es) put(out, b, f0 + j, F, k, H, es);
    }
}

void pack_w2_panels(const void* w2, int64_t H, int64_t F, DType dt, void* dst) {
  const size_t es = dtype_size(dt);
  const char* a = static_cast<const char*>(w2);
  char* out = static_cast<char*>(dst);
  for (int64_t h0 = 0; h0 < H; h0 += kPanel)
    for (int64_t f = 0; f < F; f++)
      for (int64_t j = 0; j < kPanel; j++, out += es) put(out, a, h0 + j, H, f, F, es);
}

}  // namespace fmoe
