// Random-weight checkpoints for bench/model.js, written once and reused: the same bf16 values as a
// Hugging Face folder (our input) and as GGUF in BF16, Q8_0 and Q4_0 (llama.cpp's input).
//
// Models of billions of weights cannot be held in memory as float64 (the test helpers'
// way), so every tensor is generated in chunks of whole rows from its own seeded stream and written as
// it is made; the GGUF files regenerate the same stream instead of reading the folder back.
'use strict';
const fs = require('fs');
const path = require('path');

// ---- shapes -----------------------------------------------------------------------------------
// family: 'mixtral' (llama.cpp architecture `llama`, Q and K rows permuted for its RoPE) or 'qwen3moe'
// (per-head q/k RMSNorm, explicit head_dim).
const MODELS = {
  mixtral: {
    family: 'mixtral',
    H: 4096,
    layers: 2,
    heads: 32,
    kvHeads: 8,
    D: 128,
    E: 8,
    k: 2,
    F: 14336,
    V: 32000,
    ropeTheta: 1e6,
    eps: 1e-5,
  },
  qwen3moe: {
    family: 'qwen3moe',
    H: 2048,
    layers: 4,
    heads: 32,
    kvHeads: 4,
    D: 128,
    E: 128,
    k: 8,
    F: 768,
    V: 151936,
    ropeTheta: 1e6,
    eps: 1e-6,
  },
};
// Smoke-run shapes: the same two families, small enough that writing and running take seconds.
const QUICK_MODELS = {
  mixtral: {
    family: 'mixtral',
    H: 512,
    layers: 2,
    heads: 8,
    kvHeads: 4,
    D: 64,
    E: 8,
    k: 2,
    F: 1024,
    V: 2048,
    ropeTheta: 1e6,
    eps: 1e-5,
  },
  qwen3moe: {
    family: 'qwen3moe',
    H: 256,
    layers: 2,
    heads: 8,
    kvHeads: 2,
    D: 64,
    E: 32,
    k: 4,
    F: 128,
    V: 4096,
    ropeTheta: 1e6,
    eps: 1e-6,
  },
};
const CONTEXT = 4096;
const SEED = 20261201;

// ---- the tensors, in Hugging Face names ----------------------------------------------------------
// Each: shape [rows, cols], uniform in [lo, hi] (norms in [0.6, 1.4] so that a missing norm would
// show), and a seed of its own. Scales keep activations O(1) and routing uneven, as in the tests.
function hfTensors(m) {
  const { H, D, heads, kvHeads, E, F, V } = m;
  const q = heads * D,
    kv = kvHeads * D;
  const list = [];
  const sym = (name, shape, s) => list.push({ name, shape, lo: -s, hi: s });
  const norm = (name, n) => list.push({ name, shape: [n], lo: 0.6, hi: 1.4 });
  sym('model.embed_tokens.weight', [V, H], 1);
  for (let l = 0; l < m.layers; l++) {
    const p = `model.layers.${l}`;
    norm(`${p}.input_layernorm.weight`, H);
    sym(`${p}.self_attn.q_proj.weight`, [q, H], 2.5 / Math.sqrt(H));
    sym(`${p}.self_attn.k_proj.weight`, [kv, H], 2.5 / Math.sqrt(H));
    sym(`${p}.self_attn.v_proj.weight`, [kv, H], 1.7 / Math.sqrt(H));
    sym(`${p}.self_attn.o_proj.weight`, [H, q], 1.7 / Math.sqrt(q));
    if (m.family === 'qwen3moe') {
      norm(`${p}.self_attn.q_norm.weight`, D);
      norm(`${p}.self_attn.k_norm.weight`, D);
    }
    norm(`${p}.post_attention_layernorm.weight`, H);
    const x = expertNames(m.family, l);
    sym(x.router, [E, H], 3 / Math.sqrt(H));
    for (let e = 0; e < E; e++) {
      sym(x.gate(e), [F, H], 1.7 / Math.sqrt(H));
      sym(x.up(e), [F, H], 1.7 / Math.sqrt(H));
      sym(x.down(e), [H, F], 1.7 / Math.sqrt(F));
    }
  }
  norm('model.norm.weight', H);
  sym('lm_head.weight', [V, H], 4 / Math.sqrt(H));
  list.forEach((t, i) => (t.seed = (SEED + 7919 * (i + 1)) >>> 0));
  return list;
}

function expertNames(family, l) {
  if (family === 'mixtral') {
    const p = `model.layers.${l}.block_sparse_moe`;
    return {
      router: `${p}.gate.weight`,
      gate: (e) => `${p}.experts.${e}.w1.weight`,
      up: (e) => `${p}.experts.${e}.w3.weight`,
      down: (e) => `${p}.experts.${e}.w2.weight`,
    };
  }
  const p = `model.layers.${l}.mlp`;
  return {
    router: `${p}.gate.weight`,
    gate: (e) => `${p}.experts.${e}.gate_proj.weight`,
    up: (e) => `${p}.experts.${e}.up_proj.weight`,
    down: (e) => `${p}.experts.${e}.down_proj.weight`,
  };
}

function hfConfig(m) {
  const common = {
    architectures: [m.family === 'mixtral' ? 'MixtralForCausalLM' : 'Qwen3MoeForCausalLM'],
    model_type: m.family === 'mixtral' ? 'mixtral' : 'qwen3_moe',
    vocab_size: m.V,
    hidden_size: m.H,
    num_hidden_layers: m.layers,
    num_attention_heads: m.heads,
    num_key_value_heads: m.kvHeads,
    hidden_act: 'silu',
    max_position_embeddings: CONTEXT,
    rms_norm_eps: m.eps,
    rope_theta: m.ropeTheta,
    num_experts_per_tok: m.k,
    tie_word_embeddings: false,
    bos_token_id: 1,
    eos_token_id: 2,
    torch_dtype: 'bfloat16',
  };
  if (m.family === 'mixtral')
    return { ...common, intermediate_size: m.F, num_local_experts: m.E, sliding_window: null };
  return {
    ...common,
    head_dim: m.D,
    intermediate_size: 6144,
    moe_intermediate_size: m.F,
    num_experts: m.E,
    norm_topk_prob: true,
    decoder_sparse_step: 1,
    mlp_only_layers: [],
    attention_bias: false,
    use_sliding_window: false,
    sliding_window: null,
    rope_scaling: null,
  };
}

// ---- values ------------------------------------------------------------------------------------
// A tensor's values as bf16 bits, chunk by chunk of whole rows (about 4 Mi values), from its own
// stream (mulberry32): the same tensor always gets the same bits, whichever file asks.
const CHUNK = 1 << 22;
function* bf16Chunks(t) {
  const cols = t.shape[t.shape.length - 1];
  const rows = t.shape.length > 1 ? t.shape[0] : 1;
  const rowsPer = Math.max(1, Math.floor(CHUNK / cols));
  let a = t.seed;
  const span = t.hi - t.lo;
  const f = new Float32Array(rowsPer * cols),
    u = new Uint32Array(f.buffer);
  for (let r0 = 0; r0 < rows; r0 += rowsPer) {
    const n = Math.min(rowsPer, rows - r0) * cols;
    const out = new Uint16Array(n);
    for (let i = 0; i < n; i++) {
      a = (a + 0x6d2b79f5) | 0;
      let x = Math.imul(a ^ (a >>> 15), a | 1);
      x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
      f[i] = t.lo + span * (((x ^ (x >>> 14)) >>> 0) / 4294967296);
    }
    for (let i = 0; i < n; i++) {
      const b = u[i];
      out[i] = (b + 0x7fff + ((b >>> 16) & 1)) >>> 16; // round to nearest even
    }
    yield out;
  }
}

function allBf16(t) {
  const n = t.shape.reduce((x, y) => x * y, 1);
  const out = new Uint16Array(n);
  let at = 0;
  for (const c of bf16Chunks(t)) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

// ---- GGUF block formats (ggml's Q8_0 and Q4_0) -------------------------------------------------
const f32 = new Float32Array(1),
  u32 = new Uint32Array(f32.buffer);

/** float32 to IEEE half bits, round to nearest even (ggml stores block scales as fp16). */
function toF16(x) {
  f32[0] = x;
  const u = u32[0];
  const sign = (u >>> 16) & 0x8000;
  const be = (u >>> 23) & 0xff;
  let m = u & 0x7fffff;
  if (be === 0xff) return sign | 0x7c00 | (m ? 0x200 : 0);
  const e = be - 127 + 15;
  if (e >= 31) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    m |= 0x800000;
    const shift = 14 - e;
    let h = m >>> shift;
    const rem = m & ((1 << shift) - 1),
      half = 1 << (shift - 1);
    if (rem > half || (rem === half && h & 1)) h++;
    return sign | h;
  }
  let h = (e << 10) | (m >>> 13);
  const rem = m & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && h & 1)) h++; // a carry into the exponent is still right
  return sign | h;
}

/** Q8_0: per 32 weights an fp16 scale d = amax / 127, then 32 int8 codes round(x / d). 34 bytes. */
function quantQ8(bits) {
  const n = bits.length,
    out = new Uint8Array((n / 32) * 34);
  const x = new Float32Array(32),
    xu = new Uint32Array(x.buffer);
  for (let b = 0, o = 0; b < n; b += 32, o += 34) {
    let amax = 0;
    for (let j = 0; j < 32; j++) {
      xu[j] = bits[b + j] << 16;
      const v = Math.abs(x[j]);
      if (v > amax) amax = v;
    }
    const d = Math.fround(amax / 127),
      id = d ? Math.fround(1 / d) : 0;
    const h = toF16(d);
    out[o] = h & 0xff;
    out[o + 1] = h >>> 8;
    for (let j = 0; j < 32; j++) {
      const v = Math.fround(x[j] * id);
      out[o + 2 + j] = (v < 0 ? -Math.round(-v) : Math.round(v)) & 0xff; // roundf: half away from zero
    }
  }
  return out;
}

/**
 * Q4_0: per 32 weights an fp16 scale d = max / -8 (max: the value of largest magnitude, with its
 * sign), then 16 bytes of codes min(15, floor(x / d + 8.5)): weight j in the low nibble of byte j,
 * weight 16 + j in its high nibble. 18 bytes.
 */
function quantQ4(bits) {
  const n = bits.length,
    out = new Uint8Array((n / 32) * 18);
  const x = new Float32Array(32),
    xu = new Uint32Array(x.buffer);
  for (let b = 0, o = 0; b < n; b += 32, o += 18) {
    let amax = 0,
      max = 0;
    for (let j = 0; j < 32; j++) {
      xu[j] = bits[b + j] << 16;
      if (Math.abs(x[j]) > amax) {
        amax = Math.abs(x[j]);
        max = x[j];
      }
    }
    const d = Math.fround(max / -8),
      id = d ? Math.fround(1 / d) : 0;
    const h = toF16(d);
    out[o] = h & 0xff;
    out[o + 1] = h >>> 8;
    for (let j = 0; j < 16; j++) {
      const lo = Math.min(15, Math.trunc(Math.fround(Math.fround(x[j] * id) + 8.5)));
      const hi = Math.min(15, Math.trunc(Math.fround(Math.fround(x[16 + j] * id) + 8.5)));
      out[o + 2 + j] = lo | (hi << 4);
    }
  }
  return out;
}

// GGUF types: ggml.h's enum ggml_type, and llama_ftype for general.file_type.
const GGML = {
  F32: { id: 0, rowBytes: (c) => 4 * c },
  BF16: { id: 30, rowBytes: (c) => 2 * c },
  Q8_0: { id: 8, rowBytes: (c) => (c / 32) * 34 },
  Q4_0: { id: 2, rowBytes: (c) => (c / 32) * 18 },
};
const FILE_TYPE = { BF16: 32, Q8_0: 7, Q4_0: 2 };

/** Bytes of one chunk of bf16 bits in a GGUF type. */
function encodeChunk(bits, type) {
  if (type === 'BF16') return new Uint8Array(bits.buffer, bits.byteOffset, bits.byteLength);
  if (type === 'Q8_0') return quantQ8(bits);
  if (type === 'Q4_0') return quantQ4(bits);
  const f = new Float32Array(bits.length),
    u = new Uint32Array(f.buffer);
  for (let i = 0; i < bits.length; i++) u[i] = bits[i] << 16;
  return new Uint8Array(f.buffer);
}

// ---- writers -----------------------------------------------------------------------------------
class FileSink {
  constructor(file) {
    this.fd = fs.openSync(file, 'w');
    this.length = 0;
  }
  write(bytes) {
    const b = Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    for (let off = 0; off < b.length;) off += fs.writeSync(this.fd, b, off, b.length - off);
    this.length += b.length;
  }
  pad(alignment) {
    const n = (alignment - (this.length % alignment)) % alignment;
    if (n) this.write(Buffer.alloc(n));
  }
  close() {
    fs.fsyncSync(this.fd);
    fs.closeSync(this.fd);
  }
}

function writeSafetensors(file, tensors) {
  const header = {};
  let offset = 0;
  for (const t of tensors) {
    const bytes = 2 * t.shape.reduce((x, y) => x * y, 1);
    header[t.name] = { dtype: 'BF16', shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = Buffer.from(JSON.stringify(header), 'utf8');
  json = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, 0x20)]);
  const sink = new FileSink(file);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  sink.write(len);
  sink.write(json);
  for (const t of tensors) for (const c of bf16Chunks(t)) sink.write(c);
  sink.close();
}

/** Writes the Hugging Face folder: config.json, generation_config.json, model.safetensors. */
function writeHf(dir, m) {
  fs.mkdirSync(dir, { recursive: true });
  writeSafetensors(path.join(dir, 'model.safetensors'), hfTensors(m));
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(hfConfig(m), null, 2) + '\n');
  fs.writeFileSync(
    path.join(dir, 'generation_config.json'),
    JSON.stringify({ bos_token_id: 1, eos_token_id: 2 }, null, 2) + '\n',
  );
}

// A minimal SentencePiece-style vocabulary (<unk>, <s>, </s>, 256 byte tokens, then words): llama.cpp
// needs one to load a model, the benchmark feeds token ids directly.
function tokenizerMetadata(V) {
  const tokens = ['<unk>', '<s>', '</s>'],
    types = [2, 3, 3];
  for (let b = 0; b < 256; b++) {
    tokens.push(`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`);
    types.push(6);
  }
  while (tokens.length < V) {
    tokens.push(`\u2581w${tokens.length}`);
    types.push(1);
  }
  return [
    ['tokenizer.ggml.model', 'string', 'llama'],
    ['tokenizer.ggml.tokens', 'string[]', tokens],
    ['tokenizer.ggml.scores', 'f32[]', tokens.map((_, i) => -i)],
    ['tokenizer.ggml.token_type', 'i32[]', types],
    ['tokenizer.ggml.bos_token_id', 'u32', 1],
    ['tokenizer.ggml.eos_token_id', 'u32', 2],
    ['tokenizer.ggml.unknown_token_id', 'u32', 0],
    ['tokenizer.ggml.add_bos_token', 'bool', false],
    ['tokenizer.ggml.add_eos_token', 'bool', false],
  ];
}

function ggufMetadata(m, type) {
  const a = m.family === 'mixtral' ? 'llama' : 'qwen3moe';
  const kv = [
    ['general.architecture', 'string', a],
    ['general.name', 'string', `random-${m.family}`],
    ['general.file_type', 'u32', FILE_TYPE[type]],
    [`${a}.context_length`, 'u32', CONTEXT],
    [`${a}.embedding_length`, 'u32', m.H],
    [`${a}.block_count`, 'u32', m.layers],
    [`${a}.feed_forward_length`, 'u32', m.family === 'mixtral' ? m.F : 6144],
    [`${a}.attention.head_count`, 'u32', m.heads],
    [`${a}.attention.head_count_kv`, 'u32', m.kvHeads],
    [`${a}.attention.key_length`, 'u32', m.D],
    [`${a}.attention.value_length`, 'u32', m.D],
    [`${a}.rope.dimension_count`, 'u32', m.D],
    [`${a}.rope.freq_base`, 'f32', m.ropeTheta],
    [`${a}.attention.layer_norm_rms_epsilon`, 'f32', m.eps],
    [`${a}.expert_count`, 'u32', m.E],
    [`${a}.expert_used_count`, 'u32', m.k],
    [`${a}.vocab_size`, 'u32', m.V],
  ];
  if (m.family === 'qwen3moe') kv.push([`${a}.expert_feed_forward_length`, 'u32', m.F]);
  return kv.concat(tokenizerMetadata(m.V));
}

const GGUF_VALUE = { u32: 4, i32: 5, f32: 6, bool: 7, string: 8, array: 9 };
function ggufString(s) {
  const b = Buffer.from(s, 'utf8'),
    n = Buffer.alloc(8);
  n.writeBigUInt64LE(BigInt(b.length));
  return [n, b];
}
function ggufValue(type, v) {
  const out = [];
  const u32b = (x) => {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(x >>> 0);
    return b;
  };
  const u64b = (x) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(x));
    return b;
  };
  switch (type) {
    case 'u32':
      return [u32b(GGUF_VALUE.u32), u32b(v)];
    case 'f32': {
      const b = Buffer.alloc(4);
      b.writeFloatLE(v);
      return [u32b(GGUF_VALUE.f32), b];
    }
    case 'bool':
      return [u32b(GGUF_VALUE.bool), Buffer.from([v ? 1 : 0])];
    case 'string':
      return [u32b(GGUF_VALUE.string), ...ggufString(v)];
    case 'string[]':
      out.push(u32b(GGUF_VALUE.array), u32b(GGUF_VALUE.string), u64b(v.length));
      for (const s of v) out.push(...ggufString(s));
      return out;
    case 'f32[]':
      return [u32b(GGUF_VALUE.array), u32b(GGUF_VALUE.f32), u64b(v.length), Buffer.from(Float32Array.from(v).buffer)];
    case 'i32[]':
      return [u32b(GGUF_VALUE.array), u32b(GGUF_VALUE.i32), u64b(v.length), Buffer.from(Int32Array.from(v).buffer)];
  }
  throw new Error(`gguf value type ${type}`);
}

/**
 * The GGUF tensors in llama.cpp's names: experts stacked as [E, rows, cols]; matrices in `type`,
 * except the router (F32, as llama.cpp's converter keeps it) and the token embeddings (BF16: ours keep
 * embeddings 16-bit too); vectors F32. Mixtral's Q and K rows permuted for the `llama` RoPE layout.
 */
function ggufTensors(m, type) {
  const byName = new Map(hfTensors(m).map((t) => [t.name, t]));
  const out = [];
  const one = (name, hf, as) => {
    const t = byName.get(hf);
    out.push({ name, shape: t.shape, type: t.shape.length === 1 ? 'F32' : as, parts: [t] });
  };
  one('token_embd.weight', 'model.embed_tokens.weight', 'BF16');
  for (let l = 0; l < m.layers; l++) {
    const p = `model.layers.${l}`,
      b = `blk.${l}`;
    one(`${b}.attn_norm.weight`, `${p}.input_layernorm.weight`);
    for (const [g, hf] of [
      ['attn_q', 'q_proj'],
      ['attn_k', 'k_proj'],
      ['attn_v', 'v_proj'],
    ]) {
      one(`${b}.${g}.weight`, `${p}.self_attn.${hf}.weight`, type);
      if (m.family === 'mixtral' && hf !== 'v_proj')
        out[out.length - 1].permuteHeads = hf === 'q_proj' ? m.heads : m.kvHeads;
    }
    one(`${b}.attn_output.weight`, `${p}.self_attn.o_proj.weight`, type);
    if (m.family === 'qwen3moe') {
      one(`${b}.attn_q_norm.weight`, `${p}.self_attn.q_norm.weight`);
      one(`${b}.attn_k_norm.weight`, `${p}.self_attn.k_norm.weight`);
    }
    one(`${b}.ffn_norm.weight`, `${p}.post_attention_layernorm.weight`);
    const x = expertNames(m.family, l);
    one(`${b}.ffn_gate_inp.weight`, x.router, 'F32');
    for (const [g, fn] of [
      ['ffn_gate_exps', x.gate],
      ['ffn_up_exps', x.up],
      ['ffn_down_exps', x.down],
    ]) {
      const parts = Array.from({ length: m.E }, (_, e) => byName.get(fn(e)));
      out.push({ name: `${b}.${g}.weight`, shape: [m.E, ...parts[0].shape], type, parts });
    }
  }
  one('output_norm.weight', 'model.norm.weight');
  one('output.weight', 'lm_head.weight', type);
  return out;
}

/** Hugging Face rotates head halves together, llama.cpp's `llama` RoPE neighbouring pairs: row 2i + j
 * of a head takes Hugging Face row j * D/2 + i (what llama.cpp's converter does). */
function permuteRows(bits, rows, cols, heads) {
  const D = rows / heads,
    out = new Uint16Array(bits.length);
  for (let h = 0; h < heads; h++)
    for (let i = 0; i < D / 2; i++)
      for (let j = 0; j < 2; j++) {
        const src = h * D + j * (D / 2) + i,
          dst = h * D + 2 * i + j;
        out.set(bits.subarray(src * cols, (src + 1) * cols), dst * cols);
      }
  return out;
}

function writeGguf(file, m, type) {
  const tensors = ggufTensors(m, type);
  const ALIGN = 32;
  const head = [Buffer.from('GGUF', 'latin1')];
  const u32b = (x) => {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(x);
    return b;
  };
  const u64b = (x) => {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(x));
    return b;
  };
  const meta = ggufMetadata(m, type);
  head.push(u32b(3), u64b(tensors.length), u64b(meta.length));
  // One buffer per string of a 150k-token vocabulary: appended one by one (a spread would overflow the stack).
  for (const [key, t, v] of meta) for (const b of [...ggufString(key), ...ggufValue(t, v)]) head.push(b);
  let offset = 0;
  for (const t of tensors) {
    const cols = t.shape[t.shape.length - 1];
    const rows = t.shape.slice(0, -1).reduce((x, y) => x * y, 1);
    t.bytes = rows * GGML[t.type].rowBytes(cols);
    head.push(
      ...ggufString(t.name),
      u32b(t.shape.length),
      ...[...t.shape].reverse().map(u64b),
      u32b(GGML[t.type].id),
      u64b(offset),
    );
    t.offset = offset;
    offset += Math.ceil(t.bytes / ALIGN) * ALIGN;
  }
  const sink = new FileSink(file);
  sink.write(Buffer.concat(head));
  sink.pad(ALIGN);
  const start = sink.length;
  for (const t of tensors) {
    sink.pad(ALIGN);
    if (sink.length - start !== t.offset)
      throw new Error(`gguf writer: ${t.name} at ${sink.length - start}, expected ${t.offset}`);
    for (const part of t.parts) {
      if (t.permuteHeads)
        sink.write(encodeChunk(permuteRows(allBf16(part), part.shape[0], part.shape[1], t.permuteHeads), t.type));
      else for (const c of bf16Chunks(part)) sink.write(encodeChunk(c, t.type));
    }
  }
  sink.pad(ALIGN);
  sink.close();
}

// ---- the cache ---------------------------------------------------------------------------------
const WEIGHT_BYTES = { BF16: 2, Q8_0: 34 / 32, Q4_0: 18 / 32 };

/** Weights of a model: the matrices (by kind) and the whole. */
function weightCounts(m) {
  const attn = m.layers * ((m.heads + 2 * m.kvHeads) * m.D * m.H + m.H * m.heads * m.D);
  const experts = m.layers * m.E * 3 * m.H * m.F;
  const router = m.layers * m.E * m.H;
  const embed = m.V * m.H,
    lmHead = m.V * m.H;
  return { attn, experts, router, embed, lmHead, total: attn + experts + router + embed + lmHead };
}

/** Bytes per router value each engine reads: ours keeps a bf16 checkpoint's router in bf16 (every value
 * is a bf16 value), llama.cpp reads the float32 router of the GGUF files. */
const ROUTER_BYTES = { ours: 2, llama: 4 };

/** Bytes each file of a model takes (within a few MB: norms and the vocabulary are left out). */
function fileBytes(m, file) {
  const w = weightCounts(m);
  if (file === 'hf') return 2 * w.total;
  return (w.attn + w.experts + w.lmHead) * WEIGHT_BYTES[file] + 2 * w.embed + 4 * w.router;
}

/**
 * The model's folder under `cacheDir`, with the files `formats` need written when missing. The folder
 * name carries the shape and a format version, so a changed shape never reuses stale files.
 */
function ensureModel(cacheDir, name, m, ggufTypes, log) {
  const key = `${name}-v1-h${m.H}-l${m.layers}-e${m.E}-f${m.F}-v${m.V}`;
  const dir = path.join(cacheDir, key);
  fs.mkdirSync(dir, { recursive: true });
  const want = [
    ['hf', path.join(dir, 'hf', 'model.safetensors')],
    ...ggufTypes.map((t) => [t, path.join(dir, `model-${t.toLowerCase()}.gguf`)]),
  ];
  const missing = want.filter(([, f]) => !fs.existsSync(f + '.done'));
  if (missing.length) {
    const need = missing.reduce((s, [f]) => s + fileBytes(m, f), 0);
    const { bavail, bsize } = fs.statfsSync(cacheDir);
    const free = bavail * bsize;
    if (need + 4e9 > free)
      throw new Error(
        `${name}: writing ${gb(need)} GB of model files needs that much free disk and 4 GB to spare; ${cacheDir} has ${gb(free)} GB free`,
      );
  }
  for (const [f, target] of missing) {
    const t0 = Date.now();
    log(
      `writing ${name} ${f === 'hf' ? 'Hugging Face folder (bf16)' : f + ' GGUF'}: about ${gb(fileBytes(m, f))} GB ...`,
    );
    if (f === 'hf') writeHf(path.join(dir, 'hf'), m);
    else writeGguf(target, m, f);
    fs.writeFileSync(target + '.done', '');
    log(`  done in ${((Date.now() - t0) / 1e3).toFixed(0)} s`);
  }
  return {
    dir,
    hf: path.join(dir, 'hf'),
    gguf: Object.fromEntries(ggufTypes.map((t) => [t, path.join(dir, `model-${t.toLowerCase()}.gguf`)])),
  };
}

const gb = (b) => (b / 1e9).toFixed(2);

/** The formats the benchmarks compare: ours (`quantize` at load) against llama.cpp's GGUF type. */
const FORMATS = {
  bf16: { ours: 'none', gguf: 'BF16' },
  int8: { ours: 'int8', gguf: 'Q8_0' },
  int4: { ours: 'int4', gguf: 'Q4_0' },
};

/** n token ids from a seeded LCG, past <unk>, <s>, </s> and the byte tokens (the models' vocabulary). */
function benchTokens(n, V, seed) {
  let s = seed >>> 0;
  return Array.from({ length: n }, () => {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    return 259 + (s % (V - 259));
  });
}

module.exports = {
  MODELS,
  QUICK_MODELS,
  FORMATS,
  benchTokens,
  ensureModel,
  weightCounts,
  ROUTER_BYTES,
  fileBytes,
  toF16,
  quantQ8,
  quantQ4,
};
