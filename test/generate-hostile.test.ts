/**
 * Bad input to generate / complete: each a TypeError or RangeError naming the argument, thrown before
 * anything is queued, while a stream already running goes on undisturbed and nothing is left behind in
 * the KV cache. Also a model disposed under a running generation, and a model without a tokenizer.
 */
import * as fs from 'fs';
import * as path from 'path';
import { Engine, EngineModel, Request } from '../lib/generate/engine';
import { checkSampling, Sampler } from '../lib/generate/sampling';
import { MoeError, MoeModel } from '../lib/index';
import type { GenerateOptions, Prompt } from '../lib/index';
import { parseDecoderConfig } from '../lib/model/config';
import { TextTokenizer } from '../lib/text/tokenizer';
import type { ModelSequence, StepEntry } from '../lib/model/model';
import { makeTempDir, removeTempDir } from './helpers/checkpoint';
import { randomTokens } from './helpers/model/compare';
import { writeRandomModel } from './helpers/model/random-model';
import { writeTokenizer } from './helpers/text/tokenizer-files';

let dir = '';
let withTokenizer = '';
let bare = '';
beforeAll(() => {
  dir = makeTempDir('generate-hostile');
  withTokenizer = writeRandomModel(path.join(dir, 'a'), { family: 'olmoe', seed: 31, gguf: false }).hfDir;
  writeTokenizer(withTokenizer, 'byte-level', 320);
  bare = writeRandomModel(path.join(dir, 'b'), { family: 'olmoe', seed: 31, gguf: false }).hfDir;
});
afterAll(() => removeTempDir(dir));

const P = [5, 6, 7];
const cases: [string, unknown, unknown, string, RegExp][] = [
  ['negative temperature', P, { temperature: -0.5 }, 'RangeError', /options\.temperature.*>= 0.*-0\.5/],
  ['NaN temperature', P, { temperature: NaN }, 'RangeError', /options\.temperature/],
  ['string temperature', P, { temperature: 'hot' }, 'TypeError', /options\.temperature must be a number/],
  ['topP 0', P, { topP: 0 }, 'RangeError', /options\.topP must be in \(0, 1\]/],
  ['topP above 1', P, { topP: 1.5 }, 'RangeError', /options\.topP/],
  ['fractional topK', P, { topK: 2.5 }, 'RangeError', /options\.topK must be an integer/],
  ['minP above 1', P, { minP: 2 }, 'RangeError', /options\.minP/],
  ['repetitionPenalty 0', P, { repetitionPenalty: 0 }, 'RangeError', /options\.repetitionPenalty/],
  ['negative seed', P, { seed: -1 }, 'RangeError', /options\.seed/],
  ['fractional maxTokens', P, { maxTokens: 2.5 }, 'RangeError', /options\.maxTokens must be an integer/],
  ['maxTokens 0', P, { maxTokens: 0 }, 'RangeError', /options\.maxTokens/],
  ['string maxTokens', P, { maxTokens: '5' }, 'TypeError', /options\.maxTokens must be a number/],
  ['empty stop string', P, { stop: ['ok', ''] }, 'RangeError', /options\.stop\[1\] must not be empty/],
  ['number stop', P, { stop: [5] }, 'TypeError', /options\.stop\[0\] must be a string/],
  ['bad signal', P, { signal: 'stop' }, 'TypeError', /options\.signal must be an AbortSignal/],
  ['options not an object', P, 5, 'TypeError', /options must be an object/],
  [
    'prompt longer than the context',
    randomTokens(65, 320, 1),
    {},
    'RangeError',
    /promptOrMessages holds 65 tokens.*context of 64/,
  ],
  ['token id out of range', [5, 320], {}, 'RangeError', /promptOrMessages\[1\] must be a token id in \[0, 320\)/],
  ['fractional token id', [5.5], {}, 'RangeError', /promptOrMessages\[0\]/],
  ['no tokens', [], {}, 'RangeError', /promptOrMessages gives no tokens/],
  ['empty text', '', {}, 'RangeError', /promptOrMessages gives no tokens/],
  ['a number', 42, {}, 'TypeError', /promptOrMessages must be a string, an array of/],
  ['a message without content', [{ role: 'user' }], {}, 'TypeError', /promptOrMessages\[0\] must be a \{ role/],
  [
    'a role the template refuses',
    [{ role: 'robot', content: 'hi' }],
    {},
    'RangeError',
    /promptOrMessages.*unknown role robot/,
  ],
  [
    'text longer than the context',
    'the quick brown fox '.repeat(20),
    {},
    'RangeError',
    /promptOrMessages holds \d+ tokens/,
  ],
];

describe('on a model with a running stream (maxSequences 1, 64 positions)', () => {
  let model: MoeModel;
  beforeAll(async () => {
    model = await MoeModel.load(withTokenizer, { maxSequences: 1, contextLength: 64 });
  });
  afterAll(() => model.dispose());

  test.each(cases)('%s: generate throws, complete rejects', async (_, prompt, options, name, message) => {
    const expected = expect.objectContaining({ name, message: expect.stringMatching(message) });
    expect(() => model.generate(prompt as Prompt, options as GenerateOptions)).toThrow(expected);
    await expect(model.complete(prompt as Prompt, options as GenerateOptions)).rejects.toEqual(expected);
  });

  test('a running stream is not disturbed by all of them, and nothing stays in the cache', async () => {
    const prompt = randomTokens(12, 320, 2);
    const alone = await model.complete(prompt, { temperature: 0.8, seed: 9, maxTokens: 20 });
    const pieces: number[] = [];
    for await (const piece of model.generate(prompt, { temperature: 0.8, seed: 9, maxTokens: 20 })) {
      pieces.push(piece.token);
      for (const [, p, o] of cases) {
        expect(() => model.generate(p as Prompt, o as GenerateOptions)).toThrow();
        await model.complete(p as Prompt, o as GenerateOptions).catch(() => undefined);
      }
    }
    expect(pieces).toEqual(alone.tokens);
    // The whole cache (one sequence of 64 positions) is free for the next request.
    const full = await model.complete(randomTokens(63, 320, 3), { temperature: 0, maxTokens: 2 });
    expect(full.tokens.length).toBe(1 + Number(full.tokens[0] !== 2));
  });
});

test('a text far longer than the context is refused from a prefix, not tokenized whole', async () => {
  const model = await MoeModel.load(withTokenizer, { contextLength: 64 });
  const encode = jest.spyOn(TextTokenizer.prototype, 'encode');
  try {
    const text = 'a megabyte of words, '.repeat(50000);
    for (const prompt of [text, [{ role: 'user', content: text }]] as Prompt[]) {
      encode.mockClear();
      expect(() => model.generate(prompt)).toThrow(
        expect.objectContaining({
          name: 'RangeError',
          message: expect.stringMatching(
            /^promptOrMessages holds more than \d+ tokens \(its first 512 characters give \d+\), more than the context of 64$/,
          ),
        }),
      );
      // One prefix of 8 characters a position was enough; the megabyte never reached the tokenizer.
      expect(encode.mock.calls.map(([t]) => t.length)).toEqual([512]);
    }
    // Up to the first prefix's length a text is tokenized whole, and its count is exact.
    expect(() => model.generate(text.slice(0, 500))).toThrow(
      /^promptOrMessages holds \d+ tokens, more than the context of 64$/,
    );
  } finally {
    encode.mockRestore();
    model.dispose();
  }
});

test('disposing the model under a running generation rejects it with ERR_MOE_DISPOSED', async () => {
  const model = await MoeModel.load(withTokenizer, { maxSequences: 2 });
  const running = model.complete(randomTokens(5, 320, 4), { maxTokens: 100, seed: 1 });
  const waiting = model.complete(randomTokens(5, 320, 5), { maxTokens: 100, seed: 2 });
  await new Promise((resolve) => setImmediate(resolve));
  model.dispose();
  await expect(running).rejects.toMatchObject({ code: 'ERR_MOE_DISPOSED' });
  await expect(waiting).rejects.toMatchObject({ code: 'ERR_MOE_DISPOSED' });
  expect(() => model.generate([5])).toThrow(expect.objectContaining({ code: 'ERR_MOE_DISPOSED' }));
  await expect(model.complete([5])).rejects.toMatchObject({ code: 'ERR_MOE_DISPOSED' });
});

test('aborts around a shared prompt: the waiters of an aborted request compute it themselves; nothing leaks', async () => {
  const model = await MoeModel.load(withTokenizer, { maxSequences: 4, contextLength: 640 });
  try {
    const prompt = randomTokens(600, 320, 40); // read in several steps
    const opts = { temperature: 0, maxTokens: 4, ignoreEos: true };
    const [first, waiter] = [new AbortController(), new AbortController()];
    const a = model.complete(prompt, { ...opts, signal: first.signal });
    const b = model.complete(prompt, { ...opts, signal: waiter.signal });
    const c = model.complete(prompt, opts);
    await new Promise((resolve) => setImmediate(resolve));
    // b and c wait for a to compute the prompt they share.
    expect(model.generationStats).toMatchObject({ running: 1, waiting: 2 });
    waiter.abort();
    first.abort();
    expect((await a).finishReason).toBe('abort');
    expect((await b).finishReason).toBe('abort');
    const result = await c;
    expect(result.finishReason).toBe('length');
    expect(result.usage.cachedPromptTokens).toBe(0); // an aborted sequence is freed, not kept
    const alone = await model.complete(prompt, { ...opts, promptLogprobs: true });
    expect(result.tokens).toEqual(alone.tokens);
    await model.logits([5]); // queued after the frees
    expect(model.generationStats).toMatchObject({ running: 0, waiting: 0 });
    expect(model.generationStats.freeCachePositions).toBe(model.nativeFreeCachePositions());
  } finally {
    model.dispose();
  }
});

test('without tokenizer.json: token ids generate (with empty text); text, messages and stop strings are refused', async () => {
  const model = await MoeModel.load(bare);
  try {
    const r = await model.complete([5, 6], { temperature: 0, maxTokens: 4 });
    expect(r.tokens.length).toBeGreaterThan(0);
    expect(r.text).toBe('');
    for (const [prompt, options] of [
      ['hello', {}],
      [[{ role: 'user', content: 'hi' }], {}],
      [[5], { stop: 'x' }],
    ] as [Prompt, GenerateOptions][]) {
      expect(() => model.generate(prompt, options)).toThrow(MoeError);
      expect(() => model.generate(prompt, options)).toThrow(/no tokenizer\.json/);
    }
  } finally {
    model.dispose();
  }
});

describe('failures inside the step loop end their own request only; the process lives on', () => {
  // A stand-in model (as test/generate-budget.test.ts uses): the logits of the second sequence it creates
  // are all `bad`; the others favour token 7.
  const config = parseDecoderConfig({
    architectures: ['MixtralForCausalLM'],
    hidden_size: 64,
    intermediate_size: 96,
    num_hidden_layers: 1,
    num_attention_heads: 4,
    num_key_value_heads: 2,
    num_local_experts: 4,
    num_experts_per_tok: 2,
    vocab_size: 32,
    eos_token_id: 31,
  });
  type Marked = ModelSequence & { poisoned?: boolean };
  function standIn(bad: number): { model: EngineModel; created: Marked[] } {
    const created: Marked[] = [];
    const model: EngineModel = {
      config,
      options: { contextLength: 256, maxSequences: 4, quantize: 'none', cacheTokens: 256 * 4 },
      cacheBlockTokens: 16,
      createSequence: () => {
        const s = { length: 0, poisoned: created.length === 1 } as Marked;
        created.push(s);
        return s;
      },
      async step(batch: readonly StepEntry[]) {
        for (const e of batch) e.sequence.length += e.tokens.length;
        await new Promise((r) => setImmediate(r));
        return batch.map((e) => {
          const logits = new Float32Array(config.vocabSize).fill(-1);
          logits[7] = 1;
          if ((e.sequence as Marked).poisoned) logits.fill(bad);
          return logits;
        });
      },
      freeSequence() {},
      async forkSequence(_: ModelSequence, n: number) {
        return { length: n } as ModelSequence;
      },
      async truncateSequence(s: ModelSequence, n: number) {
        s.length = n;
      },
    };
    return { model, created };
  }
  const request = (options: Record<string, unknown>, maxTokens: number) =>
    new Request([1, 2, 3], checkSampling('options', options), maxTokens, [], undefined, new Set([31]));
  async function outcome(r: Request): Promise<string> {
    try {
      for (;;) {
        const next = await r.next();
        if (next.done) return `${next.value.finishReason} ${next.value.tokens.join(',')}`;
      }
    } catch (err) {
      return `${(err as MoeError).code}`;
    }
  }

  test.each([
    ['NaN', 'greedy', NaN, { temperature: 0 }],
    ['NaN', 'sampled', NaN, { temperature: 0.8, seed: 3 }],
    ['+Infinity', 'greedy', Infinity, { temperature: 0 }],
    ['+Infinity', 'sampled', Infinity, { temperature: 1, topK: 5, seed: 4 }],
  ])('logits holding %s, %s: ERR_MOE_NUMERIC for that request, the others finish', async (_, __, bad, options) => {
    const { model, created } = standIn(bad);
    const engine = new Engine(model);
    const healthy = request({ temperature: 0 }, 6);
    const poisoned = request(options, 6);
    engine.submit(healthy);
    engine.submit(poisoned);
    expect(await Promise.all([outcome(healthy), outcome(poisoned)])).toEqual(['length 7,7,7,7,7,7', 'ERR_MOE_NUMERIC']);
    expect(created.map((c) => c.poisoned)).toEqual([false, true]);
    expect(engine.stats).toMatchObject({ running: 0, waiting: 0, kept: 1 }); // the failed sequence is not kept
  });

  test('-Infinity and NaN logits are tokens that cannot be picked; a row of nothing else cannot be sampled', () => {
    const row = new Float32Array(32).fill(-Infinity);
    row[9] = -50;
    row[4] = -60;
    row[0] = row[17] = NaN;
    for (const options of [{ temperature: 0 }, { temperature: 2, seed: 1 }, { temperature: 1, topP: 0.5, seed: 2 }]) {
      const sampler = new Sampler(checkSampling('options', options));
      for (let i = 0; i < 20; i++) expect([9, 4]).toContain(sampler.sample(row, [9]));
      for (const bad of [
        new Float32Array(32).fill(-Infinity),
        new Float32Array(32).fill(NaN),
        Float32Array.of(1, Infinity, 2),
      ])
        expect(() => sampler.sample(bad, [])).toThrow(expect.objectContaining({ code: 'ERR_MOE_NUMERIC' }));
    }
  });

  test("arrays the native sampler cannot take: an error naming them, and the sampler's history intact", () => {
    const logits = Float32Array.from({ length: 40 }, (_, i) => Math.sin(i * 1.7) * 3);
    const params = checkSampling('options', { temperature: 0, repetitionPenalty: 4 });
    const sampler = new Sampler(params);
    const history = [0, 5];
    const first = sampler.sample(logits, history);
    history.push(first);
    expect(() => sampler.sample(logits, history, [], new Uint8Array(39))).toThrow(/allowed must have 40 elements/);
    expect(() => sampler.sample(Float64Array.from(logits) as unknown as Float32Array, history)).toThrow(
      /logits must be a Float32Array/,
    );
    history.push(7);
    // What a fresh sampler makes of the whole history: the failed draws lost none of it.
    expect(sampler.sample(logits, history)).toBe(new Sampler(params).sample(logits, history.slice()));
  });

  test('next() called again before the last call settled: each gets the next piece, in order', async () => {
    const { model } = standIn(0);
    const engine = new Engine(model);
    const r = request({ temperature: 0 }, 3);
    engine.submit(r);
    const calls = [r.next(), r.next(), r.next(), r.next()];
    const got = await Promise.all(calls);
    expect(got.map((g) => (g.done ? `done ${g.value.finishReason}` : g.value.token))).toEqual([7, 7, 7, 'done length']);
  });

  test('a tokenizer that gives no id, or whose decoder throws: a clear error, the model still generates from ids', async () => {
    const noId = writeRandomModel(path.join(dir, 'no-id'), { family: 'olmoe', seed: 31, gguf: false }).hfDir;
    writeTokenizer(noId, 'byte-level', 320);
    const editTokenizer = (folder: string, edit: (t: Record<string, unknown>) => void) => {
      const file = path.join(folder, 'tokenizer.json');
      const t = JSON.parse(fs.readFileSync(file, 'utf8'));
      edit(t);
      fs.writeFileSync(file, JSON.stringify(t));
    };
    // A post-processor naming a special token the vocabulary does not have.
    editTokenizer(noId, (t) => {
      t.post_processor = {
        type: 'TemplateProcessing',
        single: [{ SpecialToken: { id: '<none>', type_id: 0 } }],
        pair: [],
        special_tokens: {},
      };
    });
    const throwing = writeRandomModel(path.join(dir, 'throwing'), { family: 'olmoe', seed: 31, gguf: false }).hfDir;
    writeTokenizer(throwing, 'byte-level', 320);
    editTokenizer(throwing, (t) => {
      t.decoder = { type: 'Sequence', decoders: [null] };
    });
    const a = await MoeModel.load(noId, { maxSequences: 2 });
    const b = await MoeModel.load(throwing, { maxSequences: 2 });
    try {
      const running = a.complete([5, 6, 7], { temperature: 0, maxTokens: 12 });
      expect(() => a.generate('hello')).toThrow(
        expect.objectContaining({
          code: 'ERR_MOE_CHECKPOINT',
          message: expect.stringMatching(/tokenizer\.json gave undefined at position 0/),
        }),
      );
      expect(() => a.tokenize('hello')).toThrow(expect.objectContaining({ code: 'ERR_MOE_CHECKPOINT' }));
      expect((await running).tokens).toHaveLength(12);
      // The decoder runs on each sampled token, inside the step loop: the request rejects with its error.
      await expect(b.complete([5, 6, 7], { temperature: 0, maxTokens: 4 })).rejects.toThrow();
      expect(await b.complete([5, 6, 7], { temperature: 0, maxTokens: 1 }).catch(() => null)).toBeNull();
    } finally {
      a.dispose();
      b.dispose();
    }
  });
});
