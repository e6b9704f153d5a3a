/**
 * Writes a tiny random-weight decoder model of one MoE family twice, from a fixed seed: as a Hugging
 * Face folder (config.json, generation_config.json, model.safetensors with the family's own tensor
 * names) and as GGUF with the architecture name, metadata keys and tensor layout llama.cpp reads.
 * The same exact values go into both, so the float64 reference (which reads the folder) and llama.cpp
 * (which reads the GGUF) must agree.
 */
import * as fs from 'fs';
import * as path from 'path';
import { RawTensor, writeSafetensors } from '../checkpoint';
import { encode, rng } from '../reference';
import { Float64Tensor } from './safetensors-read';
import { GgufTensor, GgufValue, writeGguf } from './gguf';

export type Family = 'mixtral' | 'qwen3moe' | 'olmoe' | 'qwen2moe';
export const FAMILIES: readonly Family[] = ['mixtral', 'qwen3moe', 'olmoe', 'qwen2moe'];
export type WeightDtype = 'float32' | 'bfloat16';

export interface ModelShape {
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  numExperts: number;
  topK: number;
  /** Each routed expert's intermediate size. */
  expertFfn: number;
  /** The shared expert's intermediate size (Qwen2-MoE only; 0 elsewhere). */
  sharedExpertFfn: number;
  /** A dense MLP's intermediate size, written to configs that carry one (unused by MoE layers). */
  denseFfn: number;
  vocabSize: number;
  contextLength: number;
  ropeTheta: number;
  rmsNormEps: number;
  tieWordEmbeddings: boolean;
}

export interface RandomModelOptions extends Partial<ModelShape> {
  family: Family;
  dtype?: WeightDtype;
  seed?: number;
  /** Write the GGUF as well (default true). */
  gguf?: boolean;
  /**
   * Write the `llama` architecture's Q and K rows in Hugging Face order instead of the order
   * llama.cpp's RoPE expects: a deliberately broken GGUF that shows the comparison can fail.
   */
  skipLlamaQkPermutation?: boolean;
}

export interface RandomModel {
  family: Family;
  dtype: WeightDtype;
  shape: ModelShape;
  /** The Hugging Face folder. */
  hfDir: string;
  /** The GGUF file, or null when not written. */
  ggufPath: string | null;
  /** config.json as written. */
  config: Record<string, unknown>;
  /** Every tensor by its Hugging Face name, holding exactly the values stored (after bf16 rounding). */
  weights: Map<string, Float64Tensor>;
}

/** Tiny sizes, different per family, so that a size mixed up between two fields cannot go unseen. */
export const DEFAULT_SHAPES: Record<Family, ModelShape> = {
  mixtral: {
    hiddenSize: 64,
    numLayers: 2,
    numHeads: 4,
    numKvHeads: 2,
    headDim: 16,
    numExperts: 8,
    topK: 2,
    expertFfn: 96,
    sharedExpertFfn: 0,
    denseFfn: 96,
    vocabSize: 320,
    contextLength: 128,
    ropeTheta: 1e6,
    rmsNormEps: 1e-5,
    tieWordEmbeddings: false,
  },
  // head_dim 24 while hidden_size / heads is 16: a head sliced as H / heads reads the wrong columns.
  qwen3moe: {
    hiddenSize: 64,
    numLayers: 2,
    numHeads: 4,
    numKvHeads: 2,
    headDim: 24,
    numExperts: 8,
    topK: 2,
    expertFfn: 48,
    sharedExpertFfn: 0,
    denseFfn: 128,
    vocabSize: 384,
    contextLength: 128,
    ropeTheta: 1e6,
    rmsNormEps: 1e-6,
    tieWordEmbeddings: false,
  },
  // llama.cpp sizes OLMoE's k_norm as the whole hidden size, so its key heads equal its query heads.
  olmoe: {
    hiddenSize: 80,
    numLayers: 2,
    numHeads: 4,
    numKvHeads: 4,
    headDim: 20,
    numExperts: 6,
    topK: 2,
    expertFfn: 64,
    sharedExpertFfn: 0,
    denseFfn: 64,
    vocabSize: 320,
    contextLength: 128,
    ropeTheta: 1e4,
    rmsNormEps: 1e-5,
    tieWordEmbeddings: false,
  },
  qwen2moe: {
    hiddenSize: 96,
    numLayers: 2,
    numHeads: 6,
    numKvHeads: 2,
    headDim: 16,
    numExperts: 4,
    topK: 2,
    expertFfn: 40,
    sharedExpertFfn: 72,
    denseFfn: 160,
    vocabSize: 512,
    contextLength: 128,
    ropeTheta: 1e6,
    rmsNormEps: 1e-6,
    tieWordEmbeddings: false,
  },
};

/** Special token ids of the minimal tokenizer written into the GGUF (and named in the configs). */
export const TOKENS = { unk: 0, bos: 1, eos: 2, firstByte: 3 } as const;

const ARCHITECTURES: Record<Family, { hf: string; modelType: string; gguf: string }> = {
  mixtral: { hf: 'MixtralForCausalLM', modelType: 'mixtral', gguf: 'llama' },
  qwen3moe: { hf: 'Qwen3MoeForCausalLM', modelType: 'qwen3_moe', gguf: 'qwen3moe' },
  olmoe: { hf: 'OlmoeForCausalLM', modelType: 'olmoe', gguf: 'olmoe' },
  qwen2moe: { hf: 'Qwen2MoeForCausalLM', modelType: 'qwen2_moe', gguf: 'qwen2moe' },
};

/** Whether the family renormalises its top-k routing weights to sum to one. */
export const NORM_TOPK: Record<Family, boolean> = { mixtral: true, qwen3moe: true, olmoe: false, qwen2moe: false };

/** config.json with the field names of each family's Hugging Face configuration class. */
function hfConfig(family: Family, s: ModelShape, dtype: WeightDtype): Record<string, unknown> {
  const common = {
    architectures: [ARCHITECTURES[family].hf],
    model_type: ARCHITECTURES[family].modelType,
    vocab_size: s.vocabSize,
    hidden_size: s.hiddenSize,
    num_hidden_layers: s.numLayers,
    num_attention_heads: s.numHeads,
    num_key_value_heads: s.numKvHeads,
    hidden_act: 'silu',
    max_position_embeddings: s.contextLength,
    rms_norm_eps: s.rmsNormEps,
    rope_theta: s.ropeTheta,
    num_experts_per_tok: s.topK,
    tie_word_embeddings: s.tieWordEmbeddings,
    bos_token_id: TOKENS.bos,
    eos_token_id: TOKENS.eos,
    torch_dtype: dtype,
  };
  switch (family) {
    case 'mixtral':
      if (s.headDim * s.numHeads !== s.hiddenSize)
        throw new RangeError('mixtral: headDim must be hiddenSize / numHeads');
      return {
        ...common,
        intermediate_size: s.expertFfn,
        num_local_experts: s.numExperts,
        sliding_window: null,
        router_aux_loss_coef: 0.02,
      };
    case 'qwen3moe':
      return {
        ...common,
        head_dim: s.headDim,
        intermediate_size: s.denseFfn,
        moe_intermediate_size: s.expertFfn,
        num_experts: s.numExperts,
        norm_topk_prob: NORM_TOPK.qwen3moe,
        decoder_sparse_step: 1,
        mlp_only_layers: [],
        attention_bias: false,
        use_sliding_window: false,
        sliding_window: null,
        rope_scaling: null,
      };
    case 'olmoe':
      if (s.headDim * s.numHeads !== s.hiddenSize) throw new RangeError('olmoe: headDim must be hiddenSize / numHeads');
      if (s.numKvHeads !== s.numHeads) throw new RangeError('olmoe: llama.cpp needs numKvHeads === numHeads');
      return {
        ...common,
        intermediate_size: s.expertFfn,
        num_experts: s.numExperts,
        norm_topk_prob: NORM_TOPK.olmoe,
        clip_qkv: null,
        attention_bias: false,
        rope_scaling: null,
      };
    case 'qwen2moe':
      if (s.headDim * s.numHeads !== s.hiddenSize)
        throw new RangeError('qwen2moe: headDim must be hiddenSize / numHeads');
      return {
        ...common,
        intermediate_size: s.denseFfn,
        moe_intermediate_size: s.expertFfn,
        shared_expert_intermediate_size: s.sharedExpertFfn,
        num_experts: s.numExperts,
        norm_topk_prob: NORM_TOPK.qwen2moe,
        decoder_sparse_step: 1,
        mlp_only_layers: [],
        use_sliding_window: false,
        sliding_window: null,
        max_window_layers: s.numLayers,
      };
  }
}

/** Hugging Face names of one layer's MoE tensors. */
function moeNames(family: Family, l: number) {
  if (family === 'mixtral') {
    const p = `model.layers.${l}.block_sparse_moe`;
    return {
      router: `${p}.gate.weight`,
      gate: (e: number) => `${p}.experts.${e}.w1.weight`,
      up: (e: number) => `${p}.experts.${e}.w3.weight`,
      down: (e: number) => `${p}.experts.${e}.w2.weight`,
    };
  }
  const p = `model.layers.${l}.mlp`;
  return {
    router: `${p}.gate.weight`,
    gate: (e: number) => `${p}.experts.${e}.gate_proj.weight`,
    up: (e: number) => `${p}.experts.${e}.up_proj.weight`,
    down: (e: number) => `${p}.experts.${e}.down_proj.weight`,
  };
}

/**
 * Random weights, every value exactly representable in `dtype`. Scales keep activations O(1), make
 * attention prefer some positions over others, and spread router logits so routing is not a coin toss.
 */
function randomWeights(family: Family, s: ModelShape, dtype: WeightDtype, seed: number): Map<string, Float64Tensor> {
  const rand = rng(seed);
  const weights = new Map<string, Float64Tensor>();
  const add = (name: string, shape: number[], lo: number, hi: number) => {
    const n = shape.reduce((a, b) => a * b, 1);
    const raw = new Float32Array(n);
    for (let i = 0; i < n; i++) raw[i] = lo + (hi - lo) * rand();
    weights.set(name, { shape, values: encode(raw, dtype).exact });
  };
  const sym = (name: string, shape: number[], scale: number) => add(name, shape, -scale, scale);
  const norm = (name: string, n: number) => add(name, [n], 0.6, 1.4); // not all ones: a missing norm shows
  const { hiddenSize: H, headDim: D, numHeads: NH, numKvHeads: NKV, numExperts: E, expertFfn: F, vocabSize: V } = s;
  const qDim = NH * D,
    kvDim = NKV * D;
  const attnScale = 2.5 / Math.sqrt(H);

  sym('model.embed_tokens.weight', [V, H], 1);
  for (let l = 0; l < s.numLayers; l++) {
    const p = `model.layers.${l}`;
    norm(`${p}.input_layernorm.weight`, H);
    sym(`${p}.self_attn.q_proj.weight`, [qDim, H], attnScale);
    sym(`${p}.self_attn.k_proj.weight`, [kvDim, H], attnScale);
    sym(`${p}.self_attn.v_proj.weight`, [kvDim, H], 1.7 / Math.sqrt(H));
    if (family === 'qwen2moe') {
      sym(`${p}.self_attn.q_proj.bias`, [qDim], 0.5);
      sym(`${p}.self_attn.k_proj.bias`, [kvDim], 0.5);
      sym(`${p}.self_attn.v_proj.bias`, [kvDim], 0.5);
    }
    sym(`${p}.self_attn.o_proj.weight`, [H, qDim], 1.7 / Math.sqrt(qDim));
    if (family === 'qwen3moe') {
      norm(`${p}.self_attn.q_norm.weight`, D);
      norm(`${p}.self_attn.k_norm.weight`, D);
    } else if (family === 'olmoe') {
      norm(`${p}.self_attn.q_norm.weight`, qDim);
      norm(`${p}.self_attn.k_norm.weight`, kvDim);
    }
    norm(`${p}.post_attention_layernorm.weight`, H);
    const m = moeNames(family, l);
    sym(m.router, [E, H], 3 / Math.sqrt(H));
    for (let e = 0; e < E; e++) {
      sym(m.gate(e), [F, H], 1.7 / Math.sqrt(H));
      sym(m.up(e), [F, H], 1.7 / Math.sqrt(H));
      sym(m.down(e), [H, F], 1.7 / Math.sqrt(F));
    }
    if (family === 'qwen2moe') {
      const q = `${p}.mlp.shared_expert`;
      const FS = s.sharedExpertFfn;
      sym(`${q}.gate_proj.weight`, [FS, H], 1.7 / Math.sqrt(H));
      sym(`${q}.up_proj.weight`, [FS, H], 1.7 / Math.sqrt(H));
      sym(`${q}.down_proj.weight`, [H, FS], 1.7 / Math.sqrt(FS));
      sym(`${p}.mlp.shared_expert_gate.weight`, [1, H], 3 / Math.sqrt(H));
    }
  }
  norm('model.norm.weight', H);
  if (!s.tieWordEmbeddings) sym('lm_head.weight', [V, H], 4 / Math.sqrt(H));
  return weights;
}

function tensorBytes(values: Float64Array, dtype: WeightDtype): Uint8Array {
  const stored = encode(Float32Array.from(values), dtype).stored;
  return new Uint8Array(stored.buffer, stored.byteOffset, stored.byteLength);
}

function writeHfFolder(
  dir: string,
  config: Record<string, unknown>,
  weights: Map<string, Float64Tensor>,
  dtype: WeightDtype,
): void {
  fs.mkdirSync(dir, { recursive: true });
  const st = dtype === 'float32' ? 'F32' : 'BF16';
  const tensors = new Map<string, RawTensor>();
  for (const [name, t] of weights) tensors.set(name, { dtype: st, shape: t.shape, data: tensorBytes(t.values, dtype) });
  writeSafetensors(path.join(dir, 'model.safetensors'), tensors);
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(config, null, 2) + '\n');
  fs.writeFileSync(
    path.join(dir, 'generation_config.json'),
    JSON.stringify({ bos_token_id: TOKENS.bos, eos_token_id: TOKENS.eos }, null, 2) + '\n',
  );
}

/**
 * Hugging Face rotates the two halves of each head together; llama.cpp's `llama` architecture
 * rotates neighbouring pairs. Its converter reorders the rows of Q and K so that row 2i of a head is
 * HF row i and row 2i+1 is HF row i + D/2; the same reordering is done here.
 */
export function permuteForInterleavedRope(
  values: Float64Array,
  rows: number,
  cols: number,
  heads: number,
): Float64Array {
  const D = rows / heads;
  const out = new Float64Array(values.length);
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < D / 2; i++) {
      for (let j = 0; j < 2; j++) {
        const dst = h * D + 2 * i + j;
        const src = h * D + j * (D / 2) + i;
        out.set(values.subarray(src * cols, (src + 1) * cols), dst * cols);
      }
    }
  }
  return out;
}

/** A minimal SentencePiece-style vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then words. */
function tokenizerMetadata(vocabSize: number): [string, GgufValue][] {
  if (vocabSize < TOKENS.firstByte + 256)
    throw new RangeError(`vocabSize must be at least ${TOKENS.firstByte + 256} for the byte tokens`);
  const tokens: string[] = ['<unk>', '<s>', '</s>'];
  const types: number[] = [2, 3, 3]; // llama.cpp token types: 1 normal, 2 unknown, 3 control, 6 byte
  for (let b = 0; b < 256; b++) {
    tokens.push(`<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`);
    types.push(6);
  }
  while (tokens.length < vocabSize) {
    tokens.push(`\u2581w${tokens.length}`);
    types.push(1);
  }
  return [
    ['tokenizer.ggml.model', { type: 'string', value: 'llama' }],
    ['tokenizer.ggml.tokens', { type: 'string[]', value: tokens }],
    ['tokenizer.ggml.scores', { type: 'f32[]', value: tokens.map((_, i) => -i) }],
    ['tokenizer.ggml.token_type', { type: 'i32[]', value: types }],
    ['tokenizer.ggml.bos_token_id', { type: 'u32', value: TOKENS.bos }],
    ['tokenizer.ggml.eos_token_id', { type: 'u32', value: TOKENS.eos }],
    ['tokenizer.ggml.unknown_token_id', { type: 'u32', value: TOKENS.unk }],
    ['tokenizer.ggml.add_bos_token', { type: 'bool', value: false }],
    ['tokenizer.ggml.add_eos_token', { type: 'bool', value: false }],
  ];
}

function ggufMetadata(family: Family, s: ModelShape, dtype: WeightDtype): Map<string, GgufValue> {
  const arch = ARCHITECTURES[family].gguf;
  const u32 = (value: number): GgufValue => ({ type: 'u32', value });
  const m = new Map<string, GgufValue>([
    ['general.architecture', { type: 'string', value: arch }],
    ['general.name', { type: 'string', value: `random-${family}` }],
    ['general.file_type', u32(dtype === 'float32' ? 0 : 32)], // llama_ftype: ALL_F32, MOSTLY_BF16
    [`${arch}.context_length`, u32(s.contextLength)],
    [`${arch}.embedding_length`, u32(s.hiddenSize)],
    [`${arch}.block_count`, u32(s.numLayers)],
    [`${arch}.feed_forward_length`, u32(family === 'mixtral' || family === 'olmoe' ? s.expertFfn : s.denseFfn)],
    [`${arch}.attention.head_count`, u32(s.numHeads)],
    [`${arch}.attention.head_count_kv`, u32(s.numKvHeads)],
    [`${arch}.attention.key_length`, u32(s.headDim)],
    [`${arch}.attention.value_length`, u32(s.headDim)],
    [`${arch}.rope.dimension_count`, u32(s.headDim)],
    [`${arch}.rope.freq_base`, { type: 'f32', value: s.ropeTheta }],
    [`${arch}.attention.layer_norm_rms_epsilon`, { type: 'f32', value: s.rmsNormEps }],
    [`${arch}.expert_count`, u32(s.numExperts)],
    [`${arch}.expert_used_count`, u32(s.topK)],
    [`${arch}.vocab_size`, u32(s.vocabSize)],
  ]);
  if (family === 'qwen3moe' || family === 'qwen2moe') m.set(`${arch}.expert_feed_forward_length`, u32(s.expertFfn));
  if (family === 'qwen2moe') m.set(`${arch}.expert_shared_feed_forward_length`, u32(s.sharedExpertFfn));
  for (const [k, v] of tokenizerMetadata(s.vocabSize)) m.set(k, v);
  return m;
}

/** GGUF tensors: llama.cpp names, experts stacked into one [E, rows, cols] tensor per projection. */
function ggufTensors(
  family: Family,
  s: ModelShape,
  weights: Map<string, Float64Tensor>,
  dtype: WeightDtype,
  permuteQk: boolean,
): GgufTensor[] {
  const out: GgufTensor[] = [];
  const get = (name: string) => {
    const t = weights.get(name);
    if (!t) throw new Error(`random model: missing ${name}`);
    return t;
  };
  // llama.cpp's converter keeps vectors (norms, biases) in float32 whatever the matrices' type.
  const put = (name: string, shape: number[], values: Float64Array) => {
    const type = dtype === 'bfloat16' && shape.length > 1 ? 'BF16' : 'F32';
    out.push({ name, type, shape, data: tensorBytes(values, type === 'BF16' ? 'bfloat16' : 'float32') });
  };
  const copy = (name: string, hf: string) => put(name, get(hf).shape, get(hf).values);
  const stack = (name: string, hf: (e: number) => string) => {
    const first = get(hf(0));
    const n = first.values.length;
    const all = new Float64Array(s.numExperts * n);
    for (let e = 0; e < s.numExperts; e++) all.set(get(hf(e)).values, e * n);
    put(name, [s.numExperts, ...first.shape], all);
  };
  const H = s.hiddenSize;

  copy('token_embd.weight', 'model.embed_tokens.weight');
  for (let l = 0; l < s.numLayers; l++) {
    const p = `model.layers.${l}`;
    const b = `blk.${l}`;
    copy(`${b}.attn_norm.weight`, `${p}.input_layernorm.weight`);
    for (const [g, hf] of [
      ['attn_q', 'q_proj'],
      ['attn_k', 'k_proj'],
      ['attn_v', 'v_proj'],
    ] as const) {
      const w = get(`${p}.self_attn.${hf}.weight`);
      const heads = hf === 'q_proj' ? s.numHeads : s.numKvHeads;
      const values =
        family === 'mixtral' && permuteQk && hf !== 'v_proj'
          ? permuteForInterleavedRope(w.values, w.shape[0], H, heads)
          : w.values;
      put(`${b}.${g}.weight`, w.shape, values);
      if (family === 'qwen2moe') copy(`${b}.${g}.bias`, `${p}.self_attn.${hf}.bias`);
    }
    copy(`${b}.attn_output.weight`, `${p}.self_attn.o_proj.weight`);
    if (family === 'qwen3moe' || family === 'olmoe') {
      copy(`${b}.attn_q_norm.weight`, `${p}.self_attn.q_norm.weight`);
      copy(`${b}.attn_k_norm.weight`, `${p}.self_attn.k_norm.weight`);
    }
    copy(`${b}.ffn_norm.weight`, `${p}.post_attention_layernorm.weight`);
    const m = moeNames(family, l);
    copy(`${b}.ffn_gate_inp.weight`, m.router);
    stack(`${b}.ffn_gate_exps.weight`, m.gate);
    stack(`${b}.ffn_up_exps.weight`, m.up);
    stack(`${b}.ffn_down_exps.weight`, m.down);
    if (family === 'qwen2moe') {
      copy(`${b}.ffn_gate_shexp.weight`, `${p}.mlp.shared_expert.gate_proj.weight`);
      copy(`${b}.ffn_up_shexp.weight`, `${p}.mlp.shared_expert.up_proj.weight`);
      copy(`${b}.ffn_down_shexp.weight`, `${p}.mlp.shared_expert.down_proj.weight`);
      put(`${b}.ffn_gate_inp_shexp.weight`, [H], get(`${p}.mlp.shared_expert_gate.weight`).values); // [1, H] in HF, a vector here
    }
  }
  copy('output_norm.weight', 'model.norm.weight');
  // llama and qwen3moe fall back to the embeddings when `output` is absent; olmoe and qwen2moe need it.
  const lmHead = s.tieWordEmbeddings ? 'model.embed_tokens.weight' : 'lm_head.weight';
  if (!s.tieWordEmbeddings || family === 'olmoe' || family === 'qwen2moe') copy('output.weight', lmHead);
  return out;
}

/**
 * Writes `dir/hf/` (the Hugging Face folder) and `dir/model.gguf`, and returns what was written. The
 * same options and seed always give the same bytes.
 */
export function writeRandomModel(dir: string, options: RandomModelOptions): RandomModel {
  const { family, dtype = 'float32', seed = 1, gguf = true, skipLlamaQkPermutation = false, ...sizes } = options;
  if (!ARCHITECTURES[family])
    throw new RangeError(`family must be one of ${FAMILIES.join(', ')}; got ${String(family)}`);
  const defined = Object.fromEntries(Object.entries(sizes).filter(([, v]) => v !== undefined)) as Partial<ModelShape>;
  const shape: ModelShape = { ...DEFAULT_SHAPES[family], ...defined };
  if (family !== 'qwen2moe') shape.sharedExpertFfn = 0;
  if (shape.headDim % 2) throw new RangeError('headDim must be even (RoPE rotates pairs)');
  if (shape.numHeads % shape.numKvHeads) throw new RangeError('numHeads must be a multiple of numKvHeads');
  const config = hfConfig(family, shape, dtype);
  const weights = randomWeights(family, shape, dtype, seed);
  const hfDir = path.join(dir, 'hf');
  writeHfFolder(hfDir, config, weights, dtype);
  let ggufPath: string | null = null;
  if (gguf) {
    ggufPath = path.join(dir, 'model.gguf');
    writeGguf(
      ggufPath,
      ggufMetadata(family, shape, dtype),
      ggufTensors(family, shape, weights, dtype, !skipLlamaQkPermutation),
    );
  }
  return { family, dtype, shape, hfDir, ggufPath, config, weights };
}
