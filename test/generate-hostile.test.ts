/**
 * Bad input to generate / complete: each a TypeError or RangeError naming the argument, thrown before
 * anything is queued, while a stream already running goes on undisturbed and nothing is left behind in
 * the KV cache. Also a model disposed under a running generation, and a model without a tokenizer.
 */
import * as path from 'path';
import { MoeError, MoeModel } from '../lib/index';
import type { GenerateOptions, Prompt } from '../lib/index';
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
