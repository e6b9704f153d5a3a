/**
 * MoeModel.load over corrupted checkpoints, seeded: 400 copies of small random-weight checkpoints of
 * every family, each with one to three changes (a config.json value of another type or size, a tensor's
 * dtype, shape or byte range rewritten in the safetensors header, a tensor dropped or duplicated, the
 * data cut short, a header length past the file), loaded with each weight format. Every load either
 * works, and then gives logits of the vocabulary's length, or rejects with an Error whose message is
 * one of ours (no "undefined", no "Cannot read"); nothing aborts the process (a config.json that claims
 * a billion layers used to run V8 out of memory while the expected tensors were listed).
 */
import * as fs from 'fs';
import * as path from 'path';
import { MoeModel } from '../lib/model/model';
import { rng } from './helpers/reference';
import { makeTempDir, removeTempDir } from './helpers/checkpoint';
import { FAMILIES, writeRandomModel } from './helpers/model/random-model';

let dir = '';
beforeAll(() => {
  dir = makeTempDir('fmoe-load-fuzz-');
});
afterAll(() => {
  if (dir) removeTempDir(dir);
});

// prettier-ignore
const VALUES: unknown[] = [
  null, 0, 1, 2, 3, -1, 7, 17, 128, 4097, 65536, 1e9, 2 ** 31, 2 ** 40, 0.5, 1e-30, 'x', '', [], {}, [1], true,
  'silu', 'gelu', 'bfloat16', 'float16', 'float32', 'int8',
];
const DTYPES: unknown[] = ['F32', 'F16', 'BF16', 'I8', 'U8', 'F64', 'I64', 'BOOL', 'F8_E4M3', 'XX', 7];
const EXTRA_KEYS = ['head_dim', 'sliding_window', 'rope_scaling', 'tie_word_embeddings', 'torch_dtype'];

interface Header {
  [name: string]: { dtype: unknown; shape: number[]; data_offsets: number[] };
}

test('400 corrupted checkpoints: each loads and works or is refused with a clear error', async () => {
  const rand = rng(606);
  const int = (n: number) => Math.floor(rand() * n);
  const pick = <T>(list: T[]): T => list[int(list.length)];
  const bases = FAMILIES.map(
    (family, i) =>
      writeRandomModel(path.join(dir, `base-${family}`), {
        family,
        seed: 5 + i,
        gguf: false,
        dtype: i % 2 ? 'bfloat16' : 'float32',
      }).hfDir,
  );
  const bad: string[] = [];
  let loaded = 0;
  for (let round = 0; round < 400; round++) {
    const base = pick(bases);
    const out = path.join(dir, 'case');
    fs.rmSync(out, { recursive: true, force: true });
    fs.mkdirSync(out);
    for (const f of fs.readdirSync(base)) fs.copyFileSync(path.join(base, f), path.join(out, f));
    const changes: string[] = [];
    for (let k = 1 + int(3); k > 0; k--) {
      if (rand() < 0.45) {
        const file = path.join(out, 'config.json');
        const config = JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, unknown>;
        const key = rand() < 0.9 ? pick(Object.keys(config)) : pick(EXTRA_KEYS);
        config[key] = pick(VALUES);
        changes.push(`config.${key} = ${JSON.stringify(config[key])}`);
        fs.writeFileSync(file, JSON.stringify(config));
        continue;
      }
      const file = path.join(
        out,
        fs.readdirSync(out).find((f) => f.endsWith('.safetensors'))!,
      );
      const bytes = fs.readFileSync(file);
      const n = Number(bytes.readBigUInt64LE(0));
      let header: Header;
      try {
        header = JSON.parse(bytes.subarray(8, 8 + n).toString('utf8')) as Header;
      } catch {
        continue; // an earlier change broke the header: leave it broken
      }
      const name = pick(Object.keys(header).filter((x) => x !== '__metadata__'));
      const t = header[name];
      let body = bytes.subarray(8 + n);
      const what = rand();
      if (what < 0.25) t.dtype = pick(DTYPES);
      else if (what < 0.5) t.shape[int(Math.max(1, t.shape.length))] = pick([0, 1, -1, 3, 2 ** 33, 1.5]);
      else if (what < 0.7) t.data_offsets[int(2)] = pick([0, -8, 1, t.data_offsets[0] + 3, body.length + 1, 2 ** 53]);
      else if (what < 0.8) delete header[name];
      else if (what < 0.9) body = body.subarray(0, int(body.length));
      else header[`${name}.copy`] = { ...t };
      changes.push(
        `${name}: ${what < 0.8 ? JSON.stringify(header[name] ?? 'dropped') : what < 0.9 ? 'data cut' : 'copied'}`,
      );
      const json = Buffer.from(JSON.stringify(header));
      const length = Buffer.alloc(8);
      length.writeBigUInt64LE(BigInt(rand() < 0.05 ? 2 ** 32 - 1 : json.length));
      fs.writeFileSync(file, Buffer.concat([length, json, body]));
    }
    const quantize = pick(['none', 'int8', 'int4'] as const);
    const model = await MoeModel.load(out, { contextLength: 64, quantize }).catch((err: unknown) => {
      const message = err instanceof Error ? err.message : '';
      if (!message || /undefined|cannot read|is not a function|NaN/i.test(message))
        bad.push(`${String(err).slice(0, 300)} after ${changes.join('; ')}`);
      return undefined;
    });
    if (!model) continue;
    loaded++;
    try {
      expect((await model.logits([1, 2, 3])).length).toBe(model.config.vocabSize);
    } finally {
      model.dispose();
    }
  }
  expect(bad).toEqual([]);
  // Some changes leave a checkpoint that still loads (a config key nobody reads, an equal value).
  expect(loaded).toBeGreaterThan(5);
}, 300_000);
