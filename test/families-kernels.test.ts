/**
 * Every family's block on every kernel set this machine runs (one child process per set, as
 * kernels.test.ts does): accuracy against the float64 reference, run-to-run determinism and batch
 * invariance (a token alone, in the batch, and in an uneven split give the same bits), with the
 * shared expert in float32, bf16 and int8.
 */
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { binding } from '../lib/binding';
import { FamilyCase, familyCases, familyForward, makeFamilyCase } from './helpers/families-reference';
import { dequantizeRows, quantizedActivations, quantizeRows } from './helpers/quant';
import { bf16Activations, relL2 } from './helpers/reference';
import { FLOAT32_TOL, narrowedTolerance, narrowsBf16, weightTolerance } from './helpers/tolerance';

const supported: string[] = binding().backendInfo().cpu.supported;
type Run = FamilyCase & { quantize?: 'int8' };
const cases: Run[] = [
  ...familyCases('float32', 900, 11),
  ...familyCases('bfloat16', 950, 11).filter((c) => (c.Fs ?? 0) > 0),
  ...familyCases('float32', 990, 7)
    .filter((c) => (c.Fs ?? 0) > 0)
    .map((c) => ({ ...c, name: `${c.name}-int8`, quantize: 'int8' as const, H: 64, F: 32 })),
].map((c) => ({ ...c, name: `${c.name}-${c.dtype}` }));

let dir = '';
const made = new Map<string, ReturnType<typeof makeFamilyCase>>();
const b64 = (a: Float32Array | Uint16Array | undefined) =>
  a && {
    type: a instanceof Float32Array ? 'f32' : 'u16',
    data: Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('base64'),
  };

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fused-moe-families-'));
  const json = cases.map((c) => {
    const m = makeFamilyCase(c);
    made.set(c.name, m);
    const w = m.weights;
    return {
      name: c.name,
      H: c.H,
      F: c.F,
      E: c.E,
      T: c.T,
      config: { ...m.config, ...(c.quantize ? { quantize: c.quantize, quantGroupSize: 32 } : {}) },
      arrays: {
        x: b64(m.x),
        gate: b64(w.gate),
        w1: b64(w.w1),
        w3: b64(w.w3),
        w2: b64(w.w2),
        scoreBias: b64(w.scoreBias),
        s1: b64(w.shared?.w1),
        s3: b64(w.shared?.w3),
        s2: b64(w.shared?.w2),
        sgate: b64(w.shared?.gate),
      },
    };
  });
  fs.writeFileSync(path.join(dir, 'cases.json'), JSON.stringify(json));
});

afterAll(() => {
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

function sameBits(a: Float32Array, b: Float32Array): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}

/** The reference this set is held to, and the bound. */
function expected(
  isa: string,
  int8Activations: string,
  c: Run,
  m: ReturnType<typeof makeFamilyCase>,
): { ref: Float64Array; tol: number } {
  if (c.quantize) {
    const deq = (w: ArrayLike<number>, K: number) => dequantizeRows(quantizeRows(w, K, 'int8', 32), K, 32);
    const r = m.ref;
    const q = {
      ...r,
      w1: deq(r.w1, c.H),
      w3: deq(r.w3, c.H),
      w2: deq(r.w2, c.F),
      shared: { ...r.shared!, w1: deq(r.shared!.w1, c.H), w3: deq(r.shared!.w3, c.H), w2: deq(r.shared!.w2, r.Fs) },
    };
    // The set's int8 activations, as its backendInfo reports them: int16 or int8 on the x86 SIMD sets,
    // float32 elsewhere.
    if (int8Activations === 'float32') return { ref: familyForward(q, m.x, c.T), tol: FLOAT32_TOL };
    const bits = int8Activations === 'int16' ? 16 : 8;
    return {
      ref: familyForward(q, m.x, c.T, quantizedActivations(bits, 32)),
      tol: narrowedTolerance(bits === 16 ? 'int16' : 'int8', { ...c, k: 1 }),
    };
  }
  if (narrowsBf16(isa, c.dtype))
    return { ref: familyForward(m.ref, m.x, c.T, bf16Activations), tol: narrowedTolerance('bf16', c) };
  return { ref: familyForward(m.ref, m.x, c.T), tol: weightTolerance(isa, c.dtype) };
}

describe.each(supported)('kernel set %s', (isa) => {
  test('every family: accurate, deterministic and batch invariant', () => {
    const r = spawnSync(process.execPath, [path.join(__dirname, 'fixtures', 'families-case.js'), dir], {
      env: { ...process.env, FUSED_MOE_ISA: isa },
      encoding: 'utf8',
      timeout: 600000,
    });
    if (r.status !== 0) throw new Error(`families-case.js failed (${isa}): ${r.stderr || r.error}`);
    const report = JSON.parse(r.stdout.trim().split('\n').pop() as string);
    expect(report.isa).toBe(isa);
    expect(['float32', 'int16', 'int8']).toContain(report.int8Activations);
    for (const c of cases) {
      const bytes = fs.readFileSync(path.join(dir, `${c.name}.out.bin`));
      const all = new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength));
      const n = c.T * c.H;
      const [full, again, alone, split] = [0, 1, 2, 3].map((i) => all.subarray(i * n, (i + 1) * n));
      const { ref, tol } = expected(isa, report.int8Activations, c, made.get(c.name)!);
      const err = relL2(full, ref);
      if (!(err < tol)) throw new Error(`${c.name}: error ${err} >= ${tol}`);
      expect([c.name, sameBits(full, again), sameBits(full, alone), sameBits(full, split)]).toEqual([
        c.name,
        true,
        true,
        true,
      ]);
    }
  });
});
