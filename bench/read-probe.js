#!/usr/bin/env node
// The read probe's patterns side by side: binding.bench.readBandwidth reports the fastest of a few
// ways to stream a buffer (8, 4 or 2 sequential streams a thread, or 4 with each line asked for 2 KiB
// ahead, non-temporally); this prints each one's GB/s and its ratio to 8 streams (the probe's one
// pattern until the thirty-fifth run of RESULTS.md), round by round in the same process, as medians
// and quartiles. Not a timed test: it shows why the probe takes the best pattern.
//
//   node bench/read-probe.js [rounds = 15] [MiB = 256] [threads = all]
'use strict';
const path = require('path');
const { median, quantile } = require('./util');

const binding = require('node-gyp-build')(path.join(__dirname, '..'));
const rounds = Number(process.argv[2] ?? 15);
const mib = Number(process.argv[3] ?? 256);
const threads = Number(process.argv[4] ?? binding.backendInfo().cpu.threads);
const NAMES = ['8 streams', '4 streams', '2 streams', '4 streams, fetched ahead'];

const rates = NAMES.map(() => []);
for (let r = 0; r < rounds; r++) binding.bench.readPatterns(mib << 20, threads).forEach((g, i) => rates[i].push(g));
console.log(
  `read probe patterns: ${rounds} rounds over ${mib} MiB, ${threads} threads (each round: median of 3 passes each)`,
);
console.log('| pattern | GB/s (median) | / 8 streams, same round: median | quartiles |');
console.log('| --- | --- | --- | --- |');
NAMES.forEach((name, i) => {
  const ratio = rates[i].map((g, r) => g / rates[0][r]);
  console.log(
    `| ${name} | ${median(rates[i]).toFixed(1)} | ${median(ratio).toFixed(3)} | ${quantile(ratio, 0.25).toFixed(3)}-${quantile(ratio, 0.75).toFixed(3)} |`,
  );
});
const best = rates[0].map((_, r) => Math.max(...rates.map((v) => v[r])));
console.log(`the probe's figure (the best pattern each round): median ${median(best).toFixed(1)} GB/s`);
