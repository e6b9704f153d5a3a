#!/usr/bin/env node
// The fused-moe command line: `fused-moe doctor [--json]` (see lib/doctor.ts).
'use strict';

let doctor;
try {
  doctor = require('../dist/doctor.js');
} catch (err) {
  console.error(
    `fused-moe: the compiled JavaScript (dist/) is missing or broken; in a checkout, run npm run build:ts. (${err.message})`,
  );
  process.exit(1);
}
process.exitCode = doctor.main(process.argv.slice(2));
