/**
 * Which files make a checkpoint (one `.safetensors` file, or the shards of an index) and which file
 * holds a given tensor. Headers are read once per shard, on first need.
 */
import { promises as fsp } from 'fs';
import * as path from 'path';
import { argTypeError, checkpointError, messageOf } from '../errors';
import { describe, isRecord } from '../validate';
import { readShardHeader, ShardHeader, TensorEntry } from './format';
import { checkLittleEndianHost } from './map';

/** Largest index or config JSON accepted. */
const MAX_JSON_BYTES = 100 * 1024 * 1024;

export interface CheckpointLayout {
  /** The folder of the checkpoint, where config.json is looked for. */
  dir: string;
  /** The index file, when the checkpoint has one. */
  index?: string;
  /** Tensor name → shard file (absolute), when the checkpoint has an index. */
  weightMap?: Map<string, string>;
  /** Every shard file (absolute), in order. */
  files: string[];
}

/** A JSON file of at most 100 MiB, parsed; `what` names it in the error. `onText` sees the text read. */
export async function readJson(file: string, what: string, onText?: (text: string) => void): Promise<unknown> {
  try {
    const st = await fsp.stat(file);
    if (!st.isFile()) throw new Error('not a regular file');
    if (st.size > MAX_JSON_BYTES) throw new Error(`${st.size} bytes is over the ${MAX_JSON_BYTES / 2 ** 20} MiB limit`);
    const text = await fsp.readFile(file, 'utf8');
    onText?.(text);
    return JSON.parse(text);
  } catch (err) {
    throw checkpointError(file, `cannot read the ${what}: ${messageOf(err)}`, err);
  }
}

export async function isFile(file: string): Promise<boolean> {
  try {
    return (await fsp.stat(file)).isFile();
  } catch {
    return false;
  }
}

/** `{ weight_map: { tensor: file } }`; every file must lie inside the index's folder. */
async function readIndex(index: string): Promise<CheckpointLayout> {
  const json = await readJson(index, 'checkpoint index');
  const dir = path.dirname(index);
  if (!isRecord(json) || !isRecord(json.weight_map))
    throw checkpointError(index, 'not a safetensors index: expected { "weight_map": { tensor: file } }');
  const weightMap = new Map<string, string>();
  for (const [name, file] of Object.entries(json.weight_map)) {
    if (typeof file !== 'string' || file === '')
      throw checkpointError(index, `weight_map['${name}'] must be a file name, got ${describe(file)}`);
    const abs = path.resolve(dir, file);
    const rel = path.relative(dir, abs);
    if (path.isAbsolute(file) || rel === '' || rel.startsWith('..') || path.isAbsolute(rel))
      throw checkpointError(index, `weight_map['${name}'] points to '${file}', outside the index's folder: refused`);
    weightMap.set(name, abs);
  }
  return { dir, index, weightMap, files: [...new Set(weightMap.values())] };
}

/**
 * The files of a checkpoint given as a `.safetensors` file, an index JSON, or a folder holding
 * `model.safetensors.index.json`, else `model.safetensors`, else a single `*.safetensors`. Checks the
 * path argument and that this host can map the data; reads the index but no shard.
 */
export async function resolveCheckpoint(p: unknown): Promise<CheckpointLayout> {
  if (typeof p !== 'string' || p === '') throw argTypeError(`path must be a non-empty string, got ${describe(p)}`);
  checkLittleEndianHost();
  const abs = path.resolve(p);
  let st;
  try {
    st = await fsp.stat(abs);
  } catch (err) {
    throw checkpointError(abs, `cannot open the checkpoint: ${messageOf(err)}`, err);
  }
  if (!st.isDirectory()) return abs.endsWith('.json') ? readIndex(abs) : { dir: path.dirname(abs), files: [abs] };
  const index = path.join(abs, 'model.safetensors.index.json');
  if (await isFile(index)) return readIndex(index);
  const single = path.join(abs, 'model.safetensors');
  if (await isFile(single)) return { dir: abs, files: [single] };
  const found = (await fsp.readdir(abs)).filter((n) => n.endsWith('.safetensors')).sort();
  if (found.length === 1) return { dir: abs, files: [path.join(abs, found[0])] };
  throw checkpointError(
    abs,
    found.length === 0
      ? 'no model.safetensors.index.json, model.safetensors or other .safetensors file in this folder'
      : `no model.safetensors.index.json and several .safetensors files (${found.join(', ')}): pass the one to use`,
  );
}

/** Finds tensors across the shards of a checkpoint, reading each shard's header once, on first need. */
export class ShardHeaders {
  readonly #layout: CheckpointLayout;
  readonly #headers = new Map<string, Promise<ShardHeader>>();

  constructor(layout: CheckpointLayout) {
    this.#layout = layout;
  }

  /** The checked header of one shard of the layout. */
  shard(file: string): Promise<ShardHeader> {
    let header = this.#headers.get(file);
    if (!header) {
      header = readShardHeader(file, this.#layout.index);
      this.#headers.set(file, header);
    }
    return header;
  }

  /** The tensor of that name, from the shard the index places it in (or the only file). */
  async entry(name: string): Promise<TensorEntry> {
    const { weightMap, index, files } = this.#layout;
    const file = weightMap ? weightMap.get(name) : files[0];
    if (file === undefined)
      throw checkpointError(index ?? files[0], `tensor '${name}' is not in the index's weight_map`);
    const e = (await this.shard(file)).entries.get(name);
    if (!e)
      throw checkpointError(
        file,
        `tensor '${name}' not found in this file${index ? ` (the index ${index} places it here)` : ''}`,
      );
    return e;
  }
}
