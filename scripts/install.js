#!/usr/bin/env node
// `npm install` runs this. It keeps node-gyp-build's rules: a binary that loads here is used as it is
// (the local build in build/, else prebuilds/<platform>-<arch>/), PREBUILDS_ONLY=1 never compiles, and
// --build-from-source always does. It adds what node-gyp-build lacks: before compiling it checks that
// python3, make and a C++ compiler are on PATH, and when a step fails it says what is missing and which
// commands fix it. Nothing is downloaded: node-gyp is pointed at the headers that ship with Node.
//
// Plain CommonJS with no dependencies beyond node-gyp-build: in a fresh clone it runs before dist/ exists.
'use strict';

const childProcess = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');

const root = path.join(__dirname, '..');
const NAPI_VERSION = 8; // binding.gyp's NAPI_VERSION; package.json binary.napi_versions
// The oldest glibc the prebuilt binaries load on (csrc/platform/glibc_floor.cpp; test:pack checks it).
const GLIBC_FLOOR = '2.28';

/** The full path of an executable named `name` on `envPath`, or null. */
function which(name, envPath = process.env.PATH || '') {
  if (path.isAbsolute(name)) return isExecutable(name) ? name : null;
  const exts = process.platform === 'win32' ? (process.env.PATHEXT || '.EXE;.CMD;.BAT').split(';') : [''];
  for (const dir of envPath.split(path.delimiter)) {
    if (!dir) continue;
    for (const ext of exts) {
      const candidate = path.join(dir, name + ext);
      if (isExecutable(candidate)) return candidate;
    }
  }
  return null;
}

function isExecutable(file) {
  try {
    fs.accessSync(file, fs.constants.X_OK);
    return fs.statSync(file).isFile();
  } catch {
    return false;
  }
}

/** { family: 'glibc' | 'musl' | null, version: string | null } of the running process (Linux only). */
function libcInfo() {
  if (process.platform !== 'linux') return { family: null, version: null };
  try {
    const report = process.report.getReport();
    const header = report.header || {};
    if (header.glibcVersionRuntime) return { family: 'glibc', version: header.glibcVersionRuntime };
    const objects = report.sharedObjects || [];
    if (objects.some((o) => /ld-musl|libc\.musl/.test(o))) return { family: 'musl', version: null };
  } catch {
    // fall through to the file-system check
  }
  if (fs.existsSync('/etc/alpine-release')) return { family: 'musl', version: null };
  return { family: null, version: null };
}

/** One line that identifies this runtime: what a prebuilt binary has to match. */
function runtimeLine() {
  const libc = libcInfo();
  const libcText = libc.family ? `, ${libc.family}${libc.version ? ' ' + libc.version : ''}` : '';
  return (
    `${process.platform}-${process.arch}${libcText}, Node.js ${process.versions.node}, ` +
    `Node-API ${process.versions.napi} (the addon needs ${NAPI_VERSION})`
  );
}

/** The prebuilt binaries this package ships, as "linux-x64/fused-moe.glibc.node" paths. */
function listPrebuilds(dir = root) {
  const base = path.join(dir, 'prebuilds');
  const found = [];
  for (const tuple of readdir(base)) {
    for (const file of readdir(path.join(base, tuple))) if (file.endsWith('.node')) found.push(`${tuple}/${file}`);
  }
  return found;
}

function readdir(dir) {
  try {
    return fs.readdirSync(dir).sort();
  } catch {
    return [];
  }
}

/**
 * Loads the addon the way the package will at run time, in a child process so that a binary that
 * crashes while loading cannot take the install down. -> { ok, path, error }
 */
function tryLoad(env = process.env) {
  const loader = require.resolve('node-gyp-build', { paths: [root] });
  const script =
    `const load = require(${JSON.stringify(loader)}); const dir = ${JSON.stringify(root)};` +
    'const file = load.resolve(dir); load(dir); process.stdout.write(file);';
  const r = childProcess.spawnSync(process.execPath, ['-e', script], { cwd: root, env, encoding: 'utf8' });
  if (r.status === 0) return { ok: true, path: r.stdout.trim(), error: null };
  const stderr = (r.stderr || '').trim();
  // The thrown message is the first line of Node's report that starts with "Error:".
  const line = stderr.split('\n').find((l) => /^\w*Error\b/.test(l.trim()));
  const error = line ? line.trim() : stderr.split('\n').slice(-3).join(' ') || `exit code ${r.status}`;
  return { ok: false, path: null, error: r.signal ? `the loader was killed by ${r.signal}` : error };
}

/** The build tools node-gyp needs that are not found: [{ tool, hint }]. */
function missingTools(env = process.env) {
  if (process.platform === 'win32') return []; // node-gyp finds Visual Studio itself and says so
  const missing = [];
  const python = env.npm_config_python || env.PYTHON || which('python3', env.PATH) || which('python', env.PATH);
  if (!python || (path.isAbsolute(python) && !isExecutable(python))) {
    missing.push({ tool: 'python3', hint: 'Python 3, which node-gyp runs (python3 on PATH, or set PYTHON)' });
  }
  if (!which('make', env.PATH) && !which('gmake', env.PATH)) {
    missing.push({ tool: 'make', hint: 'make (GNU make)' });
  }
  const cxx = env.CXX ? env.CXX.trim().split(/\s+/)[0] : null;
  const compiler = cxx
    ? which(cxx, env.PATH)
    : which('c++', env.PATH) || which('g++', env.PATH) || which('clang++', env.PATH);
  if (!compiler) {
    missing.push({
      tool: cxx || 'g++',
      hint: cxx
        ? `the C++ compiler CXX names (${cxx})`
        : 'a C++17 compiler (g++ 7+ or clang++ 5+; c++, g++ or clang++ on PATH, or set CXX)',
    });
  }
  return missing;
}

/** The command that installs python3, make and a C++ compiler on this system (lib/platform.ts uses it too). */
function toolInstallCommand() {
  if (process.platform === 'darwin') return 'xcode-select --install';
  if (process.platform === 'win32') {
    return 'install Visual Studio Build Tools ("Desktop development with C++") and Python 3';
  }
  let ids = '';
  try {
    const text = fs.readFileSync('/etc/os-release', 'utf8');
    ids = ((text.match(/^ID=(.*)$/m) || [])[1] || '') + ' ' + ((text.match(/^ID_LIKE=(.*)$/m) || [])[1] || '');
  } catch {
    // unknown distribution: the Debian command is the most common answer
  }
  ids = ids.replace(/"/g, '');
  if (/alpine/.test(ids)) return 'apk add python3 make g++';
  if (/fedora|rhel|centos|rocky|almalinux|amzn/.test(ids)) return 'dnf install python3 make gcc-c++';
  if (/suse/.test(ids)) return 'zypper install python3 make gcc-c++';
  if (/arch/.test(ids)) return 'pacman -S python make gcc';
  return 'apt-get install -y python3 make g++';
}

/**
 * The folder that holds include/node/common.gypi beside this Node binary (official builds ship their
 * headers there), so that node-gyp builds against it instead of downloading headers; null if absent.
 */
function localNodeDir() {
  const prefix = path.resolve(path.dirname(process.execPath), '..');
  return fs.existsSync(path.join(prefix, 'include', 'node', 'common.gypi')) ? prefix : null;
}

/** The environment a node-gyp build runs with: local Node headers and a parallel make, unless set. */
function buildEnv(env = process.env) {
  const out = Object.assign({}, env);
  if (!out.npm_config_nodedir) {
    const nodedir = localNodeDir();
    if (nodedir) out.npm_config_nodedir = nodedir;
  }
  if (!out.JOBS && !out.npm_config_jobs) {
    out.JOBS = String(typeof os.availableParallelism === 'function' ? os.availableParallelism() : os.cpus().length);
  }
  return out;
}

/** [command, args] that run node-gyp: the package's own, npm's bundled one, or one on PATH. */
function nodeGypCommand(env = process.env) {
  try {
    return [process.execPath, [require.resolve('node-gyp/bin/node-gyp.js', { paths: [root] })]];
  } catch {
    // not installed as a dependency: a consumer's install
  }
  if (env.npm_config_node_gyp && /\.js$/.test(env.npm_config_node_gyp) && fs.existsSync(env.npm_config_node_gyp)) {
    return [process.execPath, [env.npm_config_node_gyp]];
  }
  const onPath = which('node-gyp', env.PATH);
  return onPath ? [onPath, []] : null;
}

/** Prints an error in the shape: title, facts, then "Possible solutions" with commands. */
function report(title, facts, solutions) {
  const lines = [`fused-moe: ${title}`, `  runtime: ${runtimeLine()}`];
  for (const fact of facts) lines.push(`  ${fact}`);
  lines.push('Possible solutions:');
  for (const s of solutions) {
    lines.push(`- ${s.text}`);
    for (const cmd of s.commands || []) lines.push(`    ${cmd}`);
  }
  console.error(lines.join('\n'));
}

function prebuildFacts() {
  const shipped = listPrebuilds();
  const floor = shipped.some((f) => /\.glibc\.node$/.test(f)) ? ` (glibc ${GLIBC_FLOOR} or newer)` : '';
  return [`prebuilt binaries in this package: ${shipped.length ? shipped.join(', ') + floor : 'none'}`];
}

function main() {
  const env = process.env;
  const prebuildsOnly = !!env.PREBUILDS_ONLY;
  const fromSource = env.npm_config_build_from_source === 'true' || process.argv.includes('--build-from-source');

  if (!fromSource || prebuildsOnly) {
    const loaded = tryLoad(env);
    if (loaded.ok) return 0;
    if (prebuildsOnly) {
      report(
        'no prebuilt binary loads here, and PREBUILDS_ONLY is set, so nothing is compiled.',
        [...prebuildFacts(), `cause: ${loaded.error}`],
        [
          {
            text: 'Unset PREBUILDS_ONLY so that the addon is built from source (needs python3, make and a C++17 compiler):',
            commands: ['npm rebuild fused-moe'],
          },
          { text: 'Or install on a platform with a prebuilt binary (listed above).' },
        ],
      );
      return 1;
    }
  }

  const buildEnvironment = buildEnv(env);
  const missing = missingTools(buildEnvironment);
  const gyp = nodeGypCommand(buildEnvironment);
  if (missing.length || !gyp) {
    const names = missing.map((m) => m.tool);
    if (!gyp) names.push('node-gyp');
    report(
      `cannot build the native addon from source: ${names.join(', ')} not found.`,
      [
        ...prebuildFacts(),
        fromSource
          ? 'a source build was asked for (--build-from-source)'
          : 'no prebuilt binary fits this runtime, so it has to be built',
        ...missing.map((m) => `missing: ${m.hint}`),
        ...(gyp ? [] : ['missing: node-gyp (npm ships one; install it with npm install -g node-gyp)']),
      ],
      [
        {
          text: 'Install the build tools, then build again:',
          commands: [toolInstallCommand(), 'npm rebuild fused-moe'],
        },
        { text: 'Or install on a platform with a prebuilt binary (listed above); no compiler is needed there.' },
      ],
    );
    return 1;
  }

  console.error('fused-moe: building the CPU addon from source with node-gyp (a minute or two)');
  const [cmd, args] = gyp;
  const r = childProcess.spawnSync(cmd, [...args, 'rebuild'], { cwd: root, env: buildEnvironment, stdio: 'inherit' });
  if (r.status !== 0) {
    report(
      `the source build failed (node-gyp ${r.signal ? 'was killed by ' + r.signal : 'exited with code ' + r.status}; its output is above).`,
      prebuildFacts(),
      [
        {
          text: 'Check that the C++ compiler supports C++17 (g++ 7+, clang++ 5+), then build again:',
          commands: ['npm rebuild fused-moe --foreground-scripts'],
        },
        { text: 'Or install on a platform with a prebuilt binary (listed above).' },
      ],
    );
    return 1;
  }
  const built = tryLoad(Object.assign({}, env, { PREBUILDS_ONLY: '' }));
  if (!built.ok) {
    report(
      'the addon was built but does not load.',
      [`cause: ${built.error}`],
      [
        {
          text: 'Rebuild from a clean tree and report the cause above if it persists:',
          commands: ['npm rebuild fused-moe --foreground-scripts'],
        },
      ],
    );
    return 1;
  }
  return 0;
}

module.exports = {
  GLIBC_FLOOR,
  which,
  libcInfo,
  runtimeLine,
  listPrebuilds,
  missingTools,
  toolInstallCommand,
  localNodeDir,
  buildEnv,
  tryLoad,
};

if (require.main === module) process.exitCode = main();
