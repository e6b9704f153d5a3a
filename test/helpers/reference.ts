/**
 * An independent float64 reference of the MoE block (docs/ARCHITECTURE.md), plus seeded random data
 * and 16-bit encoders. Written from the math, sharing no code with the package.
 */

/** mulberry32: a small seeded PRNG, so every test input is reproducible. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Uniform values in [-scale, scale], never exactly zero. */
export function randomF32(n: number, rand: () => number, scale = 1): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    let v = (rand() * 2 - 1) * scale;
    if (v === 0) v = scale * 1e-3;
    a[i] = v;
  }
  return a;
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** float -> bfloat16 bits, round to nearest even. */
export function toBf16(v: number): number {
  f32[0] = v;
  const b = u32[0];
  if ((b & 0x7fffffff) > 0x7f800000) return ((b >>> 16) | 0x40) & 0xffff;
  return ((b + 0x7fff + ((b >>> 16) & 1)) >>> 16) & 0xffff;
}

export function fromBf16(h: number): number {
  u32[0] = (h & 0xffff) << 16;
  return f32[0];
}

/** Activations as a set with a bf16 dot product sees them (referenceMoe's quantAct): rounded to bf16. */
export function bf16Activations(row: Float64Array): Float64Array {
  return row.map((v) => fromBf16(toBf16(v)));
}

/** float -> IEEE half bits, round to nearest even (values here stay in the normal range). */
export function toF16(v: number): number {
  f32[0] = v;
  const b = u32[0];
  const sign = (b >>> 16) & 0x8000;
  const exp = ((b >>> 23) & 0xff) - 127 + 15;
  let man = b & 0x7fffff;
  if (((b >>> 23) & 0xff) === 0xff) return sign | 0x7c00 | (man ? 0x200 : 0);
  if (exp >= 31) return sign | 0x7c00;
  if (exp <= 0) {
    if (exp < -10) return sign;
    man |= 0x800000;
    const shift = 14 - exp;
    const half = 1 << (shift - 1);
    let r = man >>> shift;
    const rem = man & ((1 << shift) - 1);
    if (rem > half || (rem === half && r & 1)) r++;
    return sign | r;
  }
  let h = (exp << 10) | (man >>> 13);
  const rem = man & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && h & 1)) h++;
  return sign | h;
}

export function fromF16(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const man = h & 0x3ff;
  if (exp === 0) return sign * man * 2 ** -24;
  if (exp === 31) return man ? NaN : sign * Infinity;
  return sign * (1 + man / 1024) * 2 ** (exp - 15);
}

export type Dtype = 'float32' | 'bfloat16' | 'float16';

/** Encodes float values in the stored dtype, and returns the exact values the kernels will see. */
export function encode(
  values: Float32Array,
  dtype: Dtype,
): { stored: Float32Array | Uint16Array; exact: Float64Array } {
  if (dtype === 'float32') return { stored: values, exact: Float64Array.from(values) };
  const enc = dtype === 'bfloat16' ? toBf16 : toF16;
  const dec = dtype === 'bfloat16' ? fromBf16 : fromF16;
  const stored = new Uint16Array(values.length);
  const exact = new Float64Array(values.length);
  for (let i = 0; i < values.length; i++) {
    stored[i] = enc(values[i]);
    exact[i] = dec(stored[i]);
  }
  return { stored, exact };
}

export interface RefLayer {
  H: number;
  F: number;
  E: number;
  k: number;
  renorm: boolean;
  gate: ArrayLike<number>; // [E, H]
  w1: ArrayLike<number>; // [E, F, H]
  w3: ArrayLike<number>; // [E, F, H]
  w2: ArrayLike<number>; // [E, H, F]
}

/** Top-k of one token's logits in float64: ties to the lower index, NaN never beats a number. */
export function referenceRoute(logits: number[], k: number, renorm: boolean): { ids: number[]; w: number[] } {
  const finite = logits.filter((v) => !Number.isNaN(v));
  const mx = Math.max(...finite);
  const ex = logits.map((v) => (Number.isNaN(v) ? NaN : mx === Infinity ? (v === Infinity ? 1 : 0) : Math.exp(v - mx)));
  const sum = ex.reduce((s, v) => (Number.isNaN(v) ? s : s + v), 0);
  const p = ex.map((v) => v / sum);
  const order = p
    .map((v, i) => i)
    .sort((a, b) => {
      const na = Number.isNaN(p[a]),
        nb = Number.isNaN(p[b]);
      if (na !== nb) return na ? 1 : -1;
      if (!na && p[a] !== p[b]) return p[b] - p[a];
      return a - b;
    });
  const ids = order.slice(0, k);
  const picked = ids.reduce((s, i) => s + p[i], 0);
  const w = ids.map((i) => (renorm ? p[i] / picked : p[i]));
  return { ids, w };
}

/**
 * out[T, H] in float64. `quantAct`, when given, models kernels that narrow the activations before a
 * product: it maps each token's x row (before w1 / w3) and each h row, rounded to float32 as the kernels
 * hold it (before w2), to the values the products then see.
 */
export function referenceMoe(
  L: RefLayer,
  x: ArrayLike<number>,
  T: number,
  quantAct?: (row: Float64Array) => Float64Array,
): Float64Array {
  const { H, F, E, k } = L;
  const out = new Float64Array(T * H);
  const h = new Float64Array(F);
  for (let t = 0; t < T; t++) {
    const xr = quantAct ? quantAct(Float64Array.from({ length: H }, (_, i) => x[t * H + i])) : undefined;
    const logits: number[] = [];
    for (let e = 0; e < E; e++) {
      let s = 0;
      for (let i = 0; i < H; i++) s += L.gate[e * H + i] * x[t * H + i];
      logits.push(s);
    }
    const { ids, w } = referenceRoute(logits, k, L.renorm);
    for (let j = 0; j < k; j++) {
      const e = ids[j];
      for (let f = 0; f < F; f++) {
        let a = 0,
          b = 0;
        const base = (e * F + f) * H;
        for (let i = 0; i < H; i++) {
          const xi = xr ? xr[i] : x[t * H + i];
          a += L.w1[base + i] * xi;
          b += L.w3[base + i] * xi;
        }
        h[f] = (a / (1 + Math.exp(-a))) * b;
      }
      const hr = quantAct ? quantAct(h.map(Math.fround)) : h;
      for (let o = 0; o < H; o++) {
        let s = 0;
        const base = (e * H + o) * F;
        for (let f = 0; f < F; f++) s += L.w2[base + f] * hr[f];
        out[t * H + o] += w[j] * s;
      }
    }
  }
  return out;
}

/** ||a - ref|| / ||ref|| in float64. */
export function relL2(a: ArrayLike<number>, ref: ArrayLike<number>): number {
  let num = 0,
    den = 0;
  for (let i = 0; i < ref.length; i++) {
    num += (a[i] - ref[i]) ** 2;
    den += ref[i] ** 2;
  }
  return Math.sqrt(num / den);
}

export interface Case {
  H: number;
  F: number;
  E: number;
  k: number;
  T: number;
  dtype: Dtype;
  routing: 'softmax-topk-renorm' | 'softmax-topk';
  seed: number;
}

/**
 * Added to every case's seed: FUSED_MOE_TEST_SEED=n runs the same cases on other random data, to look
 * for a bound that only holds by luck.
 */
const seedOffset = Number(process.env.FUSED_MOE_TEST_SEED ?? 0) | 0;

/** Random layer + input for a case: stored weights for the package, exact values for the reference. */
export function makeCase(c: Case) {
  const rand = rng(c.seed + seedOffset);
  const { H, F, E, T } = c;
  // Scales keep activations O(1): gate logits spread enough that routing is not a coin toss.
  const gate = randomF32(E * H, rand, 2 / Math.sqrt(H));
  const w1 = encode(randomF32(E * F * H, rand, 1 / Math.sqrt(H)), c.dtype);
  const w3 = encode(randomF32(E * F * H, rand, 1 / Math.sqrt(H)), c.dtype);
  const w2 = encode(randomF32(E * H * F, rand, 1 / Math.sqrt(F)), c.dtype);
  const x = randomF32(T * H, rand, 1);
  const ref: RefLayer = {
    H,
    F,
    E,
    k: c.k,
    renorm: c.routing === 'softmax-topk-renorm',
    gate,
    w1: w1.exact,
    w3: w3.exact,
    w2: w2.exact,
  };
  return {
    config: { hiddenSize: H, intermediateSize: F, numExperts: E, topK: c.k, routing: c.routing, weightDtype: c.dtype },
    weights: { gate, w1: w1.stored, w3: w3.stored, w2: w2.stored },
    x,
    ref,
  };
}

/**
 * Tolerance of the relative L2 error by weight dtype for the CUDA backend, whose tensor-core path
 * narrows the activations to the 16-bit weight dtype. The CPU sets have bounds derived from their
 * arithmetic (helpers/tolerance.ts).
 */
export function tolerance(dtype: Dtype): number {
  return dtype === 'float32' ? 1e-5 : 1e-2;
}

/**
 * xoshiro128** seeded through splitmix32 from a seed of up to 53 bits: the stream the native sampler
 * (csrc/cpu/sampler.h) draws from, written here from the algorithms' definitions, so that tests can
 * replay a sampler's uniform numbers.
 */
export class Xoshiro128 {
  readonly #s = new Uint32Array(4);

  constructor(seed: number) {
    let x = (seed >>> 0) ^ Math.imul(Math.floor(seed / 2 ** 32) >>> 0, 0x9e3779b9);
    for (let i = 0; i < 4; i++) {
      x = (x + 0x9e3779b9) >>> 0;
      let z = x;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
      this.#s[i] = (z ^ (z >>> 16)) >>> 0;
    }
  }

  /** A uniform number in [0, 1), a multiple of 2^-32. */
  next(): number {
    const s = this.#s;
    const rotl = (v: number, k: number) => ((v << k) | (v >>> (32 - k))) >>> 0;
    const r = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return r / 2 ** 32;
  }
}
