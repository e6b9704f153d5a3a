/**
 * The decoder on every CPU kernel set this machine runs, against the float64 reference: each family in
 * float32 (within 1e-5, prefill and a decode step after it), bf16 weights (exact on the sets that widen
 * them to float, within 4u of bf16 where the set rounds activations to bf16), and int8 (the median
 * position within the quantization error model of test/model.test.ts). The kernel set is chosen once
 * per process (FUSED_MOE_ISA), so each set runs in a child process (helpers/model/model-child.js).
 */
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
import { binding } from '../lib/binding';
import { makeTempDir, removeTempDir } from './helpers/checkpoint';
import { centredRelErrors, firstBitDifference, maxOf, medianOf, pickPrompt } from './helpers/model/compare';
import { FAMILIES, writeRandomModel } from './helpers/model/random-model';
import { ReferenceDecoder } from './helpers/model/reference-decoder';

const supported: string[] = binding().backendInfo().cpu.supported;
const PROMPT = 19;
const U_BF16 = 2 ** -8;
const E_INT8 = 1 / (2 * 127);

interface KernelCase {
  name: string;
  dir: string;
  options: Record<string, unknown>;
  prompt: number[];
  ref: Float64Array;
  V: number;
  check(errs: number[], isa: string): void;
}

let dir = '';
const cases: KernelCase[] = [];

beforeAll(() => {
  dir = makeTempDir('fmoe-model-kernels-');
  const add = (
    name: string,
    family: (typeof FAMILIES)[number],
    dtype: 'float32' | 'bfloat16',
    options: Record<string, unknown>,
    check: KernelCase['check'],
  ) => {
    const index = FAMILIES.indexOf(family);
    const m = writeRandomModel(`${dir}/${name}`, { family, dtype, seed: 71 + index, gguf: false });
    const reference = ReferenceDecoder.load(m.hfDir);
    const { prompt } = pickPrompt(reference, 81 + index, PROMPT, 1, 0.02, 100);
    reference.reset();
    cases.push({
      name,
      dir: m.hfDir,
      options: { contextLength: 32, ...options },
      prompt,
      ref: reference.forward(prompt).logits,
      V: m.shape.vocabSize,
      check,
    });
  };
  for (const family of FAMILIES)
    add(`${family}-f32`, family, 'float32', { kvCacheDtype: 'float32' }, (errs) =>
      expect(maxOf(errs)).toBeLessThan(1e-5),
    );
  add('qwen3moe-bf16', 'qwen3moe', 'bfloat16', { kvCacheDtype: 'float32' }, (errs, isa) => {
    if (isa === 'avx512bf16') expect(maxOf(errs)).toBeLessThan(4 * U_BF16);
    else expect(maxOf(errs)).toBeLessThan(1e-5);
  });
  add('mixtral-int8', 'mixtral', 'float32', { kvCacheDtype: 'float32', quantize: 'int8' }, (errs) => {
    expect(medianOf(errs)).toBeLessThan(1.5 * 4.05 * E_INT8);
    expect(medianOf(errs)).toBeGreaterThan(0.5 * E_INT8);
  });
});

afterAll(() => {
  if (dir) removeTempDir(dir);
});

function runSet(isa: string): Float32Array[] {
  const request = path.join(dir, `request-${isa}.json`);
  const outs = cases.map((c) => path.join(dir, `${c.name}-${isa}.f32`));
  fs.writeFileSync(
    request,
    JSON.stringify({
      cases: cases.map((c, i) => ({ dir: c.dir, options: c.options, prompt: c.prompt, out: outs[i] })),
    }),
  );
  const r = spawnSync(process.execPath, [path.join(__dirname, 'helpers', 'model', 'model-child.js'), request], {
    env: { ...process.env, FUSED_MOE_ISA: isa },
    encoding: 'utf8',
    timeout: 120000,
  });
  if (r.status !== 0) throw new Error(`model-child.js failed (${isa}): ${r.stderr || r.error}`);
  expect(JSON.parse(r.stdout.trim().split('\n').pop()!).isa).toBe(isa);
  return outs.map((f) => {
    const b = fs.readFileSync(f);
    return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
  });
}

test('this machine runs at least the scalar set', () => {
  expect(supported).toContain('scalar');
});

describe.each(supported)('kernel set %s', (isa) => {
  test('every family, bf16 and int8 within their bounds; a decode gives the prefill row', () => {
    const outs = runSet(isa);
    const table: string[] = [];
    cases.forEach((c, i) => {
      const prefill = outs[i].subarray(0, PROMPT * c.V),
        decode = outs[i].subarray(PROMPT * c.V);
      const errs = centredRelErrors(prefill, c.ref, PROMPT, c.V);
      table.push(`${c.name}: max ${maxOf(errs).toExponential(2)}, median ${medianOf(errs).toExponential(2)}`);
      c.check(errs, isa);
      expect([c.name, firstBitDifference(decode, prefill.subarray((PROMPT - 1) * c.V))]).toEqual([c.name, -1]);
    });
    console.log(`${isa}\n${table.join('\n')}`);
  });
});
