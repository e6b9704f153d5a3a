/**
 * What the server needs from a model: start one generation for a checked request, and the numbers
 * the metrics report. `modelEngine` adapts a MoeModel; tests may pass their own.
 */
import type { CompletionRequest } from './request';

export type FinishReason = 'stop' | 'length' | 'abort';

export interface GenerationRun {
  /** The next generated token and its text (empty while a UTF-8 character is incomplete). */
  next(): Promise<IteratorResult<{ token: number; text: string }>>;
  /** Valid once next() has returned done. */
  result(): { finishReason: FinishReason; promptTokens: number; completionTokens: number };
}

export interface GenerationEngine {
  /** Sequences the step loop runs at once; more requests wait in its queue. */
  readonly maxSequences: number;
  /** Starts a generation; a bad request rejects the first next() with a TypeError or RangeError. */
  start(request: CompletionRequest, signal: AbortSignal): GenerationRun;
  queueDepth(): number;
  activeSequences(): number;
  /** Tokens routed to each expert of each MoE layer since load ([layer][expert]); empty if unknown. */
  expertTokens(): ArrayLike<ArrayLike<number>>;
}
