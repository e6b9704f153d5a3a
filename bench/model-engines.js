// The two engines of bench/model.js, each run in a child process of its own (so that one model's
// memory is gone before the next loads): ours through MoeModel, llama.cpp through node-llama-cpp.
// A job: { engine, dir | gguf, quantize, prompt: number[], decodePrefix: number[], decodeTokens:
// number[], warmDecode, promptReps, threads, context }. Both report the same figures:
// { loadS, promptMs: [...], decodeMs: [...], info }.
'use strict';
const path = require('path');

const root = path.join(__dirname, '..');
const now = () => Number(process.hrtime.bigint()) / 1e6;

async function runOurs(job) {
  // The decode steps go to the native decoder directly (one token on a kept sequence); MoeModel's
  // public API has only whole-sequence logits() so far. The addon object MoeModel loads is the one
  // require() caches, so wrapping its constructor here hands the bench the instance MoeModel makes.
  const addon = require('node-gyp-build')(root);
  const Native = addon.NativeModel;
  let native;
  addon.NativeModel = new Proxy(Native, {
    construct(target, args) {
      native = new target(...args);
      return native;
    },
  });
  const { MoeModel } = require(path.join(root, 'dist'));
  const t0 = now();
  const model = await MoeModel.load(job.dir, {
    quantize: job.quantize,
    contextLength: job.context,
    threads: job.threads,
  });
  const loadS = (now() - t0) / 1e3;
  addon.NativeModel = Native;
  if (!native) throw new Error('the bench could not reach the native decoder of MoeModel');

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

  const V = model.config.vocabSize;
  const logits = new Float32Array(V);
  const seq = native.sequenceCreate();
  const decodeMs = [];
  try {
    await native.step(Int32Array.from(job.decodePrefix), Float64Array.of(seq, job.decodePrefix.length, 0), logits);
    for (let i = 0; i < job.decodeTokens.length; i++) {
      const t = now();
      await native.step(Int32Array.of(job.decodeTokens[i]), Float64Array.of(seq, 1, 0), logits);
      if (i >= job.warmDecode) decodeMs.push(now() - t);
    }
    if (!logits.every(Number.isFinite)) finite = false;
  } finally {
    native.sequenceFree(seq);
  }
  const info = { nativeBytes: model.nativeBytes, isa: addon.backendInfo().cpu.isa, finite };
  model.dispose();
  return { loadS, promptMs, decodeMs, info };
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
  const decodeMs = [];
  for (let i = 0; i < job.decodeTokens.length; i++) {
    const t = now();
    await seq.controlledEvaluate([[job.decodeTokens[i], ask]]);
    if (i >= job.warmDecode) decodeMs.push(now() - t);
  }
  const info = {
    systemInfo: llama.systemInfo,
    flashAttention: context.flashAttention,
    threads: context.currentThreads ?? job.threads,
  };
  await context.dispose();
  await model.dispose();
  await llama.dispose();
  return { loadS, promptMs, decodeMs, info };
}

module.exports = { runOurs, runLlama };
