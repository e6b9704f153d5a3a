/**
 * Continuous batching: one step loop per model. Each step decodes one token for every running request
 * and adds prompt tokens of requests still reading their prompt, up to TOKENS_PER_STEP tokens in all
 * (decode tokens included), in one native call (each expert's weights are read once per step for every token that picked
 * it). A long prompt thus joins in chunks and never stalls the streams already running. At most
 * maxSequences requests run; the others wait in arrival order.
 *
 * Finished sequences keep their KV cache as prefixes. A new request whose prompt starts with the
 * tokens of a kept sequence takes it over and only feeds the rest, so the next turn of a chat does not
 * recompute the conversation so far. A prompt sharing at least a cache block's worth of leading tokens
 * with a kept or running sequence forks it instead (MoeModel.forkSequence: the full blocks shared, not
 * copied), so requests with one system prompt, or the `n` choices of one request, compute it once; a
 * request whose prompt a running request is still computing waits for it rather than computing it
 * beside it. Kept prefixes are dropped least recently used first when a step needs their cache
 * blocks, and beyond maxSequences of them.
 *
 * A cache smaller than maxSequences full contexts (cacheTokens) admits a request when its tokens fit
 * beside the running ones; when the running ones outgrow it (or model.logits needs room), those
 * started last give their blocks back and wait first in line, to compute their tokens anew.
 */
import { type DecoderConfig, positionCost } from '../model/config';
import type { ModelSequence, StepEntry } from '../model/model';
import { StreamDecoder } from '../text/stream';
import type { TextTokenizer } from '../text/tokenizer';
import { MoeError } from '../errors';
import { CacheLedger } from './cache-ledger';
import type { JsonConstraint } from './json-constraint';
import { LogprobRequest, PromptTokenLogprobs, TokenLogprob, TokenLogprobs, tokenLogprobs } from './logprobs';
import { Sampler, SamplingParams } from './sampling';
import { StopMatcher } from './stop';

/**
 * A step's work: at most what a 256-token prompt alone costs (positionCost() counts a token's
 * attention to the positions before it), decode tokens included, so a long prompt delays the running
 * streams by about that much per step however deep into its context the chunk lies.
 */
export const TOKENS_PER_STEP = 256;
/** Prompt tokens a step may always add, however many streams decode (so prompts never starve). */
const MIN_PROMPT_TOKENS_PER_STEP = 16;
/**
 * Prompt tokens a step feeds of a request that scores its prompt: each needs its row of logits (the LM
 * head, and vocab floats of memory), which the step's budget does not count.
 */
const SCORED_PROMPT_TOKENS_PER_STEP = 32;
const NO_SCORING: LogprobRequest = { output: false, prompt: false, top: 0 };

export type FinishReason = 'stop' | 'length' | 'abort';

export interface GenerationPiece {
  /** The token sampled. */
  token: number;
  /** Text that became final with it ('' while a character or a possible stop string is incomplete). */
  text: string;
  /** With the `logprobs` option: the token's log probability under the model. */
  logprob?: number;
  /** With `logprobs` and `topLogprobs`: the step's most likely tokens, most likely first. */
  topLogprobs?: TokenLogprob[];
  /** With `promptLogprobs`, on the first piece only: one entry per prompt token. */
  promptLogprobs?: PromptTokenLogprobs[];
}

export interface GenerationResult {
  text: string;
  /** Every token sampled, the end-of-sequence token included when it ended the generation. */
  tokens: number[];
  finishReason: FinishReason;
  usage: {
    promptTokens: number;
    completionTokens: number;
    totalTokens: number;
    /** Prompt tokens whose KV cache was reused from an earlier request rather than computed. */
    cachedPromptTokens: number;
  };
  /** With the `logprobs` option: one entry per token of `tokens`. */
  logprobs?: TokenLogprobs[];
  /** With the `promptLogprobs` option: one entry per prompt token (the first has no log probability). */
  promptLogprobs?: PromptTokenLogprobs[];
}

/** What the engine uses of MoeModel (its internal sequence API). */
export interface EngineModel {
  readonly config: DecoderConfig;
  /** cacheTokens: positions of the KV cache, a whole number of blocks. */
  readonly options: Readonly<{ contextLength: number; maxSequences: number; quantize: string; cacheTokens: number }>;
  readonly cacheBlockTokens: number;
  createSequence(): ModelSequence;
  step(batch: readonly StepEntry[], options?: { reuseLogits?: boolean }): Promise<Float32Array[]>;
  freeSequence(sequence: ModelSequence): void;
  forkSequence(sequence: ModelSequence, length: number): Promise<ModelSequence>;
  truncateSequence(sequence: ModelSequence, length: number): Promise<void>;
}

/** One generate() call: its prompt, sampling state, output channel. */
export class Request {
  readonly sampler: Sampler;
  readonly decoder: StreamDecoder | null;
  readonly stop: StopMatcher | null;
  /** Prompt, then every sampled token: what the repetition penalty sees. */
  readonly tokens: number[];
  readonly generated: number[] = [];
  /** Entries of the generated tokens when their log probabilities are asked for. */
  readonly logprobs: TokenLogprobs[] | null;
  /** Entries of the prompt's tokens when their log probabilities are asked for, filled as it is fed. */
  readonly promptLogprobs: PromptTokenLogprobs[] | null;
  /** JSON mode: the tokens that may come next. */
  json: JsonConstraint | null = null;
  sequence: ModelSequence | null = null;
  /** Tokens of `tokens` that are in the sequence's cache or in the step running. */
  fed = 0;
  /** Prompt tokens reused from another sequence's cache when the request first started. */
  cached = 0;
  /** Whether the request has run (a preempted one waits again, to compute its tokens anew). */
  started = false;
  text = '';
  done = false;
  readonly #pieces: GenerationPiece[] = [];
  /** Callers of next() waiting for a piece or the end, in the order they called. */
  #waiters: (() => void)[] = [];
  #result: GenerationResult | null = null;
  #error: unknown = null;
  /** Called once when the request ends, however it ends. */
  onEnd: (() => void) | null = null;

  constructor(
    readonly prompt: readonly number[],
    params: SamplingParams,
    readonly maxTokens: number,
    stop: string[],
    tokenizer: TextTokenizer | undefined,
    readonly eos: ReadonlySet<number>,
    /** Which log probabilities to give, and how many alternatives each token lists. */
    readonly scoring: LogprobRequest = NO_SCORING,
  ) {
    this.logprobs = scoring.output ? [] : null;
    this.promptLogprobs = scoring.prompt ? [{ token: prompt[0], logprob: null, topLogprobs: [] }] : null;
    this.sampler = new Sampler(params);
    this.decoder = tokenizer ? new StreamDecoder(tokenizer) : null;
    this.stop = stop.length > 0 ? new StopMatcher(stop) : null;
    this.tokens = prompt.slice();
  }

  emit(piece: GenerationPiece): void {
    this.text += piece.text;
    this.#pieces.push(piece);
    this.#notify();
  }

  finish(reason: FinishReason): void {
    if (this.done) return;
    this.done = true;
    const n = this.generated.length;
    this.#result = {
      text: this.text,
      tokens: this.generated.slice(),
      finishReason: reason,
      usage: {
        promptTokens: this.prompt.length,
        completionTokens: n,
        totalTokens: this.prompt.length + n,
        cachedPromptTokens: this.cached,
      },
      ...(this.logprobs ? { logprobs: this.logprobs.slice() } : {}),
      ...(this.promptLogprobs ? { promptLogprobs: this.promptLogprobs } : {}),
    };
    this.onEnd?.();
    this.#notify();
  }

  fail(err: unknown): void {
    if (this.done) return;
    this.done = true;
    this.#error = err;
    this.onEnd?.();
    this.#notify();
  }

  /** The next piece, or the result once the pieces are exhausted (rejects with a failure). */
  async next(): Promise<IteratorResult<GenerationPiece, GenerationResult>> {
    for (;;) {
      const piece = this.#pieces.shift();
      if (piece) return { value: piece, done: false };
      if (this.#error !== null) throw this.#error;
      if (this.#result) return { value: this.#result, done: true };
      await new Promise<void>((resolve) => this.#waiters.push(resolve));
    }
  }

  #notify(): void {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const wake of waiters) wake();
  }
}

function pieceOf(r: Request, token: number, text: string, scored: TokenLogprobs | null): GenerationPiece {
  const piece: GenerationPiece = { token, text };
  if (scored) {
    piece.logprob = scored.logprob;
    if (scored.topLogprobs.length > 0) piece.topLogprobs = scored.topLogprobs;
  }
  if (r.promptLogprobs && r.generated.length === 1) piece.promptLogprobs = r.promptLogprobs;
  return piece;
}

interface Kept {
  sequence: ModelSequence;
  /** The tokens in its cache. */
  tokens: number[];
}

/** Where a new request's prompt can start: a kept or running sequence, and the tokens they share. */
interface PrefixSource {
  kept: Kept | null;
  running: Request | null;
  common: number;
  /** A running request is still computing a longer part of the prompt: wait for it. */
  wait: boolean;
}

/** A request's draw after a step: the row of logits it draws from, and its JSON mask. */
interface Draw {
  request: Request;
  logits: Float32Array;
  allowed: Uint8Array | undefined;
}

/** Whether a request's next step decodes one token (its prompt, or its recomputed tokens, are in). */
function decoding(r: Request): boolean {
  return r.fed >= r.prompt.length && r.fed === r.tokens.length - 1;
}

/** Whether a request still scores prompt tokens (promptLogprobs), whose rows its chunks return. */
function scoring(r: Request): boolean {
  return r.promptLogprobs !== null && r.promptLogprobs.length < r.prompt.length;
}

/** How many leading tokens a and b share, at most `limit`. */
function commonLength(a: readonly number[], b: readonly number[], limit: number): number {
  const n = Math.min(limit, a.length, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

export class Engine {
  readonly #model: EngineModel;
  readonly #waiting: Request[] = [];
  readonly #running: Request[] = [];
  /** Kept prefixes, least recently used first. */
  readonly #kept: Kept[] = [];
  readonly #ledger: CacheLedger;
  /** positionCost() of the model, and the work of a TOKENS_PER_STEP-token prompt alone in those units. */
  readonly #positionCost: number;
  #stepBudget = 0;
  readonly #masks: Uint8Array[] = [];
  #preemptions = 0;
  #looping = false;
  /**
   * Logits that a step's draws (those that do more than an argmax) read at least, for them to run off
   * the JavaScript thread: about 1 ms of draws on two cores (7 streams of Qwen3's 151,936 logits with a
   * temperature) against the ~0.1 ms a trip to libuv's thread and back costs. Tests lower it.
   * @internal
   */
  static asyncDrawLogits = 1 << 20;
  /** Called once a batch of draws has left for libuv's thread (tests: what lands while it runs). @internal */
  static onDrawsAway: (() => void) | null = null;

  constructor(model: EngineModel) {
    this.#model = model;
    this.#ledger = new CacheLedger(model.cacheBlockTokens, model.options.cacheTokens / model.cacheBlockTokens);
    this.#positionCost = positionCost(model.config, model.options.quantize);
    for (let p = 0; p < TOKENS_PER_STEP; p++) this.#stepBudget += this.#tokenCost(p);
  }

  /** Queues a request; the loop starts if it was idle. */
  submit(request: Request): void {
    this.#waiting.push(request);
    if (!this.#looping) {
      this.#looping = true;
      void this.#loop();
    }
  }

  /** Ends a request now (abort, or its consumer stopped reading); its sequence is freed at the next step. */
  cancel(request: Request): void {
    const i = this.#waiting.indexOf(request);
    if (i >= 0) this.#waiting.splice(i, 1);
    request.finish('abort');
  }

  /**
   * Makes room for `positions` more in the cache once the steps already queued have run (their frees
   * are queued before the caller's next call): kept prefixes go first, least recently used first, then
   * running generations, the ones started last first, which wait to compute their tokens anew.
   */
  makeRoom(positions: number): void {
    const need = this.#ledger.blocks(positions);
    while (this.#kept.length > 0 && this.#ledger.free < need) this.#evict();
    for (let i = this.#running.length - 1; i >= 0 && this.#ledger.free < need; i--)
      if (!scoring(this.#running[i])) this.#preempt(this.#running[i]);
  }

  /**
   * Requests running and waiting, prefixes kept, and the cache positions no sequence holds once the
   * steps planned have run (for tests and diagnostics).
   */
  get stats(): { running: number; waiting: number; kept: number; freeCachePositions: number; preemptions: number } {
    return {
      running: this.#running.length,
      waiting: this.#waiting.length,
      kept: this.#kept.length,
      freeCachePositions: this.#ledger.free * this.#ledger.blockTokens,
      preemptions: this.#preemptions,
    };
  }

  async #loop(): Promise<void> {
    try {
      while (this.#running.length > 0 || this.#waiting.length > 0) {
        this.#reap();
        await this.#admit();
        const batch = this.#plan();
        if (batch.length === 0) continue;
        let logits: Float32Array[];
        try {
          // The sampler reads each row before the next step: the model's logits buffer serves every step.
          logits = await this.#model.step(
            batch.map((b) => ({ sequence: b.request.sequence!, tokens: b.tokens, all: b.scored })),
            { reuseLogits: true },
          );
        } catch (err) {
          for (const { request } of batch) this.#end(request, null, err);
          continue;
        }
        // A request whose sampling or detokenizing fails (logits no token can come from, a tokenizer
        // that throws) ends with that error; the others go on.
        const draws: Draw[] = [];
        batch.forEach((b, i) => {
          try {
            const row = b.scored ? this.#scorePrompt(b.request, logits[i], b.tokens.length) : logits[i];
            const r = b.request;
            if (r.done || r.fed < r.tokens.length) return;
            draws.push({
              request: r,
              logits: row,
              allowed: r.json ? this.#mask(draws.length, row.length, r.json) : undefined,
            });
          } catch (err) {
            this.#end(b.request, null, err);
          }
        });
        // Every request's draw at once (spread over the pool's threads; off the JavaScript thread when
        // they would hold it for a millisecond or more), then each takes its token.
        const spec = draws.map(({ request: r, logits, allowed }) => ({
          sampler: r.sampler,
          logits,
          history: r.tokens,
          output: r.generated,
          allowed,
        }));
        const work = draws.reduce((a, d) => a + (d.request.sampler.plainGreedy && !d.allowed ? 0 : d.logits.length), 0);
        let tokens: (number | Error)[];
        try {
          if (work >= Engine.asyncDrawLogits) {
            const away = Sampler.sampleAllAsync(spec);
            Engine.onDrawsAway?.();
            tokens = await away;
          } else {
            tokens = Sampler.sampleAll(spec);
          }
        } catch (err) {
          for (const d of draws) this.#end(d.request, null, err);
          continue;
        }
        draws.forEach((d, i) => {
          // Aborted while the draws ran: nothing to take. Preempted then (its cache given back for
          // model.logits), the token still follows from its logits, and it waits to compute it.
          if (d.request.done) return;
          try {
            const token = tokens[i];
            if (token instanceof Error) throw token;
            this.#advance(d.request, d.logits, token);
          } catch (err) {
            this.#end(d.request, null, err);
          }
        });
      }
    } catch (err) {
      // Nothing above should throw; if it does, every request ends with the error rather than waiting
      // forever (and the process does not die of an unhandled rejection).
      for (const r of [...this.#running, ...this.#waiting.splice(0)]) this.#end(r, null, err);
    } finally {
      this.#looping = false;
    }
  }

  /** Frees the sequences of requests that ended outside the loop (abort). */
  #reap(): void {
    for (const r of this.#running.slice()) if (r.done) this.#end(r, null);
  }

  /**
   * Starts waiting requests, in order, while fewer than maxSequences run and the cache has room for
   * their tokens (kept prefixes give way); one whose prompt a running request is still computing waits
   * for it (the ones after it may start).
   */
  async #admit(): Promise<void> {
    for (let i = 0; i < this.#waiting.length && this.#running.length < this.#model.options.maxSequences;) {
      const request = this.#waiting[i];
      if (request.done) {
        this.#waiting.splice(i, 1);
        continue;
      }
      // A prompt to score is computed whole: a kept prefix has no logits for its positions.
      const source = scoring(request) ? null : this.#longestPrefix(request.tokens);
      if (source?.wait) {
        i++;
        continue;
      }
      if (source?.kept) this.#kept.push(this.#kept.splice(this.#kept.indexOf(source.kept), 1)[0]); // most recently used
      if (!(await this.#makeRoomFor(request, source))) {
        if (this.#running.length > 0) break; // it waits for them, and those behind it wait too
        // Nothing runs and it does not fit: never so with a cache of at least one context.
        this.#waiting.splice(i, 1);
        request.fail(new MoeError('ERR_MOE_OUT_OF_MEMORY', 'the KV cache has no room for this request'));
        continue;
      }
      this.#waiting.splice(i, 1);
      try {
        await this.#start(request, source);
        this.#running.push(request);
      } catch (err) {
        if (request.sequence) this.#release(request.sequence);
        request.sequence = null;
        request.fail(err);
      }
    }
  }

  /**
   * Whether the cache has room for a request's tokens beside the running ones, once kept prefixes
   * other than its source gave way. Without room beside a kept source it would fork, that source is
   * cut back to what the two share and taken over (so with nothing running, a request always fits).
   */
  async #makeRoomFor(request: Request, source: PrefixSource | null): Promise<boolean> {
    const ledger = this.#ledger;
    const kept = source?.kept ?? null;
    const common = source?.common ?? 0;
    const need = () => {
      const own =
        kept && common === kept.tokens.length
          ? ledger.blocks(common) // taken over
          : common >= ledger.blockTokens
            ? Math.floor(common / ledger.blockTokens) // forked (a partly filled block is copied)
            : 0;
      return ledger.blocks(request.tokens.length) - own;
    };
    while (ledger.free < need() && this.#kept.length > (kept ? 1 : 0)) this.#evict();
    if (ledger.free >= need()) return true;
    if (!kept || common === 0 || (ledger.truncateCopies(kept.sequence, common) && ledger.free < 1)) return false;
    await this.#model.truncateSequence(kept.sequence, common);
    ledger.truncate(kept.sequence, common);
    kept.tokens.length = common;
    return ledger.free >= need();
  }

  /** Gives a starting request its sequence: a kept one taken over, a fork, or a new one. */
  async #start(request: Request, source: PrefixSource | null): Promise<void> {
    const { kept, running, common } = source ?? { kept: null, running: null, common: 0 };
    let reused = 0;
    if (kept && common === kept.tokens.length) {
      this.#kept.splice(this.#kept.indexOf(kept), 1);
      request.sequence = kept.sequence;
      reused = common;
    } else if ((kept || running) && common >= this.#model.cacheBlockTokens) {
      // #makeRoomFor left a free block for a partly filled last one, which the fork copies.
      const from = kept ? kept.sequence : running!.sequence!;
      reused = common;
      request.sequence = await this.#model.forkSequence(from, reused);
      this.#ledger.fork(from, request.sequence, reused);
    } else {
      request.sequence = this.#model.createSequence();
    }
    request.fed = reused;
    if (!request.started) request.cached = reused;
    request.started = true;
  }

  /**
   * The kept or running sequence sharing the most leading tokens with `tokens` (leaving at least one
   * token to feed; a kept one on a tie), and whether a running request still computing its tokens
   * would give at least a block more.
   */
  #longestPrefix(tokens: readonly number[]): PrefixSource {
    const limit = tokens.length - 1;
    const best: PrefixSource = { kept: null, running: null, common: 0, wait: false };
    for (const k of this.#kept) {
      const n = commonLength(k.tokens, tokens, limit);
      if (n > best.common) Object.assign(best, { kept: k, common: n });
    }
    let pending = 0;
    for (const r of this.#running) {
      if (!r.sequence || r.done) continue;
      const n = commonLength(r.tokens, tokens, Math.min(limit, r.sequence.length));
      if (n > best.common) Object.assign(best, { kept: null, running: r, common: n });
      if (r.tokens.length - r.fed > 1) pending = Math.max(pending, commonLength(r.tokens, tokens, limit));
    }
    best.wait = pending >= best.common + this.#model.cacheBlockTokens;
    return best;
  }

  /** The work of the token at `position` of its sequence, in units of one token's weight work. */
  #tokenCost(position: number): number {
    const window = this.#model.config.slidingWindow;
    const seen = window > 0 ? Math.min(position + 1, window) : position + 1;
    return 1 + this.#positionCost * seen;
  }

  /**
   * This step's entries: one token of each decoding request, then prompt chunks while the step's work
   * stays within that of a TOKENS_PER_STEP-token prompt alone (but at least MIN_PROMPT_TOKENS_PER_STEP
   * prompt tokens when a prompt is waiting).
   */
  #plan(): { request: Request; tokens: number[]; scored: boolean }[] {
    const batch: { request: Request; tokens: number[]; scored: boolean }[] = [];
    let budget = this.#stepBudget;
    for (const r of this.#running) if (decoding(r)) budget -= this.#tokenCost(r.fed);
    let minimum = MIN_PROMPT_TOKENS_PER_STEP;
    for (const r of this.#running) {
      if (decoding(r)) {
        batch.push({ request: r, tokens: r.tokens.slice(r.fed, r.fed + 1), scored: false });
        continue;
      }
      // A prompt, or the tokens of a preempted request computed anew.
      const scored = scoring(r);
      let n = 0;
      for (; r.fed + n < r.tokens.length; n++) {
        const cost = this.#tokenCost(r.fed + n);
        if ((cost > budget && n >= minimum) || (scored && n >= SCORED_PROMPT_TOKENS_PER_STEP)) break;
        budget -= cost;
      }
      minimum = Math.max(0, minimum - n);
      if (n > 0) batch.push({ request: r, tokens: r.tokens.slice(r.fed, r.fed + n), scored });
    }
    const growth = (b: (typeof batch)[number]) =>
      this.#ledger.growth(b.request.sequence!, b.request.fed + b.tokens.length);
    let need = batch.reduce((sum, b) => sum + growth(b), 0);
    while (this.#kept.length > 0 && this.#ledger.free < need) this.#evict();
    // A cache smaller than maxSequences full contexts: the requests started last give their blocks
    // back and wait again, to compute their tokens anew (the same bits) when there is room.
    for (let i = batch.length - 1; i > 0 && this.#ledger.free < need; i--) {
      if (scoring(batch[i].request)) continue; // its prompt's scores so far would be computed twice
      need -= growth(batch[i]);
      this.#preempt(batch.splice(i, 1)[0].request);
    }
    for (const b of batch) {
      b.request.fed += b.tokens.length;
      this.#ledger.grow(b.request.sequence!, b.request.fed);
    }
    return batch;
  }

  /** Frees a running request's sequence and puts it first in line again. */
  #preempt(r: Request): void {
    this.#running.splice(this.#running.indexOf(r), 1);
    this.#release(r.sequence!);
    r.sequence = null;
    r.fed = 0;
    this.#waiting.unshift(r);
    this.#preemptions++;
  }

  /**
   * Scores the prompt tokens that the rows of a chunk's `count` tokens predict (row k, the token after
   * the chunk's k-th); returns the last row, the logits of the token to sample.
   */
  #scorePrompt(r: Request, rows: Float32Array, count: number): Float32Array {
    const V = this.#model.config.vocabSize;
    const start = r.fed - count;
    for (let k = 0; k < count && !r.done; k++) {
      const next = start + k + 1;
      if (next < r.prompt.length)
        r.promptLogprobs!.push(tokenLogprobs(rows.subarray(k * V, (k + 1) * V), r.prompt[next], r.scoring.top));
    }
    return rows.subarray((count - 1) * V, count * V);
  }

  /**
   * After a step: takes the token drawn for a request whose prompt is complete (from `logits`) and emits
   * it. The last piece (end-of-sequence, maxTokens, a full context) also carries what the detokenizer
   * and the stop matcher held back; a stop string ends the request with the text before it.
   */
  #advance(r: Request, logits: Float32Array, token: number): void {
    r.json?.advance(token);
    const scored = r.logprobs ? tokenLogprobs(logits, token, r.scoring.top) : null;
    r.generated.push(token);
    if (scored) r.logprobs!.push(scored);
    r.tokens.push(token);
    const eos = r.eos.has(token);
    // The positions feeding the token takes (r.fed + 1, unless a preemption while the draws ran reset r.fed).
    const last = eos || r.generated.length >= r.maxTokens || r.tokens.length > this.#model.options.contextLength;
    let text = eos || !r.decoder ? '' : r.decoder.push(token);
    if (last && r.decoder) text += r.decoder.flush();
    if (r.stop) {
      const match = r.stop.push(text);
      if (match.stopped) {
        r.emit(pieceOf(r, token, match.text, scored));
        this.#end(r, 'stop');
        return;
      }
      text = last ? match.text + r.stop.flush() : match.text;
    }
    r.emit(pieceOf(r, token, text, scored));
    if (last) this.#end(r, eos ? 'stop' : 'length');
  }

  /** Ends a request: keeps its cache as a prefix, or frees it when it was aborted or failed. */
  #end(r: Request, reason: FinishReason | null, error?: unknown): void {
    const i = this.#running.indexOf(r);
    if (i >= 0) this.#running.splice(i, 1);
    const w = this.#waiting.indexOf(r); // preempted while its draw ran
    if (w >= 0) this.#waiting.splice(w, 1);
    const sequence = r.sequence;
    r.sequence = null;
    if (error !== undefined) r.fail(error);
    else if (reason) r.finish(reason);
    if (!sequence || sequence.freed) return;
    if (reason === null || error !== undefined || sequence.length === 0) {
      this.#release(sequence);
      return;
    }
    const tokens = r.tokens.slice(0, sequence.length);
    // A kept prefix of these tokens is of no more use: whatever would start from it can fork this one.
    for (const k of this.#kept.slice())
      if (commonLength(k.tokens, tokens, k.tokens.length) === k.tokens.length) this.#drop(k);
    this.#kept.push({ sequence, tokens });
    while (this.#kept.length > this.#model.options.maxSequences) this.#evict();
  }

  /** The k-th draw's JSON mask of a step, filled by its constraint (the buffers serve every step). */
  #mask(k: number, vocab: number, json: JsonConstraint): Uint8Array {
    let mask = this.#masks[k];
    if (!mask || mask.length !== vocab) mask = this.#masks[k] = new Uint8Array(vocab);
    json.allowed(mask);
    return mask;
  }

  #evict(): void {
    const k = this.#kept[0];
    if (k) this.#drop(k);
  }

  #drop(k: Kept): void {
    this.#kept.splice(this.#kept.indexOf(k), 1);
    this.#release(k.sequence);
  }

  /** Frees a sequence and gives its blocks back to the ledger (those of a step queued included). */
  #release(sequence: ModelSequence): void {
    this.#ledger.release(sequence);
    this.#model.freeSequence(sequence);
  }
}
