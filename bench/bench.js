#!/usr/bin/env node
// The CPU benchmark: time per forward, tokens/s, weight GB/s and GFLOP/s of the MoE block per kernel
// set, each as a fraction of the machine ceilings measured in this same run (streaming read bandwidth,
// the FMA peak of the set's vector width, and for avx512bf16 the bf16 or int8 dot-product peak its
// weights run on), with the scalar set's figure beside it.
//
//   node bench/bench.js                 all cases (about 10 minutes on a 2-core machine)
//   node bench/bench.js --quick         tiny shapes, every set, a few seconds (the smoke test runs it)
//   node bench/bench.js --cases mixtral-decode-bf16,mid-f32 --isa avx512bf16,scalar
//   node bench/bench.js --switch        the decode / prefill switch measurement only (bf16, f32, int4)
//   --json                              the results object on stdout (the table goes to stderr)
//
// At T = 1 every forward also follows a read probe of its own, and "%bw paired" (which the decode
// targets use) is the median of the per-forward fractions: the run's ceiling alone swung 68-102% on
// one case between runs minutes apart. Between the probe and the timed forward runs one untimed forward
// of another token, as consecutive decode steps follow each other: the forward right after a probe
// pays for the probe (the pool's threads asleep, the router's weights evicted).
//
// The kernel set is fixed per process (FUSED_MOE_ISA), so every (case, set) runs in a child process
// of this script (`--child`) and reports JSON on stdout. Results are written to
// bench/results/<date>.json. It uses the raw addon, so it needs no TypeScript build.
'use strict';
const { spawnSync } = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');

const root = path.join(__dirname, '..');
const binding = require('node-gyp-build')(root);
const { fill, layerWeights, fmt, pct, median, pairedBwFraction, ISA_INDEX } = require('./util');
const { cliOptions } = require('./child');

// ---- cases --------------------------------------------------------------------------------------
// Mixtral-8x7B: H 4096, F 14336, E 8, k 2. "mid": the same block scaled by 1/4 per side. "fine": a
// fine-grained MoE (DeepSeek-MoE / Qwen-MoE style: many small experts, k 8), H 2048, F 1408, E 64.
const MIXTRAL = { H: 4096, F: 14336, E: 8, k: 2 };
const MID = { H: 1024, F: 3584, E: 8, k: 2 };
const FINE = { H: 2048, F: 1408, E: 64, k: 8 };
// DeepSeek-V2-Lite: 64 experts of F 1408, k 6, two shared experts (one of width 2816), greedy softmax
// routing. Qwen3-30B-A3B: 128 experts of F 768, k 8, renormalised.
const DSV2_LITE = { H: 2048, F: 1408, E: 64, k: 6, Fs: 2816, routing: 'softmax-topk' };
const QWEN3_30B = { H: 2048, F: 768, E: 128, k: 8, routing: 'softmax-topk-renorm' };
const GROUP = 128; // quantGroupSize of the quantized cases
// One Mixtral expert quantized at group 32 (the llama.cpp Q8_0 / Q4_0 layout the model uses), all rows
// on it: the quantized micro-kernels from decode (T = 1) through a few rows per expert (continuous
// batching) to prefill tiles (T = 64).
const EXPERT = { H: 4096, F: 14336, E: 1, k: 1 };
const CASES = [
  {
    name: 'mixtral-decode-bf16',
    ...MIXTRAL,
    dtype: 'bfloat16',
    T: [1],
    isas: ['avx512bf16', 'avx512', 'avx2'],
    reps: 9,
  },
  // The same decode with experts quantized at load from the same bf16 weights (group 128).
  {
    name: 'mixtral-decode-int8',
    ...MIXTRAL,
    dtype: 'bfloat16',
    quantize: 'int8',
    T: [1],
    isas: ['avx512bf16', 'avx2'],
    reps: 9,
  },
  {
    name: 'mixtral-decode-int4',
    ...MIXTRAL,
    dtype: 'bfloat16',
    quantize: 'int4',
    T: [1],
    isas: ['avx512bf16', 'avx2'],
    reps: 9,
  },
  // The quantized kernels' own rate: the same decode on a layer whose two experts' codes fit in L3
  // (H 1024, F 3584: 11 MB int4, 22 MB int8), so memory is not the limit; read as codes+scales GB/s.
  {
    name: 'l3-decode-int8',
    H: 1024,
    F: 3584,
    E: 2,
    k: 2,
    dtype: 'bfloat16',
    quantize: 'int8',
    T: [1],
    isas: ['avx512bf16', 'avx2'],
    reps: 101,
  },
  {
    name: 'l3-decode-int4',
    H: 1024,
    F: 3584,
    E: 2,
    k: 2,
    dtype: 'bfloat16',
    quantize: 'int4',
    T: [1],
    isas: ['avx512bf16', 'avx2'],
    reps: 101,
  },
  { name: 'mixtral-prefill-bf16', ...MIXTRAL, dtype: 'bfloat16', T: [512], isas: ['avx512bf16', 'avx512'], reps: 3 },
  { name: 'mixtral-f32', ...MIXTRAL, dtype: 'float32', T: [1, 512], isas: ['avx512', 'avx2'], reps: 3 },
  { name: 'mid-f32', ...MID, dtype: 'float32', T: [1, 16, 32, 128, 512], isas: ['avx512', 'avx2', 'scalar'], reps: 5 },
  {
    name: 'mid-bf16',
    ...MID,
    dtype: 'bfloat16',
    T: [1, 16, 128, 512],
    isas: ['avx512bf16', 'avx512', 'scalar'],
    reps: 5,
  },
  // Quantized prefill: both sets take integer dot products; avx512bf16 uses VNNI's vpdpbusd (int8 with
  // int8 activations), avx512 composes the int4 sums from vpmaddubsw + vpmaddwd and feeds int8 int16
  // activations through vpmaddwd.
  {
    name: 'mid-int8',
    ...MID,
    dtype: 'bfloat16',
    quantize: 'int8',
    T: [128, 512],
    isas: ['avx512bf16', 'avx512'],
    reps: 5,
  },
  {
    name: 'mid-int4',
    ...MID,
    dtype: 'bfloat16',
    quantize: 'int4',
    T: [128, 512],
    isas: ['avx512bf16', 'avx512'],
    reps: 5,
  },
  {
    name: 'expert-int4-g32',
    ...EXPERT,
    dtype: 'bfloat16',
    quantize: 'int4',
    group: 32,
    T: [1, 2, 3, 4, 6, 8, 16, 64],
    isas: ['avx512bf16', 'avx512', 'avx2'],
    reps: 9,
  },
  {
    name: 'expert-int8-g32',
    ...EXPERT,
    dtype: 'bfloat16',
    quantize: 'int8',
    group: 32,
    T: [1, 4, 16, 64],
    isas: ['avx512bf16', 'avx512', 'avx2'],
    reps: 9,
  },
  { name: 'fine-bf16', ...FINE, dtype: 'bfloat16', T: [1, 256], isas: ['avx512bf16', 'avx512'], reps: 5 },
  { name: 'fine-bf16-scalar', ...FINE, dtype: 'bfloat16', T: [1], isas: ['scalar'], reps: 3 },
  { name: 'dsv2lite-bf16', ...DSV2_LITE, dtype: 'bfloat16', T: [1, 512], isas: ['avx512bf16'], reps: 9 },
  { name: 'dsv2lite-f32', ...DSV2_LITE, dtype: 'float32', T: [1, 512], isas: ['avx512', 'avx2'], reps: 7 },
  { name: 'qwen3-30b-bf16', ...QWEN3_30B, dtype: 'bfloat16', T: [1, 512], isas: ['avx512bf16'], reps: 9 },
  { name: 'qwen3-30b-f32', ...QWEN3_30B, dtype: 'float32', T: [1, 512], isas: ['avx512', 'avx2'], reps: 7 },
];
const QUICK = [
  { name: 'quick-f32', H: 256, F: 512, E: 4, k: 2, dtype: 'float32', T: [1, 16], isas: ['*'], reps: 3 },
  { name: 'quick-bf16', H: 256, F: 512, E: 4, k: 2, dtype: 'bfloat16', T: [1, 16], isas: ['*'], reps: 3 },
  {
    name: 'quick-int4',
    H: 256,
    F: 512,
    E: 4,
    k: 2,
    dtype: 'bfloat16',
    quantize: 'int4',
    T: [1, 16],
    isas: ['*'],
    reps: 3,
  },
];
// Decode / prefill switch: one expert, M rows, each shape forced (FUSED_MOE_DECODE_ROWS).
const SWITCH = [
  {
    name: 'switch-bf16',
    H: 4096,
    F: 14336,
    E: 1,
    k: 1,
    dtype: 'bfloat16',
    T: [1, 2, 3, 4, 6, 8, 12, 16],
    isas: ['avx512bf16'],
    reps: 5,
  },
  {
    name: 'switch-f32',
    H: 4096,
    F: 14336,
    E: 1,
    k: 1,
    dtype: 'float32',
    T: [1, 2, 3, 4, 6, 8, 12, 16],
    isas: ['avx512'],
    reps: 5,
  },
  {
    name: 'switch-int4',
    H: 4096,
    F: 14336,
    E: 1,
    k: 1,
    dtype: 'bfloat16',
    quantize: 'int4',
    group: 32,
    T: [1, 2, 3, 4, 6, 8],
    isas: ['avx512bf16'],
    reps: 9,
  },
];

// ---- child: build one layer, time the forwards -------------------------------------------------
function runChild(spec) {
  const { H, F, E, k, dtype } = spec;
  const u16 = dtype !== 'float32';
  const t0 = process.hrtime.bigint();
  const Fs = spec.Fs || 0;
  const { w1, w3, w2, gate, shared } = layerWeights({ H, F, E, Fs }, u16);
  const layer = new binding.NativeLayer(
    {
      hiddenSize: H,
      intermediateSize: F,
      numExperts: E,
      topK: k,
      weightDtype: dtype,
      device: 'cpu',
      quantize: spec.quantize || 'none',
      quantGroupSize: spec.group || GROUP,
      routing: spec.routing,
      sharedIntermediateSize: Fs,
    },
    gate,
    w1,
    w3,
    w2,
    { shared },
  );
  w1.length = w3.length = w2.length = 0; // the layer holds its own packed copy
  const buildMs = Number(process.hrtime.bigint() - t0) / 1e6;
  const results = [];
  for (const T of spec.T) {
    const x = fill(T * H, false, 1, 100 + T);
    const out = new Float32Array(T * H);
    const used = new Set(layer.route(x).experts).size;
    layer.forwardSync(x, out); // warm-up: workspaces, page faults, caches
    const times = [];
    // Decode is bandwidth-bound and this machine's bandwidth swings within seconds: at T = 1 each
    // forward is paired with a read probe taken just before it (probes[i] beside times[i]).
    const probes = T === 1 && spec.paired ? [] : undefined;
    const settle = fill(T * H, false, 1, 200 + T);
    const until = Date.now() + (spec.minMs || 0);
    for (let r = 0; r < spec.reps || Date.now() < until; r++) {
      if (probes) {
        probes.push(binding.bench.readBandwidth(256 << 20, binding.backendInfo().cpu.threads));
        layer.forwardSync(settle, out);
      }
      const t = process.hrtime.bigint();
      layer.forwardSync(x, out);
      times.push(Number(process.hrtime.bigint() - t) / 1e6);
      if (r > 200) break;
    }
    let finite = true;
    for (let i = 0; i < out.length; i++) if (!Number.isFinite(out[i])) finite = false;
    results.push({ T, ms: median(times), times, probes, expertsUsed: used, finite });
  }
  const info = layer.info();
  layer.dispose();
  return { kernels: info.kernels, buildMs, results };
}

if (process.argv[2] === '--child') {
  process.stdout.write(JSON.stringify(runChild(JSON.parse(process.argv[3]))) + '\n');
  process.exit(0);
}

// ---- parent ---------------------------------------------------------------------------------------
const { args, opt, quick, jsonOut, log } = cliOptions({ values: ['--cases', '--isa'], flags: ['--switch'] });
const switchOnly = args.includes('--switch');

const info = binding.backendInfo().cpu;
const supported = info.supported;
const threads = info.threads;
const isaFilter = opt('--isa') ? opt('--isa').split(',') : null;
const caseFilter = opt('--cases') ? opt('--cases').split(',') : null;
let cases = quick ? QUICK : switchOnly ? SWITCH : CASES.concat(SWITCH);
if (caseFilter) cases = CASES.concat(SWITCH, QUICK).filter((c) => caseFilter.includes(c.name));

// Ceilings, measured first so they see the same machine state as the cases.
log(`fused-moe CPU bench: ${os.cpus()[0].model}, ${threads} threads, sets: ${supported.join(' ')}`);
// They are measured again after the cases and the higher figure is kept: a ceiling caught low (another
// process on the machine) would flatter every fraction.
const ceilings = { readGBs: 0, fmaGflops: {}, bf16DotGflops: 0, int8DotGflops: 0 };
function measureCeilings() {
  ceilings.readGBs = Math.max(ceilings.readGBs, binding.bench.readBandwidth(quick ? 64 << 20 : 1 << 30, threads));
  for (const isa of ['avx2', 'avx512', 'neon'])
    if (supported.includes(isa))
      ceilings.fmaGflops[isa] = Math.max(ceilings.fmaGflops[isa] || 0, binding.bench.fmaPeak(ISA_INDEX[isa], threads));
  if (supported.includes('avx512bf16')) {
    ceilings.bf16DotGflops = Math.max(ceilings.bf16DotGflops, binding.bench.fmaPeak(ISA_INDEX.avx512bf16, threads));
    ceilings.int8DotGflops = Math.max(ceilings.int8DotGflops, binding.bench.int8DotPeak(threads));
  }
}
// The ceiling of a case's integer or bf16 dot products: the avx512bf16 set runs quantized weights on
// vpdpbusd (int8 dot peak) and bf16 weights on vdpbf16ps (bf16 dot peak); the others have no dot ceiling.
const dotCeiling = (isa, c) =>
  isa !== 'avx512bf16' ? 0 : c.quantize ? ceilings.int8DotGflops : c.dtype === 'bfloat16' ? ceilings.bf16DotGflops : 0;
measureCeilings();
log(
  `ceilings: read ${fmt(ceilings.readGBs)} GB/s; f32 FMA peak ${Object.entries(ceilings.fmaGflops)
    .map(([k, v]) => `${k} ${fmt(v)}`)
    .join(', ')} GFLOP/s` +
    (ceilings.bf16DotGflops ? `; bf16 dot peak ${fmt(ceilings.bf16DotGflops)} GFLOP/s` : '') +
    (ceilings.int8DotGflops ? `; int8 dot peak ${fmt(ceilings.int8DotGflops)} GFLOP/s` : ''),
);

// The FMA ceiling of a set: its width's f32 peak (avx512bf16 runs f32 math at avx512 width).
const fmaCeiling = (isa) => ceilings.fmaGflops[isa === 'avx512bf16' ? 'avx512' : isa] || ceilings.fmaGflops.avx2 || 0;

const rows = [];
let failed = false;
for (const c of cases) {
  const isas = c.isas[0] === '*' ? supported : c.isas.filter((i) => supported.includes(i));
  for (const isa of isas) {
    if (isaFilter && !isaFilter.includes(isa)) continue;
    const variants = c.name.startsWith('switch')
      ? [
          ['decode', '4096'],
          ['prefill', '0'],
        ]
      : [[null, null]];
    for (const [shape, limit] of variants) {
      const env = { ...process.env, FUSED_MOE_ISA: isa };
      if (limit !== null) env.FUSED_MOE_DECODE_ROWS = limit;
      const spec = {
        H: c.H,
        F: c.F,
        E: c.E,
        k: c.k,
        dtype: c.dtype,
        quantize: c.quantize,
        group: c.group,
        routing: c.routing,
        Fs: c.Fs,
        T: c.T,
        reps: c.reps,
        minMs: quick ? 0 : 1000,
        paired: !quick,
      };
      const r = spawnSync(process.execPath, [__filename, '--child', JSON.stringify(spec)], {
        env,
        encoding: 'utf8',
        maxBuffer: 1 << 24,
      });
      if (r.status !== 0) {
        log(`${c.name} ${isa}: child failed: ${(r.stderr || '').trim().split('\n').slice(-3).join(' | ')}`);
        failed = true;
        continue;
      }
      const res = JSON.parse(r.stdout.trim().split('\n').pop());
      // Bytes per weight read: the stored dtype, or the codes plus one 16-bit scale per group.
      const g = c.group || GROUP;
      const es =
        c.quantize === 'int8' ? 1 + 2 / g : c.quantize === 'int4' ? 0.5 + 2 / g : c.dtype === 'float32' ? 4 : 2;
      for (const x of res.results) {
        const s = x.ms / 1e3;
        // Weights actually read: each picked expert once, and the shared expert.
        const Fs = c.Fs || 0;
        const bytes = (x.expertsUsed * 3 * c.H * c.F + 3 * c.H * Fs) * es;
        const flops = 2 * x.T * 3 * c.H * (c.k * c.F + Fs);
        const gbs = bytes / s / 1e9,
          gflops = flops / s / 1e9;
        rows.push({
          case: c.name,
          isa,
          kernels: res.kernels,
          shape,
          H: c.H,
          F: c.F,
          E: c.E,
          k: c.k,
          dtype: c.dtype,
          quantize: c.quantize,
          T: x.T,
          ms: x.ms,
          times: x.times,
          buildMs: res.buildMs,
          tokensPerS: x.T / s,
          weightGBs: gbs,
          gflops,
          bwFraction: gbs / ceilings.readGBs,
          fmaFraction: gflops / fmaCeiling(isa),
          dotFraction: dotCeiling(isa, c) ? gflops / dotCeiling(isa, c) : undefined,
          // Median over forwards of each forward's bytes/s against the probe taken just before it.
          pairedBwFraction: pairedBwFraction(bytes, x.times, x.probes),
          expertsUsed: x.expertsUsed,
          finite: x.finite,
        });
        if (!x.finite || !(x.ms > 0)) failed = true;
      }
    }
  }
}

// ---- report ---------------------------------------------------------------------------------------
if (!quick) {
  measureCeilings();
  for (const r of rows) {
    r.bwFraction = r.weightGBs / ceilings.readGBs;
    r.fmaFraction = r.gflops / fmaCeiling(r.isa);
    if (r.dotFraction !== undefined) r.dotFraction = r.gflops / dotCeiling(r.isa, r);
  }
  log(
    `ceilings after the cases (the higher of the two kept): read ${fmt(ceilings.readGBs)} GB/s; f32 FMA peak ` +
      `${Object.entries(ceilings.fmaGflops)
        .map(([k, v]) => `${k} ${fmt(v)}`)
        .join(', ')} GFLOP/s` +
      (ceilings.bf16DotGflops ? `; bf16 dot peak ${fmt(ceilings.bf16DotGflops)} GFLOP/s` : '') +
      (ceilings.int8DotGflops ? `; int8 dot peak ${fmt(ceilings.int8DotGflops)} GFLOP/s` : ''),
  );
}
const scalarOf = (r) =>
  rows.find(
    (s) =>
      s.isa === 'scalar' &&
      s.H === r.H &&
      s.F === r.F &&
      s.E === r.E &&
      s.dtype === r.dtype &&
      s.quantize === r.quantize &&
      s.T === r.T &&
      !s.shape,
  );
const head = [
  'case',
  'set',
  'T',
  'ms',
  'tok/s',
  'GB/s',
  '%bw',
  '%bw paired',
  'GFLOP/s',
  '%fma',
  'scalar ms',
  'x scalar',
];
const table = [head];
for (const r of rows.filter((r) => !r.shape)) {
  const s = r.isa !== 'scalar' ? scalarOf(r) : undefined;
  table.push([
    r.case,
    r.isa,
    r.T,
    fmt(r.ms),
    fmt(r.tokensPerS),
    fmt(r.weightGBs),
    pct(r.bwFraction),
    r.pairedBwFraction !== undefined ? pct(r.pairedBwFraction) : '',
    fmt(r.gflops),
    pct(r.fmaFraction) +
      (r.dotFraction !== undefined ? ` (${pct(r.dotFraction)} ${r.quantize ? 'int8' : 'bf16'} dot)` : ''),
    s ? fmt(s.ms) : '',
    s ? fmt(s.ms / r.ms) + 'x' : '',
  ]);
}
const widths = head.map((_, i) => Math.max(...table.map((row) => String(row[i]).length)));
for (const row of table) log(row.map((v, i) => String(v).padStart(widths[i])).join('  '));

// The switch: per M, ms of each shape.
const sw = rows.filter((r) => r.shape);
const switchSummary = [];
for (const name of [...new Set(sw.map((r) => r.case))]) {
  const line = [];
  for (const T of [...new Set(sw.filter((r) => r.case === name).map((r) => r.T))]) {
    const d = sw.find((r) => r.case === name && r.T === T && r.shape === 'decode');
    const p = sw.find((r) => r.case === name && r.T === T && r.shape === 'prefill');
    if (d && p) {
      line.push(`M=${T}: decode ${fmt(d.ms)} / prefill ${fmt(p.ms)} ms`);
      switchSummary.push({
        case: name,
        M: T,
        decodeMs: d.ms,
        prefillMs: p.ms,
        faster: d.ms <= p.ms ? 'decode' : 'prefill',
      });
    }
  }
  if (line.length) log(`${name}: ${line.join('; ')}`);
}

// Targets on the headline cases.
const find = (cs, isa, T) => rows.find((r) => r.case === cs && r.isa === isa && r.T === T && !r.shape);
const targets = [];
// Decode fractions: against the paired probes where the run took them (the median of per-forward ratios).
const decodeBw = (r) => (r.pairedBwFraction !== undefined ? r.pairedBwFraction : r.bwFraction);
const dec = find('mixtral-decode-bf16', 'avx512bf16', 1);
if (dec)
  targets.push({
    target: 'decode bf16 T=1 weight bytes/s >= 85% of read bandwidth',
    value: decodeBw(dec),
    ok: decodeBw(dec) >= 0.85,
  });
const pf = find('mixtral-f32', 'avx512', 512);
if (pf)
  targets.push({
    target: 'prefill f32 T=512 >= 70% of avx512 FMA peak',
    value: pf.fmaFraction,
    ok: pf.fmaFraction >= 0.7,
  });
const pb = find('mixtral-prefill-bf16', 'avx512bf16', 512);
if (pb && pf)
  targets.push({
    target: 'prefill bf16 (vdpbf16ps) >= 1.6x the f32 GFLOP/s',
    value: pb.gflops / pf.gflops,
    ok: pb.gflops / pf.gflops >= 1.6,
  });
const p2 = find('mixtral-f32', 'avx2', 512);
if (p2)
  targets.push({
    target: 'prefill f32 T=512 forced avx2 >= 70% of avx2 FMA peak',
    value: p2.fmaFraction,
    ok: p2.fmaFraction >= 0.7,
  });
// The family shapes, with the same ceilings as the Mixtral block.
for (const fam of ['dsv2lite', 'qwen3-30b']) {
  const d = find(`${fam}-bf16`, 'avx512bf16', 1);
  if (d)
    targets.push({
      target: `${fam} decode bf16 T=1 picked + shared expert bytes/s >= 85% of read bandwidth`,
      value: decodeBw(d),
      ok: decodeBw(d) >= 0.85,
    });
  const f = find(`${fam}-f32`, 'avx512', 512);
  if (f)
    targets.push({
      target: `${fam} prefill f32 T=512 >= 70% of avx512 FMA peak`,
      value: f.fmaFraction,
      ok: f.fmaFraction >= 0.7,
    });
  const b = find(`${fam}-bf16`, 'avx512bf16', 512);
  if (b && f)
    targets.push({
      target: `${fam} prefill bf16 >= 1.6x the f32 GFLOP/s`,
      value: b.gflops / f.gflops,
      ok: b.gflops / f.gflops >= 1.6,
    });
}
// Quantized decode against bf16 decode on the same set: tokens/s ratio, and the codes + scales read per
// second as a fraction of the read bandwidth.
for (const [q, want] of [
  ['int8', 1.8],
  ['int4', 3],
]) {
  for (const isa of ['avx512bf16', 'avx2']) {
    const r = find(`mixtral-decode-${q}`, isa, 1),
      b = find('mixtral-decode-bf16', isa, 1);
    if (!r || !b) continue;
    targets.push({
      target: `decode ${q} T=1 ${isa} >= ${want}x the bf16 tokens/s`,
      value: r.tokensPerS / b.tokensPerS,
      ok: r.tokensPerS / b.tokensPerS >= want,
      ratio: true,
    });
    targets.push({
      target: `decode ${q} T=1 ${isa} codes+scales bytes/s >= 80% of read bandwidth`,
      value: decodeBw(r),
      ok: decodeBw(r) >= 0.8,
    });
  }
}
for (const t of targets)
  log(
    `${t.ok ? 'met ' : 'MISS'}  ${t.target}: ${t.ratio || (t.value < 3 && t.target.includes('x the')) ? fmt(t.value) + 'x' : pct(t.value)}`,
  );

const result = {
  date: new Date().toISOString(),
  machine: { cpu: os.cpus()[0].model, threads, supported },
  quick,
  ceilings,
  rows,
  switch: switchSummary,
  targets,
};
const dir = path.join(__dirname, 'results');
fs.mkdirSync(dir, { recursive: true });
const file = path.join(dir, `${result.date.replace(/[:.]/g, '-')}${quick ? '-quick' : ''}.json`);
fs.writeFileSync(file, JSON.stringify(result, null, 1));
log(`results: ${path.relative(root, file)}`);
if (jsonOut) process.stdout.write(JSON.stringify(result) + '\n');
process.exit(failed ? 1 : 0);
