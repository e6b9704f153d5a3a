/**
 * The sampler (lib/generate/sampling) against a float64 reference written here from the definitions
 * (full sort, Hugging Face's order: repetition penalty, temperature, top-k, top-p, min-p): on fresh
 * random logits of odd and round vocabulary sizes, sampled tokens stay inside the reference's support
 * and their frequencies match its probabilities. Stop strings over text cut into random pieces.
 */
import { Prng, Sampler, checkSampling } from '../lib/generate/sampling';
import { StopMatcher } from '../lib/generate/stop';
import { rng } from './helpers/reference';

interface Params {
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  repetitionPenalty: number;
}

/** The probability of every token under the reference definitions. */
function referenceDistribution(logits: Float32Array, history: number[], p: Params): Float64Array {
  const V = logits.length;
  const x = Float64Array.from(logits);
  for (const t of new Set(history)) x[t] = x[t] < 0 ? x[t] * p.repetitionPenalty : x[t] / p.repetitionPenalty;
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
];

describe.each([33, 320, 1027])('vocabulary of %i', (V) => {
  test.each(settings)('%s: support and frequencies match the reference', (_, params) => {
    const rand = rng(V + params.topK);
    const logits = randomLogits(V, rand, 4);
    const history = Array.from({ length: 20 }, () => Math.floor(rand() * V));
    const expected = referenceDistribution(logits, history, params);
    const sampler = new Sampler({ ...params, seed: 99 });
    const draws = 6000;
    const counts = new Float64Array(V);
    for (let i = 0; i < draws; i++) counts[sampler.sample(logits, history)]++;
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
});

test('the PRNG: one stream per seed, uniform in [0, 1)', () => {
  const a = new Prng(12345);
  const b = new Prng(12345);
  const c = new Prng(12346);
  const big = new Prng(2 ** 40 + 12345);
  const xs = Array.from({ length: 10000 }, () => a.next());
  expect(Array.from({ length: 10000 }, () => b.next())).toEqual(xs);
  expect(c.next()).not.toBe(xs[0]);
  expect(big.next()).not.toBe(xs[0]);
  expect(Math.min(...xs)).toBeGreaterThanOrEqual(0);
  expect(Math.max(...xs)).toBeLessThan(1);
  const mean = xs.reduce((s, x) => s + x, 0) / xs.length;
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
