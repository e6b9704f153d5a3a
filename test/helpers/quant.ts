/**
 * An independent float32 model of the load-time quantizer (csrc/core/quant.h), written from its
 * definition: symmetric groups along each row, scale = amax / qmax, code = round-half-even(v / scale)
 * clamped to +-qmax, zero group -> scale 0, a group holding NaN or Inf -> NaN scale, codes 0.
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

/** Quantizes rows of K values in groups of g: scales [rows, ceil(K/g)], codes [rows, K]. */
export function quantizeRows(v: ArrayLike<number>, K: number, kind: QuantKind, g: number): { scales: Float32Array; codes: Int8Array } {
  const q = quantizeRowsTo(v, K, QMAX[kind], g);
  return { scales: q.scales, codes: Int8Array.from(q.codes) };
}

/** The same rule for any qmax (activations: 127 or 32767); codes as plain numbers. */
export function quantizeRowsTo(v: ArrayLike<number>, K: number, qmax: number, g: number): { scales: Float32Array; codes: Int32Array } {
  const rows = v.length / K, ng = Math.ceil(K / g);
  const scales = new Float32Array(rows * ng), codes = new Int32Array(rows * K);
  for (let r = 0; r < rows; r++)
    for (let i = 0; i < ng; i++) {
      const k0 = r * K + i * g, n = Math.min(g, K - i * g);
      let amax = 0, finite = true;
      for (let j = 0; j < n; j++) {
        const x = v[k0 + j];
        if (!Number.isFinite(x)) finite = false;
        else amax = Math.max(amax, Math.abs(x));
      }
      const scale = finite ? Math.fround(amax / qmax) : NaN;
      scales[r * ng + i] = scale;
      if (!finite || scale === 0) continue; // codes stay 0
      for (let j = 0; j < n; j++) {
        const q = roundHalfEven(Math.fround(v[k0 + j] / scale));
        codes[k0 + j] = Math.max(-qmax, Math.min(qmax, q));
      }
    }
  return { scales, codes };
}

/** The values the kernels compute with: code * scale, exactly (float64). */
export function dequantizeRows(q: { scales: Float32Array; codes: ArrayLike<number> }, K: number, g: number): Float64Array {
  const ng = Math.ceil(K / g);
  const out = new Float64Array(q.codes.length);
  for (let i = 0; i < out.length; i++) {
    const r = Math.floor(i / K), k = i % K;
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
