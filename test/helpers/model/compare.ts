/**
 * Comparing whole-model logits: the centred relative error of each position, bitwise equality, and
 * prompts drawn clear of the near-ties (router choices, greedy picks) that float32 rounding may flip.
 */
import { rng } from '../reference';
import { TOKENS } from './random-model';
import { greedyRun, GreedyRun, ReferenceDecoder } from './reference-decoder';

/**
 * Per position, ||a - b|| / ||b|| of the rows centred over the vocabulary: logits and log-probabilities
 * (or logits of two implementations that differ by a constant per row) compare alike.
 */
export function centredRelErrors(a: ArrayLike<number>, b: ArrayLike<number>, rows: number, V: number): number[] {
  const errs: number[] = [];
  for (let r = 0; r < rows; r++) {
    let ma = 0,
      mb = 0;
    for (let i = 0; i < V; i++) {
      ma += a[r * V + i];
      mb += b[r * V + i];
    }
    ma /= V;
    mb /= V;
    let num = 0,
      den = 0;
    for (let i = 0; i < V; i++) {
      const x = a[r * V + i] - ma,
        y = b[r * V + i] - mb;
      num += (x - y) ** 2;
      den += y ** 2;
    }
    errs.push(Math.sqrt(num / den));
  }
  return errs;
}

export const maxOf = (xs: readonly number[]): number => xs.reduce((m, x) => Math.max(m, x), 0);
export const medianOf = (xs: readonly number[]): number => [...xs].sort((a, b) => a - b)[xs.length >> 1];

/** Index of the first float32 whose bits differ, or -1 when the arrays are bitwise equal. */
export function firstBitDifference(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length),
    ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < ua.length; i++) if (ua[i] !== ub[i]) return i;
  return -1;
}

/** `n` token ids drawn from the word range of the random models' vocabulary. */
export function randomTokens(n: number, V: number, seed: number): number[] {
  const rand = rng(seed);
  return Array.from({ length: n }, () => TOKENS.firstByte + Math.floor(rand() * (V - TOKENS.firstByte)));
}

/**
 * A prompt of `length` tokens (from seeded draws) whose reference run of `steps` greedy tokens keeps
 * every router choice and every greedy pick at least `margin` (in logits) from a tie.
 */
export function pickPrompt(
  model: ReferenceDecoder,
  seed: number,
  length: number,
  steps: number,
  margin: number,
  draws = 20,
): { prompt: number[]; run: GreedyRun } {
  const V = model.spec.vocabSize;
  for (let draw = 1; draw <= draws; draw++) {
    const prompt = randomTokens(length, V, seed * 1000 + draw);
    const run = greedyRun(model, prompt, steps);
    if (run.minRouterGap >= margin && run.minTop2Gap >= margin) return { prompt, run };
  }
  throw new Error(`no prompt clear of near-ties in ${draws} draws: the random model routes too close to ties`);
}
