/**
 * An independent float32 model of the load-time quantizer (csrc/core/quant.h), written from its
 * definition: symmetric groups along each row, scale = amax / qmax rounded to IEEE half (to nearest,
 * ties to even), code = round-half-even(v / scale) clamped to +-qmax, zero group (or a scale that rounds
 * to 0) -> scale 0, a group holding NaN or Inf -> NaN scale, a scale past half's range -> Infinity; codes
 * 0 in those cases. Activations (quantizedActivations) keep the float32 scale unrounded.
 * Float32 divisions are done in float64 and rounded once (Math.fround): for float32 operands that
 * gives the correctly rounded float32 quotient, the same bits as the native float division.
 */
export type QuantKind = 'int8' | 'int4';

export const QMAX: Record<QuantKind, number> = { int8: 127, int4: 7 };

/** Round to nearest, ties to even. */
export function roundHalfEven(v: number): number {
  const r = Math.round(v); // ties toward +Infinity
  return r - v === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

const HALF_MAX = 65504;
const HALF_MIN_EXP = -14; // exponent of half's smallest normal; subnormals are multiples of 2^-24

/** A number rounded to the nearest IEEE half (ties to even): past the largest half it is Infinity. */
export function roundToHalf(x: number): number {
  if (Number.isNaN(x) || x === 0 || !Number.isFinite(x)) return x;
  const a = Math.abs(x);
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e--;
  else if (2 ** (e + 1) <= a) e++;
  const ulp = 2 ** (Math.max(e, HALF_MIN_EXP) - 10); // 10 fraction bits
  const r = roundHalfEven(a / ulp) * ulp; // a / ulp is exact: ulp is a power of two
  return Math.sign(x) * (r > HALF_MAX ? Infinity : r);
}

/** Quantizes rows of K values in groups of g: half scales [rows, ceil(K/g)], codes [rows, K]. */
export function quantizeRows(
  v: ArrayLike<number>,
  K: number,
  kind: QuantKind,
  g: number,
): { scales: Float32Array; codes: Int8Array } {
  const q = quantizeRowsTo(v, K, QMAX[kind], g, true);
  return { scales: q.scales, codes: Int8Array.from(q.codes) };
}

/**
 * The same rule for any qmax (activations: 127 or 32767, float32 scales); codes as plain numbers.
 * halfScale rounds each scale to IEEE half before the codes are taken, as the weights' scales are.
 */
export function quantizeRowsTo(
  v: ArrayLike<number>,
  K: number,
  qmax: number,
  g: number,
  halfScale = false,
): { scales: Float32Array; codes: Int32Array } {
  const rows = v.length / K,
    ng = Math.ceil(K / g);
  const scales = new Float32Array(rows * ng),
    codes = new Int32Array(rows * K);
  for (let r = 0; r < rows; r++)
    for (let i = 0; i < ng; i++) {
      const k0 = r * K + i * g,
        n = Math.min(g, K - i * g);
      let amax = 0,
        finite = true;
      for (let j = 0; j < n; j++) {
        const x = v[k0 + j];
        if (!Number.isFinite(x)) finite = false;
        else amax = Math.max(amax, Math.abs(x));
      }
      const scale32 = Math.fround(amax / qmax);
      const scale = !finite ? NaN : halfScale ? roundToHalf(scale32) : scale32;
      scales[r * ng + i] = scale;
      if (!finite || scale === 0 || scale === Infinity) continue; // codes stay 0
      for (let j = 0; j < n; j++) {
        const q = roundHalfEven(Math.fround(v[k0 + j] / scale));
        codes[k0 + j] = Math.max(-qmax, Math.min(qmax, q));
      }
    }
  return { scales, codes };
}

/** The values the kernels compute with: code * scale, exactly (float64). */
export function dequantizeRows(
  q: { scales: Float32Array; codes: ArrayLike<number> },
  K: number,
  g: number,
): Float64Array {
  const ng = Math.ceil(K / g);
  const out = new Float64Array(q.codes.length);
  for (let i = 0; i < out.length; i++) {
    const r = Math.floor(i / K),
      k = i % K;
    out[i] = q.codes[i] * q.scales[r * ng + Math.floor(k / g)];
  }
  return out;
}

/**
 * Activations as a kernel set with integer activations sees them (backendInfo().cpu.int4Activations
 * 'int8', int8Activations 'int16'): each row's groups of g quantized by the weights' rule with qmax 127
 * or 32767, then dequantized exactly.
 */
export function quantizedActivations(bits: 8 | 16, g: number): (row: Float64Array) => Float64Array {
  const qmax = bits === 8 ? 127 : 32767;
  return (row) => dequantizeRows(quantizeRowsTo(row, row.length, qmax, g), row.length, g);
}

/**
 * The error-table cases (test/quant.test.ts, bench/quant-error.js): every format and group size on
 * float32 weights uniform in +-a, at sizes the groups divide.
 */
export function quantErrorCases() {
  const cases = [];
  for (const quantize of ['int8', 'int4'] as const)
    for (const group of [32, 64, 128] as const)
      cases.push({
        name: `err-${quantize}-g${group}`,
        H: 256,
        F: 512,
        E: 4,
        k: 2,
        T: 32,
        dtype: 'float32' as const,
        quantize,
        group,
        seed: 30 + group,
        routing: 'softmax-topk-renorm' as const,
      });
  return cases;
}
