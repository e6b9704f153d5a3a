/**
 * A small GGUF (version 3) writer, from the format description: a header, typed metadata, one info
 * record per tensor, then the tensor data, each tensor aligned. Enough to hand llama.cpp a model.
 */
import * as fs from 'fs';

/** Metadata values carry their GGUF type explicitly, so that a count is never written as a float. */
export type GgufValue =
  | { type: 'u32'; value: number }
  | { type: 'i32'; value: number }
  | { type: 'f32'; value: number }
  | { type: 'bool'; value: boolean }
  | { type: 'string'; value: string }
  | { type: 'string[]'; value: string[] }
  | { type: 'f32[]'; value: ArrayLike<number> }
  | { type: 'i32[]'; value: ArrayLike<number> };

/** ggml tensor types this writer emits (values from ggml.h). */
export const GGML_TYPE = { F32: 0, F16: 1, BF16: 30 } as const;
export type GgmlTypeName = keyof typeof GGML_TYPE;

export interface GgufTensor {
  name: string;
  type: GgmlTypeName;
  /** Row-major shape, outermost first (as PyTorch writes it); GGUF stores the reverse. */
  shape: number[];
  data: Uint8Array;
}

const GGUF_TYPE = {
  u8: 0,
  i8: 1,
  u16: 2,
  i16: 3,
  u32: 4,
  i32: 5,
  f32: 6,
  bool: 7,
  string: 8,
  array: 9,
  u64: 10,
  i64: 11,
  f64: 12,
} as const;
const ALIGNMENT = 32; // GGUF's default when general.alignment is absent
const BYTES = { F32: 4, F16: 2, BF16: 2 } as const;

class ByteSink {
  private chunks: Buffer[] = [];
  length = 0;
  push(b: Buffer | Uint8Array): void {
    const buf = Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
    this.chunks.push(buf);
    this.length += buf.length;
  }
  u32(v: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v >>> 0);
    this.push(b);
  }
  i32(v: number): void {
    const b = Buffer.alloc(4);
    b.writeInt32LE(v | 0);
    this.push(b);
  }
  u64(v: number): void {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(v));
    this.push(b);
  }
  f32(v: number): void {
    const b = Buffer.alloc(4);
    b.writeFloatLE(v);
    this.push(b);
  }
  str(s: string): void {
    const b = Buffer.from(s, 'utf8');
    this.u64(b.length);
    this.push(b);
  }
  padTo(alignment: number): void {
    const pad = (alignment - (this.length % alignment)) % alignment;
    if (pad) this.push(Buffer.alloc(pad));
  }
  concat(): Buffer {
    return Buffer.concat(this.chunks, this.length);
  }
}

function writeValue(out: ByteSink, v: GgufValue): void {
  switch (v.type) {
    case 'u32':
      out.u32(GGUF_TYPE.u32);
      out.u32(v.value);
      return;
    case 'i32':
      out.u32(GGUF_TYPE.i32);
      out.i32(v.value);
      return;
    case 'f32':
      out.u32(GGUF_TYPE.f32);
      out.f32(v.value);
      return;
    case 'bool':
      out.u32(GGUF_TYPE.bool);
      out.push(Buffer.from([v.value ? 1 : 0]));
      return;
    case 'string':
      out.u32(GGUF_TYPE.string);
      out.str(v.value);
      return;
    case 'string[]':
      out.u32(GGUF_TYPE.array);
      out.u32(GGUF_TYPE.string);
      out.u64(v.value.length);
      for (const s of v.value) out.str(s);
      return;
    case 'f32[]':
      out.u32(GGUF_TYPE.array);
      out.u32(GGUF_TYPE.f32);
      out.u64(v.value.length);
      out.push(new Uint8Array(Float32Array.from(v.value).buffer));
      return;
    case 'i32[]':
      out.u32(GGUF_TYPE.array);
      out.u32(GGUF_TYPE.i32);
      out.u64(v.value.length);
      out.push(new Uint8Array(Int32Array.from(v.value).buffer));
      return;
  }
}

/** The bytes of a GGUF file holding `metadata` (in insertion order) and `tensors` (in order). */
export function ggufBytes(metadata: Map<string, GgufValue>, tensors: GgufTensor[]): Buffer {
  const out = new ByteSink();
  out.push(Buffer.from('GGUF', 'latin1'));
  out.u32(3);
  out.u64(tensors.length);
  out.u64(metadata.size);
  for (const [key, value] of metadata) {
    out.str(key);
    writeValue(out, value);
  }
  let offset = 0;
  const offsets: number[] = [];
  for (const t of tensors) {
    const elements = t.shape.reduce((a, b) => a * b, 1);
    if (t.data.byteLength !== elements * BYTES[t.type]) {
      throw new RangeError(`tensor ${t.name}: ${t.data.byteLength} bytes for shape [${t.shape}] of ${t.type}`);
    }
    out.str(t.name);
    out.u32(t.shape.length);
    for (const d of [...t.shape].reverse()) out.u64(d); // ne[0] is the contiguous dimension
    out.u32(GGML_TYPE[t.type]);
    out.u64(offset);
    offsets.push(offset);
    offset += Math.ceil(t.data.byteLength / ALIGNMENT) * ALIGNMENT;
  }
  out.padTo(ALIGNMENT);
  const dataStart = out.length;
  tensors.forEach((t, i) => {
    out.push(Buffer.alloc(dataStart + offsets[i] - out.length));
    out.push(t.data);
  });
  out.padTo(ALIGNMENT);
  return out.concat();
}

export function writeGguf(file: string, metadata: Map<string, GgufValue>, tensors: GgufTensor[]): void {
  fs.writeFileSync(file, ggufBytes(metadata, tensors));
}
