/**
 * The decoder described by a Hugging Face `config.json`, for the MoE families fused-moe runs, turned
 * into one shape the native decoder takes. Each family's fields and tensor names are listed here and
 * nowhere else.
 */
import { MoeError } from '../errors';

export const SUPPORTED_ARCHITECTURES = [
  'MixtralForCausalLM',
  'Qwen3MoeForCausalLM',
  'OlmoeForCausalLM',
  'Qwen2MoeForCausalLM',
] as const;
export type Architecture = (typeof SUPPORTED_ARCHITECTURES)[number];

/**
 * Where the q/k RMSNorm applies: none (Mixtral, Qwen2-MoE), over each head's head_dim values (Qwen3-MoE),
 * or over the whole q and k projections before they are split into heads (OLMoE).
 */
export type QkNorm = 'none' | 'head' | 'projection';

export interface MoeBlockConfig {
  numExperts: number;
  topK: number;
  /** F of each routed expert. */
  intermediateSize: number;
  /** Mixtral and Qwen3-MoE renormalise the picked weights; OLMoE and Qwen2-MoE keep the softmax values. */
  routing: 'softmax-topk-renorm' | 'softmax-topk';
  /** F of the always-on shared expert (Qwen2-MoE), 0 when there is none. */
  sharedIntermediateSize: number;
  /** The shared expert's output is scaled by sigmoid(shared_expert_gate . x) (Qwen2-MoE). */
  sharedGate: boolean;
}

export interface DecoderConfig {
  architecture: Architecture;
  vocabSize: number;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  ropeTheta: number;
  rmsNormEps: number;
  /** A query sees the `slidingWindow` most recent positions, itself included; 0: every earlier one. */
  slidingWindow: number;
  /** Longest context the checkpoint was trained for (`max_position_embeddings`). */
  maxPositions: number;
  qkNorm: QkNorm;
  /** q, k and v projections carry biases (always in Qwen2-MoE, where `attention_bias` says elsewhere). */
  qkvBias: boolean;
  /** OLMoE's optional clamp of q, k and v to [-clipQkv, clipQkv]; 0: none. */
  clipQkv: number;
  tieWordEmbeddings: boolean;
  moe: MoeBlockConfig;
  /** F of the dense SwiGLU MLP of the layers that are not MoE layers (0 when every layer is MoE). */
  denseIntermediateSize: number;
  /** Per layer: true where the MLP is the MoE block, false where it is the dense MLP. */
  moeLayers: boolean[];
  /** Token ids that end generation, from config.json (generation_config.json may add more). */
  eosTokenIds: number[];
  bosTokenId: number | null;
}

/** The checkpoint tensor names of one decoder layer. */
export interface LayerTensorNames {
  inputNorm: string;
  q: string;
  k: string;
  v: string;
  o: string;
  qBias?: string;
  kBias?: string;
  vBias?: string;
  qNorm?: string;
  kNorm?: string;
  postAttentionNorm: string;
  /** MoE layers: the router and expert e's three matrices. */
  router?: string;
  expert?: (e: number) => { gate: string; up: string; down: string };
  shared?: { gate: string; up: string; down: string; sharedGate?: string };
  /** Dense layers: the MLP's three matrices. */
  dense?: { gate: string; up: string; down: string };
}

export interface ModelTensorNames {
  embedding: string;
  finalNorm: string;
  /** The output projection, or the embedding when the checkpoint ties them. */
  lmHead: string;
  layer(i: number): LayerTensorNames;
}

function bad(source: string, message: string): MoeError {
  return new MoeError('ERR_MOE_CHECKPOINT', `${source}: ${message}`);
}

type Json = Record<string, unknown>;

function int(cfg: Json, source: string, key: string, min: number, fallback?: number, max?: number): number {
  const v = cfg[key];
  const expected = max === undefined ? `an integer >= ${min}` : `an integer in [${min}, ${max}]`;
  if (v === undefined || v === null) {
    if (fallback !== undefined) return fallback;
    throw bad(source, `'${key}' is missing (${expected} is expected)`);
  }
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || (max !== undefined && v > max))
    throw bad(source, `'${key}' must be ${expected}, got ${JSON.stringify(v)}`);
  return v;
}

// Counts that size per-layer and per-expert lists before any tensor is looked at: far above any
// released model (126 layers, 512 experts), low enough that a corrupt config.json is a clear error
// rather than an out-of-memory abort while those lists are built.
const MAX_LAYERS = 4096;
const MAX_EXPERTS = 65536;

function num(cfg: Json, source: string, key: string, fallback: number, positive = true): number {
  const v = cfg[key];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== 'number' || !Number.isFinite(v) || (positive && v <= 0))
    throw bad(source, `'${key}' must be a ${positive ? 'positive ' : ''}finite number, got ${JSON.stringify(v)}`);
  return v;
}

function bool(cfg: Json, source: string, key: string, fallback: boolean): boolean {
  const v = cfg[key];
  if (v === undefined || v === null) return fallback;
  if (typeof v !== 'boolean') throw bad(source, `'${key}' must be true or false, got ${JSON.stringify(v)}`);
  return v;
}

function ids(cfg: Json, source: string, key: string): number[] {
  const v = cfg[key];
  if (v === undefined || v === null) return [];
  const list = Array.isArray(v) ? v : [v];
  for (const id of list)
    if (typeof id !== 'number' || !Number.isSafeInteger(id) || id < 0)
      throw bad(source, `'${key}' must be a token id or a list of them, got ${JSON.stringify(v)}`);
  return list as number[];
}

/** Reads a parsed `config.json`; `source` names the file in errors. */
export function parseDecoderConfig(json: unknown, source = 'config.json'): DecoderConfig {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw bad(source, 'must hold a JSON object');
  const cfg = json as Json;
  const archs = cfg.architectures;
  const arch = Array.isArray(archs)
    ? archs.find((a) => (SUPPORTED_ARCHITECTURES as readonly unknown[]).includes(a))
    : undefined;
  if (arch === undefined)
    throw bad(
      source,
      `architectures ${JSON.stringify(archs ?? null)} names no supported model; fused-moe runs ${SUPPORTED_ARCHITECTURES.join(', ')}`,
    );
  const architecture = arch as Architecture;

  const hiddenSize = int(cfg, source, 'hidden_size', 1);
  const numLayers = int(cfg, source, 'num_hidden_layers', 1, undefined, MAX_LAYERS);
  const numHeads = int(cfg, source, 'num_attention_heads', 1);
  const numKvHeads = int(cfg, source, 'num_key_value_heads', 1, numHeads);
  if (numHeads % numKvHeads !== 0)
    throw bad(source, `num_attention_heads (${numHeads}) must be a multiple of num_key_value_heads (${numKvHeads})`);
  const headDim = int(cfg, source, 'head_dim', 2, hiddenSize % numHeads === 0 ? hiddenSize / numHeads : undefined);
  if (headDim % 2 !== 0) throw bad(source, `head_dim must be even for rotary embeddings, got ${headDim}`);

  let moe: MoeBlockConfig;
  let denseIntermediateSize = 0;
  let moeLayers: boolean[];
  switch (architecture) {
    case 'MixtralForCausalLM': {
      const numExperts = int(cfg, source, 'num_local_experts', 1, undefined, MAX_EXPERTS);
      moe = {
        numExperts,
        topK: int(cfg, source, 'num_experts_per_tok', 1),
        intermediateSize: int(cfg, source, 'intermediate_size', 1),
        routing: 'softmax-topk-renorm',
        sharedIntermediateSize: 0,
        sharedGate: false,
      };
      moeLayers = new Array<boolean>(numLayers).fill(true);
      break;
    }
    case 'OlmoeForCausalLM': {
      moe = {
        numExperts: int(cfg, source, 'num_experts', 1, undefined, MAX_EXPERTS),
        topK: int(cfg, source, 'num_experts_per_tok', 1),
        intermediateSize: int(cfg, source, 'intermediate_size', 1),
        routing: bool(cfg, source, 'norm_topk_prob', false) ? 'softmax-topk-renorm' : 'softmax-topk',
        sharedIntermediateSize: 0,
        sharedGate: false,
      };
      moeLayers = new Array<boolean>(numLayers).fill(true);
      break;
    }
    case 'Qwen3MoeForCausalLM':
    case 'Qwen2MoeForCausalLM': {
      const qwen2 = architecture === 'Qwen2MoeForCausalLM';
      const numExperts = int(cfg, source, 'num_experts', 0, undefined, MAX_EXPERTS);
      const shared = qwen2 ? int(cfg, source, 'shared_expert_intermediate_size', 0, 0) : 0;
      moe = {
        numExperts,
        topK: int(cfg, source, 'num_experts_per_tok', 1),
        intermediateSize: int(cfg, source, 'moe_intermediate_size', 1),
        routing: bool(cfg, source, 'norm_topk_prob', !qwen2) ? 'softmax-topk-renorm' : 'softmax-topk',
        sharedIntermediateSize: shared,
        sharedGate: shared > 0,
      };
      const step = int(cfg, source, 'decoder_sparse_step', 1, 1);
      const mlpOnly = cfg.mlp_only_layers ?? [];
      if (!Array.isArray(mlpOnly) || mlpOnly.some((i) => !Number.isInteger(i)))
        throw bad(source, `'mlp_only_layers' must be a list of layer indices, got ${JSON.stringify(mlpOnly)}`);
      moeLayers = Array.from(
        { length: numLayers },
        (_, i) => !(mlpOnly as number[]).includes(i) && numExperts > 0 && (i + 1) % step === 0,
      );
      if (moeLayers.some((m) => !m)) denseIntermediateSize = int(cfg, source, 'intermediate_size', 1);
      break;
    }
  }
  if (moeLayers.some((m) => m) && moe.topK > moe.numExperts)
    throw bad(source, `num_experts_per_tok (${moe.topK}) exceeds the number of experts (${moe.numExperts})`);

  // Qwen configs carry sliding_window even when use_sliding_window is false; Mixtral's may be null.
  const usesWindow = architecture.startsWith('Qwen') ? bool(cfg, source, 'use_sliding_window', false) : true;
  const slidingWindow = usesWindow ? int(cfg, source, 'sliding_window', 1, 0) : 0;
  const clip = cfg.clip_qkv;
  return {
    architecture,
    vocabSize: int(cfg, source, 'vocab_size', 1),
    hiddenSize,
    numLayers,
    numHeads,
    numKvHeads,
    headDim,
    ropeTheta: num(cfg, source, 'rope_theta', architecture === 'MixtralForCausalLM' ? 1e6 : 10000),
    // Each family's own default where its config.json is silent.
    rmsNormEps: num(cfg, source, 'rms_norm_eps', architecture.startsWith('Qwen') ? 1e-6 : 1e-5),
    slidingWindow,
    maxPositions: int(cfg, source, 'max_position_embeddings', 1, 4096),
    qkNorm:
      architecture === 'Qwen3MoeForCausalLM' ? 'head' : architecture === 'OlmoeForCausalLM' ? 'projection' : 'none',
    qkvBias: architecture === 'Qwen2MoeForCausalLM' || bool(cfg, source, 'attention_bias', false),
    clipQkv: clip === undefined || clip === null ? 0 : num(cfg, source, 'clip_qkv', 0),
    tieWordEmbeddings: bool(cfg, source, 'tie_word_embeddings', false),
    moe,
    denseIntermediateSize,
    moeLayers,
    eosTokenIds: ids(cfg, source, 'eos_token_id'),
    bosTokenId: ids(cfg, source, 'bos_token_id')[0] ?? null,
  };
}

/** The tensor names of a checkpoint of this config. */
export function tensorNames(cfg: DecoderConfig): ModelTensorNames {
  const mixtral = cfg.architecture === 'MixtralForCausalLM';
  return {
    embedding: 'model.embed_tokens.weight',
    finalNorm: 'model.norm.weight',
    lmHead: cfg.tieWordEmbeddings ? 'model.embed_tokens.weight' : 'lm_head.weight',
    layer(i: number): LayerTensorNames {
      const p = `model.layers.${i}`;
      const names: LayerTensorNames = {
        inputNorm: `${p}.input_layernorm.weight`,
        q: `${p}.self_attn.q_proj.weight`,
        k: `${p}.self_attn.k_proj.weight`,
        v: `${p}.self_attn.v_proj.weight`,
        o: `${p}.self_attn.o_proj.weight`,
        postAttentionNorm: `${p}.post_attention_layernorm.weight`,
      };
      if (cfg.qkvBias) {
        names.qBias = `${p}.self_attn.q_proj.bias`;
        names.kBias = `${p}.self_attn.k_proj.bias`;
        names.vBias = `${p}.self_attn.v_proj.bias`;
      }
      if (cfg.qkNorm !== 'none') {
        names.qNorm = `${p}.self_attn.q_norm.weight`;
        names.kNorm = `${p}.self_attn.k_norm.weight`;
      }
      if (!cfg.moeLayers[i]) {
        names.dense = {
          gate: `${p}.mlp.gate_proj.weight`,
          up: `${p}.mlp.up_proj.weight`,
          down: `${p}.mlp.down_proj.weight`,
        };
      } else if (mixtral) {
        const m = `${p}.block_sparse_moe`;
        names.router = `${m}.gate.weight`;
        names.expert = (e) => ({
          gate: `${m}.experts.${e}.w1.weight`,
          up: `${m}.experts.${e}.w3.weight`,
          down: `${m}.experts.${e}.w2.weight`,
        });
      } else {
        names.router = `${p}.mlp.gate.weight`;
        names.expert = (e) => ({
          gate: `${p}.mlp.experts.${e}.gate_proj.weight`,
          up: `${p}.mlp.experts.${e}.up_proj.weight`,
          down: `${p}.mlp.experts.${e}.down_proj.weight`,
        });
        if (cfg.moe.sharedIntermediateSize > 0)
          names.shared = {
            gate: `${p}.mlp.shared_expert.gate_proj.weight`,
            up: `${p}.mlp.shared_expert.up_proj.weight`,
            down: `${p}.mlp.shared_expert.down_proj.weight`,
            sharedGate: cfg.moe.sharedGate ? `${p}.mlp.shared_expert_gate.weight` : undefined,
          };
      }
      return names;
    },
  };
}

/** The shape each named tensor must have; the loader checks every tensor against it. */
export function expectedShapes(cfg: DecoderConfig, i: number): Map<string, number[]> {
  const n = tensorNames(cfg).layer(i);
  const { hiddenSize: H, numHeads, numKvHeads, headDim: D } = cfg;
  const shapes = new Map<string, number[]>([
    [n.inputNorm, [H]],
    [n.q, [numHeads * D, H]],
    [n.k, [numKvHeads * D, H]],
    [n.v, [numKvHeads * D, H]],
    [n.o, [H, numHeads * D]],
    [n.postAttentionNorm, [H]],
  ]);
  if (n.qBias) shapes.set(n.qBias, [numHeads * D]);
  if (n.kBias) shapes.set(n.kBias, [numKvHeads * D]);
  if (n.vBias) shapes.set(n.vBias, [numKvHeads * D]);
  if (n.qNorm && n.kNorm) {
    shapes.set(n.qNorm, cfg.qkNorm === 'head' ? [D] : [numHeads * D]);
    shapes.set(n.kNorm, cfg.qkNorm === 'head' ? [D] : [numKvHeads * D]);
  }
  if (n.dense) {
    const F = cfg.denseIntermediateSize;
    shapes.set(n.dense.gate, [F, H]).set(n.dense.up, [F, H]).set(n.dense.down, [H, F]);
  }
  if (n.router && n.expert) {
    const { numExperts: E, intermediateSize: F } = cfg.moe;
    shapes.set(n.router, [E, H]);
    for (let e = 0; e < E; e++) {
      const x = n.expert(e);
      shapes.set(x.gate, [F, H]).set(x.up, [F, H]).set(x.down, [H, F]);
    }
  }
  if (n.shared) {
    const F = cfg.moe.sharedIntermediateSize;
    shapes.set(n.shared.gate, [F, H]).set(n.shared.up, [F, H]).set(n.shared.down, [H, F]);
    if (n.shared.sharedGate) shapes.set(n.shared.sharedGate, [1, H]);
  }
  return shapes;
}

/**
 * Time of one attention multiply-add (float32, SIMD) over one projection multiply-add in a prompt, by
 * the model's `quantize` option: bf16 projections run on the bf16 dot product, int8 and int4 ones on
 * integer dot products, all faster per multiply-add than attention. Fitted to `bench:generate`'s
 * deep-chunk line (a 256-token chunk after 1,744 tokens against one at the start; `bench/RESULTS.md`,
 * eighth run: bf16 3.7, int8 4.9, int4 4.3, and int4 5.5 in the seventh), rounded up where one run
 * alone stands: too high a cost only makes the chunks shorter, too low one delays the running streams.
 * 'none' also covers float32 and fp16 weights, whose projections cost attention's rate or less. Since
 * attention takes spans of cache blocks (twenty-first run) the fits are lower (bf16 1.9-2.8, int8 3.3,
 * int4 3.6-3.9), but int4 at 4 let the running streams' p99 rise pass one chunk: the margin stays.
 */
export const ATTENTION_MAC_COST: Readonly<Record<string, number>> = { none: 4, int8: 5, int4: 5.5 };

/**
 * The CPU time of attending one earlier position, as a fraction of a token's weight work (the q, k, v
 * and o projections and the MLP of every layer; not the LM head, which a prompt token skips), for the
 * model's `quantize` option. The generation steps budget their tokens with it (`bench:generate` prints
 * the ratio this predicts for a chunk deep into a prompt beside the measured one).
 */
export function positionCost(cfg: DecoderConfig, quantize = 'none'): number {
  const H = cfg.hiddenSize;
  const qo = 2 * H * cfg.numHeads * cfg.headDim,
    kv = 2 * H * cfg.numKvHeads * cfg.headDim;
  const moe = cfg.moe;
  let weights = 0;
  for (const isMoe of cfg.moeLayers)
    weights +=
      qo +
      kv +
      (isMoe
        ? moe.topK * 3 * H * moe.intermediateSize + 3 * H * moe.sharedIntermediateSize + moe.numExperts * H
        : 3 * H * cfg.denseIntermediateSize);
  const perPosition = cfg.numLayers * 2 * cfg.numHeads * cfg.headDim; // q.k and p.v, every head
  return ((ATTENTION_MAC_COST[quantize] ?? ATTENTION_MAC_COST.none) * perPosition) / weights;
}
