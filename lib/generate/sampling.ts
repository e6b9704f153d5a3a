/**
 * Choosing the next token from a row of logits: the logit bias, the repetition penalty, the presence
 * and frequency penalties (OpenAI's), then temperature, top-k, top-p and min-p (the order Hugging
 * Face's generate applies them), then one draw from the request's own PRNG. A request's tokens depend
 * only on its logits, its output so far and its seed, never on what else runs.
 */
import { argRangeError, argTypeError, MoeError } from '../errors';
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

/** xoshiro128** seeded through splitmix32: small, fast, and the same stream on every platform. */
export class Prng {
  #s = new Uint32Array(4);

  constructor(seed: number) {
    let x = (seed >>> 0) ^ Math.imul(Math.floor(seed / 2 ** 32) >>> 0, 0x9e3779b9);
    for (let i = 0; i < 4; i++) {
      x = (x + 0x9e3779b9) >>> 0;
      let z = x;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
      this.#s[i] = (z ^ (z >>> 16)) >>> 0;
    }
  }

  /** A uniform number in [0, 1). */
  next(): number {
    const s = this.#s;
    const r = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return r / 2 ** 32;
  }
}

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}

/** Working memory of one vocabulary size, shared by every request (sampling is synchronous). */
class Scratch {
  readonly values: Float64Array;
  readonly order: Int32Array;
  readonly stamp: Int32Array;
  stampNow = 0;
  /** The radix sort's second buffer of ids, and its keys (two, swapped each pass); made on first use. */
  sortIds?: Int32Array;
  sortKeys?: [Float64Array, Float64Array];
  constructor(vocab: number) {
    this.values = new Float64Array(vocab);
    this.order = new Int32Array(vocab);
    this.stamp = new Int32Array(vocab);
  }
}
const scratches = new Map<number, Scratch>();

/**
 * The index of the largest value (the first of equals); NaN is never the largest. -1 when no value is
 * above -Infinity or the largest is +Infinity: no token can be chosen from such a row. One comparison
 * a value, as a plain argmax: this runs over the whole vocabulary at every greedy token.
 */
function argmax(x: Float32Array | Float64Array): number {
  let best = -1,
    top = -Infinity;
  for (let i = 0; i < x.length; i++)
    if (x[i] > top) {
      top = x[i];
      best = i;
    }
  return top === Infinity ? -1 : best;
}

function notSampleable(): MoeError {
  return new MoeError(
    'ERR_MOE_NUMERIC',
    'the logits of this step have no finite largest value (NaN or -Infinity throughout, or +Infinity): ' +
      'no token can be sampled (an overflow in the model: float16 weights or a float16 KV cache hold at most 65504)',
  );
}

function scratchFor(vocab: number): Scratch {
  let s = scratches.get(vocab);
  if (!s) scratches.set(vocab, (s = new Scratch(vocab)));
  return s;
}

export class Sampler {
  readonly #params: SamplingParams;
  readonly #prng: Prng;
  /** Whether the presence or frequency penalty is on; then #counts holds each output token's count. */
  readonly #penalised: boolean;
  #counts = new Map<number, number>();
  /** The output array #counts was taken from, and how many of its tokens it has counted. */
  #counted: readonly number[] | null = null;
  #countedLength = 0;

  constructor(params: SamplingParams) {
    this.#params = params;
    this.#prng = new Prng(params.seed);
    this.#penalised = (params.presencePenalty ?? 0) !== 0 || (params.frequencyPenalty ?? 0) !== 0;
  }

  /**
   * The next token from `logits` ([vocab]); `history` holds the tokens the repetition penalty sees (the
   * prompt and the output), `output` the tokens the presence and frequency penalties see. The counts of
   * `output` are kept between calls while it only grows (the generation's own array), so a token costs
   * only its new entries. `allowed` ([vocab]), when given, leaves out every token where it holds 0.
   */
  sample(
    logits: Float32Array,
    history: readonly number[],
    output: readonly number[] = [],
    allowed?: Uint8Array,
  ): number {
    const V = logits.length;
    const { temperature, topK, topP, minP, repetitionPenalty } = this.#params;
    const bias = this.#params.logitBias;
    const biased = bias !== undefined && bias.size > 0;
    if (temperature === 0 && repetitionPenalty === 1 && !this.#penalised && !biased && !allowed) {
      const best = argmax(logits); // greedy: nothing to copy
      if (best < 0) throw notSampleable();
      return best;
    }
    const sc = scratchFor(V);
    const x = sc.values;
    for (let i = 0; i < V; i++) x[i] = logits[i];
    // A constraint's mask goes first: every filter then works among the tokens it allows.
    if (allowed) for (let i = 0; i < V; i++) if (!allowed[i]) x[i] = -Infinity;
    if (biased) for (const [t, b] of bias) if (t < V) x[t] += b;
    if (repetitionPenalty !== 1) {
      const stamp = ++sc.stampNow;
      for (const t of history)
        if (sc.stamp[t] !== stamp) {
          sc.stamp[t] = stamp;
          // An extreme penalty saturates at the largest double rather than overflowing: an infinite
          // logit reads as the model's own overflow (notSampleable). A masked token stays -Infinity.
          if (Number.isFinite(x[t])) {
            const v = x[t] < 0 ? x[t] * repetitionPenalty : x[t] / repetitionPenalty;
            x[t] = Math.min(Number.MAX_VALUE, Math.max(-Number.MAX_VALUE, v));
          }
        }
    }
    if (this.#penalised) {
      const presence = this.#params.presencePenalty ?? 0,
        frequency = this.#params.frequencyPenalty ?? 0;
      for (const [t, c] of this.#outputCounts(output)) if (t < V) x[t] -= presence + frequency * c;
    }
    const best = argmax(x);
    if (best < 0) throw notSampleable();
    if (temperature === 0) return best;

    // Probabilities relative to the most likely token (which has 1).
    const top = x[best];
    let total = 0;
    for (let i = 0; i < V; i++) {
      const p = Math.exp((x[i] - top) / temperature);
      total += x[i] = p >= 0 ? p : 0; // a NaN logit is never drawn
    }
    const order = sc.order;
    let n: number;
    if ((topK > 0 && topK < V) || topP < 1) {
      n = this.#candidates(x, total, order, topK, topP);
      let keep = n;
      if (topK > 0) keep = Math.min(keep, topK);
      if (topP < 1) {
        const limit = topP * (topK > 0 && topK < V ? massOf(x, order, keep) : total);
        let mass = 0;
        for (let i = 0; i < keep; i++)
          if ((mass += x[order[i]]) >= limit) {
            keep = i + 1;
            break;
          }
      }
      n = keep;
    } else {
      n = V;
      for (let i = 0; i < V; i++) order[i] = i;
    }
    // min-p keeps tokens at least minP as likely as the best one, which has 1 here.
    let kept = 0;
    let mass = 0;
    for (let i = 0; i < n; i++) {
      const id = order[i];
      if (x[id] >= minP) {
        order[kept++] = id;
        mass += x[id];
      }
    }
    let u = this.#prng.next() * mass;
    for (let i = 0; i < kept; i++) {
      u -= x[order[i]];
      if (u < 0) return order[i];
    }
    return order[kept - 1];
  }

  /** How many times each token is in `output`, counting only what was added since the last call. */
  #outputCounts(output: readonly number[]): Map<number, number> {
    if (output !== this.#counted || output.length < this.#countedLength) {
      this.#counts = new Map();
      this.#counted = output;
      this.#countedLength = 0;
    }
    for (; this.#countedLength < output.length; this.#countedLength++) {
      const t = output[this.#countedLength];
      this.#counts.set(t, (this.#counts.get(t) ?? 0) + 1);
    }
    return this.#counts;
  }

  /**
   * Writes into `order`, most likely first (ties: lower id first), a set of tokens that surely holds
   * the top k and the top-p nucleus: with top-k, exactly the k most likely (a heap); else those above
   * a threshold lowered tenfold until they hold the nucleus, so that only a few tokens are sorted
   * rather than the whole vocabulary.
   */
  #candidates(p: Float64Array, total: number, order: Int32Array, topK: number, topP: number): number {
    const V = p.length;
    if (topK > 0 && topK < V) return topKOf(p, order, topK, scratchFor(V));
    let n = 0;
    for (let threshold = 0.1; n < V && threshold >= 1e-300; threshold *= 0.1) {
      let count = 0;
      let mass = 0;
      for (let i = 0; i < V; i++)
        if (p[i] >= threshold) {
          order[count++] = i;
          mass += p[i];
        }
      n = count;
      if ((topK === 0 || n >= topK) && (topP >= 1 || mass >= topP * total)) break;
    }
    sortByLikelihood(p, order, n, scratchFor(V));
    return n;
  }
}

/** Below this many ids a comparison sort costs less than the radix sort's eight passes. */
const RADIX_SORT_MIN = 512;
/** Which 32-bit half of a float64 holds its sign and exponent (the high bits) on this machine. */
const HIGH_WORD = new Uint32Array(new Float64Array([1]).buffer)[1] !== 0 ? 1 : 0;

/**
 * Sorts order[0..n) (ids in ascending order on entry) most likely first, ties lower id first. A flat
 * distribution keeps most of the vocabulary above every threshold of #candidates: a comparison sort of
 * 150,000 ids took about 75 ms a token (`node bench/sampling.js`), so many ids go through a stable radix
 * sort of the probabilities' bits (non-negative doubles order as their bit patterns), 8 bits a pass, the
 * lowest first: 11 ms. Passes of 16 bits ran slower below 10,000 ids (their 65,536 counts).
 */
function sortByLikelihood(p: Float64Array, order: Int32Array, n: number, sc: Scratch): void {
  if (n < RADIX_SORT_MIN) {
    const picked = Array.from(order.subarray(0, n)).sort((a, b) => p[b] - p[a] || a - b);
    for (let i = 0; i < n; i++) order[i] = picked[i];
    return;
  }
  const V = order.length;
  sc.sortIds ??= new Int32Array(V);
  sc.sortKeys ??= [new Float64Array(V), new Float64Array(V)];
  let ids = order,
    spare = sc.sortIds;
  let [keys, spareKeys] = sc.sortKeys;
  for (let i = 0; i < n; i++) keys[i] = p[ids[i]];
  const counts = new Int32Array(257);
  for (let pass = 0; pass < 8; pass++) {
    const word = pass < 4 ? 1 - HIGH_WORD : HIGH_WORD;
    const shift = (pass % 4) * 8;
    const bits = new Uint32Array(keys.buffer, 0, 2 * n);
    counts.fill(0);
    // Bucket 255 - digit: the largest digit first, so the largest probability ends first.
    for (let i = 0; i < n; i++) counts[256 - ((bits[2 * i + word] >>> shift) & 0xff)]++;
    if (counts.some((c) => c === n)) continue; // every key has this digit: the pass changes nothing
    for (let b = 1; b <= 256; b++) counts[b] += counts[b - 1];
    for (let i = 0; i < n; i++) {
      const to = counts[255 - ((bits[2 * i + word] >>> shift) & 0xff)]++;
      spare[to] = ids[i];
      spareKeys[to] = keys[i];
    }
    [ids, spare] = [spare, ids];
    [keys, spareKeys] = [spareKeys, keys];
  }
  if (ids !== order) order.set(ids.subarray(0, n));
}

/** Less likely first: ties go to the higher id, so that the lower id is kept. */
function lessLikely(p: Float64Array, a: number, b: number): boolean {
  return p[a] < p[b] || (p[a] === p[b] && a > b);
}

/** The k most likely ids into order[0..k), most likely first: a min-heap over one pass of the vocabulary. */
function topKOf(p: Float64Array, order: Int32Array, k: number, sc: Scratch): number {
  const heap = order; // order[0..k) holds the heap, least likely at the root
  const down = (at: number) => {
    for (;;) {
      const l = 2 * at + 1;
      if (l >= k) return;
      const c = l + 1 < k && lessLikely(p, heap[l + 1], heap[l]) ? l + 1 : l;
      if (!lessLikely(p, heap[c], heap[at])) return;
      [heap[c], heap[at]] = [heap[at], heap[c]];
      at = c;
    }
  };
  for (let i = 0; i < k; i++) heap[i] = i;
  for (let i = (k >> 1) - 1; i >= 0; i--) down(i);
  for (let i = k; i < p.length; i++)
    if (lessLikely(p, heap[0], i)) {
      heap[0] = i;
      down(0);
    }
  heap.subarray(0, k).sort(); // ids in ascending order, as sortByLikelihood takes them
  sortByLikelihood(p, order, k, sc);
  return k;
}

function massOf(p: Float64Array, order: Int32Array, n: number): number {
  let m = 0;
  for (let i = 0; i < n; i++) m += p[order[i]];
  return m;
}
