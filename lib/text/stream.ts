/**
 * Streaming detokenisation: text of a growing list of ids, piece by piece. A token may hold part of a
 * UTF-8 character (byte-level BPE, byte fallback), and some decoders treat the first token
 * differently (SentencePiece drops its leading space), so each piece is the difference between the
 * decodes of a short window with and without the new tokens; the window starts at the tokens of the
 * last piece that held text. Text that ends in U+FFFD (bytes of a character still incomplete) is held back until the
 * character completes or the stream is flushed. The pieces join to exactly the decode of all ids.
 */
import type { TextTokenizer } from './tokenizer';

export class StreamDecoder {
  readonly #tokenizer: TextTokenizer;
  readonly #ids: number[] = [];
  /** Ids in [start, emitted) are the context of the window; their text was emitted. */
  #start = 0;
  #emitted = 0;

  constructor(tokenizer: TextTokenizer) {
    this.#tokenizer = tokenizer;
  }

  /** Adds one id; returns the text that is now final ('' while a character is incomplete). */
  push(id: number): string {
    this.#ids.push(id);
    const before = this.#tokenizer.decode(this.#ids.slice(this.#start, this.#emitted));
    const all = this.#tokenizer.decode(this.#ids.slice(this.#start));
    if (all.endsWith('\uFFFD') || !all.startsWith(before)) return '';
    const piece = all.slice(before.length);
    // The window moves on only past tokens that gave text: a decoder may strip the first space of what
    // it decodes, which must fall on text already emitted, never on the next piece.
    if (piece.length > 0) this.#start = this.#emitted;
    this.#emitted = this.#ids.length;
    return piece;
  }

  /** The text held back (an incomplete character decodes as U+FFFD); the stream then starts afresh. */
  flush(): string {
    const before = this.#tokenizer.decode(this.#ids.slice(this.#start, this.#emitted));
    const all = this.#tokenizer.decode(this.#ids.slice(this.#start));
    this.#ids.length = 0;
    this.#start = this.#emitted = 0;
    return all.startsWith(before) ? all.slice(before.length) : all;
  }
}
