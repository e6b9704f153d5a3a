/**
 * tokenizer.json corrupted, seeded: 600 copies of the tests' byte-level and SentencePiece-style
 * tokenizers, each with one or two values replaced by a value of another type or shape (or deleted),
 * anywhere in the first levels of the file. Each either loads, and then encodes and decodes texts of
 * multi-byte characters into token ids and strings, or is refused with ERR_MOE_CHECKPOINT naming
 * tokenizer.json. Before, damage the library reads only when it encodes (the post-processor's
 * templates) or decodes (the decoder's steps) escaped from encode() and decode() as the library's own
 * TypeError (now ERR_MOE_CHECKPOINT from that call, the model still usable from ids), and a damaged
 * added_tokens entry or vocabulary id read "Cannot read properties of undefined" (now its key).
 */
import { MoeError } from '../lib/index';
import { TextTokenizer } from '../lib/text/tokenizer';
import { rng } from './helpers/reference';
import { byteLevelTokenizer, sentencePieceTokenizer } from './helpers/text/tokenizer-files';

type Json = unknown;
type Key = string | number;

/** Paths to values in the first levels of `v`: a few entries of each array, a few keys of each object. */
function paths(v: Json, at: Key[] = [], out: Key[][] = []): Key[][] {
  if (at.length > 4) return out;
  const keys: Key[] = Array.isArray(v)
    ? v.slice(0, 6).map((_, i) => i)
    : v && typeof v === 'object'
      ? Object.keys(v)
      : [];
  for (const k of keys.slice(0, 12)) {
    out.push([...at, k]);
    paths((v as Record<Key, Json>)[k], [...at, k], out);
  }
  return out;
}

const VALUES: Json[] = [
  null,
  0,
  -1,
  1.5,
  1e300,
  'x',
  '',
  'a b',
  [],
  [1, 2],
  [null],
  [['a']],
  {},
  { type: 'Nope' },
  true,
];
const TEXTS = ['hello world', ' héllo ✓ 𝄞  日本語 ', 'THE END.\n\t123'];
const CONFIG = { bos_token: '<s>', eos_token: '</s>' };

test('a corrupted tokenizer.json loads and works, or is refused naming the file', () => {
  const warn = jest.spyOn(console, 'warn').mockImplementation(() => {}); // the library warns of unknown patterns
  try {
    const rand = rng(20261206);
    let loaded = 0;
    const refusals = new Set<string>();
    for (let i = 0; i < 600; i++) {
      const json = JSON.parse(JSON.stringify(i % 2 ? byteLevelTokenizer(300) : sentencePieceTokenizer(300)));
      const all = paths(json);
      const changes = 1 + Math.floor(rand() * 2);
      for (let c = 0; c < changes; c++) {
        const p = all[Math.floor(rand() * all.length)];
        let parent: Json = json;
        for (const k of p.slice(0, -1))
          parent = parent && typeof parent === 'object' ? (parent as Record<Key, Json>)[k] : undefined;
        if (!parent || typeof parent !== 'object') continue;
        const last = p[p.length - 1];
        if (rand() < 0.2 && !Array.isArray(parent)) delete (parent as Record<Key, Json>)[last];
        else (parent as Record<Key, Json>)[last] = VALUES[Math.floor(rand() * VALUES.length)];
      }
      let tokenizer: TextTokenizer;
      try {
        tokenizer = new TextTokenizer(json, CONFIG, 'dir');
      } catch (err) {
        expect(err).toBeInstanceOf(MoeError);
        expect((err as MoeError).code).toBe('ERR_MOE_CHECKPOINT');
        expect((err as MoeError).message).toMatch(/^dir: tokenizer\.json/);
        refusals.add((err as MoeError).message.replace(/\d+/g, 'N').slice(0, 60));
        continue;
      }
      loaded++;
      for (const text of TEXTS) {
        let ids: number[];
        try {
          ids = tokenizer.encode(text);
        } catch (err) {
          // Damage only some texts reach (a normalizer's pattern): ours, naming the file.
          expect(err).toBeInstanceOf(MoeError);
          expect((err as MoeError).message).toMatch(/^dir: tokenizer\.json/);
          continue;
        }
        for (const id of ids) expect(Number.isSafeInteger(id) && id >= 0).toBe(true);
        try {
          expect(typeof tokenizer.decode(ids)).toBe('string');
          for (const id of ids) expect(tokenizer.tokenBytes(id)).toBeInstanceOf(Uint8Array);
        } catch (err) {
          expect(err).toBeInstanceOf(MoeError);
          expect((err as MoeError).message).toMatch(/^dir: tokenizer\.json/);
        }
      }
    }
    // Both outcomes are common, and the refusals are of many kinds.
    expect(loaded).toBeGreaterThan(50);
    expect(refusals.size).toBeGreaterThan(20);
  } finally {
    warn.mockRestore();
  }
});

test('the error names the damaged key, or the step the library failed at', () => {
  type TokenizerJson = {
    added_tokens: unknown[];
    model: { vocab: Record<string, unknown>; merges: unknown[] };
    decoder: unknown;
    post_processor: unknown;
  };
  const make = (edit: (j: TokenizerJson) => void) => {
    const json = byteLevelTokenizer(300) as TokenizerJson;
    edit(json);
    return () => new TextTokenizer(json, CONFIG, 'dir');
  };
  expect(make((j) => (j.added_tokens[1] = null))).toThrow(/tokenizer\.json: 'added_tokens\[1\]' must be \{ id/);
  expect(make((j) => (j.model.vocab.a = 'x'))).toThrow(/'model\.vocab\["a"\]' must be a token id/);
  expect(make((j) => (j.model.merges[0] = 5))).toThrow(/'model\.merges\[0\]' must be a merge/);
  expect(make((j) => (j.decoder = 'ByteLevel'))).toThrow(/'decoder' must be null or an object with a string 'type'/);
  // Read by the library only when it encodes: the tokenizer loads, and encoding is refused naming the file.
  const template = make(
    (j) => (j.post_processor = { type: 'TemplateProcessing', single: [null], pair: [], special_tokens: {} }),
  )();
  expect(() => template.encode('hello')).toThrow(/^dir: tokenizer\.json cannot encode: /);
});
