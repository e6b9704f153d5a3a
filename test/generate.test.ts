/**
 * model.generate / model.complete on tiny random checkpoints with real tokenizers: greedy decoding
 * against argmax over model.logits step by step; seeded sampling that gives the same tokens alone
 * and among other streams; batch invariance of whole generations; stop strings, maxTokens, EOS;
 * aborts that free their sequence; waiting in order; prefix reuse across the turns of a chat.
 */
import * as path from 'path';
import { GenerationPiece, GenerationResult, LoadOptions, MoeModel } from '../lib/index';
import { Engine } from '../lib/generate/engine';
import { makeTempDir, removeTempDir } from './helpers/checkpoint';
import { firstBitDifference, randomTokens } from './helpers/model/compare';
import { writeRandomModel } from './helpers/model/random-model';
import { Template } from '@huggingface/jinja';
import { TOOLS_TEMPLATE, writeTokenizer } from './helpers/text/tokenizer-files';

let dir = '';
let byteLevelDir = '';
let sentencePieceDir = '';
beforeAll(() => {
  dir = makeTempDir('generate');
  byteLevelDir = writeRandomModel(path.join(dir, 'mixtral'), { family: 'mixtral', seed: 21, gguf: false }).hfDir;
  writeTokenizer(byteLevelDir, 'byte-level', 320);
  sentencePieceDir = writeRandomModel(path.join(dir, 'qwen3moe'), { family: 'qwen3moe', seed: 22, gguf: false }).hfDir;
  writeTokenizer(sentencePieceDir, 'sentencepiece', 384);
});
afterAll(() => removeTempDir(dir));

const EOS = 2;

/** Greedy tokens by full recomputation: argmax (lowest id on ties) of model.logits over the sequence so far. */
async function argmaxChain(model: MoeModel, prompt: number[], steps: number): Promise<number[]> {
  const out: number[] = [];
  const seq = prompt.slice();
  for (let s = 0; s < steps; s++) {
    const logits = await model.logits(seq);
    let best = 0;
    for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
    out.push(best);
    if (best === EOS) break;
    seq.push(best);
  }
  return out;
}

/** Runs fn on a model of the byte-level checkpoint loaded with `options`, disposed after. */
async function withModel(options: LoadOptions, fn: (model: MoeModel) => Promise<void>): Promise<void> {
  const model = await MoeModel.load(byteLevelDir, options);
  try {
    await fn(model);
  } finally {
    model.dispose();
  }
}

async function collect(
  gen: AsyncIterator<GenerationPiece, GenerationResult>,
): Promise<{ pieces: GenerationPiece[]; result: GenerationResult }> {
  const pieces: GenerationPiece[] = [];
  for (;;) {
    const r = await gen.next();
    if (r.done) return { pieces, result: r.value };
    pieces.push(r.value);
  }
}

describe('byte-level model, 8 sequences', () => {
  let model: MoeModel;
  beforeAll(async () => {
    model = await MoeModel.load(byteLevelDir, { maxSequences: 8 });
  });
  afterAll(() => model.dispose());

  test('temperature 0 gives the tokens of argmax over model.logits, step by step', async () => {
    for (const [n, seed] of [
      [1, 1],
      [7, 2],
      [33, 3],
    ]) {
      const prompt = randomTokens(n, 320, seed);
      const result = await model.complete(prompt, { temperature: 0, maxTokens: 12 });
      const expected = await argmaxChain(model, prompt, 12);
      expect(result.tokens).toEqual(expected);
      expect(result.finishReason).toBe(expected[expected.length - 1] === EOS ? 'stop' : 'length');
      expect(result.usage).toMatchObject({
        promptTokens: n,
        completionTokens: expected.length,
        totalTokens: n + expected.length,
      });
    }
  });

  test('presence and frequency penalties count the output only, the bias applies: against model.logits', async () => {
    const prompt = randomTokens(9, 320, 11);
    const bias: Record<number, number> = { [prompt[0]]: 3, 17: -100 }; // raise a prompt token, all but ban another
    const [presence, frequency, steps] = [0.8, 0.6, 16];
    const result = await model.complete(prompt, {
      temperature: 0,
      maxTokens: steps,
      presencePenalty: presence,
      frequencyPenalty: frequency,
      logitBias: bias,
      ignoreEos: true,
    });
    // The same choices from full recomputations, adjusted here in float64: bias, then the penalties
    // over the tokens generated so far (the prompt's own tokens are not penalised).
    const out: number[] = [];
    for (let s = 0; s < steps; s++) {
      const x = Float64Array.from(await model.logits([...prompt, ...out]));
      for (const [id, b] of Object.entries(bias)) x[Number(id)] += b;
      for (const t of new Set(out)) x[t] -= presence + frequency * out.filter((o) => o === t).length;
      let best = 0;
      for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
      out.push(best);
    }
    expect(result.tokens).toEqual(out);
    expect(out).not.toContain(17);
    const plain = await model.complete(prompt, { temperature: 0, maxTokens: steps, ignoreEos: true });
    expect(plain.tokens).not.toEqual(out); // the adjustments did change the greedy choice
  });

  test('log probabilities are the float64 log-softmax of model.logits, whatever the sampling did', async () => {
    const prompt = randomTokens(6, 320, 12);
    const top = 4;
    const options = { temperature: 1.3, seed: 9, frequencyPenalty: 1, logitBias: { 5: 4 }, maxTokens: 10 };
    const { pieces, result } = await collect(model.generate(prompt, { ...options, logprobs: true, topLogprobs: top }));
    // Asking for them changes nothing else.
    expect(result.tokens).toEqual((await model.complete(prompt, options)).tokens);
    expect(result.logprobs!.map((e) => e.token)).toEqual(result.tokens);
    for (let s = 0; s < result.tokens.length; s++) {
      const x = Float64Array.from(await model.logits([...prompt, ...result.tokens.slice(0, s)]));
      const m = Math.max(...x);
      const logZ = m + Math.log(x.reduce((sum, v) => sum + Math.exp(v - m), 0));
      const ranked = Array.from(x.keys()).sort((a, b) => x[b] - x[a] || a - b);
      const entry = result.logprobs![s];
      expect(Math.abs(entry.logprob - (x[entry.token] - logZ))).toBeLessThan(1e-6);
      expect(entry.topLogprobs.map((t) => t.token)).toEqual(ranked.slice(0, top));
      for (const t of entry.topLogprobs) expect(Math.abs(t.logprob - (x[t.token] - logZ))).toBeLessThan(1e-6);
      expect(pieces[s]).toMatchObject({ token: entry.token, logprob: entry.logprob, topLogprobs: entry.topLogprobs });
    }
    const plain = await model.complete(prompt, { ...options, logprobs: true });
    expect(plain.logprobs!.every((e) => e.topLogprobs.length === 0)).toBe(true);
    expect((await model.complete(prompt, options)).logprobs).toBeUndefined();
    expect(() => model.generate(prompt, { topLogprobs: 2 })).toThrow(
      /options\.topLogprobs needs options\.logprobs or options\.promptLogprobs: true/,
    );
  });

  test('prompt log probabilities: each prompt token under the logits of the positions before it', async () => {
    const prompt = randomTokens(75, 320, 13); // three chunks of scored prompt tokens
    const top = 3;
    const other = model.complete(randomTokens(20, 320, 14), { temperature: 0, maxTokens: 30 });
    const { pieces, result } = await collect(
      model.generate(prompt, { temperature: 0, maxTokens: 3, promptLogprobs: true, topLogprobs: top }),
    );
    await other;
    const all = await model.logits(prompt, { all: true });
    const V = 320;
    expect(result.promptLogprobs).toHaveLength(prompt.length);
    expect(result.promptLogprobs![0]).toEqual({ token: prompt[0], logprob: null, topLogprobs: [] });
    for (let p = 1; p < prompt.length; p++) {
      const x = Float64Array.from(all.subarray((p - 1) * V, p * V));
      const m = Math.max(...x);
      const logZ = m + Math.log(x.reduce((sum, v) => sum + Math.exp(v - m), 0));
      const ranked = Array.from(x.keys()).sort((a, b) => x[b] - x[a] || a - b);
      const entry = result.promptLogprobs![p];
      expect(entry.token).toBe(prompt[p]);
      expect(Math.abs(entry.logprob! - (x[prompt[p]] - logZ))).toBeLessThan(1e-6);
      expect(entry.topLogprobs.map((t) => t.token)).toEqual(ranked.slice(0, top));
    }
    expect(pieces[0].promptLogprobs).toBe(result.promptLogprobs);
    expect(pieces.slice(1).every((p) => p.promptLogprobs === undefined)).toBe(true);
    expect(result.logprobs).toBeUndefined();
    // The same tokens as without scoring; the prompt was computed whole, though a prefix was kept.
    expect(result.tokens).toEqual((await model.complete(prompt, { temperature: 0, maxTokens: 3 })).tokens);
    const again = await model.complete(prompt, { temperature: 0, maxTokens: 3, promptLogprobs: true });
    expect(again.usage.cachedPromptTokens).toBe(0);
    expect(again.promptLogprobs!.map((e) => e.logprob)).toEqual(result.promptLogprobs!.map((e) => e.logprob));
  });

  test('streamed pieces join to the text, which is the decode of the tokens', async () => {
    const { pieces, result } = await collect(
      model.generate('the café 日本', { temperature: 1.2, seed: 5, maxTokens: 40 }),
    );
    expect(pieces.map((p) => p.token)).toEqual(result.tokens);
    expect(pieces.map((p) => p.text).join('')).toBe(result.text);
    expect(result.text).toBe(model.detokenize(result.tokens));
    expect(result.usage.promptTokens).toBe(model.tokenize('the café 日本').length);
  });

  test('the same seed gives the same tokens alone and among 8 concurrent streams', async () => {
    const options = { temperature: 0.9, topK: 40, topP: 0.95, minP: 0.01, repetitionPenalty: 1.1, maxTokens: 20 };
    const prompt = 'déjà vu';
    const alone = await model.complete(prompt, { ...options, seed: 1234 });
    const others = Array.from({ length: 7 }, (_, i) =>
      model.complete(i % 2 ? randomTokens(5 + i * 9, 320, 40 + i) : `prompt ${i} 🙂`, { ...options, seed: i }),
    );
    const together = await Promise.all([model.complete(prompt, { ...options, seed: 1234 }), ...others]);
    expect(together[0].tokens).toEqual(alone.tokens);
    expect(together[0].text).toBe(alone.text);
    // The seed matters: other seeds on the same prompt give other tokens.
    const reseeded = await Promise.all([1, 2, 3].map((seed) => model.complete(prompt, { ...options, seed })));
    expect(reseeded.some((r) => r.tokens.join() !== alone.tokens.join())).toBe(true);
  });

  test('a batch of 8 different prompts gives each the tokens it gets alone (greedy and sampled)', async () => {
    const prompts = Array.from({ length: 8 }, (_, i) => randomTokens(1 + i * 11, 320, 60 + i));
    const opts = (i: number) =>
      i % 2 ? { temperature: 0, maxTokens: 10 } : { temperature: 1, seed: i, maxTokens: 10 };
    const alone: number[][] = [];
    for (let i = 0; i < 8; i++) alone.push((await model.complete(prompts[i], opts(i))).tokens);
    const batch = await Promise.all(prompts.map((p, i) => model.complete(p, opts(i))));
    batch.forEach((r, i) => expect(r.tokens).toEqual(alone[i]));
  });

  test('maxTokens bounds the output; the context bounds it too', async () => {
    const r = await model.complete(randomTokens(9, 320, 70), { temperature: 0, maxTokens: 3 });
    const expected = await argmaxChain(model, randomTokens(9, 320, 70), 3);
    expect(r.tokens).toEqual(expected);
    if (!expected.includes(EOS)) expect(r.finishReason).toBe('length');
    // A prompt that fills the context leaves room for one sampled token.
    const full = await model.complete(randomTokens(128, 320, 71), { temperature: 0, maxTokens: 50 });
    expect(full.tokens.length).toBe(1);
  });

  test('a stop string that spans two tokens ends the text just before it', async () => {
    const prompt = randomTokens(6, 320, 80);
    const { pieces, result } = await collect(model.generate(prompt, { temperature: 0, maxTokens: 40 }));
    // Two neighbouring pieces with text: the stop string is the last character of one and the first of the next.
    const i = pieces.findIndex((p, k) => k > 0 && p.text.length > 0 && pieces[k - 1].text.length > 0);
    expect(i).toBeGreaterThan(0);
    const stop = [...pieces[i - 1].text].pop()! + [...pieces[i].text][0];
    const at = result.text.indexOf(stop);
    const stopped = await model.complete(prompt, { temperature: 0, maxTokens: 40, stop: ['never here', stop] });
    expect(stopped.finishReason).toBe('stop');
    expect(stopped.text).toBe(result.text.slice(0, at));
    // Pieces stream the text before the stop string and nothing after it.
    const streamed = await collect(model.generate(prompt, { temperature: 0, maxTokens: 40, stop }));
    expect(streamed.pieces.map((p) => p.text).join('')).toBe(result.text.slice(0, at));
  });

  test('EOS ends the generation with finishReason stop; its token is the last one, without text', async () => {
    // A hot temperature makes EOS (1 of 320 ids) come up within a few seeds.
    const prompt = randomTokens(5, 320, 90);
    for (let seed = 0; seed < 60; seed++) {
      const r = await model.complete(prompt, { temperature: 3, seed, maxTokens: 60 });
      if (r.tokens.includes(EOS)) {
        expect(r.tokens[r.tokens.length - 1]).toBe(EOS);
        expect(r.finishReason).toBe('stop');
        expect(r.text).toBe(model.detokenize(r.tokens));
        return;
      }
      expect(r.finishReason).toBe('length');
    }
    throw new Error('no generation sampled EOS');
  });
});

test('a long prompt joins in chunks: a running stream keeps getting tokens meanwhile', async () => {
  const model = await MoeModel.load(byteLevelDir, { maxSequences: 2, contextLength: 1024 });
  try {
    const events: string[] = [];
    let started: Promise<unknown> | null = null;
    const longPrompt = randomTokens(900, 320, 130);
    const startLong = async () => {
      events.push('long submitted');
      for await (const piece of model.generate(longPrompt, { temperature: 0, maxTokens: 2 })) {
        void piece;
        events.push('long');
      }
    };
    for await (const piece of model.generate(randomTokens(3, 320, 131), { temperature: 1, seed: 1, maxTokens: 60 })) {
      void piece;
      events.push('short');
      if (events.length === 2) started = startLong();
    }
    await started;
    const from = events.indexOf('long submitted');
    const firstLong = events.indexOf('long');
    // 900 prompt tokens at 256 per step take 4 steps, each of which also decodes the running stream.
    expect(firstLong - from - 1).toBeGreaterThanOrEqual(4);
    const alone = await model.complete(longPrompt, { temperature: 0, maxTokens: 2 });
    expect(alone.tokens).toEqual(await argmaxChain(model, longPrompt, 2));
  } finally {
    model.dispose();
  }
});

test('tools reach the chat template, on the calling thread and on the worker', async () => {
  const hf = writeRandomModel(path.join(dir, 'tools'), { family: 'mixtral', seed: 23, gguf: false }).hfDir;
  writeTokenizer(hf, 'byte-level', 320, { chatTemplate: TOOLS_TEMPLATE });
  const model = await MoeModel.load(hf, { contextLength: 4096 });
  try {
    const tools = [
      { type: 'function', function: { name: 'get_weather', parameters: { type: 'object', properties: {} } } },
    ];
    const turn = [
      { role: 'user', content: 'weather in Bern?' },
      {
        role: 'assistant',
        content: '',
        tool_calls: [{ id: 'c1', type: 'function', function: { name: 'get_weather', arguments: { city: 'Bern' } } }],
      },
      { role: 'tool', tool_call_id: 'c1', content: '21 C' },
    ];
    for (const messages of [turn, Array.from({ length: 22 }, () => turn).flat()]) {
      const text = new Template(TOOLS_TEMPLATE).render({
        messages,
        tools,
        add_generation_prompt: true,
        bos_token: '<s>',
        eos_token: '</s>',
      });
      expect(text).toContain('{"name": "get_weather", "arguments": {"city": "Bern"}}');
      const r = await model.complete(messages, { tools, temperature: 0, maxTokens: 2 });
      expect(r.usage.promptTokens).toBe(model.tokenize(text, { addSpecialTokens: false }).length);
      const without = await model.complete(messages, { temperature: 0, maxTokens: 2 });
      expect(without.usage.promptTokens).toBeLessThan(r.usage.promptTokens);
    }
    expect(() => model.generate('plain text', { tools })).toThrow(/options\.tools needs a prompt of messages/);
    expect(() => model.generate(turn, { tools: 'all' as never })).toThrow(/options\.tools must be an array/);
  } finally {
    model.dispose();
  }
});

describe('one sequence at a time (maxSequences 1, a 64-position cache)', () => {
  let model: MoeModel;
  beforeAll(async () => {
    model = await MoeModel.load(byteLevelDir, { maxSequences: 1, contextLength: 64 });
  });
  afterAll(() => model.dispose());

  test('an abort mid-stream ends the stream and frees its cache for the next request', async () => {
    const controller = new AbortController();
    const gen = model.generate(randomTokens(20, 320, 100), { temperature: 1, seed: 1, signal: controller.signal });
    const pieces: number[] = [];
    for await (const piece of gen) {
      pieces.push(piece.token);
      if (pieces.length === 3) controller.abort();
    }
    expect(pieces.length).toBeGreaterThanOrEqual(3);
    expect(pieces.length).toBeLessThanOrEqual(4);
    // The next request needs the whole cache (64 positions): it runs only if the aborted one was freed.
    const next = await model.complete(randomTokens(60, 320, 101), { temperature: 0, maxTokens: 5 });
    expect(next.tokens).toEqual(await argmaxChain(model, randomTokens(60, 320, 101), 5));
  });

  test('complete() with an aborted signal resolves with finishReason abort; breaking out of a stream aborts it', async () => {
    const controller = new AbortController();
    const running = model.complete(randomTokens(10, 320, 110), { signal: controller.signal, maxTokens: 50, seed: 3 });
    setImmediate(() => controller.abort());
    const r = await running;
    expect(r.finishReason).toBe('abort');
    expect(r.tokens.length).toBeLessThan(50);
    expect((await model.complete([5], { signal: AbortSignal.abort() })).finishReason).toBe('abort');
    for await (const piece of model.generate([5, 6], { seed: 4 })) {
      expect(typeof piece.token).toBe('number');
      break;
    }
    const after = await model.complete(randomTokens(60, 320, 111), { temperature: 0, maxTokens: 4 });
    expect(after.tokens.length).toBeGreaterThan(0);
  });

  test('requests beyond maxSequences wait and run in arrival order', async () => {
    const order: number[] = [];
    const runs = [0, 1, 2, 3].map((i) =>
      model.complete(randomTokens(4, 320, 120 + i), { temperature: 0, maxTokens: 3 }).then((r) => {
        order.push(i);
        return r;
      }),
    );
    const results = await Promise.all(runs);
    expect(order).toEqual([0, 1, 2, 3]);
    for (let i = 0; i < 4; i++)
      expect(results[i].tokens).toEqual(await argmaxChain(model, randomTokens(4, 320, 120 + i), 3));
  });
});

describe('shared prefixes: forks of kept and running sequences', () => {
  let model: MoeModel;
  beforeAll(async () => {
    model = await MoeModel.load(byteLevelDir, { maxSequences: 4, contextLength: 256 });
  });
  afterAll(() => model.dispose());
  const greedy = { temperature: 0, maxTokens: 6, ignoreEos: true };

  test('requests with one prompt compute it once: the others wait, fork it, and give their tokens alone', async () => {
    const prompt = randomTokens(70, 320, 200);
    const opts = (i: number) => ({ temperature: 1, seed: 300 + i, maxTokens: 12, ignoreEos: true });
    const together = await Promise.all([0, 1, 2, 3].map((i) => model.complete(prompt, opts(i))));
    expect(together.map((r) => r.usage.cachedPromptTokens)).toEqual([0, 69, 69, 69]);
    // A prompt to score is computed whole: each reference below computes its own.
    for (let i = 0; i < 4; i++) {
      const alone = await model.complete(prompt, { ...opts(i), promptLogprobs: true });
      expect(alone.usage.cachedPromptTokens).toBe(0);
      expect(together[i].tokens).toEqual(alone.tokens);
    }
    expect(new Set(together.map((r) => r.tokens.join())).size).toBeGreaterThan(1);
  });

  test('requests sharing a system prompt fork it; each gives the argmax chain of its own prompt', async () => {
    const system = randomTokens(40, 320, 210);
    const prompts = [0, 1, 2].map((i) => [...system, ...randomTokens(5 + i, 320, 220 + i)]);
    const results = await Promise.all(prompts.map((p) => model.complete(p, greedy)));
    expect(results.map((r) => r.usage.cachedPromptTokens)).toEqual([0, 40, 40]);
    for (let i = 0; i < 3; i++) expect(results[i].tokens).toEqual(await argmaxChain(model, prompts[i], 6));
  });

  test("a request sharing part of a kept conversation forks it: the conversation's next turn still finds it whole", async () => {
    const first = randomTokens(50, 320, 230);
    const answer = await model.complete(first, greedy);
    const other = [...first.slice(0, 33), ...randomTokens(10, 320, 231)];
    expect((await model.complete(other, greedy)).usage.cachedPromptTokens).toBe(33);
    const next = [...first, ...answer.tokens, ...randomTokens(4, 320, 232)];
    const second = await model.complete(next, greedy);
    // Every position of the first turn but its last token, which was sampled and never fed.
    expect(second.usage.cachedPromptTokens).toBe(first.length + answer.tokens.length - 1);
    expect(second.tokens).toEqual(await argmaxChain(model, next, 6));
  });
});

test("the engine's count of free cache blocks is the native pool's, through forks, kept prefixes and evictions", async () => {
  // 8 blocks of 16 positions: kept prefixes are evicted as the rounds go.
  await withModel({ maxSequences: 2, contextLength: 64 }, async (model) => {
    expect(model.generationStats.freeCachePositions).toBe(model.nativeFreeCachePositions());
    const base = randomTokens(40, 320, 240);
    for (let round = 0; round < 8; round++) {
      const prompts = [0, 1, 2].map((i) => [
        ...base.slice(0, 8 + 11 * ((round + i) % 3)),
        ...randomTokens(3 + i, 320, 250 + 3 * round + i),
      ]);
      const results = await Promise.all(
        prompts.map((p) => model.complete(p, { temperature: 0, maxTokens: 3 + round, ignoreEos: true })),
      );
      expect(results.map((r) => r.finishReason)).toEqual(['length', 'length', 'length']);
      await model.logits([5]); // queued after the sequences' frees
      expect(model.generationStats).toMatchObject({ running: 0, waiting: 0 });
      expect(model.generationStats.freeCachePositions).toBe(model.nativeFreeCachePositions());
    }
    expect(model.generationStats.kept).toBeGreaterThan(0);
  });
});

test("a fork's partly filled block finds room by dropping kept prefixes that are not its source", async () => {
  // 8 blocks of 16 positions, all held by two kept prefixes of 63 positions.
  await withModel({ maxSequences: 2, contextLength: 64 }, async (model) => {
    const opts = { temperature: 0, maxTokens: 4, ignoreEos: true };
    for (const seed of [260, 261]) await model.complete(randomTokens(60, 320, seed), opts);
    expect(model.generationStats).toMatchObject({ kept: 2, freeCachePositions: 0 });
    // The first takes the blocks of one kept prefix; the second, once the first computed the prompt,
    // forks 59 positions: three blocks shared and a copy of the fourth, for which the other goes.
    const prompt = randomTokens(60, 320, 262);
    const [a, b] = await Promise.all([0, 1].map(() => model.complete(prompt, opts)));
    expect([a.usage.cachedPromptTokens, b.usage.cachedPromptTokens]).toEqual([0, 59]);
    expect(b.tokens).toEqual(a.tokens);
  });
});

test('a cache smaller than maxSequences contexts: generations that outgrow it wait and compute their tokens anew, giving their tokens alone', async () => {
  await expect(MoeModel.load(byteLevelDir, { contextLength: 128, cacheTokens: 100 })).rejects.toThrow(
    /options\.cacheTokens must be an integer in \[128, \d+\], got 100/,
  );
  // 10 blocks of 16 positions; the four generations grow to 75-90 positions: 20-24 blocks in all.
  await withModel({ maxSequences: 4, contextLength: 128, cacheTokens: 150 }, async (model) => {
    expect(model.options.cacheTokens).toBe(160);
    const prompts = [0, 1, 2, 3].map((i) => randomTokens(30 + 5 * i, 320, 270 + i));
    const opts = (i: number) => ({ maxTokens: 45, ignoreEos: true, ...(i % 2 ? { temperature: 0 } : { seed: i }) });
    const together = await Promise.all(prompts.map((p, i) => model.complete(p, opts(i))));
    expect(model.generationStats.preemptions).toBeGreaterThan(0);
    for (let i = 0; i < 4; i++) {
      // Alone, and computed whole (a prompt to score reuses no cache).
      const alone = await model.complete(prompts[i], { ...opts(i), promptLogprobs: true });
      expect(together[i].tokens).toEqual(alone.tokens);
      expect(together[i].text).toBe(alone.text);
    }
    await model.logits([5]); // queued after the frees
    expect(model.generationStats.freeCachePositions).toBe(model.nativeFreeCachePositions());
  });
});

test('without room to fork a kept prefix beside it, a request takes it over, cut back to what they share', async () => {
  // 4 blocks of 16 positions: the kept 47 positions hold 3; a fork of 35 for 55 tokens would need 2 more.
  await withModel({ contextLength: 64 }, async (model) => {
    const opts = { temperature: 0, maxTokens: 8, ignoreEos: true };
    const first = randomTokens(40, 320, 280);
    await model.complete(first, opts);
    const next = [...first.slice(0, 35), ...randomTokens(20, 320, 281)];
    const r = await model.complete(next, opts);
    expect(r.usage.cachedPromptTokens).toBe(35);
    expect(r.tokens).toEqual(await argmaxChain(model, next, 8));
  });
});

/**
 * Runs a test with the step's draws on the JavaScript thread (the engine's default for small batches),
 * then with every batch of draws forced onto libuv's thread (Engine.asyncDrawLogits 0), where aborts and
 * preemptions can land while the draws run.
 */
const DRAW_THREADS: [string, number][] = [
  ['draws on the JavaScript thread', Engine.asyncDrawLogits],
  ['every batch of draws off the JavaScript thread', 0],
];
async function withDrawThreshold(logits: number, fn: () => Promise<void>): Promise<void> {
  const saved = Engine.asyncDrawLogits;
  Engine.asyncDrawLogits = logits;
  try {
    await fn();
  } finally {
    Engine.asyncDrawLogits = saved;
  }
}

test.each(DRAW_THREADS)(
  'a random load on a small cache: forks, preemptions and aborts leave every other request its tokens alone (%s)',
  async (_, threshold) => {
    // 10 blocks of 16 positions for 6 sequences of up to 96.
    await withDrawThreshold(threshold, () =>
      withModel({ maxSequences: 6, contextLength: 96, cacheTokens: 160 }, async (model) => {
        let seed = 1;
        const rand = () => (seed = (seed * 48271) % 2147483647) / 2147483647;
        const bases = [0, 1, 2].map((i) => randomTokens(20 + 15 * i, 320, 290 + i));
        const jobs = Array.from({ length: 14 }, (_, i) => {
          const base = bases[i % 3].slice(0, 5 + Math.floor(rand() * (bases[i % 3].length - 5)));
          const prompt = [...base, ...randomTokens(1 + Math.floor(rand() * 10), 320, 300 + i)];
          const opts = {
            maxTokens: 5 + Math.floor(rand() * 25),
            ignoreEos: true,
            ...(i % 2 ? { temperature: 0 } : { seed: i }),
          };
          return { prompt, opts, abortAfter: i % 5 === 4 ? 1 + Math.floor(rand() * 4) : 0, delay: i < 8 ? 0 : i * 3 };
        });
        const results = await Promise.all(
          jobs.map(async ({ prompt, opts, abortAfter, delay }) => {
            await new Promise((resolve) => setTimeout(resolve, delay));
            const abort = new AbortController();
            const gen = model.generate(prompt, { ...opts, signal: abort.signal });
            const tokens: number[] = [];
            for (;;) {
              const r = await gen.next();
              if (r.done) return { tokens, cached: r.value.usage.cachedPromptTokens };
              tokens.push(r.value.token);
              if (tokens.length === abortAfter) abort.abort();
            }
          }),
        );
        expect(model.generationStats.preemptions).toBeGreaterThan(0);
        expect(results.filter((r) => r.cached >= 16).length).toBeGreaterThan(2); // forks and kept prefixes
        for (let i = 0; i < jobs.length; i++) {
          const { prompt, opts, abortAfter } = jobs[i];
          if (abortAfter) {
            expect(results[i].tokens).toHaveLength(abortAfter);
            continue;
          }
          const alone = await model.complete(prompt, { ...opts, promptLogprobs: true });
          expect(results[i].tokens).toEqual(alone.tokens);
        }
        await model.logits([5]); // queued after the frees
        expect(model.generationStats).toMatchObject({ running: 0, waiting: 0 });
        expect(model.generationStats.freeCachePositions).toBe(model.nativeFreeCachePositions());
      }),
    );
  },
);

test.each(DRAW_THREADS)(
  'model.logits with no room beside a running generation: the generation gives way and goes on with its tokens (%s)',
  async (_, threshold) => {
    // One sequence of 64 positions: a 64-token logits call needs the whole cache.
    await withDrawThreshold(threshold, () =>
      withModel({ contextLength: 64 }, async (model) => {
        const prompt = randomTokens(30, 320, 310);
        const q = randomTokens(64, 320, 311);
        const tokens: number[] = [];
        const calls: Promise<Float32Array>[] = [];
        for await (const piece of model.generate(prompt, { temperature: 0, maxTokens: 20, ignoreEos: true })) {
          tokens.push(piece.token);
          if (tokens.length % 6 === 1) calls.push(model.logits(q));
        }
        const results = await Promise.all(calls);
        expect(model.generationStats.preemptions).toBeGreaterThanOrEqual(calls.length);
        const alone = await model.logits(q);
        for (const r of results) expect(firstBitDifference(r, alone)).toBe(-1);
        expect(tokens).toEqual(await argmaxChain(model, prompt, 20));
      }),
    );
  },
);

test('a preemption and an abort that land while a batch of draws runs off the JavaScript thread', async () => {
  await withDrawThreshold(0, () =>
    withModel({ contextLength: 64 }, async (model) => {
      const prompt = randomTokens(20, 320, 320);
      const q = randomTokens(64, 320, 321);
      // A 64-token logits call (the whole cache) made while the generation's 4th draw runs: the
      // generation gives its cache back then, takes the token that draw gives, and computes it anew.
      let draws = 0;
      let call: Promise<Float32Array> | null = null;
      Engine.onDrawsAway = () => {
        if (++draws === 4) call = model.logits(q);
      };
      try {
        const r = await model.complete(prompt, { temperature: 0, maxTokens: 12, ignoreEos: true });
        expect(call).not.toBeNull();
        expect(model.generationStats.preemptions).toBeGreaterThan(0);
        const expected = await argmaxChain(model, prompt, 12);
        expect(r.tokens.slice(0, expected.length)).toEqual(expected);
        expect(firstBitDifference(await call!, await model.logits(q))).toBe(-1);
        // An abort while the 3rd draw runs: the stream ends with the two tokens it had.
        const controller = new AbortController();
        draws = 0;
        Engine.onDrawsAway = () => {
          if (++draws === 3) controller.abort();
        };
        const aborted = await collect(
          model.generate(prompt, { temperature: 1, seed: 3, maxTokens: 12, signal: controller.signal }),
        );
        expect(aborted.result.finishReason).toBe('abort');
        expect(aborted.result.tokens).toHaveLength(2);
        expect(aborted.pieces).toHaveLength(2);
      } finally {
        Engine.onDrawsAway = null;
      }
      // The abort lands while the draws run; the engine frees the stream's cache once they settle, which
      // queues that free after this first call: the second runs after it.
      await model.logits([5]);
      await model.logits([5]);
      expect(model.generationStats).toMatchObject({ running: 0, waiting: 0 });
      expect(model.generationStats.freeCachePositions).toBe(model.nativeFreeCachePositions());
    }),
  );
});

describe('sentencepiece model: conversations reuse their prefix', () => {
  test('the next turn of a chat reuses the cache and gives the tokens of a fresh model', async () => {
    const model = await MoeModel.load(sentencePieceDir, { maxSequences: 2, contextLength: 256 });
    const fresh = await MoeModel.load(sentencePieceDir, { maxSequences: 2, contextLength: 256 });
    try {
      const messages = [
        { role: 'system', content: 'be brief' },
        { role: 'user', content: 'the café 日本?' },
      ];
      const first = await model.complete(messages, { temperature: 0, maxTokens: 8 });
      expect(first.usage.cachedPromptTokens).toBe(0);
      const next = [...messages, { role: 'assistant', content: first.text }, { role: 'user', content: 'and then?' }];
      const second = await model.complete(next, { temperature: 0, maxTokens: 8 });
      // The first turn's prompt is a prefix of the second's: its cache is taken over.
      expect(second.usage.cachedPromptTokens).toBeGreaterThanOrEqual(first.usage.promptTokens);
      expect(second.usage.cachedPromptTokens).toBeLessThan(second.usage.promptTokens);
      const reference = await fresh.complete(next, { temperature: 0, maxTokens: 8 });
      expect(reference.usage.cachedPromptTokens).toBe(0);
      expect(second.tokens).toEqual(reference.tokens);
      // The same prompt again reuses all of it but the last token.
      const again = await model.complete(next, { temperature: 0, maxTokens: 8 });
      expect(again.usage.cachedPromptTokens).toBe(again.usage.promptTokens - 1);
      expect(again.tokens).toEqual(reference.tokens);
      // model.logits still gets a sequence when kept prefixes fill the cache.
      await model.complete(randomTokens(250, 384, 5), { temperature: 0, maxTokens: 4 });
      await model.complete(randomTokens(250, 384, 6), { temperature: 0, maxTokens: 4 });
      expect((await model.logits(randomTokens(256, 384, 7))).length).toBe(384);
    } finally {
      model.dispose();
      fresh.dispose();
    }
  });

  test('model.logits during a generation: a kept prefix gives way, counting the step in flight', async () => {
    // 2 x 8 blocks of 16 positions. A kept prefix of 7 blocks; a generation growing from 20 positions;
    // a 112-position logits call (7 blocks) after every piece. When the step in flight takes the
    // generation into its third block, the prefix must go: counted before that step, it had stayed.
    const model = await MoeModel.load(sentencePieceDir, { maxSequences: 2, contextLength: 128 });
    try {
      await model.complete(randomTokens(100, 384, 8), { temperature: 0, maxTokens: 12, ignoreEos: true });
      expect(model.generationStats.kept).toBe(1);
      const calls: Promise<unknown>[] = [];
      const q = randomTokens(112, 384, 9);
      for await (const piece of model.generate(randomTokens(20, 384, 10), {
        temperature: 0,
        maxTokens: 30,
        ignoreEos: true,
      })) {
        expect(piece.token).toBeGreaterThanOrEqual(0);
        calls.push(model.logits(q));
      }
      const settled = await Promise.allSettled(calls);
      expect(settled.filter((r) => r.status === 'rejected')).toEqual([]);
      expect(settled).toHaveLength(30);
    } finally {
      model.dispose();
    }
  });
});
