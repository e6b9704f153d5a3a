/**
 * Server-grade behaviour: event-loop delay under load, fair queueing, cancellation, worker threads,
 * memory that stays flat, and determinism across runs, thread counts and batches.
 */
import { execFileSync } from 'child_process';
import * as path from 'path';
import { monitorEventLoopDelay } from 'perf_hooks';
import { Worker } from 'worker_threads';
import { AbortError, MoeLayer } from '../lib';
import { makeCase, randomF32, rng } from './helpers/reference';
import { firstPassing } from './helpers/timing';

const bits = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);
const small = makeCase({ H: 64, F: 96, E: 8, k: 2, T: 3, dtype: 'float32', routing: 'softmax-topk-renorm', seed: 80 });
const large = makeCase({
  H: 512,
  F: 1024,
  E: 8,
  k: 2,
  T: 4,
  dtype: 'float32',
  routing: 'softmax-topk-renorm',
  seed: 81,
});

/** Tokens of the large layer that take about `ms` (measured from a warm run's own rate). */
async function tokensFor(layer: MoeLayer, ms: number): Promise<number> {
  const x = randomF32(256 * 512, rng(82));
  await layer.forward(x);
  const t0 = performance.now();
  await layer.forward(x);
  const perToken = Math.max((performance.now() - t0) / 256, 1e-3);
  return Math.min(40000, Math.max(256, Math.ceil(ms / perToken)));
}

describe('event loop and fairness', () => {
  test('p99 event-loop delay stays far below one forward while forwards run back to back on several layers', async () => {
    const layers = [0, 1, 2].map(() => new MoeLayer(large.config, large.weights));
    // Sized by work (52 GFLOP, 160-600 ms on an idle 2-core machine), so that a loaded machine
    // stretches the forward as it stretches the scheduler's delays, and so that a quarter of a forward
    // stays well above the scheduler's own p99 (17-21 ms seen) on the fastest host.
    const T = 8192;
    await layers[0].forward(large.x); // warm-up
    const x = randomF32(T * 512, rng(83));
    const once = async () => {
      const t1 = performance.now();
      await layers[0].forward(x);
      const oneForwardMs = performance.now() - t1;
      const h = monitorEventLoopDelay({ resolution: 1 });
      h.enable();
      const t0 = performance.now();
      await Promise.all(
        layers.map(async (l) => {
          while (performance.now() - t0 < 2000) await l.forward(x);
        }),
      );
      h.disable();
      // One forward again, right after: a machine loaded by others (another test file, another
      // process) stretches both this forward and the loop's delays.
      const t2 = performance.now();
      await layers[0].forward(x);
      const lastForwardMs = performance.now() - t2;
      // A loop held by the forwards would stall for whole forwards: p99 about one forward, timed in
      // this run. A free loop waits only on the OS scheduler: p99 near 10 ms on an idle 2-core
      // machine, but 30 to 70 ms seen beside other busy processes. So the bound is a quarter of the
      // longer of the two forwards timed around the loop, and never below 20 ms.
      return {
        count: h.count,
        p99Ms: h.percentile(99) / 1e6,
        boundMs: Math.max(20, Math.max(oneForwardMs, lastForwardMs) / 4),
      };
    };
    // A held loop fails every try; a try that another process stalled is run again.
    const r = await firstPassing(3, once, (m) => m.count > 100 && m.p99Ms < m.boundMs);
    layers.forEach((l) => l.dispose());
    expect(r.count).toBeGreaterThan(100);
    expect(r.p99Ms).toBeLessThan(r.boundMs);
  });

  test('a small request is not starved behind long prefills on another layer', async () => {
    const big = new MoeLayer(large.config, large.weights);
    const tiny = new MoeLayer(small.config, small.weights);
    // Sized by work, not by time: the small request waits for at most one of the jobs of about 2 GFLOP
    // (kJobFlops, csrc/cpu/cpu_backend.cpp) that the running prefill is cut into, per phase, so the
    // prefill must hold many jobs on any machine: 4096 tokens are 26 GFLOP, about 13 jobs. Sized by
    // time, a loaded machine measures a low rate and makes the prefill only a few jobs long.
    const T = 4096;
    await big.forward(large.x); // warm-ups: neither layer's first forward is timed
    await tiny.forward(small.x);
    const xb = randomF32(T * 512, rng(84));
    const once = async () => {
      let bigDone = 0;
      let firstBigMs = 0;
      const tb = performance.now();
      const bigs = [0, 1, 2, 3].map(() =>
        big.forward(xb).then(() => {
          if (bigDone++ === 0) firstBigMs = performance.now() - tb;
        }),
      );
      await new Promise((r) => setTimeout(r, 20));
      const t0 = performance.now();
      await tiny.forward(small.x);
      const tinyMs = performance.now() - t0;
      const finishedBefore = bigDone;
      await Promise.all(bigs);
      return { finishedBefore, tinyMs, firstBigMs };
    };
    // Four prefills were queued first; the small request starts beside the running one and its
    // phases interleave with it, so it takes a fraction of one prefill and never waits for a queued
    // one. Both times come from the same stretch of the run, so a machine loaded by others slows
    // them alike. The prefill that was running may finish first when the small request starts late
    // (the 20 ms timer on a loaded machine): one finished prefill is allowed, not two. A queue that
    // made the small request wait behind the prefills fails all three tries.
    const r = await firstPassing(3, once, (m) => m.finishedBefore <= 1 && m.tinyMs < 0.5 * m.firstBigMs);
    big.dispose();
    tiny.dispose();
    expect(r.finishedBefore).toBeLessThanOrEqual(1);
    expect(r.tinyMs).toBeLessThan(0.5 * r.firstBigMs);
  });
});

describe('cancellation', () => {
  test('a request aborted while queued never runs and rejects at once', async () => {
    const big = new MoeLayer(large.config, large.weights);
    const T = await tokensFor(big, 300);
    const xb = randomF32(T * 512, rng(85));
    let settled = 0;
    const running = [big.forward(xb), big.forward(xb)].map((p) => p.finally(() => settled++)); // one runs, one waits
    const ac = new AbortController();
    const queued = big.forward(xb, { signal: ac.signal });
    ac.abort();
    await expect(queued).rejects.toBeInstanceOf(AbortError);
    // At once: before even the running forward (some 300 ms, however loaded the machine) has settled.
    expect(settled).toBe(0);
    await Promise.all(running);
    big.dispose();
  });

  test('a request aborted while running stops early and rejects with AbortError', async () => {
    const big = new MoeLayer(large.config, large.weights);
    const T = await tokensFor(big, 1500);
    const xb = randomF32(T * 512, rng(86));
    const once = async () => {
      const ac = new AbortController();
      const p = big.forward(xb, { signal: ac.signal });
      let abortedAt = 0;
      setTimeout(() => {
        abortedAt = performance.now();
        ac.abort();
      }, 100);
      await expect(p).rejects.toMatchObject({ name: 'AbortError', code: 'ABORT_ERR' });
      const latencyMs = performance.now() - abortedAt;
      const t1 = performance.now();
      await big.forward(xb);
      return { latencyMs, forwardMs: performance.now() - t1 };
    };
    // From the abort to the rejection: one bounded pool job (some 10 ms idle). Timed from the abort
    // itself, so a timer that fires late on a loaded machine does not count, and compared with the
    // whole forward timed right after (some 1500 ms idle; a fixed bound failed when another test
    // loaded the machine). A forward that ran to its end after the abort fails all three tries.
    const r = await firstPassing(3, once, (m) => m.latencyMs < 0.25 * m.forwardMs);
    expect(r.latencyMs).toBeLessThan(0.25 * r.forwardMs);
    // The layer still works after the abort.
    expect(bits(await big.forward(large.x))).toEqual(bits(big.forwardSync(large.x)));
    big.dispose();
  });
});

describe('worker threads', () => {
  const script = path.join(__dirname, 'fixtures', 'worker.js');
  const start = () =>
    new Promise<Worker>((resolve, reject) => {
      const w = new Worker(script, { workerData: { config: small.config, weights: small.weights } });
      w.once('message', () => resolve(w));
      w.once('error', reject);
    });
  const ask = (w: Worker, x: Float32Array) =>
    new Promise<Float32Array>((resolve) => {
      w.once('message', (m) => resolve(m.y));
      w.postMessage({ id: 1, x });
    });

  test('the addon runs in several workers at once and in the main thread, with the same answers', async () => {
    const main = new MoeLayer(small.config, small.weights);
    const want = bits(main.forwardSync(small.x));
    const workers = await Promise.all([start(), start(), start()]);
    const got = await Promise.all(workers.map((w) => ask(w, small.x)));
    for (const y of got) expect(bits(y)).toEqual(want);
    await Promise.all(workers.map((w) => w.terminate()));
    expect(bits(await main.forward(small.x))).toEqual(want);
    main.dispose();
  });

  test('a worker terminated mid-forward leaves the process healthy', async () => {
    const w = new Worker(
      `const { workerData, parentPort } = require('worker_threads');
       const { MoeLayer } = require(${JSON.stringify(path.join(__dirname, '..', 'dist'))});
       const l = new MoeLayer(workerData.config, workerData.weights);
       const x = new Float32Array(4000 * 512).fill(0.25);
       for (let i = 0; i < 4; i++) l.forward(x);
       parentPort.postMessage('started');`,
      { eval: true, workerData: { config: large.config, weights: large.weights } },
    );
    await new Promise((r) => w.once('message', r));
    await new Promise((r) => setTimeout(r, 50));
    await w.terminate();
    const l = new MoeLayer(small.config, small.weights);
    expect(bits(await l.forward(small.x))).toEqual(bits(l.forwardSync(small.x)));
    l.dispose();
  });
});

describe('memory', () => {
  test('forwards and layer churn leave RSS flat; layers collected without dispose() free their memory', () => {
    const measure = () => {
      const out = execFileSync(
        process.execPath,
        ['--expose-gc', path.join(__dirname, 'fixtures', 'memory.js'), '10000'],
        {
          encoding: 'utf8',
          timeout: 300000,
        },
      );
      return JSON.parse(out.trim().split('\n').pop()!);
    };
    // Bounds: allocator arenas may settle a little; a leak of one x per forward would be 150+ MiB, of
    // 1000 layers of 0.6 MiB each 600 MiB, and 200 layers of 25 MiB never disposed 5000 MiB if the GC
    // did not free them.
    const bounds = { forwardRssGrowthMiB: 32, layersRssGrowthMiB: 32, leakedLayersPeakRssGrowthMiB: 1500 };
    const withinBounds = (m: Record<string, number>) => Object.entries(bounds).every(([key, bound]) => m[key] < bound);
    // RSS is the system's view and moved once by hundreds of MiB in a full parallel test run with no
    // leak behind it (the same build then stayed flat every time): a leak shows in a second, fresh
    // process too, so one out-of-bounds run is measured again and the second run is the one checked.
    let r = measure();
    if (!withinBounds(r)) {
      console.warn(`memory: first run out of bounds, measuring again: ${JSON.stringify(r)}`);
      r = measure();
    }
    expect(r.forwards).toBe(10000);
    expect(r.forwardRssGrowthMiB).toBeLessThan(bounds.forwardRssGrowthMiB);
    expect(r.layersRssGrowthMiB).toBeLessThan(bounds.layersRssGrowthMiB);
    expect(r.leakedLayersPeakRssGrowthMiB).toBeLessThan(bounds.leakedLayersPeakRssGrowthMiB);
  });
});

describe('determinism', () => {
  const c = makeCase({ H: 72, F: 200, E: 6, k: 2, T: 37, dtype: 'float32', routing: 'softmax-topk-renorm', seed: 87 });
  const cb = makeCase({
    H: 72,
    F: 200,
    E: 6,
    k: 2,
    T: 37,
    dtype: 'bfloat16',
    routing: 'softmax-topk-renorm',
    seed: 88,
  });

  test.each([
    ['float32', c],
    ['bfloat16', cb],
  ] as const)('%s: same bits across runs, thread counts and batches', async (_, k) => {
    const one = new MoeLayer({ ...k.config, threads: 1 }, k.weights);
    const two = new MoeLayer({ ...k.config, threads: 2 }, k.weights);
    const want = bits(one.forwardSync(k.x));
    for (let i = 0; i < 3; i++) expect(bits(await two.forward(k.x))).toEqual(want);
    expect(bits(two.forwardSync(k.x))).toEqual(want);
    // Batch invariance: each token alone, and the batch in another order, give the same bits.
    const H = k.config.hiddenSize;
    const all = two.forwardSync(k.x);
    for (const t of [0, 5, 36]) {
      const alone = two.forwardSync(k.x.slice(t * H, (t + 1) * H));
      expect(bits(alone)).toEqual(bits(all.subarray(t * H, (t + 1) * H)));
    }
    const reversed = new Float32Array(k.x.length);
    for (let t = 0; t < 37; t++) reversed.set(k.x.subarray(t * H, (t + 1) * H), (36 - t) * H);
    const yr = two.forwardSync(reversed);
    for (let t = 0; t < 37; t++)
      expect(bits(yr.subarray((36 - t) * H, (37 - t) * H))).toEqual(bits(all.subarray(t * H, (t + 1) * H)));
    one.dispose();
    two.dispose();
  });
});
