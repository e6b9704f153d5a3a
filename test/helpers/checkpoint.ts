/**
 * Writes small safetensors checkpoints in the Hugging Face layout, from a fixed seed, for the loader
 * tests. Written from the format description, sharing no code with the package.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { encode, randomF32, RefLayer, rng } from './reference';

export type StDtype = 'F32' | 'BF16' | 'F16';

export interface RawTensor {
  dtype: string;
  shape: number[];
  data: Uint8Array;
}

export type Header = Record<string, unknown>;

/** The header object a writer would produce for these tensors, in order, with data_offsets. */
export function headerFor(
  tensors: Map<string, RawTensor>,
  metadata: Record<string, string> = { format: 'pt' },
): Header {
  const header: Header = { __metadata__: metadata };
  let offset = 0;
  for (const [name, t] of tensors) {
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.length] };
    offset += t.data.length;
  }
  return header;
}

/** Header JSON padded with spaces to a multiple of 8 bytes (as the safetensors writer does), then data. */
export function safetensorsBytes(header: Header, data: Uint8Array[]): Buffer {
  let json = Buffer.from(JSON.stringify(header), 'utf8');
  const pad = (8 - (json.length % 8)) % 8;
  json = Buffer.concat([json, Buffer.alloc(pad, 0x20)]);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  return Buffer.concat([len, json, ...data]);
}

export function writeSafetensors(file: string, tensors: Map<string, RawTensor>): void {
  fs.writeFileSync(
    file,
    safetensorsBytes(
      headerFor(tensors),
      [...tensors.values()].map((t) => t.data),
    ),
  );
}

function bytesOf(a: Float32Array | Uint16Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/** One MoE block's weights: stored (what the file holds) and exact (what the kernels see). */
export interface TinyLayer {
  gate: Float32Array; // exact float32 values of the gate as stored
  w1: Float32Array | Uint16Array; // [E, F, H] stored
  w3: Float32Array | Uint16Array;
  w2: Float32Array | Uint16Array; // [E, H, F]
  ref: RefLayer;
}

export interface TinyModel {
  dir: string;
  H: number;
  F: number;
  E: number;
  k: number;
  dtype: StDtype;
  layers: TinyLayer[];
}

const DTYPE_NAME = { F32: 'float32', BF16: 'bfloat16', F16: 'float16' } as const;

/**
 * A tiny Mixtral (H=32, F=48, E=4, k=2, 2 layers, vocab 64) in `dir`: config.json, two shards
 * (model-0000{1,2}-of-00002.safetensors, layer 1's experts split across them) and
 * model.safetensors.index.json, every tensor in `dtype` as Hugging Face stores Mixtral.
 */
export function writeTinyMixtral(
  dir: string,
  dtype: StDtype = 'BF16',
  seed = 1234,
  prefixOf = (l: number) => `model.layers.${l}.block_sparse_moe`,
): TinyModel {
  const H = 32,
    F = 48,
    E = 4,
    k = 2,
    L = 2,
    V = 64;
  const rand = rng(seed);
  const dt = DTYPE_NAME[dtype];
  fs.mkdirSync(dir, { recursive: true });
  const t = (
    values: Float32Array,
    shape: number[],
  ): { raw: RawTensor; exact: Float64Array; stored: Float32Array | Uint16Array } => {
    const { stored, exact } = encode(values, dt);
    return { raw: { dtype, shape, data: bytesOf(stored) }, exact, stored };
  };
  const shard1 = new Map<string, RawTensor>();
  const shard2 = new Map<string, RawTensor>();
  shard1.set('model.embed_tokens.weight', t(randomF32(V * H, rand), [V, H]).raw);
  const layers: TinyLayer[] = [];
  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}`;
    const moe = prefixOf(l);
    const at = (e: number) => (l === 0 || e < E / 2 ? shard1 : shard2);
    at(0).set(`${p}.input_layernorm.weight`, t(randomF32(H, rand), [H]).raw);
    for (const proj of ['q_proj', 'k_proj', 'v_proj', 'o_proj'])
      at(0).set(`${p}.self_attn.${proj}.weight`, t(randomF32(H * H, rand, 0.1), [H, H]).raw);
    const gate = t(randomF32(E * H, rand, 2 / Math.sqrt(H)), [E, H]);
    at(0).set(`${moe}.gate.weight`, gate.raw);
    const all = { w1: new Float64Array(E * F * H), w3: new Float64Array(E * F * H), w2: new Float64Array(E * H * F) };
    const stored = {
      w1: dtype === 'F32' ? new Float32Array(E * F * H) : new Uint16Array(E * F * H),
      w3: dtype === 'F32' ? new Float32Array(E * F * H) : new Uint16Array(E * F * H),
      w2: dtype === 'F32' ? new Float32Array(E * H * F) : new Uint16Array(E * H * F),
    };
    for (let e = 0; e < E; e++) {
      for (const m of ['w1', 'w2', 'w3'] as const) {
        const shape = m === 'w2' ? [H, F] : [F, H];
        const w = t(randomF32(F * H, rand, 1 / Math.sqrt(m === 'w2' ? F : H)), shape);
        at(e).set(`${moe}.experts.${e}.${m}.weight`, w.raw);
        all[m].set(w.exact, e * F * H);
        stored[m].set(w.stored as never, e * F * H);
      }
    }
    at(E).set(`${p}.post_attention_layernorm.weight`, t(randomF32(H, rand), [H]).raw);
    const gateF32 = Float32Array.from(gate.exact);
    layers.push({
      gate: gateF32,
      ...stored,
      ref: { H, F, E, k, renorm: true, gate: gateF32, w1: all.w1, w3: all.w3, w2: all.w2 },
    });
  }
  shard2.set('model.norm.weight', t(randomF32(H, rand), [H]).raw);
  shard2.set('lm_head.weight', t(randomF32(V * H, rand), [V, H]).raw);

  const names = ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors'];
  writeSafetensors(path.join(dir, names[0]), shard1);
  writeSafetensors(path.join(dir, names[1]), shard2);
  const weightMap: Record<string, string> = {};
  let total = 0;
  [shard1, shard2].forEach((s, i) => {
    for (const [name, r] of s) {
      weightMap[name] = names[i];
      total += r.data.length;
    }
  });
  const sorted = Object.fromEntries(
    Object.keys(weightMap)
      .sort()
      .map((n) => [n, weightMap[n]]),
  );
  fs.writeFileSync(
    path.join(dir, 'model.safetensors.index.json'),
    JSON.stringify({ metadata: { total_size: total }, weight_map: sorted }, null, 2),
  );
  fs.writeFileSync(
    path.join(dir, 'config.json'),
    JSON.stringify(
      {
        architectures: ['MixtralForCausalLM'],
        model_type: 'mixtral',
        hidden_size: H,
        intermediate_size: F,
        num_local_experts: E,
        num_experts_per_tok: k,
        num_hidden_layers: L,
        num_attention_heads: 4,
        num_key_value_heads: 4,
        vocab_size: V,
        rms_norm_eps: 1e-5,
        torch_dtype: dtype === 'F32' ? 'float32' : dtype === 'BF16' ? 'bfloat16' : 'float16',
      },
      null,
      2,
    ),
  );
  return { dir, H, F, E, k, dtype, layers };
}

/** All tensors of one layer's MoE block in a single file, for the corrupted-file tests. */
export function moeTensors(
  model: TinyModel,
  layer: number,
  prefix = `model.layers.${layer}.block_sparse_moe`,
): Map<string, RawTensor> {
  const { H, F, E, dtype } = model;
  const L = model.layers[layer];
  const m = new Map<string, RawTensor>();
  const gate = dtype === 'F32' ? L.gate : encode(L.gate, DTYPE_NAME[dtype]).stored;
  m.set(`${prefix}.gate.weight`, { dtype, shape: [E, H], data: bytesOf(gate) });
  for (let e = 0; e < E; e++) {
    const n = F * H;
    m.set(`${prefix}.experts.${e}.w1.weight`, {
      dtype,
      shape: [F, H],
      data: bytesOf(L.w1.subarray(e * n, (e + 1) * n)),
    });
    m.set(`${prefix}.experts.${e}.w2.weight`, {
      dtype,
      shape: [H, F],
      data: bytesOf(L.w2.subarray(e * n, (e + 1) * n)),
    });
    m.set(`${prefix}.experts.${e}.w3.weight`, {
      dtype,
      shape: [F, H],
      data: bytesOf(L.w3.subarray(e * n, (e + 1) * n)),
    });
  }
  return m;
}

/** The process's resident pages of mapped files, in bytes (RssFile in /proc/self/status); null off Linux. */
export function residentFileBytes(): number | null {
  const status = fs.existsSync('/proc/self/status') ? fs.readFileSync('/proc/self/status', 'utf8') : '';
  const m = /RssFile:\s+(\d+) kB/.exec(status);
  return m ? Number(m[1]) * 1024 : null;
}

/** A fresh folder under the system temp directory; remove it with removeTempDir. */
export function makeTempDir(tag: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `fused-moe-${tag}-`));
}

export function removeTempDir(dir: string): void {
  fs.rmSync(dir, { recursive: true, force: true });
}
