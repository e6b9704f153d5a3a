#!/usr/bin/env node
// Paired A/B of two builds of the addon on one case (a decode, or a 16- to 512-token forward). Both
// addons are loaded into one process, each builds the same layer from the same weights (bf16, or
// float32 in the f32 cases), and forwards alternate between them (A B, then B A), so both see the
// same machine state; on a shared machine, where runs of the bench spread 2x apart, this still
// resolves a few percent. Prints each build's median time, its packed bytes and the median of the
// per-pair time ratios B / A.
//
//   FUSED_MOE_ISA=avx512bf16 node bench/ab-builds.js old/fused_moe.node build/Release/fused_moe.node \
//     mixtral-decode-int4 [pairs = 40] [group = 128]
'use strict';
const { fill, layerWeights, median } = require('./util');

const MIXTRAL = { H: 4096, F: 14336, E: 8, k: 2 };
const EXPERT = { H: 4096, F: 14336, E: 1, k: 1 };
const L3 = { H: 1024, F: 3584, E: 2, k: 2 }; // bench.js's l3-* cases: two experts' codes fit in L3
const L3_EXPERT = { H: 2048, F: 4096, E: 1, k: 1 };
const MID = { H: 1024, F: 3584, E: 8, k: 2 }; // bench.js's mid-* cases
const QWEN3_30B = { H: 2048, F: 768, E: 128, k: 8 }; // fine-grained experts, a few MiB each
const DSV2_LITE = { H: 2048, F: 1408, E: 64, k: 6, Fs: 2816 }; // and two shared experts
const CASES = {
  'mixtral-decode-bf16': { ...MIXTRAL },
  'mixtral-decode-int8': { ...MIXTRAL, quantize: 'int8' },
  'mixtral-decode-int4': { ...MIXTRAL, quantize: 'int4' },
  'mixtral-16tok-int4': { ...MIXTRAL, quantize: 'int4', T: 16 },
  'mixtral-16tok-int8': { ...MIXTRAL, quantize: 'int8', T: 16 },
  'mixtral-16tok-bf16': { ...MIXTRAL, T: 16 },
  // One Mixtral expert with 4 or 6 rows (16 streams: 4 rows per expert on average): the few-rows tile.
  'expert-4tok-bf16': { ...EXPERT, T: 4 },
  'expert-6tok-bf16': { ...EXPERT, T: 6 },
  'expert-4tok-f32': { ...EXPERT, f32: true, T: 4 },
  'expert-4tok-int4': { ...EXPERT, quantize: 'int4', T: 4 },
  'expert-5tok-int4': { ...EXPERT, quantize: 'int4', T: 5 },
  'expert-6tok-int4': { ...EXPERT, quantize: 'int4', T: 6 },
  'expert-5tok-int8': { ...EXPERT, quantize: 'int8', T: 5 },
  'expert-6tok-int8': { ...EXPERT, quantize: 'int8', T: 6 },
  'expert-8tok-int4': { ...EXPERT, quantize: 'int4', T: 8 },
  'expert-16tok-int4': { ...EXPERT, quantize: 'int4', T: 16 },
  'expert-64tok-int4': { ...EXPERT, quantize: 'int4', T: 64 },
  // One expert with 5 or 8 rows whose codes stay in L3 (14 MiB a build): the tiles' arithmetic, not the
  // memory's rate, as the Mixtral-sized expert-*tok cases measure when the host's memory runs slow.
  'l3-expert-5tok-int4': { ...L3_EXPERT, quantize: 'int4', T: 5 },
  'l3-expert-8tok-int4': { ...L3_EXPERT, quantize: 'int4', T: 8 },
  'l3-decode-int8': { ...L3, quantize: 'int8' },
  'l3-decode-int4': { ...L3, quantize: 'int4' },
  'l3-decode-bf16': { ...L3 },
  'qwen3-decode-bf16': { ...QWEN3_30B },
  'dsv2lite-decode-bf16': { ...DSV2_LITE },
  'qwen3-decode-int8': { ...QWEN3_30B, quantize: 'int8' },
  'qwen3-decode-int4': { ...QWEN3_30B, quantize: 'int4' },
  // One expert whose w2 has an LM head's shape (many short panels: K = 2048, 32768 columns).
  'wide-decode-int4': { H: 32768, F: 2048, E: 1, k: 1, quantize: 'int4' },
  'mid-prefill-bf16': { ...MID, T: 128 },
  'mid-prefill-int8': { ...MID, quantize: 'int8', T: 128 },
  'mid-prefill-int4': { ...MID, quantize: 'int4', T: 128 },
  'qwen3-prefill-f32': { ...QWEN3_30B, f32: true, T: 512 },
  'qwen3-prefill-bf16': { ...QWEN3_30B, T: 512 },
  'mixtral-prefill-bf16': { ...MIXTRAL, T: 512 },
};

const [fileA, fileB, name, pairsArg, groupArg] = process.argv.slice(2);
if (!fileA || !fileB || !CASES[name]) {
  console.error(`usage: node bench/ab-builds.js <a.node> <b.node> <${Object.keys(CASES).join(' | ')}> [pairs] [group]`);
  process.exit(2);
}
const pairs = Number(pairsArg) || 40,
  group = Number(groupArg) || 128;
const load = (file) => {
  const m = { exports: {} };
  process.dlopen(m, require('path').resolve(file));
  return m.exports;
};
const A = load(fileA),
  B = load(fileB);

const { H, F, E, k, quantize, T = 1, Fs = 0, f32 = false } = CASES[name];
const { w1, w3, w2, gate, shared } = layerWeights({ H, F, E, Fs }, !f32);
const config = {
  hiddenSize: H,
  intermediateSize: F,
  numExperts: E,
  topK: k,
  weightDtype: f32 ? 'float32' : 'bfloat16',
  device: 'cpu',
  quantize,
  quantGroupSize: group,
  sharedIntermediateSize: Fs,
};
const layers = [A, B].map((addon) => new addon.NativeLayer(config, gate, w1, w3, w2, { shared }));
w1.length = w3.length = w2.length = 0; // each layer holds its own packed copy

// Eight inputs in turn, the same for both builds: with many experts each input picks others, as the
// tokens of a real decode do, rather than the same few that stay in cache.
const xs = Array.from({ length: 8 }, (_, i) => fill(T * H, false, 1, 101 + i)),
  out = new Float32Array(T * H);
let step = 0;
const time = (layer) => {
  const t = process.hrtime.bigint();
  layer.forwardSync(xs[step % xs.length], out);
  return Number(process.hrtime.bigint() - t) / 1e6;
};
for (let i = 0; i < 3; i++) layers.forEach(time); // warm-up: workspaces, page faults, caches
const ms = [[], []],
  ratio = [];
for (let i = 0; i < pairs; i++) {
  const order = i % 2 ? [0, 1] : [1, 0];
  const t = [0, 0];
  for (const j of order) t[j] = time(layers[j]);
  step++;
  ms[0].push(t[0]);
  ms[1].push(t[1]);
  ratio.push(t[1] / t[0]);
}
const info = layers.map((l) => l.info());
console.log(
  JSON.stringify({
    case: name,
    group,
    pairs,
    kernels: info.map((i) => i.kernels),
    bytes: info.map((i) => i.nativeBytes),
    ms: ms.map(median),
    ratioBA: median(ratio),
  }),
);
layers.forEach((l) => l.dispose());
