// The error table of bench/RESULTS.md ("Quantized experts"): relative L2 error of the block's output
// against float64 on the unquantized weights, for int8 and int4 at groups 32, 64 and 128, on every
// kernel set this CPU runs. The cases are the err-* cases of test/quant.test.ts (quantErrorCases in
// test/helpers/quant.ts: random weights uniform in ±a, H = 256, F = 512, E = 4, k = 2, T = 32, seed
// 30 + group), written and run by the same fixtures (test/fixtures/kernel-prepare.js, kernel-case.js).
// The arithmetic is deterministic: any machine that runs a set gives the same figures.
// Usage: node bench/quant-error.js
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const { spawnSync } = require('child_process');
const binding = require('node-gyp-build')(path.join(__dirname, '..'));

const fixtures = path.join(__dirname, '..', 'test', 'fixtures');
const { loadTs } = require('../test/helpers/load-ts');
const { quantErrorCases } = loadTs('quant.ts');
const { relL2 } = loadTs('reference.ts');
const cases = quantErrorCases();

function run(script, dir, env) {
  const r = spawnSync(process.execPath, [path.join(fixtures, script), dir], { env, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${script} failed: ${r.stderr || r.error}`);
  return r.stdout;
}

function readF64(file) {
  const b = fs.readFileSync(file);
  return new Float64Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
}

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fused-moe-quant-error-'));
try {
  fs.writeFileSync(path.join(dir, 'cases.json'), JSON.stringify(cases));
  run('kernel-prepare.js', dir, process.env);
  const rows = [];
  for (const isa of binding.backendInfo().cpu.supported) {
    const report = JSON.parse(
      run('kernel-case.js', dir, { ...process.env, FUSED_MOE_ISA: isa })
        .trim()
        .split('\n')
        .pop(),
    );
    for (const quantize of ['int8', 'int4']) {
      const errs = [32, 64, 128].map((group) => {
        const c = cases.find((x) => x.name === `err-${quantize}-g${group}`);
        const b = fs.readFileSync(path.join(dir, `${c.name}.out.bin`));
        const out = new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength), 0, c.T * c.H);
        return relL2(out, readF64(path.join(dir, `${c.name}.ref.bin`)));
      });
      const acts = quantize === 'int8' ? report.int8Activations : report.int4Activations;
      rows.push([isa, quantize, acts, ...errs.map((e) => `${(e * 100).toFixed(2)}%`)]);
    }
  }
  const head = ['set', 'quantize', 'activations', 'group 32', 'group 64', 'group 128'];
  const width = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  for (const r of [head, ...rows]) console.log(r.map((v, i) => v.padStart(width[i])).join('  '));
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
