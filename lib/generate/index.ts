/**
 * model.generate and model.complete: the prompt (text, messages through the chat template, or token
 * ids) checked and tokenized up front, then one request of the model's step loop (engine.ts). A long
 * text is tokenized, and a long conversation rendered, on a worker thread (TextTokenizer.encodeAsync,
 * renderChatAsync): the request joins the loop once its ids are known, and what would have been thrown
 * comes out of the first next().
 */
import { MoeError, argRangeError, argTypeError } from '../errors';
import { ChatMessage, checkMessages, checkTools } from '../text/chat';
import { TextTokenizer } from '../text/tokenizer';
import { checkObject, checkSignal, describe, isRecord } from '../validate';
import { Engine, GenerationPiece, GenerationResult, Request } from './engine';
import { JsonConstraint, JsonFormat } from './json-constraint';
import { ANY_OBJECT, compileSchema } from './json-schema';
import { checkLogprobs } from './logprobs';
import { SamplingOptions, checkSampling } from './sampling';
import { checkStop } from './stop';

export type { GenerationPiece, GenerationResult, FinishReason } from './engine';
export type { SamplingOptions } from './sampling';
export type { TokenLogprob, TokenLogprobs, PromptTokenLogprobs } from './logprobs';

/** A prompt: text, a conversation for the chat template, or token ids (used as they are). */
export type Prompt = string | readonly ChatMessage[] | ArrayLike<number>;

export interface GenerateOptions extends SamplingOptions {
  /** Tokens to generate at most; default: until the end of the context. */
  maxTokens?: number;
  /**
   * 'json': the output is a JSON object; `{ schema }`: a JSON text of that JSON Schema (the keywords
   * json-schema.ts follows). Tokens that cannot continue one are left out of every draw, and once the
   * value is complete only end-of-sequence tokens remain (maxTokens may still cut it); the prompt
   * should ask for JSON too. Default 'text'.
   */
  responseFormat?: 'text' | 'json' | { schema: object; prefix?: string; suffix?: string };
  /**
   * With messages: the tools the model may call, rendered by the chat template as its `tools`
   * (OpenAI's `{ type: 'function', function: { name, description, parameters } }` for most templates).
   */
  tools?: readonly object[];
  /** Generation ends before the first of these strings (which is not part of the text). */
  stop?: string | string[];
  /** Ends the generation (finishReason 'abort'); its sequence is freed at the next step. */
  signal?: AbortSignal;
  /** Keep generating past end-of-sequence tokens, up to maxTokens (benchmarks use it); default false. */
  ignoreEos?: boolean;
  /**
   * Give each token's log probability under the model (the log-softmax of its logits, before the bias,
   * the penalties and the temperature): pieces carry `logprob`, the result `logprobs`; default false.
   */
  logprobs?: boolean;
  /**
   * Give the log probability of each prompt token after the first (the prompt is then computed whole,
   * with no cached prefix): the first piece carries `promptLogprobs`, the result too; default false.
   */
  promptLogprobs?: boolean;
  /** With `logprobs` or `promptLogprobs`: each token also lists this many most likely tokens (0 to 20); default 0. */
  topLogprobs?: number;
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
 * (a megabyte takes the tokenizer about a second): prefixes of doubling length go first, from
 * CHARS_PER_TOKEN characters a position of the context, until the text ends or a prefix already holds
 * more tokens than the context. Pieces shorter than TextTokenizer.WORKER_MIN_CHARS are tokenized at
 * once; from the first longer one on, on the tokenizer's worker thread (a promise).
 */
function encodePrompt(
  tokenizer: TextTokenizer,
  text: string,
  addSpecialTokens: boolean,
  context: number,
): number[] | Promise<number[]> {
  const cuts: number[] = [];
  for (let n = context * CHARS_PER_TOKEN; n < text.length; n *= 2)
    cuts.push(text.charCodeAt(n - 1) >= 0xd800 && text.charCodeAt(n - 1) < 0xdc00 ? n - 1 : n); // whole pairs
  const checkPrefix = (cut: number, count: number) => {
    if (count > context + CUT_MARGIN)
      throw argRangeError(
        `${NAME} holds more than ${count - CUT_MARGIN} tokens (its first ${cut} characters give ${count}), ` +
          `more than the context of ${context}`,
      );
  };
  const long = TextTokenizer.WORKER_MIN_CHARS;
  let i = 0;
  for (; i < cuts.length && cuts[i] < long; i++)
    checkPrefix(cuts[i], tokenizer.encode(text.slice(0, cuts[i]), addSpecialTokens).length);
  if (i === cuts.length && text.length < long) return tokenizer.encode(text, addSpecialTokens);
  return (async () => {
    for (; i < cuts.length; i++)
      checkPrefix(cuts[i], (await tokenizer.encodeAsync(text.slice(0, cuts[i]), addSpecialTokens)).length);
    return tokenizer.encodeAsync(text, addSpecialTokens);
  })();
}

/** Whether a prompt is a conversation (messages for the chat template) rather than text or ids. */
function isMessages(prompt: unknown): boolean {
  return Array.isArray(prompt) && prompt.length > 0 && isRecord(prompt[0]);
}

/** The prompt's token ids, checked; a promise where a long text is tokenized off the event loop. */
export function promptTokens(
  model: GenerateModel,
  prompt: unknown,
  tools?: readonly object[],
): number[] | Promise<number[]> {
  const context = model.options.contextLength;
  if (typeof prompt === 'string') {
    if (!model.tokenizer) throw noTokenizer();
    return checkedIds(model, encodePrompt(model.tokenizer, prompt, true, context));
  }
  if (isMessages(prompt)) {
    const messages = checkMessages(NAME, prompt);
    const tokenizer = model.tokenizer;
    if (!tokenizer) throw noTokenizer();
    // The template writes the special tokens (BOS, ...) itself. A long conversation is rendered on the
    // worker thread; a short one (or a checkpoint without a template) here, so that its errors throw.
    if (messages.length < TextTokenizer.WORKER_MIN_MESSAGES || !tokenizer.chatTemplate)
      return checkedIds(
        model,
        encodePrompt(tokenizer, tokenizer.renderChat(messages, true, NAME, tools), false, context),
      );
    const text = tokenizer.renderChatAsync(messages, true, NAME, tools);
    return checkedIds(
      model,
      text.then((t) => encodePrompt(tokenizer, t, false, context)),
    );
  }
  let ids: number[];
  if (
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
  return checkedIds(model, ids);
}

function checkedIds(model: GenerateModel, ids: number[]): number[];
function checkedIds(model: GenerateModel, ids: number[] | Promise<number[]>): number[] | Promise<number[]>;
function checkedIds(model: GenerateModel, ids: number[] | Promise<number[]>): number[] | Promise<number[]> {
  if (ids instanceof Promise) return ids.then((resolved) => checkedIds(model, resolved));
  const context = model.options.contextLength;
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

/** The `responseFormat` option: null for text, else what the output must be. */
function checkResponseFormat(v: unknown): JsonFormat | null {
  if (v === undefined || v === 'text') return null;
  if (v === 'json') return { schema: ANY_OBJECT, prefix: '', suffix: '' };
  if (
    isRecord(v) &&
    v.schema !== undefined &&
    Object.keys(v).every((k) => ['schema', 'prefix', 'suffix'].includes(k))
  ) {
    const text = (key: 'prefix' | 'suffix') => {
      const t = v[key] ?? '';
      if (typeof t !== 'string')
        throw argTypeError(`options.responseFormat.${key} must be a string, got ${describe(t)}`);
      return Buffer.from(t, 'utf8').toString('latin1'); // the automaton reads bytes
    };
    return {
      schema: compileSchema(v.schema, 'options.responseFormat.schema'),
      prefix: text('prefix'),
      suffix: text('suffix'),
    };
  }
  throw argTypeError(
    `options.responseFormat must be 'text', 'json' or { schema, prefix?, suffix? }, got ${describe(v)}`,
  );
}

export function noTokenizer(): MoeError {
  return new MoeError(
    'ERR_MOE_CHECKPOINT',
    "this model's checkpoint folder has no tokenizer.json: pass token ids, or add the tokenizer files",
  );
}

/**
 * Checks everything, then queues the request; throws before anything is queued. A prompt text long
 * enough to be tokenized on the worker thread is queued once its ids are known, and its errors reject
 * next().
 */
export function generate(model: GenerateModel, engine: Engine, prompt: unknown, options: unknown): Generation {
  const o = options ?? {};
  checkObject('options', o);
  const params = checkSampling('options', o, model.generationDefaults, model.config.vocabSize);
  const maxTokens = checkMaxTokens('options.maxTokens', o.maxTokens) ?? model.options.contextLength;
  const stop = checkStop('options.stop', o.stop);
  if (stop.length > 0 && !model.tokenizer) throw noTokenizer();
  const signal = checkSignal('options.signal', o.signal);
  if (o.ignoreEos !== undefined && typeof o.ignoreEos !== 'boolean')
    throw argTypeError(`options.ignoreEos must be a boolean, got ${describe(o.ignoreEos)}`);
  const scoring = checkLogprobs('options', o);
  const format = checkResponseFormat(o.responseFormat);
  if (format && !model.tokenizer) throw noTokenizer();
  const eos = new Set(o.ignoreEos ? [] : [...model.config.eosTokenIds, ...(model.tokenizer?.eosTokenIds ?? [])]);

  const start = (ids: number[], constraint: JsonConstraint | null): Request => {
    const request = new Request(ids, params, maxTokens, stop, model.tokenizer, eos, scoring);
    request.json = constraint;
    if (signal) {
      const onAbort = () => engine.cancel(request);
      if (signal.aborted) request.finish('abort');
      else {
        signal.addEventListener('abort', onAbort, { once: true });
        request.onEnd = () => signal.removeEventListener('abort', onAbort);
      }
    }
    if (!request.done) engine.submit(request);
    return request;
  };
  const tools = checkTools('options.tools', o.tools);
  if (tools && !isMessages(prompt))
    throw argTypeError('options.tools needs a prompt of messages: the chat template renders them');
  const ids = promptTokens(model, prompt, tools);
  // The first JSON request of a tokenizer gathers its vocabulary's bytes between turns of the event loop.
  const constraint = format ? JsonConstraint.create(model.tokenizer!, model.config.vocabSize, format, eos) : null;
  let request: Request | Promise<Request>;
  if (ids instanceof Promise || constraint instanceof Promise) {
    request = Promise.all([ids, constraint]).then(([i, c]) => start(i, c));
    request.catch(() => undefined); // a generation never read must not end the process
  } else request = start(ids, constraint);

  const generation: Generation = {
    next: request instanceof Request ? request.next.bind(request) : async () => (await request).next(),
    async return(): Promise<IteratorResult<GenerationPiece, GenerationResult>> {
      const r = await request;
      engine.cancel(r);
      for (;;) {
        const piece = await r.next();
        if (piece.done) return piece;
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
