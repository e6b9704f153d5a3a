/**
 * The sampler (lib/generate/sampling) against a float64 reference written here from the definitions
 * (full sort, Hugging Face's order: repetition penalty, temperature, top-k, top-p, min-p): on fresh
 * random logits of odd and round vocabulary sizes, sampled tokens stay inside the reference's support
 * and their frequencies match its probabilities. Log probabilities against a float64 log-softmax.
 * Stop strings over text cut into random pieces.
 */
import { checkLogprobs, tokenLogprobs } from '../lib/generate/logprobs';
import { Sampler, checkSampling } from '../lib/generate/sampling';
import { StopMatcher } from '../lib/generate/stop';
import { Xoshiro128, rng } from './helpers/reference';

interface Params {
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  repetitionPenalty: number;
  presencePenalty?: number;
  frequencyPenalty?: number;
  logitBias?: Map<number, number>;
}

/**
 * The probability of every token under the reference definitions: OpenAI's logit bias (added first)
 * and its presence and frequency penalties over `output` (mu - c * frequency - (c > 0) * presence),
 * between the repetition penalty and the temperature.
 */
function referenceDistribution(
  logits: Float32Array,
  history: number[],
  p: Params,
  output: number[] = [],
): Float64Array {
  const V = logits.length;
  const x = Float64Array.from(logits);
  for (const [t, b] of p.logitBias ?? []) x[t] += b;
  for (const t of new Set(history)) x[t] = x[t] < 0 ? x[t] * p.repetitionPenalty : x[t] / p.repetitionPenalty;
  for (let t = 0; t < V; t++) {
    const c = output.filter((o) => o === t).length;
    x[t] -= c * (p.frequencyPenalty ?? 0) + (c > 0 ? 1 : 0) * (p.presencePenalty ?? 0);
  }
  const order = Array.from({ length: V }, (_, i) => i).sort((a, b) => x[b] - x[a] || a - b);
  const out = new Float64Array(V);
  if (p.temperature === 0) {
    out[order[0]] = 1;
    return out;
  }
  const m = x[order[0]];
  const prob = Array.from(x, (v) => Math.exp((v - m) / p.temperature));
  let keep = order.slice(0, p.topK > 0 ? p.topK : V);
  if (p.topP < 1) {
    const mass = keep.reduce((s, i) => s + prob[i], 0);
    let acc = 0;
    const n = keep.findIndex((i) => (acc += prob[i]) >= p.topP * mass);
    keep = keep.slice(0, n + 1);
  }
  keep = keep.filter((i) => prob[i] >= p.minP * prob[order[0]]);
  const z = keep.reduce((s, i) => s + prob[i], 0);
  for (const i of keep) out[i] = prob[i] / z;
  return out;
}

function randomLogits(V: number, rand: () => number, spread: number): Float32Array {
  return Float32Array.from({ length: V }, () => (rand() * 2 - 1) * spread);
}

const settings: [string, Params][] = [
  ['temperature only', { temperature: 0.7, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1 }],
  ['top-k', { temperature: 1, topK: 5, topP: 1, minP: 0, repetitionPenalty: 1 }],
  ['top-p', { temperature: 1.3, topK: 0, topP: 0.6, minP: 0, repetitionPenalty: 1 }],
  ['min-p', { temperature: 1, topK: 0, topP: 1, minP: 0.2, repetitionPenalty: 1 }],
  ['all together', { temperature: 0.8, topK: 12, topP: 0.9, minP: 0.05, repetitionPenalty: 1.3 }],
  [
    'presence and frequency penalties, logit bias',
    { temperature: 0.9, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, presencePenalty: 0.7, frequencyPenalty: 0.45 },
  ],
  [
    'penalties, bias and every filter',
    {
      temperature: 1.1,
      topK: 9,
      topP: 0.85,
      minP: 0.02,
      repetitionPenalty: 1.2,
      presencePenalty: -0.5,
      frequencyPenalty: 1.5,
    },
  ],
];

/** A logit bias on a few random tokens, some of them raised far enough to matter. */
function randomBias(V: number, rand: () => number): Map<number, number> {
  const bias = new Map<number, number>();
  for (let i = 0; i < 6; i++) bias.set(Math.floor(rand() * V), Math.round((rand() * 2 - 1) * 600) / 100);
  return bias;
}

/** An output with repeats: tokens drawn from a few, so counts reach 2 and more. */
function randomOutput(V: number, rand: () => number, n: number): number[] {
  const pool = Array.from({ length: 7 }, () => Math.floor(rand() * V));
  return Array.from({ length: n }, () => pool[Math.floor(rand() * pool.length)]);
}

describe.each([33, 320, 1027])('vocabulary of %i', (V) => {
  test.each(settings)('%s: support and frequencies match the reference', (_, params) => {
    const rand = rng(V + params.topK);
    const logits = randomLogits(V, rand, 4);
    const history = Array.from({ length: 20 }, () => Math.floor(rand() * V));
    const penalised = params.presencePenalty !== undefined;
    const output = penalised ? randomOutput(V, rand, 25) : [];
    const p = penalised ? { ...params, logitBias: randomBias(V, rand) } : params;
    const expected = referenceDistribution(logits, [...history, ...output], p, output);
    const sampler = new Sampler({ ...p, seed: 99 });
    const draws = 6000;
    const counts = new Float64Array(V);
    for (let i = 0; i < draws; i++) counts[sampler.sample(logits, [...history, ...output], output)]++;
    for (let t = 0; t < V; t++) {
      if (expected[t] === 0) expect(counts[t]).toBe(0);
      // Five standard deviations of a binomial count, plus one.
      const sd = Math.sqrt(draws * expected[t] * (1 - expected[t]));
      expect(Math.abs(counts[t] - draws * expected[t])).toBeLessThanOrEqual(5 * sd + 1);
    }
  });

  test('temperature 0 is the argmax after the repetition penalty', () => {
    const rand = rng(3 * V);
    for (let k = 0; k < 20; k++) {
      const logits = randomLogits(V, rand, 2);
      const history = Array.from({ length: 5 }, () => Math.floor(rand() * V));
      const params = { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1 + rand() * 3 };
      const expected = referenceDistribution(logits, history, params).indexOf(1);
      expect(new Sampler({ ...params, seed: k }).sample(logits, history)).toBe(expected);
    }
  });

  test('temperature 0 with penalties and a bias is the argmax of the adjusted logits', () => {
    const rand = rng(5 * V);
    for (let k = 0; k < 20; k++) {
      const logits = randomLogits(V, rand, 1);
      const output = randomOutput(V, rand, 12);
      const params = {
        temperature: 0,
        topK: 0,
        topP: 1,
        minP: 0,
        repetitionPenalty: 1,
        presencePenalty: rand() * 4 - 2,
        frequencyPenalty: rand() * 4 - 2,
        logitBias: randomBias(V, rand),
      };
      const expected = referenceDistribution(logits, output, params, output).indexOf(1);
      expect(new Sampler({ ...params, seed: k }).sample(logits, output, output)).toBe(expected);
    }
  });

  test('the output counts kept between tokens give what a count from scratch gives', () => {
    // Greedy with a strong frequency penalty: which token wins changes with the counts at every step.
    const rand = rng(7 * V);
    const params = { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, frequencyPenalty: 0.3, seed: 1 };
    const kept = new Sampler({ ...params, presencePenalty: 0.1 });
    const output: number[] = [];
    const base = randomLogits(V, rand, 1);
    for (let step = 0; step < 60; step++) {
      const logits = Float32Array.from(base, (v) => v + (rand() - 0.5) * 0.05);
      const fresh = new Sampler({ ...params, presencePenalty: 0.1 }).sample(logits, [], output.slice());
      const token = kept.sample(logits, [], output);
      expect(token).toBe(fresh);
      expect(token).toBe(referenceDistribution(logits, [], { ...params, presencePenalty: 0.1 }, output).indexOf(1));
      output.push(token);
    }
    expect(new Set(output).size).toBeGreaterThan(3); // the penalty did move the argmax around
  });

  test('a history kept and grown between tokens gives what the whole history gives each time', () => {
    // Greedy under a strong repetition penalty, and at temperature 1 (the same seed on both sides): the
    // sampler passes only a grown array's new tokens, and starts over for another array or a shorter one.
    const rand = rng(11 * V);
    for (const temperature of [0, 1]) {
      const params = { temperature, topK: 0, topP: 1, minP: 0, repetitionPenalty: 2.5, seed: 3 };
      const kept = new Sampler(params);
      const fresh = new Sampler(params);
      const history: number[] = Array.from({ length: 5 }, () => Math.floor(rand() * V));
      const base = randomLogits(V, rand, 1);
      for (let step = 0; step < 40; step++) {
        const logits = Float32Array.from(base, (v) => v + (rand() - 0.5) * 0.05);
        if (step === 20) history.length = 3; // shorter: counted from scratch again
        const token = kept.sample(logits, history);
        expect(token).toBe(fresh.sample(logits, history.slice()));
        if (temperature === 0) expect(token).toBe(referenceDistribution(logits, history, params).indexOf(1));
        history.push(token);
      }
    }
  });
});

/**
 * Draws as the definitions give them, each from the uniform number the sampler takes: the full
 * vocabulary sorted by a comparison (most likely first, ties lower id first), the nucleus, min-p, then
 * a walk down that order. The sampler sorts only its candidates, and many of them by their bits.
 */
function referenceDraws(logits: Float32Array, p: Params): (u01: number) => number {
  const V = logits.length;
  let best = -Infinity;
  for (const v of logits) best = Math.max(best, v);
  const prob = Float64Array.from(logits, (v) => Math.exp((v - best) / p.temperature));
  let total = 0;
  for (const q of prob) total += q;
  const order = Array.from({ length: V }, (_, i) => i).sort((a, b) => prob[b] - prob[a] || a - b);
  const top = p.topK > 0 ? order.slice(0, p.topK) : order;
  // The nucleus of the top k is taken against the top k's mass, summed most likely first.
  const mass0 = p.topK > 0 ? top.reduce((s, i) => s + prob[i], 0) : total;
  let keep = top.length;
  let acc = 0;
  for (let i = 0; i < top.length; i++)
    if ((acc += prob[top[i]]) >= p.topP * mass0) {
      keep = i + 1;
      break;
    }
  const kept = top.slice(0, keep).filter((i) => prob[i] >= p.minP);
  const mass = kept.reduce((s, i) => s + prob[i], 0);
  return (u01) => {
    let u = u01 * mass;
    for (const i of kept) if ((u -= prob[i]) < 0) return i;
    return kept[kept.length - 1];
  };
}

/** 40 draws of a sampler and of the reference from the same uniform numbers: each the same token. */
function expectReferenceDraws(logits: Float32Array, params: Params, seed: number): Set<number> {
  const sampler = new Sampler({ ...params, seed });
  const uniform = new Xoshiro128(seed);
  const reference = referenceDraws(logits, params);
  const drawn = new Set<number>();
  for (let i = 0; i < 40; i++) {
    const token = sampler.sample(logits, []);
    expect(token).toBe(reference(uniform.next()));
    drawn.add(token);
  }
  return drawn;
}

test.each([
  ['a flat distribution, top-p 0.9', 0.3, { temperature: 1, topK: 0, topP: 0.9, minP: 0, repetitionPenalty: 1 }],
  [
    'a flat distribution, top-p 0.5 and min-p',
    0.3,
    { temperature: 1.2, topK: 0, topP: 0.5, minP: 0.85, repetitionPenalty: 1 },
  ],
  ['a peaked one, top-p 0.95', 12, { temperature: 0.8, topK: 0, topP: 0.95, minP: 0, repetitionPenalty: 1 }],
  ['a flat distribution, top-k 3000', 0.3, { temperature: 1, topK: 3000, topP: 1, minP: 0, repetitionPenalty: 1 }],
  [
    'a flat distribution, top-k 9000 and top-p 0.7',
    0.3,
    { temperature: 1, topK: 9000, topP: 0.7, minP: 0, repetitionPenalty: 1 },
  ],
])('top-k and top-p over 50,000 tokens, %s: each draw is the reference draw, ties included', (_, spread, params) => {
  const V = 50_021;
  const rand = rng(Math.round(spread * 10) + 5);
  // Logits on a grid of 1/256: thousands of exact ties, which must keep the lower id first.
  const logits = Float32Array.from({ length: V }, () => Math.round((rand() * 2 - 1) * spread * 256) / 256);
  // Many tokens in play: the walk's order decides each draw.
  expect(expectReferenceDraws(logits, params, 4242).size).toBeGreaterThan(30);
});

describe.each([1, 33, 320, 1027, 4096])('log probabilities over a vocabulary of %i', (V) => {
  /** log-softmax in float64 by its definition, and every id ranked (the lower id first on ties). */
  function reference(logits: Float32Array): { logprob: Float64Array; ranked: number[] } {
    const x = Float64Array.from(logits);
    const m = Math.max(...x);
    const z = x.reduce((s, v) => s + Math.exp(v - m), 0);
    const logprob = x.map((v) => v - m - Math.log(z));
    const ranked = Array.from({ length: V }, (_, i) => i).sort((a, b) => x[b] - x[a] || a - b);
    return { logprob, ranked };
  }

  test.each([0, 1, 5, 20])('the token and the top %i against the float64 log-softmax', (top) => {
    const rand = rng(V * 31 + top);
    for (const spread of [0.5, 8, 40]) {
      const logits = randomLogits(V, rand, spread);
      // Ties: the largest value copied to two random ids, so the order among equals shows.
      const best = logits.indexOf(Math.max(...logits));
      for (let i = 0; i < 2; i++) logits[Math.floor(rand() * V)] = logits[best];
      const ref = reference(logits);
      const token = Math.floor(rand() * V);
      const got = tokenLogprobs(logits, token, top);
      expect(got.token).toBe(token);
      expect(Math.abs(got.logprob - ref.logprob[token])).toBeLessThan(1e-9 * Math.max(1, Math.abs(ref.logprob[token])));
      expect(got.topLogprobs.map((t) => t.token)).toEqual(ref.ranked.slice(0, Math.min(top, V)));
      for (const t of got.topLogprobs) expect(Math.abs(t.logprob - ref.logprob[t.token])).toBeLessThan(1e-9);
      if (V <= 320) {
        // The probabilities sum to 1.
        let total = 0;
        for (let t = 0; t < V; t++) total += Math.exp(tokenLogprobs(logits, t, 0).logprob);
        expect(Math.abs(total - 1)).toBeLessThan(1e-9);
      }
    }
  });

  test('a NaN logit has no probability and is never listed', () => {
    const logits = randomLogits(V, rng(V + 5), 3);
    if (V < 2) return;
    logits[0] = NaN;
    const got = tokenLogprobs(logits, 0, Math.min(V, 20));
    expect(got.logprob).toBe(-Infinity);
    expect(got.topLogprobs.map((t) => t.token)).not.toContain(0);
    const rest = reference(logits.subarray(1).slice());
    expect(Math.abs(tokenLogprobs(logits, 1, 0).logprob - rest.logprob[0])).toBeLessThan(1e-9);
  });
});

test('top-p 1 - 1e-10 over steep logits with masked tokens: the nucleus ends among weights below 2^-32', () => {
  // Logits over [-12, 12]: about 7% of the tokens weigh less than 2^-32 of the best, together about
  // 4e-10 of the total, so the nucleus ends among them; -Infinity logits (a mask) weigh nothing and
  // are never drawn, even where the walk runs to the end.
  const V = 30_011;
  const rand = rng(61);
  const logits = Float32Array.from({ length: V }, () => Math.round((rand() * 2 - 1) * 12 * 256) / 256);
  for (let i = 3; i < V; i += 97) logits[i] = -Infinity;
  const params = { temperature: 1, topK: 0, topP: 1 - 1e-10, minP: 0, repetitionPenalty: 1 };
  const drawn = expectReferenceDraws(logits, params, 77);
  expect(drawn.size).toBeGreaterThan(30);
  for (const t of drawn) expect(logits[t]).toBeGreaterThan(-Infinity);
});

test('min-p that ends the nucleus a few tokens early: each draw is the reference draw', () => {
  // min-p just below the weight of the nucleus's fifth least likely token: it drops the four after it.
  const V = 50_021;
  const logits = randomLogits(V, rng(83), 0.3); // no grid: few ties, so min-p drops about four tokens
  const topP = 0.6;
  let best = -Infinity;
  for (const v of logits) best = Math.max(best, v);
  const prob = Float64Array.from(logits, (v) => Math.exp(v - best));
  const order = Array.from({ length: V }, (_, i) => i).sort((a, b) => prob[b] - prob[a] || a - b);
  const total = prob.reduce((s, q) => s + q, 0);
  let acc = 0;
  const n = order.findIndex((i) => (acc += prob[i]) >= topP * total) + 1;
  const minP = prob[order[n - 5]] * (1 - 1e-9);
  const params = { temperature: 1, topK: 0, topP, minP, repetitionPenalty: 1 };
  expect(order.slice(0, n).filter((i) => prob[i] >= minP).length).toBeLessThan(n);
  expect(expectReferenceDraws(logits, params, 4243).size).toBeGreaterThan(30);
});

test('top-k among logits with NaN: only the k largest finite ones are drawn, in the reference frequencies', () => {
  // The top-k candidates are chosen by the logits themselves (NaN as -Infinity) before any exponential.
  const V = 2053;
  const rand = rng(29);
  const logits = randomLogits(V, rand, 3);
  for (let i = 0; i < V; i += 7) logits[i] = NaN;
  logits[11] = Infinity - Infinity; // NaN from arithmetic too
  const params = { temperature: 0.9, topK: 6, topP: 1, minP: 0, repetitionPenalty: 1 };
  const finite = Float32Array.from(logits, (v) => (Number.isNaN(v) ? -Infinity : v));
  const expected = referenceDistribution(finite, [], params);
  const sampler = new Sampler({ ...params, seed: 5 });
  const draws = 4000;
  const counts = new Float64Array(V);
  for (let i = 0; i < draws; i++) counts[sampler.sample(logits, [])]++;
  expect(expected.filter((p) => p > 0).length).toBe(6);
  for (let t = 0; t < V; t++) {
    if (expected[t] === 0) expect(counts[t]).toBe(0);
    const sd = Math.sqrt(draws * expected[t] * (1 - expected[t]));
    expect(Math.abs(counts[t] - draws * expected[t])).toBeLessThanOrEqual(5 * sd + 1);
  }
  expect(() => sampler.sample(new Float32Array(V).fill(NaN), [])).toThrow(/no finite largest value/);
});

describe('Sampler.sampleAll: a batch of draws, spread over the pool', () => {
  // Mixed settings, greedy and sampled, some with a JSON-style mask, each sampler with its own seed and
  // its own growing history; every round one batch against twin samplers drawing one by one.
  const mixed: Params[] = [
    ...settings.map(([, p]) => p),
    { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1 },
    { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1.7 },
  ];
  test.each([
    [33, false],
    [1027, false],
    [40961, false],
    [1027, true],
    [40961, true],
  ])(
    'vocabulary of %i (off the JavaScript thread: %s): each draw is the one sample() makes, round after round',
    async (V, away) => {
      const rand = rng(V + 5);
      const n = 2 * mixed.length;
      const params = Array.from({ length: n }, (_, i) => ({ ...mixed[i % mixed.length], seed: 1000 + i }));
      const batched = params.map((p) => new Sampler(p));
      const alone = params.map((p) => new Sampler(p));
      const histories = params.map(() => Array.from({ length: 7 }, () => Math.floor(rand() * V)));
      const outputs = params.map((): number[] => []);
      const masks = params.map((_, i) =>
        i % 3 === 1 ? Uint8Array.from({ length: V }, () => (rand() < 0.3 ? 1 : 0)) : undefined,
      );
      for (const m of masks) if (m) m[Math.floor(rand() * V)] = 1; // never empty
      for (let round = 0; round < 6; round++) {
        const logits = params.map(() => randomLogits(V, rand, round % 2 === 0 ? 4 : 0.5));
        const expected = params.map((_, i) =>
          alone[i].sample(logits[i], histories[i].slice(), outputs[i].slice(), masks[i]),
        );
        const draws = params.map((_, i) => ({
          sampler: batched[i],
          logits: logits[i],
          history: histories[i],
          output: outputs[i],
          allowed: masks[i],
        }));
        const got = away ? await Sampler.sampleAllAsync(draws) : Sampler.sampleAll(draws);
        expect(got).toEqual(expected);
        got.forEach((t, i) => {
          histories[i].push(t as number);
          outputs[i].push(t as number);
        });
      }
    },
  );

  test('a sampler in a batch drawing off the JavaScript thread takes no other draw until it settles', async () => {
    const V = 40961;
    const rand = rng(23);
    const p = { temperature: 1, topK: 0, topP: 0.95, minP: 0, repetitionPenalty: 1 };
    const [a, b] = [1, 2].map((seed) => new Sampler({ ...p, seed }));
    const [a2, b2] = [1, 2].map((seed) => new Sampler({ ...p, seed }));
    const rows = [0, 1].map(() => randomLogits(V, rand, 0.3));
    const away = Sampler.sampleAllAsync([
      { sampler: a, logits: rows[0], history: [] },
      { sampler: b, logits: rows[1], history: [] },
    ]);
    expect(() => a.sample(rows[1], [])).toThrow(/batch that has not settled/);
    expect(() =>
      Sampler.sampleAll([
        { sampler: b, logits: rows[0], history: [] },
        { sampler: a2, logits: rows[1], history: [] },
      ]),
    ).toThrow(/batch that has not settled/);
    await expect(Sampler.sampleAllAsync([{ sampler: b, logits: rows[0], history: [] }])).rejects.toThrow(/not settled/);
    expect(await away).toEqual([a2.sample(rows[0], []), b2.sample(rows[1], [])]);
    expect(a.sample(rows[1], [])).toBe(a2.sample(rows[1], [])); // settled: free again, its state intact
  });

  test('a draw with no token to give fails alone; a bad entry or a sampler twice changes no sampler', () => {
    const V = 4099;
    const rand = rng(17);
    const p = { temperature: 1, topK: 0, topP: 0.9, minP: 0, repetitionPenalty: 1.1 };
    const [a, b, c] = [1, 2, 3].map((seed) => new Sampler({ ...p, seed }));
    const [a2, b2, c2] = [1, 2, 3].map((seed) => new Sampler({ ...p, seed }));
    const history = [5, 6, 7];
    const nan = new Float32Array(V).fill(NaN);
    const rows = [0, 1, 2].map(() => randomLogits(V, rand, 3));
    const out = Sampler.sampleAll([
      { sampler: a, logits: rows[0], history },
      { sampler: b, logits: nan, history },
      { sampler: c, logits: rows[2], history },
    ]);
    expect(out[0]).toBe(a2.sample(rows[0], history));
    expect(out[1]).toBeInstanceOf(Error);
    expect((out[1] as { code?: string }).code).toBe('ERR_MOE_NUMERIC');
    expect(out[2]).toBe(c2.sample(rows[2], history));
    expect(() => b2.sample(nan, history)).toThrow(/no finite largest value/);
    // Rejected before any draw: the samplers keep their state, so the next draws match their twins'.
    expect(() =>
      Sampler.sampleAll([
        { sampler: a, logits: rows[1], history },
        { sampler: a, logits: rows[2], history },
      ]),
    ).toThrow(/draws at most once/);
    expect(() =>
      Sampler.sampleAll([
        { sampler: b, logits: rows[1], history },
        { sampler: c, logits: rows[2], history, allowed: new Uint8Array(V - 1) },
      ]),
    ).toThrow(/draws\[1\]\.allowed/);
    const next = Sampler.sampleAll([
      { sampler: a, logits: rows[1], history },
      { sampler: b, logits: rows[2], history },
      { sampler: c, logits: rows[0], history },
    ]);
    expect(next).toEqual([a2.sample(rows[1], history), b2.sample(rows[2], history), c2.sample(rows[0], history)]);
  });
});

test('an extreme repetition penalty saturates: no overflow, the history ordered as before', () => {
  const logits = new Float32Array([0.5, 3, -2, 1, -3, 2]);
  // 5e-324 divides the history's positive logits past the largest double: they tie there, the lowest
  // id of them wins at temperature 0, and temperature 1 draws among them alone.
  const boost = { temperature: 0, topK: 0, topP: 1, minP: 0, repetitionPenalty: 5e-324 };
  expect(new Sampler({ ...boost, seed: 1 }).sample(logits, [5, 3, 2])).toBe(3);
  for (let seed = 0; seed < 20; seed++)
    expect([3, 5]).toContain(new Sampler({ ...boost, temperature: 1, seed }).sample(logits, [5, 3, 2]));
  // 1e308 multiplies the negative logits past the lowest double; a constraint that allows only those
  // two still gets a token (they tie: the lower id), and one the penalty left finite is above them.
  const penalise = { ...boost, repetitionPenalty: 1e308 };
  const only = new Uint8Array(6);
  only[2] = only[4] = 1;
  expect(new Sampler({ ...penalise, seed: 1 }).sample(logits, [2, 4], [], only)).toBe(2);
  only[0] = 1;
  expect(new Sampler({ ...penalise, seed: 1 }).sample(logits, [0, 2, 4], [], only)).toBe(0);
});

test('checkLogprobs: off, on, the number of alternatives, and what it refuses', () => {
  expect(checkLogprobs('options', {})).toEqual({ output: false, prompt: false, top: 0 });
  expect(checkLogprobs('options', { logprobs: false })).toEqual({ output: false, prompt: false, top: 0 });
  expect(checkLogprobs('options', { logprobs: true })).toEqual({ output: true, prompt: false, top: 0 });
  expect(checkLogprobs('options', { logprobs: true, topLogprobs: 20 })).toEqual({
    output: true,
    prompt: false,
    top: 20,
  });
  expect(checkLogprobs('options', { promptLogprobs: true, topLogprobs: 2 })).toEqual({
    output: false,
    prompt: true,
    top: 2,
  });
  expect(() => checkLogprobs('options', { logprobs: 1 })).toThrow(/options\.logprobs must be a boolean, got number 1/);
  expect(() => checkLogprobs('options', { promptLogprobs: 'yes' })).toThrow(
    /options\.promptLogprobs must be a boolean/,
  );
  expect(() => checkLogprobs('options', { logprobs: true, topLogprobs: 21 })).toThrow(
    /options\.topLogprobs must be an integer in \[0, 20\], got 21/,
  );
  expect(() => checkLogprobs('options', { logprobs: true, topLogprobs: 1.5 })).toThrow(RangeError);
  expect(() => checkLogprobs('options', { logprobs: true, topLogprobs: '3' })).toThrow(TypeError);
  expect(() => checkLogprobs('options', { topLogprobs: 3 })).toThrow(
    /options\.topLogprobs needs options\.logprobs or options\.promptLogprobs: true/,
  );
});

test('checkSampling: the penalties and the logit bias, and what each refuses', () => {
  const p = checkSampling(
    'o',
    { presencePenalty: -2, frequencyPenalty: 2, logitBias: { '0': -100, '41': 100, '7': 0 } },
    {},
    42,
  );
  expect(p.presencePenalty).toBe(-2);
  expect(p.frequencyPenalty).toBe(2);
  expect([...p.logitBias!]).toEqual([
    [0, -100],
    [41, 100],
  ]); // a bias of 0 is left out
  expect(checkSampling('o', {}).logitBias!.size).toBe(0);
  const refused: [Record<string, unknown>, ErrorConstructor, RegExp][] = [
    [{ presencePenalty: 2.01 }, RangeError, /o\.presencePenalty must be in \[-2, 2\], got 2\.01/],
    [{ frequencyPenalty: '1' }, TypeError, /o\.frequencyPenalty must be a number/],
    [{ frequencyPenalty: NaN }, RangeError, /o\.frequencyPenalty/],
    [{ logitBias: [1, 2] }, TypeError, /o\.logitBias must be a plain object/],
    [{ logitBias: new Map([[1, 2]]) }, TypeError, /o\.logitBias must be a plain object/],
    [{ logitBias: 'x' }, TypeError, /o\.logitBias/],
    [{ logitBias: { '-1': 1 } }, RangeError, /o\.logitBias: every key must be a token id in \[0, 42\), got "-1"/],
    [{ logitBias: { '01': 1 } }, RangeError, /got "01"/],
    [{ logitBias: { '1.5': 1 } }, RangeError, /got "1\.5"/],
    [{ logitBias: { '42': 1 } }, RangeError, /got "42"/],
    [{ logitBias: { '3': 100.5 } }, RangeError, /o\.logitBias\[3\] must be in \[-100, 100\], got 100\.5/],
    [{ logitBias: { '3': Infinity } }, RangeError, /o\.logitBias\[3\]/],
    [{ logitBias: { '3': '2' } }, TypeError, /o\.logitBias\[3\] must be a number/],
  ];
  for (const [o, type, message] of refused) {
    let thrown: unknown;
    try {
      checkSampling('o', o, {}, 42);
    } catch (err) {
      thrown = err;
    }
    expect(thrown).toBeInstanceOf(type);
    expect((thrown as Error).message).toMatch(message);
  }
});

test("the sampler's PRNG: xoshiro128** from splitmix32, one stream per seed, the high part of the seed used", () => {
  // Equal logits over 65,536 tokens at temperature 1: every weight is 1 and the mass 65,536, so each
  // draw is the top 16 bits of the next 32-bit number (u * 65,536, walked one token at a time).
  const V = 65_536;
  const flat = new Float32Array(V).fill(0.25);
  const draws = (seed: number, n: number) => {
    const sampler = new Sampler({ temperature: 1, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, seed });
    return Array.from({ length: n }, () => sampler.sample(flat, []));
  };
  for (const seed of [0, 12345, 2 ** 40 + 12345, Number.MAX_SAFE_INTEGER]) {
    const reference = new Xoshiro128(seed);
    expect(draws(seed, 3000)).toEqual(Array.from({ length: 3000 }, () => Math.floor(reference.next() * V)));
  }
  const xs = draws(12345, 10000);
  expect(draws(12346, 8)).not.toEqual(xs.slice(0, 8));
  expect(draws(2 ** 40 + 12345, 8)).not.toEqual(xs.slice(0, 8));
  const mean = xs.reduce((s, x) => s + x, 0) / xs.length / V;
  expect(Math.abs(mean - 0.5)).toBeLessThan(0.01);
});

test('checkSampling fills the defaults', () => {
  const p = checkSampling('options', {});
  expect(p).toMatchObject({ temperature: 1, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1 });
  expect(Number.isSafeInteger(p.seed)).toBe(true);
});

test('stop strings: the text before the first one, however the text is cut into pieces', () => {
  const rand = rng(17);
  const alphabet = [...'abab cé日🙂'];
  const pick = (n: number) => Array.from({ length: n }, () => alphabet[Math.floor(rand() * alphabet.length)]).join('');
  for (let k = 0; k < 500; k++) {
    const text = pick(1 + Math.floor(rand() * 30));
    const stops = Array.from({ length: 1 + Math.floor(rand() * 3) }, () => pick(1 + Math.floor(rand() * 4)));
    // The stop string that is complete first (ties: the longer one) ends the text where it starts.
    const hits = stops
      .map((s) => ({ start: text.indexOf(s), end: text.indexOf(s) + s.length }))
      .filter((h) => h.start >= 0)
      .sort((a, b) => a.end - b.end || a.start - b.start);
    const expected = hits.length > 0 ? text.slice(0, hits[0].start) : text;
    const m = new StopMatcher(stops);
    let out = '';
    let stopped = false;
    for (let at = 0; at < text.length && !stopped;) {
      const n = 1 + Math.floor(rand() * 4);
      const r = m.push(text.slice(at, at + n));
      out += r.text;
      stopped = r.stopped;
      at += n;
    }
    if (!stopped) out += m.flush();
    expect(stopped).toBe(hits.length > 0);
    expect(out).toBe(expected);
  }
});
