#!/usr/bin/env node
// The whole-model benchmark: MoeModel against llama.cpp (through node-llama-cpp, CPU, same threads)
// on the same random weights: prompt processing tokens/s at 512 tokens and decode tokens/s at batch
// 1, each also as a fraction of a ceiling measured in this same run: decode as the bytes a token reads
// per second against the read-bandwidth probe, prompt as FLOP/s against the FMA (bf16: dot) peak.
//
//   npm run bench:model                          both models, every format (an hour or more on 2 cores;
//                                                the first run also writes about 35 GB of model files)
//   node bench/model.js --quick                  small shapes, every format, a couple of minutes
//   node bench/model.js --models mixtral --formats bf16,int4 --engines ours
//   --cache-dir DIR                              where the model files live (default: the OS temp
//                                                folder, fused-moe-bench-models; reused across runs)
//   --json                                       the results object on stdout (the table goes to stderr)
//   --no-settle                                  each measured decode step right after its read probe,
//                                                without the unmeasured step between (bench/model-engines.js)
//   --prefix N                                   decode after an N-token prefix instead of 16 (a long
//                                                context: the attention part grows; the %bw figures
//                                                still count no KV cache bytes)
//
// Models: a Mixtral-8x7B-width model with 2 layers and a Qwen3-30B-A3B-width model with 4 layers
// (bench/model-files.js), random bf16 weights from a fixed seed. Formats: ours bf16 / int8 / int4
// (`quantize`, group 32) against llama.cpp BF16 / Q8_0 / Q4_0 GGUF of the same values. Each (model,
// engine, format) runs in a child process, one after the other. Results go to bench/results/.
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
  fileBytes,
  ROUTER_BYTES,
} = require('./model-files');
const { runAsChild, runChild, cliOptions } = require('./child');
const { fmt, pct, median, pairedBwFraction, ISA_INDEX } = require('./util');

const root = path.join(__dirname, '..');

if (
  runAsChild(() => {
    const { runOurs, runLlama } = require('./model-engines');
    return { ours: runOurs, llama: runLlama };
  })
)
  return;

// ---- options ------------------------------------------------------------------------------------
const { args, opt, quick, jsonOut, log } = cliOptions({
  values: ['--models', '--formats', '--engines', '--prefix', '--cache-dir'],
  flags: ['--no-settle'],
});
const list = (name, all) => {
  const v = opt(name) ? opt(name).split(',') : all;
  for (const x of v) if (!all.includes(x)) throw new RangeError(`${name}: '${x}' is not one of ${all.join(', ')}`);
  return v;
};
const shapes = quick ? QUICK_MODELS : MODELS;
const modelNames = list('--models', Object.keys(shapes));
const formats = list('--formats', Object.keys(FORMATS));
const engines = list('--engines', ['ours', 'llama']);
const cacheDir = opt('--cache-dir') || path.join(os.tmpdir(), 'fused-moe-bench-models' + (quick ? '-quick' : ''));
const THREADS = 2;
const RUN = quick
  ? { promptTokens: 64, promptReps: 3, prefix: 8, warmDecode: 2, decodeSteps: 12, context: 256, probeBytes: 0 }
  : {
      promptTokens: 512,
      promptReps: 3,
      prefix: 16,
      warmDecode: 4,
      decodeSteps: 64,
      context: 1024,
      probeBytes: 256 << 20,
    };
if (opt('--prefix')) {
  const n = Number(opt('--prefix'));
  if (!Number.isInteger(n) || n < 1 || n > 30000) throw new RangeError(`--prefix: expected an integer from 1 to 30000`);
  RUN.prefix = n;
  // The prefix, every warm-up, measured and settling step, and some room.
  RUN.context = Math.max(RUN.context, n + 2 * (RUN.warmDecode + RUN.decodeSteps) + 64);
}

// ---- bytes and FLOPs ------------------------------------------------------------------------------
const GROUP = 32;
// Bytes per weight of the projection matrices. Ours: codes plus one IEEE half scale per group of 32
// (csrc/cpu/packing.h, quant_group_bytes); llama.cpp: Q8_0 / Q4_0 blocks of 34 / 18 bytes per 32.
const BYTES_PER_WEIGHT = {
  ours: { bf16: 2, int8: 1 + 2 / GROUP, int4: 0.5 + 2 / GROUP },
  llama: { bf16: 2, int8: 34 / 32, int4: 18 / 32 },
};

/** Bytes one decode step reads: every attention matrix, the k picked experts of each layer, the router
 * (ROUTER_BYTES a value), the LM head, one embeddings row (bf16). The KV cache (under 1% here) is left out. */
function decodeBytes(m, bpw, routerBytes) {
  const w = weightCounts(m);
  return (w.attn + (w.experts * m.k) / m.E + w.lmHead) * bpw + routerBytes * w.router + 2 * m.H;
}

/** Bytes each timed part of a decode step reads (MoeModel.stepTimes() phases with weights). */
function decodePhaseBytes(m, bpw, routerBytes) {
  const w = weightCounts(m);
  const output = m.layers * m.H * m.heads * m.D;
  return {
    qkv: (w.attn - output) * bpw,
    output: output * bpw,
    mlp: ((w.experts * m.k) / m.E) * bpw + routerBytes * w.router,
    lmHead: w.lmHead * bpw,
  };
}

/** FLOPs of a T-token prompt on a fresh sequence: the projections, routed experts and router of every
 * token, causal attention (QK and PV), and the LM head of the last token only. */
function promptFlops(m, T) {
  const w = weightCounts(m);
  const perToken = w.attn + (w.experts * m.k) / m.E + w.router;
  const attention = m.layers * 2 * 2 * m.heads * m.D * ((T * (T + 1)) / 2);
  return 2 * T * perToken + attention + 2 * w.lmHead;
}

function memAvailable() {
  try {
    const m = /MemAvailable:\s+(\d+) kB/.exec(fs.readFileSync('/proc/meminfo', 'utf8'));
    if (m) return Number(m[1]) * 1024;
  } catch {
    // not Linux: fall back to what Node reports
  }
  return os.freemem();
}

// ---- ceilings -------------------------------------------------------------------------------------
const binding = require('node-gyp-build')(root);
const cpu = binding.backendInfo().cpu;
const fmaIsa = ['avx512', 'avx2', 'neon'].find((i) => cpu.supported.includes(i));
const ceilings = { readGBs: 0, fmaGflops: 0, bf16DotGflops: 0 };
// Measured before and after the cases, the higher kept: a ceiling caught low would flatter every fraction.
function measureCeilings() {
  ceilings.readGBs = Math.max(ceilings.readGBs, binding.bench.readBandwidth(quick ? 64 << 20 : 1 << 30, THREADS));
  if (fmaIsa) ceilings.fmaGflops = Math.max(ceilings.fmaGflops, binding.bench.fmaPeak(ISA_INDEX[fmaIsa], THREADS));
  if (cpu.supported.includes('avx512bf16'))
    ceilings.bf16DotGflops = Math.max(ceilings.bf16DotGflops, binding.bench.fmaPeak(ISA_INDEX.avx512bf16, THREADS));
}
const promptCeiling = (format) =>
  format === 'bf16' && ceilings.bf16DotGflops ? ceilings.bf16DotGflops : ceilings.fmaGflops;

// ---- run ------------------------------------------------------------------------------------------
log(
  `fused-moe model bench: ${os.cpus()[0].model}, ${os.cpus().length} cores, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB; ${THREADS} threads each; kernels ${cpu.isa}`,
);
measureCeilings();
log(
  `ceilings: read ${fmt(ceilings.readGBs)} GB/s; ${fmaIsa} f32 FMA peak ${fmt(ceilings.fmaGflops)} GFLOP/s` +
    (ceilings.bf16DotGflops ? `; bf16 dot peak ${fmt(ceilings.bf16DotGflops)} GFLOP/s` : ''),
);

const rows = [];
let failed = false;
const started = new Date().toISOString();
const resultFile = path.join(
  __dirname,
  'results',
  `model-${started.replace(/[:.]/g, '-')}${quick ? '-quick' : ''}.json`,
);
const resultOf = (targets) => ({
  date: started,
  command: `node bench/model.js ${args.join(' ')}`.trim(),
  machine: {
    cpu: os.cpus()[0].model,
    cores: os.cpus().length,
    memGiB: os.totalmem() / 2 ** 30,
    kernels: cpu.isa,
    supported: cpu.supported,
  },
  quick,
  threads: THREADS,
  run: RUN,
  ceilings,
  bytesPerWeight: BYTES_PER_WEIGHT,
  rows,
  targets,
});
// Saved after every case too, so that an hour's figures survive a later failure.
function save(targets) {
  fs.mkdirSync(path.dirname(resultFile), { recursive: true });
  fs.writeFileSync(resultFile, JSON.stringify(resultOf(targets), null, 1));
}
for (const name of modelNames) {
  const m = shapes[name];
  const ggufTypes = engines.includes('llama') ? formats.map((f) => FORMATS[f].gguf) : [];
  const sizes = ['hf', ...ggufTypes].map((f) => `${f} ${(fileBytes(m, f) / 1e9).toFixed(2)} GB`).join(', ');
  log(
    `\n${name}: H ${m.H}, ${m.layers} layers, ${m.heads}/${m.kvHeads} heads of ${m.D}, E ${m.E}, k ${m.k}, F ${m.F}, vocab ${m.V}; ` +
      `${(weightCounts(m).total / 1e9).toFixed(2)} G weights; files (${cacheDir}): ${sizes}`,
  );
  let files;
  try {
    files = ensureModel(cacheDir, name, m, ggufTypes, log);
  } catch (e) {
    log(`${name}: ${e.message}`);
    failed = true;
    continue;
  }
  const prompt = benchTokens(RUN.promptTokens, m.V, 11);
  const decodePrefix = benchTokens(RUN.prefix, m.V, 12);
  const decodeTokens = benchTokens(RUN.warmDecode + RUN.decodeSteps, m.V, 13);
  const settleTokens = args.includes('--no-settle') ? null : benchTokens(RUN.warmDecode + RUN.decodeSteps, m.V, 14);
  for (const format of formats) {
    const row = {
      model: name,
      format,
      shape: m,
      promptTokens: RUN.promptTokens,
      flops: promptFlops(m, RUN.promptTokens),
    };
    rows.push(row);
    for (const engine of engines) {
      const bpw = BYTES_PER_WEIGHT[engine][format];
      const resident = engine === 'ours' ? fileBytes(m, 'hf') * (bpw / 2) : fileBytes(m, FORMATS[format].gguf);
      const avail = memAvailable();
      if (avail < resident * 1.1 + 1.5e9) {
        log(
          `${name} ${format} ${engine}: skipped, it needs about ${(resident / 1e9).toFixed(1)} GB and ${(avail / 1e9).toFixed(1)} GB is available`,
        );
        failed = true;
        continue;
      }
      const job = {
        engine,
        quantize: FORMATS[format].ours,
        dir: files.hf,
        gguf: files.gguf[FORMATS[format].gguf],
        prompt,
        decodePrefix,
        decodeTokens,
        settleTokens,
        warmDecode: RUN.warmDecode,
        probeBytes: RUN.probeBytes,
        promptReps: RUN.promptReps,
        threads: THREADS,
        context: RUN.context,
      };
      log(`${name} ${format} ${engine} ...`);
      const r = runChild(__filename, job);
      if (r.error) {
        log(`${name} ${format} ${engine}: child failed: ${r.error}`);
        failed = true;
        continue;
      }
      const promptMs = median(r.promptMs),
        decodeMs = median(r.decodeMs);
      const bytes = decodeBytes(m, bpw, ROUTER_BYTES[engine]);
      row[engine] = {
        loadS: r.loadS,
        residentGB: r.residentGB,
        info: r.info,
        promptMs: r.promptMs,
        decodeMs: r.decodeMs,
        bytesPerToken: bytes,
        bytesPerWeight: bpw,
        promptTokPerS: RUN.promptTokens / (promptMs / 1e3),
        promptGflops: row.flops / (promptMs / 1e3) / 1e9,
        decodeMedianMs: decodeMs,
        decodeTokPerS: 1e3 / decodeMs,
        decodeGBs: bytes / (decodeMs / 1e3) / 1e9,
        // Median over steps of each step's bytes/s against the read probe taken just before it.
        decodePairedBwFraction: pairedBwFraction(bytes, r.decodeMs, r.decodeProbes),
        // Steps over twice the median: stalls (another process took a core mid-step).
        decodeStalls: r.decodeMs.filter((t) => t > 2 * decodeMs).length,
        decodePhaseMs: r.decodePhaseMs,
        decodeOutsideMs: r.decodeOutsideMs,
      };
      if (r.info && r.info.finite === false) {
        log(`${name} ${format} ${engine}: non-finite logits`);
        failed = true;
      }
      log(
        `  load ${fmt(r.loadS)} s (resident ${fmt(r.residentGB)} GB after); prompt ${fmt(promptMs)} ms (${r.promptMs.map(fmt).join(' ')}); decode median ${fmt(decodeMs)} ms ` +
          `of ${r.decodeMs.length} steps (min ${fmt(Math.min(...r.decodeMs))}, max ${fmt(Math.max(...r.decodeMs))}, ${row[engine].decodeStalls} over 2x)`,
      );
      if (r.decodePhaseMs) {
        // Median ms per step in each part, and the GB/s of the parts that stream weights, against the median
        // of the probes taken before the steps (or the run's probe).
        const phaseBytes = decodePhaseBytes(m, bpw, ROUTER_BYTES[engine]);
        const probe = r.decodeProbes && r.decodeProbes.length ? median(r.decodeProbes) : ceilings.readGBs;
        const parts = Object.entries(r.decodePhaseMs).map(([p, ms]) => {
          if (!phaseBytes[p]) return `${p} ${fmt(ms)}`;
          const gbs = phaseBytes[p] / (ms / 1e3) / 1e9;
          return `${p} ${fmt(ms)} (${fmt(gbs)} GB/s, ${pct(gbs / probe)})`;
        });
        log(`  decode ms per step by part (% of the ${fmt(probe)} GB/s probe): ${parts.join(', ')}`);
        if (r.decodeOutsideMs !== undefined)
          log(
            `  decode ms per step outside the native step (call, wake-ups): ${fmt(r.decodeOutsideMs)} ` +
              `(${pct(r.decodeOutsideMs / decodeMs)} of the median step)`,
          );
      }
      save(undefined);
    }
  }
}

// ---- report ---------------------------------------------------------------------------------------
if (!quick) {
  measureCeilings();
  log(
    `\nceilings after the cases (the higher of the two kept): read ${fmt(ceilings.readGBs)} GB/s; f32 FMA ${fmt(ceilings.fmaGflops)} GFLOP/s` +
      (ceilings.bf16DotGflops ? `; bf16 dot ${fmt(ceilings.bf16DotGflops)} GFLOP/s` : ''),
  );
}
for (const row of rows)
  for (const e of engines)
    if (row[e]) {
      row[e].decodeBwFraction = row[e].decodeGBs / ceilings.readGBs;
      row[e].promptPeakFraction = row[e].promptGflops / promptCeiling(row.format);
    }

const ratio = (a, b) => (a && b ? fmt(a / b) + 'x' : '-');
const head = [
  'model',
  'format',
  'prompt tok/s ours',
  'llama',
  'ours/llama',
  '%peak ours',
  'llama',
  'decode tok/s ours',
  'llama',
  'ours/llama',
  '%bw ours',
  'llama',
  '%bw paired ours',
  'llama',
];
const table = [head];
for (const r of rows) {
  const o = r.ours || {},
    l = r.llama || {};
  table.push([
    r.model,
    `${r.format}/${FORMATS[r.format].gguf}`,
    o.promptTokPerS ? fmt(o.promptTokPerS) : '-',
    l.promptTokPerS ? fmt(l.promptTokPerS) : '-',
    ratio(o.promptTokPerS, l.promptTokPerS),
    o.promptTokPerS ? pct(o.promptPeakFraction) : '-',
    l.promptTokPerS ? pct(l.promptPeakFraction) : '-',
    o.decodeTokPerS ? fmt(o.decodeTokPerS) : '-',
    l.decodeTokPerS ? fmt(l.decodeTokPerS) : '-',
    ratio(o.decodeTokPerS, l.decodeTokPerS),
    o.decodeTokPerS ? pct(o.decodeBwFraction) : '-',
    l.decodeTokPerS ? pct(l.decodeBwFraction) : '-',
    o.decodePairedBwFraction !== undefined ? pct(o.decodePairedBwFraction) : '-',
    l.decodePairedBwFraction !== undefined ? pct(l.decodePairedBwFraction) : '-',
  ]);
}
const widths = head.map((_, i) => Math.max(...table.map((row) => String(row[i]).length)));
log('');
for (const row of table) log(row.map((v, i) => String(v).padStart(widths[i])).join('  '));
log(
  `prompt: ${RUN.promptTokens} tokens, median of ${RUN.promptReps}; %peak of the ${fmaIsa} f32 FMA peak (bf16: of the bf16 dot peak). ` +
    `decode: batch 1, median of ${RUN.decodeSteps} steps after a ${RUN.prefix}-token prefix; %bw: bytes a token reads / time, of the run's read probe; ` +
    `%bw paired: the median over steps of the same against a probe taken just before each step, one unmeasured step between them (the decode target uses it where measured).`,
);

const targets = [];
for (const r of rows) {
  if (!r.ours) continue;
  const tag = `${r.model} ${r.format}`;
  const bw = r.ours.decodePairedBwFraction ?? r.ours.decodeBwFraction;
  targets.push({
    target: `${tag}: decode >= 85% of read bandwidth${r.ours.decodePairedBwFraction !== undefined ? ' (paired probe)' : ''}`,
    value: bw,
    ok: bw >= 0.85,
    show: pct(bw),
  });
  if (r.llama) {
    const d = r.ours.decodeTokPerS / r.llama.decodeTokPerS,
      p = r.ours.promptTokPerS / r.llama.promptTokPerS;
    targets.push({ target: `${tag}: decode >= llama.cpp`, value: d, ok: d >= 1, show: fmt(d) + 'x' });
    targets.push({ target: `${tag}: prompt >= 2x llama.cpp`, value: p, ok: p >= 2, show: fmt(p) + 'x' });
  }
}
log('');
for (const t of targets) log(`${t.ok ? 'met ' : 'MISS'}  ${t.target}: ${t.show}`);

const finalTargets = targets.map(({ show: _show, ...t }) => t);
save(finalTargets);
log(`results: ${path.relative(root, resultFile)}`);
if (jsonOut) process.stdout.write(JSON.stringify(resultOf(finalTargets)) + '\n');
process.exit(failed ? 1 : 0);
