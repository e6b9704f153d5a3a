/**
 * MoeModel under hostile input: broken checkpoints (config and tensors that disagree, a missing
 * tensor, a truncated shard, an unknown architecture), bad tokens, too long a prompt, a disposed
 * model, concurrent calls and aborts. Each is a clear error (a TypeError or RangeError naming the
 * argument, or a MoeError with a stable code); repeated failures leak nothing; the model keeps working
 * and gives the same bits as before.
 */
import * as fs from 'fs';
import * as path from 'path';
import { AbortError, MoeError } from '../lib/errors';
import { MoeModel } from '../lib/model/model';
import { makeTempDir, RawTensor, removeTempDir, residentFileBytes, writeSafetensors } from './helpers/checkpoint';
import { firstBitDifference, randomTokens } from './helpers/model/compare';
import { RandomModel, writeRandomModel } from './helpers/model/random-model';

let dir = '';
let good: RandomModel;
let model: MoeModel;
let V = 0;
let prompt: number[] = [];
let expected: Float32Array;
const CONTEXT = 2048;

/** A copy of the good checkpoint in `name`, with config.json edited and tensors dropped or replaced. */
function broken(
  name: string,
  edit: { config?: (c: Record<string, unknown>) => void; tensors?: (t: Map<string, RawTensor>) => void },
): string {
  const out = path.join(dir, name);
  fs.mkdirSync(out, { recursive: true });
  const config = JSON.parse(fs.readFileSync(path.join(good.hfDir, 'config.json'), 'utf8'));
  edit.config?.(config);
  fs.writeFileSync(path.join(out, 'config.json'), JSON.stringify(config));
  const tensors = new Map<string, RawTensor>();
  for (const [n, t] of good.weights) {
    const f = Float32Array.from(t.values);
    tensors.set(n, { dtype: 'F32', shape: t.shape, data: new Uint8Array(f.buffer) });
  }
  edit.tensors?.(tensors);
  writeSafetensors(path.join(out, 'model.safetensors'), tensors);
  return out;
}

async function rejection(p: Promise<unknown>): Promise<Error & { code?: string }> {
  try {
    await p;
  } catch (err) {
    return err as Error & { code?: string };
  }
  throw new Error('expected a rejection');
}

/** Still usable: the same bits as before any failure. */
async function stillUsable(): Promise<void> {
  expect(firstBitDifference(await model.logits(prompt, { all: true }), expected)).toBe(-1);
}

beforeAll(async () => {
  dir = makeTempDir('fmoe-model-hostile-');
  good = writeRandomModel(path.join(dir, 'good'), { family: 'qwen2moe', dtype: 'float32', seed: 61, gguf: false });
  model = await MoeModel.load(good.hfDir, { contextLength: CONTEXT });
  V = model.config.vocabSize;
  prompt = randomTokens(20, V, 1);
  expected = await model.logits(prompt, { all: true });
});
afterAll(() => {
  model?.dispose();
  if (dir) removeTempDir(dir);
});

describe('broken checkpoints: MoeError ERR_MOE_CHECKPOINT naming what is wrong', () => {
  test('a tensor whose shape disagrees with config.json', async () => {
    const d = broken('shape', { config: (c) => (c.moe_intermediate_size = (c.moe_intermediate_size as number) + 1) });
    const err = await rejection(MoeModel.load(d));
    expect(err).toBeInstanceOf(MoeError);
    expect(err.code).toBe('ERR_MOE_CHECKPOINT');
    expect(err.message).toMatch(
      /model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight' has shape \[40, 96\], config\.json implies \[41, 96\]/,
    );
  });

  test('a missing tensor', async () => {
    const d = broken('missing', { tensors: (t) => t.delete('model.layers.1.self_attn.k_proj.bias') });
    const err = await rejection(MoeModel.load(d));
    expect([err.constructor, err.code]).toEqual([MoeError, 'ERR_MOE_CHECKPOINT']);
    expect(err.message).toMatch(/'model\.layers\.1\.self_attn\.k_proj\.bias' is missing/);
  });

  test('a config.json that claims far more layers or experts than the files hold', async () => {
    // Past the limits: refused as the config is read (listing a billion layers' tensors ran V8 out of
    // memory and aborted the process).
    for (const [key, value, range] of [
      ['num_hidden_layers', 1e9, /'num_hidden_layers' must be an integer in \[1, 4096\], got 1000000000/],
      ['num_experts', 2 ** 31, /'num_experts' must be an integer in \[0, 65536\], got 2147483648/],
    ] as const) {
      const err = await rejection(MoeModel.load(broken(`claims-${key}`, { config: (c) => (c[key] = value) })));
      expect([err.constructor, err.code]).toEqual([MoeError, 'ERR_MOE_CHECKPOINT']);
      expect(err.message).toMatch(range);
    }
    // Within them: the first tensor missing, found without listing the rest.
    const d = broken('claims-layers', { config: (c) => (c.num_hidden_layers = 4000) });
    const err = await rejection(MoeModel.load(d));
    expect([err.constructor, err.code]).toEqual([MoeError, 'ERR_MOE_CHECKPOINT']);
    expect(err.message).toMatch(/'model\.layers\.2\.input_layernorm\.weight' is missing/);
  });

  test('a truncated shard', async () => {
    const d = broken('truncated', {});
    const file = path.join(d, 'model.safetensors');
    fs.truncateSync(file, fs.statSync(file).size - 100);
    const err = await rejection(MoeModel.load(d));
    expect([err.constructor, err.code]).toEqual([MoeError, 'ERR_MOE_CHECKPOINT']);
    expect(err.message).toMatch(/model\.safetensors/);
  });

  test('an unknown architecture: the error lists the supported ones', async () => {
    const d = broken('arch', { config: (c) => (c.architectures = ['LlamaForCausalLM']) });
    const err = await rejection(MoeModel.load(d));
    expect([err.constructor, err.code]).toEqual([MoeError, 'ERR_MOE_CHECKPOINT']);
    expect(err.message).toMatch(
      /LlamaForCausalLM.*MixtralForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM, Qwen2MoeForCausalLM/,
    );
  });
});

describe('bad arguments: TypeError or RangeError naming the argument', () => {
  test('token ids out of range, or not ids', async () => {
    await expect(model.logits([5, V])).rejects.toThrow(RangeError);
    await expect(model.logits([5, V])).rejects.toThrow(`tokens[1] must be a token id in [0, ${V}), got number ${V}`);
    await expect(model.logits([-1])).rejects.toThrow(/tokens\[0\] must be a token id/);
    await expect(model.logits([1.5])).rejects.toThrow(/tokens\[0\] must be a token id/);
    await expect(model.logits('abc' as never)).rejects.toThrow(TypeError);
    await expect(model.logits([])).rejects.toThrow(/tokens must hold at least one token/);
    await expect(model.logits([5], { signal: {} as never })).rejects.toThrow(/options\.signal must be an AbortSignal/);
    // Array-likes whose length is no length, or far beyond their ids: named, and nothing allocated for them.
    await expect(model.logits({ length: -5 } as never)).rejects.toThrow(
      'tokens.length must be a non-negative integer, got -5',
    );
    expect(() => model.detokenize({ length: Infinity } as never)).toThrow(
      expect.objectContaining({
        name: 'RangeError',
        message: 'ids.length must be a non-negative integer, got Infinity',
      }),
    );
    expect(() => model.detokenize({ length: 2 ** 40, 0: 5 } as never)).toThrow(/ids\[1\] must be a token id/);
    await stillUsable();
  });

  test('a prompt longer than the context', async () => {
    const err = await rejection(model.logits(new Array(CONTEXT + 1).fill(5)));
    expect(err).toBeInstanceOf(RangeError);
    expect(err.message).toBe(`tokens holds ${CONTEXT + 1} tokens, more than the context of ${CONTEXT}`);
    await stillUsable();
  });

  test('bad load options', async () => {
    await expect(MoeModel.load(good.hfDir, { quantize: 'int3' as never })).rejects.toThrow(/options\.quantize/);
    await expect(MoeModel.load(good.hfDir, { kvCacheDtype: 'int8' as never })).rejects.toThrow(RangeError);
    await expect(MoeModel.load(good.hfDir, { contextLength: 0 })).rejects.toThrow(/options\.contextLength/);
    await expect(MoeModel.load(42 as never)).rejects.toThrow(TypeError);
    // More cache blocks than the native side takes: named by the two options that make them.
    await expect(MoeModel.load(good.hfDir, { contextLength: 2 ** 24, maxSequences: 4096 })).rejects.toThrow(
      'options.contextLength x options.maxSequences must be at most 2^34 positions (2^30 cache blocks of 16), got 16777216 x 4096',
    );
  });

  test('a KV cache bigger than the memory: ERR_MOE_OUT_OF_MEMORY before its block lists are made', async () => {
    // 2^30 blocks, terabytes of cache: the lists of free blocks and holders alone took 8 GB (and tens of
    // seconds) before the refusal.
    const rss0 = process.memoryUsage().rss;
    let peak = rss0;
    const sample = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 1);
    const err = await rejection(MoeModel.load(good.hfDir, { contextLength: 2 ** 22, maxSequences: 4096 }));
    clearInterval(sample);
    peak = Math.max(peak, process.memoryUsage().rss);
    expect([err.constructor, err.code]).toEqual([MoeError, 'ERR_MOE_OUT_OF_MEMORY']);
    expect(err.message).toMatch(/^the KV cache \(contextLength x maxSequences positions\) needs \d+ MiB/);
    expect(err.message).toMatch(/a smaller contextLength or maxSequences/);
    expect(peak - rss0).toBeLessThan(256 << 20);
    await stillUsable();
  });
});

describe('concurrency, aborts and disposal', () => {
  test('concurrent logits() calls queue and give the results of the same calls one at a time', async () => {
    const prompts = [prompt, randomTokens(600, V, 2), randomTokens(3, V, 3), prompt];
    const together = await Promise.all(prompts.map((p) => model.logits(p, { all: true })));
    for (const [i, p] of prompts.entries())
      expect([i, firstBitDifference(together[i], await model.logits(p, { all: true }))]).toEqual([i, -1]);
    expect(firstBitDifference(together[0], expected)).toBe(-1);
  });

  test('abort during load: AbortError, and a later load works', async () => {
    const controller = new AbortController();
    let calls = 0;
    const err = await rejection(
      MoeModel.load(good.hfDir, {
        signal: controller.signal,
        onProgress: () => ++calls === 5 && controller.abort('stop'),
      }),
    );
    expect(err).toBeInstanceOf(AbortError);
    expect(calls).toBe(5);
    const before = new AbortController();
    before.abort();
    await expect(MoeModel.load(good.hfDir, { signal: before.signal })).rejects.toThrow(AbortError);
  });

  test('abort during logits: AbortError, in the queue, between chunks or inside a step', async () => {
    const long = randomTokens(CONTEXT, V, 4);
    for (const when of ['queued', 'sync', 'immediate'] as const) {
      const controller = new AbortController();
      const ahead = when === 'queued' ? model.logits(long) : undefined;
      const pending = model.logits(long, { signal: controller.signal });
      // Aborted synchronously, the call never starts a step; on the next turn of the event loop, the
      // first chunk's step is running (it cannot have ended: every chunk takes a turn).
      if (when === 'immediate') setImmediate(() => controller.abort());
      else controller.abort();
      await ahead;
      const err = await rejection(pending);
      expect([when, err.constructor]).toEqual([when, AbortError]);
    }
    await stillUsable();
  });

  test('a disposed model: MoeError ERR_MOE_DISPOSED; a call queued before dispose() rejects with it', async () => {
    const m = await MoeModel.load(good.hfDir, { contextLength: 64 });
    const queued = m.logits(prompt);
    m.dispose();
    const err = await rejection(queued);
    expect([err.constructor, err.code]).toEqual([MoeError, 'ERR_MOE_DISPOSED']);
    await expect(m.logits(prompt)).rejects.toMatchObject({ code: 'ERR_MOE_DISPOSED' });
    expect(() => m.createSequence()).toThrow(expect.objectContaining({ code: 'ERR_MOE_DISPOSED' }));
    expect(m.nativeBytes).toBe(0);
    m.dispose(); // twice: nothing
  });

  test('a loaded model holds no second copy of the checkpoint; dispose() when idle frees at once', async () => {
    // About 25 MB of float32 experts, and the embedding read twice (tied to the LM head).
    const big = writeRandomModel(path.join(dir, 'big'), {
      family: 'qwen3moe',
      dtype: 'float32',
      seed: 63,
      expertFfn: 2048,
      tieWordEmbeddings: true,
      gguf: false,
    });
    const fileBytes = fs
      .readdirSync(big.hfDir)
      .filter((f) => f.endsWith('.safetensors'))
      .reduce((a, f) => a + fs.statSync(path.join(big.hfDir, f)).size, 0);
    expect(fileBytes).toBeGreaterThan(20e6);
    const before = residentFileBytes();
    const m = await MoeModel.load(big.hfDir, { contextLength: 64 });
    const after = residentFileBytes();
    // Each tensor's mapping is read while it is packed, then its pages are given back: without that
    // they stay resident until the garbage collector unmaps them, a second copy of every weight.
    if (before !== null && after !== null) expect(after - before).toBeLessThan(fileBytes / 4);
    const tokens = randomTokens(9, m.config.vocabSize, 7);
    const first = await m.logits(tokens, { all: true });
    const bytes = m.nativeBytes,
      rss = process.memoryUsage().rss;
    expect(bytes).toBeGreaterThan(fileBytes / 2);
    m.dispose();
    // Nothing ran or waited: the native memory went back before this line.
    expect(rss - process.memoryUsage().rss).toBeGreaterThan(bytes * 0.8);
    // The dropped pages read the file again: a second load gives the same bits.
    const again = await MoeModel.load(big.hfDir, { contextLength: 64 });
    const running = again.logits(tokens, { all: true });
    await new Promise(setImmediate); // its step is on a worker thread now
    const rss2 = process.memoryUsage().rss;
    again.dispose(); // freed once the running call has ended, which it does normally
    expect(rss2 - process.memoryUsage().rss).toBeLessThan(bytes * 0.2);
    expect(firstBitDifference(await running, first)).toBe(-1);
  });

  test('repeated failures leak nothing: resident memory stays flat, the model gives the same bits', async () => {
    const shape = path.join(dir, 'shape');
    // Wide experts (about 4 MB of weights) so that a leaked load would show clearly.
    const wide = writeRandomModel(path.join(dir, 'wide'), {
      family: 'qwen2moe',
      dtype: 'float32',
      seed: 62,
      expertFfn: 400,
      gguf: false,
    });
    const cycle = async () => {
      const controller = new AbortController();
      await rejection(
        MoeModel.load(wide.hfDir, {
          signal: controller.signal,
          onProgress: (p) => p.tensors > 0.8 * p.totalTensors && controller.abort(),
        }),
      );
      await rejection(MoeModel.load(shape));
      await rejection(model.logits([...prompt, V]));
      const c2 = new AbortController();
      const p = model.logits(randomTokens(700, V, 5), { signal: c2.signal });
      setImmediate(() => c2.abort());
      await rejection(p);
      const s = model.createSequence();
      await rejection(model.step([{ sequence: s, tokens: new Array(CONTEXT + 1).fill(5) }]));
      s.free();
    };
    for (let i = 0; i < 5; i++) await cycle();
    const outsideHeap = () => process.memoryUsage().rss - process.memoryUsage().heapTotal; // the JS heap grows on its own
    const rss0 = outsideHeap(),
      bytes0 = model.nativeBytes;
    for (let i = 0; i < 40; i++) await cycle();
    const grown = outsideHeap() - rss0;
    if (process.env.FUSED_MOE_TEST_TIMING)
      console.log(`resident memory grew by ${(grown / 2 ** 20).toFixed(1)} MiB over 40 cycles`);
    // Each aborted load had packed about 4 MB of weights: 40 leaked would be 160 MB.
    expect(grown).toBeLessThan(24 << 20);
    expect(model.nativeBytes).toBe(bytes0);
    await stillUsable();
  });
});
