// A small prefill for counting instructions with callgrind (valgrind cannot run AVX-512, so use the
// AVX2 set): FUSED_MOE_ISA=avx2 FUSED_MOE_THREADS=1 valgrind --tool=callgrind node bench/callgrind-prefill.js
// then `callgrind_annotate` and compare the kernels' instruction counts with the FMAs the flops need
// (flops / 16 for 8-lane float32 FMAs).
'use strict';
const { MoeLayer } = require('../dist');
const { fill } = require('./util');

const H = 512,
  F = 1024,
  E = 4,
  k = 2,
  T = 64,
  reps = 3;
const layer = new MoeLayer(
  { hiddenSize: H, intermediateSize: F, numExperts: E, topK: k, threads: 1 },
  {
    gate: fill(E * H, false, 0.05, 1),
    w1: fill(E * F * H, false, 0.04, 2),
    w3: fill(E * F * H, false, 0.04, 3),
    w2: fill(E * H * F, false, 0.03, 4),
  },
);
const x = fill(T * H, false, 1, 5);
for (let i = 0; i < reps; i++) layer.forwardSync(x);
layer.dispose();
console.log(
  `${reps} forwards of ${2 * T * k * 3 * H * F} flops each (kernels: ${process.env.FUSED_MOE_ISA || 'default'})`,
);
