/** Chat templates: the checkpoint's Jinja template, rendered by @huggingface/jinja. */
import type { Template } from '@huggingface/jinja';
import { argRangeError, argTypeError, messageOf } from '../errors';
import { describe, isRecord } from '../validate';

export interface ChatMessage {
  role: string;
  content: string;
  /** An assistant turn's calls of tools; this and every other field reach the template as they are. */
  tool_calls?: readonly unknown[];
  /** A tool turn: the id of the call it answers. */
  tool_call_id?: string;
  name?: string;
}

/** The `tools` of a conversation: a list of objects the template renders (OpenAI's function definitions). */
export function checkTools(name: string, v: unknown): object[] | undefined {
  if (v === undefined) return undefined;
  if (!Array.isArray(v) || !v.every(isRecord))
    throw argTypeError(`${name} must be an array of tool definitions (objects), got ${describe(v)}`);
  return v;
}

/** A list of { role, content } messages, checked; `name` is the argument errors cite. */
export function checkMessages(name: string, v: unknown): ChatMessage[] {
  if (!Array.isArray(v) || v.length === 0)
    throw argTypeError(`${name} must be a non-empty array of { role, content } messages, got ${describe(v)}`);
  return v.map((m: unknown, i) => {
    if (!isRecord(m) || typeof m.role !== 'string' || typeof m.content !== 'string')
      throw argTypeError(`${name}[${i}] must be a { role: string, content: string } message, got ${describe(m)}`);
    return m as unknown as ChatMessage;
  });
}

export class ChatTemplate {
  readonly #template: Template;

  /** Parses the template once; throws what the parser throws. */
  constructor(
    readonly source: string,
    readonly bosToken: string | null,
    readonly eosToken: string | null,
  ) {
    // eslint-disable-next-line @typescript-eslint/no-require-imports -- loaded on first use, as the tokenizer library
    const { Template: Impl } = require('@huggingface/jinja') as typeof import('@huggingface/jinja');
    this.#template = new Impl(source);
  }

  /**
   * The prompt text of `messages`. A template that refuses the conversation (raise_exception, a
   * missing field) is a RangeError naming the argument and quoting the template's message.
   */
  render(
    messages: readonly ChatMessage[],
    addGenerationPrompt: boolean,
    name: string,
    tools?: readonly object[],
  ): string {
    try {
      return this.#template.render({
        messages,
        add_generation_prompt: addGenerationPrompt,
        bos_token: this.bosToken ?? '',
        eos_token: this.eosToken ?? '',
        // Left out rather than empty: templates test `tools is defined` as often as `tools`.
        ...(tools ? { tools } : {}),
      });
    } catch (err) {
      throw ChatTemplate.refusal(name, messageOf(err));
    }
  }

  /** The error of a template that raised `message` while rendering the argument `name`. */
  static refusal(name: string, message: string): RangeError {
    return argRangeError(`${name}: the chat template refused the messages: ${message}`);
  }
}
