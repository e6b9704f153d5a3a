/**
 * The benchmark runs: `node bench/bench.js --quick --json` exits 0 and reports sane, positive figures
 * for every kernel set this machine supports.
 */
import { spawnSync } from 'child_process';
import * as path from 'path';

test('bench --quick --json prints sane numbers', () => {
  const r = spawnSync(process.execPath, [path.join(__dirname, '..', 'bench', 'bench.js'), '--quick', '--json'], {
    encoding: 'utf8',
    timeout: 120000,
  });
  expect(r.stderr).not.toMatch(/child failed/);
  expect(r.status).toBe(0);
  const res = JSON.parse(r.stdout.trim().split('\n').pop() as string);
  expect(res.ceilings.readGBs).toBeGreaterThan(0);
  for (const v of Object.values(res.ceilings.fmaGflops)) expect(v).toBeGreaterThan(0);
  const sets = new Set(res.rows.map((row: { isa: string }) => row.isa));
  for (const isa of res.machine.supported) expect(sets.has(isa)).toBe(true);
  for (const row of res.rows) {
    for (const key of ['ms', 'tokensPerS', 'weightGBs', 'gflops', 'bwFraction', 'fmaFraction']) {
      expect([row.case, row.isa, key, Number.isFinite(row[key]) && row[key] > 0]).toEqual([
        row.case,
        row.isa,
        key,
        true,
      ]);
    }
    expect(row.finite).toBe(true);
  }
});
