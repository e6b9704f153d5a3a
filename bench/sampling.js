#!/usr/bin/env node
// How long one draw of the sampler (lib/generate/sampling.ts, its math native: csrc/cpu/sampler.h) holds
// the event loop, per token and stream: every running generation draws from its step's logits between
// steps, so a step of 16 streams waits for 16 of these (then, the second table, the 16 as one batch
// that the pool's threads share: Sampler.sampleAll). Logits of Mixtral's and Qwen3's vocabulary sizes,
// drawn from a fixed seed, flat (uniform over a spread of 0.5: most of the vocabulary stays in a top-p
// nucleus) or peaked (a spread of 16), under greedy, temperature alone, top-k 40, top-p 0.9 and a
// temperature with a repetition penalty over 50 earlier tokens, and the log probabilities of a token
// with its top 5 (lib/generate/logprobs.ts). Medians of --runs draws.
//
//   npm run build:ts && node bench/sampling.js [--runs 31]
'use strict';
const { Sampler } = require('../dist/generate/sampling');
const { tokenLogprobs } = require('../dist/generate/logprobs');
const { median } = require('./util');

const i = process.argv.indexOf('--runs');
const RUNS = i > 0 ? Number(process.argv[i + 1]) : 31;
const BASE = { temperature: 1, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, seed: 7 };
const SETTINGS = {
  greedy: { temperature: 0 },
  temperature: {},
  'top-k 40': { topK: 40 },
  'top-p 0.9': { topP: 0.9 },
  // A penalty changes the logits, so the draw works on a float64 copy of them (as with a bias or a mask).
  'temperature, repetition penalty 1.1': { repetitionPenalty: 1.1 },
};
// The tokens so far of every draw (only the repetition penalty reads them).
const HISTORY = Array.from({ length: 50 }, (_, i) => (i * 997) % 32000);

function logits(V, spread, seed) {
  let s = seed >>> 0;
  const out = new Float32Array(V);
  for (let t = 0; t < V; t++) out[t] = ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) / 2 ** 32) * spread;
  return out;
}

console.log('| vocabulary | logits | ' + Object.keys(SETTINGS).join(' ms | ') + ' ms | log probabilities, top 5 ms |');
console.log('| --- | --- |' + ' --- |'.repeat(Object.keys(SETTINGS).length + 1));
for (const V of [32000, 151936])
  for (const [shape, spread] of [
    ['flat', 0.5],
    ['peaked', 16],
  ]) {
    const x = logits(V, spread, V + spread);
    const cells = Object.values(SETTINGS).map((o) => {
      const sampler = new Sampler({ ...BASE, ...o });
      const ms = [];
      for (let r = 0; r < RUNS; r++) {
        const t0 = process.hrtime.bigint();
        sampler.sample(x, HISTORY);
        ms.push(Number(process.hrtime.bigint() - t0) / 1e6);
      }
      return median(ms).toFixed(2);
    });
    // What a request asking for log probabilities adds per token (and a prompt's scoring per token).
    const ms = [];
    for (let r = 0; r < RUNS; r++) {
      const t0 = process.hrtime.bigint();
      tokenLogprobs(x, r, 5);
      ms.push(Number(process.hrtime.bigint() - t0) / 1e6);
    }
    cells.push(median(ms).toFixed(2));
    console.log(`| ${V} | ${shape} | ${cells.join(' | ')} |`);
  }

// A step of 16 streams draws 16 tokens: one after the other (Sampler.sample) or as one batch that the
// pool's threads share (Sampler.sampleAll). Each stream has its own logits and seed.
const STREAMS = 16;
console.log(`\n${STREAMS} draws of a step (${STREAMS} streams), ms: one after the other / one batch over the pool`);
console.log('| vocabulary | logits | ' + Object.keys(SETTINGS).join(' | ') + ' |');
console.log('| --- | --- |' + ' --- |'.repeat(Object.keys(SETTINGS).length));
for (const V of [32000, 151936])
  for (const [shape, spread] of [
    ['flat', 0.5],
    ['peaked', 16],
  ]) {
    const rows = Array.from({ length: STREAMS }, (_, i) => logits(V, spread, V + spread + i));
    const cells = Object.values(SETTINGS).map((o) => {
      const alone = rows.map((_, i) => new Sampler({ ...BASE, ...o, seed: i }));
      const batched = rows.map((_, i) => new Sampler({ ...BASE, ...o, seed: i }));
      const one = [],
        batch = [];
      for (let r = 0; r < RUNS; r++) {
        let t0 = process.hrtime.bigint();
        rows.forEach((x, i) => alone[i].sample(x, HISTORY));
        one.push(Number(process.hrtime.bigint() - t0) / 1e6);
        t0 = process.hrtime.bigint();
        Sampler.sampleAll(rows.map((x, i) => ({ sampler: batched[i], logits: x, history: HISTORY })));
        batch.push(Number(process.hrtime.bigint() - t0) / 1e6);
      }
      return `${median(one).toFixed(2)} / ${median(batch).toFixed(2)}`;
    });
    console.log(`| ${V} | ${shape} | ${cells.join(' | ')} |`);
  }
