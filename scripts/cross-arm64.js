#!/usr/bin/env node
// The linux-arm64 build, cross-compiled on x86-64 with aarch64-linux-gnu-g++ (Debian's
// g++-aarch64-linux-gnu): the prebuilt addon, prebuilds/linux-arm64/fused-moe.glibc.node, and the C++
// core tests (build-arm64/test_*), which scripts/qemu-arm64.js runs under emulation.
//
// node-gyp cannot cross-compile without the target's full Node headers, which it would download; a
// Node-API addon needs only the Node-API headers (the node-api-headers package) and resolves its
// Node symbols when it is loaded, so this script compiles the sources itself. It takes the source lists
// (csrc/sources.gypi), the compiler flags and defines (binding.gyp) and the glibc 2.28 link
// (csrc/platform/glibc_floor.gypi) from the files the native build reads, so the two builds cannot drift.
// Objects are kept in build-arm64/ and remade when a source, a header it includes or the flags changed.
//
// Usage: node scripts/cross-arm64.js [--tests]   (the addon; with --tests, the C++ tests as well)
'use strict';

const childProcess = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');
const { which } = require('./install');

const root = path.join(__dirname, '..');
const outDir = path.join(root, 'build-arm64');
const addonFile = path.join(root, 'prebuilds', 'linux-arm64', 'fused-moe.glibc.node');
const TESTS = ['core', 'attention', 'decoder_ops'];
const CXX = process.env.FUSED_MOE_ARM64_CXX || 'aarch64-linux-gnu-g++';
const MISSING = `${CXX} not found (Debian: apt-get install g++-aarch64-linux-gnu)`;

/** A .gypi / .gyp file as JSON: they are JSON but for # comment lines. */
function readGyp(file) {
  const text = fs.readFileSync(path.join(root, file), 'utf8').replace(/^\s*#.*$/gm, '');
  return JSON.parse(text);
}

function settings() {
  const sources = readGyp('csrc/sources.gypi').variables;
  const floor = readGyp('csrc/platform/glibc_floor.gypi').variables;
  const gyp = readGyp('binding.gyp');
  const addon = gyp.targets.find((t) => t.target_name === 'fused_moe');
  const cflags = ['-std=c++17', '-fexceptions', '-fPIC', ...gyp.variables.fmoe_cflags];
  const list = (...names) => names.flatMap((n) => sources[n]);
  const portable = gyp.targets.find((t) => t.target_name === 'fmoe_kernels_portable');
  return {
    cflags,
    // Flags of one unit beyond cflags: the portable kernel sets' own (binding.gyp).
    unitFlags: Object.fromEntries(sources.fmoe_portable_sources.map((f) => [f, portable.cflags_cc])),
    defines: addon.defines.map((d) => `-D${d}`),
    includes: [
      `-I${path.join(root, 'csrc')}`,
      `-I${require('node-api-headers').include_dir}`,
      `-I${path.join(root, require('node-addon-api').include_dir)}`,
    ],
    // Every kernel set is compiled, as in binding.gyp: the x86 ones are empty stubs on arm64.
    core: list(
      'fmoe_core_sources',
      'fmoe_cpu_sources',
      'fmoe_cuda_host_sources',
      'fmoe_probe_sources',
      'fmoe_portable_sources',
      'fmoe_avx2_sources',
      'fmoe_avx512_sources',
      'fmoe_avx512bf16_sources',
      'fmoe_neon_sources',
    ),
    napi: [...sources.fmoe_napi_sources, ...floor.fmoe_glibc_floor_sources],
    ldflags: floor.fmoe_glibc_floor_ldflags,
  };
}

function compiler() {
  return which(CXX);
}

function mtime(file) {
  try {
    return fs.statSync(file).mtimeMs;
  } catch {
    return 0;
  }
}

/** True when the object is older than its source or any header its .d file names. */
function stale(obj, src) {
  const built = mtime(obj);
  if (!built || mtime(src) > built) return true;
  let deps;
  try {
    deps = fs.readFileSync(obj.replace(/\.o$/, '.d'), 'utf8');
  } catch {
    return true;
  }
  const files = deps.replace(/\\\n/g, ' ').split(/:\s/).slice(1).join(' ').split(/\s+/).filter(Boolean);
  return files.some((f) => mtime(path.resolve(root, f)) > built);
}

/** Empties build-arm64/obj when the compile command differs from the one its objects were made with. */
function dropStaleObjects(s) {
  const file = path.join(outDir, 'flags');
  const now = JSON.stringify([CXX, s.cflags, s.unitFlags, s.defines, s.includes]);
  let before = null;
  try {
    before = fs.readFileSync(file, 'utf8');
  } catch {
    // first build
  }
  if (before === now) return;
  fs.mkdirSync(outDir, { recursive: true });
  fs.rmSync(path.join(outDir, 'obj'), { recursive: true, force: true });
  fs.writeFileSync(file, now);
}

/** Compiles the sources that need it, at most `jobs` at a time; resolves to the object paths. */
async function compile(srcs, s, jobs) {
  dropStaleObjects(s);
  const objects = [];
  const queue = [];
  for (const src of srcs) {
    const obj = path.join(outDir, 'obj', src.replace(/\.cpp$/, '.o'));
    objects.push(obj);
    if (stale(obj, path.join(root, src))) queue.push([src, obj]);
  }
  let failed = null;
  const worker = async () => {
    while (queue.length && !failed) {
      const [src, obj] = queue.shift();
      fs.mkdirSync(path.dirname(obj), { recursive: true });
      const args = [...s.cflags, ...(s.unitFlags[src] || []), ...s.defines, ...s.includes];
      args.push('-MMD', '-MF', obj.replace(/\.o$/, '.d'));
      console.log(`  CXX(arm64) ${src}`);
      const code = await new Promise((resolve) => {
        const child = childProcess.spawn(CXX, [...args, '-c', src, '-o', obj], { cwd: root, stdio: 'inherit' });
        child.on('exit', (c, sig) => resolve(sig ? 1 : c));
        child.on('error', () => resolve(1));
      });
      if (code !== 0) failed = `${CXX} failed on ${src}`;
    }
  };
  await Promise.all(Array.from({ length: jobs }, worker));
  if (failed) throw new Error(failed);
  return objects;
}

function link(objects, out, extra) {
  fs.mkdirSync(path.dirname(out), { recursive: true });
  const r = childProcess.spawnSync(CXX, ['-pthread', '-o', out, ...objects, ...extra, '-ldl', '-lpthread'], {
    cwd: root,
    stdio: 'inherit',
  });
  if (r.status !== 0) throw new Error(`linking ${path.relative(root, out)} failed`);
}

function jobs() {
  const n = Number(process.env.JOBS) || (os.availableParallelism ? os.availableParallelism() : os.cpus().length);
  return Math.max(1, Math.min(n, 2));
}

/** Builds prebuilds/linux-arm64/fused-moe.glibc.node (stripped); returns its path. */
async function buildAddon() {
  if (!compiler()) throw new Error(MISSING);
  const s = settings();
  const objects = [...(await compile(s.core, s, jobs())), ...(await compile(s.napi, s, jobs()))];
  link(objects, addonFile, ['-shared', ...s.ldflags]);
  const strip = which(CXX.replace(/g\+\+$/, 'strip'));
  if (strip) childProcess.spawnSync(strip, ['--strip-unneeded', addonFile], { stdio: 'inherit' });
  console.log(`${path.relative(root, addonFile)}  ${fs.statSync(addonFile).size} bytes`);
  return addonFile;
}

/** Builds build-arm64/test_<name> for each C++ test program; returns their paths. */
async function buildTests() {
  if (!compiler()) throw new Error(MISSING);
  const s = settings();
  const core = await compile(s.core, s, jobs());
  const mains = await compile(
    TESTS.map((t) => `csrc/tests/test_${t}.cpp`),
    s,
    jobs(),
  );
  return TESTS.map((t, i) => {
    const out = path.join(outDir, `test_${t}`);
    if (mtime(out) < Math.max(...core.map(mtime), mtime(mains[i]))) link([mains[i], ...core], out, []);
    return out;
  });
}

module.exports = { compiler, buildAddon, buildTests, addonFile, MISSING };

if (require.main === module) {
  (async () => {
    await buildAddon();
    if (process.argv.includes('--tests')) for (const t of await buildTests()) console.log(path.relative(root, t));
  })().catch((e) => {
    console.error(`cross-arm64: ${e.message}`);
    process.exitCode = 1;
  });
}
