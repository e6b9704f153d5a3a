// The sampler's passes over a whole vocabulary (sampler.cpp): the largest logit and the exponentials,
// in vectors of W lanes: each kernel set instantiates them at its own width (GCC vector extensions,
// which its flags compile to SSE2, AVX2, AVX-512 or NEON). In an anonymous namespace: each ISA unit gets
// its own copy with its own flags.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

namespace fmoe {
namespace {

// Bytes of T as a GCC vector type, and the mask a comparison of them gives: one specialisation per
// type and width (a vector_size depending on a template parameter inside the template is dropped by
// GCC 12).
template <typename T, int Bytes>
struct VecOf;
#define FMOE_VEC_OF(T, M, BYTES)                        \
  template <>                                           \
  struct VecOf<T, BYTES> {                              \
    typedef T V __attribute__((vector_size(BYTES)));    \
    typedef M Mask __attribute__((vector_size(BYTES))); \
  };
FMOE_VEC_OF(float, int32_t, 8)
FMOE_VEC_OF(float, int32_t, 16)
FMOE_VEC_OF(float, int32_t, 32)
FMOE_VEC_OF(float, int32_t, 64)
FMOE_VEC_OF(double, int64_t, 16)
FMOE_VEC_OF(double, int64_t, 32)
FMOE_VEC_OF(double, int64_t, 64)
#undef FMOE_VEC_OF

// The first index of the largest of x[0, n) (NaN never the largest) and its value, or -1 and -inf when
// no value is above -inf. Blocks of 512 are reduced in two vectors of running maxima, then the first
// block holding the largest is searched from its start: the same index and value at every width.
template <typename T, int Bytes>
int64_t first_max_vec(const T* x, int64_t n, T* top_out) {
  typedef typename VecOf<T, Bytes>::V vt;
  typedef typename VecOf<T, Bytes>::Mask vm;
  constexpr int W = Bytes / sizeof(T);
  constexpr int64_t kBlock = 512;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  auto larger = [](vt v, vt m) {  // v where v > m, else m: NaN in v never replaces m
    const vm gt = v > m;
    return (vt)(((vm)v & gt) | ((vm)m & ~gt));
  };
  T top = neg_inf;
  int64_t top_block = -1;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = b + kBlock < n ? b + kBlock : n;
    vt m0 = vt{} + neg_inf, m1 = m0;
    int64_t i = b;
    for (; i + 2 * W <= e; i += 2 * W) {
      vt v0, v1;
      std::memcpy(&v0, x + i, sizeof v0);
      std::memcpy(&v1, x + i + W, sizeof v1);
      m0 = larger(v0, m0);
      m1 = larger(v1, m1);
    }
    m0 = larger(m1, m0);
    T bm = neg_inf;
    for (int l = 0; l < W; l++) bm = m0[l] > bm ? m0[l] : bm;
    for (; i < e; i++) bm = x[i] > bm ? x[i] : bm;
    if (bm > top) {  // strictly: the first block that holds the largest
      top = bm;
      top_block = b;
    }
  }
  *top_out = top;
  if (top_block < 0) return -1;
  for (int64_t i = top_block;; i++)
    if (x[i] == top) return i;
}

template <int Bytes>
int64_t first_max_f32_vec(const float* x, int64_t n, float* top) {
  return first_max_vec<float, Bytes>(x, n, top);
}

template <int Bytes>
int64_t first_max_f64_vec(const double* x, int64_t n, double* top) {
  return first_max_vec<double, Bytes>(x, n, top);
}

// W doubles, W int64 lanes and W floats.
template <int W>
struct VecF64 {
  typedef typename VecOf<double, 8 * W>::V D;
  typedef typename VecOf<double, 8 * W>::Mask I;
  typedef typename VecOf<float, 4 * W>::V F;
};

// out[i] = exp((x[i] - top) * scale) for i < n (out may be x), and the sum of the results (W partial
// sums added in lane order at the end: the same bits for the same n on every call). For x[i] <= top and
// scale > 0 the argument is <= 0; where it is below -708 (a weight below 1e-307 of the top's), -inf or
// NaN, the result is 0. Cody-Waite reduction to |r| <= ln 2 / 2 and a degree-12 Taylor polynomial:
// within about one ulp of exp, so the draws of a float64 reference computed with Math.exp are drawn
// alike but where the uniform number falls within about 1e-15 of a boundary. From floats (T = float)
// each value is widened first (exactly): the same results as from a float64 copy, without the copy.
template <int W, typename T>
double exp_weights_from(const T* x, double* out, int64_t n, double top, double scale) {
  typedef typename VecF64<W>::D vd;
  typedef typename VecF64<W>::I vi;
  typedef typename VecF64<W>::F vf;
  auto load = [](const T* p) {
    vd v;
    if constexpr (sizeof(T) == sizeof(double)) {
      std::memcpy(&v, p, sizeof v);
    } else {
      vf f;
      std::memcpy(&f, p, sizeof f);
      v = __builtin_convertvector(f, vd);
    }
    return v;
  };
  const double kLog2e = 1.4426950408889634, kMagic = 6755399441055744.0;  // 1.5 * 2^52: rounds to an integer
  const double kLn2Hi = 0.693147180369123816490, kLn2Lo = 1.90821492927058770002e-10;
  constexpr double kCoef[13] = {
      1.0 / 479001600, 1.0 / 39916800, 1.0 / 3628800, 1.0 / 362880, 1.0 / 40320, 1.0 / 5040, 1.0 / 720,
      1.0 / 120,       1.0 / 24,       1.0 / 6,       1.0 / 2,      1.0,         1.0};
  int64_t magic_bits;
  std::memcpy(&magic_bits, &kMagic, 8);
  vd sum = vd{} + 0.0;
  int64_t i = 0;
  auto one = [&](vd v) {
    const vd z = (v - top) * scale;
    const vd t = z * kLog2e + kMagic;  // round(z * log2 e) in its low bits
    const vd k = t - kMagic;
    vd r = z - k * kLn2Hi;
    r = r - k * kLn2Lo;
    vd p = vd{} + kCoef[0];
    for (int c = 1; c < 13; c++) p = p * r + kCoef[c];
    const vi e = ((vi)t - magic_bits + 1023) << 52;  // 2^k, k in [-1022, 0] where the result is kept
    const vd y = p * (vd)e;
    const vi keep = z >= -708.0;  // false for NaN and -inf too
    return (vd)((vi)y & keep);
  };
  for (; i + W <= n; i += W) {
    const vd y = one(load(x + i));
    std::memcpy(out + i, &y, sizeof y);
    sum += y;
  }
  if (i < n) {  // the tail through one padded vector
    double buf[W];
    for (int l = 0; l < W; l++) buf[l] = i + l < n ? double(x[i + l]) : -__builtin_inf();
    vd v;
    std::memcpy(&v, buf, sizeof v);
    const vd y = one(v);
    std::memcpy(buf, &y, sizeof y);
    for (int64_t l = 0; i + l < n; l++) out[i + l] = buf[l];
    sum += y;
  }
  double total = 0;
  for (int l = 0; l < W; l++) total += sum[l];
  return total;
}

// out[i] = x[i] in float64, NaN as -inf (the sampler's copy before a mask, a bias or penalties change it).
template <int W>
void widen_logits_vec(const float* x, double* out, int64_t n) {
  typedef typename VecF64<W>::D vd;
  typedef typename VecF64<W>::I vi;
  typedef typename VecF64<W>::F vf;
  const vd neg_inf = vd{} - __builtin_inf();
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    vf f;
    std::memcpy(&f, x + i, sizeof f);
    const vd v = __builtin_convertvector(f, vd);
    const vi ok = v == v;  // false for NaN
    const vd y = (vd)(((vi)v & ok) | ((vi)neg_inf & ~ok));
    std::memcpy(out + i, &y, sizeof y);
  }
  for (; i < n; i++) out[i] = x[i] == x[i] ? double(x[i]) : -__builtin_inf();
}

template <int W>
double exp_weights_vec(double* x, int64_t n, double top, double scale) {
  return exp_weights_from<W, double>(x, x, n, top, scale);
}

template <int W>
double exp_weights_f32_vec(const float* x, double* out, int64_t n, double top, double scale) {
  return exp_weights_from<W, float>(x, out, n, top, scale);
}

}  // namespace
}  // namespace fmoe
