/**
 * The body of `POST /v1/chat/completions` and `POST /v1/completions`, checked field by field into what
 * the generator takes. A field of the wrong type or out of range is a 400 that names it, before the
 * model sees anything. Fields this server does not know are ignored, as most OpenAI-compatible servers
 * do; known features it does not have (best_of > 1, suffix) are refused rather than dropped.
 */
import { invalidRequest } from './api-error';
import { messageOf } from '../errors';
import { checkLogitBias } from '../generate/sampling';
import { compileSchema } from '../generate/json-schema';
import type { ChatMessage } from '../text/chat';
import { describe, isRecord } from '../validate';

export type { ChatMessage };

export interface CompletionRequest {
  endpoint: 'chat' | 'completion';
  /** Choices to generate for the prompt, each its own sequence. */
  n: number;
  /** Chat messages, a text prompt, or token ids (completions only). */
  prompt: ChatMessage[] | string | number[];
  stream: boolean;
  includeUsage: boolean;
  maxTokens?: number;
  temperature?: number;
  topP?: number;
  topK?: number;
  minP?: number;
  repetitionPenalty?: number;
  presencePenalty?: number;
  frequencyPenalty?: number;
  /** Token id (a decimal string, as JSON keys are) -> bias in [-100, 100]. */
  logitBias?: Record<string, number>;
  seed?: number;
  stop: string[];
  /** Generate maxTokens even past end-of-sequence tokens (vLLM's extension; benchmarks use it). */
  ignoreEos: boolean;
  /**
   * Present when log probabilities are asked for (chat `logprobs: true`, completions `logprobs: N`):
   * how many of the most likely tokens each token lists besides its own.
   */
  topLogprobs?: number;
  /** Completions: the text starts with the prompt (and the log probabilities with its tokens'). */
  echo: boolean;
  /** `response_format`: text, a JSON object (json_object), or a text of a JSON Schema (json_schema). */
  responseFormat: 'text' | 'json' | { schema: object };
  /** Chat: the tools the model may call (left out with tool_choice 'none'). */
  tools?: object[];
  /** Chat: a call is forced, of any of the tools or of the one named. */
  toolChoice?: 'required' | { name: string };
}

const ROLES = ['system', 'developer', 'user', 'assistant', 'tool'];
/** OpenAI's own limit on stop sequences. */
const MAX_STOP = 4;
/** OpenAI's limit on n. */
const MAX_CHOICES = 128;
/** OpenAI's chat limit on top_logprobs; completions' `logprobs` gets the same here (OpenAI: 5). */
const MAX_TOP_LOGPROBS = 20;

type Body = Record<string, unknown>;

function present(body: Body, key: string): boolean {
  return body[key] !== undefined && body[key] !== null;
}

function number(body: Body, key: string, min: number, max: number, minOpen = false): number | undefined {
  if (!present(body, key)) return undefined;
  const v = body[key];
  if (typeof v !== 'number' || !Number.isFinite(v))
    throw invalidRequest(`'${key}' must be a number, got ${describe(v)}`, key, 'invalid_type');
  if (v > max || v < min || (minOpen && v === min))
    throw invalidRequest(`'${key}' must be in ${minOpen ? '(' : '['}${min}, ${max}], got ${v}`, key, 'invalid_value');
  return v;
}

function integer(body: Body, key: string, min: number, max = Number.MAX_SAFE_INTEGER): number | undefined {
  const v = number(body, key, min, max);
  if (v !== undefined && !Number.isInteger(v))
    throw invalidRequest(`'${key}' must be an integer, got ${v}`, key, 'invalid_type');
  return v;
}

function boolean(body: Body, key: string): boolean {
  if (!present(body, key)) return false;
  if (typeof body[key] !== 'boolean')
    throw invalidRequest(`'${key}' must be a boolean, got ${describe(body[key])}`, key, 'invalid_type');
  return body[key] as boolean;
}

/** Refuses a feature this server does not implement unless the value asks for nothing. */
function notSupported(body: Body, key: string, harmless: (v: unknown) => boolean, what: string): void {
  if (present(body, key) && !harmless(body[key]))
    throw invalidRequest(`'${key}' is not supported by this server: ${what}`, key, 'unsupported_parameter');
}

/** `logit_bias`: token ids (decimal strings) to numbers in [-100, 100]; the model checks the ids' range. */
function logitBias(body: Body): Record<string, number> | undefined {
  if (!present(body, 'logit_bias')) return undefined;
  try {
    checkLogitBias('logit_bias', body.logit_bias, undefined);
  } catch (err) {
    throw invalidRequest(messageOf(err), 'logit_bias', err instanceof TypeError ? 'invalid_type' : 'invalid_value');
  }
  return body.logit_bias as Record<string, number>;
}

function stops(body: Body): string[] {
  if (!present(body, 'stop')) return [];
  const v = body.stop;
  const list = typeof v === 'string' ? [v] : v;
  if (!Array.isArray(list) || !list.every((s) => typeof s === 'string'))
    throw invalidRequest(`'stop' must be a string or an array of strings, got ${describe(v)}`, 'stop', 'invalid_type');
  if (list.length > MAX_STOP)
    throw invalidRequest(`'stop' takes at most ${MAX_STOP} sequences, got ${list.length}`, 'stop', 'invalid_value');
  if (list.some((s) => s.length === 0))
    throw invalidRequest(`'stop' sequences must not be empty`, 'stop', 'invalid_value');
  return list as string[];
}

function messageContent(v: unknown, param: string): string {
  if (typeof v === 'string') return v;
  if (Array.isArray(v)) {
    // The array form: only text parts; this server has no images or audio.
    return v
      .map((part, i) => {
        if (!isRecord(part) || part.type !== 'text' || typeof part.text !== 'string')
          throw invalidRequest(
            `'${param}[${i}]' must be a text part { type: 'text', text: string }; this server reads text only`,
            `${param}[${i}]`,
            'invalid_type',
          );
        return part.text;
      })
      .join('');
  }
  throw invalidRequest(
    `'${param}' must be a string or an array of text parts, got ${describe(v)}`,
    param,
    'invalid_type',
  );
}

function messages(body: Body): ChatMessage[] {
  const v = body.messages;
  if (!Array.isArray(v) || v.length === 0)
    throw invalidRequest(`'messages' must be a non-empty array, got ${describe(v)}`, 'messages', 'invalid_type');
  return v.map((m, i) => {
    const param = `messages[${i}]`;
    if (!isRecord(m)) throw invalidRequest(`'${param}' must be an object, got ${describe(m)}`, param, 'invalid_type');
    if (typeof m.role !== 'string' || !ROLES.includes(m.role))
      throw invalidRequest(
        `'${param}.role' must be one of ${ROLES.map((r) => `'${r}'`).join(', ')}, got ${describe(m.role)}`,
        `${param}.role`,
        'invalid_value',
      );
    // An assistant turn with tool calls may have null content; it still renders as an empty turn.
    const content = m.content === null && m.role === 'assistant' ? '' : messageContent(m.content, `${param}.content`);
    const message: ChatMessage = { role: m.role, content };
    if (m.role === 'assistant' && present(m, 'tool_calls')) message.tool_calls = toolCalls(m.tool_calls, param);
    for (const key of ['tool_call_id', 'name'] as const)
      if (present(m, key)) {
        const v = m[key];
        if (typeof v !== 'string')
          throw invalidRequest(
            `'${param}.${key}' must be a string, got ${describe(v)}`,
            `${param}.${key}`,
            'invalid_type',
          );
        message[key] = v;
      }
    return message;
  });
}

/**
 * An assistant turn's tool_calls, for the template: OpenAI sends each call's arguments as a JSON
 * string, templates write them with `tojson`, so a string that holds a JSON object becomes that object.
 */
function toolCalls(v: unknown, param: string): object[] {
  const name = `${param}.tool_calls`;
  if (!Array.isArray(v)) throw invalidRequest(`'${name}' must be an array, got ${describe(v)}`, name, 'invalid_type');
  return v.map((call, i) => {
    const f = isRecord(call) ? call.function : undefined;
    if (!isRecord(call) || !isRecord(f) || typeof f.name !== 'string')
      throw invalidRequest(
        `'${name}[${i}]' must be { id, type: 'function', function: { name, arguments } }, got ${describe(call)}`,
        `${name}[${i}]`,
        'invalid_type',
      );
    let args = f.arguments;
    if (typeof args === 'string')
      try {
        const parsed: unknown = JSON.parse(args);
        if (isRecord(parsed)) args = parsed;
      } catch {
        // Not JSON: the template gets the string as it came.
      }
    return { ...call, function: { ...f, arguments: args } };
  });
}

/**
 * `response_format`: text, any JSON object, or a text of a JSON Schema (checked here, so that a
 * keyword the constraint cannot follow is a 400 naming the schema).
 */
function responseFormat(body: Body): CompletionRequest['responseFormat'] {
  if (!present(body, 'response_format')) return 'text';
  const v = body.response_format;
  if (!isRecord(v) || !['text', 'json_object', 'json_schema'].includes(v.type as string))
    throw invalidRequest(
      `'response_format' must be { type: 'text' | 'json_object' | 'json_schema' }, got ${describe(v)}`,
      'response_format',
      'invalid_type',
    );
  if (v.type !== 'json_schema') return v.type === 'json_object' ? 'json' : 'text';
  const param = 'response_format.json_schema';
  const spec = v.json_schema;
  if (!isRecord(spec) || typeof spec.name !== 'string')
    throw invalidRequest(`'${param}' must be { name, schema?, strict? }, got ${describe(spec)}`, param, 'invalid_type');
  const schema = spec.schema ?? {};
  try {
    compileSchema(schema, `${param}.schema`);
  } catch (err) {
    throw invalidRequest(
      messageOf(err),
      `${param}.schema`,
      err instanceof TypeError ? 'invalid_type' : 'invalid_value',
    );
  }
  return { schema: schema as object };
}

/** `tools` (function definitions): what the template renders, none with tool_choice 'none'. */
function tools(body: Body): object[] | undefined {
  if (!present(body, 'tools')) return undefined;
  const v = body.tools;
  if (!Array.isArray(v)) throw invalidRequest(`'tools' must be an array, got ${describe(v)}`, 'tools', 'invalid_type');
  v.forEach((t, i) => {
    const f = isRecord(t) ? t.function : undefined;
    if (!isRecord(t) || t.type !== 'function' || !isRecord(f) || typeof f.name !== 'string' || f.name === '')
      throw invalidRequest(
        `'tools[${i}]' must be { type: 'function', function: { name, description?, parameters? } }, got ${describe(t)}`,
        `tools[${i}]`,
        'invalid_type',
      );
    if (present(f, 'parameters') && !isRecord(f.parameters))
      throw invalidRequest(
        `'tools[${i}].function.parameters' must be a JSON Schema object, got ${describe(f.parameters)}`,
        `tools[${i}].function.parameters`,
        'invalid_type',
      );
  });
  return v.length === 0 || body.tool_choice === 'none' ? undefined : (v as object[]);
}

/**
 * `tool_choice`: 'auto' (or left out) and 'none' ask for nothing more; 'required' and a named function
 * force one call, whose JSON the server then constrains (the function's parameters checked here as a
 * response schema).
 */
function toolChoice(body: Body, list: object[] | undefined): CompletionRequest['toolChoice'] {
  const v = body.tool_choice;
  if (!present(body, 'tool_choice') || v === 'auto' || v === 'none') return undefined;
  const fn = isRecord(v) && v.type === 'function' && isRecord(v.function) ? v.function.name : undefined;
  const named = typeof fn === 'string' ? fn : undefined;
  if (v !== 'required' && named === undefined)
    throw invalidRequest(
      `'tool_choice' must be 'auto', 'none', 'required' or { type: 'function', function: { name } }, got ${describe(v)}`,
      'tool_choice',
      'invalid_type',
    );
  if (!list) throw invalidRequest(`'tool_choice' ${describe(v)} needs 'tools'`, 'tool_choice', 'invalid_value');
  const functions = list.map((t) => (t as { function: { name: string; parameters?: object } }).function);
  const index = named === undefined ? -1 : functions.findIndex((f) => f.name === named);
  if (named !== undefined && index < 0)
    throw invalidRequest(`'tool_choice' names '${named}', which is not in 'tools'`, 'tool_choice', 'invalid_value');
  // Only one function's arguments are constrained by its parameters: several are told apart by name alone.
  const checked = named !== undefined ? [index] : functions.length === 1 ? [0] : [];
  for (const i of checked) {
    const param = `tools[${i}].function.parameters`;
    try {
      compileSchema(functions[i].parameters ?? {}, param);
    } catch (err) {
      throw invalidRequest(messageOf(err), param, err instanceof TypeError ? 'invalid_type' : 'invalid_value');
    }
  }
  return named === undefined ? 'required' : { name: named };
}

function prompt(body: Body): string | number[] {
  let v = body.prompt;
  // A list of one prompt is that prompt; several prompts would be several choices (n > 1).
  if (Array.isArray(v) && v.length === 1 && (typeof v[0] === 'string' || Array.isArray(v[0]))) v = v[0];
  if (typeof v === 'string') return v;
  if (Array.isArray(v) && v.length > 0 && v.every((t) => Number.isInteger(t) && t >= 0)) return v as number[];
  if (Array.isArray(v) && v.length > 1 && v.every((p) => typeof p === 'string' || Array.isArray(p)))
    throw invalidRequest(
      `'prompt' with several prompts is not supported: send one prompt per request`,
      'prompt',
      'unsupported_parameter',
    );
  throw invalidRequest(
    `'prompt' must be a string or a non-empty array of token ids, got ${describe(v)}`,
    'prompt',
    'invalid_type',
  );
}

/** Checks a parsed JSON body for one of the two generating endpoints. */
export function parseCompletionRequest(endpoint: 'chat' | 'completion', raw: unknown): CompletionRequest {
  const body = objectBody(raw);
  const stream = boolean(body, 'stream');
  let includeUsage = false;
  if (present(body, 'stream_options')) {
    const o = body.stream_options;
    if (!isRecord(o))
      throw invalidRequest(`'stream_options' must be an object, got ${describe(o)}`, 'stream_options', 'invalid_type');
    if (!stream)
      throw invalidRequest(`'stream_options' is only allowed when 'stream' is true`, 'stream_options', 'invalid_value');
    includeUsage = boolean(o, 'include_usage');
  }
  const n = integer(body, 'n', 1, MAX_CHOICES) ?? 1;
  const best = integer(body, 'best_of', 1);
  if (best !== undefined && best !== 1)
    throw invalidRequest(`'best_of' must be 1 on this server, got ${best}`, 'best_of', 'unsupported_parameter');
  if (endpoint === 'chat') notSupported(body, 'echo', (v) => v === false, 'echo is a /v1/completions field');
  notSupported(body, 'suffix', (v) => v === '', 'no insertion mode');
  if (endpoint === 'completion')
    notSupported(body, 'tools', (v) => Array.isArray(v) && v.length === 0, 'tools are for /v1/chat/completions');
  notSupported(body, 'functions', (v) => Array.isArray(v) && v.length === 0, 'no function calling');
  const chatTools = endpoint === 'chat' ? tools(body) : undefined;
  const forced = toolChoice(body, chatTools);
  const format = responseFormat(body);
  if (forced && format !== 'text')
    throw invalidRequest(
      `'response_format' must be text when 'tool_choice' forces a call (the call has a format of its own)`,
      'response_format',
      'invalid_value',
    );
  const maxCompletion = integer(body, 'max_completion_tokens', 1);
  const maxTokens = integer(body, 'max_tokens', 1);
  return {
    endpoint,
    prompt: endpoint === 'chat' ? messages(body) : prompt(body),
    n,
    stream,
    includeUsage,
    maxTokens: maxCompletion ?? maxTokens,
    temperature: number(body, 'temperature', 0, 2),
    topP: number(body, 'top_p', 0, 1, true),
    // Extensions with the names vLLM and llama.cpp's server use.
    topK: integer(body, 'top_k', 0),
    minP: number(body, 'min_p', 0, 1),
    repetitionPenalty: number(body, 'repetition_penalty', 0, 10, true),
    presencePenalty: number(body, 'presence_penalty', -2, 2),
    frequencyPenalty: number(body, 'frequency_penalty', -2, 2),
    logitBias: logitBias(body),
    seed: integer(body, 'seed', 0, Number.MAX_SAFE_INTEGER - MAX_CHOICES),
    stop: stops(body),
    ignoreEos: boolean(body, 'ignore_eos'),
    topLogprobs: endpoint === 'chat' ? chatLogprobs(body) : completionLogprobs(body),
    echo: endpoint === 'completion' && boolean(body, 'echo'),
    tools: chatTools,
    toolChoice: forced,
    responseFormat: format,
  };
}

/** Chat: `logprobs: true` asks for them, `top_logprobs` for that many alternatives a token. */
function chatLogprobs(body: Body): number | undefined {
  const on = boolean(body, 'logprobs');
  const top = integer(body, 'top_logprobs', 0, MAX_TOP_LOGPROBS);
  if (top !== undefined && top > 0 && !on)
    throw invalidRequest(`'top_logprobs' needs 'logprobs': true`, 'top_logprobs', 'invalid_value');
  return on ? (top ?? 0) : undefined;
}

/** Completions: `logprobs: N` asks for them with N alternatives a token (and the token's own). */
function completionLogprobs(body: Body): number | undefined {
  notSupported(body, 'top_logprobs', () => false, "on /v1/completions 'logprobs': N asks for N alternatives");
  return integer(body, 'logprobs', 0, MAX_TOP_LOGPROBS);
}

/** `POST /tokenize`: a text prompt, or chat messages (with their tools) as the chat endpoint renders them. */
export interface TokenizeRequest {
  prompt: ChatMessage[] | string;
  tools?: object[];
}

/** Checks the body of `POST /tokenize` (vLLM's shape: `prompt`, or `messages` and `tools`). */
export function parseTokenizeRequest(body: unknown): TokenizeRequest {
  const b = objectBody(body);
  // The ids are those a request's prompt gets: the tokenizer's special tokens for a text, the
  // generation prompt for messages. Asking for other ones is refused rather than ignored.
  notSupported(b, 'add_special_tokens', (v) => v === true, 'a text prompt always gets its special tokens');
  notSupported(b, 'add_generation_prompt', (v) => v === true, 'messages always end with the generation prompt');
  if (present(b, 'messages')) {
    if (present(b, 'prompt')) throw invalidRequest(`give 'prompt' or 'messages', not both`, 'prompt', 'invalid_value');
    return { prompt: messages(b), tools: tools(b) };
  }
  if (typeof b.prompt !== 'string' || b.prompt === '')
    throw invalidRequest(
      `'prompt' (a non-empty string) or 'messages' is required, got prompt ${describe(b.prompt)}`,
      'prompt',
      'invalid_type',
    );
  return { prompt: b.prompt };
}

/** Checks the body of `POST /detokenize`: `tokens`, an array of token ids. */
export function parseDetokenizeRequest(body: unknown): number[] {
  const t = objectBody(body).tokens;
  if (!Array.isArray(t) || !t.every((x) => Number.isInteger(x) && x >= 0))
    throw invalidRequest(`'tokens' must be an array of token ids, got ${describe(t)}`, 'tokens', 'invalid_type');
  return t as number[];
}

function objectBody(body: unknown): Body {
  if (!isRecord(body)) throw invalidRequest(`the request body must be a JSON object, got ${describe(body)}`);
  if (present(body, 'model') && typeof body.model !== 'string')
    throw invalidRequest(`'model' must be a string, got ${describe(body.model)}`, 'model', 'invalid_type');
  return body;
}
