#!/usr/bin/env node
// One kernel set (the one FUSED_MOE_ISA or the CPU picks), every expert type: a forward through the
// installed package for float32, bfloat16 and float16 weights and for int8 and int4 quantized experts,
// at an odd and a round size, against the float64 reference of test/helpers (on the exact stored
// weights: the decoded 16-bit values, or code * scale of the documented quantizer). Prints one JSON line
// { isa, results: [{ expert, err, tol, ok }] }, err the largest relative L2 error of the sizes, ok when
// every size is within the bound test/helpers/tolerance.ts derives for that set. The pack
// test runs it with the installed package, under emulation for arm64 (scripts/qemu-arm64.js).
// Usage (from a project with fused-moe installed): node kernel-sweep.js <repo>/test/helpers
'use strict';

const path = require('path');
const { MoeLayer, backendInfo } = require('fused-moe');

const helpers = path.resolve(process.argv[2] || path.join(__dirname, '..', 'test', 'helpers'));
const { loadTs } = require(path.join(helpers, 'load-ts.js'));
const { makeCase, referenceMoe, relL2 } = loadTs('reference.ts');
const { quantizeRows, dequantizeRows, quantizedActivations } = loadTs('quant.ts');
const { FLOAT32_TOL, weightTolerance, narrowedTolerance } = loadTs('tolerance.ts');

const SIZES = [
  { H: 33, F: 47, E: 5, k: 2, T: 7, seed: 11 },
  { H: 64, F: 128, E: 4, k: 2, T: 8, seed: 12 },
];
const GROUP = 32;

function floatCase(dtype, size) {
  const c = makeCase({ ...size, dtype, routing: 'softmax-topk-renorm' });
  const layer = new MoeLayer(c.config, c.weights);
  const y = layer.forwardSync(c.x);
  const isa = layer.kernels;
  layer.dispose();
  return { err: relL2(y, referenceMoe(c.ref, c.x, size.T)), tol: weightTolerance(isa, dtype) };
}

function quantCase(kind, size) {
  const c = makeCase({ ...size, dtype: 'float32', routing: 'softmax-topk-renorm' });
  const layer = new MoeLayer({ ...c.config, quantize: kind, quantGroupSize: GROUP }, c.weights);
  const y = layer.forwardSync(c.x);
  layer.dispose();
  const { H, F } = size;
  const exact = (w, K) => dequantizeRows(quantizeRows(w, K, kind, GROUP), K, GROUP);
  const ref = { ...c.ref, w1: exact(c.weights.w1, H), w3: exact(c.weights.w3, H), w2: exact(c.weights.w2, F) };
  // Sets that quantize the activations too: the reference narrows them alike.
  const acts = kind === 'int8' ? backendInfo().cpu.int8Activations : backendInfo().cpu.int4Activations;
  const narrowing = acts === 'int16' ? 'int16' : acts === 'int8' ? 'int8' : null;
  const quantAct = narrowing ? quantizedActivations(narrowing === 'int16' ? 16 : 8, GROUP) : undefined;
  return {
    err: relL2(y, referenceMoe(ref, c.x, size.T, quantAct)),
    tol: narrowing ? narrowedTolerance(narrowing, size) : FLOAT32_TOL,
  };
}

const EXPERTS = [
  ['float32', (s) => floatCase('float32', s)],
  ['bfloat16', (s) => floatCase('bfloat16', s)],
  ['float16', (s) => floatCase('float16', s)],
  ['int8', (s) => quantCase('int8', s)],
  ['int4', (s) => quantCase('int4', s)],
];

const results = EXPERTS.map(([expert, run]) => {
  const runs = SIZES.map(run);
  return {
    expert,
    err: Math.max(...runs.map((r) => r.err)),
    tol: Math.max(...runs.map((r) => r.tol)),
    ok: runs.every((r) => r.err < r.tol),
  };
});
console.log(JSON.stringify({ isa: backendInfo().cpu.isa, results }));
