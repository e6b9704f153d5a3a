#!/usr/bin/env node
// The fused-moe command line: `fused-moe doctor [--json]` (see lib/doctor.ts) and
// `fused-moe run <dir> -p "prompt" | --chat` (see lib/cli.ts) and `fused-moe serve <dir> [options]`
// (see lib/server/cli.ts).
'use strict';

let doctor, cli, serve;
try {
  doctor = require('../dist/doctor.js');
  cli = require('../dist/cli.js');
  serve = require('../dist/server/cli.js');
} catch (err) {
  console.error(
    `fused-moe: the compiled JavaScript (dist/) is missing or broken; in a checkout, run npm run build:ts. (${err.message})`,
  );
  process.exit(1);
}
const argv = process.argv.slice(2);
if (argv[0] === 'run') {
  cli.run(argv.slice(1)).then((code) => {
    process.exitCode = code;
  });
} else if (argv[0] === 'serve') {
  serve.serveMain(argv.slice(1)).then(
    (code) => process.exit(code),
    (err) => {
      console.error(`fused-moe serve: ${err.message}`);
      process.exit(1);
    },
  );
} else {
  process.exitCode = doctor.main(argv);
  if (argv.length === 0 || argv[0] === '--help' || argv[0] === '-h')
    process.stdout.write(`\n${cli.RUN_USAGE}\n\n${serve.SERVE_USAGE}\n`);
}
