/**
 * The CUDA backend against the float64 reference: dtypes, odd sizes, decode and prefill batch sizes, k,
 * routings, determinism, batch invariance and routing. Skipped where no CUDA device is usable; there, the
 * errors and the 'auto' fallback are checked instead.
 */
import { MoeLayer, backendInfo } from '../lib';
import { Case, makeCase, referenceMoe, referenceRoute, relL2, tolerance } from './helpers/reference';

const cuda = backendInfo().cuda;
const withCuda = cuda.available ? describe : describe.skip;
const withoutCuda = cuda.available ? describe.skip : describe;

const base = { routing: 'softmax-topk-renorm' as const, dtype: 'float32' as const };
const odd = { H: 72, F: 200, E: 6, k: 2, T: 37 };
const mixtralish = { H: 256, F: 512, E: 8, k: 2 };

function cudaLayer(c: Case) {
  const made = makeCase(c);
  const layer = new MoeLayer({ ...made.config, device: 'cuda' }, made.weights);
  return { ...made, layer };
}

function bits(a: Float32Array): Buffer {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
}

/** Router logits of one token in float64, for the reference top-k. */
function logitsOf(gate: Float32Array, x: Float32Array, t: number, H: number, E: number): number[] {
  const out: number[] = [];
  for (let e = 0; e < E; e++) {
    let s = 0;
    for (let i = 0; i < H; i++) s += gate[e * H + i] * x[t * H + i];
    out.push(s);
  }
  return out;
}

withCuda(`MoeLayer on CUDA (${cuda.devices[0]?.name ?? 'no device'})`, () => {
  const cases: Case[] = [];
  for (const dtype of ['float32', 'bfloat16', 'float16'] as const) {
    cases.push({ ...base, ...odd, dtype, seed: 101 });
    cases.push({ ...base, ...mixtralish, T: 1, dtype, seed: 102 });
    cases.push({ ...base, ...mixtralish, T: 16, dtype, seed: 103 });
  }
  cases.push(
    { ...base, ...mixtralish, T: 300, seed: 104 },
    { ...base, ...mixtralish, T: 300, dtype: 'bfloat16', seed: 105 },
    { ...base, ...mixtralish, T: 300, dtype: 'float16', seed: 106, routing: 'softmax-topk' },
    { ...base, ...odd, k: 1, seed: 107 },
    { ...base, ...odd, k: 4, seed: 108 },
    { ...base, ...odd, k: 1, dtype: 'bfloat16', seed: 109, routing: 'softmax-topk' },
    { ...base, ...odd, k: 4, dtype: 'bfloat16', seed: 110 },
    { ...base, ...odd, seed: 111, routing: 'softmax-topk' },
    { ...base, H: 40, F: 24, E: 256, k: 8, T: 9, seed: 112 },
    { ...base, H: 33, F: 17, E: 3, k: 3, T: 5, dtype: 'float16', seed: 113 },
  );

  test.each(cases)('H=$H F=$F E=$E k=$k T=$T $dtype $routing', (c) => {
    const { layer, x, ref } = cudaLayer(c);
    try {
      expect(layer.device).toBe('cuda');
      const y = layer.forwardSync(x);
      const err = relL2(y, referenceMoe(ref, x, c.T));
      expect(Number.isFinite(err)).toBe(true);
      expect(err).toBeLessThan(tolerance(c.dtype));
    } finally {
      layer.dispose();
    }
  });

  test.each(['float32', 'bfloat16'] as const)(
    'forward is bit-identical run to run, sync or async (%s)',
    async (dtype) => {
      const { layer, x } = cudaLayer({ ...base, ...mixtralish, T: 300, dtype, seed: 120 });
      try {
        const a = layer.forwardSync(x);
        const b = layer.forwardSync(x);
        const c = await layer.forward(x);
        expect(bits(b)).toEqual(bits(a));
        expect(bits(c)).toEqual(bits(a));
      } finally {
        layer.dispose();
      }
    },
  );

  test.each(['float32', 'bfloat16', 'float16'] as const)(
    'a token gives the same bits alone as inside a batch (%s)',
    (dtype) => {
      // T = 300 runs the prefill tiles, T = 1 the decode tiles: the bits must not depend on which.
      const c: Case = { ...base, ...mixtralish, T: 300, dtype, seed: 121 };
      const { layer, x } = cudaLayer(c);
      try {
        const all = layer.forwardSync(x);
        for (const t of [0, 150, 299]) {
          const one = layer.forwardSync(x.slice(t * c.H, (t + 1) * c.H));
          expect(bits(one)).toEqual(bits(all.subarray(t * c.H, (t + 1) * c.H)));
        }
        const some = layer.forwardSync(x.slice(100 * c.H, 117 * c.H));
        expect(bits(some)).toEqual(bits(all.subarray(100 * c.H, 117 * c.H)));
      } finally {
        layer.dispose();
      }
    },
  );

  test.each([
    { ...base, ...odd, seed: 130 },
    { ...base, ...odd, k: 4, seed: 131, routing: 'softmax-topk' as const },
    { ...base, ...mixtralish, T: 300, dtype: 'bfloat16' as const, seed: 132 },
  ])('route() picks the reference top-k (k=$k $routing)', (c) => {
    const { layer, x, weights } = cudaLayer(c);
    try {
      const { experts, weights: w } = layer.route(x);
      expect(experts.length).toBe(c.T * c.k);
      let compared = 0;
      for (let t = 0; t < c.T; t++) {
        const logits = logitsOf(weights.gate, x, t, c.H, c.E);
        // Skip near ties, where float32 logits may legitimately order two experts differently.
        const sorted = [...logits].sort((a, b) => b - a);
        if (c.k < c.E && sorted[c.k - 1] - sorted[c.k] < 1e-4) continue;
        const want = referenceRoute(logits, c.k, c.routing === 'softmax-topk-renorm');
        expect(Array.from(experts.subarray(t * c.k, (t + 1) * c.k))).toEqual(want.ids);
        for (let j = 0; j < c.k; j++) expect(w[t * c.k + j]).toBeCloseTo(want.w[j], 5);
        compared++;
      }
      expect(compared).toBeGreaterThan(c.T / 2);
    } finally {
      layer.dispose();
    }
  });

  test('non-finite input: no crash, expert ids in range, other tokens unchanged', () => {
    const c: Case = { ...base, H: 64, F: 128, E: 8, k: 2, T: 8, dtype: 'bfloat16', seed: 140 };
    const { layer, x } = cudaLayer(c);
    try {
      const clean = layer.forwardSync(x);
      const bad = x.slice();
      bad[2 * c.H + 3] = NaN;
      bad[5 * c.H + 1] = Infinity;
      const y = layer.forwardSync(bad);
      for (const t of [0, 1, 3, 4, 6, 7])
        expect(bits(y.subarray(t * c.H, (t + 1) * c.H))).toEqual(bits(clean.subarray(t * c.H, (t + 1) * c.H)));
      const { experts } = layer.route(bad);
      for (const e of experts) {
        expect(e).toBeGreaterThanOrEqual(0);
        expect(e).toBeLessThan(c.E);
      }
    } finally {
      layer.dispose();
    }
  });
});

withoutCuda('device: cuda where CUDA is not available', () => {
  const c: Case = { ...base, H: 32, F: 48, E: 4, k: 2, T: 3, seed: 150 };

  test("device 'cuda' throws ERR_MOE_NO_DEVICE carrying the reason", () => {
    const { config, weights } = makeCase(c);
    expect(typeof cuda.reason).toBe('string');
    let caught: unknown;
    try {
      new MoeLayer({ ...config, device: 'cuda' }, weights).dispose();
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(Error);
    expect((caught as { code?: string }).code).toBe('ERR_MOE_NO_DEVICE');
    expect((caught as Error).message).toContain(cuda.reason as string);
  });

  test("device 'auto' falls back to the CPU", () => {
    const { config, weights, x, ref } = makeCase(c);
    const layer = new MoeLayer({ ...config, device: 'auto' }, weights);
    try {
      expect(layer.device).toBe('cpu');
      expect(relL2(layer.forwardSync(x), referenceMoe(ref, x, c.T))).toBeLessThan(tolerance(c.dtype));
    } finally {
      layer.dispose();
    }
  });
});
