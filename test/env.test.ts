import { spawnSync } from 'child_process';
// The one table of environment variables (lib/env.ts) against the README's table and the sources.
import * as fs from 'fs';
import * as path from 'path';
import { ENV_VARS } from '../lib/env';

const root = path.join(__dirname, '..');

/** The rows of the README's "Environment variables" table: [name, effect, read by]. */
function readmeRows(): string[][] {
  const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');
  const start = readme.indexOf('\n## Environment variables\n');
  expect(start).toBeGreaterThanOrEqual(0);
  const end = readme.indexOf('\n## ', start + 1);
  const section = readme.slice(start, end < 0 ? undefined : end);
  return section
    .split('\n')
    .filter((l) => /^\| `/.test(l))
    .map((l) =>
      l
        .slice(1, -1)
        .split(' | ')
        .map((c) => c.trim()),
    );
}

function sourceFiles(dir: string, exts: RegExp): string[] {
  const out: string[] = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    if (entry.isDirectory()) out.push(...sourceFiles(p, exts));
    else if (exts.test(entry.name)) out.push(p);
  }
  return out;
}

test('the README lists the same variables as lib/env.ts, in the same order and words', () => {
  const rows = readmeRows();
  expect(rows.map((r) => r[0])).toEqual(ENV_VARS.map((v) => '`' + v.name + '`'));
  expect(rows).toEqual(ENV_VARS.map((v) => ['`' + v.name + '`', v.effect, v.readBy]));
});

test('every FUSED_MOE_* variable the sources read is in the table, and every one there is read', () => {
  const files = [
    ...sourceFiles(path.join(root, 'lib'), /\.ts$/),
    ...sourceFiles(path.join(root, 'csrc'), /\.(cpp|h|cu|cuh)$/).filter(
      (f) => !f.includes(`${path.sep}tests${path.sep}`),
    ),
    path.join(root, 'scripts', 'install.js'),
  ].filter((f) => path.basename(f) !== 'env.ts');
  const read = new Set<string>();
  for (const f of files) {
    const text = fs.readFileSync(f, 'utf8');
    for (const m of text.matchAll(
      /(?:getenv\(\s*"|process\.env\.|env\.)(FUSED_MOE_[A-Z_]+|PREBUILDS_ONLY|npm_config_build_from_source)\b/g,
    ))
      read.add(m[1]);
  }
  const listed = new Set(ENV_VARS.map((v) => v.name));
  for (const name of read) expect(listed).toContain(name);
  // FUSED_MOE_PREBUILD is also read by node-gyp-build, CUDA_VISIBLE_DEVICES by the CUDA runtime.
  for (const name of listed) if (/^FUSED_MOE_/.test(name)) expect([...read, 'FUSED_MOE_PREBUILD']).toContain(name);
  expect(new Set(ENV_VARS.map((v) => v.name)).size).toBe(ENV_VARS.length);
});

test('doctor prints every variable of the table, set or not', () => {
  const env = { ...process.env, FUSED_MOE_ISA: undefined, FUSED_MOE_DECODE_ROWS: '5' };
  const r = spawnSync(process.execPath, [path.join(root, 'bin', 'fused-moe.js'), 'doctor'], {
    encoding: 'utf8',
    env,
    timeout: 60000,
  });
  for (const v of ENV_VARS) expect(r.stdout).toMatch(new RegExp(`^\\s+${v.name}=`, 'm'));
  expect(r.stdout).toMatch(/^\s+FUSED_MOE_DECODE_ROWS=5$/m);
  expect(r.stdout).toMatch(/^\s+FUSED_MOE_ISA=\(unset\)$/m);
});
