/**
 * Tool calls in the model's text, as OpenAI's `tool_calls`. The chat template tells the model how to
 * write a call; this server reads the Hermes syntax that the Qwen2 and Qwen3 templates teach (one JSON
 * object `{"name", "arguments"}` inside each `<tool_call>...</tool_call>`). Text from the first
 * `<tool_call>` on is held back while streaming and becomes the calls at the end; a call that is not
 * such JSON leaves the whole text as content.
 */
import { randomBytes } from 'crypto';
import { StopMatcher } from '../generate/stop';
import { isRecord } from '../validate';

export type ToolCallSyntax = 'hermes';

const OPEN = '<tool_call>';
const CLOSE = '</tool_call>';
const CALL = /<tool_call>([\s\S]*?)(?:<\/tool_call>|$)/g;

/** The syntax a chat template teaches its model for tool calls; undefined when this server reads none. */
export function toolCallSyntaxOf(template: string | undefined): ToolCallSyntax | undefined {
  return template?.includes(OPEN) ? 'hermes' : undefined;
}

/**
 * The response format that forces one call (tool_choice 'required' or a named function) in the
 * Hermes syntax: the tags around a JSON object whose `name` is the function's (one of the tools') and
 * whose `arguments` follow its `parameters` when there is one function to call (any object when
 * several are allowed: the name alone tells them apart).
 */
export function forcedCall(
  tools: readonly object[],
  choice: 'required' | { name: string },
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
    prefix: OPEN + '\n',
    suffix: '\n' + CLOSE,
  };
}

export interface ToolCall {
  id: string;
  type: 'function';
  function: { name: string; arguments: string };
}

/**
 * The calls of a generated text: the content before the first `<tool_call>` (null when only space)
 * and every call, each closed or cut off by the end of the text; null when the text has no call or a
 * call is not a JSON object with a string `name`.
 */
export function parseToolCalls(text: string): { content: string | null; calls: ToolCall[] } | null {
  const start = text.indexOf(OPEN);
  if (start < 0) return null;
  const calls: ToolCall[] = [];
  for (const m of text.slice(start).matchAll(CALL)) {
    let call: unknown;
    try {
      call = JSON.parse(m[1]);
    } catch {
      return null;
    }
    if (!isRecord(call) || typeof call.name !== 'string') return null;
    const args = call.arguments ?? {};
    calls.push({
      id: `call_${randomBytes(12).toString('hex')}`,
      type: 'function',
      function: { name: call.name, arguments: typeof args === 'string' ? args : JSON.stringify(args) },
    });
  }
  const content = text.slice(0, start);
  return { content: content.trim() === '' ? null : content, calls };
}

/** Streamed text with tool calls: content goes out as it comes, until the first `<tool_call>`. */
export class ToolCallStream {
  readonly #opening = new StopMatcher([OPEN]);
  /** The text from the first `<tool_call>` on, once it has come. */
  #held: string | null = null;

  /** Adds generated text; returns the content that can be streamed now. */
  push(text: string): string {
    if (this.#held !== null) {
      this.#held += text;
      return '';
    }
    const r = this.#opening.push(text);
    if (r.stopped) this.#held = OPEN + r.after!;
    return r.text;
  }

  /** At the end of the text: the calls, or (none, or not readable) the rest of the content. */
  finish(): { content: string; calls: ToolCall[] | null } {
    if (this.#held === null) return { content: this.#opening.flush(), calls: null };
    const parsed = parseToolCalls(this.#held);
    return parsed ? { content: '', calls: parsed.calls } : { content: this.#held, calls: null };
  }
}
