/**
 * Every CPU kernel set this machine runs, against the float64 reference, at shapes that are not
 * multiples of any vector width or tile: accuracy per weight dtype and top-k, batch invariance (a
 * token alone, in the full batch and in an uneven split give the same bits) and run-to-run determinism.
 *
 * The kernel set is chosen once per process (FUSED_MOE_ISA), so each set runs in a child process
 * (test/fixtures/kernel-case.js) over inputs this file writes to a temporary directory.
 */
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import { Case, relL2 } from './helpers/reference';

// eslint-disable-next-line @typescript-eslint/no-var-requires
const binding = require('node-gyp-build')(path.join(__dirname, '..'));
const supported: string[] = binding.backendInfo().cpu.supported;

type Named = Case & { name: string };
const base = { routing: 'softmax-topk-renorm' as const };
const cases: Named[] = [
  // Odd sizes: H and F fit no vector width, T no tile height; every dtype.
  { name: 'odd-f32', H: 72, F: 200, E: 6, k: 2, T: 37, dtype: 'float32', seed: 1, ...base },
  { name: 'odd-bf16', H: 72, F: 200, E: 6, k: 2, T: 37, dtype: 'bfloat16', seed: 2, ...base },
  { name: 'odd-f16', H: 72, F: 200, E: 6, k: 2, T: 37, dtype: 'float16', seed: 3, ...base },
  // Tiny and odd reduction lengths (H = 33: the last bf16 k-pair is half padding), k = 1 and k = 4.
  { name: 'tiny-k1-f32', H: 33, F: 17, E: 3, k: 1, T: 37, dtype: 'float32', seed: 4, routing: 'softmax-topk' },
  { name: 'tiny-k1-bf16', H: 33, F: 17, E: 3, k: 1, T: 37, dtype: 'bfloat16', seed: 5, routing: 'softmax-topk' },
  { name: 'tiny-k4-f16', H: 33, F: 17, E: 5, k: 4, T: 20, dtype: 'float16', seed: 6, ...base },
  { name: 'tiny-k4-bf16', H: 33, F: 17, E: 5, k: 4, T: 20, dtype: 'bfloat16', seed: 7, ...base },
  { name: 'one-k4-f32', H: 72, F: 200, E: 6, k: 4, T: 1, dtype: 'float32', seed: 8, ...base },
  // Many rows per expert: several row blocks of the prefill tile plus a remainder.
  { name: 'long-f32', H: 72, F: 200, E: 4, k: 2, T: 300, dtype: 'float32', seed: 9, ...base },
  { name: 'long-bf16', H: 72, F: 200, E: 4, k: 2, T: 300, dtype: 'bfloat16', seed: 10, ...base },
  // A real width: decode (T = 3) and prefill with k blocks over H and F (T = 16: 16 rows per expert).
  { name: 'wide-f32', H: 1024, F: 3584, E: 2, k: 2, T: 3, dtype: 'float32', seed: 11, ...base },
  { name: 'wide-bf16', H: 1024, F: 3584, E: 3, k: 1, T: 3, dtype: 'bfloat16', seed: 12, ...base },
  { name: 'wide-prefill-f32', H: 1024, F: 3584, E: 2, k: 2, T: 16, dtype: 'float32', seed: 13, ...base },
  { name: 'wide-prefill-f16', H: 1024, F: 3584, E: 2, k: 1, T: 16, dtype: 'float16', seed: 14, ...base },
];

let dir = '';
const refs = new Map<string, Float64Array>();

function child(script: string, env: NodeJS.ProcessEnv): string {
  const r = spawnSync(process.execPath, [path.join(__dirname, 'fixtures', script), dir], { env, encoding: 'utf8', timeout: 60000 });
  if (r.status !== 0) throw new Error(`${script} failed (${env.FUSED_MOE_ISA ?? ''}): ${r.stderr || r.error}`);
  return r.stdout;
}

beforeAll(() => {
  const t0 = Date.now();
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fused-moe-kernels-'));
  fs.writeFileSync(path.join(dir, 'cases.json'), JSON.stringify(cases));
  child('kernel-prepare.js', process.env);
  for (const c of cases) {
    const b = fs.readFileSync(path.join(dir, `${c.name}.ref.bin`));
    refs.set(c.name, new Float64Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength)));
  }
  if (process.env.FUSED_MOE_TEST_TIMING) console.log(`inputs and references: ${Date.now() - t0} ms`);
});

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

function runSet(isa: string): { full: Float32Array; again: Float32Array; alone: Float32Array; split: Float32Array }[] {
  const t0 = Date.now();
  const out = child('kernel-case.js', { ...process.env, FUSED_MOE_ISA: isa });
  if (process.env.FUSED_MOE_TEST_TIMING) console.log(`${isa}: ${Date.now() - t0} ms`);
  const report = JSON.parse(out.trim().split('\n').pop() as string);
  expect(report.isa).toBe(isa);
  return cases.map((c) => {
    const bytes = fs.readFileSync(path.join(dir, `${c.name}.out.bin`));
    const all = new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
    const n = c.T * c.H;
    return { full: all.subarray(0, n), again: all.subarray(n, 2 * n), alone: all.subarray(2 * n, 3 * n), split: all.subarray(3 * n, 4 * n) };
  });
}

function sameBits(a: Float32Array, b: Float32Array): number {
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length), ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < ua.length; i++) if (ua[i] !== ub[i]) return i;
  return -1;
}

test('this machine runs at least the scalar set', () => {
  expect(supported).toContain('scalar');
});

describe.each(supported)('kernel set %s', (isa) => {
  let results: ReturnType<typeof runSet> = [];
  beforeAll(() => {
    results = runSet(isa);
  });

  test.each(cases.map((c, i) => [c.name, i] as const))('%s: matches the float64 reference', (_name, i) => {
    const c = cases[i];
    const err = relL2(results[i].full, refs.get(c.name) as Float64Array);
    expect(Number.isFinite(err)).toBe(true);
    expect(err).toBeLessThan(c.dtype === 'float32' ? 1e-5 : 1e-2);
  });

  test('batch invariance: alone, in the batch and split give the same bits', () => {
    for (let i = 0; i < cases.length; i++) {
      const r = results[i];
      expect([cases[i].name, sameBits(r.alone, r.full)]).toEqual([cases[i].name, -1]);
      expect([cases[i].name, sameBits(r.split, r.full)]).toEqual([cases[i].name, -1]);
    }
  });

  test('run-to-run determinism', () => {
    for (let i = 0; i < cases.length; i++) expect([cases[i].name, sameBits(results[i].again, results[i].full)]).toEqual([cases[i].name, -1]);
  });
});
