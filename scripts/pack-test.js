#!/usr/bin/env node
// `npm run test:pack`: what a user gets from the registry. Packs the package (with the prebuilt binary
// for this platform, made by `npm run build:prebuilds` unless a fresh one exists), installs the tarball
// into a new project with PREBUILDS_ONLY=1 and a PATH that has no compiler, then:
//   - checks the tarball holds what the install and the source fallback need, and no tests or benches;
//   - runs a forward pass through the installed package from CommonJS and from ESM, against a plain-JS
//     reference, with the kernels chosen here and with FUSED_MOE_ISA=scalar and =avx2;
//   - type-checks a TypeScript consumer (CommonJS and ESM) against the shipped declarations;
//   - runs `fused-moe doctor` from the install and checks it reports the prebuilt binary;
//   - checks the binary loads on a baseline x86-64 CPU: no AVX in the code that runs at load time
//     (objdump), and, where qemu-x86_64 is installed, a forward pass on an emulated CPU without AVX;
//   - checks each glibc prebuilt binary needs no glibc symbol version above 2.28 and no libstdc++
//     (objdump -T), and, as root with debootstrap, loads the x64 one in a Debian 11 root (glibc 2.31;
//     scripts/debian-root.js) and runs a forward pass there;
//   - on linux-x64 with the arm64 cross compiler and qemu-user: runs the cross-built C++ core tests
//     under qemu-aarch64 for each arm64 kernel set, and the installed arm64 prebuilt binary with an arm64
//     Node.js (scripts/qemu-arm64.js): the forward pass, doctor, and every expert type per kernel set;
//   - every kernel set of every platform checked here, every expert type (float32, bfloat16, float16,
//     int8, int4) against the float64 reference (scripts/kernel-sweep.js); a table of the largest errors.
// Options: --rebuild (always remake the prebuilt binaries), --keep (keep the temporary folder).
'use strict';

const childProcess = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { which, GLIBC_FLOOR } = require('./install');
const cross = require('./cross-arm64');
const qemuArm64 = require('./qemu-arm64');
const debianRoot = require('./debian-root');

const root = path.join(__dirname, '..');
const tuple = `${os.platform()}-${os.arch()}`;
const argv = process.argv.slice(2);
const started = Date.now();
const failures = [];

function log(msg) {
  console.log(`[${((Date.now() - started) / 1000).toFixed(1).padStart(5)}s] ${msg}`);
}

function fail(msg) {
  failures.push(msg);
  console.log(`  FAIL: ${msg}`);
}

function check(cond, msg) {
  if (!cond) fail(msg);
  return cond;
}

/** Runs a command; returns { status, stdout, stderr }; throws with the output when `must` and it fails. */
function run(cmd, args, opts = {}) {
  const r = childProcess.spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 << 20, ...opts });
  if (r.error) throw r.error;
  if (opts.must && r.status !== 0) {
    throw new Error(
      `${path.basename(cmd)} ${args.join(' ')} exited with ${r.status ?? r.signal}\n${r.stdout || ''}${r.stderr || ''}`,
    );
  }
  return r;
}

/** The npm CLI script of the npm running us (or of the Node install), run with this node. */
function npmCli() {
  const candidates = [
    process.env.npm_execpath,
    path.join(path.dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'bin', 'npm-cli.js'),
  ];
  const onPath = which('npm');
  if (onPath) candidates.push(path.join(path.dirname(fs.realpathSync(onPath)), 'npm-cli.js'));
  const found = candidates.find((c) => c && /npm-cli\.js$/.test(c) && fs.existsSync(c));
  if (!found) throw new Error('cannot find npm-cli.js of the npm that runs this');
  return found;
}

/** This environment without npm's per-run variables and compiler settings: a clean consumer. */
function cleanEnv(extra) {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (/^npm_(config|package|lifecycle|command|execpath|node_execpath)/i.test(k)) continue;
    if (
      ['CC', 'CXX', 'PYTHON', 'FUSED_MOE_ISA', 'FUSED_MOE_PREBUILD', 'FUSED_MOE_CUDA_LIBRARY', 'INIT_CWD'].includes(k)
    )
      continue;
    env[k] = v;
  }
  return Object.assign(env, extra);
}

function newestMtime(dir, skip) {
  let newest = 0;
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    if (skip(p)) continue;
    newest = Math.max(newest, entry.isDirectory() ? newestMtime(p, skip) : fs.statSync(p).mtimeMs);
  }
  return newest;
}

// ---- 1. the prebuilt binaries -------------------------------------------------------------------------
/** The platforms `npm run build:prebuilds` makes here: this one, and linux-arm64 where it cross-compiles. */
function builtTuples() {
  const tuples = [tuple];
  if (tuple === 'linux-x64' && cross.compiler()) tuples.push('linux-arm64');
  return tuples;
}

function prebuiltFile(t) {
  const dir = path.join(root, 'prebuilds', t);
  const node = (fs.existsSync(dir) ? fs.readdirSync(dir) : []).find((n) => n.endsWith('.node'));
  return node ? path.join(dir, node) : null;
}

/** -> { [tuple]: path of its .node } */
function ensurePrebuild(npm) {
  const sources = Math.max(
    // The addon's sources: all of csrc/ but the tests, the CUDA kernels and the CUDA self-test.
    newestMtime(path.join(root, 'csrc'), (p) => /[\\/](tests|tools)$/.test(p) || /\.cuh?$/.test(p)),
    fs.statSync(path.join(root, 'binding.gyp')).mtimeMs,
  );
  const fresh = (t) => {
    const file = prebuiltFile(t);
    return file && fs.statSync(file).mtimeMs >= sources;
  };
  const tuples = builtTuples();
  if (!argv.includes('--rebuild') && tuples.every(fresh)) {
    log(`using prebuilds/{${tuples.join(',')}} (newer than the sources; --rebuild remakes them)`);
  } else {
    log(`making prebuilds/{${tuples.join(',')}} (npm run build:prebuilds)`);
    run(process.execPath, [npm, 'run', 'build:prebuilds'], {
      cwd: root,
      stdio: 'inherit',
      must: true,
      encoding: undefined,
    });
  }
  if (!cross.compiler() && tuple === 'linux-x64') log(`  linux-arm64: not built, ${cross.MISSING}`);
  const files = {};
  for (const t of tuples) {
    files[t] = prebuiltFile(t);
    if (!files[t]) throw new Error(`npm run build:prebuilds left no prebuilds/${t}/*.node`);
  }
  return files;
}

// ---- 2. the tarball -----------------------------------------------------------------------------------
const REQUIRED = [
  'package.json',
  'README.md',
  'LICENSE',
  'binding.gyp',
  'CMakeLists.txt',
  'bin/fused-moe.js',
  'scripts/install.js',
  'dist/index.js',
  'dist/index.mjs',
  'dist/index.d.ts',
  'dist/doctor.js',
  'csrc/core/config.cpp',
  'csrc/napi/addon.cpp',
  'csrc/cpu/kernels_avx2.cpp',
];
const ALLOWED =
  /^(package\.json|README\.md|LICENSE|binding\.gyp|CMakeLists\.txt|bin\/|scripts\/install\.js$|dist\/|prebuilds\/|cmake\/|csrc\/)/;

function pack(npm, work) {
  log('npm run build:ts, npm pack');
  run(process.execPath, [npm, 'run', 'build:ts'], { cwd: root, must: true });
  const r = run(process.execPath, [npm, 'pack', '--json', '--ignore-scripts', '--pack-destination', work], {
    cwd: root,
    must: true,
  });
  const info = JSON.parse(r.stdout.slice(r.stdout.indexOf('[')))[0];
  const files = info.files.map((f) => f.path);
  for (const f of REQUIRED) check(files.includes(f), `the tarball lacks ${f}`);
  for (const t of builtTuples())
    check(
      files.some((f) => f.startsWith(`prebuilds/${t}/`) && f.endsWith('.node')),
      `the tarball lacks prebuilds/${t}/*.node`,
    );
  const stray = files.filter((f) => !ALLOWED.test(f) || /(^|\/)(test|tests|bench)\//.test(f));
  check(stray.length === 0, `the tarball holds files it should not: ${stray.join(', ')}`);
  log(
    `${info.filename}: ${files.length} files, ${(info.size / 1024).toFixed(0)} KiB packed, ${(info.unpackedSize / 1024).toFixed(0)} KiB unpacked`,
  );
  return path.join(work, info.filename);
}

// ---- 3. the consumer project --------------------------------------------------------------------------
const REFERENCE = `
// A forward pass through the installed package, checked against a plain-JS reference.
function lcg(seed) { let s = seed >>> 0; return () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2 ** 32 - 0.5); }
function makeCase() {
  const H = 32, F = 48, E = 4, k = 2, T = 6, r = lcg(7);
  const fill = (n, scale) => Float32Array.from({ length: n }, () => r() * scale);
  return { H, F, E, k, T, x: fill(T * H, 2), gate: fill(E * H, 1), w1: fill(E * F * H, 0.3), w3: fill(E * F * H, 0.3), w2: fill(E * H * F, 0.3) };
}
function reference(c) {
  const { H, F, E, k, T } = c, out = new Float64Array(T * H);
  for (let t = 0; t < T; t++) {
    const logits = [];
    for (let e = 0; e < E; e++) { let s = 0; for (let h = 0; h < H; h++) s += c.gate[e * H + h] * c.x[t * H + h]; logits.push(s); }
    const m = Math.max(...logits), p = logits.map((l) => Math.exp(l - m)), z = p.reduce((a, b) => a + b);
    const order = p.map((v, e) => [v / z, e]).sort((a, b) => b[0] - a[0] || a[1] - b[1]).slice(0, k);
    const sum = order.reduce((a, [v]) => a + v, 0);
    for (const [pv, e] of order) {
      const act = new Float64Array(F);
      for (let f = 0; f < F; f++) {
        let a = 0, b = 0;
        for (let h = 0; h < H; h++) { const xv = c.x[t * H + h]; a += c.w1[(e * F + f) * H + h] * xv; b += c.w3[(e * F + f) * H + h] * xv; }
        act[f] = (a / (1 + Math.exp(-a))) * b;
      }
      for (let h = 0; h < H; h++) { let y = 0; for (let f = 0; f < F; f++) y += c.w2[(e * H + h) * F + f] * act[f]; out[t * H + h] += (pv / sum) * y; }
    }
  }
  return out;
}
function maxError(got, want) { let m = 0; for (let i = 0; i < want.length; i++) m = Math.max(m, Math.abs(got[i] - want[i]) / (1 + Math.abs(want[i]))); return m; }
`;

const CJS = `'use strict';
const { MoeLayer, backendInfo } = require('fused-moe');
${REFERENCE}
(async () => {
  const c = makeCase();
  const layer = new MoeLayer({ hiddenSize: c.H, intermediateSize: c.F, numExperts: c.E, topK: c.k }, { gate: c.gate, w1: c.w1, w3: c.w3, w2: c.w2 });
  const want = reference(c);
  const errSync = maxError(layer.forwardSync(c.x), want);
  const errAsync = maxError(await layer.forward(c.x), want);
  const info = backendInfo();
  const kernels = layer.kernels;
  layer.dispose();
  console.log(JSON.stringify({ isa: info.cpu.isa, supported: info.cpu.supported, kernels, errSync, errAsync }));
})().catch((e) => { console.error(e); process.exit(1); });
`;

// A long text and a long conversation through the tokenizer's worker thread (lib/text/encode-worker.ts),
// which requires @huggingface/tokenizers and @huggingface/jinja by the paths they resolve to in the
// install: the same ids and text as on this thread, the worker running, and the conversation not
// rendered here (where the worker could not serve, both would quietly run on this thread).
const TOKENIZER = `'use strict';
const fs = require('fs');
const { TextTokenizer } = require('fused-moe');
(async () => {
  fs.mkdirSync('tok', { recursive: true });
  const direct = [];
  for (let b = 0x21; b <= 0x7e; b++) direct.push(b);
  for (let b = 0xa1; b <= 0xac; b++) direct.push(b);
  for (let b = 0xae; b <= 0xff; b++) direct.push(b);
  let extra = 0;
  const vocab = {};
  for (let b = 0; b < 256; b++) vocab[String.fromCodePoint(direct.includes(b) ? b : 256 + extra++)] = b;
  fs.writeFileSync('tok/tokenizer.json', JSON.stringify({
    version: '1.0', truncation: null, padding: null, added_tokens: [], normalizer: null,
    pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: null,
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: { type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: null, end_of_word_suffix: null,
      fuse_unk: false, byte_fallback: false, ignore_merges: false, vocab, merges: [] },
  }));
  fs.writeFileSync('tok/tokenizer_config.json', JSON.stringify({ bos_token: '<s>', eos_token: '</s>',
    chat_template: '{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}' }));
  const t = await TextTokenizer.load('tok');
  const text = 'déjà vu, 日本語 🙂 '.repeat(1500);
  const asyncIds = await t.encodeAsync(text);
  const same = JSON.stringify(asyncIds) === JSON.stringify(t.encode(text));
  const messages = Array.from({ length: 100 }, (_, i) => ({ role: i % 2 ? 'assistant' : 'user', content: 'turn ' + i }));
  const render = t.chatTemplate.render.bind(t.chatTemplate);
  let renderedHere = 0;
  t.chatTemplate.render = (...args) => (renderedHere++, render(...args));
  const asyncText = await t.renderChatAsync(messages, true, 'messages');
  const renderedOnWorker = renderedHere === 0;
  const sameText = asyncText === t.renderChat(messages, true, 'messages');
  const workerRunning = t.workerRunning;
  t.dispose();
  console.log(JSON.stringify({ chars: text.length, tokens: asyncIds.length, same, workerRunning,
    messages: messages.length, sameText, renderedOnWorker }));
})().catch((e) => { console.error(e); process.exit(1); });
`;

const ESM = `import { MoeLayer, backendInfo } from 'fused-moe';
import cjs from 'fused-moe';
${REFERENCE}
const c = makeCase();
const layer = new MoeLayer({ hiddenSize: c.H, intermediateSize: c.F, numExperts: c.E, topK: c.k }, { gate: c.gate, w1: c.w1, w3: c.w3, w2: c.w2 });
const err = maxError(await layer.forward(c.x), reference(c));
layer.dispose();
console.log(JSON.stringify({ isa: backendInfo().cpu.isa, err, sameClass: cjs.MoeLayer === MoeLayer }));
`;

const TS_CJS = `import { MoeLayer, MoeError, backendInfo, type MoeConfig, type BackendInfo } from 'fused-moe';
const config: MoeConfig = { hiddenSize: 8, intermediateSize: 16, numExperts: 4, topK: 2, routing: 'softmax-topk', device: 'auto' };
export async function run(gate: Float32Array, w: Float32Array, x: Float32Array): Promise<Float32Array> {
  const layer = new MoeLayer(config, { gate, w1: w, w3: w, w2: w });
  const y: Float32Array = await layer.forward(x, { signal: new AbortController().signal });
  const routed: { experts: Int32Array; weights: Float32Array } = layer.route(x);
  layer.dispose();
  return routed.experts.length ? y : layer.forwardSync(x);
}
export const info: BackendInfo = backendInfo();
export const isMoe = (e: unknown): boolean => e instanceof MoeError && e.code === 'ERR_MOE_NO_DEVICE';
// @ts-expect-error hiddenSize is a number: the declarations are real types, not any
export const bad: MoeConfig = { hiddenSize: '8', intermediateSize: 16, numExperts: 4, topK: 2 };
`;

const TS_ESM = `import { MoeLayer, backendInfo } from 'fused-moe';
const isa: string | null = backendInfo().cpu.isa;
export const ctor: typeof MoeLayer = MoeLayer;
export { isa };
`;

function writeConsumer(app) {
  fs.mkdirSync(app, { recursive: true });
  fs.writeFileSync(
    path.join(app, 'package.json'),
    JSON.stringify({ name: 'pack-consumer', version: '1.0.0', private: true }, null, 2),
  );
  fs.writeFileSync(path.join(app, 'cjs.js'), CJS);
  fs.writeFileSync(path.join(app, 'esm.mjs'), ESM);
  fs.writeFileSync(path.join(app, 'tokenizer.js'), TOKENIZER);
  fs.writeFileSync(path.join(app, 'consumer.ts'), TS_CJS);
  fs.writeFileSync(path.join(app, 'consumer.mts'), TS_ESM);
  fs.writeFileSync(
    path.join(app, 'tsconfig.json'),
    JSON.stringify(
      {
        compilerOptions: {
          target: 'ES2022',
          module: 'nodenext',
          moduleResolution: 'nodenext',
          strict: true,
          noEmit: true,
          typeRoots: [path.join(root, 'node_modules', '@types')],
          types: ['node'],
        },
        files: ['consumer.ts', 'consumer.mts'],
      },
      null,
      2,
    ),
  );
}

/** A folder with only `node` in it: the PATH of a machine with no compiler. */
function compilerFreePath(work) {
  const bin = path.join(work, 'bin');
  fs.mkdirSync(bin);
  fs.symlinkSync(process.execPath, path.join(bin, 'node'));
  // npm runs scripts with `sh -c`, found on PATH; a shell is not a build tool.
  const sh = which('sh');
  if (sh) fs.symlinkSync(sh, path.join(bin, 'sh'));
  for (const tool of ['g++', 'c++', 'cc', 'gcc', 'clang++', 'make', 'python3', 'python']) {
    if (which(tool, bin)) throw new Error(`${tool} is on the compiler-free PATH`);
  }
  return bin;
}

function install(npm, work, tarball) {
  const app = path.join(work, 'app');
  writeConsumer(app);
  const bin = compilerFreePath(work);
  log(`npm install ${path.basename(tarball)} with PREBUILDS_ONLY=1 and PATH=<node only> (no compiler)`);
  const env = cleanEnv({ PATH: bin, PREBUILDS_ONLY: '1' });
  const r = run(process.execPath, [npm, 'install', tarball, '--no-audit', '--no-fund', '--foreground-scripts'], {
    cwd: app,
    env,
  });
  if (!check(r.status === 0, `npm install failed (exit ${r.status})\n${r.stdout}${r.stderr}`)) return null;
  const pkgDir = path.join(app, 'node_modules', 'fused-moe');
  check(
    !fs.existsSync(path.join(pkgDir, 'build')),
    'the install compiled something (node_modules/fused-moe/build exists)',
  );
  check(fs.existsSync(path.join(app, 'node_modules', '.bin', 'fused-moe')), 'npm did not link the fused-moe bin');
  return { app, env, pkgDir, bin };
}

function runJson(cmd, args, opts, what) {
  const r = run(cmd, args, opts);
  if (
    !check(r.status === 0, `${what} exited with ${r.status ?? r.signal}: ${(r.stderr || r.stdout).trim().slice(-2000)}`)
  )
    return null;
  try {
    const out = r.stdout.trim();
    return JSON.parse(out.startsWith('{') ? out : out.split('\n').pop());
  } catch {
    fail(`${what} printed no JSON: ${r.stdout.slice(-500)}`);
    return null;
  }
}

function consumerChecks(c) {
  const tol = 1e-4;
  log('forward pass from CommonJS (require)');
  const auto = runJson(process.execPath, ['cjs.js'], { cwd: c.app, env: c.env }, 'cjs.js');
  if (auto) {
    check(
      auto.errSync < tol && auto.errAsync < tol,
      `CommonJS forward differs from the reference: ${JSON.stringify(auto)}`,
    );
    log(
      `  kernels ${auto.isa}: max error ${auto.errSync.toExponential(1)} (sync), ${auto.errAsync.toExponential(1)} (async)`,
    );
    for (const isa of ['scalar', 'avx2']) {
      if (!auto.supported.includes(isa)) {
        log(`  FUSED_MOE_ISA=${isa}: skipped, this CPU lacks it`);
        continue;
      }
      const forced = runJson(
        process.execPath,
        ['cjs.js'],
        { cwd: c.app, env: { ...c.env, FUSED_MOE_ISA: isa } },
        `cjs.js with FUSED_MOE_ISA=${isa}`,
      );
      if (forced) {
        check(forced.isa === isa, `FUSED_MOE_ISA=${isa} ran ${forced.isa}`);
        check(
          forced.errSync < tol && forced.errAsync < tol,
          `FUSED_MOE_ISA=${isa} forward differs: ${JSON.stringify(forced)}`,
        );
        log(`  FUSED_MOE_ISA=${isa}: max error ${Math.max(forced.errSync, forced.errAsync).toExponential(1)}`);
      }
    }
  }

  log('forward pass from ESM (import)');
  const esm = runJson(process.execPath, ['esm.mjs'], { cwd: c.app, env: c.env }, 'esm.mjs');
  if (esm) {
    check(esm.err < tol, `ESM forward differs from the reference: ${JSON.stringify(esm)}`);
    check(esm.sameClass, 'the ESM and CommonJS entry points export different MoeLayer classes');
  }

  log("a long text and a long conversation through the tokenizer's worker thread");
  const tok = runJson(process.execPath, ['tokenizer.js'], { cwd: c.app, env: c.env }, 'tokenizer.js');
  if (tok) {
    check(tok.same, `the worker's ids differ from the calling thread's: ${JSON.stringify(tok)}`);
    check(tok.workerRunning, `the tokenizer's worker thread did not run from the install: ${JSON.stringify(tok)}`);
    check(tok.sameText, `the worker's rendering differs from the calling thread's: ${JSON.stringify(tok)}`);
    check(tok.renderedOnWorker, `the conversation was not rendered on the worker thread: ${JSON.stringify(tok)}`);
    log(`  ${tok.chars} characters, ${tok.tokens} tokens: the same ids on the worker thread`);
    log(`  ${tok.messages} messages: the same text rendered on the worker thread`);
  }

  log('tsc --noEmit on a TypeScript consumer (CommonJS and ESM) against the shipped declarations');
  const tsc = path.join(root, 'node_modules', 'typescript', 'bin', 'tsc');
  const t = run(process.execPath, [tsc, '-p', 'tsconfig.json'], { cwd: c.app, env: c.env });
  check(t.status === 0, `tsc found errors:\n${t.stdout}${t.stderr}`);

  log('fused-moe doctor (text and --json) from the install');
  const doctorBin = path.join(c.pkgDir, 'bin', 'fused-moe.js');
  const text = run(process.execPath, [doctorBin, 'doctor'], { cwd: c.app, env: c.env });
  check(
    text.status === 0 && /addon\s+prebuilt: /.test(text.stdout),
    `doctor (text) did not report the prebuilt binary:\n${text.stdout}${text.stderr}`,
  );
  const report = runJson(
    process.execPath,
    [doctorBin, 'doctor', '--json'],
    { cwd: c.app, env: c.env },
    'doctor --json',
  );
  if (report) {
    check(report.addon.kind === 'prebuilt', `doctor: addon.kind is ${report.addon.kind}, expected prebuilt`);
    check(
      typeof report.addon.path === 'string' &&
        report.addon.path.startsWith(path.join(fs.realpathSync(c.pkgDir), 'prebuilds', tuple)),
      `doctor: addon.path ${report.addon.path} is not in the installed package's prebuilds/`,
    );
  }
}

/** The failures a user without a prebuilt binary meets: install.js and the loader must say what to do. */
function failureMessages(c, work) {
  log('errors without a fitting binary: install with PREBUILDS_ONLY=1, install with no compiler, require()');
  const empty = path.join(work, 'no-binaries');
  fs.mkdirSync(empty);
  const installJs = path.join(c.pkgDir, 'scripts', 'install.js');
  const env = { ...c.env, FUSED_MOE_PREBUILD: empty };

  const only = run(process.execPath, [installJs], { cwd: c.pkgDir, env });
  check(
    only.status === 1 &&
      /PREBUILDS_ONLY is set, so nothing is compiled/.test(only.stderr) &&
      /Possible solutions:/.test(only.stderr),
    `install.js with PREBUILDS_ONLY=1 and no binary: exit ${only.status}, said:\n${only.stderr}`,
  );

  const noTools = run(process.execPath, [installJs], { cwd: c.pkgDir, env: { ...env, PREBUILDS_ONLY: '' } });
  check(
    noTools.status === 1 &&
      /cannot build the native addon from source: .*g\+\+/.test(noTools.stderr) &&
      /missing: a C\+\+17 compiler/.test(noTools.stderr) &&
      /npm rebuild fused-moe/.test(noTools.stderr),
    `install.js with no compiler: exit ${noTools.status}, said:\n${noTools.stderr}`,
  );
  check(!fs.existsSync(path.join(c.pkgDir, 'build')), 'install.js with no compiler left a build/ folder');

  const script =
    "try { require('fused-moe').backendInfo(); console.log('{}'); } catch (e) { console.log(JSON.stringify({ code: e.code, message: e.message })); }";
  const loaded = runJson(process.execPath, ['-e', script], { cwd: c.app, env }, 'require() with no binary');
  if (loaded) {
    check(
      loaded.code === 'ERR_MOE_LOAD' &&
        /looked in:/.test(loaded.message) &&
        /Possible solutions:/.test(loaded.message) &&
        loaded.message.includes(path.join(empty, 'prebuilds')),
      `require() with no binary threw: ${JSON.stringify(loaded)}`,
    );
  }
}

/** With no fitting prebuilt binary and the build tools present, the installed package builds from source. */
function sourceBuild(npm, c, work) {
  log('source fallback: the installed package with its prebuilds removed, compiler on the PATH');
  const prebuilds = path.join(c.pkgDir, 'prebuilds');
  const hidden = path.join(work, 'prebuilds-hidden');
  fs.renameSync(prebuilds, hidden);
  try {
    sourceBuildWithoutPrebuilds(npm, c);
  } finally {
    fs.rmSync(path.join(c.pkgDir, 'build'), { recursive: true, force: true });
    fs.renameSync(hidden, prebuilds);
  }
}

function sourceBuildWithoutPrebuilds(npm, c) {
  const env = { ...cleanEnv({ PATH: process.env.PATH }), PREBUILDS_ONLY: '' };
  // Through npm, as a user's `npm rebuild` would: npm puts its own node-gyp on the PATH.
  const r = run(process.execPath, [npm, 'rebuild', 'fused-moe', '--foreground-scripts'], {
    cwd: c.app,
    env,
    timeout: 600000,
  });
  if (
    !check(
      r.status === 0,
      `the source build failed (exit ${r.status ?? r.signal}): ${(r.stderr || '').trim().slice(-1500)}`,
    )
  )
    return;
  check(
    fs.existsSync(path.join(c.pkgDir, 'build', 'Release', 'fused_moe.node')),
    'the source build left no build/Release/fused_moe.node',
  );
  const res = runJson(process.execPath, ['cjs.js'], { cwd: c.app, env }, 'cjs.js on the source build');
  if (res) {
    check(
      res.errSync < 1e-4 && res.errAsync < 1e-4,
      `forward on the source build differs from the reference: ${JSON.stringify(res)}`,
    );
    log(`  built from source, kernels ${res.isa}: max error ${res.errSync.toExponential(1)}`);
  }
}

// ---- 4. portability -----------------------------------------------------------------------------------
const BEYOND_BASELINE =
  /^(v\w+|pshufb|palignr|phadd\w*|pmaddubsw|pmulhrsw|psign\w|pabs\w|ptest|pblend\w*|blendv?p[sd]|round[ps][sd]|pmulld|pmin[su][bdw]|pmax[su][bdw]|insertps|extractps|pextr[bdq]|pinsr[bdq]|pmov[sz]x\w*|packusdw|pcmpeqq|pcmpgtq|dpp[sd]|mpsadbw|phminposuw|crc32\w?|popcnt|lzcnt|tzcnt|movbe|andn|bextr|blsi|blsr|blsmsk|bzhi|shlx|shrx|sarx|rorx|pdep|pext|mulx|adcx|adox|kmov\w|kor\w|kand\w)$/;

/** Instructions beyond baseline x86-64 (SSE2) in the functions the loader runs: the .init_array entries. */
function loadTimeExtensions(file) {
  const objdump = which('objdump');
  if (!objdump) return null;
  const dump = run(objdump, ['-s', '-j', '.init_array', file]);
  if (dump.status !== 0) return [];
  const bytes = [];
  for (const line of dump.stdout.split('\n')) {
    const m = /^\s*[0-9a-f]+\s+((?:[0-9a-f]{2,8}\s?){1,4})/.exec(line);
    if (m)
      for (const word of m[1].trim().split(/\s+/))
        for (let i = 0; i < word.length; i += 2) bytes.push(parseInt(word.slice(i, i + 2), 16));
  }
  const found = [];
  for (let i = 0; i + 8 <= bytes.length; i += 8) {
    const hits = [];
    let addr = 0n;
    for (let b = 7; b >= 0; b--) addr = (addr << 8n) | BigInt(bytes[i + b]);
    if (addr === 0n) continue;
    const start = '0x' + addr.toString(16);
    const stop = '0x' + (addr + 4096n).toString(16);
    const d = run(objdump, ['-d', '--no-show-raw-insn', `--start-address=${start}`, `--stop-address=${stop}`, file]);
    for (const line of d.stdout.split('\n')) {
      const m = /^\s*[0-9a-f]+:\s+(\S+)\s*(.*)$/.exec(line);
      if (!m) continue;
      const [, op, operands] = m;
      if (BEYOND_BASELINE.test(op) || /%[yz]mm|%k[0-7]/.test(operands))
        hits.push(`${op} ${operands.replace(/\s+#.*$/, '')}`.trim());
      if (/^(ret|jmp)/.test(op)) break; // the end of this initializer (or its tail call)
    }
    if (hits.length)
      found.push(`initializer at ${start}: ${hits.length} such instructions, e.g. ${hits.slice(0, 3).join('; ')}`);
  }
  return found;
}

function symbolVersions(file, tool = 'objdump') {
  const objdump = which(tool) || which('objdump');
  if (!objdump) return null;
  const r = run(objdump, ['-T', file]);
  const newest = (prefix) => {
    const vs = [
      ...new Set((r.stdout.match(new RegExp(`${prefix}_[0-9.]+`, 'g')) || []).map((v) => v.slice(prefix.length + 1))),
    ];
    vs.sort((a, b) => {
      const x = a.split('.').map(Number),
        y = b.split('.').map(Number);
      for (let i = 0; i < Math.max(x.length, y.length); i++)
        if ((x[i] || 0) !== (y[i] || 0)) return (x[i] || 0) - (y[i] || 0);
      return 0;
    });
    return vs.pop() || null;
  };
  return { glibc: newest('GLIBC'), glibcxx: newest('GLIBCXX') };
}

function portability(addon, c) {
  if (os.arch() !== 'x64') {
    log('portability checks: skipped (not x86-64)');
    return;
  }
  log('code run at load time uses only baseline x86-64 instructions (objdump of .init_array)');
  const ext = loadTimeExtensions(addon);
  if (ext === null) log('  skipped: objdump not found');
  else
    check(
      ext.length === 0,
      `the addon's load-time initializers use instructions beyond baseline x86-64, so loading it crashes (SIGILL) on CPUs without them (static initializers of the SIMD kernel files, compiled with their -m flags):\n    ${ext.join('\n    ')}`,
    );

  const qemu = which('qemu-x86_64');
  if (qemu && c) {
    log('forward pass on an emulated baseline x86-64 CPU (qemu-x86_64 -cpu qemu64: SSE2, no AVX)');
    const r = run(qemu, ['-cpu', 'qemu64', process.execPath, 'cjs.js'], { cwd: c.app, env: c.env, timeout: 90000 });
    if (
      check(
        r.status === 0,
        `on a baseline x86-64 CPU the addon fails (exit ${r.status ?? r.signal}): ${(r.stderr || '').trim().slice(-400)}`,
      )
    ) {
      const res = JSON.parse(r.stdout.trim().split('\n').pop());
      check(res.isa === 'scalar' && res.errSync < 1e-4, `on a baseline CPU: ${JSON.stringify(res)}`);
      log(`  ran ${res.isa} kernels, max error ${res.errSync.toExponential(1)}`);
    }
  } else {
    log(`  emulated baseline CPU run: skipped (${qemu ? 'the install failed' : 'qemu-x86_64 not installed'})`);
  }
}

// ---- 5. the glibc floor and the other platforms ---------------------------------------------------------
function versionAbove(a, b) {
  const x = a.split('.').map(Number),
    y = b.split('.').map(Number);
  for (let i = 0; i < Math.max(x.length, y.length); i++)
    if ((x[i] || 0) !== (y[i] || 0)) return (x[i] || 0) > (y[i] || 0);
  return false;
}

/** Each glibc prebuilt binary: no glibc symbol version above the floor, no libstdc++ at all. */
function glibcFloor(addons) {
  for (const [t, file] of Object.entries(addons)) {
    if (!/glibc/.test(path.basename(file))) continue;
    const v = symbolVersions(file, t === 'linux-arm64' ? 'aarch64-linux-gnu-objdump' : 'objdump');
    if (!v) {
      log(`glibc floor of prebuilds/${t}: skipped, objdump not found`);
      continue;
    }
    log(`prebuilds/${t} needs glibc >= ${v.glibc}` + (v.glibcxx ? ` and GLIBCXX_${v.glibcxx}` : ', no libstdc++'));
    check(
      v.glibc && !versionAbove(v.glibc, GLIBC_FLOOR),
      `prebuilds/${t} needs GLIBC_${v.glibc}, above the ${GLIBC_FLOOR} floor (csrc/platform/glibc_floor.cpp)`,
    );
    check(!v.glibcxx, `prebuilds/${t} needs the system libstdc++ (GLIBCXX_${v.glibcxx}): link it statically`);
  }
}

/** The largest error per platform, kernel set and expert type, printed at the end. */
const sweepTable = [];

/**
 * scripts/kernel-sweep.js once per kernel set through `runNode(args, env)`; a set the CPU lacks is
 * skipped. Records the errors; returns the sets that ran.
 */
function kernelSweep(platform, c, sets, runNode) {
  fs.copyFileSync(path.join(__dirname, 'kernel-sweep.js'), path.join(c.app, 'kernel-sweep.js'));
  const ran = [];
  for (const isa of sets) {
    const r = runNode(['kernel-sweep.js', path.join(root, 'test', 'helpers')], { ...c.env, FUSED_MOE_ISA: isa });
    if (r.status !== 0 && /cannot run here/.test(r.stderr)) {
      log(`  ${isa}: skipped, this CPU lacks it`);
      continue;
    }
    if (
      !check(
        r.status === 0,
        `kernel sweep with ${isa} on ${platform} exited with ${r.status ?? r.signal}: ${(r.stderr || '').slice(-1500)}`,
      )
    )
      continue;
    const res = JSON.parse(r.stdout.trim().split('\n').pop());
    check(res.isa === isa, `kernel sweep with FUSED_MOE_ISA=${isa} on ${platform} ran ${res.isa}`);
    for (const e of res.results) {
      sweepTable.push({ platform, isa, ...e });
      check(e.ok, `${platform} ${isa} ${e.expert} experts: relative L2 error ${e.err} over the bound ${e.tol}`);
    }
    log(`  ${isa}: ${res.results.map((e) => `${e.expert} ${e.err.toExponential(1)}`).join(', ')}`);
    ran.push(isa);
  }
  return ran;
}

function nativeSweep(c) {
  log(`every expert type per kernel set, ${tuple} (kernel-sweep.js against the float64 reference)`);
  const sets = os.arch() === 'x64' ? ['scalar', 'avx2', 'avx512', 'avx512bf16'] : ['scalar', 'neon'];
  kernelSweep(tuple, c, sets, (args, env) => run(process.execPath, args, { cwd: c.app, env }));
}

function checkForward(res, what, isa) {
  if (
    !check(
      res.errSync < 1e-4 && res.errAsync < 1e-4,
      `${what}: forward differs from the reference: ${JSON.stringify(res)}`,
    )
  )
    return;
  if (isa) check(res.isa === isa, `${what}: ran ${res.isa}, expected ${isa}`);
  log(`  ${what}: kernels ${res.isa}, max error ${Math.max(res.errSync, res.errAsync).toExponential(1)}`);
}

/** The arm64 prebuilt binary under emulation: C++ tests, the installed package with an arm64 Node. */
async function arm64(npm, c, addons) {
  if (!addons['linux-arm64']) return;
  const why = qemuArm64.unavailable();
  if (why) {
    log(`linux-arm64 under emulation: skipped, ${why}`);
    return;
  }
  log('linux-arm64: the cross-built C++ core tests under qemu-aarch64, per kernel set');
  for (const r of await qemuArm64.cppTests()) {
    if (r.skipped) log(`  ${r.test} ${r.isa}: skipped, the emulated CPU lacks it`);
    else if (check(r.ok, `${r.test} with FUSED_MOE_ISA=${r.isa} under qemu-aarch64 failed:\n${r.output.slice(-2000)}`))
      log(`  ${r.test} ${r.isa}: ${r.output.split('\n').pop()}`);
  }

  const node = qemuArm64.arm64Node(npm);
  const runNode = (args, env) => qemuArm64.runArm64(node, args, { cwd: c.app, env });
  log(`linux-arm64: the installed package with an arm64 Node.js ${process.versions.node} under qemu-aarch64`);
  const auto = runNode(['cjs.js'], c.env);
  if (check(auto.status === 0, `arm64 cjs.js exited with ${auto.status ?? auto.signal}: ${auto.stderr.slice(-1500)}`))
    checkForward(JSON.parse(auto.stdout.trim().split('\n').pop()), 'arm64 forward', 'neon');
  const scalar = runNode(['cjs.js'], { ...c.env, FUSED_MOE_ISA: 'scalar' });
  if (check(scalar.status === 0, `arm64 cjs.js (scalar) exited with ${scalar.status}: ${scalar.stderr.slice(-1500)}`))
    checkForward(JSON.parse(scalar.stdout.trim().split('\n').pop()), 'arm64 forward, FUSED_MOE_ISA=scalar', 'scalar');
  const doctor = runNode([path.join(c.pkgDir, 'bin', 'fused-moe.js'), 'doctor', '--json'], c.env);
  if (check(doctor.status === 0, `arm64 doctor exited with ${doctor.status}: ${doctor.stdout.slice(-1500)}`)) {
    const rep = JSON.parse(doctor.stdout);
    check(
      rep.addon.kind === 'prebuilt' && /prebuilds[\\/]linux-arm64[\\/]/.test(rep.addon.path),
      `arm64 doctor: addon ${rep.addon.kind} ${rep.addon.path}, expected prebuilds/linux-arm64`,
    );
    check(
      rep.platform && rep.platform.prebuilt,
      `arm64 doctor does not report the prebuilt platform: ${JSON.stringify(rep.platform)}`,
    );
    log(
      `  doctor: ${rep.addon.kind} ${path.relative(c.pkgDir, rep.addon.path)}, kernel sets ${rep.cpu.supported.join(', ')}`,
    );
  }
  log('linux-arm64: every expert type per kernel set under emulation');
  kernelSweep('linux-arm64', c, qemuArm64.ARM64_SETS, runNode);
}

/** The x64 prebuilt binary on Debian 11's glibc 2.31, entered with chroot. */
function debian11(c) {
  if (tuple !== 'linux-x64') return;
  const why = debianRoot.unavailable();
  if (why) {
    log(`Debian 11 root: skipped, ${why}`);
    return;
  }
  const dir = debianRoot.ensureRoot(log);
  const glibc = debianRoot.rootGlibc(dir);
  log(`Debian 11 root (glibc ${glibc}): the installed package, its install script and a forward pass`);
  const app = debianRoot.install(c.app, dir);
  const inRoot = (argv, env = {}) => debianRoot.run(argv, { dir, cwd: app, env: { PREBUILDS_ONLY: '1', ...env } });
  const inst = inRoot(['node', 'node_modules/fused-moe/scripts/install.js']);
  check(inst.status === 0, `install.js in the Debian 11 root exited with ${inst.status}: ${inst.stderr.slice(-1500)}`);
  for (const isa of [null, 'scalar']) {
    const r = inRoot(['node', 'cjs.js'], isa ? { FUSED_MOE_ISA: isa } : {});
    if (
      check(
        r.status === 0,
        `cjs.js in the Debian 11 root exited with ${r.status ?? r.signal}: ${r.stderr.slice(-1500)}`,
      )
    )
      checkForward(
        JSON.parse(r.stdout.trim().split('\n').pop()),
        `Debian 11${isa ? ', FUSED_MOE_ISA=' + isa : ''}`,
        isa,
      );
  }
  const doctor = inRoot(['node', 'node_modules/fused-moe/bin/fused-moe.js', 'doctor', '--json']);
  if (
    check(
      doctor.status === 0,
      `doctor in the Debian 11 root exited with ${doctor.status}: ${doctor.stdout.slice(-1500)}`,
    )
  ) {
    const rep = JSON.parse(doctor.stdout);
    check(
      rep.addon.kind === 'prebuilt' && rep.runtime.libc.version === glibc,
      `doctor in the Debian 11 root: addon ${rep.addon.kind}, glibc ${rep.runtime.libc.version}`,
    );
  }
}

function printSweepTable() {
  if (!sweepTable.length) return;
  console.log('\nlargest relative L2 error against the float64 reference (kernel-sweep.js, 2 sizes each):');
  const experts = [...new Set(sweepTable.map((r) => r.expert))];
  console.log(['platform'.padEnd(12), 'kernels'.padEnd(11), ...experts.map((e) => e.padStart(9))].join(' '));
  const rows = [...new Set(sweepTable.map((r) => `${r.platform} ${r.isa}`))];
  for (const row of rows) {
    const [platform, isa] = row.split(' ');
    const cells = experts.map((e) => {
      const hit = sweepTable.find((r) => r.platform === platform && r.isa === isa && r.expert === e);
      return (hit ? hit.err.toExponential(1) : '-').padStart(9);
    });
    console.log([platform.padEnd(12), isa.padEnd(11), ...cells].join(' '));
  }
}

// ---- main ---------------------------------------------------------------------------------------------
async function main() {
  const npm = npmCli();
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'fused-moe-pack-'));
  let consumer = null;
  try {
    const addons = ensurePrebuild(npm);
    const tarball = pack(npm, work);
    consumer = install(npm, work, tarball);
    if (consumer) {
      consumerChecks(consumer);
      failureMessages(consumer, work);
      sourceBuild(npm, consumer, work);
    }
    portability(addons[tuple], consumer);
    glibcFloor(addons);
    if (consumer) {
      nativeSweep(consumer);
      debian11(consumer);
      await arm64(npm, consumer, addons);
    }
  } catch (e) {
    fail(e && e.stack ? e.stack : String(e));
  } finally {
    if (argv.includes('--keep')) log(`kept ${work}`);
    else fs.rmSync(work, { recursive: true, force: true });
  }
  printSweepTable();
  const secs = ((Date.now() - started) / 1000).toFixed(1);
  if (failures.length) {
    console.log(`\npack test FAILED in ${secs}s: ${failures.length} problem(s)`);
    process.exitCode = 1;
  } else {
    console.log(`\npack test passed in ${secs}s`);
  }
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
