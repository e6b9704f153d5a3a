#!/usr/bin/env node
// What one trip from JavaScript to the addon's libuv worker and back costs, with no work in it: an async
// native call (binding.mapFileAsync of a 4 KiB file) awaited in a loop, back to back, then with 320 MB
// read by JavaScript before each call, as a decode step's weights flush the caches before the trip that
// takes its token back (bench/model.js's "outside the native step"). Medians of `calls` calls per round.
// Not a timed test.
//
//   node bench/round-trip.js [calls = 300] [rounds = 2]
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const { median } = require('./util');

const binding = require('node-gyp-build')(path.join(__dirname, '..'));
const calls = Number(process.argv[2] ?? 300);
const rounds = Number(process.argv[3] ?? 2);

const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'fused-moe-trip-')), 'page.bin');
fs.writeFileSync(file, Buffer.alloc(4096, 7));
const flush = new Float64Array(40e6).map((_, i) => i); // 320 MB, distinct values

(async () => {
  try {
    for (let r = 0; r < rounds; r++)
      for (const cold of [false, true]) {
        const us = [];
        for (let i = 0; i < calls; i++) {
          if (cold) {
            let s = 0;
            for (let j = 0; j < flush.length; j += 8) s += flush[j]; // one read of every cache line
            if (s < 0) console.log(s);
          }
          const t = process.hrtime.bigint();
          await binding.mapFileAsync(file);
          us.push(Number(process.hrtime.bigint() - t) / 1e3);
        }
        console.log(`${cold ? 'after 320 MB read' : 'back to back     '}: ${median(us).toFixed(1)} µs a call`);
      }
  } finally {
    fs.rmSync(path.dirname(file), { recursive: true, force: true });
  }
})().catch((err) => {
  console.error(err);
  process.exit(1);
});
