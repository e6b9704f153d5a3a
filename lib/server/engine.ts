/**
 * What the server needs from a model: start one generation for a checked request, and the numbers
 * the metrics report. `modelEngine` adapts a MoeModel; tests may pass their own.
 */
import type { PromptTokenLogprobs, TokenLogprob } from '../generate/logprobs';
import type { CompletionRequest, TokenizeRequest } from './request';
import type { ToolCallSyntax } from './tool-calls';

export type FinishReason = 'stop' | 'length' | 'abort';

export interface GeneratedToken {
  token: number;
  text: string;
  /** When the request asked for log probabilities: the token's. */
  logprob?: number;
  /** ... and the request's topLogprobs most likely tokens of the step. */
  topLogprobs?: TokenLogprob[];
  /** With echo and log probabilities, on the first token: the prompt's tokens, scored. */
  promptLogprobs?: PromptTokenLogprobs[];
}

export interface GenerationRun {
  /** The next generated token and its text (empty while a UTF-8 character is incomplete). */
  next(): Promise<IteratorResult<GeneratedToken>>;
  /** Valid once next() has returned done. */
  result(): {
    finishReason: FinishReason;
    promptTokens: number;
    completionTokens: number;
    /** Prompt tokens whose KV cache was reused from another request rather than computed. */
    cachedTokens?: number;
  };
}

export interface GenerationEngine {
  /** Sequences the step loop runs at once; more requests wait in its queue. */
  readonly maxSequences: number;
  /** Starts a generation; a bad request rejects the first next() with a TypeError or RangeError. */
  start(request: CompletionRequest, signal: AbortSignal): GenerationRun;
  queueDepth(): number;
  activeSequences(): number;
  /**
   * The bytes of a token alone, for the text of log probabilities; without it (or without a tokenizer)
   * a token is written `token_id:<id>`.
   */
  tokenBytes?(token: number): Uint8Array | undefined;
  /**
   * How the model writes tool calls (its chat template's syntax); without one, a request with tools is
   * refused.
   */
  readonly toolCallSyntax?: ToolCallSyntax;
  /** The text of token ids, for echoing a prompt given as ids; without it such a prompt echoes as ''. */
  detokenize?(ids: number[]): string;
  /** Tokens routed to each expert of each MoE layer since load ([layer][expert]); empty if unknown. */
  expertTokens(): ArrayLike<ArrayLike<number>>;
  /** Running generations that gave their KV cache back to wait again, since load. */
  preemptions?(): number;
  /** The ids a request's prompt gets (for `POST /tokenize`); without it the route answers 404. */
  tokenize?(request: TokenizeRequest): Promise<number[]>;
  /** Longest sequence in tokens, which `POST /tokenize` reports as `max_model_len`. */
  readonly contextLength?: number;
}
