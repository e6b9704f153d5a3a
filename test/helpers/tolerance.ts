/**
 * Bounds on the relative L2 error of a layer's output against the float64 reference, derived from the
 * arithmetic each CPU kernel set does, so that a wrong decode or a wrong product shows up as a failure.
 *
 * Measured maxima these bounds sit over (every set on one x86 CPU, weights uniform as makeCase draws
 * them, H up to 1024 and F up to 3584): float32 accumulation 1.4e-6; bf16 dot products against the
 * exact reference 2.9e-3 (5.1e-3 at H = 16, F = 8); against a reference that narrows the activations
 * the same way: bf16 5.5e-5, int16 4.1e-6, int8 9.3e-5.
 */
import type { Dtype } from './reference';

/**
 * Exactly decoded operands (float32, float16, bf16 on a set that widens them to float32, or int8 /
 * int4 codes times their scale) accumulated in float32. A dot product of n random terms is off by
 * about 2^-24 * sqrt(n) of its size: 2e-6 at n = 3584, and the errors of the three products of the
 * block add in quadrature. 1e-5 leaves a factor of 5 for odd sizes and seeds; an error of one bit of
 * an f16 weight's mantissa is 1.2e-3 at the output (kernels.test.ts checks that it fails).
 */
export const FLOAT32_TOL = 1e-5;

/**
 * How a relative error of the operands of a dot product reaches the block's output: x feeds w1 and
 * w3 (through silu, whose relative gain |1 + a(1 - sigmoid(a))| is at most about 1.3 for the
 * pre-activations here), and h feeds w2. Independent errors add in quadrature.
 */
export const CHAIN = Math.sqrt(1.3 ** 2 + 1 + 1);

/**
 * Relative RMS error of rounding a float to bf16: half an ulp of a uniform error, ulp 2^-7 of a
 * mantissa in [1, 2), against the RMS mantissa sqrt(7/3) (mantissas spread evenly): 1.48e-3.
 */
export const BF16_ROUNDING = 2 ** -7 / Math.sqrt(12) / Math.sqrt(7 / 3);

/**
 * Sets that feed bf16 weights to a bf16 dot product and round x and h to bf16 for it
 * (csrc/cpu/kernels_avx512bf16.cpp). backendInfo() does not say this, unlike int8Activations.
 */
const BF16_DOT_SETS = ['avx512bf16'];

export function narrowsBf16(isa: string, dtype: Dtype): boolean {
  return dtype === 'bfloat16' && BF16_DOT_SETS.includes(isa);
}

/**
 * Unquantized weights of `dtype` on kernel set `isa` against the exact float64 reference. A bf16 dot
 * product set rounds the activations: CHAIN * BF16_ROUNDING = 2.8e-3 is the expected error (2.6e-3 to
 * 2.9e-3 measured), doubled because a layer with few outputs (T * H of a few hundred) averages over
 * few errors: 5.7e-3. Every other set decodes the weights exactly.
 */
export function weightTolerance(isa: string, dtype: Dtype): number {
  return narrowsBf16(isa, dtype) ? 2 * CHAIN * BF16_ROUNDING : FLOAT32_TOL;
}

/** The narrowing a set applies to the activations, by the spacing of the values it leaves. */
export type Narrowing = 'bf16' | 'int16' | 'int8';

/**
 * A set that narrows the activations against a reference that narrows them the same way.
 *
 * x is float32 in both, so both narrow it alike. h differs: the kernels compute it in float32, the
 * reference in float64, a relative difference eps of about 2^-24 * sqrt(H) per product, two products
 * (a and b). An element of h within that difference of a rounding boundary rounds the other way, and
 * the narrowed values then differ by one step s (relative to the RMS of h): with probability
 * |dh| / s, so the expected squared relative error is eps * s. For integer codes s = R / qmax, where
 * R = amax / rms of a group of h (at most about 6 for these products of two near-Gaussian values);
 * for bf16, s = 2^-7 of the element (R times that at the largest one). On few elements (n = T * k * F)
 * the mean says little, so one flip of the largest step is always allowed: (s_max)^2 / n. The bound
 * is twice the square root of the sum, plus float32 accumulation.
 */
export function narrowedTolerance(narrowing: Narrowing, c: { H: number; F: number; T: number; k: number }): number {
  const R = 6;
  const eps = 2 * 2 ** -24 * Math.sqrt(c.H);
  const s = narrowing === 'bf16' ? 2 ** -7 : R / (narrowing === 'int16' ? 32767 : 127);
  const sMax = narrowing === 'bf16' ? R * s : s;
  const n = c.T * c.k * c.F;
  return FLOAT32_TOL + 2 * Math.sqrt(eps * s + (sMax * sMax) / n);
}
