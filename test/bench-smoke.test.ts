/**
 * The benchmark runs: `node bench/bench.js --quick --json` exits 0 and reports sane, positive figures
 * for every kernel set this machine supports; `node bench/quant-error.js` prints its table.
 */
import { spawnSync } from 'child_process';
import * as path from 'path';
import { binding } from '../lib/binding';

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

test('quant-error prints a row per kernel set and format, each error in its range', () => {
  const r = spawnSync(process.execPath, [path.join(__dirname, '..', 'bench', 'quant-error.js')], {
    encoding: 'utf8',
    timeout: 300000,
  });
  expect(r.status).toBe(0);
  const rows = r.stdout
    .trim()
    .split('\n')
    .slice(1)
    .map((line) => line.trim().split(/\s+/));
  const supported = binding().backendInfo().cpu.supported;
  expect(rows.length).toBe(2 * supported.length);
  for (const [isa, quantize, acts, ...errs] of rows) {
    expect(supported).toContain(isa);
    expect(['float32', 'int16', 'int8']).toContain(acts);
    // Uniform weights: int8 about 0.6-1.5%, int4 about 12% (bench/RESULTS.md, "Quantization error").
    const [lo, hi] = quantize === 'int8' ? [0.3, 2] : [8, 16];
    for (const e of errs) {
      const v = parseFloat(e);
      expect([isa, quantize, v > lo && v < hi]).toEqual([isa, quantize, true]);
    }
  }
});

test('the int8 dot peak probe, bare and with the group scaling, where the avx512bf16 set runs', () => {
  const b = binding();
  const runs = b.backendInfo().cpu.supported.includes('avx512bf16');
  for (const group of [undefined, 32, 128]) {
    const gflops = b.bench.int8DotPeak(1, group);
    // A positive rate where the set runs (the loops count their own operations), none elsewhere.
    expect([group, runs ? Number.isFinite(gflops) && gflops > 0 : gflops === 0]).toEqual([group, true]);
  }
});
