/** Argument checks that read as declarations; each error names the argument, expected and actual. */
import { argRangeError, argTypeError } from './errors';

/** %TypedArray%.prototype.length: the getter a subclass's own `length` cannot replace. */
const intrinsicLength = Object.getOwnPropertyDescriptor(Object.getPrototypeOf(Int8Array.prototype), 'length')!.get!;

/** A typed array's real element count (0 when detached), whatever its class says its length is. */
export function typedLength(v: ArrayBufferView): number {
  return intrinsicLength.call(v) as number;
}

export function describe(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return `an array of length ${v.length}`;
  if (ArrayBuffer.isView(v)) return `${v.constructor.name} of length ${(v as unknown as { length: number }).length}`;
  if (typeof v === 'object') return `an object (${(v as object).constructor?.name ?? 'Object'})`;
  if (typeof v === 'string') return `the string '${v.length > 40 ? v.slice(0, 40) + '...' : v}'`;
  return `${typeof v} ${String(v)}`;
}

/** A plain object (not null, not an array): what a JSON object parses to. */
export function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

export function checkObject(name: string, v: unknown): asserts v is Record<string, unknown> {
  if (!isRecord(v)) throw argTypeError(`${name} must be an object, got ${describe(v)}`);
}

/** An optional AbortSignal (undefined passes). */
export function checkSignal(name: string, v: unknown): AbortSignal | undefined {
  if (v !== undefined && !(v instanceof AbortSignal))
    throw argTypeError(`${name} must be an AbortSignal, got ${describe(v)}`);
  return v;
}

export function checkInteger(name: string, v: unknown, min: number, max: number): number {
  if (typeof v !== 'number') throw argTypeError(`${name} must be a number, got ${describe(v)}`);
  if (!Number.isInteger(v) || v < min || v > max)
    throw argRangeError(`${name} must be an integer in [${min}, ${max}], got ${v}`);
  return v;
}

export function checkOneOf<T extends string>(name: string, v: unknown, allowed: readonly T[]): T {
  if (typeof v !== 'string')
    throw argTypeError(`${name} must be one of ${allowed.map((a) => `'${a}'`).join(', ')}, got ${describe(v)}`);
  if (!(allowed as readonly string[]).includes(v))
    throw argRangeError(`${name} must be one of ${allowed.map((a) => `'${a}'`).join(', ')}, got '${v}'`);
  return v as T;
}

type TypedCtor = Float32ArrayConstructor | Uint16ArrayConstructor | Int32ArrayConstructor;

/** A typed array of the given type and exact length; detached buffers count as length 0. */
export function checkTyped<T extends ArrayBufferView>(
  name: string,
  v: unknown,
  ctor: TypedCtor,
  length: number,
  detail = '',
): T {
  if (!(v instanceof ctor)) throw argTypeError(`${name} must be a ${ctor.name}${detail}, got ${describe(v)}`);
  const len = typedLength(v as ArrayBufferView);
  if (len !== length) throw argRangeError(`${name} must have ${length} elements${detail}, got ${len}`, 'ERR_MOE_SHAPE');
  return v as unknown as T;
}

/**
 * Product of sizes, refused past `maxElements` (the core's limit, binding.limits.maxElements: every
 * size stays exact in a double and far from int64 overflow in byte counts).
 */
export function checkedProduct(name: string, maxElements: number, ...factors: number[]): number {
  let p = 1;
  for (const f of factors) {
    p *= f;
    if (!Number.isSafeInteger(p) || p > maxElements)
      throw argRangeError(
        `${name} (${factors.join(' * ')}) is too large: it passes ${Number.isInteger(Math.log2(maxElements)) ? `2^${Math.log2(maxElements)}` : maxElements} elements`,
      );
  }
  return p;
}
