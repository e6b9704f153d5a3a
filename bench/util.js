// Small helpers of the benchmarks.
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');

// n random values in [-scale, scale] (never zero), as float32 or as bf16 bits: a 64 Ki block from a
// seeded LCG, repeated (copyWithin) and made distinct per page, so gigabytes of weights take seconds.
function fill(n, bf16, scale, seed) {
  const a = bf16 ? new Uint16Array(n) : new Float32Array(n);
  const f = new Float32Array(1),
    u = new Uint32Array(f.buffer);
  let s = (seed * 2654435761) >>> 0;
  const block = Math.min(n, 1 << 16);
  for (let i = 0; i < block; i++) {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    const v = ((s / 4294967296) * 2 - 1) * scale || scale * 1e-3;
    if (bf16) {
      f[0] = v;
      a[i] = u[0] >>> 16;
    } else {
      a[i] = v;
    }
  }
  for (let done = block; done < n; done *= 2) a.copyWithin(done, 0, Math.min(done, n - done));
  // Make every 4 KiB page distinct: the low two bits of each element take two bits of a per-page hash.
  // Pages with equal contents can be merged by the host (same-page merging), and reading merged pages
  // hits the cache: bandwidth figures would be flattered.
  const bits = bf16 ? a : new Uint32Array(a.buffer, a.byteOffset, n);
  const perPage = 4096 / a.BYTES_PER_ELEMENT;
  for (let p0 = 0, page = 1; p0 < n; p0 += perPage, page++) {
    const h = Math.imul(page ^ seed, 2654435761) >>> 0;
    const end = Math.min(n, p0 + perPage);
    for (let i = p0; i < end; i++) bits[i] ^= (h >>> ((i & 15) << 1)) & 3;
  }
  return a;
}

function median(v) {
  const s = [...v].sort((a, b) => a - b);
  return s.length % 2 ? s[s.length >> 1] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

// 3 significant digits.
function fmt(v) {
  if (!Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : a >= 1 ? v.toFixed(2) : v.toPrecision(3);
}

const pct = (f) => (Number.isFinite(f) ? (100 * f).toFixed(0) + '%' : '-');

/** The q-quantile of v (nearest rank, from below); NaN for no values. */
function quantile(v, q) {
  if (v.length === 0) return NaN;
  const s = [...v].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))];
}

// Random weights of one MoE layer from fixed seeds (bench.js, ab-builds.js): per-expert w1, w3, w2 (bf16
// bits or float32), the float32 gate, and the shared expert's matrices when Fs > 0. Every expert gets
// its own values: identical experts could share cache lines or host pages and flatter the bandwidth.
function layerWeights({ H, F, E, Fs = 0 }, bf16) {
  const per = (n, scale, seed) => Array.from({ length: E }, (_, e) => fill(n, bf16, scale, seed + 7 * e));
  return {
    w1: per(F * H, 1 / Math.sqrt(H), 1),
    w3: per(F * H, 1 / Math.sqrt(H), 2),
    w2: per(H * F, 1 / Math.sqrt(F), 3),
    gate: fill(E * H, false, 2 / Math.sqrt(H), 4),
    shared:
      Fs > 0
        ? {
            w1: fill(Fs * H, bf16, 1 / Math.sqrt(H), 5),
            w3: fill(Fs * H, bf16, 1 / Math.sqrt(H), 6),
            w2: fill(H * Fs, bf16, 1 / Math.sqrt(Fs), 8),
          }
        : undefined,
  };
}

// Bandwidth-bound steps against a read probe taken just before each: the median over steps of
// bytes / time / probe (GB/s), or undefined without one probe per step.
function pairedBwFraction(bytes, ms, probes) {
  if (!probes || probes.length === 0 || probes.length !== ms.length) return undefined;
  return median(ms.map((t, i) => bytes / (t / 1e3) / 1e9 / probes[i]));
}

/** The native Isa enum's values (csrc/cpu/kernels.h), as binding.bench.fmaPeak takes them. */
const ISA_INDEX = { scalar: 0, avx2: 1, avx512: 2, avx512bf16: 3, neon: 4 };

/** Runs `fn` (which returns a promise) and the longest gap between two turns of the event loop meanwhile. */
async function longestGap(fn) {
  const now = () => performance.now();
  let last = now(),
    longest = 0,
    running = true;
  const turn = () => {
    const t = now();
    longest = Math.max(longest, t - last);
    last = t;
    if (running) setImmediate(turn);
  };
  setImmediate(turn);
  const t0 = now();
  const result = await fn();
  const wallMs = now() - t0;
  running = false;
  longest = Math.max(longest, now() - last);
  return { result, wallMs, longestMs: longest };
}

/** The folder of bench/model.js's `model` (mixtral, qwen3moe) in cacheDir, or undefined before that wrote it. */
function benchModelDir(cacheDir, model) {
  const folder = fs.existsSync(cacheDir) && fs.readdirSync(cacheDir).find((d) => d.startsWith(`${model}-`));
  return folder ? path.join(cacheDir, folder, 'hf') : undefined;
}

/** Takes `--cache-dir DIR` out of a script's arguments (spliced): where bench/model.js keeps its models. */
function takeCacheDir(args) {
  const at = args.indexOf('--cache-dir');
  return at >= 0 ? args.splice(at, 2)[1] : path.join(os.tmpdir(), 'fused-moe-bench-models');
}

/** benchModelDir(), or an exit with what to run first. */
function benchModelOrExit(cacheDir, model) {
  const dir = benchModelDir(cacheDir, model);
  if (dir) return dir;
  console.error(`no ${model} files in ${cacheDir}: run bench/model.js --models ${model} first`);
  process.exit(2);
}

// The bench's token at position `at` of sequence `seq`: distinct per sequence, inside every vocabulary.
const benchToken = (seq, at) => 100 + ((at + 37 * seq) % 5000);

/** Feeds each of `seqs` (MoeModel sequences) a prompt of `length` bench tokens, 256 a step. */
async function feedPrompt(model, seqs, length) {
  for (let done = 0; done < length; done += 256) {
    const n = Math.min(256, length - done);
    await model.step(
      seqs.map((s, j) => ({ sequence: s, tokens: Array.from({ length: n }, (_, i) => benchToken(j, done + i)) })),
    );
  }
}

module.exports = {
  fill,
  layerWeights,
  median,
  quantile,
  fmt,
  pct,
  pairedBwFraction,
  ISA_INDEX,
  longestGap,
  benchModelDir,
  takeCacheDir,
  benchModelOrExit,
  benchToken,
  feedPrompt,
};
