#include "packing.h"

#include <cstring>

#include "../core/thread_pool.h"

namespace fmoe {
namespace {

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Reduction indices per block of the blockwise transpose: nr source rows x kBlock elements are copied to
// a small tile first (contiguous reads of each row), then written out in panel order (contiguous writes).
constexpr int64_t kBlock = 64;
constexpr int64_t kMaxNr = 64;

// Packs `nmat` matrices of N rows x K (row-major, same shape) into panels of nr rows; see packing.h.
template <typename T>
void pack_panels(const T* const* src, int nmat, int64_t N, int64_t K, int64_t nr, bool kpair, T* dst) {
  const int64_t kg = kpair ? 2 : 1;            // reduction indices per k step
  const int64_t Kp = round_up(K, kg);          // padded reduction length
  const int64_t panel_elems = Kp * nmat * nr;  // elements per panel
  const int64_t npanels = (N + nr - 1) / nr;
  ThreadPool::instance().parallel_for(npanels, 1, 0, [&](int64_t pb, int64_t pe, int) {
    T tile[kMaxNr][kBlock];
    for (int64_t p = pb; p < pe; p++) {
      T* out_panel = dst + p * panel_elems;
      const int64_t n0 = p * nr, rows = N - n0 < nr ? N - n0 : nr;
      for (int64_t k0 = 0; k0 < Kp; k0 += kBlock) {
        const int64_t kn = Kp - k0 < kBlock ? Kp - k0 : kBlock;           // padded indices in this block
        const int64_t kv = K - k0 < kn ? (K - k0 > 0 ? K - k0 : 0) : kn;  // real ones
        for (int mat = 0; mat < nmat; mat++) {
          for (int64_t j = 0; j < nr; j++) {
            if (j < rows && kv > 0) std::memcpy(tile[j], src[mat] + (n0 + j) * K + k0, size_t(kv) * sizeof(T));
            const int64_t from = j < rows ? kv : 0;
            if (from < kn) std::memset(tile[j] + from, 0, size_t(kn - from) * sizeof(T));
          }
          // k step s of this block lands at (k0/kg + s) * nmat * nr * kg + mat * nr * kg.
          for (int64_t s = 0; s < kn / kg; s++) {
            T* o = out_panel + ((k0 / kg + s) * nmat + mat) * nr * kg;
            if (kg == 1) {
              for (int64_t j = 0; j < nr; j++) o[j] = tile[j][s];
            } else {
              for (int64_t j = 0; j < nr; j++) {
                o[2 * j] = tile[j][2 * s];
                o[2 * j + 1] = tile[j][2 * s + 1];
              }
            }
          }
        }
      }
    }
  });
}

template <typename T>
void pack_any(const void* const* src, int nmat, int64_t N, int64_t K, int64_t nr, bool kpair, void* dst) {
  const T* s[2] = {static_cast<const T*>(src[0]), static_cast<const T*>(nmat > 1 ? src[1] : src[0])};
  pack_panels<T>(s, nmat, N, K, nr, kpair, static_cast<T*>(dst));
}

void pack(const void* const* src, int nmat, int64_t N, int64_t K, DType dt, int64_t nr, bool kpair, void* dst) {
  if (dtype_size(dt) == 4)
    pack_any<uint32_t>(src, nmat, N, K, nr, kpair, dst);
  else
    pack_any<uint16_t>(src, nmat, N, K, nr, kpair, dst);
}

// Row n, indices [k0, k0 + n) of a [*, K] source of type dt, as floats.
void load_run(const void* src, DType dt, int64_t K, int64_t row, int64_t k0, int64_t n, float* out) {
  const size_t off = size_t(row) * size_t(K) + size_t(k0);
  switch (dt) {
    case DType::F32:
      std::memcpy(out, static_cast<const float*>(src) + off, size_t(n) * sizeof(float));
      break;
    case DType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + off;
      for (int64_t i = 0; i < n; i++) out[i] = bf16_to_f32(s[i]);
      break;
    }
    case DType::F16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + off;
      for (int64_t i = 0; i < n; i++) out[i] = f16_to_f32(s[i]);
      break;
    }
  }
}

constexpr int64_t kMaxGroup = 128;

// Quantizes `nmat` matrices of N rows x K into the quantized panel layout (packing.h): each thread
// holds one group of one row as floats at a time.
void pack_quant(const void* const* src, int nmat, int64_t N, int64_t K, DType dt, int64_t nr, Quant q, int64_t g,
                CodeOrder order, void* dst) {
  const int qmax = quant_qmax(q);
  const int64_t npanels = (N + nr - 1) / nr, ngroups = (K + g - 1) / g;
  const size_t pbytes = quant_panel_bytes(nmat, K, nr, q, g, order), gfull = quant_group_bytes(nmat, nr, q, g, order);
  ThreadPool::instance().parallel_for(npanels, 1, 0, [&](int64_t pb, int64_t pe, int) {
    float vals[kMaxGroup];
    int8_t codes[kMaxGroup];
    for (int64_t p = pb; p < pe; p++) {
      const int64_t n0 = p * nr, rows = N - n0 < nr ? N - n0 : nr;
      for (int64_t gi = 0; gi < ngroups; gi++) {
        const int64_t k0 = gi * g, gl = K - k0 < g ? K - k0 : g;
        char* blk = static_cast<char*>(dst) + size_t(p) * pbytes + size_t(gi) * gfull;
        uint16_t* scales = reinterpret_cast<uint16_t*>(blk);
        uint8_t* out = reinterpret_cast<uint8_t*>(blk) + size_t(nmat) * size_t(nr) * kScaleBytes;
        for (int mat = 0; mat < nmat; mat++) {
          for (int64_t j = 0; j < nr; j++) {
            float scale = 0.0f;
            if (j < rows) {
              load_run(src[mat], dt, K, n0 + j, k0, gl, vals);
              scale = quantize_group(vals, gl, qmax, codes);
            } else {
              std::memset(codes, 0, size_t(gl));  // padding columns: scale 0, codes 0
            }
            scales[mat * nr + j] = f32_to_f16(scale);  // exact: the scale is a half value
            auto code = [&](int64_t k) { return k < gl ? codes[k] : 0; };
            if (q == Quant::Int8 && order == CodeOrder::Plain) {
              for (int64_t s = 0; s < gl; s++) out[(s * nmat + mat) * nr + j] = uint8_t(codes[s]);
            } else if (q == Quant::Int8 && order == CodeOrder::Vnni) {
              for (int64_t s = 0; s < (gl + 3) / 4; s++)
                for (int b = 0; b < 4; b++) out[((s * nmat + mat) * nr + j) * 4 + b] = uint8_t(code(4 * s + b) + 128);
            } else if (q == Quant::Int8) {
              for (int64_t s = 0; s < (gl + 1) / 2; s++)
                for (int b = 0; b < 2; b++) out[((s * nmat + mat) * nr + j) * 2 + b] = uint8_t(code(2 * s + b));
            } else if (order == CodeOrder::Plain) {
              for (int64_t s = 0; s < (gl + 1) / 2; s++) {
                const int lo = codes[2 * s], hi = 2 * s + 1 < gl ? codes[2 * s + 1] : 0;
                out[(s * nmat + mat) * nr + j] = uint8_t((lo + 8) | (hi + 8) << 4);
              }
            } else {
              for (int64_t s = 0; s < (gl + 7) / 8; s++)
                for (int b = 0; b < 4; b++)
                  out[((s * nmat + mat) * nr + j) * 4 + b] =
                      uint8_t((code(8 * s + b) + 8) | (code(8 * s + 4 + b) + 8) << 4);
            }
          }
        }
      }
    }
  });
}

}  // namespace

size_t quant_w13_bytes(int64_t H, int64_t F, int64_t nr, Quant q, int64_t g, CodeOrder order) {
  return size_t((F + nr - 1) / nr) * quant_panel_bytes(2, H, nr, q, g, order);
}

size_t quant_w2_bytes(int64_t H, int64_t F, int64_t nr, Quant q, int64_t g, CodeOrder order) {
  return size_t((H + nr - 1) / nr) * quant_panel_bytes(1, F, nr, q, g, order);
}

void pack_w13_quant(const void* w1, const void* w3, int64_t H, int64_t F, DType dt, int64_t nr, Quant q, int64_t g,
                    CodeOrder order, void* dst) {
  const void* src[2] = {w1, w3};
  pack_quant(src, 2, F, H, dt, nr, q, g, order, dst);
}

void pack_w2_quant(const void* w2, int64_t H, int64_t F, DType dt, int64_t nr, Quant q, int64_t g, CodeOrder order,
                   void* dst) {
  const void* src[1] = {w2};
  pack_quant(src, 1, H, F, dt, nr, q, g, order, dst);
}

size_t packed_w13_bytes(int64_t H, int64_t F, DType dt, int64_t nr, bool kpair) {
  return size_t(round_up(F, nr)) * size_t(round_up(H, kpair ? 2 : 1)) * 2 * dtype_size(dt);
}

size_t packed_w2_bytes(int64_t H, int64_t F, DType dt, int64_t nr, bool kpair) {
  return size_t(round_up(H, nr)) * size_t(round_up(F, kpair ? 2 : 1)) * dtype_size(dt);
}

void pack_w13(const void* w1, const void* w3, int64_t H, int64_t F, DType dt, int64_t nr, bool kpair, void* dst) {
  const void* src[2] = {w1, w3};
  pack(src, 2, F, H, dt, nr, kpair, dst);
}

void pack_w2(const void* w2, int64_t H, int64_t F, DType dt, int64_t nr, bool kpair, void* dst) {
  const void* src[1] = {w2};
  pack(src, 1, H, F, dt, nr, kpair, dst);
}

size_t panel_w13_bytes(int64_t H, int64_t F, DType dt) { return packed_w13_bytes(H, F, dt, kPanel, false); }
size_t panel_w2_bytes(int64_t H, int64_t F, DType dt) { return packed_w2_bytes(H, F, dt, kPanel, false); }
void pack_w13_panels(const void* w1, const void* w3, int64_t H, int64_t F, DType dt, void* dst) {
  pack_w13(w1, w3, H, F, dt, kPanel, false, dst);
}
void pack_w2_panels(const void* w2, int64_t H, int64_t F, DType dt, void* dst) {
  pack_w2(w2, H, F, dt, kPanel, false, dst);
}

}  // namespace fmoe
