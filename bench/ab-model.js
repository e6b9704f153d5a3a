#!/usr/bin/env node
// Paired A/B over a whole model's decode steps, in one process: of a kernel tuning value
// (binding.bench.setTuning), which flips between A and B from one step to the next, or of two builds
// (`build`: A and B are two checkouts, each with its dist/ and its addon built, each loading its own
// copy of the model). The sides alternate (A B, then B A), each measured step after an unmeasured one
// on the same side, so both see the same machine state. Where runs of `bench/model.js` spread far apart
// on a shared machine, this resolves a few percent: an A/A run (the same value on both sides) reads
// within 1% of 1.00. Two builds are not alike that way: each side has its own copy of the model, and in
// A/A runs of `build` (one checkout on both sides) the copy loaded second ran up to 9% faster (0.943 at
// one Qwen3 stream, 0.910 and 0.967 at 16 Mixtral streams; other runs within 1%), so `build` then runs
// again in a child process with the checkouts swapped and prints the geometric mean of both orders.
// Prints each side's median step time and the time of one part of the step (MoeModel.stepTimes(): mlp
// unless --part names another; --part all: every part), and the medians of the per-pair ratios B / A;
// then each side's mean step time and their ratio, B / A (meanRatioBA). Each step adds a position
// to every sequence: 300 pairs reach 1,216 positions (after a prefix of 16 tokens, or of --prefix N).
//
//   node bench/model.js --models qwen3moe --formats int4 --engines ours   (writes the model files once)
//   node bench/ab-model.js qwen3moe int4 shortPanelBytes 0 24576 [pairs = 60] [streams = 1]
//   node bench/ab-model.js qwen3moe int4 decodeStreams 0 1
//   node bench/ab-model.js qwen3moe none decodeStreams 0 1 60 --part all
//   node bench/ab-model.js qwen3moe none tilePanels 4 8
//   node bench/ab-model.js qwen3moe int4 attentionPrefetch 0 1 300 --part attention
//   node bench/ab-model.js mixtral int4 attentionInPlace 0 1 40 16 --part attention
//   node bench/ab-model.js qwen3moe int4 attentionSpan 1 8 40 --part attention --prefix 4000
//   node bench/ab-model.js qwen3moe int4 attentionSpan 1 8 8 --part attention --prompt 2048
//   node bench/ab-model.js qwen3moe int4 spinUs 100 500 150 --part qkv
//   git worktree add ../old HEAD~1 && (cd ../old && npm ci && npm run build)
//   node bench/ab-model.js qwen3moe int4 build ../old . 150
//
// The model is one of bench/model.js's (its files in the same cache folder: --cache-dir DIR).
'use strict';
const path = require('path');
const fs = require('fs');
const { spawnSync } = require('child_process');
const { benchModelOrExit, feedPrompt, median, takeCacheDir } = require('./util');
const root = path.join(__dirname, '..');
const binding = require('node-gyp-build')(root);

const args = process.argv.slice(2);
const cacheDir = takeCacheDir(args);
const partAt = args.indexOf('--part');
const part = partAt >= 0 ? args.splice(partAt, 2)[1] : 'mlp';
// --prompt T: each measured unit is a fresh T-token prompt (in native steps of 512 tokens, its sequence
// freed after) instead of a decode step.
const promptAt = args.indexOf('--prompt');
const prompt = promptAt >= 0 ? Number(args.splice(promptAt, 2)[1]) : 0;
if (promptAt >= 0 && (!Number.isInteger(prompt) || prompt < 1 || prompt > 30000)) {
  console.error('--prompt: expected an integer from 1 to 30000');
  process.exit(2);
}
const prefixAt = args.indexOf('--prefix');
const prefix = prefixAt >= 0 ? Number(args.splice(prefixAt, 2)[1]) : 16;
if (!Number.isInteger(prefix) || prefix < 1 || prefix > 30000) {
  console.error('--prefix: expected an integer from 1 to 30000');
  process.exit(2);
}
const [model, quantize, name, a, b, pairsArg, streamsArg] = args;
const usage =
  'usage: node bench/ab-model.js <mixtral | qwen3moe> <none | int8 | int4> <shortPanelBytes | decodeStreams | tilePanels | attentionPrefetch | attentionInPlace | attentionSpan | build> <A> <B> [pairs] [streams] [--part qkv | attention | output | mlp | lmHead | other | all] [--prefix N | --prompt T] [--cache-dir DIR]';
if (!model || !quantize || !name || a === undefined || b === undefined) {
  console.error(usage);
  process.exit(2);
}
const modelDir = benchModelOrExit(cacheDir, model);
const pairs = Number(pairsArg) || 60,
  streams = Number(streamsArg) || 1;

// build: each side is a checkout (its dist/ and addon); otherwise both sides share this checkout's model
// and differ in the tuning value.
const builds = name === 'build';
const roots = builds ? [path.resolve(a), path.resolve(b)] : [root];
for (const r of roots)
  if (!fs.existsSync(path.join(r, 'dist', 'index.js'))) {
    console.error(`${r}: no dist/index.js (run npm run build there)`);
    process.exit(2);
  }

async function open(r) {
  const { MoeModel } = require(path.join(r, 'dist'));
  const m = await MoeModel.load(modelDir, {
    quantize,
    contextLength: Math.max(prefix + 4 * pairs, prompt) + 64,
    maxSequences: streams,
    threads: binding.backendInfo().cpu.threads,
  });
  if (part !== 'all' && !(part in m.stepTimes().seconds)) {
    m.dispose();
    throw new Error(`--part must be one of ${Object.keys(m.stepTimes().seconds).join(', ')}, got ${part}`);
  }
  const seqs = Array.from({ length: streams }, () => m.createSequence());
  await feedPrompt(m, seqs, prefix);
  return { m, seqs };
}

(async () => {
  const opened = [];
  for (const r of roots) opened.push(await open(r));
  const of = { A: opened[0], B: opened[opened.length - 1] };
  let next = 0;
  const decodeStep = ({ m, seqs }) =>
    m.step(
      seqs.map((s, j) => ({ sequence: s, tokens: [200 + ((next++ * 7919 + j * 131) % 1000)] })),
      { reuseLogits: true },
    );
  const promptRun = async ({ m }) => {
    const s = m.createSequence();
    const first = next++;
    for (let done = 0; done < prompt; done += 512) {
      const n = Math.min(512, prompt - done);
      const tokens = Array.from({ length: n }, (_, i) => 100 + (((done + i) * 7 + first * 131) % 5000));
      await m.step([{ sequence: s, tokens }], { reuseLogits: true });
    }
    m.freeSequence(s);
  };
  const step = prompt > 0 ? promptRun : decodeStep;
  // The parts reported: one, or with --part all every part of stepTimes(), each as its own series.
  const parts = part === 'all' ? Object.keys(of.A.m.stepTimes().seconds) : [part];
  const side = { A: { ms: [], part: parts.map(() => []) }, B: { ms: [], part: parts.map(() => []) } },
    ratio = [],
    partRatio = parts.map(() => []);
  const original = builds ? undefined : binding.bench.setTuning(name, Number(a));
  try {
    for (let i = 0; i < pairs + 2; i++) {
      const got = {};
      for (const s of i % 2 ? ['A', 'B'] : ['B', 'A']) {
        if (!builds) binding.bench.setTuning(name, Number(s === 'A' ? a : b));
        const { m } = of[s];
        await step(of[s]); // settle: the same side, unmeasured
        const before = m.stepTimes().seconds;
        const t = process.hrtime.bigint();
        await step(of[s]);
        const ms = Number(process.hrtime.bigint() - t) / 1e6,
          after = m.stepTimes().seconds;
        got[s] = { ms, part: parts.map((p) => (after[p] - before[p]) * 1e3) };
      }
      if (i < 2) continue; // warm-up pairs
      for (const s of ['A', 'B']) {
        side[s].ms.push(got[s].ms);
        got[s].part.forEach((v, j) => side[s].part[j].push(v));
      }
      ratio.push(got.B.ms / got.A.ms);
      parts.forEach((p, j) => partRatio[j].push(got.B.part[j] / got.A.part[j]));
    }
  } finally {
    if (!builds) binding.bench.setTuning(name, original);
    for (const o of opened) o.m.dispose();
  }
  const f = (x) => x.toFixed(3);
  const mean = (v) => v.reduce((x, y) => x + y, 0) / v.length;
  // One part's figure as it is; with --part all, an object of every part's.
  const byPart = (fn) =>
    parts.length === 1 && part !== 'all' ? fn(0) : Object.fromEntries(parts.map((p, j) => [p, fn(j)]));
  const result = {
    model,
    quantize,
    streams,
    tuning: name,
    A: builds ? a : Number(a),
    B: builds ? b : Number(b),
    pairs,
    prefix,
    prompt,
    stepMs: [f(median(side.A.ms)), f(median(side.B.ms))],
    // Means too: a few slow steps (a worker kept off its core for a step) move the mean, not the median.
    stepMeanMs: [f(mean(side.A.ms)), f(mean(side.B.ms))],
    meanRatioBA: f(mean(side.B.ms) / mean(side.A.ms)),
    part,
    partMs: byPart((j) => [f(median(side.A.part[j])), f(median(side.B.part[j]))]),
    ratioBA: f(median(ratio)),
    partRatioBA: byPart((j) => f(median(partRatio[j]))),
  };
  console.log(JSON.stringify(result));
  if (builds && !process.env.FUSED_MOE_AB_SWAPPED) {
    // The same comparison with the other checkout loaded first; B / A there is A / B here.
    const argv = [__filename, model, quantize, 'build', b, a, String(pairs), String(streams), '--part', part];
    argv.push('--prefix', String(prefix), '--cache-dir', cacheDir, ...(prompt > 0 ? ['--prompt', String(prompt)] : []));
    const r = spawnSync(process.execPath, argv, {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'inherit'],
      env: { ...process.env, FUSED_MOE_AB_SWAPPED: '1' },
    });
    if (r.status !== 0) throw new Error(`the swapped run failed (exit ${r.status})`);
    const swapped = JSON.parse(r.stdout.trim().split('\n').pop());
    console.log(JSON.stringify(swapped));
    const both = (x, y) => f(Math.sqrt(Number(x) / Number(y)));
    console.log(
      JSON.stringify({
        bothOrders: true,
        ratioBA: both(result.ratioBA, swapped.ratioBA),
        meanRatioBA: both(result.meanRatioBA, swapped.meanRatioBA),
        partRatioBA:
          typeof result.partRatioBA === 'string'
            ? both(result.partRatioBA, swapped.partRatioBA)
            : Object.fromEntries(
                Object.keys(result.partRatioBA).map((p) => [p, both(result.partRatioBA[p], swapped.partRatioBA[p])]),
              ),
      }),
    );
  }
})().catch((err) => {
  console.error(err);
  process.exit(1);
});
