#!/usr/bin/env node
// `npm run build:prebuilds`: makes prebuilds/<platform>-<arch>/fused-moe.<libc>.node with prebuildify, the
// binary `npm install` uses without compiling. It is a Node-API build (one binary for every Node.js
// with Node-API 8), stripped, and tagged with its libc so a musl system never picks a glibc binary.
// On glibc it is linked for a glibc 2.28 floor (FUSED_MOE_GLIBC_FLOOR, see binding.gyp). On linux-x64
// it then cross-compiles prebuilds/linux-arm64 too (scripts/cross-arm64.js) where aarch64-linux-gnu-g++
// is installed, and says so where it is not.
//
// prebuildify runs `node-gyp rebuild`, which empties build/. The CUDA backend library, when
// `npm run build:cmake` has built it into build/Release, is kept aside first and then copied beside the
// prebuilt .node, where the addon's CUDA loader looks for it (the folder of the .node, found with
// dladdr). Afterwards build/Release holds the new addon (and the CUDA library) again, so a local
// checkout keeps working as before.
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const childProcess = require('child_process');
const prebuildify = require('prebuildify');
const { buildEnv, libcInfo } = require('./install');

const root = path.join(__dirname, '..');
const release = path.join(root, 'build', 'Release');
const tuple = `${os.platform()}-${os.arch()}`;
const outDir = path.join(root, 'prebuilds', tuple);
const sharedLib = /\.(so(\.\d+)*|dylib|dll)$/;

function main() {
  // Shared libraries from an earlier (cmake-js) build, kept aside from `node-gyp rebuild`.
  const stash = fs.mkdtempSync(path.join(os.tmpdir(), 'fused-moe-prebuild-'));
  const libs = readdir(release).filter((n) => sharedLib.test(n));
  for (const name of libs) fs.copyFileSync(path.join(release, name), path.join(stash, name));

  fs.rmSync(outDir, { recursive: true, force: true });
  // node-gyp reads npm_config_nodedir and JOBS from the environment prebuildify passes on.
  Object.assign(process.env, buildEnv(process.env));
  const libc = libcInfo().family;
  // csrc/platform/glibc_floor.cpp knows the first glibc symbol versions of these two architectures.
  if (libc === 'glibc' && ['x64', 'arm64'].includes(os.arch())) process.env.FUSED_MOE_GLIBC_FLOOR = '1';

  const opts = {
    cwd: root,
    napi: true,
    strip: true,
    tagLibc: true,
    // The running Node only names the headers to build against; the binary is Node-API, not tied to it.
    targets: [process.versions.node],
  };
  if (libc) opts.libc = libc;

  prebuildify(opts, (err) => {
    try {
      if (err) throw err;
      for (const name of libs) {
        const dest = path.join(outDir, name);
        fs.copyFileSync(path.join(stash, name), dest);
        strip(dest);
        fs.mkdirSync(release, { recursive: true });
        fs.copyFileSync(path.join(stash, name), path.join(release, name));
      }
      // prebuildify moved the addon out of build/Release; put a copy back for the local checkout.
      const addon = readdir(outDir).find((n) => n.endsWith('.node'));
      if (!addon) throw new Error(`prebuildify left no .node in ${outDir}`);
      fs.copyFileSync(path.join(outDir, addon), path.join(release, 'fused_moe.node'));
      for (const name of readdir(outDir)) {
        console.log(`prebuilds/${tuple}/${name}  ${fs.statSync(path.join(outDir, name)).size} bytes`);
      }
    } catch (e) {
      failed(e);
      return;
    } finally {
      fs.rmSync(stash, { recursive: true, force: true });
    }
    if (tuple === 'linux-x64' && libc === 'glibc') crossArm64().catch(failed);
  });
}

function failed(e) {
  console.error(`prebuild failed: ${e && e.message ? e.message : e}`);
  process.exitCode = 1;
}

async function crossArm64() {
  const cross = require('./cross-arm64');
  if (!cross.compiler()) {
    console.log(`prebuilds/linux-arm64: skipped, ${cross.MISSING}`);
    return;
  }
  await cross.buildAddon();
}

function strip(file) {
  if (os.platform() !== 'linux') return;
  // Like prebuildify's own --strip for the shared libraries it finds; a missing strip is not fatal.
  childProcess.spawnSync(process.env.PREBUILD_STRIP_BIN || 'strip', ['--strip-unneeded', file], { stdio: 'ignore' });
}

function readdir(dir) {
  try {
    return fs.readdirSync(dir);
  } catch {
    return [];
  }
}

main();
