#!/usr/bin/env node
// Baseline: onnxruntime-node's MoE operator (contrib op com.microsoft:MoE, CPU execution provider,
// float32) on the shapes of bench/bench.js, beside fused-moe on the very same inputs in the same process.
//
//   npm install --no-save onnxruntime-node        (optional: not a dependency of this package)
//   node --expose-gc bench/baseline-onnxruntime.js
//   node --expose-gc bench/baseline-onnxruntime.js --quick          correctness check and small shapes only
//   node --expose-gc bench/baseline-onnxruntime.js --skip-mixtral   no Mixtral-8x7B shape (needs ~12 GB)
//   node bench/baseline-onnxruntime.js --check                      the correctness check only
//   --experts N                                                     Mixtral shape with N experts (default 8)
//   --threads N                                                     threads of both (default: the CPU count)
//
// The ONNX model is built here, by a small protobuf encoder: x -> MatMul(gate^T) -> router logits ->
// MoE(x, logits, fc1, fc2) -> y, so the baseline does the same work as our layer (router GEMM, softmax,
// top-k, renormalisation, SwiGLU experts, weighted combine). The MoE operator's CPU kernel takes the
// SwiGLU as one fused FC1 of shape [E, 2F, H] whose rows interleave gate (w1) and up (w3) rows
// (swiglu_fusion = 1), and FC2 = w2 as [E, H, F]; activation_alpha 1, activation_beta 0 and no clamp
// make its SwiGLU Mixtral's silu(w1 x) * (w3 x). The expert weights are fed as graph inputs (a model
// protobuf is limited to 2 GB; the CPU kernel does not pre-pack float weights, so inputs and
// initializers run the same code); the small router weight is an initializer.
//
// Before timing, both are checked against a float64 reference of the Mixtral block at a small odd size.
// Output: a table on stdout and bench/results/<date>-onnxruntime.json.
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const { fill, fmt, median } = require('./util');

const root = path.join(__dirname, '..');
let ortPath;
try {
  ortPath = require.resolve('onnxruntime-node', { paths: [root] });
} catch {
  console.log(
    'onnxruntime-node is not installed; this baseline is optional. To run it:\n' +
      '  npm install --no-save onnxruntime-node && node --expose-gc bench/baseline-onnxruntime.js',
  );
  process.exit(0);
}
const ort = require(ortPath);
const { MoeLayer, backendInfo } = require(path.join(root, 'dist'));

const args = process.argv.slice(2);
const opt = (name) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
const quick = args.includes('--quick');
const skipMixtral = quick || args.includes('--skip-mixtral');
const THREADS = Number(opt('--threads') || os.cpus().length); // intra-op threads of both; default: every CPU
const gc = () => {
  if (global.gc) {
    global.gc();
    global.gc();
  }
};

// ---- a minimal protobuf writer (proto3 wire format) and the ONNX messages used here ----------------
// Wire types: 0 varint, 2 length-delimited, 5 32-bit.
class Pb {
  constructor() {
    this.parts = [];
  }
  varint(v) {
    const b = [];
    v = Number(v);
    if (v < 0) throw new Error('negative varint');
    while (v >= 128) {
      b.push((v % 128) | 128);
      v = Math.floor(v / 128);
    }
    b.push(v);
    this.parts.push(Buffer.from(b));
    return this;
  }
  tag(field, wire) {
    return this.varint(field * 8 + wire);
  }
  int(field, v) {
    return this.tag(field, 0).varint(v);
  }
  bytes(field, buf) {
    this.tag(field, 2).varint(buf.length);
    this.parts.push(buf);
    return this;
  }
  str(field, s) {
    return this.bytes(field, Buffer.from(s, 'utf8'));
  }
  msg(field, pb) {
    return this.bytes(field, pb.finish());
  }
  float(field, v) {
    const b = Buffer.alloc(4);
    b.writeFloatLE(v);
    this.tag(field, 5);
    this.parts.push(b);
    return this;
  }
  finish() {
    return Buffer.concat(this.parts);
  }
}
const FLOAT = 1; // TensorProto.DataType.FLOAT
// ValueInfoProto{name, type: TypeProto{tensor_type{elem_type, shape{dim{dim_value | dim_param}}}}}
function valueInfo(name, dims) {
  const shape = new Pb();
  for (const d of dims) shape.msg(1, typeof d === 'string' ? new Pb().str(2, d) : new Pb().int(1, d));
  const tensorType = new Pb().int(1, FLOAT).msg(2, shape);
  return new Pb().str(1, name).msg(2, new Pb().msg(1, tensorType));
}
// TensorProto{dims, data_type, name, raw_data (little-endian)}
function tensor(name, dims, f32) {
  const t = new Pb();
  for (const d of dims) t.int(1, d);
  return t
    .int(2, FLOAT)
    .str(8, name)
    .bytes(9, Buffer.from(f32.buffer, f32.byteOffset, f32.byteLength));
}
// AttributeProto{name, f | i | s, type}: FLOAT 1, INT 2, STRING 3.
const attrF = (name, v) => new Pb().str(1, name).float(2, v).int(20, 1);
const attrI = (name, v) => new Pb().str(1, name).int(3, v).int(20, 2);
const attrS = (name, v) => new Pb().str(1, name).bytes(4, Buffer.from(v)).int(20, 3);
function node(opType, inputs, outputs, name, domain, attrs = []) {
  const n = new Pb();
  for (const i of inputs) n.str(1, i);
  for (const o of outputs) n.str(2, o);
  n.str(3, name).str(4, opType);
  for (const a of attrs) n.msg(5, a);
  if (domain) n.str(7, domain);
  return n;
}

// The model: x [T, H], fc1 [E, 2F, H], fc2 [E, H, F] in; y [T, H] out; gate^T [H, E] an initializer.
function buildModel({ H, F, E, k }, gate) {
  const gateT = new Float32Array(H * E);
  for (let e = 0; e < E; e++) for (let h = 0; h < H; h++) gateT[h * E + e] = gate[e * H + h];
  const g = new Pb();
  g.msg(1, node('MatMul', ['x', 'gate_t'], ['router_logits'], 'router', ''));
  g.msg(
    1,
    node('MoE', ['x', 'router_logits', 'fc1', '', 'fc2'], ['y'], 'moe', 'com.microsoft', [
      attrS('activation_type', 'swiglu'),
      attrI('swiglu_fusion', 1),
      attrF('activation_alpha', 1),
      attrF('activation_beta', 0),
      attrF('swiglu_limit', 1e30),
      attrI('k', k),
      attrI('normalize_routing_weights', 1),
      attrI('use_sparse_mixer', 0),
    ]),
  );
  g.str(2, 'mixtral_moe_block');
  g.msg(5, tensor('gate_t', [H, E], gateT));
  g.msg(11, valueInfo('x', ['T', H]));
  g.msg(11, valueInfo('fc1', [E, 2 * F, H]));
  g.msg(11, valueInfo('fc2', [E, H, F]));
  g.msg(12, valueInfo('y', ['T', H]));
  return new Pb()
    .int(1, 8) // ir_version
    .str(2, 'fused-moe-baseline')
    .msg(7, g)
    .msg(8, new Pb().str(1, '').int(2, 17))
    .msg(8, new Pb().str(1, 'com.microsoft').int(2, 1))
    .finish();
}

// ---- weights: per expert, as bench/bench.js makes them; ORT's fused FC1 interleaves w1 and w3 rows ------
function makeWeights({ H, F, E }) {
  const w1 = [],
    w3 = [];
  const fc2 = new Float32Array(E * H * F);
  for (let e = 0; e < E; e++) {
    w1.push(fill(F * H, false, 1 / Math.sqrt(H), 1 + 7 * e));
    w3.push(fill(F * H, false, 1 / Math.sqrt(H), 2 + 7 * e));
    fc2.set(fill(H * F, false, 1 / Math.sqrt(F), 3 + 7 * e), e * H * F);
  }
  const gate = fill(E * H, false, 2 / Math.sqrt(H), 4);
  return { w1, w3, fc2, gate, w2: Array.from({ length: E }, (_, e) => fc2.subarray(e * H * F, (e + 1) * H * F)) };
}
function interleaveFc1({ H, F, E }, w1, w3) {
  const fc1 = new Float32Array(E * 2 * F * H);
  for (let e = 0; e < E; e++) {
    const base = e * 2 * F * H;
    for (let f = 0; f < F; f++) {
      fc1.set(w1[e].subarray(f * H, (f + 1) * H), base + 2 * f * H);
      fc1.set(w3[e].subarray(f * H, (f + 1) * H), base + (2 * f + 1) * H);
    }
  }
  return fc1;
}
function toBf16(a) {
  const u = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const out = new Uint16Array(a.length);
  for (let i = 0; i < a.length; i++) {
    const v = u[i];
    out[i] = (v + 0x7fff + ((v >>> 16) & 1)) >>> 16; // round to nearest even (the weights are finite)
  }
  return out;
}

// ---- float64 reference of the Mixtral block --------------------------------------------------------
function reference({ H, F, E, k }, T, x, { gate, w1, w3, w2 }) {
  const y = new Float64Array(T * H);
  const g = new Float64Array(F);
  for (let t = 0; t < T; t++) {
    const xt = x.subarray(t * H, (t + 1) * H);
    const logits = Array.from({ length: E }, (_, e) => {
      let s = 0;
      for (let h = 0; h < H; h++) s += gate[e * H + h] * xt[h];
      return s;
    });
    const m = Math.max(...logits);
    const p = logits.map((l) => Math.exp(l - m));
    const sum = p.reduce((a, b) => a + b, 0);
    const order = p
      .map((v, e) => [v / sum, e])
      .sort((a, b) => b[0] - a[0] || a[1] - b[1])
      .slice(0, k);
    const norm = order.reduce((a, b) => a + b[0], 0);
    for (const [pe, e] of order) {
      for (let f = 0; f < F; f++) {
        let a = 0,
          b = 0;
        for (let h = 0; h < H; h++) {
          a += w1[e][f * H + h] * xt[h];
          b += w3[e][f * H + h] * xt[h];
        }
        g[f] = (a / (1 + Math.exp(-a))) * b;
      }
      for (let h = 0; h < H; h++) {
        let s = 0;
        for (let f = 0; f < F; f++) s += w2[e][h * F + f] * g[f];
        y[t * H + h] += (pe / norm) * s;
      }
    }
  }
  return y;
}
function relL2(a, b) {
  let num = 0,
    den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / den);
}

// ---- running and timing ------------------------------------------------------------------------------
async function ortSession(shape, gate) {
  return ort.InferenceSession.create(buildModel(shape, gate), {
    executionProviders: ['cpu'],
    intraOpNumThreads: THREADS,
    interOpNumThreads: 1,
    graphOptimizationLevel: 'all',
  });
}
const ortFeeds = ({ H, F, E }, T, x, fc1, fc2) => ({
  x: new ort.Tensor('float32', x, [T, H]),
  fc1: new ort.Tensor('float32', fc1, [E, 2 * F, H]),
  fc2: new ort.Tensor('float32', fc2, [E, H, F]),
});
// Warm-up once, then at least minReps timed runs, more while under budgetMs, at most maxReps.
async function timeIt(fn, { minReps, maxReps, budgetMs }) {
  await fn();
  const times = [];
  const start = Date.now();
  while (times.length < minReps || (times.length < maxReps && Date.now() - start < budgetMs)) {
    const t = process.hrtime.bigint();
    await fn();
    times.push(Number(process.hrtime.bigint() - t) / 1e6);
  }
  return times;
}
const newLayer = (shape, w, dtype) =>
  new MoeLayer(
    {
      hiddenSize: shape.H,
      intermediateSize: shape.F,
      numExperts: shape.E,
      topK: shape.k,
      routing: 'softmax-topk-renorm',
      weightDtype: dtype,
      device: 'cpu',
      threads: THREADS,
    },
    dtype === 'float32'
      ? { gate: w.gate, w1: w.w1, w3: w.w3, w2: w.w2 }
      : { gate: w.gate, w1: w.w1.map(toBf16), w3: w.w3.map(toBf16), w2: w.w2.map(toBf16) },
  );

function memAvailableBytes() {
  try {
    const m = /MemAvailable:\s+(\d+) kB/.exec(fs.readFileSync('/proc/meminfo', 'utf8'));
    if (m) return Number(m[1]) * 1024;
  } catch {
    /* not Linux */
  }
  return os.freemem();
}

async function correctness() {
  const shape = { H: 64, F: 96, E: 4, k: 2 },
    T = 5;
  const w = makeWeights(shape);
  const x = fill(T * shape.H, false, 1, 11);
  const want = reference(shape, T, x, w);
  const session = await ortSession(shape, w.gate);
  const fc1 = interleaveFc1(shape, w.w1, w.w3);
  const theirs = (await session.run(ortFeeds(shape, T, x, fc1, w.fc2))).y.data;
  await session.release();
  const layer = newLayer(shape, w, 'float32');
  const ours = layer.forwardSync(x);
  layer.dispose();
  return {
    shape: { ...shape, T },
    ortVsF64: relL2(theirs, want),
    oursVsF64: relL2(ours, want),
    oursVsOrt: relL2(ours, theirs),
  };
}

// One shape: ORT at every T, then (ORT released) our float32 layer at every T, then bf16 at T = 1.
async function runShape(name, shape, plan) {
  const { H, F, E, k } = shape;
  const t0 = Date.now();
  const w = makeWeights(shape);
  const xs = new Map(plan.map((p) => [p.T, fill(p.T * H, false, 1, 100 + p.T)]));
  const rows = [];
  const flops = (T) => 2 * T * k * 3 * H * F;
  const ortOut = new Map();
  {
    let fc1 = interleaveFc1(shape, w.w1, w.w3);
    let session = await ortSession(shape, w.gate);
    log(`${name}: weights ready in ${((Date.now() - t0) / 1e3).toFixed(1)} s; onnxruntime…`);
    for (const p of plan) {
      const feeds = ortFeeds(shape, p.T, xs.get(p.T), fc1, w.fc2);
      let y;
      const times = await timeIt(async () => {
        y = (await session.run(feeds)).y.data;
      }, p);
      ortOut.set(p.T, y);
      rows.push({ case: name, impl: 'onnxruntime', dtype: 'float32', T: p.T, ms: median(times), times });
    }
    await session.release();
    session = fc1 = null;
    gc();
  }
  const ours = async (dtype, plan2) => {
    const layer = newLayer(shape, w, dtype);
    gc();
    log(`${name}: fused-moe ${dtype} (${layer.kernels})…`);
    for (const p of plan2) {
      const x = xs.get(p.T),
        out = new Float32Array(p.T * H);
      const used = new Set(layer.route(x).experts).size;
      const times = await timeIt(() => layer.forwardSync(x, { out }), p);
      rows.push({
        case: name,
        impl: 'fused-moe',
        kernels: layer.kernels,
        dtype,
        T: p.T,
        ms: median(times),
        times,
        expertsUsed: used,
        vsOrtRelL2: relL2(out, ortOut.get(p.T)),
      });
    }
    layer.dispose();
    gc();
  };
  await ours('float32', plan);
  await ours(
    'bfloat16',
    plan.filter((p) => p.T === 1),
  );
  // Figures: each row's expert count is the routing of its T (the same for both).
  for (const r of rows) {
    const used = rows.find((o) => o.impl === 'fused-moe' && o.T === r.T).expertsUsed;
    const s = r.ms / 1e3,
      es = r.dtype === 'float32' ? 4 : 2;
    Object.assign(r, {
      H,
      F,
      E,
      k,
      expertsUsed: used,
      tokensPerS: r.T / s,
      gflops: flops(r.T) / s / 1e9,
      weightGBs: (used * 3 * H * F * es) / s / 1e9,
    });
  }
  return rows;
}

const log = (s) => process.stdout.write(s + '\n');

(async () => {
  const started = Date.now();
  log(
    `onnxruntime-node ${ort.env.versions.node} (CPU EP, float32, ${THREADS} intra-op threads) vs fused-moe (${backendInfo().cpu.isa}, ${THREADS} threads)`,
  );
  log(`${os.cpus()[0].model}, ${os.cpus().length} CPUs, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB`);
  if (!global.gc) log('(run with --expose-gc to free memory between the two implementations)');

  const check = await correctness();
  const ok = check.ortVsF64 < 1e-4 && check.oursVsF64 < 1e-4;
  log(
    `correctness, H ${check.shape.H} F ${check.shape.F} E ${check.shape.E} k ${check.shape.k} T ${check.shape.T}, relative L2 vs float64: ` +
      `onnxruntime ${check.ortVsF64.toExponential(2)}, fused-moe ${check.oursVsF64.toExponential(2)} (fused-moe vs onnxruntime ${check.oursVsOrt.toExponential(2)}) ${ok ? 'ok' : 'FAILED'}`,
  );
  if (!ok) process.exit(1);
  if (args.includes('--check')) return;

  const rows = [];
  const notes = [];
  const MID = { H: 1024, F: 3584, E: 8, k: 2 };
  const midPlan = quick
    ? [
        { T: 1, minReps: 5, maxReps: 20, budgetMs: 1000 },
        { T: 16, minReps: 3, maxReps: 10, budgetMs: 1000 },
      ]
    : [
        { T: 1, minReps: 9, maxReps: 50, budgetMs: 2000 },
        { T: 16, minReps: 7, maxReps: 30, budgetMs: 2000 },
        { T: 32, minReps: 7, maxReps: 20, budgetMs: 2000 },
        { T: 128, minReps: 5, maxReps: 15, budgetMs: 3000 },
        { T: 512, minReps: 3, maxReps: 7, budgetMs: 4000 },
      ];
  rows.push(...(await runShape('mid', MID, midPlan)));

  if (!skipMixtral) {
    let E = Number(opt('--experts') || 8);
    const H = 4096,
      F = 14336;
    // Peak: the float32 experts in JS twice over (per expert for fused-moe, fused FC1 for onnxruntime)
    // plus one packed copy; 10% and 1 GiB of margin.
    const need = (e) => e * 3 * H * F * 4 * 2.1 + 2 ** 30;
    const avail = memAvailableBytes();
    if (need(E) > avail && E > 4) {
      notes.push(
        `Mixtral shape run with E = 4 instead of ${E}: ${(avail / 2 ** 30).toFixed(1)} GiB available, ${(need(E) / 2 ** 30).toFixed(1)} needed`,
      );
      log(notes[notes.length - 1]);
      E = 4;
    }
    if (need(E) > avail) {
      notes.push(
        `Mixtral shape skipped: ${(avail / 2 ** 30).toFixed(1)} GiB available, ${(need(E) / 2 ** 30).toFixed(1)} needed`,
      );
      log(notes[notes.length - 1]);
    } else {
      rows.push(
        ...(await runShape(E === 8 ? 'mixtral' : `mixtral-E${E}`, { H, F, E, k: 2 }, [
          { T: 1, minReps: 7, maxReps: 20, budgetMs: 3000 },
          { T: 512, minReps: 3, maxReps: 3, budgetMs: 0 },
        ])),
      );
    }
  }

  // ---- report -------------------------------------------------------------------------------------
  const head = [
    'case',
    'T',
    'ORT ms',
    'ORT tok/s',
    'ORT GFLOP/s',
    'ORT GB/s',
    'impl',
    'ours ms',
    'ours tok/s',
    'ours GFLOP/s',
    'ours GB/s',
    'ORT/ours',
    'relL2 vs ORT',
  ];
  const table = [head];
  for (const r of rows.filter((o) => o.impl === 'fused-moe')) {
    const b = rows.find((o) => o.impl === 'onnxruntime' && o.case === r.case && o.T === r.T);
    const decode = r.T <= 16;
    table.push([
      `${r.case} H${r.H} F${r.F} E${r.E} k${r.k}`,
      r.T,
      fmt(b.ms),
      fmt(b.tokensPerS),
      fmt(b.gflops),
      decode ? fmt(b.weightGBs) : '',
      `fused-moe ${r.dtype === 'float32' ? 'f32' : 'bf16'}`,
      fmt(r.ms),
      fmt(r.tokensPerS),
      fmt(r.gflops),
      decode ? fmt(r.weightGBs) : '',
      fmt(b.ms / r.ms) + 'x',
      r.vsOrtRelL2.toExponential(1),
    ]);
    r.ortMs = b.ms;
    r.speedupVsOrt = b.ms / r.ms;
  }
  const widths = head.map((_, i) => Math.max(...table.map((row) => String(row[i]).length)));
  log('');
  for (const row of table)
    log(
      row.map((v, i) => (i === 0 || i === 6 ? String(v).padEnd(widths[i]) : String(v).padStart(widths[i]))).join('  '),
    );
  log(
    'GFLOP/s = 2*T*k*3*H*F / time; GB/s = weights of the experts used (float32 4 B, bf16 2 B) / time, shown for T <= 16;',
  );
  log('ORT/ours > 1: fused-moe is faster. relL2: fused-moe output vs onnxruntime output on the same input.');
  for (const n of notes) log(`note: ${n}`);

  const result = {
    date: new Date().toISOString(),
    machine: { cpu: os.cpus()[0].model, cpus: os.cpus().length, totalMemGiB: os.totalmem() / 2 ** 30 },
    onnxruntime: {
      version: ort.env.versions.node,
      executionProvider: 'cpu',
      intraOpThreads: THREADS,
      op: 'com.microsoft:MoE',
      dtype: 'float32',
    },
    fusedMoe: { isa: backendInfo().cpu.isa, threads: THREADS },
    correctness: check,
    rows,
    notes,
    seconds: (Date.now() - started) / 1e3,
  };
  const dir = path.join(__dirname, 'results');
  fs.mkdirSync(dir, { recursive: true });
  const file = path.join(dir, `${result.date.replace(/[:.]/g, '-')}-onnxruntime${quick ? '-quick' : ''}.json`);
  fs.writeFileSync(file, JSON.stringify(result, null, 1));
  log(`results: ${path.relative(root, file)} (${result.seconds.toFixed(0)} s)`);
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
