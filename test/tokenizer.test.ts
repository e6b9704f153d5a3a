/**
 * The checkpoint tokenizer (lib/text): round trips of text with multi-byte characters through a real
 * byte-level BPE and a real SentencePiece-style BPE (byte fallback, metaspace); streamed pieces that
 * never hold half a character and join to exactly the whole decode; each token's bytes; the chat
 * template; and how MoeModel loads, uses and refuses tokenizer files.
 */
import * as fs from 'fs';
import * as path from 'path';
import { MoeError, MoeModel } from '../lib/index';
import { StreamDecoder } from '../lib/text/stream';
import { TextTokenizer } from '../lib/text/tokenizer';
import { makeTempDir, removeTempDir } from './helpers/checkpoint';
import { rng } from './helpers/reference';
import { writeRandomModel } from './helpers/model/random-model';
import { CHAT_TEMPLATE, TokenizerKind, writeTokenizer } from './helpers/text/tokenizer-files';

let dir = '';
beforeAll(() => {
  dir = makeTempDir('tokenizer');
});
afterAll(() => removeTempDir(dir));

/** Characters of 1 to 4 UTF-8 bytes, some the tokenizers know whole and some they only know as bytes. */
const POOL = [...'abcdefghijklmnopqrstuvwxyz THE,.!?0123456789éüßçñ日本語東京中文汉字🙂🚀🎉∑€\n\t'];

function randomText(rand: () => number, n: number): string {
  let s = '';
  for (let i = 0; i < n; i++) s += POOL[Math.floor(rand() * POOL.length)];
  return s;
}

async function tokenizerOf(kind: TokenizerKind, vocabSize: number, template?: string | null): Promise<TextTokenizer> {
  const d = path.join(dir, `${kind}-${vocabSize}-${template === null ? 'none' : 'chat'}`);
  fs.mkdirSync(d, { recursive: true });
  writeTokenizer(d, kind, vocabSize, { chatTemplate: template });
  return (await TextTokenizer.load(d))!;
}

/** Decodes id by id through a StreamDecoder; returns the pieces (the flushed rest last). */
function stream(t: TextTokenizer, ids: number[]): string[] {
  const s = new StreamDecoder(t);
  const pieces = ids.map((id) => s.push(id));
  pieces.push(s.flush());
  return pieces;
}

describe.each([
  ['byte-level', 320],
  ['byte-level', 512],
  ['sentencepiece', 320],
  ['sentencepiece', 384],
] as const)('%s BPE of %i tokens', (kind, vocabSize) => {
  let t: TextTokenizer;
  beforeAll(async () => {
    t = await tokenizerOf(kind, vocabSize);
  });

  test('has exactly the vocabulary size, and the special tokens of tokenizer_config.json', () => {
    expect(t.vocabLimit).toBe(vocabSize);
    expect(t.eosTokenIds).toEqual([2]);
    expect(t.bosToken).toBe('<s>');
  });

  test('text with multi-byte characters round-trips', () => {
    const rand = rng(vocabSize + (kind === 'byte-level' ? 1 : 2));
    const texts = [
      'the café 日本 🙂🚀 straße 東京',
      'déjà vu: 42 naïve façades',
      ...Array.from({ length: 40 }, (_, i) => randomText(rand, 1 + i * 3)),
    ];
    for (const raw of texts) {
      // A metaspace tokenizer cannot tell a leading space from the one it adds itself (as in Rust).
      const text = kind === 'sentencepiece' ? raw.replace(/^\s+/, '') || 'x' : raw;
      const ids = t.encode(text);
      expect(ids.every((id) => Number.isInteger(id) && id >= 0 && id < vocabSize)).toBe(true);
      expect(ids[0] === 1).toBe(kind === 'sentencepiece'); // BOS from the post-processor
      expect(t.decode(ids)).toBe(text);
      expect(t.encode(text, false)[0] === 1).toBe(false);
    }
  });

  test('some tokens hold only part of a character, so streaming has something to hold back', () => {
    const ids = t.encode('ß東🚀 日本語', false);
    expect(ids.some((id) => t.decode([id]).includes('\uFFFD'))).toBe(true);
  });

  test('streamed pieces never end inside a character and join to the whole decode', () => {
    const rand = rng(7 * vocabSize);
    for (let i = 0; i < 30; i++) {
      const text = randomText(rand, 5 + i * 2).replace(/^\s+/, '') || 'x';
      const ids = t.encode(text);
      const pieces = stream(t, ids);
      for (const p of pieces) expect(p).not.toContain('\uFFFD');
      expect(pieces.join('')).toBe(text);
      // Held back at most one character's worth of tokens: the text so far is a prefix of the whole.
      let so = '';
      for (const p of pieces) expect(text.startsWith((so += p))).toBe(true);
    }
  });

  test('random ids (broken UTF-8, special tokens) still join to exactly the whole decode', () => {
    const rand = rng(11 * vocabSize);
    for (let i = 0; i < 400; i++) {
      const ids = Array.from({ length: 1 + (i % 40) }, () => Math.floor(rand() * vocabSize));
      expect(stream(t, ids).join('')).toBe(t.decode(ids));
    }
  });

  test("tokens' bytes join to the text's UTF-8, parts of characters included; specials are their text", () => {
    const rand = rng(13 * vocabSize);
    let partial = 0;
    for (let i = 0; i < 30; i++) {
      const text = randomText(rand, 5 + i * 2).replace(/^\s+/, '') || 'x';
      const ids = t.encode(text, false);
      const bytes = ids.map((id) => t.tokenBytes(id));
      partial += bytes.filter((b) => !Buffer.from(Buffer.from(b).toString('utf8')).equals(b)).length;
      // A metaspace tokenizer's first token holds the space it prepends; the decoder drops it.
      const expected = Buffer.from(kind === 'sentencepiece' ? ' ' + text : text);
      expect(Buffer.concat(bytes)).toEqual(expected);
    }
    expect(partial).toBeGreaterThan(0);
    expect(Buffer.from(t.tokenBytes(2)).toString()).toBe('</s>');
    expect(t.tokenBytes(vocabSize + 5)).toEqual(new Uint8Array(0));
    expect(() => t.tokenBytes(-1)).toThrow(/id must be a token id \(an integer >= 0\), got number -1/);
  });

  test('the chat template renders messages, the generation prompt and the special tokens', () => {
    const messages = [
      { role: 'system', content: 'be brief' },
      { role: 'user', content: 'café?' },
      { role: 'assistant', content: 'oui' },
      { role: 'user', content: '日本' },
    ];
    const expected =
      '<s>' + messages.map((m) => `[${m.role}] ${m.content}${m.role === 'assistant' ? '</s>' : ''}\n`).join('');
    expect(t.renderChat(messages, false, 'messages')).toBe(expected);
    expect(t.renderChat(messages, true, 'messages')).toBe(expected + '[assistant] ');
    expect(() => t.renderChat([{ role: 'robot', content: 'x' }], true, 'messages')).toThrow(
      expect.objectContaining({ name: 'RangeError', message: expect.stringMatching(/messages.*unknown role robot/) }),
    );
  });
});

test('the template is read from tokenizer_config.json; without one, messages are refused by name', async () => {
  const t = await tokenizerOf('byte-level', 320, null);
  expect(t.chatTemplate).toBeNull();
  expect(() => t.renderChat([{ role: 'user', content: 'x' }], true, 'promptOrMessages')).toThrow(
    expect.objectContaining({ name: 'TypeError', message: expect.stringMatching(/promptOrMessages.*chat_template/) }),
  );
  const withTemplate = await tokenizerOf('byte-level', 320, CHAT_TEMPLATE);
  expect(withTemplate.chatTemplate).not.toBeNull();
});

describe('MoeModel and tokenizer files', () => {
  let hfDir = '';
  beforeAll(() => {
    hfDir = writeRandomModel(path.join(dir, 'model'), { family: 'mixtral', seed: 3, gguf: false }).hfDir;
  });

  test('a model without tokenizer.json loads; tokenize and detokenize then say what is missing', async () => {
    const model = await MoeModel.load(hfDir);
    try {
      expect(model.tokenizer).toBeUndefined();
      expect(() => model.tokenize('hi')).toThrow(MoeError);
      expect(() => model.tokenize('hi')).toThrow(/tokenizer\.json/);
      expect(() => model.detokenize([5])).toThrow(/tokenizer\.json/);
    } finally {
      model.dispose();
    }
  });

  test('tokenize and detokenize use the folder tokenizer; bad arguments are named', async () => {
    writeTokenizer(hfDir, 'sentencepiece', 320);
    const model = await MoeModel.load(hfDir);
    try {
      const reference = (await TextTokenizer.load(hfDir))!;
      const text = 'the café 日本 🙂';
      expect(model.tokenize(text)).toEqual(reference.encode(text));
      expect(model.tokenize(text, { addSpecialTokens: false })).toEqual(reference.encode(text, false));
      expect(model.detokenize(model.tokenize(text))).toBe(text);
      expect(model.detokenize(Int32Array.from(model.tokenize(text)))).toBe(text);
      expect(() => model.tokenize(42 as unknown as string)).toThrow(TypeError);
      expect(() => model.detokenize([1, 320])).toThrow(
        expect.objectContaining({ name: 'RangeError', message: expect.stringMatching(/ids\[1\]/) }),
      );
    } finally {
      model.dispose();
      fs.rmSync(path.join(hfDir, 'tokenizer.json'));
      fs.rmSync(path.join(hfDir, 'tokenizer_config.json'));
    }
  });

  test('a tokenizer larger than the vocabulary, or a broken tokenizer.json, is a checkpoint error', async () => {
    writeTokenizer(hfDir, 'byte-level', 512);
    await expect(MoeModel.load(hfDir)).rejects.toMatchObject({
      code: 'ERR_MOE_CHECKPOINT',
      message: /vocab_size of 320/,
    });
    fs.writeFileSync(path.join(hfDir, 'tokenizer.json'), '{"model": {"type": "Nonsense"}}');
    await expect(MoeModel.load(hfDir)).rejects.toMatchObject({ code: 'ERR_MOE_CHECKPOINT' });
    fs.writeFileSync(path.join(hfDir, 'tokenizer.json'), '{ not json');
    await expect(MoeModel.load(hfDir)).rejects.toMatchObject({ code: 'ERR_MOE_CHECKPOINT' });
    fs.rmSync(path.join(hfDir, 'tokenizer.json'));
    fs.rmSync(path.join(hfDir, 'tokenizer_config.json'));
  });
});
