/**
 * A float64 reference of the MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3),
 * written from the routing each family's modeling code describes: softmax or sigmoid scores, a bias
 * added for the choice only, group-limited top-k (a group ranks by its best score or the sum of its
 * two best), the picked scores renormalised or not, a routed scale, and a shared expert (optionally
 * gated by sigmoid(gate . x)) added to every token. It shares no code with the package: the choice
 * here is a sort, the package scans.
 */
import { encode, Dtype, randomF32, rng } from './reference';

export type FamilyRouting = 'softmax-topk-renorm' | 'softmax-topk' | 'sigmoid-topk' | 'sigmoid-topk-renorm';

export interface Groups {
  count: number;
  topK: number;
  score: 'max' | 'top2-sum';
}

export interface RouteRule {
  E: number;
  k: number;
  routing: FamilyRouting;
  routedScale: number;
  groups: Groups | null;
  bias?: ArrayLike<number>;
}

/** Sort order of the picks: larger first, NaN after every number, ties to the lower index. */
function byRank(v: ArrayLike<number>) {
  return (a: number, b: number) => {
    const na = Number.isNaN(v[a]),
      nb = Number.isNaN(v[b]);
    if (na !== nb) return na ? 1 : -1;
    if (!na && v[a] !== v[b]) return v[b] - v[a];
    return a - b;
  };
}

/** The experts and weights one token's logits route to. */
export function familyRoute(logits: ArrayLike<number>, r: RouteRule): { ids: number[]; w: number[] } {
  const { E, k } = r;
  const sigmoid = r.routing.startsWith('sigmoid');
  let scores: number[];
  if (sigmoid) {
    scores = Array.from(logits, (l) => 1 / (1 + Math.exp(-l)));
  } else {
    const finite = Array.from(logits).filter((v) => !Number.isNaN(v));
    const mx = Math.max(...finite);
    const ex = Array.from(logits, (v) =>
      Number.isNaN(v) ? NaN : mx === Infinity ? (v === Infinity ? 1 : 0) : Math.exp(v - mx),
    );
    const sum = ex.reduce((s, v) => (Number.isNaN(v) ? s : s + v), 0);
    scores = ex.map((v) => v / sum);
  }
  const choice = scores.map((s, e) => s + (r.bias ? r.bias[e] : 0));
  let candidates = Array.from({ length: E }, (_, e) => e);
  if (r.groups) {
    const per = E / r.groups.count;
    const groupScore = Array.from({ length: r.groups.count }, (_, g) => {
      const members = Array.from({ length: per }, (_, i) => g * per + i).sort(byRank(choice));
      return r.groups!.score === 'max' ? choice[members[0]] : choice[members[0]] + choice[members[1]];
    });
    const kept = new Set(
      Array.from({ length: r.groups.count }, (_, g) => g)
        .sort(byRank(groupScore))
        .slice(0, r.groups.topK),
    );
    candidates = candidates.filter((e) => kept.has(Math.floor(e / per)));
  }
  const ids = candidates.sort(byRank(choice)).slice(0, k);
  const picked = ids.map((e) => scores[e]);
  const sum = picked.reduce((s, v) => s + v, 0);
  const denom = r.routing === 'sigmoid-topk-renorm' ? sum + 1e-20 : r.routing === 'softmax-topk-renorm' ? sum : 1;
  return { ids, w: picked.map((v) => (v / denom) * r.routedScale) };
}

export interface FamilyLayer extends RouteRule {
  H: number;
  F: number;
  Fs: number;
  gate: ArrayLike<number>; // [E, H]
  w1: ArrayLike<number>; // [E, F, H]
  w3: ArrayLike<number>;
  w2: ArrayLike<number>; // [E, H, F]
  shared?: { w1: ArrayLike<number>; w3: ArrayLike<number>; w2: ArrayLike<number>; gate?: ArrayLike<number> };
}

/** Logits as the layer rounds them: the float64 dot product stored as float32. */
export function familyLogits(L: { H: number; E: number; gate: ArrayLike<number> }, x: ArrayLike<number>, t: number) {
  const out = new Float64Array(L.E);
  for (let e = 0; e < L.E; e++) {
    let s = 0;
    for (let i = 0; i < L.H; i++) s += L.gate[e * L.H + i] * x[t * L.H + i];
    out[e] = Math.fround(s);
  }
  return out;
}

/** y[H] += scale * SwiGLU expert (w1, w3 [F, H] at base1; w2 [H, F] at base2) applied to x. */
function addExpert(
  y: Float64Array,
  scale: number,
  x: ArrayLike<number>,
  H: number,
  F: number,
  w1: ArrayLike<number>,
  w3: ArrayLike<number>,
  w2: ArrayLike<number>,
  base1: number,
  base2: number,
  act?: (row: Float64Array) => Float64Array,
): void {
  const h = new Float64Array(F);
  for (let f = 0; f < F; f++) {
    let a = 0,
      b = 0;
    for (let i = 0; i < H; i++) {
      a += w1[base1 + f * H + i] * x[i];
      b += w3[base1 + f * H + i] * x[i];
    }
    h[f] = (a / (1 + Math.exp(-a))) * b;
  }
  const hr = act ? act(h.map(Math.fround)) : h;
  for (let o = 0; o < H; o++) {
    let s = 0;
    for (let f = 0; f < F; f++) s += w2[base2 + o * F + f] * hr[f];
    y[o] += scale * s;
  }
}

/**
 * The whole block for T tokens. act: how a kernel set narrows the activations (x and h) before the
 * expert products, as referenceMoe's quantAct.
 */
export function familyForward(
  L: FamilyLayer,
  x: ArrayLike<number>,
  T: number,
  act?: (row: Float64Array) => Float64Array,
): Float64Array {
  const { H, F, Fs } = L;
  const out = new Float64Array(T * H);
  for (let t = 0; t < T; t++) {
    const xt = Float64Array.from({ length: H }, (_, i) => x[t * H + i]);
    const xa = act ? act(xt) : xt;
    const y = out.subarray(t * H, (t + 1) * H);
    const { ids, w } = familyRoute(familyLogits(L, x, t), L);
    ids.forEach((e, j) => addExpert(y, w[j], xa, H, F, L.w1, L.w3, L.w2, e * F * H, e * H * F, act));
    if (L.shared && Fs > 0) {
      let g = 1;
      if (L.shared.gate) {
        let s = 0;
        for (let i = 0; i < H; i++) s += L.shared.gate[i] * xt[i];
        g = 1 / (1 + Math.exp(-Math.fround(s)));
      }
      addExpert(y, g, xa, H, Fs, L.shared.w1, L.shared.w3, L.shared.w2, 0, 0, act);
    }
  }
  return out;
}

/** A family-shaped layer config (the MoeLayer fields) and the reference's view of it. */
export interface FamilyCase {
  name: string;
  H: number;
  F: number;
  E: number;
  k: number;
  T: number;
  routing: FamilyRouting;
  routedScale?: number;
  groups?: Groups | null;
  Fs?: number;
  sharedGate?: boolean;
  bias?: boolean;
  dtype: Dtype;
  seed: number;
}

/** The six families at small odd sizes, each with its own routing. */
export function familyCases(dtype: Dtype, seed: number, T = 13): FamilyCase[] {
  const c = (f: Omit<FamilyCase, 'dtype' | 'seed' | 'T'>, i: number): FamilyCase => ({
    ...f,
    dtype,
    T,
    seed: seed + i,
  });
  return [
    { name: 'mixtral', H: 40, F: 36, E: 8, k: 2, routing: 'softmax-topk-renorm' as const },
    {
      name: 'qwen2-moe',
      H: 40,
      F: 20,
      E: 60,
      k: 4,
      routing: 'softmax-topk' as const,
      Fs: 52,
      sharedGate: true,
    },
    { name: 'qwen3-moe', H: 40, F: 12, E: 128, k: 8, routing: 'softmax-topk-renorm' as const },
    { name: 'olmoe', H: 40, F: 12, E: 64, k: 8, routing: 'softmax-topk' as const },
    {
      name: 'deepseek-v2',
      H: 40,
      F: 12,
      E: 64,
      k: 6,
      routing: 'softmax-topk' as const,
      routedScale: 16,
      groups: { count: 8, topK: 3, score: 'max' as const },
      Fs: 24,
    },
    {
      name: 'deepseek-v3',
      H: 40,
      F: 12,
      E: 256,
      k: 8,
      routing: 'sigmoid-topk-renorm' as const,
      routedScale: 2.5,
      groups: { count: 8, topK: 4, score: 'top2-sum' as const },
      Fs: 12,
      bias: true,
    },
  ].map(c);
}

/** Random weights and input for a case: what MoeLayer takes and the exact values the reference sees. */
export function makeFamilyCase(c: FamilyCase) {
  const rand = rng(c.seed);
  const { H, F, E, T } = c;
  const Fs = c.Fs ?? 0;
  const gate = randomF32(E * H, rand, 2 / Math.sqrt(H));
  const w1 = encode(randomF32(E * F * H, rand, 1 / Math.sqrt(H)), c.dtype);
  const w3 = encode(randomF32(E * F * H, rand, 1 / Math.sqrt(H)), c.dtype);
  const w2 = encode(randomF32(E * H * F, rand, 1 / Math.sqrt(F)), c.dtype);
  const x = randomF32(T * H, rand, 1);
  // DeepSeek-V3's correction bias is of the order of the spread of the sigmoid scores.
  const bias = c.bias ? randomF32(E, rand, 0.05) : undefined;
  const s1 = encode(randomF32(Fs * H, rand, 1 / Math.sqrt(H)), c.dtype);
  const s3 = encode(randomF32(Fs * H, rand, 1 / Math.sqrt(H)), c.dtype);
  const s2 = encode(randomF32(H * Fs, rand, 1 / Math.sqrt(Math.max(Fs, 1))), c.dtype);
  const sgate = c.sharedGate ? randomF32(H, rand, 2 / Math.sqrt(H)) : undefined;
  const config = {
    hiddenSize: H,
    intermediateSize: F,
    numExperts: E,
    topK: c.k,
    routing: c.routing,
    weightDtype: c.dtype,
    routedScale: c.routedScale ?? 1,
    expertGroups: c.groups ?? null,
    sharedIntermediateSize: Fs,
    sharedGate: c.sharedGate ?? false,
  };
  const weights = {
    gate,
    w1: w1.stored,
    w3: w3.stored,
    w2: w2.stored,
    ...(bias ? { scoreBias: bias } : {}),
    ...(Fs > 0 ? { shared: { w1: s1.stored, w3: s3.stored, w2: s2.stored, ...(sgate ? { gate: sgate } : {}) } } : {}),
  };
  const ref: FamilyLayer = {
    H,
    F,
    E,
    k: c.k,
    Fs,
    routing: c.routing,
    routedScale: c.routedScale ?? 1,
    groups: c.groups ?? null,
    bias,
    gate,
    w1: w1.exact,
    w3: w3.exact,
    w2: w2.exact,
    shared: Fs > 0 ? { w1: s1.exact, w3: s3.exact, w2: s2.exact, gate: sgate } : undefined,
  };
  return { config, weights, x, ref };
}
