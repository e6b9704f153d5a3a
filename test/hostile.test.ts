/**
 * Hostile input, property-based: random configs and garbage for every argument. Each case either
 * computes the right answer or throws TypeError / RangeError / MoeError with a message; the process
 * stays healthy (a crash would kill the jest worker and fail the suite).
 */
import fc from 'fast-check';
import { AbortError, MoeError, MoeLayer } from '../lib';
import { binding } from '../lib/binding';
import { makeCase, referenceMoe, relL2 } from './helpers/reference';

const expectedError = (e: unknown) =>
  (e instanceof TypeError || e instanceof RangeError || e instanceof MoeError || e instanceof AbortError) &&
  typeof (e as Error).message === 'string' &&
  (e as Error).message.length > 10;

function attempt(fn: () => unknown): void {
  try {
    fn();
  } catch (e) {
    if (!expectedError(e)) throw e;
  }
}

const garbage = fc.oneof(
  fc.constantFrom(
    undefined,
    null,
    NaN,
    Infinity,
    -Infinity,
    -1,
    0,
    0.5,
    2 ** 53,
    2 ** 64,
    -(2 ** 31),
    '',
    'float32',
    {},
    [],
    () => 1,
  ),
  fc.integer(),
  fc.double(),
  fc.string(),
  fc.constant(new Float32Array(3)),
  fc.constant(new Uint16Array(5)),
  fc.constant(new Float64Array(4)),
  fc.constant(new SharedArrayBuffer(8)),
  fc.constant(new Float32Array(new SharedArrayBuffer(64))),
  fc.constant(new DataView(new ArrayBuffer(8))),
);

describe('hostile input', () => {
  const good = makeCase({ H: 16, F: 24, E: 4, k: 2, T: 3, dtype: 'float32', routing: 'softmax-topk-renorm', seed: 90 });

  test('random values for every config field never crash', () => {
    const keys = [
      'hiddenSize',
      'intermediateSize',
      'numExperts',
      'topK',
      'routing',
      'weightDtype',
      'device',
      'threads',
      'cudaDevice',
    ];
    fc.assert(
      fc.property(fc.constantFrom(...keys), garbage, (key, value) => {
        attempt(() => new MoeLayer({ ...good.config, [key]: value } as never, good.weights).dispose());
      }),
      { numRuns: 300, seed: 1 },
    );
  });

  test('random sizes, including huge ones, never allocate past what they are given', () => {
    const size = fc.oneof(
      fc.integer({ min: -5, max: 70 }),
      fc.constantFrom(2 ** 20, 2 ** 21, 2 ** 31, 2 ** 53, 1e300),
      fc.double(),
    );
    fc.assert(
      fc.property(size, size, size, size, (H, F, E, k) => {
        const n = (a: number) => (Number.isSafeInteger(a) && a > 0 && a < 5000 ? a : 4);
        const w = {
          gate: new Float32Array(n(E) * n(H)),
          w1: new Float32Array(64),
          w3: new Float32Array(64),
          w2: new Float32Array(64),
        };
        attempt(() => new MoeLayer({ hiddenSize: H, intermediateSize: F, numExperts: E, topK: k }, w).dispose());
      }),
      { numRuns: 300, seed: 2 },
    );
  });

  test('random garbage for weights and call arguments never crashes', async () => {
    const layer = new MoeLayer(good.config, good.weights);
    await fc.assert(
      fc.asyncProperty(
        fc.constantFrom('gate', 'w1', 'w3', 'w2', 'x', 'out', 'options', 'signal'),
        garbage,
        async (what, value) => {
          if (['gate', 'w1', 'w3', 'w2'].includes(what)) {
            attempt(() => new MoeLayer(good.config, { ...good.weights, [what]: value } as never).dispose());
            attempt(() =>
              new MoeLayer(good.config, { ...good.weights, [what]: [value, value, value, value] } as never).dispose(),
            );
            return;
          }
          const call = (fn: () => unknown) => attempt(fn);
          if (what === 'x') {
            call(() => layer.forwardSync(value as never));
            call(() => layer.route(value as never));
            await layer.forward(value as never).catch((e) => expect(expectedError(e)).toBe(true));
          } else if (what === 'out') {
            call(() => layer.forwardSync(good.x, { out: value as never }));
            await layer.forward(good.x, { out: value as never }).catch((e) => expect(expectedError(e)).toBe(true));
          } else if (what === 'options') {
            call(() => layer.forwardSync(good.x, value as never));
            await layer.forward(good.x, value as never).catch((e) => expect(expectedError(e)).toBe(true));
          } else {
            await layer.forward(good.x, { signal: value as never }).catch((e) => expect(expectedError(e)).toBe(true));
          }
        },
      ),
      { numRuns: 300, seed: 3 },
    );
    // Still right after all that.
    expect(relL2(layer.forwardSync(good.x), referenceMoe(good.ref, good.x, 3))).toBeLessThan(1e-5);
    layer.dispose();
  });

  test('detached, shared, misaligned and aliased arrays', async () => {
    const layer = new MoeLayer(good.config, good.weights);
    const want = referenceMoe(good.ref, good.x, 3);
    // Detached x and out.
    const x = Float32Array.from(good.x);
    structuredClone(x.buffer, { transfer: [x.buffer] });
    expect(layer.forwardSync(x).length).toBe(0); // a detached array reads as empty: T = 0
    // SharedArrayBuffer views work like any other memory.
    const sx = new Float32Array(new SharedArrayBuffer(good.x.byteLength));
    sx.set(good.x);
    expect(relL2(layer.forwardSync(sx), want)).toBeLessThan(1e-5);
    expect(relL2(await layer.forward(sx), want)).toBeLessThan(1e-5);
    // 16-bit weights at an odd byte offset cannot exist: Uint16Array itself refuses the view.
    expect(() => new Uint16Array(new ArrayBuffer(64), 1, 4)).toThrow(RangeError);
    // out aliasing x, sync and async.
    const buf = Float32Array.from(good.x);
    layer.forwardSync(buf, { out: buf });
    expect(relL2(buf, want)).toBeLessThan(1e-5);
    const buf2 = Float32Array.from(good.x);
    await layer.forward(buf2, { out: buf2 });
    expect(relL2(buf2, want)).toBeLessThan(1e-5);
    // out detached while the forward runs: a clear error, not a write into freed memory.
    const out = new Float32Array(good.x.length);
    const p = layer.forward(good.x, { out });
    structuredClone(out.buffer, { transfer: [out.buffer] });
    await expect(p).rejects.toMatchObject({ code: 'ERR_MOE_SHAPE' });
    // x mutated while a forward runs: the result is the one for x at call time.
    const xm = Float32Array.from(good.x);
    const pm = layer.forward(xm);
    xm.fill(NaN);
    expect(relL2(await pm, want)).toBeLessThan(1e-5);
    // A subclass whose length lies: the sizes are those of the memory the native side reads.
    class Liar extends Float32Array {
      get length(): number {
        return good.x.length;
      }
    }
    expect(layer.forwardSync(new Liar(0)).length).toBe(0);
    expect((await layer.forward(new Liar(0))).length).toBe(0);
    const liar = Liar.from(good.x.subarray(0, good.config.hiddenSize)) as Liar;
    expect(layer.forwardSync(liar)).toHaveLength(good.config.hiddenSize);
    expect(() => layer.forwardSync(good.x, { out: new Liar(0) })).toThrow(
      expect.objectContaining({ code: 'ERR_MOE_SHAPE', message: expect.stringMatching(/options\.out.*got 0/) }),
    );
    layer.dispose();
  });

  test('MoeLayer.create: random garbage for config, weights and options rejects cleanly', async () => {
    const keys = [
      'hiddenSize',
      'numExperts',
      'topK',
      'weightDtype',
      'quantize',
      'gate',
      'w1',
      'w2',
      'options',
      'stepMs',
      'signal',
    ];
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...keys), garbage, async (key, value) => {
        const config = ['hiddenSize', 'numExperts', 'topK', 'weightDtype', 'quantize'].includes(key)
          ? { ...good.config, [key]: value }
          : good.config;
        const weights = ['gate', 'w1', 'w2'].includes(key) ? { ...good.weights, [key]: value } : good.weights;
        const options = key === 'options' ? value : key === 'stepMs' || key === 'signal' ? { [key]: value } : undefined;
        try {
          (await MoeLayer.create(config as never, weights as never, options as never)).dispose();
        } catch (e) {
          expect(expectedError(e)).toBe(true);
        }
      }),
      { numRuns: 200, seed: 4 },
    );
  });

  test('the raw builder: misuse is an error, never a crash', () => {
    // Typed loosely: the calls below break the builder's contract on purpose.
    type LooseBuilder = {
      step(...args: unknown[]): boolean;
      progress(): number;
      finish(): { forwardSync(x: Float32Array, out: Float32Array): void; dispose(): void };
    };
    const raw = binding() as unknown as { NativeBuilder: new (cfg?: object) => LooseBuilder };
    const cfg = { ...good.config, device: 'cpu', threads: 0, cudaDevice: 0, quantize: 'none', quantGroupSize: 128 };
    const per = (a: Float32Array, n: number) => Array.from({ length: 4 }, (_, e) => a.subarray(e * n, (e + 1) * n));
    const w = [
      good.weights.gate,
      per(good.weights.w1 as Float32Array, 24 * 16),
      per(good.weights.w3 as Float32Array, 24 * 16),
      per(good.weights.w2 as Float32Array, 24 * 16),
    ];
    const b = new raw.NativeBuilder(cfg);
    expect(() => b.finish()).toThrow(/not fully built/);
    // (errors from the addon belong to the main realm, not jest's sandbox: matched by message)
    expect(() => b.step()).toThrow(/weights\.gate must be a Float32Array/);
    expect(() => b.step(w[0], w[1], w[2], [1, 2, 3, 4], 5)).toThrow(/weights\.w2\[0\]/);
    while (!b.step(...w, 0)) b.progress();
    expect(b.step(...w, 0)).toBe(true);
    const layer = b.finish();
    expect(() => b.finish()).toThrow(/already finished/);
    const y = new Float32Array(good.x.length);
    layer.forwardSync(good.x, y);
    expect(relL2(y, referenceMoe(good.ref, good.x, 3))).toBeLessThan(1e-5);
    layer.dispose();
    expect(() => new raw.NativeBuilder()).toThrow(/config must be an object/);
    expect(() => new raw.NativeBuilder({ ...cfg, topK: 9 })).toThrow(/top/i);
    expect(() => new raw.NativeBuilder({ ...cfg, device: 'tpu' })).toThrow(/device/);
  });

  test('a huge but valid layer fails with ERR_MOE_OUT_OF_MEMORY, not an abort or the OOM killer', () => {
    // 512 experts that all share one 64 MiB array: valid, cheap for the caller, but the packed copy
    // would need 96 GiB.
    const H = 4096,
      F = 4096,
      E = 512;
    const one = new Uint16Array(F * H).fill(0x3c00);
    const experts = new Array(E).fill(one);
    let caught: unknown;
    try {
      new MoeLayer(
        { hiddenSize: H, intermediateSize: F, numExperts: E, topK: 2, weightDtype: 'float16' },
        { gate: new Float32Array(E * H), w1: experts, w3: experts, w2: experts },
      );
    } catch (e) {
      caught = e;
    }
    expect(caught).toBeInstanceOf(MoeError);
    expect(caught).toMatchObject({ code: 'ERR_MOE_OUT_OF_MEMORY' });
    expect((caught as Error).message).toMatch(/needs \d+ MiB but only \d+ MiB are available/);
  });
});
