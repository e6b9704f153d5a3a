/**
 * The package's own error codes. A MoeError carries one; so does a RangeError for a bad argument the
 * code names: ERR_MOE_SHAPE (a size that does not match the config), ERR_MOE_DTYPE (an element type
 * that does not match) and ERR_MOE_INVALID (a value refused by the native checks).
 */
export type MoeErrorCode =
  | 'ERR_MOE_INVALID'
  | 'ERR_MOE_SHAPE'
  | 'ERR_MOE_DTYPE'
  | 'ERR_MOE_NO_DEVICE'
  | 'ERR_MOE_CUDA'
  | 'ERR_MOE_OUT_OF_MEMORY'
  | 'ERR_MOE_DISPOSED'
  | 'ERR_MOE_LOAD'
  | 'ERR_MOE_CHECKPOINT'
  | 'ERR_MOE_NUMERIC'
  | 'ERR_MOE_INTERNAL';

/**
 * Errors that are not argument mistakes: missing device, CUDA failure, out of memory, a broken
 * checkpoint, a disposed layer, logits no token can be sampled from, a bug.
 */
export class MoeError extends Error {
  readonly code: MoeErrorCode;
  constructor(code: MoeErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'MoeError';
    this.code = code;
  }
}

/** A TypeError naming the argument; `code` is ERR_INVALID_ARG_TYPE like Node's own. */
export function argTypeError(message: string): TypeError {
  return Object.assign(new TypeError(message), { code: 'ERR_INVALID_ARG_TYPE' });
}

/**
 * A RangeError naming the argument; `code` tells a wrong size (ERR_MOE_SHAPE) or element type
 * (ERR_MOE_DTYPE) from any other wrong value (ERR_OUT_OF_RANGE, like Node's own).
 */
export function argRangeError(message: string, code = 'ERR_OUT_OF_RANGE'): RangeError {
  return Object.assign(new RangeError(message), { code });
}

/** A checkpoint file that is missing, unreadable or malformed: ERR_MOE_CHECKPOINT naming the file. */
export function checkpointError(file: string, message: string, cause?: unknown): MoeError {
  return new MoeError('ERR_MOE_CHECKPOINT', `${file}: ${message}`, cause === undefined ? undefined : { cause });
}

/** The message of anything thrown. */
export function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** The error a cancelled forward rejects with, shaped like Node's own AbortError. */
export class AbortError extends Error {
  readonly code = 'ABORT_ERR';
  constructor(message = 'The operation was aborted', options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'AbortError';
  }
}

/**
 * Turns an error thrown by the native binding into the public error types: the native argument
 * checks (ERR_MOE_INVALID, ERR_MOE_DTYPE) become RangeErrors. Checks names, not instanceof: native
 * errors may come from another realm (vm contexts, test runners).
 */
export function fromNative(err: unknown): Error {
  if (err instanceof MoeError || err instanceof AbortError) return err;
  if (typeof err !== 'object' || err === null) return new MoeError('ERR_MOE_INTERNAL', String(err));
  const { name, message, code } = err as { name?: unknown; message?: unknown; code?: unknown };
  const text = typeof message === 'string' ? message : String(err);
  if (name === 'TypeError') return err instanceof TypeError ? err : argTypeError(text);
  if (name === 'RangeError') return err instanceof RangeError ? err : argRangeError(text);
  if (code === 'ABORT_ERR') return new AbortError(text);
  if (code === 'ERR_MOE_INVALID' || code === 'ERR_MOE_DTYPE') return argRangeError(text, code);
  if (typeof code === 'string' && code.startsWith('ERR_MOE_')) return new MoeError(code as MoeErrorCode, text);
  return new MoeError('ERR_MOE_INTERNAL', text, { cause: err });
}
