/**
 * Loading Mixtral-layout safetensors checkpoints: file, index and folder; layer and prefix choice;
 * bf16 and f32; hostile and broken files (always ERR_MOE_CHECKPOINT, never a crash); lazy mapping.
 */
import * as fs from 'fs';
import * as path from 'path';
import { AbortError, MoeLayer, openSafetensors } from '../lib/index';
import { binding } from '../lib/binding';
import { MoeError } from '../lib/errors';
import { widenToFloat32 } from '../lib/safetensors/format';
import {
  headerFor,
  makeTempDir,
  moeTensors,
  removeTempDir,
  residentFileBytes,
  safetensorsBytes,
  TinyModel,
  writeSafetensors,
  writeTinyMixtral,
  Header,
  RawTensor,
} from './helpers/checkpoint';
import { randomF32, referenceMoe, relL2, rng } from './helpers/reference';

let root: string;
let bf16: TinyModel;
let f16: TinyModel;
let f32: TinyModel;
const T = 5;
const x = randomF32(T * 32, rng(99), 1);

beforeAll(() => {
  root = makeTempDir('safetensors');
  bf16 = writeTinyMixtral(path.join(root, 'bf16'), 'BF16');
  f16 = writeTinyMixtral(path.join(root, 'f16'), 'F16', 2468);
  f32 = writeTinyMixtral(path.join(root, 'f32'), 'F32', 4321);
});

afterAll(() => removeTempDir(root));

function direct(model: TinyModel, layer: number): MoeLayer {
  const L = model.layers[layer];
  const weightDtype = ({ F32: 'float32', BF16: 'bfloat16', F16: 'float16' } as const)[model.dtype];
  return new MoeLayer(
    { hiddenSize: model.H, intermediateSize: model.F, numExperts: model.E, topK: model.k, weightDtype },
    { gate: L.gate, w1: L.w1, w3: L.w3, w2: L.w2 },
  );
}

function checkLayer(layer: MoeLayer, model: TinyModel, index: number, tol: number): void {
  expect(layer.config).toMatchObject({
    hiddenSize: 32,
    intermediateSize: 48,
    numExperts: 4,
    topK: 2,
    routing: 'softmax-topk-renorm',
  });
  const y = layer.forwardSync(x);
  expect(relL2(y, referenceMoe(model.layers[index].ref, x, T))).toBeLessThan(tol);
  const same = direct(model, index);
  expect(Buffer.from(y.buffer).equals(Buffer.from(same.forwardSync(x).buffer))).toBe(true);
  same.dispose();
  layer.dispose();
}

/** Expects a rejection with ERR_MOE_CHECKPOINT whose message matches every pattern. */
async function expectCheckpointError(p: Promise<unknown>, ...patterns: (string | RegExp)[]): Promise<MoeError> {
  let error: unknown;
  try {
    await p;
  } catch (err) {
    error = err;
  }
  expect(error).toBeInstanceOf(MoeError);
  const e = error as MoeError;
  expect(e.code).toBe('ERR_MOE_CHECKPOINT');
  for (const pat of patterns) expect(e.message).toMatch(pat);
  return e;
}

describe('MoeLayer.fromSafetensors', () => {
  test('folder (index + two shards + config.json), layer 0, bf16', async () => {
    const layer = await MoeLayer.fromSafetensors(bf16.dir, { layer: 0 });
    expect(layer.config.weightDtype).toBe('bfloat16');
    checkLayer(layer, bf16, 0, 1e-2);
  });

  test('quantize passes through: the same bits as a layer quantized from the same arrays', async () => {
    const layer = await MoeLayer.fromSafetensors(bf16.dir, { layer: 0, quantize: 'int8', quantGroupSize: 32 });
    expect(layer.config).toMatchObject({ quantize: 'int8', quantGroupSize: 32 });
    const L = bf16.layers[0];
    const same = new MoeLayer(
      {
        hiddenSize: bf16.H,
        intermediateSize: bf16.F,
        numExperts: bf16.E,
        topK: bf16.k,
        weightDtype: 'bfloat16',
        quantize: 'int8',
        quantGroupSize: 32,
      },
      { gate: L.gate, w1: L.w1, w3: L.w3, w2: L.w2 },
    );
    expect(Buffer.from(layer.forwardSync(x).buffer).equals(Buffer.from(same.forwardSync(x).buffer))).toBe(true);
    layer.dispose();
    same.dispose();
  });

  test('index file, layer 1 (its experts split across both shards)', async () => {
    const layer = await MoeLayer.fromSafetensors(path.join(bf16.dir, 'model.safetensors.index.json'), {
      layer: 1,
      threads: 1,
    });
    checkLayer(layer, bf16, 1, 1e-2);
  });

  test('a single .safetensors file, and a folder holding only that file', async () => {
    const dir = path.join(root, 'single');
    fs.mkdirSync(dir);
    writeSafetensors(path.join(dir, 'model.safetensors'), moeTensors(bf16, 1));
    fs.copyFileSync(path.join(bf16.dir, 'config.json'), path.join(dir, 'config.json'));
    checkLayer(await MoeLayer.fromSafetensors(path.join(dir, 'model.safetensors'), { layer: 1 }), bf16, 1, 1e-2);
    checkLayer(await MoeLayer.fromSafetensors(dir, { layer: 1 }), bf16, 1, 1e-2);
  });

  test('the only *.safetensors of a folder, no config.json: sizes from shapes, topK required', async () => {
    const dir = path.join(root, 'noconfig');
    fs.mkdirSync(dir);
    writeSafetensors(path.join(dir, 'moe.safetensors'), moeTensors(bf16, 0));
    await expect(MoeLayer.fromSafetensors(dir, { layer: 0 })).rejects.toThrow(
      /options\.topK is required.*no config\.json/,
    );
    checkLayer(await MoeLayer.fromSafetensors(dir, { layer: 0, topK: 2 }), bf16, 0, 1e-2);
  });

  test('f16 checkpoint: the gate is widened to the float32 values the file holds', async () => {
    const layer = await MoeLayer.fromSafetensors(f16.dir, { layer: 1 });
    expect(layer.config.weightDtype).toBe('float16');
    checkLayer(layer, f16, 1, 1e-5);
  });

  test('f32 checkpoint', async () => {
    const layer = await MoeLayer.fromSafetensors(f32.dir, { layer: 1 });
    expect(layer.config.weightDtype).toBe('float32');
    checkLayer(layer, f32, 1, 1e-5);
  });

  test('prefix override on a renamed checkpoint', async () => {
    const dir = path.join(root, 'renamed');
    const model = writeTinyMixtral(dir, 'BF16', 1234, (l) => `transformer.blocks.${l}.moe`);
    await expectCheckpointError(
      MoeLayer.fromSafetensors(dir, { layer: 1 }),
      "model.layers.1.block_sparse_moe.gate.weight' is not in the index",
    );
    checkLayer(await MoeLayer.fromSafetensors(dir, { prefix: 'transformer.blocks.1.moe' }), model, 1, 1e-2);
    checkLayer(
      await MoeLayer.fromSafetensors(dir, { prefix: 'transformer.blocks.{layer}.moe', layer: 0 }),
      model,
      0,
      1e-2,
    );
  });

  test('config.json: norm_topk_prob false means softmax-topk; topK and routing options win', async () => {
    const dir = path.join(root, 'qwenlike');
    fs.mkdirSync(dir);
    writeSafetensors(path.join(dir, 'model.safetensors'), moeTensors(bf16, 0));
    const cfg = JSON.parse(fs.readFileSync(path.join(bf16.dir, 'config.json'), 'utf8'));
    fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ ...cfg, norm_topk_prob: false }));
    const a = await MoeLayer.fromSafetensors(dir, { layer: 0 });
    expect(a.config.routing).toBe('softmax-topk');
    const y = a.forwardSync(x);
    expect(relL2(y, referenceMoe({ ...bf16.layers[0].ref, renorm: false }, x, T))).toBeLessThan(1e-2);
    a.dispose();
    const b = await MoeLayer.fromSafetensors(dir, { layer: 0, topK: 1, routing: 'softmax-topk-renorm' });
    expect(b.config).toMatchObject({ topK: 1, routing: 'softmax-topk-renorm' });
    b.dispose();
  });

  test('options are checked', async () => {
    await expect(MoeLayer.fromSafetensors(bf16.dir, {})).rejects.toThrow(TypeError);
    await expect(MoeLayer.fromSafetensors(bf16.dir, { layer: -1 })).rejects.toThrow(RangeError);
    await expect(MoeLayer.fromSafetensors(bf16.dir, { layer: 2 })).rejects.toThrow(/below num_hidden_layers \(2\)/);
    await expect(MoeLayer.fromSafetensors(42 as unknown as string, { layer: 0 })).rejects.toThrow(TypeError);
    // A weightDtype the checkpoint does not hold is a wrong argument, not a broken file.
    const dt = MoeLayer.fromSafetensors(bf16.dir, { layer: 0, weightDtype: 'float32' });
    await expect(dt).rejects.toBeInstanceOf(RangeError);
    await expect(dt).rejects.toMatchObject({
      code: 'ERR_MOE_DTYPE',
      message: expect.stringMatching(
        /^options\.weightDtype must be 'bfloat16' \(the checkpoint stores the experts as BF16.*got 'float32'$/,
      ),
    });
    await expect(MoeLayer.fromSafetensors(f16.dir, { layer: 0, weightDtype: 'bfloat16' })).rejects.toMatchObject({
      code: 'ERR_MOE_DTYPE',
    });
    const same = await MoeLayer.fromSafetensors(f16.dir, { layer: 0, weightDtype: 'float16' });
    expect(same.config.weightDtype).toBe('float16');
    same.dispose();
    await expect(MoeLayer.fromSafetensors(bf16.dir, { layer: 0, weightDtype: 'int8' as never })).rejects.toThrow(
      RangeError,
    );
    await expect(
      MoeLayer.fromSafetensors(bf16.dir, { layer: 0, signal: 'stop' as unknown as AbortSignal }),
    ).rejects.toThrow(/options\.signal/);
  });

  test('an aborted signal rejects with AbortError', async () => {
    await expect(MoeLayer.fromSafetensors(bf16.dir, { layer: 0, signal: AbortSignal.abort() })).rejects.toBeInstanceOf(
      AbortError,
    );
  });
});

describe('openSafetensors', () => {
  test('lists tensors of every shard and views them in place', async () => {
    const ck = await openSafetensors(bf16.dir);
    expect(ck.tensors.size).toBe(1 + 2 * (6 + 1 + 12) + 2);
    expect(ck.tensors.get('model.layers.1.block_sparse_moe.experts.3.w2.weight')).toEqual({
      dtype: 'BF16',
      shape: [32, 48],
    });
    expect(ck.metadata).toEqual({ format: 'pt' });
    const w2 = ck.get('model.layers.1.block_sparse_moe.experts.3.w2.weight');
    expect(w2).toBeInstanceOf(Uint16Array);
    const n = 32 * 48;
    expect(Array.from(w2)).toEqual(Array.from(bf16.layers[1].w2.subarray(3 * n, 4 * n)));
    expect(ck.get('model.layers.1.block_sparse_moe.experts.3.w2.weight')).toBe(w2);
    // Views are private copies-on-write: writing one never reaches the file.
    const file = path.join(bf16.dir, 'model-00002-of-00002.safetensors');
    const before = fs.readFileSync(file);
    w2[0] ^= 0xffff;
    expect(fs.readFileSync(file).equals(before)).toBe(true);
    await expectCheckpointError(
      Promise.resolve().then(() => ck.get('nope')),
      "tensor 'nope' not found",
    );
    ck.close();
    expect(() => ck.get('model.norm.weight')).toThrow(expect.objectContaining({ code: 'ERR_MOE_DISPOSED' }));
    expect(w2.length).toBe(n); // views handed out stay valid
  });

  test('f32 views; a misaligned tensor is copied; other dtypes are listed but refused', async () => {
    const file = path.join(root, 'mixed.safetensors');
    const odd = new Map<string, RawTensor>([
      ['one', { dtype: 'U8', shape: [3], data: new Uint8Array([1, 2, 3]) }],
      ['f', { dtype: 'F32', shape: [2], data: new Uint8Array(new Float32Array([1.5, -2]).buffer) }],
      ['ids', { dtype: 'I64', shape: [1], data: new Uint8Array(8) }],
      ['empty', { dtype: 'F32', shape: [0, 4], data: new Uint8Array(0) }],
    ]);
    writeSafetensors(file, odd);
    const ck = await openSafetensors(file);
    expect(ck.tensors.get('ids')).toEqual({ dtype: 'I64', shape: [1] });
    expect(Array.from(ck.get('f'))).toEqual([1.5, -2]);
    expect(ck.get('empty').length).toBe(0);
    expect(() => ck.get('ids')).toThrow(/'ids' has dtype I64; only F32, BF16 and F16/);
    ck.close();
  });

  test('opening maps and does not read: 256 MB sparse tensor', async () => {
    const file = path.join(root, 'big.safetensors');
    const bytes = 256 * 2 ** 20;
    const header = { big: { dtype: 'BF16', shape: [bytes / 2], data_offsets: [0, bytes] } };
    fs.writeFileSync(file, safetensorsBytes(header, []));
    fs.truncateSync(file, fs.statSync(file).size + bytes); // a hole: no disk used
    const rss0 = process.memoryUsage().rss;
    const t0 = performance.now();
    const ck = await openSafetensors(file);
    const big = ck.get('big');
    const ms = performance.now() - t0;
    const grown = process.memoryUsage().rss - rss0;
    expect(big.length).toBe(bytes / 2);
    expect(big[bytes / 2 - 1]).toBe(0);
    // Reading the data (what mapping avoids) is timed in this run: on a loaded machine a stall of the
    // process may pass 200 ms, while a read then takes longer still.
    const fd = fs.openSync(file, 'r');
    const chunk = Buffer.alloc(16 * 2 ** 20);
    const r0 = performance.now();
    for (let pos = 0, n = 1; n > 0; pos += n) n = fs.readSync(fd, chunk, 0, chunk.length, pos);
    const readMs = performance.now() - r0;
    fs.closeSync(fd);
    expect(ms).toBeLessThan(Math.max(200, readMs / 2));
    expect(grown).toBeLessThan(20 * 2 ** 20);
    ck.close();
  });
});

describe('broken and hostile checkpoints: ERR_MOE_CHECKPOINT, never a crash', () => {
  let good: Map<string, RawTensor>;
  let goodHeader: Header;
  const gateName = 'model.layers.0.block_sparse_moe.gate.weight';
  const w2Name = 'model.layers.0.block_sparse_moe.experts.1.w2.weight';

  beforeAll(() => {
    good = moeTensors(bf16, 0);
    goodHeader = headerFor(good);
  });

  /** Writes a single-file checkpoint with config.json; returns the .safetensors path. */
  function write(name: string, bytes: Buffer | ((good: Buffer) => Buffer)): string {
    const dir = path.join(root, 'bad', name);
    fs.mkdirSync(dir, { recursive: true });
    fs.copyFileSync(path.join(bf16.dir, 'config.json'), path.join(dir, 'config.json'));
    const file = path.join(dir, 'model.safetensors');
    const base = safetensorsBytes(
      goodHeader,
      [...good.values()].map((t) => t.data),
    );
    fs.writeFileSync(file, typeof bytes === 'function' ? bytes(base) : bytes);
    return file;
  }

  type HeaderJson = Record<string, { dtype: string; shape: unknown[]; data_offsets: number[] }>;
  function withHeader(edit: (h: HeaderJson) => void): Buffer {
    const h = JSON.parse(JSON.stringify(goodHeader)) as HeaderJson;
    edit(h);
    return safetensorsBytes(
      h,
      [...good.values()].map((t) => t.data),
    );
  }

  const both = async (file: string, ...patterns: (string | RegExp)[]) => {
    await expectCheckpointError(openSafetensors(file), file, ...patterns);
    await expectCheckpointError(MoeLayer.fromSafetensors(file, { layer: 0 }), file, ...patterns);
  };

  test('the good file loads', async () => {
    checkLayer(
      await MoeLayer.fromSafetensors(
        write('good', (b) => b),
        { layer: 0 },
      ),
      bf16,
      0,
      1e-2,
    );
  });

  test('truncated file', async () => {
    await both(
      write('trunc-data', (b) => b.subarray(0, b.length - 100)),
      /pass the end of the data section/,
      'truncated',
    );
    await both(
      write('trunc-header', (b) => b.subarray(0, 200)),
      /header length \d+ passes the end of the file \(200 bytes\)/,
    );
    await both(
      write('trunc-4', (b) => b.subarray(0, 4)),
      /4 bytes, too few for a safetensors header/,
    );
    await both(write('empty', Buffer.alloc(0)), /0 bytes, too few/);
  });

  test('header length huge', async () => {
    await both(
      write('huge', (b) => {
        const c = Buffer.from(b);
        c.writeBigUInt64LE(2n ** 63n + 5n);
        return c;
      }),
      /header length 9223372036854775813 is over the 100 MiB limit/,
    );
    await both(
      write('big', (b) => {
        const c = Buffer.from(b);
        c.writeBigUInt64LE(BigInt(b.length));
        return c;
      }),
      /passes the end of the file/,
    );
  });

  test('header not JSON', async () => {
    await both(
      write('notjson', (b) => {
        const c = Buffer.from(b);
        c.fill(0x7b, 8, 40);
        return c;
      }),
      /header is not valid JSON/,
    );
    await both(
      write('notutf8', (b) => {
        const c = Buffer.from(b);
        c[9] = 0xff;
        return c;
      }),
      /header is not valid JSON/,
    );
    await both(write('array', safetensorsBytes([1, 2] as unknown as Header, [])), /not a JSON object/);
  });

  test('offsets past the end, backwards, overlapping', async () => {
    await both(
      write(
        'past',
        withHeader((h) => {
          h[w2Name].data_offsets[1] += 1e9;
        }),
      ),
      `tensor '${w2Name}'`,
      /pass the end of the data section/,
    );
    await both(
      write(
        'backwards',
        withHeader((h) => {
          h[w2Name].data_offsets = [10, 2];
        }),
      ),
      `tensor '${w2Name}'`,
      /run backwards/,
    );
    await both(
      write(
        'overlap',
        withHeader((h) => {
          h[w2Name].data_offsets = h[gateName].data_offsets.slice();
          h[w2Name].shape = h[gateName].shape;
        }),
      ),
      /overlap/,
    );
    await both(
      write(
        'negative',
        withHeader((h) => {
          h[w2Name].data_offsets = [-2, 6];
        }),
      ),
      /data_offsets must be two integers >= 0/,
    );
  });

  test('shape and size mismatch', async () => {
    await both(
      write(
        'size',
        withHeader((h) => {
          h[w2Name].shape = [32, 47];
        }),
      ),
      `tensor '${w2Name}'`,
      /shape \[32, 47\] of BF16 needs 3008 bytes.*hold 3072/,
    );
    await both(
      write(
        'shape',
        withHeader((h) => {
          h[w2Name].shape = [32, 'x'];
        }),
      ),
      /shape must be a list of integers/,
    );
    // Consistent in the file, wrong for the layer: fromSafetensors names expected and actual shapes.
    const file = write(
      'layer-shape',
      withHeader((h) => {
        h[w2Name].shape = [48, 32];
      }),
    );
    await expectCheckpointError(
      MoeLayer.fromSafetensors(file, { layer: 0 }),
      `'${w2Name}' has shape [48, 32], expected [32, 48]`,
    );
  });

  test('missing tensor', async () => {
    const file = write(
      'missing',
      withHeader((h) => {
        delete h[w2Name];
      }),
    );
    await expectCheckpointError(MoeLayer.fromSafetensors(file, { layer: 0 }), file, `tensor '${w2Name}' not found`);
  });

  test('unknown dtype, and mixed dtypes among experts', async () => {
    await both(
      write(
        'dtype',
        withHeader((h) => {
          h[w2Name].dtype = 'Q4_K';
        }),
      ),
      `tensor '${w2Name}'`,
      /unknown dtype "Q4_K"/,
    );
    const file = write(
      'mixed',
      withHeader((h) => {
        h[w2Name].dtype = 'F16';
      }),
    );
    await expectCheckpointError(
      MoeLayer.fromSafetensors(file, { layer: 0 }),
      /has dtype F16 but .* has BF16: the experts must share one dtype/,
    );
  });

  test('index: missing shard, pointing outside, not an index', async () => {
    const dir = path.join(root, 'bad', 'index');
    writeTinyMixtral(dir, 'BF16');
    const index = path.join(dir, 'model.safetensors.index.json');
    const json = JSON.parse(fs.readFileSync(index, 'utf8'));
    fs.rmSync(path.join(dir, 'model-00002-of-00002.safetensors'));
    await expectCheckpointError(
      MoeLayer.fromSafetensors(dir, { layer: 1 }),
      'model-00002-of-00002.safetensors',
      /cannot open.*listed in .*index\.json.*ENOENT/,
    );
    await expectCheckpointError(openSafetensors(dir), 'model-00002-of-00002.safetensors', /ENOENT/);
    // Layer 0 lives in the shard that is there: it still loads.
    checkLayer(await MoeLayer.fromSafetensors(dir, { layer: 0 }), bf16, 0, 1e-2);

    for (const outside of ['../model-00001-of-00002.safetensors', '/etc/passwd', 'sub/../../x.safetensors']) {
      fs.writeFileSync(index, JSON.stringify({ weight_map: { ...json.weight_map, [gateName]: outside } }));
      await expectCheckpointError(
        MoeLayer.fromSafetensors(dir, { layer: 0 }),
        index,
        `points to '${outside}', outside the index's folder`,
      );
    }
    fs.writeFileSync(index, JSON.stringify({ weights: {} }));
    await expectCheckpointError(openSafetensors(index), /not a safetensors index/);
    fs.writeFileSync(index, '{"weight_map": ');
    await expectCheckpointError(openSafetensors(index), /cannot read the checkpoint index/);
  });

  test('paths that are not checkpoints', async () => {
    await expectCheckpointError(openSafetensors(path.join(root, 'nope.safetensors')), /ENOENT/);
    const empty = path.join(root, 'bad', 'emptydir');
    fs.mkdirSync(empty, { recursive: true });
    await expectCheckpointError(
      MoeLayer.fromSafetensors(empty, { layer: 0 }),
      /no model\.safetensors\.index\.json, model\.safetensors or other/,
    );
    const two = path.join(root, 'bad', 'twofiles');
    fs.mkdirSync(two, { recursive: true });
    writeSafetensors(path.join(two, 'a.safetensors'), good);
    writeSafetensors(path.join(two, 'b.safetensors'), good);
    await expectCheckpointError(openSafetensors(two), /several \.safetensors files \(a\.safetensors, b\.safetensors\)/);
    const cfgDir = path.join(root, 'bad', 'badconfig');
    fs.mkdirSync(cfgDir, { recursive: true });
    writeSafetensors(path.join(cfgDir, 'model.safetensors'), good);
    fs.writeFileSync(path.join(cfgDir, 'config.json'), JSON.stringify({ hidden_size: 'big' }));
    await expectCheckpointError(MoeLayer.fromSafetensors(cfgDir, { layer: 0 }), /hidden_size must be an integer >= 1/);
    fs.writeFileSync(path.join(cfgDir, 'config.json'), JSON.stringify({ hidden_size: 64, num_experts_per_tok: 2 }));
    await expectCheckpointError(
      MoeLayer.fromSafetensors(cfgDir, { layer: 0 }),
      `'${gateName}' has shape [4, 32], expected [4, 64]`,
    );
  });

  test('random byte flips never crash', async () => {
    const base = safetensorsBytes(
      goodHeader,
      [...good.values()].map((t) => t.data),
    );
    const headerEnd = 8 + Number(base.readBigUInt64LE(0));
    const rand = rng(7);
    for (let i = 0; i < 60; i++) {
      const c = Buffer.from(base);
      for (let j = 0; j < 3; j++) c[Math.floor(rand() * headerEnd)] = Math.floor(rand() * 256);
      const file = write(`flip${i}`, c);
      try {
        const layer = await MoeLayer.fromSafetensors(file, { layer: 0 });
        layer.forwardSync(x);
        layer.dispose();
      } catch (err) {
        expect(err).toBeInstanceOf(Error);
        expect(['ERR_MOE_CHECKPOINT', 'ERR_MOE_SHAPE', 'ERR_OUT_OF_RANGE', 'ERR_INVALID_ARG_TYPE']).toContain(
          (err as { code?: string }).code,
        );
      }
    }
  });
});

describe('widening 16-bit tensors to float32', () => {
  /** The float32 bits of an IEEE half, built field by field (no float arithmetic). */
  function halfBits(h: number): number {
    const sign = (h & 0x8000) << 16;
    const exp = (h >> 10) & 0x1f;
    let man = h & 0x3ff;
    if (exp === 0x1f) return (sign | 0x7f800000 | (man << 13)) >>> 0;
    if (exp > 0) return (sign | ((exp - 15 + 127) << 23) | (man << 13)) >>> 0;
    if (man === 0) return sign >>> 0;
    let e = 127 - 15 + 1;
    while (!(man & 0x400)) {
      man <<= 1;
      e--;
    }
    return (sign | (e << 23) | ((man & 0x3ff) << 13)) >>> 0;
  }

  test('every F16 and BF16 bit pattern gives the exact float32 value', () => {
    const all = Uint16Array.from({ length: 65536 }, (_, i) => i);
    const f16Bits = new Uint32Array(widenToFloat32('F16', all).buffer);
    const bf16Bits = new Uint32Array(widenToFloat32('BF16', all).buffer);
    const wrong: string[] = [];
    for (let h = 0; h < 65536; h++) {
      const want = halfBits(h);
      const nan = (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0;
      // NaN payloads need not survive; NaN must stay NaN.
      const ok = nan ? (f16Bits[h] & 0x7f800000) === 0x7f800000 && (f16Bits[h] & 0x7fffff) !== 0 : f16Bits[h] === want;
      if (!ok) wrong.push(`F16 0x${h.toString(16)}: 0x${f16Bits[h].toString(16)}, want 0x${want.toString(16)}`);
      if (bf16Bits[h] !== (h << 16) >>> 0) wrong.push(`BF16 0x${h.toString(16)}: 0x${bf16Bits[h].toString(16)}`);
    }
    expect(wrong.slice(0, 5)).toEqual([]);
  });
});

describe('the native mapping (mapFile, mapFileAsync)', () => {
  test('maps a region, copy-on-write; empty files and ranges; errors name the path', async () => {
    const file = path.join(root, 'map.bin');
    fs.writeFileSync(file, 'hello mapped world');
    const b = binding();
    const whole = b.mapFile(file);
    expect(Buffer.from(whole).toString()).toBe('hello mapped world');
    const part = await b.mapFileAsync(file, 6, 6);
    expect(Buffer.from(part).toString()).toBe('mapped');
    new Uint8Array(part)[0] = 0x4d;
    expect(fs.readFileSync(file, 'utf8')).toBe('hello mapped world');
    expect(b.mapFile(file, 18).byteLength).toBe(0);
    const empty = path.join(root, 'empty.bin');
    fs.writeFileSync(empty, '');
    expect(b.mapFile(empty).byteLength).toBe(0);
    expect((await b.mapFileAsync(empty)).byteLength).toBe(0);
    const cases: [() => unknown, RegExp][] = [
      [() => b.mapFile(path.join(root, 'missing.bin')), /missing\.bin': No such file or directory \(ENOENT\)/],
      [() => b.mapFile(root), /Is a directory \(EISDIR\)/],
      [() => b.mapFile(file, 10, 100), /the range \[10, 110\) passes the end of the file \(18 bytes\)/],
    ];
    for (const [call, message] of cases)
      expect(call).toThrow(
        expect.objectContaining({ code: 'ERR_MOE_CHECKPOINT', message: expect.stringMatching(message) }),
      );
    await expect(b.mapFileAsync(file, 19)).rejects.toMatchObject({
      code: 'ERR_MOE_CHECKPOINT',
      message: expect.stringMatching(/passes the end/),
    });
    await expect(b.mapFileAsync(root)).rejects.toMatchObject({
      code: 'ERR_MOE_CHECKPOINT',
      message: expect.stringMatching(/EISDIR/),
    });
    // Native errors come from the main realm, not jest's: compare names.
    expect(() => b.mapFile(file, -1)).toThrow(expect.objectContaining({ name: 'RangeError' }));
    expect(() => b.mapFile(42 as unknown as string)).toThrow(expect.objectContaining({ name: 'TypeError' }));
  });

  test('dropPages gives back the resident pages of a mapping; its views read the file again; other arrays untouched', async () => {
    const file = path.join(root, 'drop.bin');
    const data = new Uint8Array(16 << 20);
    let x = 12345;
    for (let i = 0; i < data.length; i += 4) {
      x = (Math.imul(x, 1103515245) + 12345) >>> 0;
      data[i] = x >>> 24;
    }
    fs.writeFileSync(file, data);
    const b = binding();
    const view = new Uint8Array(await b.mapFileAsync(file, 4096)); // brought in
    const before = residentFileBytes();
    expect(b.dropPages(view)).toBe(process.platform !== 'win32');
    const after = residentFileBytes();
    if (before !== null && after !== null) expect(before - after).toBeGreaterThan(12 << 20);
    expect(Buffer.compare(Buffer.from(view.buffer), Buffer.from(data.buffer, 4096))).toBe(0);
    // Not mappings made here, or not a whole mapping: nothing done, the data intact.
    const own = Float32Array.from([1.5, -2, 3]);
    expect(b.dropPages(own)).toBe(false);
    expect(Array.from(own)).toEqual([1.5, -2, 3]);
    expect(b.dropPages(view.subarray(8192))).toBe(false);
    expect(b.dropPages(new Uint8Array(b.mapFile(file, 0, 0)))).toBe(false);
    for (const bad of [undefined, 42, view.buffer, {}])
      expect(() => b.dropPages(bad as unknown as Uint8Array)).toThrow(expect.objectContaining({ name: 'TypeError' }));
  });
});
