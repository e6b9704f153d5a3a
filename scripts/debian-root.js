#!/usr/bin/env node
// An older userland for the x64 prebuilt binary: a Debian 11 (bullseye, glibc 2.31) root made with
// `debootstrap --variant=minbase` from Debian's archive (DEBIAN_MIRROR overrides debootstrap's default)
// and entered with chroot. It is made once, into the cache folder of scripts/cache-dir.js (a few
// minutes, about 220 MB), and reused. This Node binary is copied in: Node.js 20 itself needs glibc 2.28.
// Needs root (debootstrap and chroot); unavailable() says why not otherwise.
//
// Usage: node scripts/debian-root.js [command ...]   (makes the root; runs the command in it, if given)
'use strict';

const childProcess = require('child_process');
const fs = require('fs');
const path = require('path');
const { which } = require('./install');
const { cacheDir } = require('./cache-dir');

const SUITE = 'bullseye';

function rootDir() {
  return path.join(cacheDir(), `debian11-${process.arch}`);
}

/** Why the root cannot be made or entered here, or null when it can. */
function unavailable() {
  if (process.platform !== 'linux' || process.arch !== 'x64') return 'not linux-x64';
  if (typeof process.getuid === 'function' && process.getuid() !== 0) return 'not running as root (chroot)';
  if (!which('chroot')) return 'chroot not found';
  if (!fs.existsSync(path.join(rootDir(), 'usr', 'bin', 'apt-get')) && !which('debootstrap'))
    return 'debootstrap not found (Debian: apt-get install debootstrap)';
  return null;
}

/** Makes the root unless it exists; returns its path. A failed run leaves no half-made root behind. */
function ensureRoot(log = console.log) {
  const dir = rootDir();
  if (fs.existsSync(path.join(dir, 'usr', 'bin', 'apt-get'))) return dir;
  const tmp = `${dir}.tmp`;
  fs.rmSync(tmp, { recursive: true, force: true });
  fs.mkdirSync(path.dirname(dir), { recursive: true });
  log(`making a Debian 11 root in ${dir} (debootstrap --variant=minbase ${SUITE}, once)`);
  const args = ['--variant=minbase', SUITE, tmp];
  if (process.env.DEBIAN_MIRROR) args.push(process.env.DEBIAN_MIRROR);
  const r = childProcess.spawnSync(which('debootstrap'), args, { encoding: 'utf8', maxBuffer: 64 << 20 });
  if (r.status !== 0) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw new Error(`debootstrap failed (exit ${r.status ?? r.signal}):\n${(r.stdout + r.stderr).slice(-2000)}`);
  }
  fs.renameSync(tmp, dir);
  return dir;
}

/** The glibc version of the root, from its libc.so.6 ("2.31"). */
function rootGlibc(dir = rootDir()) {
  const r = run(['/usr/bin/ldd', '--version'], { dir });
  const m = /(\d+\.\d+)\s*$/m.exec(r.stdout.split('\n')[0] || '');
  return m ? m[1] : null;
}

/**
 * Copies this node into the root (/usr/local/bin/node) and `app` to /opt/<basename>; returns the path of
 * the app inside the root.
 */
function install(app, dir = rootDir()) {
  const node = path.join(dir, 'usr', 'local', 'bin', 'node');
  fs.copyFileSync(process.execPath, node);
  fs.chmodSync(node, 0o755);
  const inside = path.join('/opt', path.basename(app));
  const dest = path.join(dir, inside);
  fs.rmSync(dest, { recursive: true, force: true });
  fs.cpSync(app, dest, { recursive: true, dereference: true });
  return inside;
}

/** Runs argv in the root with a clean environment plus `env`: { status, stdout, stderr }. */
function run(argv, { dir = rootDir(), cwd = '/', env = {}, timeout = 300000 } = {}) {
  const cmd = `cd ${JSON.stringify(cwd)} && exec "$@"`;
  const r = childProcess.spawnSync(which('chroot'), [dir, '/bin/sh', '-c', cmd, 'sh', ...argv], {
    encoding: 'utf8',
    maxBuffer: 64 << 20,
    timeout,
    env: { PATH: '/usr/local/bin:/usr/bin:/bin', HOME: '/root', LANG: 'C.UTF-8', ...env },
  });
  if (r.error) throw r.error;
  return r;
}

module.exports = { rootDir, unavailable, ensureRoot, rootGlibc, install, run };

if (require.main === module) {
  const why = unavailable();
  if (why) {
    console.log(`Debian 11 root: skipped, ${why}`);
  } else {
    const dir = ensureRoot();
    console.log(`${dir}: glibc ${rootGlibc(dir)}`);
    const argv = process.argv.slice(2);
    if (argv.length) {
      const r = run(argv, { dir });
      process.stdout.write(r.stdout);
      process.stderr.write(r.stderr);
      process.exitCode = r.status ?? 1;
    }
  }
}
