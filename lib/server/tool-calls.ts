/**
 * Tool calls in the model's text, as OpenAI's `tool_calls`. The chat template tells the model how to
 * write a call; this server reads two syntaxes:
 * - Hermes, which the Qwen2 and Qwen3 templates teach: one JSON object `{"name", "arguments"}` inside
 *   each `<tool_call>...</tool_call>`;
 * - Mistral's, which Mixtral-8x22B-Instruct's template teaches: `[TOOL_CALLS]` then a JSON array of
 *   such objects. There `[TOOL_CALLS]` is a special token, which decoding leaves out: the model engine
 *   writes its text back into a request with tools (model-engine.ts), and the template takes back only
 *   call ids of 9 letters and digits, which these calls get.
 * Text from the first opening marker on is held back while streaming and becomes the calls at the end;
 * calls that do not parse leave the whole text as content.
 */
import { randomBytes } from 'crypto';
import { StopMatcher } from '../generate/stop';
import { isRecord } from '../validate';

export type ToolCallSyntax = 'hermes' | 'mistral';

export interface ToolCall {
  id: string;
  type: 'function';
  function: { name: string; arguments: string };
}

interface Syntax {
  /** The text that starts the calls. */
  open: string;
  /** The calls' JSON objects in the text from `open` on; null when they do not parse. */
  objects(held: string): unknown[] | null;
  /** A forced call's text around its JSON object. */
  prefix: string;
  suffix: string;
  id(): string;
}

const HERMES_CALL = /<tool_call>([\s\S]*?)(?:<\/tool_call>|$)/g;
const ALPHANUMERIC = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789';

const SYNTAXES: Record<ToolCallSyntax, Syntax> = {
  hermes: {
    open: '<tool_call>',
    objects(held) {
      const out: unknown[] = [];
      for (const m of held.matchAll(HERMES_CALL)) {
        try {
          out.push(JSON.parse(m[1]));
        } catch {
          return null;
        }
      }
      return out;
    },
    prefix: '<tool_call>\n',
    suffix: '\n</tool_call>',
    id: () => `call_${randomBytes(12).toString('hex')}`,
  },
  mistral: {
    open: '[TOOL_CALLS]',
    objects(held) {
      try {
        const v: unknown = JSON.parse(held.slice('[TOOL_CALLS]'.length));
        return Array.isArray(v) ? v : [v];
      } catch {
        return null;
      }
    },
    prefix: '[TOOL_CALLS] [',
    suffix: ']',
    id: () => Array.from(randomBytes(9), (b) => ALPHANUMERIC[b % ALPHANUMERIC.length]).join(''),
  },
};

/** The text that starts a syntax's calls. */
export function toolCallMarker(syntax: ToolCallSyntax): string {
  return SYNTAXES[syntax].open;
}

/** The syntax a chat template teaches its model for tool calls; undefined when this server reads none. */
export function toolCallSyntaxOf(template: string | undefined): ToolCallSyntax | undefined {
  if (template?.includes(SYNTAXES.hermes.open)) return 'hermes';
  return template?.includes(SYNTAXES.mistral.open) ? 'mistral' : undefined;
}

/**
 * The response format that forces one call (tool_choice 'required' or a named function) in a syntax:
 * its text around a JSON object whose `name` is the function's (one of the tools') and whose
 * `arguments` follow its `parameters` when there is one function to call (any object when several are
 * allowed: the name alone tells them apart).
 */
export function forcedCall(
  tools: readonly object[],
  choice: 'required' | { name: string },
  syntax: ToolCallSyntax = 'hermes',
): { schema: object; prefix: string; suffix: string } {
  const functions = tools.map(
    (t) => (t as { function: { name: string; parameters?: Record<string, unknown> } }).function,
  );
  const allowed = choice === 'required' ? functions : functions.filter((f) => f.name === choice.name);
  const params = allowed.length === 1 ? (allowed[0].parameters ?? { type: 'object' }) : { type: 'object' };
  // The parameters' definitions move to the top, where their '#/$defs/...' references now point.
  const { $defs, definitions, ...args } = params as Record<string, unknown>;
  return {
    schema: {
      type: 'object',
      properties: { name: { enum: allowed.map((f) => f.name) }, arguments: args },
      required: ['name', 'arguments'],
      additionalProperties: false,
      ...($defs !== undefined && { $defs }),
      ...(definitions !== undefined && { definitions }),
    },
    prefix: SYNTAXES[syntax].prefix,
    suffix: SYNTAXES[syntax].suffix,
  };
}

/**
 * The calls of a generated text: the content before the first opening marker (null when only space)
 * and every call (Hermes: each closed or cut off by the end of the text); null when the text has no
 * call or a call is not a JSON object with a string `name`.
 */
export function parseToolCalls(
  text: string,
  syntax: ToolCallSyntax = 'hermes',
): { content: string | null; calls: ToolCall[] } | null {
  const s = SYNTAXES[syntax];
  const start = text.indexOf(s.open);
  if (start < 0) return null;
  const objects = s.objects(text.slice(start));
  if (!objects) return null;
  const calls: ToolCall[] = [];
  for (const call of objects) {
    if (!isRecord(call) || typeof call.name !== 'string') return null;
    const args = call.arguments ?? {};
    calls.push({
      id: s.id(),
      type: 'function',
      function: { name: call.name, arguments: typeof args === 'string' ? args : JSON.stringify(args) },
    });
  }
  const content = text.slice(0, start);
  return { content: content.trim() === '' ? null : content, calls };
}

/** Streamed text with tool calls: content goes out as it comes, until the first opening marker. */
export class ToolCallStream {
  readonly #open: string;
  readonly #opening: StopMatcher;
  /** The text from the first opening marker on, once it has come. */
  #held: string | null = null;

  constructor(readonly syntax: ToolCallSyntax = 'hermes') {
    this.#open = SYNTAXES[syntax].open;
    this.#opening = new StopMatcher([this.#open]);
  }

  /** Adds generated text; returns the content that can be streamed now. */
  push(text: string): string {
    if (this.#held !== null) {
      this.#held += text;
      return '';
    }
    const r = this.#opening.push(text);
    if (r.stopped) this.#held = this.#open + r.after!;
    return r.text;
  }

  /** At the end of the text: the calls, or (none, or not readable) the rest of the content. */
  finish(): { content: string; calls: ToolCall[] | null } {
    if (this.#held === null) return { content: this.#opening.flush(), calls: null };
    const parsed = parseToolCalls(this.#held, this.syntax);
    return parsed ? { content: '', calls: parsed.calls } : { content: this.#held, calls: null };
  }
}
