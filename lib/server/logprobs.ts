/**
 * Log probabilities in OpenAI's two shapes: the chat one (`content`: a token's text, bytes, log
 * probability and top alternatives) and the legacy completions one (parallel lists `tokens`,
 * `token_logprobs`, `top_logprobs`, `text_offset`). A request's tokens gather here as they come and
 * go out with the next piece of text, so a streamed chunk carries the tokens whose text it holds.
 */
import type { PromptTokenLogprobs, TokenLogprob } from '../generate/logprobs';
import type { GeneratedToken } from './engine';

/** A token to write: generated (its log probability when asked), or an echoed prompt's (null first). */
type Scored = { token: number; logprob?: number | null; topLogprobs?: TokenLogprob[] };

/** What OpenAI writes for a probability too small for a float (JSON has no -Infinity). */
const LOG_ZERO = -9999;

interface ChatTokenLogprob {
  token: string;
  logprob: number;
  bytes: number[] | null;
}

export class LogprobWriter {
  readonly #bytesOf: ((token: number) => Uint8Array | undefined) | undefined;
  readonly #decoder = new TextDecoder('utf-8');
  #pending: Scored[] = [];
  /** Characters of token text written so far (completions' text_offset). */
  #offset = 0;

  constructor(bytesOf: ((token: number) => Uint8Array | undefined) | undefined) {
    this.#bytesOf = bytesOf;
  }

  add(piece: GeneratedToken): void {
    this.#pending.push(piece);
  }

  /** An echoed prompt's tokens, before the generated ones; the first has no log probability. */
  addPrompt(entries: readonly PromptTokenLogprobs[]): void {
    this.#pending.push(...entries);
  }

  get pending(): number {
    return this.#pending.length;
  }

  /** The chat shape of the tokens gathered since the last call. */
  takeChat(): { content: (ChatTokenLogprob & { top_logprobs: ChatTokenLogprob[] })[]; refusal: null } {
    const content = this.#take().map((p) => ({
      ...this.#entry(p.token, p.logprob),
      top_logprobs: (p.topLogprobs ?? []).map((t) => this.#entry(t.token, t.logprob)),
    }));
    return { content, refusal: null };
  }

  /**
   * The completions shape of the tokens gathered since the last call; each `top_logprobs` map holds
   * the alternatives and the token itself (two tokens of the same text keep the likelier's value).
   */
  takeCompletion(): {
    tokens: string[];
    token_logprobs: (number | null)[];
    top_logprobs: (Record<string, number> | null)[];
    text_offset: number[];
  } {
    const out = {
      tokens: [] as string[],
      token_logprobs: [] as (number | null)[],
      top_logprobs: [] as (Record<string, number> | null)[],
      text_offset: [] as number[],
    };
    for (const p of this.#take()) {
      const { token, logprob } = this.#entry(p.token, p.logprob);
      out.tokens.push(token);
      out.text_offset.push(this.#offset);
      this.#offset += token.length;
      if (p.logprob === null) {
        // An echoed prompt's first token: nothing comes before it.
        out.token_logprobs.push(null);
        out.top_logprobs.push(null);
        continue;
      }
      const top = Object.create(null) as Record<string, number>; // a token may read '__proto__'
      for (const t of [...(p.topLogprobs ?? []), p]) {
        const e = this.#entry(t.token, t.logprob);
        if (!Object.hasOwn(top, e.token)) top[e.token] = e.logprob;
      }
      out.token_logprobs.push(logprob);
      out.top_logprobs.push(top);
    }
    return out;
  }

  #take(): Scored[] {
    const taken = this.#pending;
    this.#pending = [];
    return taken;
  }

  #entry(token: number, logprob: number | null | undefined): ChatTokenLogprob {
    const lp = typeof logprob === 'number' && Number.isFinite(logprob) ? logprob : LOG_ZERO;
    const bytes = this.#bytesOf?.(token);
    if (!bytes) return { token: `token_id:${token}`, logprob: lp, bytes: null };
    return { token: this.#decoder.decode(bytes), logprob: lp, bytes: Array.from(bytes) };
  }
}
