/**
 * Long texts are tokenized, and long conversations rendered through the chat template, on a worker
 * thread (TextTokenizer.encodeAsync and renderChatAsync, lib/text/encode-worker.ts): the same ids and
 * text as on the calling thread, the event loop free meanwhile, the calling thread's tokenizer whenever
 * the worker cannot be trusted or cannot run, and generate / complete / the server taking a long prompt
 * that way with the same tokens and the same errors (out of the first next()).
 */
import * as fs from 'fs';
import * as path from 'path';
import { MoeError, MoeModel } from '../lib/index';
import { createServer } from '../lib/server/server';
import { TextTokenizer } from '../lib/text/tokenizer';
import { makeTempDir, removeTempDir } from './helpers/checkpoint';
import { rng } from './helpers/reference';
import { writeRandomModel } from './helpers/model/random-model';
import { TokenizerKind, writeTokenizer } from './helpers/text/tokenizer-files';

let dir = '';
let modelDir = '';
beforeAll(() => {
  dir = makeTempDir('tokenizer-worker');
  modelDir = writeRandomModel(path.join(dir, 'model'), { family: 'olmoe', seed: 41, gguf: false }).hfDir;
  writeTokenizer(modelDir, 'byte-level', 320);
});
afterAll(() => removeTempDir(dir));

const POOL = [...'abcdefghijklmnopqrstuvwxyz THE,.!?0123456789éüßçñ日本語東京中文汉字🙂🚀🎉∑€\n\t'];
function randomText(seed: number, n: number): string {
  const rand = rng(seed);
  let s = '';
  while (s.length < n) s += POOL[Math.floor(rand() * POOL.length)];
  return s;
}

/** Words the test tokenizers know merges for: about three characters a token. */
const WORDS = 'the quick brown fox jumps over lazy dog and cat sat on mat there they then went café 日本 🙂'.split(' ');
function wordText(seed: number, n: number): string {
  const rand = rng(seed);
  let s = '';
  while (s.length < n) s += WORDS[Math.floor(rand() * WORDS.length)] + (rand() < 0.1 ? '.\n' : ' ');
  return s;
}

async function tokenizerIn(name: string, kind: TokenizerKind): Promise<TextTokenizer> {
  const d = path.join(dir, name);
  fs.mkdirSync(d, { recursive: true });
  writeTokenizer(d, kind, kind === 'byte-level' ? 512 : 384);
  return (await TextTokenizer.load(d))!;
}

/** Turns of the event loop (setImmediate callbacks) that run before `p` settles. */
async function turnsWhile<T>(p: Promise<T>): Promise<{ value: T; turns: number }> {
  let settled = false;
  let turns = 0;
  const tick = () => {
    if (settled) return;
    turns++;
    setImmediate(tick);
  };
  setImmediate(tick);
  try {
    return { value: await p, turns };
  } finally {
    settled = true;
  }
}

const ROLES = ['system', 'user', 'assistant'];
/** A conversation of `n` messages of random roles and short random texts (some empty). */
function conversation(seed: number, n: number): { role: string; content: string }[] {
  const rand = rng(seed);
  return Array.from({ length: n }, () => ({
    role: ROLES[Math.floor(rand() * ROLES.length)],
    content: randomText(Math.floor(rand() * 1e9), Math.floor(rand() * 40)),
  }));
}

describe.each(['byte-level', 'sentencepiece'] as const)('%s tokenizer', (kind) => {
  let t: TextTokenizer;
  beforeAll(async () => {
    t = await tokenizerIn(kind, kind);
  });
  afterAll(() => t.dispose());

  test('encodeAsync gives the ids of encode, on either side of the worker threshold', async () => {
    const long = TextTokenizer.WORKER_MIN_CHARS;
    for (const [i, n] of [long - 1, long, long + 1, 3 * long + 7, 25_001].entries()) {
      const text = randomText(100 + i, n).slice(0, n);
      for (const special of [true, false]) expect(await t.encodeAsync(text, special)).toEqual(t.encode(text, special));
    }
  });

  test('the event loop runs while a long text is tokenized', async () => {
    const text = randomText(7, 200_000);
    const { value, turns } = await turnsWhile(t.encodeAsync(text));
    expect(value).toEqual(t.encode(text));
    expect(turns).toBeGreaterThan(0);
  });

  test('renderChatAsync gives the text of renderChat, on the worker from WORKER_MIN_MESSAGES on', async () => {
    const many = TextTokenizer.WORKER_MIN_MESSAGES;
    const render = jest.spyOn(t.chatTemplate!, 'render');
    try {
      for (const [i, n] of [1, many - 1, many, many + 1, 301].entries()) {
        const messages = conversation(300 + i, n);
        for (const generation of [true, false]) {
          render.mockClear();
          const text = await t.renderChatAsync(messages, generation, 'messages');
          // On this thread below the threshold, never from it on.
          expect(render).toHaveBeenCalledTimes(n < many ? 1 : 0);
          expect(text).toBe(t.renderChat(messages, generation, 'messages'));
        }
      }
    } finally {
      render.mockRestore();
    }
  });

  test('the event loop runs while a long conversation is rendered', async () => {
    const messages = conversation(8, 20_000);
    const { value, turns } = await turnsWhile(t.renderChatAsync(messages, true, 'messages'));
    expect(value).toBe(t.renderChat(messages, true, 'messages'));
    expect(turns).toBeGreaterThan(0);
  });
});

test('a template that refuses a long conversation on the worker throws the RangeError of renderChat', async () => {
  const t = await tokenizerIn('refuses', 'byte-level');
  const render = jest.spyOn(t.chatTemplate!, 'render');
  try {
    const messages = [...conversation(20, 200), { role: 'tool', content: 'x' }];
    const refused = t.renderChatAsync(messages, true, 'messages');
    await expect(refused).rejects.toThrow(RangeError);
    expect(render).not.toHaveBeenCalled(); // refused on the worker, not rendered again here
    await expect(refused).rejects.toMatchObject({
      code: 'ERR_OUT_OF_RANGE',
      message: 'messages: the chat template refused the messages: unknown role tool',
    });
    expect(() => t.renderChat(messages, true, 'messages')).toThrow(
      'messages: the chat template refused the messages: unknown role tool',
    );
  } finally {
    render.mockRestore();
    t.dispose();
  }
});

test('messages that are not plain objects, or that the worker cannot receive, are rendered here', async () => {
  const t = await tokenizerIn('not-plain', 'sentencepiece');
  const render = jest.spyOn(t.chatTemplate!, 'render');
  try {
    class Message {
      constructor(
        readonly role: string,
        readonly content: string,
      ) {}
    }
    const plain = conversation(21, 100);
    const instances = plain.map((m) => new Message(m.role, m.content));
    const uncopyable = plain.map((m) => ({ ...m, format: () => m.content }));
    const expected = t.renderChat(plain, true, 'messages');
    for (const messages of [instances, uncopyable]) {
      render.mockClear();
      expect(await t.renderChatAsync(messages, true, 'messages')).toBe(expected);
      expect(render).toHaveBeenCalledTimes(1);
    }
  } finally {
    render.mockRestore();
    t.dispose();
  }
});

test('a text that is not a string is a TypeError naming it, on either path', async () => {
  const t = await tokenizerIn('types', 'byte-level');
  try {
    for (const bad of [42, null, undefined, ['a'.repeat(10_000)], { length: 10_000 }]) {
      expect(() => t.encode(bad as unknown as string)).toThrow(/^text must be a string, got /);
      await expect(t.encodeAsync(bad as unknown as string)).rejects.toThrow(/^text must be a string, got /);
    }
  } finally {
    t.dispose();
  }
});

test('a tokenizer.json changed since it was loaded is not used: the loaded tokenizer gives the ids', async () => {
  const t = await tokenizerIn('changed', 'sentencepiece');
  try {
    const text = randomText(8, 3 * TextTokenizer.WORKER_MIN_CHARS);
    const expected = t.encode(text);
    writeTokenizer(path.join(dir, 'changed'), 'byte-level', 512); // another tokenizer in its place
    expect(await t.encodeAsync(text)).toEqual(expected);
  } finally {
    t.dispose();
  }
});

test('a tokenizer built from an object (no file) tokenizes on the calling thread', async () => {
  const d = path.join(dir, 'object');
  fs.mkdirSync(d, { recursive: true });
  writeTokenizer(d, 'byte-level', 512);
  const json = JSON.parse(fs.readFileSync(path.join(d, 'tokenizer.json'), 'utf8'));
  const t = new TextTokenizer(json, {}, d);
  const text = randomText(9, 2 * TextTokenizer.WORKER_MIN_CHARS);
  const { value, turns } = await turnsWhile(t.encodeAsync(text));
  expect(value).toEqual(t.encode(text));
  expect(turns).toBe(0);
});

test('dispose rejects calls in flight and later ones run on the calling thread', async () => {
  const t = await tokenizerIn('dispose', 'byte-level');
  const text = randomText(10, 100_000);
  const messages = conversation(22, 5_000);
  const inFlight = [t.encodeAsync(text), t.renderChatAsync(messages, true, 'messages')];
  t.dispose(new MoeError('ERR_MOE_DISPOSED', 'gone'));
  for (const p of inFlight) await expect(p).rejects.toMatchObject({ code: 'ERR_MOE_DISPOSED' });
  const encoded = await turnsWhile(t.encodeAsync(text));
  expect(encoded.value).toEqual(t.encode(text));
  expect(encoded.turns).toBe(0);
  const rendered = await turnsWhile(t.renderChatAsync(messages, true, 'messages'));
  expect(rendered.value).toBe(t.renderChat(messages, true, 'messages'));
  expect(rendered.turns).toBe(0);
});

describe('generate with a prompt long enough for the worker', () => {
  let model: MoeModel;
  beforeAll(async () => {
    model = await MoeModel.load(modelDir, { contextLength: 8192, maxSequences: 2 });
  });
  afterAll(() => model.dispose());

  const text = wordText(11, TextTokenizer.WORKER_MIN_CHARS + 500);

  test('gives the tokens of the same prompt as ids, text and messages alike', async () => {
    const options = { temperature: 0, maxTokens: 3 };
    const ids = model.tokenize(text);
    const messages = [{ role: 'user', content: text }];
    const rendered = model.tokenizer!.renderChat(messages, true, 'messages');
    const [fromText, fromIds, fromMessages, fromRendered] = await Promise.all([
      model.complete(text, options),
      model.complete(ids, options),
      model.complete(messages, options),
      model.complete(model.tokenize(rendered, { addSpecialTokens: false }), options),
    ]);
    expect(fromText.usage.promptTokens).toBe(ids.length);
    expect(fromText.tokens).toEqual(fromIds.tokens);
    expect(fromMessages.usage.promptTokens).toBe(fromRendered.usage.promptTokens);
    expect(fromMessages.tokens).toEqual(fromRendered.tokens);
  });

  test('its request joins the step loop once its prompt is tokenized', async () => {
    const generation = model.generate(text + ' again', { temperature: 0, maxTokens: 1 });
    // Its prompt is on the worker: the request is queued once the ids are back, not by generate().
    expect(model.generationStats).toMatchObject({ running: 0, waiting: 0 });
    const first = await generation.next();
    expect(first.done).toBe(false);
    expect((await generation.next()).value).toMatchObject({ finishReason: 'length' });
  });

  test('a long conversation gives the tokens of its rendering, and joins the loop once rendered', async () => {
    const messages = conversation(23, 2 * TextTokenizer.WORKER_MIN_MESSAGES);
    const options = { temperature: 0, maxTokens: 3 };
    const rendered = model.tokenizer!.renderChat(messages, true, 'messages');
    const generation = model.generate(messages, options);
    expect(model.generationStats).toMatchObject({ running: 0, waiting: 0 }); // still on the worker
    const pieces: number[] = [];
    for await (const piece of generation) pieces.push(piece.token);
    const fromRendered = await model.complete(model.tokenize(rendered, { addSpecialTokens: false }), options);
    expect(pieces).toEqual(fromRendered.tokens);
  });

  test('a long conversation the template refuses rejects the first next(), and the model goes on', async () => {
    const messages = [...conversation(24, 100), { role: 'tool', content: 'x' }];
    const generation = model.generate(messages); // does not throw: the template has not run yet
    const expected = expect.objectContaining({
      name: 'RangeError',
      message: 'promptOrMessages: the chat template refused the messages: unknown role tool',
    });
    await expect(generation.next()).rejects.toEqual(expected);
    await expect(model.complete(messages)).rejects.toEqual(expected);
    // A short one is refused by generate() itself, as before.
    expect(() => model.generate(messages.slice(-2))).toThrow(RangeError);
    const ok = await model.complete(conversation(25, 70), { maxTokens: 2, temperature: 0 });
    expect(ok.tokens.length).toBeGreaterThan(0);
  });

  test('an abort while the prompt is tokenized ends it with finishReason abort', async () => {
    const controller = new AbortController();
    const result = model.complete(text, { signal: controller.signal });
    controller.abort();
    expect((await result).finishReason).toBe('abort');
  });
});

test('a long text over the context rejects the first next(), and the model goes on', async () => {
  const model = await MoeModel.load(modelDir, { contextLength: 1024 });
  try {
    // The first prefix (8 characters a position) is already long enough for the worker.
    const text = randomText(12, 40_000);
    const generation = model.generate(text); // does not throw: the text is not tokenized yet
    const expected = expect.objectContaining({
      name: 'RangeError',
      message: expect.stringMatching(
        /^promptOrMessages holds more than \d+ tokens \(its first 8192 characters give \d+\), more than the context of 1024$/,
      ),
    });
    await expect(generation.next()).rejects.toEqual(expected);
    await expect(generation.next()).rejects.toEqual(expected);
    await expect(model.complete([{ role: 'user', content: text }])).rejects.toEqual(expected);
    // Unread, a failed generation must not surface as an unhandled rejection.
    model.generate(text);
    const ok = await model.complete(model.tokenize('short prompt'), { maxTokens: 2, temperature: 0 });
    expect(ok.tokens.length).toBeGreaterThan(0);
  } finally {
    model.dispose();
  }
});

test('disposing the model while a prompt is tokenized rejects its generation with ERR_MOE_DISPOSED', async () => {
  const model = await MoeModel.load(modelDir, { contextLength: 65_536 });
  const generation = model.generate(randomText(13, 150_000));
  model.dispose();
  await expect(generation.next()).rejects.toMatchObject({ code: 'ERR_MOE_DISPOSED' });
});

test('the server starts the worker as it takes the model; dispose stops it', async () => {
  const model = await MoeModel.load(modelDir);
  const server = createServer(model);
  try {
    expect(model.tokenizer!.workerRunning).toBe(false); // the server takes the model a microtask later
    await new Promise((r) => setImmediate(r));
    expect(model.tokenizer!.workerRunning).toBe(true);
  } finally {
    await server.shutdown(0);
    model.dispose();
  }
  expect(model.tokenizer!.workerRunning).toBe(false);
});
