// The two engines of bench/model.js, each run in a child process of its own (so that one model's
// memory is gone before the next loads): ours through MoeModel, llama.cpp through node-llama-cpp.
// A job: { engine, dir | gguf, quantize, prompt: number[], decodePrefix: number[], decodeTokens:
// number[], settleTokens: number[] | null, warmDecode, promptReps, threads, context, probeBytes }. Both
// report the same figures: { loadS, residentGB, promptMs: [...], decodeMs: [...], decodeProbes: [...], info }. With
// probeBytes, every measured decode step follows a read-bandwidth probe of that many bytes
// (decodeProbes[i], GB/s, beside decodeMs[i]): this machine's bandwidth moves within a run, so each
// step is compared with the memory of its moment. Between the probe and the measured step runs one
// unmeasured step (settleTokens[i]): the step right after a probe ran slower than the steps after it
// (the pool's threads asleep, the small tensors evicted), a cost of the probe that back-to-back
// generation steps never pay.
// Ours also reports decodePhaseMs: the median over the measured decode steps of each part's milliseconds
// (MoeModel.stepTimes()); a median, since the few steps the host stalls would inflate a mean.
'use strict';
const path = require('path');
const { median } = require('./util');

const root = path.join(__dirname, '..');
const now = () => Number(process.hrtime.bigint()) / 1e6;

// The read probe before a decode step (GB/s), or null without probeBytes.
let addonForProbe = null;
function probe(job) {
  if (!job.probeBytes) return null;
  addonForProbe = addonForProbe || require('node-gyp-build')(root);
  return addonForProbe.bench.readBandwidth(job.probeBytes, job.threads);
}

async function runOurs(job) {
  const addon = require('node-gyp-build')(root);
  const { MoeModel } = require(path.join(root, 'dist'));
  const t0 = now();
  const model = await MoeModel.load(job.dir, {
    quantize: job.quantize,
    contextLength: job.context,
    threads: job.threads,
  });
  const loadS = (now() - t0) / 1e3;
  const residentGB = process.memoryUsage().rss / 1e9; // the process right after the load

  const prompt = Int32Array.from(job.prompt);
  await model.logits(prompt); // warm-up: workspaces, first touch of every weight page
  const promptMs = [];
  let finite = true;
  for (let r = 0; r < job.promptReps; r++) {
    const t = now();
    const out = await model.logits(prompt);
    promptMs.push(now() - t);
    if (!out.every(Number.isFinite)) finite = false;
  }

  // Decode: one token per step on a kept sequence, through the model's internal step API (the public
  // API has only whole-sequence logits() so far).
  const seq = model.createSequence();
  const decodeMs = [],
    decodeProbes = [],
    phaseMs = {};
  try {
    await model.step([{ sequence: seq, tokens: job.decodePrefix }]);
    let logits;
    const decode = async (token) => {
      // As generation steps (lib/generate/engine.ts): the logits are read before the next step.
      [logits] = await model.step([{ sequence: seq, tokens: [token] }], { reuseLogits: true });
    };
    for (let i = 0; i < job.decodeTokens.length; i++) {
      const p = i >= job.warmDecode ? probe(job) : null;
      if (p !== null && job.settleTokens) await decode(job.settleTokens[i]); // unmeasured (above)
      const before = model.stepTimes().seconds,
        t = now();
      await decode(job.decodeTokens[i]);
      if (i < job.warmDecode) continue;
      decodeMs.push(now() - t);
      if (p !== null) decodeProbes.push(p);
      const after = model.stepTimes().seconds;
      for (const k of Object.keys(after)) (phaseMs[k] = phaseMs[k] || []).push((after[k] - before[k]) * 1e3);
    }
    if (!logits.every(Number.isFinite)) finite = false;
  } finally {
    seq.free();
  }
  const decodePhaseMs = {};
  for (const k of Object.keys(phaseMs)) decodePhaseMs[k] = median(phaseMs[k]);
  // Each step's time outside the native step's parts: the JavaScript call, the N-API call and the
  // threads' wake-ups on the way in and out (reuseLogits: the step writes the logits in place).
  const parts = Object.values(phaseMs);
  const decodeOutsideMs = median(decodeMs.map((t, i) => t - parts.reduce((a, p) => a + p[i], 0)));
  const info = { nativeBytes: model.nativeBytes, isa: addon.backendInfo().cpu.isa, finite };
  model.dispose();
  return { loadS, residentGB, promptMs, decodeMs, decodeProbes, decodePhaseMs, decodeOutsideMs, info };
}

async function runLlama(job) {
  const { getLlama, LlamaLogLevel } = await import('node-llama-cpp');
  // The prebuilt CPU binary only: never compile, download or probe a GPU from a benchmark.
  const llama = await getLlama({
    build: 'never',
    gpu: false,
    logLevel: LlamaLogLevel.error,
    progressLogs: false,
    maxThreads: job.threads,
  });
  const t0 = now();
  // Read into memory (no mmap), as ours packs into its own: page cache that other processes can evict
  // would turn some decode steps into disk reads.
  const model = await llama.loadModel({ modelPath: job.gguf, gpuLayers: 0, useMmap: false });
  const context = await model.createContext({
    contextSize: job.context,
    batchSize: job.prompt.length,
    sequences: 1,
    threads: job.threads,
  });
  const loadS = (now() - t0) / 1e3;
  const residentGB = process.memoryUsage().rss / 1e9; // the process right after the load
  const seq = context.getSequence();
  // The last token asks for the next one, so that llama.cpp computes its logits (the LM head): a batch
  // with no output skips it. Greedy sampling of one token adds well under a millisecond.
  const ask = { generateNext: { token: true, options: { temperature: 0 } } };
  const evalPrompt = (tokens) => seq.controlledEvaluate([...tokens.slice(0, -1), [tokens[tokens.length - 1], ask]]);

  await evalPrompt(job.prompt); // warm-up
  const promptMs = [];
  for (let r = 0; r < job.promptReps; r++) {
    await seq.clearHistory();
    const t = now();
    await evalPrompt(job.prompt);
    promptMs.push(now() - t);
  }

  await seq.clearHistory();
  await seq.evaluateWithoutGeneratingNewTokens(job.decodePrefix);
  const decodeMs = [],
    decodeProbes = [];
  for (let i = 0; i < job.decodeTokens.length; i++) {
    const p = i >= job.warmDecode ? probe(job) : null;
    if (p !== null && job.settleTokens) await seq.controlledEvaluate([[job.settleTokens[i], ask]]); // unmeasured (above)
    const t = now();
    await seq.controlledEvaluate([[job.decodeTokens[i], ask]]);
    if (i >= job.warmDecode) decodeMs.push(now() - t);
    if (p !== null) decodeProbes.push(p);
  }
  const info = {
    systemInfo: llama.systemInfo,
    flashAttention: context.flashAttention,
    threads: context.currentThreads ?? job.threads,
  };
  await context.dispose();
  await model.dispose();
  await llama.dispose();
  return { loadS, residentGB, promptMs, decodeMs, decodeProbes, info };
}

module.exports = { runOurs, runLlama };
