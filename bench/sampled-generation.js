#!/usr/bin/env node
// What sampling costs a generation step, and what drawing a step's tokens at once saves: N streams
// generate through MoeModel.generate on one of bench/model.js's models, under greedy decoding and under
// sampling settings, each run with the step's draws spread over the pool's threads (Sampler.sampleAll,
// csrc/cpu/sampler.h sample_all), with them one after the other (binding.bench.setTuning('spreadDraws',
// 0), the way every draw ran before), and spread but always on the JavaScript thread (Engine's
// asyncDrawLogits raised out of reach: the engine otherwise draws batches of about a million logits or
// more on libuv's thread), the three taking turns. Reported per setting, as medians over the runs: the
// aggregate rate (every stream's tokens over the wall time from the first request to the last token),
// the time a step spends outside the native step (sampling, detokenizing, the JavaScript of the step
// loop) beside the whole step, the rate spread / one after the other (the median of the runs' ratios),
// and the longest the event loop was held (perf_hooks' loop delay). Random weights give flat logits: top-p keeps a large
// nucleus there (most of the vocabulary), far more than a trained model's usual few dozen tokens, so
// the top-p row is the costly end. Not a timed test.
//
//   node bench/model.js --models qwen3moe --formats int4 --engines ours   (writes the model files once)
//   node bench/sampled-generation.js [qwen3moe | mixtral] [none | int8 | int4] [streams = 16] [tokens = 32] [runs = 3] [--cache-dir DIR]
'use strict';
const path = require('path');
const { benchModelOrExit, median, takeCacheDir } = require('./util');

const root = path.join(__dirname, '..');
const binding = require('node-gyp-build')(root);
const { MoeModel } = require(path.join(root, 'dist'));

const args = process.argv.slice(2);
const cacheDir = takeCacheDir(args);
const [model = 'qwen3moe', quantize = 'int4', streamsArg, tokensArg, runsArg] = args;
const streams = Number(streamsArg ?? 16),
  tokens = Number(tokensArg ?? 32),
  runs = Number(runsArg ?? 3);
if (![streams, tokens, runs].every((n) => Number.isInteger(n) && n >= 1) || streams > 64) {
  console.error('streams (1 to 64), tokens and runs must be positive integers');
  process.exit(2);
}
const modelDir = benchModelOrExit(cacheDir, model);

const SETTINGS = {
  greedy: { temperature: 0 },
  'temperature 1': { temperature: 1 },
  'top-k 40': { temperature: 0.8, topK: 40 },
  'top-p 0.95': { temperature: 0.8, topP: 0.95 },
};
const now = () => Number(process.hrtime.bigint()) / 1e6;
const { Engine } = require(path.join(root, 'dist', 'generate', 'engine'));
const { monitorEventLoopDelay } = require('perf_hooks');

/**
 * N streams of `tokens` tokens each from distinct 16-token prompts; rate, steps, time outside the native
 * steps, and the event loop's longest delay (ms; perf_hooks, 1 ms resolution).
 */
async function run(m, params, seed) {
  const delay = monitorEventLoopDelay({ resolution: 1 });
  delay.enable();
  const before = m.stepTimes(),
    t0 = now();
  await Promise.all(
    Array.from({ length: streams }, async (_, s) => {
      const prompt = Array.from({ length: 16 }, (_, i) => 100 + ((37 * s + i + 997 * seed) % 5000));
      for await (const piece of m.generate(prompt, { ...params, seed: seed + s, maxTokens: tokens, ignoreEos: true }))
        void piece;
    }),
  );
  const wall = now() - t0,
    after = m.stepTimes();
  let native = 0;
  for (const k of Object.keys(after.seconds)) native += (after.seconds[k] - before.seconds[k]) * 1e3;
  const steps = after.steps - before.steps;
  delay.disable();
  return {
    rate: (streams * tokens) / (wall / 1e3),
    outside: (wall - native) / steps,
    step: wall / steps,
    held: delay.max / 1e6,
  };
}

(async () => {
  const m = await MoeModel.load(modelDir, {
    quantize: quantize === 'none' ? undefined : quantize,
    contextLength: 16 + tokens + 16,
    maxSequences: streams,
  });
  const info = binding.backendInfo().cpu;
  console.log(
    `${model} ${quantize}, vocabulary ${m.config.vocabSize}, ${streams} streams of ${tokens} tokens; ${info.isa}, ` +
      `${info.threads} threads; ${runs} runs of each way, taking turns`,
  );
  await m.complete([1, 2, 3, 4], { maxTokens: 2, temperature: 1 }); // warm-up: workspaces, scratch
  console.log(
    '| setting | tok/s spread | tok/s one by one | spread / one by one | ms a step: spread | one by one | ms of it outside the native step: spread | one by one | event loop held at most, ms: spread | spread, on the JavaScript thread |',
  );
  console.log('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |');
  try {
    for (const [name, params] of Object.entries(SETTINGS)) {
      const got = { 1: [], 0: [], js: [] };
      for (let r = 0; r < runs; r++)
        for (const side of r % 2 === 0 ? [1, 0, 'js'] : ['js', 0, 1]) {
          binding.bench.setTuning('spreadDraws', side === 0 ? 0 : 1);
          // 'js': every batch of draws on the JavaScript thread, however long (before sampleAllAsync).
          const threshold = Engine.asyncDrawLogits;
          if (side === 'js') Engine.asyncDrawLogits = Infinity;
          try {
            got[side].push(await run(m, params, 1000 * r + 1));
          } finally {
            Engine.asyncDrawLogits = threshold;
          }
        }
      const med = (side, k) => median(got[side].map((g) => g[k]));
      const ratio = median(got[1].map((g, i) => g.rate / got[0][i].rate));
      console.log(
        `| ${name} | ${med(1, 'rate').toFixed(1)} | ${med(0, 'rate').toFixed(1)} | ${ratio.toFixed(3)} | ` +
          `${med(1, 'step').toFixed(2)} | ${med(0, 'step').toFixed(2)} | ` +
          `${med(1, 'outside').toFixed(2)} | ${med(0, 'outside').toFixed(2)} | ` +
          `${med(1, 'held').toFixed(1)} | ${med('js', 'held').toFixed(1)} |`,
      );
    }
  } finally {
    binding.bench.setTuning('spreadDraws', 1);
    m.dispose();
  }
})().catch((err) => {
  console.error(err);
  process.exit(1);
});
