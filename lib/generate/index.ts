/**
 * model.generate and model.complete: the prompt (text, messages through the chat template, or token
 * ids) checked and tokenized up front, then one request of the model's step loop (engine.ts).
 */
import { MoeError, argRangeError, argTypeError } from '../errors';
import { ChatMessage, checkMessages } from '../text/chat';
import type { TextTokenizer } from '../text/tokenizer';
import { checkObject, checkSignal, describe, isRecord } from '../validate';
import { Engine, GenerationPiece, GenerationResult, Request } from './engine';
import { SamplingOptions, checkSampling } from './sampling';
import { checkStop } from './stop';

export type { GenerationPiece, GenerationResult, FinishReason } from './engine';
export type { SamplingOptions } from './sampling';

/** A prompt: text, a conversation for the chat template, or token ids (used as they are). */
export type Prompt = string | readonly ChatMessage[] | ArrayLike<number>;

export interface GenerateOptions extends SamplingOptions {
  /** Tokens to generate at most; default: until the end of the context. */
  maxTokens?: number;
  /** Generation ends before the first of these strings (which is not part of the text). */
  stop?: string | string[];
  /** Ends the generation (finishReason 'abort'); its sequence is freed at the next step. */
  signal?: AbortSignal;
  /** Keep generating past end-of-sequence tokens, up to maxTokens (benchmarks use it); default false. */
  ignoreEos?: boolean;
}

/** The stream generate() returns: pieces as they come; its final result is the iterator's return value. */
export type Generation = AsyncIterableIterator<GenerationPiece, GenerationResult, undefined>;

/** What generate needs of the model beyond the engine. */
export interface GenerateModel {
  readonly config: { vocabSize: number; eosTokenIds: number[] };
  readonly options: Readonly<{ contextLength: number }>;
  readonly tokenizer: TextTokenizer | undefined;
  /** Sampling defaults from the checkpoint's generation_config.json. */
  readonly generationDefaults: Readonly<Omit<SamplingOptions, 'seed'>>;
}

const NAME = 'promptOrMessages';

/** Characters a token of text the first prefix assumes: ordinary text runs 3 to 5. */
const CHARS_PER_TOKEN = 8;
/** Tokens a cut through the text can add to a prefix beyond what the whole text has there. */
const CUT_MARGIN = 64;

/**
 * The ids of a prompt text. A text far longer than the context is refused before it is tokenized whole
 * (the tokenizer runs on the event loop: a megabyte took about a second, every stream waiting): prefixes
 * of doubling length go first, from CHARS_PER_TOKEN characters a position of the context, until the
 * text ends or a prefix already holds more tokens than the context.
 */
function encodePrompt(tokenizer: TextTokenizer, text: string, addSpecialTokens: boolean, context: number): number[] {
  for (let n = context * CHARS_PER_TOKEN; n < text.length; n *= 2) {
    const cut = text.charCodeAt(n - 1) >= 0xd800 && text.charCodeAt(n - 1) < 0xdc00 ? n - 1 : n; // whole pairs
    const count = tokenizer.encode(text.slice(0, cut), addSpecialTokens).length;
    if (count > context + CUT_MARGIN)
      throw argRangeError(
        `${NAME} holds more than ${count - CUT_MARGIN} tokens (its first ${cut} characters give ${count}), ` +
          `more than the context of ${context}`,
      );
  }
  return tokenizer.encode(text, addSpecialTokens);
}

/** The prompt's token ids, checked. */
export function promptTokens(model: GenerateModel, prompt: unknown): number[] {
  let ids: number[];
  const context = model.options.contextLength;
  if (typeof prompt === 'string') {
    if (!model.tokenizer) throw noTokenizer();
    ids = encodePrompt(model.tokenizer, prompt, true, context);
  } else if (Array.isArray(prompt) && prompt.length > 0 && isRecord(prompt[0])) {
    const messages = checkMessages(NAME, prompt);
    if (!model.tokenizer) throw noTokenizer();
    // The template writes the special tokens (BOS, ...) itself.
    ids = encodePrompt(model.tokenizer, model.tokenizer.renderChat(messages, true, NAME), false, context);
  } else if (
    (Array.isArray(prompt) || ArrayBuffer.isView(prompt)) &&
    typeof (prompt as ArrayLike<unknown>).length === 'number'
  ) {
    const V = model.config.vocabSize;
    ids = Array.from(prompt as ArrayLike<unknown>, (t, i) => {
      if (typeof t !== 'number' || !Number.isInteger(t) || t < 0 || t >= V)
        throw argRangeError(`${NAME}[${i}] must be a token id in [0, ${V}), got ${describe(t)}`);
      return t;
    });
  } else
    throw argTypeError(
      `${NAME} must be a string, an array of { role, content } messages or an array of token ids, got ${describe(prompt)}`,
    );
  // The tokenizer's ids (a template's special tokens among them) must be the model's too.
  const V = model.config.vocabSize,
    beyond = ids.findIndex((t) => t >= V);
  if (beyond >= 0)
    throw new MoeError(
      'ERR_MOE_CHECKPOINT',
      `the tokenizer gave id ${ids[beyond]} at position ${beyond} of the prompt, beyond the model's vocabulary of ${V}`,
    );
  if (ids.length === 0) throw argRangeError(`${NAME} gives no tokens; at least one is needed`);
  if (ids.length > context)
    throw argRangeError(`${NAME} holds ${ids.length} tokens, more than the context of ${context}`);
  return ids;
}

/** A maxTokens option: undefined, or an integer >= 1. */
export function checkMaxTokens(name: string, v: unknown): number | undefined {
  if (v === undefined) return undefined;
  if (typeof v !== 'number') throw argTypeError(`${name} must be a number, got ${describe(v)}`);
  if (!Number.isSafeInteger(v) || v < 1) throw argRangeError(`${name} must be an integer >= 1, got ${v}`);
  return v;
}

export function noTokenizer(): MoeError {
  return new MoeError(
    'ERR_MOE_CHECKPOINT',
    "this model's checkpoint folder has no tokenizer.json: pass token ids, or add the tokenizer files",
  );
}

/** Checks everything, then queues the request; throws before anything is queued. */
export function generate(model: GenerateModel, engine: Engine, prompt: unknown, options: unknown): Generation {
  const o = options ?? {};
  checkObject('options', o);
  const params = checkSampling('options', o, model.generationDefaults);
  const maxTokens = checkMaxTokens('options.maxTokens', o.maxTokens) ?? model.options.contextLength;
  const stop = checkStop('options.stop', o.stop);
  if (stop.length > 0 && !model.tokenizer) throw noTokenizer();
  const signal = checkSignal('options.signal', o.signal);
  const ids = promptTokens(model, prompt);
  if (o.ignoreEos !== undefined && typeof o.ignoreEos !== 'boolean')
    throw argTypeError(`options.ignoreEos must be a boolean, got ${describe(o.ignoreEos)}`);
  const eos = new Set(o.ignoreEos ? [] : [...model.config.eosTokenIds, ...(model.tokenizer?.eosTokenIds ?? [])]);
  const request = new Request(ids, params, maxTokens, stop, model.tokenizer, eos);

  if (signal) {
    const onAbort = () => engine.cancel(request);
    if (signal.aborted) request.finish('abort');
    else {
      signal.addEventListener('abort', onAbort, { once: true });
      request.onEnd = () => signal.removeEventListener('abort', onAbort);
    }
  }
  if (!request.done) engine.submit(request);
  const generation: Generation = {
    next: () => request.next(),
    async return(): Promise<IteratorResult<GenerationPiece, GenerationResult>> {
      engine.cancel(request);
      for (;;) {
        const r = await request.next();
        if (r.done) return r;
      }
    },
    [Symbol.asyncIterator]() {
      return generation;
    },
  };
  return generation;
}

/** Runs a generation to its end. */
export async function complete(
  model: GenerateModel,
  engine: Engine,
  prompt: unknown,
  options: unknown,
): Promise<GenerationResult> {
  const generation = generate(model, engine, prompt, options);
  for (;;) {
    const r = await generation.next();
    if (r.done) return r.value;
  }
}
