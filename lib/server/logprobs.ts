/**
 * Log probabilities in OpenAI's two shapes: the chat one (`content`: a token's text, bytes, log
 * probability and top alternatives) and the legacy completions one (parallel lists `tokens`,
 * `token_logprobs`, `top_logprobs`, `text_offset`). A request's tokens gather here as they come and
 * go out with the next piece of text, so a streamed chunk carries the tokens whose text it holds.
 */
import type { GeneratedToken } from './engine';

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
  #pending: GeneratedToken[] = [];
  /** Characters of token text written so far (completions' text_offset). */
  #offset = 0;

  constructor(bytesOf: ((token: number) => Uint8Array | undefined) | undefined) {
    this.#bytesOf = bytesOf;
  }

  add(piece: GeneratedToken): void {
    this.#pending.push(piece);
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
    token_logprobs: number[];
    top_logprobs: Record<string, number>[];
    text_offset: number[];
  } {
    const out = {
      tokens: [] as string[],
      token_logprobs: [] as number[],
      top_logprobs: [] as Record<string, number>[],
      text_offset: [] as number[],
    };
    for (const p of this.#take()) {
      const { token, logprob } = this.#entry(p.token, p.logprob);
      const top = Object.create(null) as Record<string, number>; // a token may read '__proto__'
      for (const t of [...(p.topLogprobs ?? []), p]) {
        const e = this.#entry(t.token, t.logprob);
        if (!Object.hasOwn(top, e.token)) top[e.token] = e.logprob;
      }
      out.tokens.push(token);
      out.token_logprobs.push(logprob);
      out.top_logprobs.push(top);
      out.text_offset.push(this.#offset);
      this.#offset += token.length;
    }
    return out;
  }

  #take(): GeneratedToken[] {
    const taken = this.#pending;
    this.#pending = [];
    return taken;
  }

  #entry(token: number, logprob: number | undefined): ChatTokenLogprob {
    const lp = logprob !== undefined && Number.isFinite(logprob) ? logprob : LOG_ZERO;
    const bytes = this.#bytesOf?.(token);
    if (!bytes) return { token: `token_id:${token}`, logprob: lp, bytes: null };
    return { token: this.#decoder.decode(bytes), logprob: lp, bytes: Array.from(bytes) };
  }
}
