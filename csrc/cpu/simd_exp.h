// exp in vectors, shared by the SwiGLU epilogue (kernels_simd.h) and the attention softmax
// (attention_simd.h). In an anonymous namespace: each ISA unit gets its own copy with its own flags.
#pragma once

namespace fmoe {
namespace {

// exp(x) lane by lane, Cephes-style (|rel err| ~1e-7); the clamp to [-87, 88] keeps 2^n a normal
// number (below it the result is < 2e-38; above it exp overflows float anyway). NaN stays NaN: min and
// max return their second operand when one is NaN.
template <class O>
inline typename O::V vexp(typename O::V x) {
  using V = typename O::V;
  x = O::max(O::set1(-87.0f), O::min(O::set1(88.0f), x));
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
  return O::pow2(p, n);
}

}  // namespace
}  // namespace fmoe
