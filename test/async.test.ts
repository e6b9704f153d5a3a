/** forward() off the event loop: same bits as forwardSync, concurrency, dispose and abort. */
import { AbortError, MoeLayer } from '../lib';
import { makeCase, referenceMoe, relL2 } from './helpers/reference';

const bits = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);

describe('forward() on a worker thread', () => {
  const c = makeCase({ H: 72, F: 200, E: 6, k: 2, T: 37, dtype: 'float32', routing: 'softmax-topk-renorm', seed: 60 });

  test('forward equals forwardSync bit for bit', async () => {
    const layer = new MoeLayer(c.config, c.weights);
    const a = await layer.forward(c.x);
    const b = layer.forwardSync(c.x);
    expect(bits(a)).toEqual(bits(b));
    expect(relL2(a, referenceMoe(c.ref, c.x, 37))).toBeLessThan(1e-5);
    layer.dispose();
  });

  test('forward writes into options.out and resolves with it', async () => {
    const layer = new MoeLayer(c.config, c.weights);
    const out = new Float32Array(c.x.length);
    const y = await layer.forward(c.x, { out });
    expect(y).toBe(out);
    expect(bits(out)).toEqual(bits(layer.forwardSync(c.x)));
    layer.dispose();
  });

  test('many concurrent forwards on one layer and on several give the serial answers', async () => {
    const layers = [0, 1, 2].map(() => new MoeLayer(c.config, c.weights));
    const inputs = Array.from({ length: 12 }, (_, i) => c.x.subarray(0, (1 + (i % 5)) * 72 * 7).slice());
    const want = inputs.map((x) => bits(layers[0].forwardSync(x)));
    const got = await Promise.all(inputs.map((x, i) => layers[i % 3].forward(x)));
    got.forEach((y, i) => expect(bits(y)).toEqual(want[i]));
    layers.forEach((l) => l.dispose());
  });

  test('mutating x after forward() starts does not change the result', async () => {
    const layer = new MoeLayer(c.config, c.weights);
    const x = Float32Array.from(c.x);
    const want = bits(layer.forwardSync(x));
    const p = layer.forward(x);
    x.fill(123);
    expect(bits(await p)).toEqual(want);
    layer.dispose();
  });

  test('dispose() during a pending forward: the forward finishes, later calls throw', async () => {
    const layer = new MoeLayer(c.config, c.weights);
    const want = bits(layer.forwardSync(c.x));
    const pending = [layer.forward(c.x), layer.forward(c.x)];
    layer.dispose();
    for (const y of await Promise.all(pending)) expect(bits(y)).toEqual(want);
    await expect(layer.forward(c.x)).rejects.toMatchObject({ code: 'ERR_MOE_DISPOSED' });
  });

  test('an already-aborted signal rejects at once with AbortError', async () => {
    const layer = new MoeLayer(c.config, c.weights);
    const ac = new AbortController();
    ac.abort();
    await expect(layer.forward(c.x, { signal: ac.signal })).rejects.toBeInstanceOf(AbortError);
    layer.dispose();
  });

  test('the event loop keeps ticking while a large forward runs', async () => {
    // The forward must last long enough to tell a free loop from a blocked one on any machine: grow T
    // from each run's own rate until one run takes at least 400 ms.
    const H = 512;
    const big = makeCase({ H, F: 1024, E: 4, k: 2, T: 64, dtype: 'float32', routing: 'softmax-topk-renorm', seed: 61 });
    const layer = new MoeLayer(big.config, big.weights);
    await layer.forward(big.x); // warm-up
    let T = 256;
    let result = { elapsed: 0, ticks: 0, maxGap: 0 };
    for (let attempt = 0; attempt < 6; attempt++) {
      const x = new Float32Array(T * H).map((_, i) => Math.sin(i));
      let ticks = 0;
      let maxGap = 0;
      let last = performance.now();
      const timer = setInterval(() => {
        const now = performance.now();
        maxGap = Math.max(maxGap, now - last);
        last = now;
        ticks++;
      }, 5);
      const t0 = performance.now();
      await layer.forward(x);
      const elapsed = performance.now() - t0;
      clearInterval(timer);
      result = { elapsed, ticks, maxGap };
      if (elapsed >= 400 || T >= 65536) break;
      T = Math.min(65536, Math.ceil((T * 600) / Math.max(elapsed, 1)));
    }
    layer.dispose();
    // A blocked loop would tick once (or not at all) during the forward, its gap the whole forward. A
    // free one ticks every 5 ms, but on a loaded machine the OS may hold it back for tens of ms (up to
    // 60 ms seen with two other busy processes on 2 cores), so the bounds are relative to this forward:
    // an average gap under 40 ms, the longest under half the forward.
    expect(result.elapsed).toBeGreaterThan(100);
    expect(result.ticks).toBeGreaterThan(result.elapsed / 40);
    expect(result.maxGap).toBeLessThan(result.elapsed / 2);
  });
});
