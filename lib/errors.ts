/** Stable error codes carried by every error this package throws on purpose. */
export type MoeErrorCode =
  | 'ERR_MOE_INVALID'
  | 'ERR_MOE_SHAPE'
  | 'ERR_MOE_DTYPE'
  | 'ERR_MOE_NO_DEVICE'
  | 'ERR_MOE_CUDA'
  | 'ERR_MOE_OUT_OF_MEMORY'
  | 'ERR_MOE_DISPOSED'
  | 'ERR_MOE_LOAD'
  | 'ERR_MOE_INTERNAL';

/** Errors that are not argument mistakes: missing device, CUDA failure, out of memory, disposed layer. */
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

/** A RangeError naming the argument; `code` tells a wrong size (ERR_MOE_SHAPE) from a wrong value. */
export function argRangeError(message: string, code: string = 'ERR_OUT_OF_RANGE'): RangeError {
  return Object.assign(new RangeError(message), { code });
}

/** The error a cancelled forward rejects with, shaped like Node's own AbortError. */
export class AbortError extends Error {
  readonly code = 'ABORT_ERR';
  constructor(message = 'The operation was aborted', options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'AbortError';
  }
}

/** Turns an error thrown by the native binding into the public error types. */
export function fromNative(err: unknown): Error {
  if (!(err instanceof Error)) return new MoeError('ERR_MOE_INTERNAL', String(err));
  if (err instanceof TypeError || err instanceof RangeError || err instanceof MoeError) return err;
  const code = (err as { code?: unknown }).code;
  if (code === 'ABORT_ERR') return new AbortError(err.message);
  if (typeof code === 'string' && code.startsWith('ERR_MOE_')) {
    if (code === 'ERR_MOE_INVALID') return argRangeError(err.message, code);
    return new MoeError(code as MoeErrorCode, err.message);
  }
  return new MoeError('ERR_MOE_INTERNAL', err.message, { cause: err });
}
