/**
 * Tensor data, memory-mapped by the addon (one mapping per tensor) and handed out as typed-array
 * views, so a reader touches only the pages of the tensors it uses.
 */
import { constants as bufferConstants } from 'buffer';
import * as os from 'os';
import { binding } from '../binding';
import { checkpointError, fromNative, MoeError } from '../errors';
import type { TensorEntry } from './format';

/** F32 as a Float32Array; BF16 and F16 as a Uint16Array of raw bits. */
export type TensorView = Float32Array | Uint16Array;

/** The addon maps at most 4 GiB at once (an ArrayBuffer's limit on Node 18 and 20). */
const MAX_VIEW_BYTES = Math.min(2 ** 32, bufferConstants.MAX_LENGTH);

const VIEW_TYPES = { F32: Float32Array, BF16: Uint16Array, F16: Uint16Array } as const;
type ViewType = (typeof VIEW_TYPES)[keyof typeof VIEW_TYPES];

/** True for the dtypes mapTensor() can view. */
export function isViewable(dtype: string): dtype is keyof typeof VIEW_TYPES {
  return Object.hasOwn(VIEW_TYPES, dtype);
}

/** Safetensors data is little-endian; views of it are only right on a little-endian host. */
export function checkLittleEndianHost(): void {
  if (os.endianness() !== 'LE')
    throw new MoeError(
      'ERR_MOE_CHECKPOINT',
      'safetensors data is little-endian and this host is big-endian: the tensors cannot be viewed in place',
    );
}

function viewType(e: TensorEntry): ViewType {
  if (!isViewable(e.dtype))
    throw checkpointError(
      e.file,
      `tensor '${e.name}' has dtype ${e.dtype}; only F32, BF16 and F16 tensors can be viewed`,
    );
  if (e.byteLength > MAX_VIEW_BYTES)
    throw checkpointError(
      e.file,
      `tensor '${e.name}' is ${e.byteLength} bytes, more than one ArrayBuffer may hold on this Node version`,
    );
  return VIEW_TYPES[e.dtype];
}

function mapError(e: TensorEntry, err: unknown): Error {
  const native = fromNative(err);
  return native instanceof MoeError && native.code === 'ERR_MOE_CHECKPOINT'
    ? new MoeError('ERR_MOE_CHECKPOINT', `tensor '${e.name}': ${native.message}`, { cause: err })
    : native;
}

/** A typed view of a mapped tensor; a misaligned one is copied (typed views need aligned data). */
function viewOf(e: TensorEntry, type: ViewType, buffer: ArrayBuffer): TensorView {
  const n = e.byteLength / type.BYTES_PER_ELEMENT;
  if (e.start % type.BYTES_PER_ELEMENT === 0) return new type(buffer, 0, n);
  const copy = new type(n);
  new Uint8Array(copy.buffer).set(new Uint8Array(buffer));
  return copy;
}

/**
 * Maps one tensor; its pages are read when first touched. Writes to the view stay private to this
 * process. The mapping is dropped when the view is garbage-collected.
 */
export function mapTensor(e: TensorEntry): TensorView {
  const type = viewType(e);
  let buffer: ArrayBuffer;
  try {
    buffer = binding().mapFile(e.file, e.start, e.byteLength);
  } catch (err) {
    throw mapError(e, err);
  }
  return viewOf(e, type, buffer);
}

/** Maps one tensor and reads all its pages on a worker thread: for data about to be read in full. */
export async function mapTensorResident(e: TensorEntry): Promise<TensorView> {
  const type = viewType(e);
  let buffer: ArrayBuffer;
  try {
    buffer = await binding().mapFileAsync(e.file, e.start, e.byteLength);
  } catch (err) {
    throw mapError(e, err);
  }
  return viewOf(e, type, buffer);
}

/**
 * Gives back the resident pages of mapped views whose data has been copied (into a model or a layer):
 * the views stay valid and read the file again if touched. Views that are not mappings are left alone.
 */
export function dropPages(views: Iterable<TensorView>): void {
  for (const v of views) binding().dropPages(v);
}
