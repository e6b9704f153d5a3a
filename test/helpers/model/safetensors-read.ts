/**
 * Reads a Hugging Face checkpoint folder's safetensors (one file, or shards listed in
 * model.safetensors.index.json) into float64 arrays, for the reference decoder. Independent of the
 * package's loader on purpose: the reference must not share a misreading with the code it checks.
 */
import * as fs from 'fs';
import * as path from 'path';
import { fromBf16, fromF16 } from '../reference';

export interface Float64Tensor {
  shape: number[];
  values: Float64Array;
}

function readFile(file: string, into: Map<string, Float64Tensor>): void {
  const buf = fs.readFileSync(file);
  const headerLen = Number(buf.readBigUInt64LE(0));
  const header = JSON.parse(buf.subarray(8, 8 + headerLen).toString('utf8')) as Record<string, unknown>;
  const base = 8 + headerLen;
  for (const [name, entry] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    const {
      dtype,
      shape,
      data_offsets: [begin, end],
    } = entry as { dtype: string; shape: number[]; data_offsets: [number, number] };
    const n = shape.reduce((a, b) => a * b, 1);
    const bytes = buf.subarray(base + begin, base + end);
    const values = new Float64Array(n);
    if (dtype === 'F32') {
      if (bytes.length !== 4 * n) throw new Error(`${file}: ${name} has ${bytes.length} bytes for ${n} F32 values`);
      for (let i = 0; i < n; i++) values[i] = bytes.readFloatLE(4 * i);
    } else if (dtype === 'BF16' || dtype === 'F16') {
      if (bytes.length !== 2 * n)
        throw new Error(`${file}: ${name} has ${bytes.length} bytes for ${n} ${dtype} values`);
      const decode = dtype === 'BF16' ? fromBf16 : fromF16;
      for (let i = 0; i < n; i++) values[i] = decode(bytes.readUInt16LE(2 * i));
    } else {
      throw new Error(`${file}: ${name} has dtype ${dtype}; the reference reads F32, BF16 and F16`);
    }
    if (into.has(name)) throw new Error(`${file}: tensor ${name} appears twice in the checkpoint`);
    into.set(name, { shape, values });
  }
}

/** Every tensor of the checkpoint in `dir`, by its Hugging Face name. */
export function readCheckpoint(dir: string): Map<string, Float64Tensor> {
  const tensors = new Map<string, Float64Tensor>();
  const index = path.join(dir, 'model.safetensors.index.json');
  if (fs.existsSync(index)) {
    const { weight_map: map } = JSON.parse(fs.readFileSync(index, 'utf8')) as { weight_map: Record<string, string> };
    for (const shard of new Set(Object.values(map))) readFile(path.join(dir, shard), tensors);
  } else {
    readFile(path.join(dir, 'model.safetensors'), tensors);
  }
  return tensors;
}
