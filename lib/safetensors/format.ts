/**
 * The safetensors format: the dtype table and the header, checked against the file's size so that
 * nothing unchecked reaches the mapping code.
 *
 * Layout: 8 bytes little-endian header length N, N bytes of JSON
 * `{ name: { dtype, shape, data_offsets: [begin, end] }, __metadata__?: { key: string } }`, then the
 * data section; offsets are relative to its start (byte 8 + N).
 */
import { promises as fsp } from 'fs';
import { checkpointError, messageOf } from '../errors';
import { describe, isRecord } from '../validate';

/** Largest header accepted: real headers are well under 1 MB; a bigger one is corruption or hostile. */
export const MAX_HEADER_BYTES = 100 * 1024 * 1024;

/** Bytes per element of every dtype the format defines. */
export const DTYPE_BYTES: ReadonlyMap<string, number> = new Map<string, number>([
  ['BOOL', 1],
  ['U8', 1],
  ['I8', 1],
  ['F8_E5M2', 1],
  ['F8_E4M3', 1],
  ['F8_E8M0', 1],
  ['I16', 2],
  ['U16', 2],
  ['F16', 2],
  ['BF16', 2],
  ['I32', 4],
  ['U32', 4],
  ['F32', 4],
  ['I64', 8],
  ['U64', 8],
  ['F64', 8],
]);

/** One tensor of a header, checked: its bytes lie inside the file's data section. */
export interface TensorEntry {
  name: string;
  /** As written in the file: 'BF16', 'F16', 'F32', 'I64', ... */
  dtype: string;
  shape: number[];
  file: string;
  /** Absolute offset of the data in the file. */
  start: number;
  byteLength: number;
}

/** The checked header of one file. */
export interface ShardHeader {
  file: string;
  entries: Map<string, TensorEntry>;
  metadata: Record<string, string>;
}

/** Reads exactly buf.length bytes at `position`; a short read means the file shrank under us. */
async function readFully(fh: fsp.FileHandle, buf: Buffer, position: number, file: string): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await fh.read(buf, done, buf.length - done, position + done);
    if (bytesRead === 0)
      throw checkpointError(file, `the file ended at byte ${position + done} while reading its header (truncated?)`);
    done += bytesRead;
  }
}

/**
 * Reads and checks one file's header (off the event loop); `listedIn` names the index that listed the
 * file, for the error messages. Reads no tensor data.
 */
export async function readShardHeader(file: string, listedIn?: string): Promise<ShardHeader> {
  const from = listedIn ? ` (listed in ${listedIn})` : '';
  let fh: fsp.FileHandle;
  try {
    fh = await fsp.open(file, 'r');
  } catch (err) {
    throw checkpointError(file, `cannot open the checkpoint file${from}: ${messageOf(err)}`, err);
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw checkpointError(file, `not a regular file${from}`);
    const size = st.size;
    if (size < 8)
      throw checkpointError(file, `the file holds ${size} bytes, too few for a safetensors header (truncated?)`);
    const head = Buffer.alloc(8);
    await readFully(fh, head, 0, file);
    const n = head.readBigUInt64LE(0);
    if (n > BigInt(MAX_HEADER_BYTES))
      throw checkpointError(
        file,
        `header length ${n} is over the ${MAX_HEADER_BYTES / 2 ** 20} MiB limit: not a safetensors file, or corrupt`,
      );
    if (Number(n) > size - 8)
      throw checkpointError(
        file,
        `header length ${n} passes the end of the file (${size} bytes): truncated or corrupt`,
      );
    const bytes = Buffer.alloc(Number(n));
    await readFully(fh, bytes, 8, file);
    return parseHeader(file, bytes, size);
  } finally {
    await fh.close();
  }
}

/** Checks every entry of a header against the file's size; nothing unchecked leaves this function. */
export function parseHeader(file: string, bytes: Uint8Array, fileSize: number): ShardHeader {
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch (err) {
    throw checkpointError(
      file,
      `the header is not valid JSON (${messageOf(err)}): not a safetensors file, or corrupt`,
      err,
    );
  }
  if (!isRecord(json)) throw checkpointError(file, `the header is not a JSON object (got ${describe(json)})`);
  const dataStart = 8 + bytes.length;
  const dataSize = fileSize - dataStart;
  const entries = new Map<string, TensorEntry>();
  let metadata: Record<string, string> = {};
  for (const [name, v] of Object.entries(json)) {
    if (name === '__metadata__') {
      if (!isRecord(v) || !Object.values(v).every((s) => typeof s === 'string'))
        throw checkpointError(file, '__metadata__ must be an object of strings');
      metadata = v as Record<string, string>;
      continue;
    }
    entries.set(name, parseEntry(file, name, v, dataStart, dataSize));
  }
  const sorted = [...entries.values()].filter((e) => e.byteLength > 0).sort((a, b) => a.start - b.start);
  for (let i = 1; i < sorted.length; i++) {
    const a = sorted[i - 1];
    const b = sorted[i];
    if (b.start < a.start + a.byteLength)
      throw checkpointError(file, `tensors '${a.name}' and '${b.name}' overlap in the data section`);
  }
  return { file, entries, metadata };
}

function parseEntry(file: string, name: string, v: unknown, dataStart: number, dataSize: number): TensorEntry {
  const where = `tensor '${name}'`;
  if (!isRecord(v))
    throw checkpointError(file, `${where}: expected { dtype, shape, data_offsets }, got ${describe(v)}`);
  const { dtype, shape, data_offsets: offsets } = v;
  const size = typeof dtype === 'string' ? DTYPE_BYTES.get(dtype) : undefined;
  if (typeof dtype !== 'string' || size === undefined)
    throw checkpointError(
      file,
      `${where}: unknown dtype ${JSON.stringify(dtype)} (known: ${[...DTYPE_BYTES.keys()].join(', ')})`,
    );
  if (!isIntegerList(shape))
    throw checkpointError(file, `${where}: shape must be a list of integers >= 0, got ${JSON.stringify(shape)}`);
  if (!isIntegerList(offsets) || offsets.length !== 2)
    throw checkpointError(file, `${where}: data_offsets must be two integers >= 0, got ${JSON.stringify(offsets)}`);
  const [begin, end] = offsets;
  if (begin > end) throw checkpointError(file, `${where}: data_offsets [${begin}, ${end}] run backwards`);
  if (end > dataSize)
    throw checkpointError(
      file,
      `${where}: data_offsets [${begin}, ${end}] pass the end of the data section (${Math.max(dataSize, 0)} bytes): truncated or corrupt`,
    );
  const count = shape.reduce((p, d) => p * d, 1);
  if (count * size !== end - begin)
    throw checkpointError(
      file,
      `${where}: shape [${shape.join(', ')}] of ${dtype} needs ${count * size} bytes, its data_offsets [${begin}, ${end}] hold ${end - begin}`,
    );
  return { name, dtype, shape, file, start: dataStart + begin, byteLength: end - begin };
}

function isIntegerList(v: unknown): v is number[] {
  return Array.isArray(v) && v.every((d) => Number.isSafeInteger(d) && d >= 0);
}

/** A 16-bit float (IEEE half) from its bits. */
function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const man = h & 0x3ff;
  if (exp === 0) return sign * man * 2 ** -24;
  if (exp === 31) return man ? NaN : sign * Infinity;
  return sign * (1 + man / 1024) * 2 ** (exp - 15);
}

/** The raw bits of a BF16 or F16 tensor as a new Float32Array (exact: both widen without rounding). */
export function widenToFloat32(dtype: 'BF16' | 'F16', bits: Uint16Array): Float32Array {
  const out = new Float32Array(bits.length);
  if (dtype === 'BF16') {
    const out32 = new Uint32Array(out.buffer);
    for (let i = 0; i < bits.length; i++) out32[i] = bits[i] << 16;
  } else {
    for (let i = 0; i < bits.length; i++) out[i] = halfToFloat(bits[i]);
  }
  return out;
}
