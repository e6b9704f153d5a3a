#!/usr/bin/env node
// Paired measure of what N concurrent streams gain over one: decode steps of one sequence and of N
// sequences alternate in one process on one model (one B, then N; then N, then one...), each measured
// step after an unmeasured one of the same kind, and each pair gives N * t(1) / t(N), the aggregate rate
// of N streams over one stream's. On a host whose memory and neighbours move from minute to minute, runs
// of `bench/generate.js` (one stream's rate, then N streams', minutes apart) spread its ratio by half a
// unit or more; pairs of steps a few milliseconds apart see the same machine. A proxy of the generation
// bench's ratio: model.step round trips (the N-API call and the wake-ups included), without sampling,
// detokenizing or the scheduler. Not a timed test.
//
//   node bench/model.js --models mixtral --formats int4 --engines ours   (writes the model files once)
//   node bench/stream-ratio.js mixtral int4 [pairs = 40] [streams = 16] [--prefix N] [--cache-dir DIR]
'use strict';
const os = require('os');
const path = require('path');
const { benchModelDir, benchToken, feedPrompt, median, quantile } = require('./util');

const args = process.argv.slice(2);
const take = (flag) => {
  const at = args.indexOf(flag);
  return at >= 0 ? args.splice(at, 2)[1] : undefined;
};
const cacheDir = take('--cache-dir') ?? path.join(os.tmpdir(), 'fused-moe-bench-models');
const prefix = Number(take('--prefix') ?? 16);
const [model, quantize, pairsArg, streamsArg] = args;
const pairs = Number(pairsArg ?? 40),
  N = Number(streamsArg ?? 16);
const modelDir = model && benchModelDir(cacheDir, model);
if (!modelDir || !quantize || !(Number.isInteger(pairs) && pairs >= 1) || !(Number.isInteger(N) && N >= 2)) {
  console.error(
    'usage: node bench/stream-ratio.js <mixtral | qwen3moe> <none | int8 | int4> [pairs = 40] [streams = 16] [--prefix N] [--cache-dir DIR]\n' +
      `(the model's files come from bench/model.js --models MODEL, in ${cacheDir})`,
  );
  process.exit(2);
}
if (!(Number.isInteger(prefix) && prefix >= 1)) {
  console.error('--prefix: expected a positive integer');
  process.exit(2);
}

const root = path.join(__dirname, '..');
const binding = require('node-gyp-build')(root);
const { MoeModel } = require(path.join(root, 'dist'));

(async () => {
  const m = await MoeModel.load(modelDir, {
    quantize,
    contextLength: prefix + 4 * (pairs + 2) + 64,
    maxSequences: N + 1,
    threads: binding.backendInfo().cpu.threads,
  });
  try {
    const seqs = Array.from({ length: N + 1 }, () => m.createSequence());
    await feedPrompt(m, seqs, prefix);
    const groups = { 1: seqs.slice(0, 1), [N]: seqs.slice(1) };
    let next = 0;
    const step = (n) =>
      m.step(
        groups[n].map((s, j) => ({ sequence: s, tokens: [benchToken(j, 7919 * next++)] })),
        { reuseLogits: true },
      );
    const ms = { 1: [], [N]: [] },
      ratios = [];
    for (let i = 0; i < pairs + 2; i++) {
      const t = {};
      for (const n of i % 2 ? [1, N] : [N, 1]) {
        await step(n); // settle: the same kind, unmeasured
        const t0 = process.hrtime.bigint();
        await step(n);
        t[n] = Number(process.hrtime.bigint() - t0) / 1e6;
      }
      if (i < 2) continue; // warm-up pairs
      ms[1].push(t[1]);
      ms[N].push(t[N]);
      ratios.push((N * t[1]) / t[N]);
    }
    const f = (x, d = 2) => x.toFixed(d);
    console.log(
      JSON.stringify({
        model,
        quantize,
        streams: N,
        pairs,
        prefix,
        stepMs: { 1: f(median(ms[1]), 3), [N]: f(median(ms[N]), 3) },
        tokPerS: { 1: f(1e3 / median(ms[1]), 1), [N]: f((N * 1e3) / median(ms[N]), 1) },
        ratio: f(median(ratios)),
        ratioQuartiles: [f(quantile(ratios, 0.25)), f(quantile(ratios, 0.75))],
      }),
    );
  } finally {
    m.dispose();
  }
})().catch((err) => {
  console.error(err);
  process.exit(1);
});
