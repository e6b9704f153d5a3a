/** Correctness of the CPU layer against the float64 reference, across shapes, k, routings and dtypes. */
import { MoeLayer, backendInfo } from '../lib';
import { Case, encode, makeCase, randomF32, referenceMoe, referenceRoute, relL2, rng } from './helpers/reference';
import { FLOAT32_TOL, weightTolerance } from './helpers/tolerance';

function run(c: Case) {
  const { config, weights, x, ref } = makeCase(c);
  const layer = new MoeLayer(config, weights);
  try {
    const y = layer.forwardSync(x);
    return { y, want: referenceMoe(ref, x, c.T), layer };
  } finally {
    layer.dispose();
  }
}

/** layer.route(x) picks the experts, and gives the weights, of the float64 reference on router `gate`. */
function expectReferenceRoute(layer: MoeLayer, c: Case, gate: ArrayLike<number>, x: Float32Array, renorm: boolean) {
  const { experts, weights: w } = layer.route(x);
  for (let t = 0; t < c.T; t++) {
    const logits = Array.from({ length: c.E }, (_, e) => {
      let s = 0;
      for (let i = 0; i < c.H; i++) s += gate[e * c.H + i] * x[t * c.H + i];
      return s;
    });
    const r = referenceRoute(logits, c.k, renorm);
    expect(Array.from(experts.subarray(t * c.k, (t + 1) * c.k))).toEqual(r.ids);
    for (let j = 0; j < c.k; j++) expect(w[t * c.k + j]).toBeCloseTo(r.w[j], 6);
  }
}

const base = { routing: 'softmax-topk-renorm' as const, dtype: 'float32' as const };
const cases: Case[] = [
  { ...base, H: 72, F: 200, E: 6, k: 2, T: 37, seed: 1 },
  { ...base, H: 64, F: 128, E: 8, k: 2, T: 16, seed: 2 },
  { ...base, H: 72, F: 200, E: 6, k: 1, T: 37, seed: 3 },
  { ...base, H: 72, F: 200, E: 6, k: 4, T: 37, seed: 4 },
  { ...base, H: 33, F: 17, E: 3, k: 3, T: 5, seed: 5 },
  { ...base, H: 72, F: 200, E: 6, k: 2, T: 37, seed: 6, routing: 'softmax-topk' },
  { ...base, H: 40, F: 24, E: 256, k: 8, T: 9, seed: 7 },
  { ...base, H: 72, F: 200, E: 6, k: 2, T: 1, seed: 8 },
  { ...base, H: 72, F: 200, E: 6, k: 2, T: 37, seed: 9, dtype: 'bfloat16' },
  { ...base, H: 72, F: 200, E: 6, k: 2, T: 37, seed: 10, dtype: 'float16' },
  { ...base, H: 64, F: 96, E: 8, k: 4, T: 20, seed: 11, dtype: 'bfloat16', routing: 'softmax-topk' },
  { ...base, H: 256, F: 512, E: 8, k: 2, T: 300, seed: 12 },
];

describe(`MoeLayer on the CPU (${backendInfo().cpu.isa})`, () => {
  test.each(cases)('H=$H F=$F E=$E k=$k T=$T $dtype $routing', (c) => {
    const { y, want } = run(c);
    const err = relL2(y, want);
    expect(err).toBeLessThan(weightTolerance(backendInfo().cpu.isa ?? '', c.dtype));
    expect(Number.isFinite(err)).toBe(true);
  });

  test('per-expert weight arrays give the same bits as one [E, ...] array', () => {
    const c: Case = { ...base, H: 72, F: 200, E: 6, k: 2, T: 11, seed: 20 };
    const { config, weights, x } = makeCase(c);
    const split = (a: Float32Array | Uint16Array, per: number) =>
      Array.from({ length: c.E }, (_, e) => a.slice(e * per, (e + 1) * per));
    const whole = new MoeLayer(config, weights);
    const parts = new MoeLayer(config, {
      gate: weights.gate,
      w1: split(weights.w1, c.F * c.H),
      w3: split(weights.w3, c.F * c.H),
      w2: split(weights.w2, c.H * c.F),
    });
    expect(Buffer.from(parts.forwardSync(x).buffer)).toEqual(Buffer.from(whole.forwardSync(x).buffer));
    whole.dispose();
    parts.dispose();
  });

  test('a prefill of many rows an expert (items of single panels) gives each token the bits it gets alone', () => {
    // About 700 rows an expert: one unit of 8 panels would be 128 columns x 2,080 FLOPs a cell x 700 rows,
    // over the item cap (cpu_backend.cpp tile_items), so the items are cut in single panels; F and H are
    // not whole panels, so the last panel of each is partial.
    for (const dtype of ['float32', 'bfloat16'] as const) {
      const c: Case = { ...base, H: 520, F: 1000, E: 2, k: 1, T: 1400, seed: 22, dtype };
      const { config, weights, x } = makeCase(c);
      const layer = new MoeLayer(config, weights);
      try {
        const { experts } = layer.route(x);
        const rows = [0, 0];
        for (const e of experts) rows[e]++;
        expect(Math.min(...rows)).toBeGreaterThan(500);
        const all = layer.forwardSync(x);
        for (let t = 0; t < c.T; t += 37) {
          const alone = layer.forwardSync(x.subarray(t * c.H, (t + 1) * c.H));
          expect(Buffer.from(alone.buffer)).toEqual(Buffer.from(all.buffer, t * c.H * 4, c.H * 4));
        }
      } finally {
        layer.dispose();
      }
    }
  });

  test('weights are copied: the caller may overwrite its arrays after construction', () => {
    const c: Case = { ...base, H: 32, F: 48, E: 4, k: 2, T: 7, seed: 21 };
    const { config, weights, x, ref } = makeCase(c);
    const want = referenceMoe(ref, x, c.T);
    const layer = new MoeLayer(config, weights);
    (weights.w1 as Float32Array).fill(7);
    weights.gate.fill(-3);
    expect(relL2(layer.forwardSync(x), want)).toBeLessThan(FLOAT32_TOL);
    layer.dispose();
  });

  test('x with a byteOffset is read in place (subarray views)', () => {
    const c: Case = { ...base, H: 24, F: 40, E: 4, k: 2, T: 6, seed: 22 };
    const { config, weights, x, ref } = makeCase(c);
    const layer = new MoeLayer(config, weights);
    const padded = new Float32Array(x.length + 5);
    padded.set(x, 3);
    const view = padded.subarray(3, 3 + x.length);
    const outBuf = new Float32Array(x.length + 2);
    const out = outBuf.subarray(1, 1 + x.length);
    layer.forwardSync(view, { out });
    expect(relL2(out, referenceMoe(ref, x, c.T))).toBeLessThan(FLOAT32_TOL);
    expect(outBuf[0]).toBe(0);
    expect(outBuf[x.length + 1]).toBe(0);
    layer.dispose();
  });

  test('out may alias x', () => {
    const c: Case = { ...base, H: 24, F: 40, E: 4, k: 2, T: 6, seed: 23 };
    const { config, weights, x, ref } = makeCase(c);
    const layer = new MoeLayer(config, weights);
    const want = referenceMoe(ref, x, c.T);
    const buf = Float32Array.from(x);
    layer.forwardSync(buf, { out: buf });
    expect(relL2(buf, want)).toBeLessThan(FLOAT32_TOL);
    layer.dispose();
  });

  test('route() matches the reference top-k and weights', () => {
    for (const routing of ['softmax-topk-renorm', 'softmax-topk'] as const) {
      const c: Case = { ...base, H: 48, F: 16, E: 12, k: 3, T: 50, seed: 24, routing };
      const { config, weights, x, ref } = makeCase(c);
      const layer = new MoeLayer(config, weights);
      expectReferenceRoute(layer, c, ref.gate, x, ref.renorm);
      layer.dispose();
    }
  });

  // Such a router is kept in bf16 and widened as it is read: at one token (the portable kernel, over
  // experts) and at 50 (the kernel set's, over tokens) the routing and the output follow the reference
  // of the same values.
  test('a router of bf16 values routes and computes as the reference says', () => {
    for (const T of [1, 3, 50]) {
      const c: Case = { ...base, H: 52, F: 24, E: 13, k: 3, T, seed: 31 + T };
      const { config, weights, x, ref } = makeCase(c);
      const exact = encode(weights.gate as Float32Array, 'bfloat16').exact;
      const gate = Float32Array.from(exact);
      const layer = new MoeLayer(config, { ...weights, gate });
      try {
        expectReferenceRoute(layer, c, exact, x, ref.renorm);
        const err = relL2(layer.forwardSync(x), referenceMoe({ ...ref, gate: exact }, x, T));
        expect(err).toBeLessThan(weightTolerance(backendInfo().cpu.isa ?? '', c.dtype));
      } finally {
        layer.dispose();
      }
    }
  });

  test('ties: identical router rows pick the lower expert index', () => {
    const H = 16,
      F = 8,
      E = 6,
      k = 2,
      T = 4;
    const rand = rng(25);
    const row = randomF32(H, rand);
    const gate = new Float32Array(E * H);
    for (let e = 0; e < E; e++) gate.set(row, e * H); // all logits equal
    const layer = new MoeLayer(
      { hiddenSize: H, intermediateSize: F, numExperts: E, topK: k },
      { gate, w1: randomF32(E * F * H, rand), w3: randomF32(E * F * H, rand), w2: randomF32(E * H * F, rand) },
    );
    const { experts, weights } = layer.route(randomF32(T * H, rand));
    for (let t = 0; t < T; t++) {
      expect([experts[t * k], experts[t * k + 1]]).toEqual([0, 1]);
      expect(weights[t * k]).toBeCloseTo(0.5, 6);
    }
    // Two equal maxima among others: expert 4 and 2 tie; 2 comes first.
    gate.fill(0);
    gate.set(row, 2 * H);
    gate.set(row, 4 * H);
    const layer2 = new MoeLayer(
      { hiddenSize: H, intermediateSize: F, numExperts: E, topK: 1 },
      { gate, w1: randomF32(E * F * H, rand), w3: randomF32(E * F * H, rand), w2: randomF32(E * H * F, rand) },
    );
    const x = Float32Array.from(row); // logits for experts 2 and 4 are |row|^2 > 0
    expect(layer2.route(x).experts[0]).toBe(2);
    layer.dispose();
    layer2.dispose();
  });

  test('NaN and Inf input never crash and never pick an out-of-range expert', () => {
    const c: Case = { ...base, H: 24, F: 40, E: 5, k: 2, T: 6, seed: 26 };
    const { config, weights, x } = makeCase(c);
    const layer = new MoeLayer(config, weights);
    x[0] = NaN; // token 0: every logit NaN
    x[c.H + 3] = Infinity; // token 1: logits +-Inf or NaN
    x[2 * c.H + 1] = -Infinity;
    const { experts } = layer.route(x);
    for (const e of experts) expect(e >= 0 && e < c.E).toBe(true);
    const y = layer.forwardSync(x);
    expect(y.length).toBe(x.length);
    // Tokens untouched by the bad values stay finite.
    for (let i = 3 * c.H; i < y.length; i++) expect(Number.isFinite(y[i])).toBe(true);
    // A NaN weight row: that expert's output is NaN when picked, but routing still works.
    const nanGate = Float32Array.from(weights.gate);
    nanGate.fill(NaN, 0, c.H); // expert 0's logit is always NaN: never picked while others are finite
    const l2 = new MoeLayer(config, { ...weights, gate: nanGate });
    const r = l2.route(makeCase({ ...c, seed: 27 }).x);
    for (const e of r.experts) expect(e).not.toBe(0);
    layer.dispose();
    l2.dispose();
  });

  test('T = 0 gives an empty result', async () => {
    const { config, weights } = makeCase({ ...base, H: 8, F: 8, E: 2, k: 1, T: 1, seed: 28 });
    const layer = new MoeLayer(config, weights);
    expect(layer.forwardSync(new Float32Array(0)).length).toBe(0);
    expect((await layer.forward(new Float32Array(0))).length).toBe(0);
    layer.dispose();
  });

  test('16-bit weights decode exactly as the reference encoder says (bf16 and f16 round trip)', () => {
    const v = randomF32(1000, rng(29), 3);
    for (const dt of ['bfloat16', 'float16'] as const) {
      const { exact } = encode(v, dt);
      expect(relL2(exact, Float64Array.from(v))).toBeLessThan(dt === 'bfloat16' ? 4e-3 : 5e-4);
    }
  });
});
