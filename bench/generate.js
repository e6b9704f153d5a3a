#!/usr/bin/env node
// The generation benchmark: continuous batching in MoeModel.generate against llama.cpp (node-llama-cpp,
// CPU, the same threads, one context with as many parallel sequences) on the same random weights.
//
//   npm run bench:generate                       Mixtral width (2 layers), bf16 and int4, 1/4/8/16 streams
//   node bench/generate.js --quick               small shapes, a minute or two
//   --formats bf16,int4  --streams 1,4,8,16  --engines ours,llama  --tokens 48  --cache-dir DIR  --json
//
// For each number of streams N: N prompts of PROMPT tokens start together, each generates TOKENS tokens
// greedily (end-of-sequence ignored, so every stream runs its full length). Reported: the aggregate
// decode rate while all N streams run (tokens of every stream between the last first token and the
// first last token, over that time), time to first token and inter-token latency p50/p99, and the
// decode rate as a fraction of the same run's read bandwidth on the bytes one step reads, and of the
// step's roofline (stepRoofline: the read probe and the multiply-add peak of the format's kernels, both
// of the same run: for int8 and int4 the dot product's with each group's scaling beside it); each
// the median of three runs, the runs of every N taking turns (1, 4, 8, 16 streams, then again).
// Then, ours only: 8 streams run, and a 2,000-token prompt arrives; the p99 inter-token latency of the
// 8 streams before and while that prompt is read, against the time of one prefill chunk. And 8
// requests arriving at once with one 1,000-token system prompt and questions of their own (the first
// computes the system prompt, the others wait and fork its cache), against 8 whose system prompts
// differ (the same tokens to compute, without the sharing): time to every first token, to the end,
// and the prompt tokens computed.
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');

const {
  MODELS,
  QUICK_MODELS,
  FORMATS,
  benchTokens,
  ensureModel,
  weightCounts,
  ROUTER_BYTES,
} = require('./model-files');
const { runAsChild, runChild, cliOptions } = require('./child');
const { writeBenchTokenizer } = require('./tokenizer-file');
const { fmt, median, quantile, ISA_INDEX } = require('./util');

const root = path.join(__dirname, '..');
const THREADS = 2;
const now = () => Number(process.hrtime.bigint()) / 1e6;

/** Per-stream token times (ms) -> the figures every engine reports. */
function summarize(starts, times) {
  const firsts = times.map((t) => t[0]);
  const lasts = times.map((t) => t[t.length - 1]);
  const from = Math.max(...firsts),
    to = Math.min(...lasts);
  let inWindow = 0;
  for (const t of times) for (const x of t) if (x > from && x <= to) inWindow++;
  const itl = times.flatMap((t) => t.slice(1).map((x, i) => x - t[i]));
  return {
    decodeTokS: to > from ? (inWindow / (to - from)) * 1e3 : NaN,
    ttftP50: quantile(
      firsts.map((f, i) => f - starts[i]),
      0.5,
    ),
    ttftP99: quantile(
      firsts.map((f, i) => f - starts[i]),
      0.99,
    ),
    itlP50: quantile(itl, 0.5),
    itlP99: quantile(itl, 0.99),
  };
}

// ---- the engines, each in a child process --------------------------------------------------------
async function runOurs(job) {
  const { MoeModel } = require(path.join(root, 'dist'));
  const { positionCost } = require(path.join(root, 'dist', 'model', 'config'));
  const model = await MoeModel.load(job.dir, {
    quantize: job.quantize,
    contextLength: job.context,
    // The long-prompt run needs its 8 streams and the prompt running at once.
    maxSequences: Math.max(...job.streams, job.longPrompt ? 9 : 1),
    threads: THREADS,
  });
  const out = { streams: {} };
  const stream = async (prompt, maxTokens, times, started) => {
    started.push(now());
    const gen = model.generate(prompt, { maxTokens, temperature: 0, ignoreEos: true });
    for await (const piece of gen) {
      void piece;
      times.push(now());
    }
  };
  await model.complete(benchTokens(job.prompt, job.V, 1), { maxTokens: 4, temperature: 0 }); // warm-up
  // The runs of every N take turns (1, 4, 8, 16 streams, then again), so that a change in the machine's
  // speed during the run falls on every N alike and the ratios to one stream compare runs of one time.
  const spent = {};
  for (const N of job.streams) {
    out.streams[N] = [];
    spent[N] = { steps: 0, wallMs: 0, seconds: {} };
  }
  for (let rep = 0; rep < job.reps; rep++) {
    for (const N of job.streams) {
      const before = model.stepTimes(),
        t0 = now();
      const times = Array.from({ length: N }, () => []);
      const starts = [];
      // Distinct prompts each time, so that no stream reuses a kept prefix.
      await Promise.all(
        times.map((t, i) => stream(benchTokens(job.prompt, job.V, 1000 * rep + 17 * N + i + 2), job.tokens, t, starts)),
      );
      out.streams[N].push(summarize(starts, times));
      const after = model.stepTimes(),
        acc = spent[N];
      acc.steps += after.steps - before.steps;
      acc.wallMs += now() - t0;
      for (const p of Object.keys(after.seconds))
        acc.seconds[p] = (acc.seconds[p] || 0) + (after.seconds[p] - before.seconds[p]);
    }
  }
  // Where the native steps of these runs (prompts included) spent their time, and their share of the wall
  // time (the rest: the step loop, sampling, streaming in JavaScript).
  out.phases = {};
  for (const N of job.streams) {
    const { steps, wallMs, seconds } = spent[N];
    const msPerStep = {};
    let nativeMs = 0;
    for (const p of Object.keys(seconds)) {
      msPerStep[p] = (seconds[p] * 1e3) / steps;
      nativeMs += seconds[p] * 1e3;
    }
    out.phases[N] = { steps, wallMs, nativeMs, msPerStep };
  }
  if (job.longPrompt) {
    // 8 streams in steady state, then a long prompt joins; latencies split at its arrival and at its
    // first token (when its prompt has been read). Three times, with distinct prompts: the p99 of one
    // run rests on its few slowest steps, so the rise is given per run and as their median.
    const runs = [];
    for (let rep = 0; rep < 3; rep++) {
      const times = Array.from({ length: 8 }, () => []);
      const starts = [];
      const running = times.map((t, i) =>
        stream(benchTokens(job.prompt, job.V, 90_000 + 100 * rep + i), job.tokens * 3, t, starts),
      );
      while (times.some((t) => t.length < job.tokens / 2)) await new Promise((r) => setTimeout(r, 5));
      const arrived = now();
      const longTimes = [];
      await stream(benchTokens(job.longPrompt, job.V, 77 + rep), 1, longTimes, []);
      const read = longTimes[0];
      await Promise.all(running);
      const gaps = (lo, hi) =>
        times.flatMap((t) =>
          t
            .slice(1)
            .map((x, i) => [t[i], x])
            .filter(([a]) => a >= lo && a < hi)
            .map(([a, b]) => b - a),
        );
      // One prefill chunk alone: a step of TOKENS_PER_STEP (lib/generate/engine.ts) prompt tokens of a
      // fresh sequence, measured right after, in the same machine state.
      const chunk = [];
      for (let r = 0; r < 3; r++) {
        const t = now();
        await model.logits(benchTokens(job.chunkTokens, job.V, 500 + 10 * rep + r));
        chunk.push(now() - t);
      }
      const before = quantile(gaps(0, arrived), 0.99),
        during = quantile(gaps(arrived, read), 0.99);
      runs.push({
        readMs: read - arrived,
        itlP99Before: before,
        itlP99During: during,
        itlMaxDuring: Math.max(...gaps(arrived, read)),
        chunkMs: median(chunk),
        riseInChunks: (during - before) / median(chunk),
      });
    }
    out.longPrompt = { tokens: job.longPrompt, runs, riseInChunks: median(runs.map((r) => r.riseInChunks)) };
    // The step budget's cost model (positionCost, lib/model/config.ts) against the clock: a chunk fed
    // after most of the long prompt, against the same chunk at the start of a sequence.
    const depth = Math.max(0, job.longPrompt - job.chunkTokens);
    const fresh = [],
      deep = [];
    for (let r = 0; r < 3; r++) {
      const seq = model.createSequence();
      try {
        let t = now();
        await model.step([{ sequence: seq, tokens: benchTokens(job.chunkTokens, job.V, 600 + r) }]);
        fresh.push(now() - t);
        await model.truncateSequence(seq, 0);
        await model.step([{ sequence: seq, tokens: benchTokens(depth, job.V, 700 + r) }]);
        t = now();
        await model.step([{ sequence: seq, tokens: benchTokens(job.chunkTokens, job.V, 800 + r) }]);
        deep.push(now() - t);
      } finally {
        seq.free();
      }
    }
    const a = positionCost(model.config, job.quantize),
      n = job.chunkTokens;
    const work = (p) => n + a * (n * p + (n * (n + 1)) / 2);
    out.longPrompt.deepChunk = {
      depth,
      freshMs: median(fresh),
      deepMs: median(deep),
      measured: median(deep) / median(fresh),
      modelled: work(depth) / work(0),
    };
  }
  if (job.shared) {
    const { requests, system, question, tokens } = job.shared;
    const runs = { shared: [], distinct: [] };
    for (let rep = 0; rep < 3; rep++) {
      for (const kind of ['shared', 'distinct']) {
        const seed = 200_000 + 1000 * rep + (kind === 'shared' ? 0 : 500);
        const prompts = Array.from({ length: requests }, (_, i) => [
          ...benchTokens(system, job.V, kind === 'shared' ? seed : seed + 1 + i),
          ...benchTokens(question, job.V, seed + 100 + i),
        ]);
        const t0 = now();
        const firsts = [];
        const results = await Promise.all(
          prompts.map(async (prompt) => {
            const gen = model.generate(prompt, { maxTokens: tokens, temperature: 0, ignoreEos: true });
            for (let r = await gen.next(), first = true; ; r = await gen.next(), first = false) {
              if (r.done) return r.value;
              if (first) firsts.push(now() - t0);
            }
          }),
        );
        runs[kind].push({
          firstTokenMs: quantile(firsts, 0.5),
          lastFirstTokenMs: Math.max(...firsts),
          wallMs: now() - t0,
          computedPromptTokens: results.reduce((a, r) => a + r.usage.promptTokens - r.usage.cachedPromptTokens, 0),
        });
      }
    }
    out.shared = { ...job.shared, runs };
  }
  model.dispose();
  return out;
}

async function runLlama(job) {
  const { getLlama, LlamaLogLevel } = await import('node-llama-cpp');
  const llama = await getLlama({
    build: 'never',
    gpu: false,
    logLevel: LlamaLogLevel.error,
    progressLogs: false,
    maxThreads: THREADS,
  });
  const model = await llama.loadModel({ modelPath: job.gguf, gpuLayers: 0, useMmap: false });
  const out = { streams: {} };
  // One context per N, each with N sequences (made once, cleared between repetitions); the runs of every
  // N take turns, as ours do.
  const contexts = {};
  for (const N of job.streams) {
    const context = await model.createContext({
      contextSize: job.context,
      sequences: N,
      batchSize: 512,
      threads: THREADS,
    });
    contexts[N] = { context, seqs: Array.from({ length: N }, () => context.getSequence()) };
    out.streams[N] = [];
    out.contextSize = context.contextSize;
  }
  for (let rep = 0; rep < job.reps; rep++) {
    for (const N of job.streams) {
      const { seqs } = contexts[N];
      const times = Array.from({ length: N }, () => []);
      const starts = [];
      await Promise.all(seqs.map((seq) => seq.clearHistory()));
      await Promise.all(
        seqs.map(async (seq, i) => {
          starts.push(now());
          let n = 0;
          for await (const token of seq.evaluate(benchTokens(job.prompt, job.V, 1000 * rep + 17 * N + i + 2), {
            temperature: 0,
          })) {
            void token;
            times[i].push(now());
            if (++n >= job.tokens) break;
          }
        }),
      );
      out.streams[N].push(summarize(starts, times));
    }
  }
  for (const N of job.streams) await contexts[N].context.dispose();
  await model.dispose();
  await llama.dispose();
  return out;
}

if (runAsChild(() => ({ ours: runOurs, llama: runLlama }))) return;

// ---- the run ---------------------------------------------------------------------------------------
const { args, opt, quick, jsonOut, log } = cliOptions({
  values: ['--formats', '--engines', '--streams', '--tokens', '--cache-dir'],
});
const formats = (opt('--formats') || 'bf16,int4').split(',');
for (const f of formats)
  if (!FORMATS[f]) throw new RangeError(`--formats: '${f}' is not one of ${Object.keys(FORMATS).join(', ')}`);
const engines = (opt('--engines') || 'ours,llama').split(',');
const streams = (opt('--streams') || '1,4,8,16').split(',').map(Number);
const name = 'mixtral';
const m = (quick ? QUICK_MODELS : MODELS)[name];
const cacheDir = opt('--cache-dir') || path.join(os.tmpdir(), 'fused-moe-bench-models' + (quick ? '-quick' : ''));
const RUN = {
  prompt: quick ? 16 : 32,
  tokens: Number(opt('--tokens') || (quick ? 16 : 48)),
  reps: quick ? 1 : 3,
  longPrompt: quick ? 300 : 2000,
  chunkTokens: 256,
  shared: { requests: 8, system: quick ? 200 : 1000, question: 24, tokens: 16 },
};
// Bytes one decode step reads with N streams: attention and LM head once, the experts the N tokens
// pick (expected distinct experts: each token picks k distinct experts of E, uniformly, so an expert
// escapes N tokens with probability (1 - k/E)^N), the routers (ROUTER_BYTES a value).
const BYTES_PER_WEIGHT = { bf16: 2, int8: 1 + 2 / 32, int4: 0.5 + 2 / 32 };
function stepBytes(N, bpw, routerBytes) {
  const w = weightCounts(m);
  const picked = m.E * (1 - Math.pow(1 - m.k / m.E, N)); // expected distinct experts per layer
  return (w.attn + (w.experts * picked) / m.E + w.lmHead) * bpw + routerBytes * w.router;
}

// The step's roofline with N streams, in ms: each part takes the longer of its weight bytes at the read
// probe and its multiply-adds at the dot product's peak (GMAC/s). The experts of a layer count one by
// one: an expert with a few rows streams, one with many computes, and they do not overlap each other's
// time. Under uniform routing an expert's rows are Binomial(N, k/E). Attention over the KV cache, the
// norms and the embeddings are left out (under 2% of a step here).
function binomial(n, r, p) {
  let c = 1;
  for (let i = 0; i < r; i++) c = (c * (n - i)) / (i + 1);
  return c * Math.pow(p, r) * Math.pow(1 - p, n - r);
}
function stepRoofline(N, bpw, routerBytes, readGBs, peakGmacs) {
  const part = (weights, rows) => Math.max((weights * bpw) / (readGBs * 1e6), (rows * weights) / (peakGmacs * 1e6));
  const w = weightCounts(m);
  const expert = 3 * m.H * m.F;
  let experts = 0;
  for (let r = 1; r <= N; r++) experts += binomial(N, r, m.k / m.E) * part(expert, r);
  const layer = part(w.attn / m.layers, N) + (routerBytes * m.E * m.H) / (readGBs * 1e6) + m.E * experts;
  return m.layers * layer + part(w.lmHead, N);
}

const binding = require('node-gyp-build')(root);
const readGBs = () => binding.bench.readBandwidth(quick ? 64 << 20 : 1 << 30, THREADS);
let bw = readGBs();
// Multiply-add peaks (GMAC/s) of the kernels each format runs: for int8 and int4 the integer dot product
// (vpdpbusd) with the scaling of each group of 32 (a conversion, a multiply and an FMA per accumulator,
// which take the dot products' issue slots on Zen 4 and 5: about 0.8 of the bare peak, which `intBare`
// keeps for the log), the bf16 dot product (or float32 FMA without it) for bf16; 0 where not measured.
const cpuInfo = binding.backendInfo().cpu;
const fmaIsa = ['avx512bf16', 'avx512', 'avx2', 'neon'].find((i) => cpuInfo.supported.includes(i));
const peaks = { int: 0, intBare: 0, bf16: 0 };
function measurePeaks() {
  peaks.int = Math.max(peaks.int, binding.bench.int8DotPeak(THREADS, 32) / 2);
  peaks.intBare = Math.max(peaks.intBare, binding.bench.int8DotPeak(THREADS) / 2);
  if (fmaIsa) peaks.bf16 = Math.max(peaks.bf16, binding.bench.fmaPeak(ISA_INDEX[fmaIsa], THREADS) / 2);
}
measurePeaks();
const peakOf = (format) => (format === 'bf16' ? peaks.bf16 : peaks.int);
log(
  `fused-moe generate bench: ${os.cpus()[0].model}, ${os.cpus().length} cores; ${THREADS} threads; read ${fmt(bw)} GB/s`,
);
const files = ensureModel(cacheDir, name, m, engines.includes('llama') ? formats.map((f) => FORMATS[f].gguf) : [], log);
writeBenchTokenizer(files.hf, m.V);
const context = RUN.longPrompt + RUN.tokens * 4 + 64;
const results = [];
for (const format of formats) {
  for (const engine of engines) {
    log(`${name} ${format} ${engine}: streams ${streams.join(', ')} ...`);
    const job = { engine, format, V: m.V, streams, context, ...RUN };
    if (engine === 'ours') Object.assign(job, { dir: files.hf, quantize: FORMATS[format].ours });
    else Object.assign(job, { gguf: files.gguf[FORMATS[format].gguf], longPrompt: 0, shared: null });
    const r = runChild(__filename, job);
    results.push({ format, engine, ...r });
    if (r.error) log(`  failed: ${r.error}`);
  }
}
bw = Math.max(bw, readGBs());
measurePeaks();

const rows = [];
log(
  `\n| format | streams | engine | decode tok/s (agg.) | vs 1 stream | of read bw | of roofline | TTFT p50/p99 ms | ITL p50/p99 ms |`,
);
log(`| --- | --- | --- | --- | --- | --- | --- | --- | --- |`);
for (const r of results) {
  if (r.error) continue;
  const one = r.streams[1] ? median(r.streams[1].map((f) => f.decodeTokS)) : NaN;
  for (const N of streams) {
    const f = r.streams[N];
    const rate = median(f.map((x) => x.decodeTokS));
    const bytes = stepBytes(N, BYTES_PER_WEIGHT[r.format], ROUTER_BYTES[r.engine]);
    const frac = ((rate / N) * bytes) / (bw * 1e9);
    const peak = peakOf(r.format);
    const roofline = peak > 0 ? stepRoofline(N, BYTES_PER_WEIGHT[r.format], ROUTER_BYTES[r.engine], bw, peak) : NaN;
    const row = {
      format: r.format,
      engine: r.engine,
      streams: N,
      decodeTokS: rate,
      vsOne: rate / one,
      readFraction: frac,
      rooflineFraction: (rate / N) * (roofline / 1e3),
      ttftP50: median(f.map((x) => x.ttftP50)),
      ttftP99: median(f.map((x) => x.ttftP99)),
      itlP50: median(f.map((x) => x.itlP50)),
      itlP99: median(f.map((x) => x.itlP99)),
    };
    rows.push(row);
    log(
      `| ${r.format} | ${N} | ${r.engine} | ${fmt(rate)} | ${fmt(row.vsOne)}× | ${(frac * 100).toFixed(0)}% | ${Number.isFinite(roofline) ? (row.rooflineFraction * 100).toFixed(0) + '%' : '-'} | ${fmt(row.ttftP50)} / ${fmt(row.ttftP99)} | ${fmt(row.itlP50)} / ${fmt(row.itlP99)} |`,
    );
  }
}
for (const r of results) {
  if (r.error || !r.phases) continue;
  for (const N of streams) {
    const p = r.phases[N];
    const parts = Object.entries(p.msPerStep).map(([k, ms]) => `${k} ${fmt(ms)}`);
    log(
      `${r.format} ${N} streams: native steps ${((p.nativeMs / p.wallMs) * 100).toFixed(0)}% of the wall time (${fmt((p.wallMs - p.nativeMs) / p.steps)} ms a step outside them: the step loop, sampling, streaming); ms per step (${p.steps} steps, prompts included): ${parts.join(', ')}`,
    );
  }
}
for (const format of formats) {
  const peak = peakOf(format);
  if (peak > 0 && streams.length > 1) {
    const rate = (N) => (N / stepRoofline(N, BYTES_PER_WEIGHT[format], ROUTER_BYTES.ours, bw, peak)) * 1e3;
    const lo = Math.min(...streams),
      hi = Math.max(...streams);
    log(
      `${format}: the roofline (read ${fmt(bw)} GB/s, ${fmt(peak)} GMAC/s${format === 'bf16' ? '' : ` with the group scaling, ${fmt(peaks.intBare)} bare`}) allows ${fmt(rate(lo))} tok/s at ${lo} stream(s) and ${fmt(rate(hi))} at ${hi}: ${fmt(rate(hi) / rate(lo))}×`,
    );
  }
  const ours = rows.find((x) => x.format === format && x.engine === 'ours' && x.streams === Math.max(...streams));
  const llama = rows.find((x) => x.format === format && x.engine === 'llama' && x.streams === Math.max(...streams));
  if (ours && llama)
    log(`${format}: ${ours.streams} streams, ours / llama.cpp = ${fmt(ours.decodeTokS / llama.decodeTokS)}×`);
  const lp = results.find((x) => x.format === format && x.engine === 'ours')?.longPrompt;
  if (lp) {
    for (const r of lp.runs)
      log(
        `${format}: a ${lp.tokens}-token prompt read in ${fmt(r.readMs)} ms while 8 streams ran: their ITL p99 ${fmt(r.itlP99Before)} -> ${fmt(r.itlP99During)} ms (max ${fmt(r.itlMaxDuring)}); one ${RUN.chunkTokens}-token chunk alone ${fmt(r.chunkMs)} ms: a rise of ${r.riseInChunks.toFixed(2)} chunks`,
      );
    log(
      `${format}: p99 inter-token latency rise while the long prompt is read, median of ${lp.runs.length} runs: ${lp.riseInChunks.toFixed(2)} chunks (target <= 1)`,
    );
    const d = lp.deepChunk;
    log(
      `${format}: a ${RUN.chunkTokens}-token chunk after ${d.depth} tokens ${fmt(d.deepMs)} ms, at the start ${fmt(d.freshMs)} ms: ${fmt(d.measured)}× (the step budget's cost model: ${fmt(d.modelled)}×)`,
    );
  }
  const sh = results.find((x) => x.format === format && x.engine === 'ours')?.shared;
  if (sh) {
    const of = (kind, key) => median(sh.runs[kind].map((r) => r[key]));
    const line = (kind) =>
      `every first token by ${fmt(of(kind, 'lastFirstTokenMs'))} ms (p50 ${fmt(of(kind, 'firstTokenMs'))}), all done in ${fmt(of(kind, 'wallMs'))} ms, ${fmt(of(kind, 'computedPromptTokens'))} prompt tokens computed`;
    log(
      `${format}: ${sh.requests} requests at once, a ${sh.system}-token system prompt and a ${sh.question}-token question each, ${sh.tokens} tokens out (medians of ${sh.runs.shared.length}): one system prompt: ${line('shared')}; distinct ones: ${line('distinct')}; first tokens ${fmt(of('distinct', 'lastFirstTokenMs') / of('shared', 'lastFirstTokenMs'))}× sooner, done ${fmt(of('distinct', 'wallMs') / of('shared', 'wallMs'))}× sooner`,
    );
  }
}
const started = new Date().toISOString();
const file = path.join(__dirname, 'results', `generate-${started.replace(/[:.]/g, '-')}${quick ? '-quick' : ''}.json`);
fs.mkdirSync(path.dirname(file), { recursive: true });
const out = {
  date: started,
  command: `node bench/generate.js ${args.join(' ')}`.trim(),
  cpu: os.cpus()[0].model,
  readGBs: bw,
  peakGmacs: peaks,
  run: RUN,
  model: m,
  rows,
  results,
};
fs.writeFileSync(file, JSON.stringify(out, null, 1));
if (jsonOut) process.stdout.write(JSON.stringify(out) + '\n');
