/**
 * JSON mode and response schemas: before each draw, the tokens whose bytes cannot continue a JSON text
 * of the schema (any object, in JSON mode) are masked out (the mask goes before every filter, so top-k
 * and top-p choose among tokens that fit), and once the value is complete only end-of-sequence tokens
 * remain.
 *
 * The mask walks the vocabulary sorted by bytes, as a trie: the automaton's state after each byte of a
 * token is kept by depth, so a token only feeds the bytes past what it shares with the one before, and
 * when a prefix fails, every token that starts with it is skipped by one comparison each. Inside a
 * string, a token of plain text (no quote, backslash or control byte) needs no automaton at all.
 */
import { MoeError } from '../errors';
import type { TextTokenizer } from '../text/tokenizer';
import {
  JsonState,
  SchemaNode,
  copyState,
  jsonAdvance,
  jsonComplete,
  jsonTakesPlainText,
  jsonStart,
  jsonStep,
} from './json-schema';

/** The texts a constraint allows: `prefix`, a JSON text of `schema`, `suffix` (bytes as chars). */
export interface JsonFormat {
  schema: SchemaNode;
  prefix: string;
  suffix: string;
}

interface VocabularyBytes {
  bytes: Uint8Array[];
  /** Token ids with bytes, in byte order (special and empty tokens left out). */
  order: Int32Array;
  /** lcp[k]: bytes token order[k] shares with order[k - 1] at its start. */
  lcp: Uint16Array;
  /** The longest token, in bytes. */
  longest: number;
  /** 1 where a token's bytes hold no '"', '\' or control byte: it stays inside a string. */
  plain: Uint8Array;
  /** Tokens of spaces only (what may follow a complete object when no end-of-sequence token is set). */
  spaces: number[];
}

/** Each tokenizer's vocabulary bytes by vocabulary size; a promise while they are gathered, so requests arriving meanwhile share the one gathering. */
const vocabularies = new WeakMap<TextTokenizer, Map<number, VocabularyBytes | Promise<VocabularyBytes>>>();
/** Tokens read per turn of the event loop while a vocabulary's bytes are gathered. */
const BUILD_CHUNK = 4096;

function compareBytes(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return a[i] - b[i];
  return a.length - b.length;
}

/** The vocabulary's bytes, gathered in chunks between turns of the event loop the first time. */
async function buildVocabulary(tokenizer: TextTokenizer, vocab: number): Promise<VocabularyBytes> {
  const bytes: Uint8Array[] = [];
  const plain = new Uint8Array(vocab);
  const spaces: number[] = [];
  const ids: number[] = [];
  for (let t = 0; t < vocab; t++) {
    if (t > 0 && t % BUILD_CHUNK === 0) await new Promise((r) => setImmediate(r));
    const b = tokenizer.specialTokenIds.has(t) ? new Uint8Array(0) : tokenizer.tokenBytes(t);
    bytes.push(b);
    if (b.length === 0) continue;
    ids.push(t);
    plain[t] = b.every((x) => x >= 0x20 && x !== 0x22 && x !== 0x5c) ? 1 : 0;
    if (b.every((x) => x === 0x20 || x === 0x0a || x === 0x0d || x === 0x09)) spaces.push(t);
  }
  // In byte order: a counting sort on the first two bytes, then each group on the rest, a chunk of
  // tokens per turn of the event loop (one sort of 150,000 tokens held it for about 175 ms).
  const group = (b: Uint8Array) => b[0] * 257 + (b.length > 1 ? 1 + b[1] : 0);
  const starts = new Int32Array(256 * 257 + 1);
  for (const t of ids) starts[group(bytes[t]) + 1]++;
  for (let g = 1; g < starts.length; g++) starts[g] += starts[g - 1];
  const order = new Int32Array(ids.length);
  const fill = starts.slice(0, -1);
  for (const t of ids) order[fill[group(bytes[t])]++] = t;
  for (let g = 0, sorted = 0; g + 1 < starts.length; g++) {
    const [a, b] = [starts[g], starts[g + 1]];
    if (b - a > 1) order.subarray(a, b).sort((x, y) => compareBytes(bytes[x], bytes[y]) || x - y);
    if ((sorted += b - a) >= BUILD_CHUNK) {
      sorted = 0;
      await new Promise((r) => setImmediate(r));
    }
  }
  const lcp = new Uint16Array(order.length);
  let longest = 0;
  for (let k = 0; k < order.length; k++) {
    const b = bytes[order[k]];
    longest = Math.max(longest, b.length);
    if (k === 0) continue;
    const p = bytes[order[k - 1]];
    let n = 0;
    while (n < b.length && n < p.length && n < 0xffff && b[n] === p[n]) n++;
    lcp[k] = n;
  }
  return { bytes, order, lcp, longest, plain, spaces };
}

export class JsonConstraint {
  readonly #vocab: VocabularyBytes;
  readonly #eos: readonly number[];
  #state: JsonState;
  /** The automaton's state by depth along the current token (allowed()'s working memory). */
  readonly #depth: JsonState[];
  readonly #cursor: JsonState;

  private constructor(vocab: VocabularyBytes, format: JsonFormat, eos: ReadonlySet<number>, size: number) {
    this.#vocab = vocab;
    this.#eos = [...eos].filter((t) => t < size);
    this.#state = jsonStart(format.schema, format);
    this.#depth = Array.from({ length: vocab.longest + 1 }, () => jsonStart(format.schema, format));
    this.#cursor = jsonStart(format.schema, format);
  }

  /**
   * A constraint to the texts of `format` over the tokenizer's vocabulary: at once when its bytes were
   * gathered before, else a promise.
   */
  static create(
    tokenizer: TextTokenizer,
    vocab: number,
    format: JsonFormat,
    eos: ReadonlySet<number>,
  ): JsonConstraint | Promise<JsonConstraint> {
    let byVocab = vocabularies.get(tokenizer);
    if (!byVocab) vocabularies.set(tokenizer, (byVocab = new Map()));
    let known = byVocab.get(vocab);
    if (known && !(known instanceof Promise)) return new JsonConstraint(known, format, eos, vocab);
    if (!known) {
      const gathering = buildVocabulary(tokenizer, vocab);
      byVocab.set(vocab, (known = gathering));
      gathering.then(
        (v) => byVocab.set(vocab, v),
        () => byVocab.delete(vocab), // a later request tries again
      );
    }
    return known.then((v) => new JsonConstraint(v, format, eos, vocab));
  }

  /** Writes 1 into `mask` ([vocab]) for every token that may come next, 0 for the others. */
  allowed(mask: Uint8Array): void {
    mask.fill(0);
    const s = this.#state;
    const { bytes, order, lcp, plain, spaces } = this.#vocab;
    let any = false;
    if (jsonComplete(s)) {
      const ends = this.#eos.length > 0 ? this.#eos : spaces;
      for (const t of ends) mask[t] = 1;
      any = ends.length > 0;
    } else {
      const inString = jsonTakesPlainText(s);
      const depth = this.#depth;
      const cursor = this.#cursor;
      copyState(s, depth[0]);
      /** Depths 0..known hold the states along the previous token's bytes. */
      let known = 0;
      /** The previous token failed at a prefix of this many bytes; the tokens after it that share it fail too. */
      let failed = 0;
      for (let k = 0; k < order.length; k++) {
        if (failed > 0 && lcp[k] >= failed) continue;
        failed = 0;
        const t = order[k];
        if (inString && plain[t]) {
          mask[t] = 1;
          known = 0;
          any = true;
          continue;
        }
        const b = bytes[t];
        let d = Math.min(lcp[k], known);
        copyState(depth[d], cursor);
        for (; d < b.length; d++) {
          if (!jsonStep(cursor, b[d])) break;
          copyState(cursor, depth[d + 1]);
        }
        known = d;
        if (d === b.length) {
          mask[t] = 1;
          any = true;
        } else failed = d + 1;
      }
    }
    if (!any)
      throw new MoeError(
        'ERR_MOE_CHECKPOINT',
        'JSON mode: no token of the vocabulary continues the JSON text here (a schema no text fits, or a tokenizer without single-byte tokens?)',
      );
  }

  /** Moves past the token chosen (one that allowed() permitted). */
  advance(token: number): void {
    if (jsonComplete(this.#state)) return;
    this.#state = jsonAdvance(this.#state, this.#vocab.bytes[token]) ?? this.#state;
  }
}
