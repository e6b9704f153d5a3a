/**
 * MoeLayer.create(): the layer packed in short steps between turns of the event loop. It must give the
 * same layer as the constructor, bit for bit (every dtype and quantization, sizes that take several
 * slices of rows per matrix), keep the event loop turning, stop on abort, and refuse arrays that are
 * detached while it runs, without reading them again.
 */
import { monitorEventLoopDelay } from 'perf_hooks';
import { AbortError, MoeConfig, MoeLayer, MoeWeights } from '../lib';
import { firstPassing } from './helpers/timing';

const bits = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

type Shape = {
  H: number;
  F: number;
  E: number;
  k: number;
  dtype: 'float32' | 'bfloat16' | 'float16';
  quantize?: 'int8' | 'int4';
  seed: number;
};

/**
 * A layer's arrays from a fast generator (these tests compare two builds of the same weights, so no
 * reference values are needed): uniform floats scaled by 1/sqrt(K); 16-bit weights as random signs,
 * mantissas and small exponents.
 */
// Global lookups (Math.*) are slow inside jest's sandbox: the loops below use a local binding.
const imul = Math.imul;

function layerOf(s: Shape): { config: MoeConfig; weights: MoeWeights; x: Float32Array } {
  let state = s.seed >>> 0 || 1;
  const next = () => (state = (imul(state, 1664525) + 1013904223) >>> 0) / 4294967296;
  const f32 = (n: number, scale: number) => {
    const a = new Float32Array(n);
    for (let i = 0; i < n; i++) a[i] = (next() * 2 - 1) * scale;
    return a;
  };
  const u16 = (n: number) => {
    const a = new Uint16Array(n);
    for (let i = 0; i < n; i++) {
      const v = (next() * 65536) | 0;
      // sign | exponent 4 below the bias .. the bias | mantissa
      a[i] = s.dtype === 'bfloat16' ? (v & 0x807f) | ((123 + (v % 5)) << 7) : (v & 0x83ff) | ((11 + (v % 5)) << 10);
    }
    return a;
  };
  const w = (n: number, K: number) => (s.dtype === 'float32' ? f32(n, 1 / Math.sqrt(K)) : u16(n));
  const { H, F, E } = s;
  return {
    config: {
      hiddenSize: H,
      intermediateSize: F,
      numExperts: E,
      topK: s.k,
      weightDtype: s.dtype,
      quantize: s.quantize ?? 'none',
    },
    weights: { gate: f32(E * H, 2 / Math.sqrt(H)), w1: w(E * F * H, H), w3: w(E * F * H, H), w2: w(E * H * F, F) },
    x: f32(9 * H, 1),
  };
}

describe('MoeLayer.create', () => {
  // H = 1024 float32: a w1/w3 row pair is 8 KiB, so F = 1500 rows take several 4 MiB slices and the last
  // slice ends in a partial panel; w2 rows (6 KiB) too.
  const shapes: Shape[] = [
    { H: 1024, F: 1500, E: 3, k: 2, dtype: 'float32', seed: 90 },
    { H: 1024, F: 1500, E: 3, k: 2, dtype: 'bfloat16', seed: 91 },
    { H: 1000, F: 2100, E: 2, k: 1, dtype: 'float16', seed: 92 },
    { H: 1024, F: 1500, E: 3, k: 2, dtype: 'bfloat16', seed: 93, quantize: 'int4' },
    { H: 72, F: 200, E: 6, k: 2, dtype: 'float32', seed: 94, quantize: 'int8' },
  ];

  test.each(shapes.map((c) => [`${c.dtype}${c.quantize ? ` ${c.quantize}` : ''} H=${c.H} F=${c.F}`, c] as const))(
    '%s: the same bits as the constructor',
    async (_name, c) => {
      const m = layerOf(c);
      const config = m.config;
      const direct = new MoeLayer(config, m.weights);
      const stepped = await MoeLayer.create(config, m.weights, { stepMs: 1 });
      expect(stepped.nativeBytes).toBe(direct.nativeBytes);
      expect(stepped.kernels).toBe(direct.kernels);
      expect(bits(stepped.forwardSync(m.x)).equals(bits(direct.forwardSync(m.x)))).toBe(true);
      expect(bits(await stepped.forward(m.x)).equals(bits(direct.forwardSync(m.x)))).toBe(true);
      direct.dispose();
      stepped.dispose();
    },
  );

  test('the event loop keeps turning while a large layer is packed', async () => {
    // About 200 MB of float32 experts: the constructor holds the loop for all of it.
    const m = layerOf({ H: 1024, F: 4096, E: 4, k: 2, dtype: 'float32', seed: 95 });
    const once = async () => {
      const t0 = performance.now();
      new MoeLayer(m.config, m.weights).dispose();
      const blocking = performance.now() - t0;
      const h = monitorEventLoopDelay({ resolution: 1 });
      h.enable();
      const layer = await MoeLayer.create(m.config, m.weights, { stepMs: 5 });
      h.disable();
      layer.dispose();
      return { count: h.count, maxMs: h.max / 1e6, boundMs: Math.max(blocking / 2, 50) };
    };
    // Here: the constructor blocks about 170 ms; create()'s longest stall is about 20 ms over ~15 turns.
    // A loop held by the build would stall for about `blocking`, timed in this run; half of it leaves
    // room for the OS to hold a free loop back on a loaded machine (tens of ms seen on 2 busy cores, and
    // once 155 ms while other test files ran beside this one). A held loop fails every try; a try that
    // another process stalled is run again.
    const r = await firstPassing(3, once, (m) => m.count > 3 && m.maxMs < m.boundMs);
    expect(r.count).toBeGreaterThan(3);
    expect(r.maxMs).toBeLessThan(r.boundMs);
  });

  test('abort: rejects with AbortError before or during the build', async () => {
    const m = layerOf({ H: 1024, F: 4096, E: 2, k: 1, dtype: 'float32', seed: 96 });
    await expect(MoeLayer.create(m.config, m.weights, { signal: AbortSignal.abort() })).rejects.toBeInstanceOf(
      AbortError,
    );
    const ctl = new AbortController();
    const pending = MoeLayer.create(m.config, m.weights, { signal: ctl.signal, stepMs: 1 });
    setImmediate(() => ctl.abort());
    await expect(pending).rejects.toBeInstanceOf(AbortError);
  });

  test('an array detached during the build: a clear error, and nothing read from it afterwards', async () => {
    const m = layerOf({ H: 1024, F: 4096, E: 2, k: 1, dtype: 'float32', seed: 97 });
    const w2 = (m.weights.w2 as Float32Array).slice();
    const pending = MoeLayer.create(m.config, { ...m.weights, w2 }, { stepMs: 1 });
    setImmediate(() => structuredClone(w2.buffer, { transfer: [w2.buffer] }));
    await expect(pending).rejects.toThrow(/weights\.w2/);
    // The process is fine and builds layers as before.
    const again = await MoeLayer.create(m.config, m.weights);
    expect(again.forwardSync(m.x).every(Number.isFinite)).toBe(true);
    again.dispose();
  });

  test("bad arguments reject with the constructor's errors", async () => {
    const m = layerOf({ H: 32, F: 32, E: 2, k: 1, dtype: 'float32', seed: 98 });
    await expect(MoeLayer.create({ ...m.config, topK: 3 }, m.weights)).rejects.toThrow(/config\.topK/);
    await expect(MoeLayer.create(m.config, { ...m.weights, w1: new Float32Array(5) })).rejects.toThrow(/weights\.w1/);
    await expect(MoeLayer.create(m.config, m.weights, { stepMs: 0 })).rejects.toThrow(RangeError);
    await expect(MoeLayer.create(m.config, m.weights, { signal: {} as AbortSignal })).rejects.toThrow(
      /options\.signal/,
    );
  });
});
