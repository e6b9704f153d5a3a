// What the whole-model benchmarks share: each (engine, format) runs in a child process of its own (so
// one model's memory is gone before the next loads) that prints its result as the last line, and the
// same command-line conventions.
'use strict';
const path = require('path');
const { spawnSync } = require('child_process');

/**
 * In a child (argv: --child JOB): runs `engines()[job.engine](job)` (engines: { ours, llama }), prints the result and exits;
 * returns true there, false in the parent.
 */
function runAsChild(engines) {
  if (process.argv[2] !== '--child') return false;
  const job = JSON.parse(process.argv[3]);
  const run = engines()[job.engine];
  run(job).then(
    (r) => {
      process.stdout.write('\n' + JSON.stringify(r) + '\n');
      process.exit(0);
    },
    (e) => {
      process.stderr.write(`${(e && e.stack) || e}\n`);
      process.exit(1);
    },
  );
  return true;
}

/** Runs `script --child job` and returns the result it printed, or { error }. */
function runChild(script, job) {
  const r = spawnSync(process.execPath, [script, '--child', JSON.stringify(job)], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'inherit'],
    maxBuffer: 1 << 26,
  });
  if (r.status !== 0) return { error: `exit ${r.status}${r.signal ? ' (' + r.signal + ')' : ''}` };
  return JSON.parse(r.stdout.trim().split('\n').pop());
}

/**
 * A benchmark's options: the `common` flags (--quick, --json: the table then goes to stderr, unless
 * the script names fewer), and its own `values` (`--name value`) and `flags`.
 */
function cliOptions({ values = [], flags = [], common = ['--quick', '--json'] } = {}) {
  const args = process.argv.slice(2);
  // Anything else is refused, so a mistyped option (or --help) never starts a long run with defaults.
  const flagNames = [...common, ...flags];
  for (let i = 0; i < args.length; i++) {
    if (values.includes(args[i]) && i + 1 < args.length) i++;
    else if (!flagNames.includes(args[i])) {
      const known = [...values.map((v) => `${v} VALUE`), ...flagNames].join(', ');
      const what = values.includes(args[i]) ? `${args[i]} needs a value` : `unexpected '${args[i]}'`;
      process.stderr.write(`${path.basename(process.argv[1])}: ${what}; options: ${known}\n`);
      process.exit(2);
    }
  }
  const opt = (name) => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1] : undefined;
  };
  const quick = args.includes('--quick'),
    jsonOut = args.includes('--json');
  const log = (s) => (jsonOut ? process.stderr : process.stdout).write(s + '\n');
  return { args, opt, quick, jsonOut, log };
}

module.exports = { runAsChild, runChild, cliOptions };
