/** openSafetensors(): a whole checkpoint, its headers read and checked, its tensors mapped on demand. */
import { argTypeError, checkpointError, MoeError } from '../errors';
import { describe } from '../validate';
import type { TensorEntry } from './format';
import { mapTensor, TensorView } from './map';
import { resolveCheckpoint, ShardHeaders } from './resolve';

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
   * Uint16Array of raw bits; other dtypes throw. Writes stay private to this process. A tensor whose
   * file offset is not a multiple of its element size cannot be viewed in place and is copied
   * (writers align them). Asking twice gives the same view.
   */
  get(name: string): TensorView;
  /**
   * Forgets the mappings: later get() calls throw. Memory is unmapped once the views already handed
   * out are garbage-collected, so views stay valid as long as they are referenced.
   */
  close(): void;
}

class OpenCheckpoint implements SafetensorsFile {
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  readonly metadata: Readonly<Record<string, string>>;
  #entries: Map<string, TensorEntry> | undefined;
  readonly #views = new Map<string, TensorView>();
  readonly #where: string;

  constructor(where: string, entries: Map<string, TensorEntry>, metadata: Record<string, string>) {
    this.#where = where;
    this.#entries = entries;
    this.tensors = new Map(
      [...entries].map(([n, e]) => [
        n,
        Object.freeze({ dtype: e.dtype, shape: Object.freeze([...e.shape]) as number[] }),
      ]),
    );
    this.metadata = Object.freeze({ ...metadata });
  }

  get(name: string): TensorView {
    if (typeof name !== 'string') throw argTypeError(`name must be a string, got ${describe(name)}`);
    if (!this.#entries)
      throw new MoeError('ERR_MOE_DISPOSED', `${this.#where}: this checkpoint was closed; open it again`);
    let v = this.#views.get(name);
    if (v) return v;
    const e = this.#entries.get(name);
    if (!e) throw checkpointError(this.#where, `tensor '${name}' not found`);
    v = mapTensor(e);
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
  const layout = await resolveCheckpoint(p);
  const shards = new ShardHeaders(layout);
  const entries = new Map<string, TensorEntry>();
  const metadata: Record<string, string> = {};
  for (const shard of await Promise.all(layout.files.map((f) => shards.shard(f))))
    Object.assign(metadata, shard.metadata);
  if (layout.weightMap) {
    for (const name of layout.weightMap.keys()) entries.set(name, await shards.entry(name));
  } else {
    for (const [name, e] of (await shards.shard(layout.files[0])).entries) entries.set(name, e);
  }
  return new OpenCheckpoint(layout.index ?? layout.files[0], entries, metadata);
}
