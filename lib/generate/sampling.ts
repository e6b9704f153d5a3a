/**
 * Choosing the next token from a row of logits: the logit bias, the repetition penalty, the presence
 * and frequency penalties (OpenAI's), then temperature, top-k, top-p and min-p (the order Hugging
 * Face's generate applies them), then one draw from the request's own PRNG. A request's tokens depend
 * only on its logits, its output so far and its seed, never on what else runs.
 */
import { binding, NativeDraw, NativeSampler } from '../binding';
import { argRangeError, argTypeError, fromNative, MoeError } from '../errors';
import { describe } from '../validate';

export interface SamplingOptions {
  /** 0: greedy (argmax); default 1. */
  temperature?: number;
  /** Keep the k most likely tokens; 0 (default): all. */
  topK?: number;
  /** Keep the smallest set of most likely tokens whose probability reaches topP, in (0, 1]; default 1. */
  topP?: number;
  /** Keep tokens at least minP times as likely as the most likely one, in [0, 1]; default 0. */
  minP?: number;
  /** Divides positive (multiplies negative) logits of tokens already in the prompt or output; default 1. */
  repetitionPenalty?: number;
  /** Subtracted once from the logit of every token already in the output, in [-2, 2]; default 0. */
  presencePenalty?: number;
  /** Subtracted from a token's logit once for each time it is in the output, in [-2, 2]; default 0. */
  frequencyPenalty?: number;
  /**
   * Added to the logits of the token ids given as keys (`{ 50256: -100 }`), in [-100, 100], before
   * anything else; -100 all but bans a token and 100 all but forces it.
   */
  logitBias?: Readonly<Record<number, number>>;
  /** Seed of the request's PRNG (a non-negative integer); default: a random one. */
  seed?: number;
}

/** Checked sampling options (checkSampling); the penalties and the bias may be left out (none). */
export interface SamplingParams extends Required<
  Omit<SamplingOptions, 'presencePenalty' | 'frequencyPenalty' | 'logitBias'>
> {
  presencePenalty?: number;
  frequencyPenalty?: number;
  /** Token id to bias. */
  logitBias?: ReadonlyMap<number, number>;
}

/** OpenAI's bounds on the presence and frequency penalties, and on a logit bias. */
const MAX_PENALTY = 2;
const MAX_BIAS = 100;

function finite(name: string, v: unknown, fallback: number, ok: (x: number) => boolean, expected: string): number {
  if (v === undefined) return fallback;
  if (typeof v !== 'number') throw argTypeError(`${name} must be a number, got ${describe(v)}`);
  if (!Number.isFinite(v) || !ok(v)) throw argRangeError(`${name} must be ${expected}, got ${v}`);
  return v;
}

/**
 * `logitBias` checked into a map: a plain object whose keys are token ids below `vocab` (when given)
 * and whose values are numbers in [-100, 100]. A bias of 0 is left out.
 */
export function checkLogitBias(name: string, v: unknown, vocab: number | undefined): ReadonlyMap<number, number> {
  const out = new Map<number, number>();
  if (v === undefined) return out;
  const proto = v !== null && typeof v === 'object' ? (Object.getPrototypeOf(v) as unknown) : undefined;
  if (proto !== Object.prototype && proto !== null)
    throw argTypeError(`${name} must be a plain object of token id -> bias, got ${describe(v)}`);
  for (const [key, bias] of Object.entries(v as Record<string, unknown>)) {
    const id = Number(key);
    if (!/^(0|[1-9][0-9]*)$/.test(key) || !Number.isSafeInteger(id) || (vocab !== undefined && id >= vocab))
      throw argRangeError(
        `${name}: every key must be a token id${vocab !== undefined ? ` in [0, ${vocab})` : ''}, got ${JSON.stringify(key)}`,
      );
    if (typeof bias !== 'number') throw argTypeError(`${name}[${key}] must be a number, got ${describe(bias)}`);
    if (!Number.isFinite(bias) || Math.abs(bias) > MAX_BIAS)
      throw argRangeError(`${name}[${key}] must be in [-${MAX_BIAS}, ${MAX_BIAS}], got ${bias}`);
    if (bias !== 0) out.set(id, bias);
  }
  return out;
}

/**
 * Checks the sampling fields of `options` (named `name`); a field left out takes `defaults` (the
 * checkpoint's generation_config.json), else the built-in default. With `vocab`, the ids of
 * `logitBias` must be below it.
 */
export function checkSampling(
  name: string,
  o: Record<string, unknown>,
  defaults: Omit<SamplingOptions, 'seed'> = {},
  vocab?: number,
): SamplingParams {
  const penalty = (key: 'presencePenalty' | 'frequencyPenalty') =>
    finite(`${name}.${key}`, o[key], 0, (x) => Math.abs(x) <= MAX_PENALTY, `in [-${MAX_PENALTY}, ${MAX_PENALTY}]`);
  return {
    presencePenalty: penalty('presencePenalty'),
    frequencyPenalty: penalty('frequencyPenalty'),
    logitBias: checkLogitBias(`${name}.logitBias`, o.logitBias, vocab),
    temperature: finite(
      `${name}.temperature`,
      o.temperature,
      defaults.temperature ?? 1,
      (x) => x >= 0,
      'a number >= 0',
    ),
    topK: finite(`${name}.topK`, o.topK, defaults.topK ?? 0, (x) => Number.isInteger(x) && x >= 0, `an integer >= 0`),
    topP: finite(`${name}.topP`, o.topP, defaults.topP ?? 1, (x) => x > 0 && x <= 1, 'in (0, 1]'),
    minP: finite(`${name}.minP`, o.minP, defaults.minP ?? 0, (x) => x >= 0 && x <= 1, 'in [0, 1]'),
    repetitionPenalty: finite(
      `${name}.repetitionPenalty`,
      o.repetitionPenalty,
      defaults.repetitionPenalty ?? 1,
      (x) => x > 0,
      'a number > 0',
    ),
    seed: finite(
      `${name}.seed`,
      o.seed,
      Math.floor(Math.random() * 2 ** 32),
      (x) => Number.isSafeInteger(x) && x >= 0,
      'a non-negative integer',
    ),
  };
}

/**
 * The sampling defaults a checkpoint's generation_config.json sets: `temperature`, `top_k`, `top_p`,
 * `min_p`, `repetition_penalty`, and `do_sample: false` (greedy). A value out of its range is left out,
 * so a stray field never stops a model from loading.
 */
export function samplingDefaults(gen: Record<string, unknown> | undefined): Omit<SamplingOptions, 'seed'> {
  const out: Omit<SamplingOptions, 'seed'> = {};
  if (!gen) return out;
  const num = (v: unknown, ok: (x: number) => boolean) =>
    typeof v === 'number' && Number.isFinite(v) && ok(v) ? v : undefined;
  const set = <K extends 'temperature' | 'topK' | 'topP' | 'minP' | 'repetitionPenalty'>(
    key: K,
    v: number | undefined,
  ) => {
    if (v !== undefined) out[key] = v;
  };
  set(
    'temperature',
    num(gen.temperature, (x) => x >= 0),
  );
  set(
    'topK',
    num(gen.top_k, (x) => Number.isInteger(x) && x >= 0),
  );
  set(
    'topP',
    num(gen.top_p, (x) => x > 0 && x <= 1),
  );
  set(
    'minP',
    num(gen.min_p, (x) => x >= 0 && x <= 1),
  );
  set(
    'repetitionPenalty',
    num(gen.repetition_penalty, (x) => x > 0),
  );
  if (gen.do_sample === false) out.temperature = 0;
  return out;
}

/**
 * One request's sampler: the math is native (csrc/cpu/sampler.h: the same steps in float64, the
 * exponentials in vectors, the candidates sorted by their bits; a draw over 151,936 logits at
 * temperature 1 took 2.4 ms in JavaScript, with top-p 11 ms, once per stream and step), with its own
 * PRNG (xoshiro128** seeded through splitmix32 from the seed): the same seed gives the same tokens.
 */
export class Sampler {
  readonly #native: NativeSampler;
  /**
   * The history and output arrays the native sampler has seen, and how much of each: both only grow
   * while a generation runs (its own arrays), so a draw passes only their new tokens.
   */
  #history: readonly number[] | null = null;
  #historyLength = 0;
  #output: readonly number[] | null = null;
  #outputLength = 0;

  constructor(params: SamplingParams) {
    const bias = [...(params.logitBias ?? new Map<number, number>())].filter(([t]) => t < 2 ** 31);
    this.#native = new (binding().NativeSampler)({
      temperature: params.temperature,
      topK: params.topK,
      topP: params.topP,
      minP: params.minP,
      repetitionPenalty: params.repetitionPenalty,
      presencePenalty: params.presencePenalty ?? 0,
      frequencyPenalty: params.frequencyPenalty ?? 0,
      seed: params.seed,
      biasIds: Int32Array.from(bias, ([t]) => t),
      biasValues: Float64Array.from(bias, ([, b]) => b),
    });
  }

  /**
   * The next token from `logits` ([vocab]); `history` holds the tokens the repetition penalty sees (the
   * prompt and the output), `output` the tokens the presence and frequency penalties see. Arrays that
   * only grow between calls (a generation's own) cost only their new entries. `allowed` ([vocab]), when
   * given, leaves out every token where it holds 0.
   */
  sample(
    logits: Float32Array,
    history: readonly number[],
    output: readonly number[] = [],
    allowed?: Uint8Array,
  ): number {
    const [newHistory, clearHistory, newOutput, clearOutput] = this.#added(history, output);
    let token: number;
    try {
      token = this.#native.sample(logits, newHistory, clearHistory, newOutput, clearOutput, allowed);
    } catch (err) {
      this.#forget();
      throw err;
    }
    this.#seen(history, output);
    if (token < 0) throw notSampleable();
    return token;
  }

  /**
   * One draw for each entry, as sample() makes it, in one native call that spreads them over the pool's
   * threads when it is free (a step's streams draw at once, not one after the other on the JavaScript
   * thread). Each draw's token, or its error; a sampler may appear once.
   */
  static sampleAll(draws: readonly SamplerDraw[]): (number | Error)[] {
    if (draws.length <= 1)
      return draws.map((d) => {
        try {
          return d.sampler.sample(d.logits, d.history, d.output, d.allowed);
        } catch (err) {
          return fromNative(err);
        }
      });
    const calls = Sampler.#calls(draws);
    let results: (number | Error)[];
    try {
      results = binding().sampleBatch(calls);
    } catch (err) {
      for (const d of draws) d.sampler.#forget();
      throw fromNative(err);
    }
    return Sampler.#settle(draws, results);
  }

  /**
   * sampleAll() on a libuv thread, for a batch long enough to hold the event loop (milliseconds); its
   * arrays must stay as they are until it settles, and its samplers take no other draw until then.
   */
  static async sampleAllAsync(draws: readonly SamplerDraw[]): Promise<(number | Error)[]> {
    if (draws.length === 0) return [];
    const calls = Sampler.#calls(draws);
    let results: (number | Error)[];
    try {
      results = await binding().sampleBatchAsync(calls);
    } catch (err) {
      for (const d of draws) d.sampler.#forget();
      throw fromNative(err);
    }
    return Sampler.#settle(draws, results);
  }

  /** Whether a draw is the plain argmax of its logits (greedy, nothing that changes them). */
  get plainGreedy(): boolean {
    return this.#native.plainGreedy;
  }

  static #calls(draws: readonly SamplerDraw[]): NativeDraw[] {
    return draws.map((d) => [d.sampler.#native, d.logits, ...d.sampler.#added(d.history, d.output ?? []), d.allowed]);
  }

  /** Each draw's token or error, after the samplers' bookkeeping. */
  static #settle(draws: readonly SamplerDraw[], results: (number | Error)[]): (number | Error)[] {
    return results.map((r, i) => {
      const d = draws[i];
      if (typeof r !== 'number') {
        d.sampler.#forget();
        return fromNative(r);
      }
      d.sampler.#seen(d.history, d.output ?? []);
      return r < 0 ? notSampleable() : r;
    });
  }

  /** The native draw's history and output arguments: the tokens added since the last draw, or all of them. */
  #added(history: readonly number[], output: readonly number[]): [Int32Array, boolean, Int32Array, boolean] {
    const clearHistory = history !== this.#history || history.length < this.#historyLength;
    const clearOutput = output !== this.#output || output.length < this.#outputLength;
    return [
      idsOf(history, clearHistory ? 0 : this.#historyLength),
      clearHistory,
      idsOf(output, clearOutput ? 0 : this.#outputLength),
      clearOutput,
    ];
  }

  /** After a draw: the arrays the native sampler now holds. */
  #seen(history: readonly number[], output: readonly number[]): void {
    this.#history = history;
    this.#historyLength = history.length;
    this.#output = output;
    this.#outputLength = output.length;
  }

  /** After a failed draw, what the native side holds is unknown: the next draw starts over. */
  #forget(): void {
    this.#history = this.#output = null;
  }
}

/** One draw of Sampler.sampleAll(): sample()'s arguments, and the sampler that draws. */
export interface SamplerDraw {
  sampler: Sampler;
  logits: Float32Array;
  history: readonly number[];
  output?: readonly number[];
  allowed?: Uint8Array;
}

/** ids[from..] as an Int32Array; an id that is not one (never drawn) becomes -1, which the draw skips. */
function idsOf(ids: readonly number[], from: number): Int32Array {
  const out = new Int32Array(ids.length - from);
  for (let i = from; i < ids.length; i++) {
    const t = ids[i];
    out[i - from] = Number.isInteger(t) && t >= 0 && t < 2 ** 31 ? t : -1;
  }
  return out;
}

function notSampleable(): MoeError {
  return new MoeError(
    'ERR_MOE_NUMERIC',
    'the logits of this step have no finite largest value (NaN or -Infinity throughout, or +Infinity): ' +
      'no token can be sampled (an overflow in the model: float16 weights or a float16 KV cache hold at most 65504)',
  );
}
