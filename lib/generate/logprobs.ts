/**
 * Log probabilities of generated tokens, when a request asks for them: the log-softmax of the model's
 * own logits (before the logit bias, the penalties and the temperature, as vLLM reports them by
 * default), for the token chosen and for the most likely tokens of the step, in float64.
 */
import { binding } from '../binding';
import { argRangeError, argTypeError } from '../errors';
import { describe } from '../validate';

/** OpenAI's bound on the alternatives a token may list. */
export const MAX_TOP_LOGPROBS = 20;

export interface TokenLogprob {
  token: number;
  /** Natural log of the token's probability under the model. */
  logprob: number;
}

export interface TokenLogprobs extends TokenLogprob {
  /** The most likely tokens of the step, most likely first (the lower id first on ties). */
  topLogprobs: TokenLogprob[];
}

/** A prompt token's entry: the first token has no log probability (nothing comes before it). */
export interface PromptTokenLogprobs {
  token: number;
  logprob: number | null;
  topLogprobs: TokenLogprob[];
}

/** What the `logprobs`, `promptLogprobs` and `topLogprobs` options ask for. */
export interface LogprobRequest {
  /** Score the generated tokens. */
  output: boolean;
  /** Score the prompt's tokens. */
  prompt: boolean;
  /** Alternatives each scored token lists (0 to MAX_TOP_LOGPROBS). */
  top: number;
}

/** The `logprobs`, `promptLogprobs` and `topLogprobs` options, checked. */
export function checkLogprobs(name: string, o: Record<string, unknown>): LogprobRequest {
  const flag = (key: 'logprobs' | 'promptLogprobs') => {
    const v = o[key];
    if (v !== undefined && typeof v !== 'boolean')
      throw argTypeError(`${name}.${key} must be a boolean, got ${describe(v)}`);
    return v === true;
  };
  const output = flag('logprobs'),
    prompt = flag('promptLogprobs');
  const top = o.topLogprobs;
  if (top === undefined) return { output, prompt, top: 0 };
  if (typeof top !== 'number') throw argTypeError(`${name}.topLogprobs must be a number, got ${describe(top)}`);
  if (!Number.isInteger(top) || top < 0 || top > MAX_TOP_LOGPROBS)
    throw argRangeError(`${name}.topLogprobs must be an integer in [0, ${MAX_TOP_LOGPROBS}], got ${top}`);
  if (!output && !prompt)
    throw argRangeError(`${name}.topLogprobs needs ${name}.logprobs or ${name}.promptLogprobs: true`);
  return { output, prompt, top };
}

/**
 * The log probability of `token` and the `top` most likely tokens under `logits` ([vocab]). A NaN
 * logit counts as -Infinity, as the sampler never draws it.
 */
export function tokenLogprobs(logits: Float32Array, token: number, top: number): TokenLogprobs {
  // The normaliser and the top ids natively (csrc/cpu/sampler.h): one pass over the vocabulary each,
  // where JavaScript took 2-3 ms over 151,936 logits, per scored token.
  const stats = binding().logSoftmaxStats(logits, Math.min(top, logits.length));
  const logSum = stats[0];
  const logprobOf = (t: number) => (logits[t] >= -Infinity ? logits[t] - logSum : -Infinity);
  const ids = Array.from(stats.subarray(1));
  return {
    token,
    logprob: logprobOf(token),
    topLogprobs: ids.map((t) => ({ token: t, logprob: logprobOf(t) })),
  };
}
