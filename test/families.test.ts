/**
 * The MoE families on the kernel set this process runs: routing (sigmoid scores, bias, groups,
 * scaling) against the float64 reference of helpers/families-reference.ts at E = 60, 64, 128 and 256
 * and k = 1, 4, 6, 8, the rules for ties and NaN, and every family's whole block, shared expert
 * included, in each weight format. families-kernels.test.ts repeats the blocks on every kernel set.
 */
import { binding } from '../lib/binding';
import { MoeLayer } from '../lib/layer';
import { bf16Activations, randomF32, relL2, rng } from './helpers/reference';
import { dequantizeRows, quantizedActivations, quantizeRows } from './helpers/quant';
import { FLOAT32_TOL, narrowedTolerance, narrowsBf16, weightTolerance } from './helpers/tolerance';
import {
  FamilyCase,
  familyCases,
  familyForward,
  familyLogits,
  familyRoute,
  FamilyRouting,
  Groups,
  makeFamilyCase,
} from './helpers/families-reference';

const isa = binding().backendInfo().cpu.isa as string;

/** A layer whose experts do not matter (F = 1): for routing checks. */
function routingLayer(
  H: number,
  E: number,
  k: number,
  routing: FamilyRouting,
  extra: { routedScale?: number; groups?: Groups; bias?: Float32Array; gate: Float32Array },
) {
  return new MoeLayer(
    {
      hiddenSize: H,
      intermediateSize: 1,
      numExperts: E,
      topK: k,
      routing,
      routedScale: extra.routedScale,
      expertGroups: extra.groups,
    },
    {
      gate: extra.gate,
      w1: new Float32Array(E * H),
      w3: new Float32Array(E * H),
      w2: new Float32Array(E * H),
      ...(extra.bias ? { scoreBias: extra.bias } : {}),
    },
  );
}

/** route() of every token against the reference: same experts in the same order, weights to 1e-6. */
function expectRoutes(
  layer: MoeLayer,
  x: Float32Array,
  H: number,
  rule: Parameters<typeof familyRoute>[1],
  gate: Float32Array,
) {
  const T = x.length / H;
  const got = layer.route(x);
  const { k } = rule;
  for (let t = 0; t < T; t++) {
    const want = familyRoute(familyLogits({ H, E: rule.E, gate }, x, t), rule);
    expect(Array.from(got.experts.subarray(t * k, (t + 1) * k))).toEqual(want.ids);
    const w = got.weights.subarray(t * k, (t + 1) * k);
    want.w.forEach((v, j) => {
      if (Number.isNaN(v)) expect(w[j]).toBeNaN();
      else expect(Math.abs(w[j] - v)).toBeLessThanOrEqual(1e-6 * Math.max(1, Math.abs(v)));
    });
  }
  return got;
}

describe('routing against the float64 reference', () => {
  const H = 23;
  const shapes: [number, number, Groups | undefined][] = [
    [60, 1, undefined],
    [60, 4, { count: 6, topK: 2, score: 'max' }],
    [64, 6, { count: 8, topK: 3, score: 'max' }],
    [64, 8, undefined],
    [128, 8, undefined],
    [256, 8, { count: 8, topK: 4, score: 'top2-sum' }],
    [256, 1, { count: 8, topK: 4, score: 'max' }],
    [256, 6, { count: 8, topK: 4, score: 'top2-sum' }],
  ];
  const routings: FamilyRouting[] = ['softmax-topk-renorm', 'softmax-topk', 'sigmoid-topk', 'sigmoid-topk-renorm'];
  let seed = 100;
  for (const [E, k, groups] of shapes)
    for (const routing of routings)
      test(`E=${E} k=${k} ${routing}${groups ? ` groups ${groups.count}/${groups.topK} ${groups.score}` : ''}`, () => {
        const rand = rng(seed++);
        const gate = randomF32(E * H, rand, 2 / Math.sqrt(H));
        const bias = routing.startsWith('sigmoid') ? randomF32(E, rand, 0.05) : undefined;
        const routedScale = 1 + Math.floor(rand() * 4) / 2;
        const x = randomF32(17 * H, rand, 1);
        const layer = routingLayer(H, E, k, routing, { routedScale, groups, bias, gate });
        try {
          const got = expectRoutes(layer, x, H, { E, k, routing, routedScale, groups: groups ?? null, bias }, gate);
          if (groups) {
            // Every pick lies in one of the topK groups.
            const per = E / groups.count;
            for (let t = 0; t < 17; t++) {
              const g = new Set(Array.from(got.experts.subarray(t * k, (t + 1) * k), (e) => Math.floor(e / per)));
              expect(g.size).toBeLessThanOrEqual(groups.topK);
            }
          }
        } finally {
          layer.dispose();
        }
      });
});

describe('routing rules', () => {
  test('ties go to the lower expert and the lower group', () => {
    const H = 5,
      E = 16;
    // Experts 2, 3 and 9 share one router row: equal logits. Groups of 4: group 0 (2, 3) and group 2 (9)
    // tie on 'max'; the lower group is kept.
    const rand = rng(7);
    const gate = randomF32(E * H, rand, 0.1);
    const row = randomF32(H, rand, 3);
    for (const e of [2, 3, 9]) gate.set(row, e * H);
    const x = Float32Array.from(row.map((v) => Math.sign(v)));
    for (const routing of ['softmax-topk-renorm', 'sigmoid-topk'] as const) {
      const plain = routingLayer(H, E, 3, routing, { gate });
      expect(Array.from(plain.route(x).experts)).toEqual([2, 3, 9]);
      const grouped = routingLayer(H, E, 2, routing, { gate, groups: { count: 4, topK: 1, score: 'max' } });
      expect(Array.from(grouped.route(x).experts)).toEqual([2, 3]);
      plain.dispose();
      grouped.dispose();
    }
  });

  test('NaN ranks below every number and never picks an expert of a dropped group', () => {
    const H = 3,
      E = 8;
    // Expert 1's router row is NaN. Groups of 2; group 0 (experts 0, 1) wins on expert 0's score.
    const gate = new Float32Array(E * H).fill(0);
    gate.set([4, 0, 0], 0);
    gate.set([NaN, 0, 0], 1 * H);
    for (let e = 2; e < E; e++) gate.set([1 - e * 0.1, 0, 0], e * H);
    const x = new Float32Array([1, 0, 0]);
    for (const routing of ['softmax-topk-renorm', 'sigmoid-topk-renorm'] as FamilyRouting[]) {
      const plain = routingLayer(H, E, 2, routing, { gate });
      const r = expectRoutes(plain, x, H, { E, k: 2, routing, routedScale: 1, groups: null }, gate);
      expect(Array.from(r.experts)).toEqual([0, 2]);
      const grouped = routingLayer(H, E, 2, routing, { gate, groups: { count: 4, topK: 1, score: 'max' } });
      const g = expectRoutes(
        grouped,
        x,
        H,
        { E, k: 2, routing, routedScale: 1, groups: { count: 4, topK: 1, score: 'max' } },
        gate,
      );
      expect(Array.from(g.experts)).toEqual([0, 1]);
      plain.dispose();
      grouped.dispose();
    }
  });

  test('a score bias flips the choice while the weights stay the unbiased scores', () => {
    const H = 11,
      E = 64,
      k = 6;
    const rand = rng(31);
    const gate = randomF32(E * H, rand, 2 / Math.sqrt(H));
    const x = randomF32(H, rand, 1);
    const groups: Groups = { count: 8, topK: 4, score: 'top2-sum' };
    const rule = { E, k, routing: 'sigmoid-topk-renorm' as const, routedScale: 2.5, groups };
    const unbiased = familyRoute(familyLogits({ H, E, gate }, x, 0), rule);
    // Push the worst expert above every other: its own score (not score + bias) must weigh it.
    const logits = familyLogits({ H, E, gate }, x, 0);
    const worst = Array.from(logits).indexOf(Math.min(...logits));
    const bias = new Float32Array(E);
    bias[worst] = 1;
    const layer = routingLayer(H, E, k, rule.routing, { routedScale: 2.5, groups, bias, gate });
    const got = expectRoutes(layer, x, H, { ...rule, bias }, gate);
    expect(unbiased.ids).not.toContain(worst);
    expect(got.experts[0]).toBe(worst);
    const s = Array.from(got.experts, (e) => 1 / (1 + Math.exp(-logits[e])));
    const sum = s.reduce((a, b) => a + b, 0);
    expect(got.weights[0]).toBeCloseTo((2.5 * s[0]) / sum, 6);
    layer.dispose();
  });
});

function expectBlock(c: FamilyCase, tol: (c: FamilyCase) => number, act?: (row: Float64Array) => Float64Array) {
  const { config, weights, x, ref } = makeFamilyCase(c);
  const layer = new MoeLayer(config, weights);
  try {
    const y = layer.forwardSync(x);
    const want = familyForward(ref, x, c.T, act);
    expect(relL2(y, want)).toBeLessThan(tol(c));
    // Every token alone gives the same bits as in the batch.
    for (const t of [0, c.T - 1]) {
      const alone = layer.forwardSync(x.subarray(t * c.H, (t + 1) * c.H));
      expect(Buffer.from(alone.buffer).equals(Buffer.from(y.buffer, t * c.H * 4, c.H * 4))).toBe(true);
    }
  } finally {
    layer.dispose();
  }
}

describe.each(['float32', 'bfloat16', 'float16'] as const)('every family, %s weights', (dtype) => {
  for (const c of familyCases(dtype, dtype === 'float32' ? 200 : dtype === 'bfloat16' ? 300 : 400))
    test(c.name, () => {
      const narrowed = narrowsBf16(isa, dtype);
      // A set that narrows to bf16 is compared with a reference that narrows the same way.
      const act = narrowed ? bf16Activations : undefined;
      expectBlock(c, () => (narrowed ? narrowedTolerance('bf16', c) : weightTolerance(isa, dtype)), act);
    });
});

describe.each(['int8', 'int4'] as const)('the shared expert quantized to %s', (quantize) => {
  // The routed and the shared experts go through the same quantized kernels: the reference sees the
  // dequantized weights of both, and the activations narrowed as this set narrows them.
  const info = binding().backendInfo().cpu;
  const bits = (quantize === 'int8' ? info.int8Activations : info.int4Activations) as string;
  const g = 32;
  for (const c of familyCases('float32', 500, 5).filter((f) => (f.Fs ?? 0) > 0))
    test(c.name, () => {
      const { config, weights, x, ref } = makeFamilyCase({ ...c, H: 64, F: 32 });
      const H = 64;
      const deq = (w: Float32Array | Uint16Array, K: number) =>
        dequantizeRows(quantizeRows(w as Float32Array, K, quantize, g), K, g);
      const layer = new MoeLayer({ ...config, quantize, quantGroupSize: g }, weights);
      try {
        const s = weights.shared!;
        const qref = {
          ...ref,
          w1: deq(weights.w1 as Float32Array, H),
          w3: deq(weights.w3 as Float32Array, H),
          w2: deq(weights.w2 as Float32Array, ref.F),
          shared: { ...ref.shared!, w1: deq(s.w1, H), w3: deq(s.w3, H), w2: deq(s.w2, ref.Fs) },
        };
        const act = bits === 'float32' ? undefined : quantizedActivations(bits === 'int16' ? 16 : 8, g);
        const y = layer.forwardSync(x);
        const tol =
          bits === 'float32'
            ? FLOAT32_TOL
            : narrowedTolerance(bits === 'int16' ? 'int16' : 'int8', { H, F: 32, T: c.T, k: 1 });
        expect(relL2(y, familyForward(qref, x, c.T, act))).toBeLessThan(tol);
      } finally {
        layer.dispose();
      }
    });
});

describe('config and weights validation', () => {
  const H = 8,
    E = 8;
  const cfg = { hiddenSize: H, intermediateSize: 4, numExperts: E, topK: 2 };
  const w = () => ({
    gate: new Float32Array(E * H),
    w1: new Float32Array(E * 4 * H),
    w3: new Float32Array(E * 4 * H),
    w2: new Float32Array(E * H * 4),
  });
  const bad: [object, object, ErrorConstructor, RegExp][] = [
    [{ routedScale: '2' }, {}, TypeError, /config\.routedScale must be a number/],
    [{ routedScale: 0 }, {}, RangeError, /config\.routedScale must be a finite number > 0, got 0/],
    [{ routedScale: Infinity }, {}, RangeError, /config\.routedScale/],
    [{ expertGroups: 4 }, {}, TypeError, /config\.expertGroups must be an object/],
    [
      { expertGroups: { count: 3, topK: 1 } },
      {},
      RangeError,
      /config\.expertGroups\.count must divide numExperts \(8\)/,
    ],
    [
      { expertGroups: { count: 4, topK: 5 } },
      {},
      RangeError,
      /config\.expertGroups\.topK must be an integer in \[1, 4\]/,
    ],
    [
      { expertGroups: { count: 4, topK: 1, score: 'sum' } },
      {},
      RangeError,
      /config\.expertGroups\.score must be one of 'max', 'top2-sum'/,
    ],
    [{ expertGroups: { count: 8, topK: 1, score: 'top2-sum' } }, {}, RangeError, /at least 2 experts per group/],
    [{ topK: 3, expertGroups: { count: 4, topK: 1 } }, {}, RangeError, /config\.topK \(3\) must be at most/],
    [{ sharedIntermediateSize: -1 }, {}, RangeError, /config\.sharedIntermediateSize/],
    [{ sharedGate: 1, sharedIntermediateSize: 4 }, {}, TypeError, /config\.sharedGate must be a boolean/],
    [{ sharedGate: true }, {}, RangeError, /config\.sharedGate needs a shared expert/],
    [{}, { scoreBias: new Float32Array(E - 1) }, RangeError, /weights\.scoreBias must have 8 elements/],
    [{}, { scoreBias: new Float32Array(E).fill(NaN) }, RangeError, /weights\.scoreBias must hold finite numbers/],
    [
      {},
      { shared: { w1: new Float32Array(1) } },
      RangeError,
      /weights\.shared is given but config\.sharedIntermediateSize is 0/,
    ],
    [{ sharedIntermediateSize: 4 }, {}, TypeError, /weights\.shared must be an object with w1, w3 and w2/],
    [
      { sharedIntermediateSize: 4 },
      { shared: { w1: new Float32Array(32), w3: new Float32Array(32), w2: new Float32Array(31) } },
      RangeError,
      /weights\.shared\.w2 must have 32 elements/,
    ],
    [
      { sharedIntermediateSize: 4, sharedGate: true },
      { shared: { w1: new Float32Array(32), w3: new Float32Array(32), w2: new Float32Array(32) } },
      TypeError,
      /weights\.shared\.gate must be a Float32Array/,
    ],
  ];
  test.each(bad.map((b, i) => [i, ...b]))('case %i', (_i, c, extra, Err, message) => {
    expect(() => new MoeLayer({ ...cfg, ...(c as object) } as never, { ...w(), ...(extra as object) })).toThrow(
      Err as ErrorConstructor,
    );
    expect(() => new MoeLayer({ ...cfg, ...(c as object) } as never, { ...w(), ...(extra as object) })).toThrow(
      message as RegExp,
    );
  });

  test('the config reports the filled-in defaults', () => {
    const layer = new MoeLayer(cfg, w());
    expect(layer.config).toMatchObject({
      routedScale: 1,
      expertGroups: null,
      sharedIntermediateSize: 0,
      sharedGate: false,
    });
    layer.dispose();
  });
});
