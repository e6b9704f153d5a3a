/**
 * Safetensors checkpoints, read with no copy. Headers are read off the event loop and checked here
 * against the file's size before anything is used; tensor data is memory-mapped by the addon, one
 * mapping per tensor, and handed out as typed-array views, so opening a 90 GB checkpoint reads only
 * its headers and a layer reads only its own tensors.
 *
 * Format: 8 bytes little-endian header length N, N bytes of JSON
 * `{ name: { dtype, shape, data_offsets: [begin, end] }, __metadata__?: { key: string } }`, then the
 * data section; offsets are relative to its start (byte 8 + N).
 */
import { promises as fsp } from 'fs';
import { constants as bufferConstants } from 'buffer';
import * as os from 'os';
import * as path from 'path';
import { binding } from './binding';
import { argTypeError, argRangeError, fromNative, MoeError } from './errors';
import type { MoeConfig, MoeWeights, Routing, WeightDtype } from './layer';
import { checkInteger, checkObject, checkOneOf, checkSignal, describe } from './validate';

/** Largest header accepted: real headers are well under 1 MB; a bigger one is corruption or hostile. */
const MAX_HEADER_BYTES = 100 * 1024 * 1024;
/** Largest index or config JSON accepted. */
const MAX_JSON_BYTES = 100 * 1024 * 1024;
/** The addon maps at most 4 GiB at once (an ArrayBuffer's limit on Node 18 and 20). */
const MAX_VIEW_BYTES = Math.min(2 ** 32, bufferConstants.MAX_LENGTH);

/** Bytes per element of every dtype the format defines; only F32, F16 and BF16 can be viewed. */
const DTYPE_BYTES = new Map<string, number>([
  ['BOOL', 1], ['U8', 1], ['I8', 1], ['F8_E5M2', 1], ['F8_E4M3', 1], ['F8_E8M0', 1],
  ['I16', 2], ['U16', 2], ['F16', 2], ['BF16', 2],
  ['I32', 4], ['U32', 4], ['F32', 4],
  ['I64', 8], ['U64', 8], ['F64', 8],
]);
const VIEWABLE: Record<string, WeightDtype> = { F32: 'float32', BF16: 'bfloat16', F16: 'float16' };

export type TensorView = Float32Array | Uint16Array;

export interface TensorInfo {
  /** As written in the file: 'BF16', 'F16', 'F32', 'I64', ... */
  dtype: string;
  shape: number[];
}

/** An open checkpoint (one file, or every shard of an index). */
export interface SafetensorsFile {
  /** Every tensor's dtype and shape, by name. */
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  /** The `__metadata__` strings of the file(s), merged. */
  readonly metadata: Readonly<Record<string, string>>;
  /**
   * The tensor's data, mapped from the file, not read: F32 as a Float32Array, BF16 and F16 as a
   * Uint16Array of raw bits. Writes stay private to this process. A tensor whose file offset is not a
   * multiple of its element size cannot be viewed in place and is copied (writers align them).
   */
  get(name: string): TensorView;
  /**
   * Forgets the mappings: later get() calls throw. Memory is unmapped once the views already handed
   * out are garbage-collected, so views stay valid as long as they are referenced.
   */
  close(): void;
}

/**
 * Options of MoeLayer.fromSafetensors(): where the layer's tensors are, plus the MoeConfig options that
 * are not read from the checkpoint (device, threads, cudaDevice, quantize, quantGroupSize).
 */
export interface FromSafetensorsOptions
  extends Pick<MoeConfig, 'device' | 'threads' | 'cudaDevice' | 'quantize' | 'quantGroupSize'> {
  /** Decoder layer index: tensors are read under `model.layers.{layer}.block_sparse_moe`. */
  layer?: number;
  /** Tensor name prefix instead of `model.layers.{layer}.block_sparse_moe` (`{layer}` is substituted). */
  prefix?: string;
  /** k; default: config.json's num_experts_per_tok (required when there is no config.json). */
  topK?: number;
  /** Default: from config.json (norm_topk_prob false → 'softmax-topk'; absent, as Mixtral → renorm). */
  routing?: Routing;
  /** Asserts the expert weights' dtype; the checkpoint's own dtype is used, never converted. */
  weightDtype?: WeightDtype;
  /** Cancels the load: the promise rejects with an AbortError (checked between packing steps). */
  signal?: AbortSignal;
}

interface Entry {
  name: string;
  dtype: string;
  shape: number[];
  file: string;
  /** Absolute offset of the data in the file. */
  start: number;
  byteLength: number;
}

interface Shard {
  file: string;
  entries: Map<string, Entry>;
  metadata: Record<string, string>;
}

interface Layout {
  /** Where config.json is looked for. */
  dir: string;
  /** The index file, when the checkpoint has one. */
  index?: string;
  weightMap?: Map<string, string>;
  /** Every shard file (absolute), in order. */
  files: string[];
}

function fail(file: string, message: string, cause?: unknown): MoeError {
  return new MoeError('ERR_MOE_CHECKPOINT', `${file}: ${message}`, cause === undefined ? undefined : { cause });
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function checkHost(): void {
  if (os.endianness() !== 'LE')
    throw new MoeError(
      'ERR_MOE_CHECKPOINT',
      'safetensors data is little-endian and this host is big-endian: the tensors cannot be viewed in place',
    );
}

// ---- headers ------------------------------------------------------------------------------------

/** Reads exactly buf.length bytes at `position`; a short read means the file shrank under us. */
async function readFully(fh: fsp.FileHandle, buf: Buffer, position: number, file: string): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await fh.read(buf, done, buf.length - done, position + done);
    if (bytesRead === 0) throw fail(file, `the file ended at byte ${position + done} while reading its header (truncated?)`);
    done += bytesRead;
  }
}

async function readShard(file: string, listedIn?: string): Promise<Shard> {
  const from = listedIn ? ` (listed in ${listedIn})` : '';
  let fh: fsp.FileHandle;
  try {
    fh = await fsp.open(file, 'r');
  } catch (err) {
    throw fail(file, `cannot open the checkpoint file${from}: ${errorText(err)}`, err);
  }
  try {
    const st = await fh.stat();
    if (!st.isFile()) throw fail(file, `not a regular file${from}`);
    const size = st.size;
    if (size < 8) throw fail(file, `the file holds ${size} bytes, too few for a safetensors header (truncated?)`);
    const head = Buffer.alloc(8);
    await readFully(fh, head, 0, file);
    const n = head.readBigUInt64LE(0);
    if (n > BigInt(MAX_HEADER_BYTES))
      throw fail(file, `header length ${n} is over the ${MAX_HEADER_BYTES / 2 ** 20} MiB limit: not a safetensors file, or corrupt`);
    if (Number(n) > size - 8)
      throw fail(file, `header length ${n} passes the end of the file (${size} bytes): truncated or corrupt`);
    const bytes = Buffer.alloc(Number(n));
    await readFully(fh, bytes, 8, file);
    return parseHeader(file, bytes, size);
  } finally {
    await fh.close();
  }
}

/** Checks every entry of a header against the file's size; nothing unchecked leaves this function. */
function parseHeader(file: string, bytes: Uint8Array, fileSize: number): Shard {
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
  } catch (err) {
    throw fail(file, `the header is not valid JSON (${errorText(err)}): not a safetensors file, or corrupt`, err);
  }
  if (!isRecord(json)) throw fail(file, `the header is not a JSON object (got ${describe(json)})`);
  const dataStart = 8 + bytes.length;
  const dataSize = fileSize - dataStart;
  const entries = new Map<string, Entry>();
  let metadata: Record<string, string> = {};
  for (const [name, v] of Object.entries(json)) {
    if (name === '__metadata__') {
      if (!isRecord(v) || !Object.values(v).every((s) => typeof s === 'string'))
        throw fail(file, '__metadata__ must be an object of strings');
      metadata = v as Record<string, string>;
      continue;
    }
    const where = `tensor '${name}'`;
    if (!isRecord(v)) throw fail(file, `${where}: expected { dtype, shape, data_offsets }, got ${describe(v)}`);
    const { dtype, shape, data_offsets: offsets } = v;
    const size = typeof dtype === 'string' ? DTYPE_BYTES.get(dtype) : undefined;
    if (size === undefined)
      throw fail(file, `${where}: unknown dtype ${JSON.stringify(dtype)} (known: ${[...DTYPE_BYTES.keys()].join(', ')})`);
    if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0))
      throw fail(file, `${where}: shape must be a list of integers >= 0, got ${JSON.stringify(shape)}`);
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every((o) => Number.isSafeInteger(o) && o >= 0))
      throw fail(file, `${where}: data_offsets must be two integers >= 0, got ${JSON.stringify(offsets)}`);
    const [begin, end] = offsets as number[];
    if (begin > end) throw fail(file, `${where}: data_offsets [${begin}, ${end}] run backwards`);
    if (end > dataSize)
      throw fail(
        file,
        `${where}: data_offsets [${begin}, ${end}] pass the end of the data section (${Math.max(dataSize, 0)} bytes): truncated or corrupt`,
      );
    const count = (shape as number[]).reduce((p, d) => p * d, 1);
    if (count * size !== end - begin)
      throw fail(
        file,
        `${where}: shape [${shape.join(', ')}] of ${dtype} needs ${count * size} bytes, its data_offsets [${begin}, ${end}] hold ${end - begin}`,
      );
    entries.set(name, { name, dtype: dtype as string, shape: shape as number[], file, start: dataStart + begin, byteLength: end - begin });
  }
  const sorted = [...entries.values()].filter((e) => e.byteLength > 0).sort((a, b) => a.start - b.start);
  for (let i = 1; i < sorted.length; i++) {
    const a = sorted[i - 1], b = sorted[i];
    if (b.start < a.start + a.byteLength) throw fail(file, `tensors '${a.name}' and '${b.name}' overlap in the data section`);
  }
  return { file, entries, metadata };
}

// ---- files, folders and indexes -------------------------------------------------------------------

async function readJson(file: string, what: string): Promise<unknown> {
  try {
    const st = await fsp.stat(file);
    if (!st.isFile()) throw new Error('not a regular file');
    if (st.size > MAX_JSON_BYTES) throw new Error(`${st.size} bytes is over the ${MAX_JSON_BYTES / 2 ** 20} MiB limit`);
    return JSON.parse(await fsp.readFile(file, 'utf8'));
  } catch (err) {
    throw fail(file, `cannot read the ${what}: ${errorText(err)}`, err);
  }
}

async function isFile(file: string): Promise<boolean> {
  try {
    return (await fsp.stat(file)).isFile();
  } catch {
    return false;
  }
}

/** `{ weight_map: { tensor: file } }`; every file must lie inside the index's folder. */
async function readIndex(index: string): Promise<Layout> {
  const json = await readJson(index, 'checkpoint index');
  const dir = path.dirname(index);
  if (!isRecord(json) || !isRecord(json.weight_map))
    throw fail(index, 'not a safetensors index: expected { "weight_map": { tensor: file } }');
  const weightMap = new Map<string, string>();
  for (const [name, file] of Object.entries(json.weight_map)) {
    if (typeof file !== 'string' || file === '') throw fail(index, `weight_map['${name}'] must be a file name, got ${describe(file)}`);
    const abs = path.resolve(dir, file);
    const rel = path.relative(dir, abs);
    if (path.isAbsolute(file) || rel === '' || rel.startsWith('..') || path.isAbsolute(rel))
      throw fail(index, `weight_map['${name}'] points to '${file}', outside the index's folder: refused`);
    weightMap.set(name, abs);
  }
  return { dir, index, weightMap, files: [...new Set(weightMap.values())] };
}

/** A `.safetensors` file, an index JSON, or a folder holding either. */
async function resolveLayout(p: unknown): Promise<Layout> {
  if (typeof p !== 'string' || p === '') throw argTypeError(`path must be a non-empty string, got ${describe(p)}`);
  checkHost();
  const abs = path.resolve(p);
  let st;
  try {
    st = await fsp.stat(abs);
  } catch (err) {
    throw fail(abs, `cannot open the checkpoint: ${errorText(err)}`, err);
  }
  if (!st.isDirectory()) return abs.endsWith('.json') ? readIndex(abs) : { dir: path.dirname(abs), files: [abs] };
  const index = path.join(abs, 'model.safetensors.index.json');
  if (await isFile(index)) return readIndex(index);
  const single = path.join(abs, 'model.safetensors');
  if (await isFile(single)) return { dir: abs, files: [single] };
  const found = (await fsp.readdir(abs)).filter((n) => n.endsWith('.safetensors')).sort();
  if (found.length === 1) return { dir: abs, files: [path.join(abs, found[0])] };
  throw fail(
    abs,
    found.length === 0
      ? 'no model.safetensors.index.json, model.safetensors or other .safetensors file in this folder'
      : `no model.safetensors.index.json and several .safetensors files (${found.join(', ')}): pass the one to use`,
  );
}

// ---- views ----------------------------------------------------------------------------------------

const CTOR = { F32: Float32Array, BF16: Uint16Array, F16: Uint16Array } as const;

function viewCtor(e: Entry): typeof CTOR[keyof typeof CTOR] {
  const ctor = CTOR[e.dtype as keyof typeof CTOR];
  if (!ctor)
    throw fail(e.file, `tensor '${e.name}' has dtype ${e.dtype}; only F32, BF16 and F16 tensors can be viewed`);
  if (e.byteLength > MAX_VIEW_BYTES)
    throw fail(e.file, `tensor '${e.name}' is ${e.byteLength} bytes, more than one ArrayBuffer may hold on this Node version`);
  return ctor;
}

function mapError(e: Entry, err: unknown): Error {
  const native = fromNative(err);
  return native instanceof MoeError && native.code === 'ERR_MOE_CHECKPOINT'
    ? new MoeError('ERR_MOE_CHECKPOINT', `tensor '${e.name}': ${native.message}`, { cause: err })
    : native;
}

/** A typed view of a mapped tensor; a misaligned one is copied (typed views need aligned data). */
function viewOf(e: Entry, buffer: ArrayBuffer): TensorView {
  const ctor = viewCtor(e);
  const n = e.byteLength / ctor.BYTES_PER_ELEMENT;
  if (e.start % ctor.BYTES_PER_ELEMENT === 0) return new ctor(buffer, 0, n);
  const copy = new ctor(n);
  new Uint8Array(copy.buffer).set(new Uint8Array(buffer));
  return copy;
}

/** Maps one tensor; its pages are read when first touched. */
function viewEntry(e: Entry): TensorView {
  viewCtor(e);
  let buffer: ArrayBuffer;
  try {
    buffer = binding().mapFile(e.file, e.start, e.byteLength);
  } catch (err) {
    throw mapError(e, err);
  }
  return viewOf(e, buffer);
}

/** Maps one tensor and reads all its pages on a worker thread: for data about to be read in full. */
async function viewEntryResident(e: Entry): Promise<TensorView> {
  viewCtor(e);
  let buffer: ArrayBuffer;
  try {
    buffer = await binding().mapFileAsync(e.file, e.start, e.byteLength);
  } catch (err) {
    throw mapError(e, err);
  }
  return viewOf(e, buffer);
}

/** Finds tensors across the shards of a layout, reading each shard's header once, on first need. */
class Shards {
  readonly #layout: Layout;
  readonly #shards = new Map<string, Promise<Shard>>();

  constructor(layout: Layout) {
    this.#layout = layout;
  }

  shard(file: string): Promise<Shard> {
    let s = this.#shards.get(file);
    if (!s) this.#shards.set(file, (s = readShard(file, this.#layout.index)));
    return s;
  }

  async entry(name: string): Promise<Entry> {
    const { weightMap, index, files } = this.#layout;
    const file = weightMap ? weightMap.get(name) : files[0];
    if (file === undefined) throw fail(index!, `tensor '${name}' is not in the index's weight_map`);
    const e = (await this.shard(file)).entries.get(name);
    if (!e) throw fail(file, `tensor '${name}' not found in this file${index ? ` (the index ${index} places it here)` : ''}`);
    return e;
  }
}

class OpenCheckpoint implements SafetensorsFile {
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  readonly metadata: Readonly<Record<string, string>>;
  #entries: Map<string, Entry> | undefined;
  #views = new Map<string, TensorView>();
  readonly #where: string;

  constructor(where: string, entries: Map<string, Entry>, metadata: Record<string, string>) {
    this.#where = where;
    this.#entries = entries;
    this.tensors = new Map([...entries].map(([n, e]) => [n, Object.freeze({ dtype: e.dtype, shape: Object.freeze([...e.shape]) as number[] })]));
    this.metadata = Object.freeze({ ...metadata });
  }

  get(name: string): TensorView {
    if (typeof name !== 'string') throw argTypeError(`name must be a string, got ${describe(name)}`);
    if (!this.#entries) throw new MoeError('ERR_MOE_DISPOSED', `${this.#where}: this checkpoint was closed; open it again`);
    let v = this.#views.get(name);
    if (v) return v;
    const e = this.#entries.get(name);
    if (!e) throw fail(this.#where, `tensor '${name}' not found`);
    v = viewEntry(e);
    this.#views.set(name, v);
    return v;
  }

  close(): void {
    this.#entries = undefined;
    this.#views.clear();
  }
}

/**
 * Opens a checkpoint: a `.safetensors` file, a `model.safetensors.index.json`, or a folder holding
 * either. Reads and checks every shard's header; maps tensor data only when get() asks for it.
 */
export async function openSafetensors(p: string): Promise<SafetensorsFile> {
  const layout = await resolveLayout(p);
  const shards = new Shards(layout);
  const entries = new Map<string, Entry>();
  const metadata: Record<string, string> = {};
  for (const shard of await Promise.all(layout.files.map((f) => shards.shard(f)))) Object.assign(metadata, shard.metadata);
  if (layout.weightMap) {
    for (const name of layout.weightMap.keys()) entries.set(name, await shards.entry(name));
  } else {
    for (const [name, e] of (await shards.shard(layout.files[0])).entries) entries.set(name, e);
  }
  return new OpenCheckpoint(layout.index ?? layout.files[0], entries, metadata);
}

// ---- MoeLayer.fromSafetensors ----------------------------------------------------------------------

interface HfConfig {
  hiddenSize?: number;
  intermediateSize?: number;
  numExperts?: number;
  topK?: number;
  numLayers?: number;
  normTopkProb?: boolean;
}

/** The fields of a Hugging Face config.json this layer needs, checked; undefined without one. */
async function readConfig(dir: string): Promise<{ file: string; config: HfConfig } | undefined> {
  const file = path.join(dir, 'config.json');
  if (!(await isFile(file))) return undefined;
  const json = await readJson(file, 'model config');
  if (!isRecord(json)) throw fail(file, 'config.json is not a JSON object');
  const int = (key: string): number | undefined => {
    const v = json[key];
    if (v === undefined || v === null) return undefined;
    if (!Number.isSafeInteger(v) || (v as number) < 1) throw fail(file, `${key} must be an integer >= 1, got ${describe(v)}`);
    return v as number;
  };
  const norm = json.norm_topk_prob;
  if (norm !== undefined && norm !== null && typeof norm !== 'boolean') throw fail(file, `norm_topk_prob must be a boolean, got ${describe(norm)}`);
  return {
    file,
    config: {
      hiddenSize: int('hidden_size'),
      intermediateSize: int('intermediate_size'),
      numExperts: int('num_local_experts'),
      topK: int('num_experts_per_tok'),
      numLayers: int('num_hidden_layers'),
      normTopkProb: typeof norm === 'boolean' ? norm : undefined,
    },
  };
}

function expectShape(e: Entry, expected: number[], why: string): void {
  if (e.shape.length !== expected.length || e.shape.some((d, i) => d !== expected[i]))
    throw fail(e.file, `tensor '${e.name}' has shape [${e.shape.join(', ')}], expected [${expected.join(', ')}] (${why})`);
}

/** The router weight as float32: a 16-bit gate (E·H values, small) is widened here. */
function gateToF32(e: Entry): Float32Array {
  const v = viewEntry(e);
  if (v instanceof Float32Array) return v;
  const out = new Float32Array(v.length);
  const bits = new Uint32Array(out.buffer);
  if (e.dtype === 'BF16') {
    for (let i = 0; i < v.length; i++) bits[i] = v[i] << 16;
  } else {
    for (let i = 0; i < v.length; i++) out[i] = halfToFloat(v[i]);
  }
  return out;
}

function halfToFloat(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >> 10) & 0x1f;
  const man = h & 0x3ff;
  if (exp === 0) return sign * man * 2 ** -24;
  if (exp === 31) return man ? NaN : sign * Infinity;
  return sign * (1 + man / 1024) * 2 ** (exp - 15);
}

interface LayerCtor<L> {
  create(config: MoeConfig, weights: MoeWeights, options?: { signal?: AbortSignal }): Promise<L>;
}

/** MoeLayer.fromSafetensors(): reads one MoE block's tensors from a checkpoint and builds the layer. */
export async function loadLayer<L>(ctor: LayerCtor<L>, p: string, options: FromSafetensorsOptions): Promise<L> {
  checkObject('options', options as unknown);
  checkSignal('options.signal', options.signal);
  let prefix: string;
  let layer: number | undefined;
  if (options.prefix !== undefined) {
    if (typeof options.prefix !== 'string' || options.prefix === '')
      throw argTypeError(`options.prefix must be a non-empty string, got ${describe(options.prefix)}`);
    if (options.layer !== undefined) layer = checkInteger('options.layer', options.layer, 0, 1e6);
    if (options.prefix.includes('{layer}') && layer === undefined)
      throw argTypeError(`options.prefix '${options.prefix}' contains {layer}: pass options.layer too`);
    prefix = options.prefix.replace(/\{layer\}/g, String(layer));
  } else {
    if (options.layer === undefined) throw argTypeError('options.layer (the decoder layer index) or options.prefix is required');
    layer = checkInteger('options.layer', options.layer, 0, 1e6);
    prefix = `model.layers.${layer}.block_sparse_moe`;
  }
  const wantDtype = options.weightDtype === undefined ? undefined : checkOneOf('options.weightDtype', options.weightDtype, ['float32', 'bfloat16', 'float16'] as const);

  const layout = await resolveLayout(p);
  const found = await readConfig(layout.dir);
  const hf = found?.config ?? {};
  if (found && options.prefix === undefined && hf.numLayers !== undefined && layer! >= hf.numLayers)
    throw argRangeError(`options.layer must be below num_hidden_layers (${hf.numLayers}) of ${found.file}, got ${layer}`);
  const topK = options.topK ?? hf.topK;
  if (topK === undefined)
    throw argTypeError(
      `options.topK is required: ${found ? `${found.file} has no num_experts_per_tok` : `there is no config.json beside ${layout.index ?? layout.files[0]}`}`,
    );
  const routing = options.routing ?? (hf.normTopkProb === false ? 'softmax-topk' : 'softmax-topk-renorm');

  const shards = new Shards(layout);
  const gate = await shards.entry(`${prefix}.gate.weight`);
  if (gate.shape.length !== 2) throw fail(gate.file, `tensor '${gate.name}' has shape [${gate.shape.join(', ')}], expected [experts, hidden]`);
  const [E, H] = gate.shape;
  const why = found ? `from ${found.file}` : 'from the gate and experts.0.w1 shapes';
  if (hf.numExperts !== undefined || hf.hiddenSize !== undefined)
    expectShape(gate, [hf.numExperts ?? E, hf.hiddenSize ?? H], `num_local_experts, hidden_size ${why}`);
  if (E < 1 || H < 1) throw fail(gate.file, `tensor '${gate.name}' has shape [${gate.shape.join(', ')}]: no experts or hidden size 0`);

  const names = (m: string) => Array.from({ length: E }, (_, e) => `${prefix}.experts.${e}.${m}.weight`);
  const [w1, w3, w2] = await Promise.all(['w1', 'w3', 'w2'].map((m) => Promise.all(names(m).map((n) => shards.entry(n)))));
  const F = hf.intermediateSize ?? (w1[0].shape.length === 2 ? w1[0].shape[0] : -1);
  if (F < 1) throw fail(w1[0].file, `tensor '${w1[0].name}' has shape [${w1[0].shape.join(', ')}], expected [intermediate, ${H}]`);
  for (const e of [...w1, ...w3]) expectShape(e, [F, H], `intermediate_size, hidden_size ${why}`);
  for (const e of w2) expectShape(e, [H, F], `hidden_size, intermediate_size ${why}`);

  const dtype = w1[0].dtype;
  if (!(dtype in VIEWABLE)) throw fail(w1[0].file, `tensor '${w1[0].name}' has dtype ${dtype}; expert weights must be F32, BF16 or F16`);
  for (const e of [...w1, ...w3, ...w2])
    if (e.dtype !== dtype)
      throw fail(e.file, `tensor '${e.name}' has dtype ${e.dtype} but '${w1[0].name}' has ${dtype}: the experts must share one dtype`);
  if (!(gate.dtype in VIEWABLE)) throw fail(gate.file, `tensor '${gate.name}' has dtype ${gate.dtype}; the gate must be F32, BF16 or F16`);
  const weightDtype = VIEWABLE[dtype];
  if (wantDtype !== undefined && wantDtype !== weightDtype)
    throw new MoeError(
      'ERR_MOE_DTYPE',
      `options.weightDtype is '${wantDtype}' but the checkpoint stores the experts as ${dtype} ('${weightDtype}'); weights are used as stored, not converted`,
    );

  const config: MoeConfig = {
    hiddenSize: H,
    intermediateSize: F,
    numExperts: E,
    topK,
    routing,
    weightDtype,
    device: options.device,
    threads: options.threads,
    cudaDevice: options.cudaDevice,
    quantize: options.quantize,
    quantGroupSize: options.quantGroupSize,
  };
  // The pages are brought in on worker threads; the layer then packs (copies) the weights from memory
  // in short steps between turns of the event loop, and the mappings are dropped afterwards.
  const [v1, v3, v2] = await Promise.all([w1, w3, w2].map((list) => Promise.all(list.map(viewEntryResident))));
  return ctor.create(config, { gate: gateToF32(gate), w1: v1, w3: v3, w2: v2 }, { signal: options.signal });
}
