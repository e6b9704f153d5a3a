#!/usr/bin/env node
// Runs clang-format (the npm package's binary) over the C++ and CUDA sources: `--check` fails on any
// file that is not formatted, otherwise the files are rewritten in place.
'use strict';
const { execFileSync } = require('child_process');
const fs = require('fs');
const path = require('path');

const root = path.join(__dirname, '..');
const check = process.argv.includes('--check');
const exts = new Set(['.h', '.cpp', '.cu', '.cuh']);

function walk(dir, out) {
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) walk(p, out);
    else if (exts.has(path.extname(e.name))) out.push(p);
  }
  return out;
}

const files = walk(path.join(root, 'csrc'), []).sort();
const binary = require.resolve('clang-format/index.js');
const args = check ? ['--dry-run', '--Werror', ...files] : ['-i', ...files];
try {
  execFileSync(process.execPath, [binary, '--style=file', ...args], { cwd: root, stdio: 'inherit' });
} catch {
  console.error(check ? 'clang-format: the files above need `npm run format`' : 'clang-format failed');
  process.exit(1);
}
console.log(`clang-format: ${files.length} files ${check ? 'formatted' : 'rewritten'}`);
