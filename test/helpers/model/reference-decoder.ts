/**
 * A float64 reference of a whole MoE decoder, read from a Hugging Face folder (config.json and
 * safetensors): token embedding, RMSNorm, rotary embeddings in Hugging Face's half-split layout,
 * grouped-query attention with a causal mask (and a sliding window when configured), the MoE block
 * of each family, the final norm and the LM head. Written from the models' definitions, sharing no
 * code with the package; slow and plain on purpose.
 */
import * as fs from 'fs';
import * as path from 'path';
import { referenceMoe, RefLayer } from '../reference';
import { Float64Tensor, readCheckpoint } from './safetensors-read';

export interface DecoderSpec {
  architecture: string;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  numKvHeads: number;
  headDim: number;
  vocabSize: number;
  numExperts: number;
  topK: number;
  /** Renormalise the top-k routing weights to sum to one. */
  normTopK: boolean;
  /** RMSNorm of queries and keys before RoPE: none, per head (Qwen3-MoE) or over the whole projection (OLMoE). */
  qkNorm: 'none' | 'per-head' | 'whole';
  qkvBias: boolean;
  /** A shared expert with a sigmoid gate beside the routed ones (Qwen2-MoE). */
  sharedExpert: boolean;
  ropeTheta: number;
  rmsNormEps: number;
  /** A query sees keys at most this many positions back, itself included; 0 for none. */
  slidingWindow: number;
  tieWordEmbeddings: boolean;
  /** Prefix of a layer's MoE tensors, e.g. `model.layers.0.block_sparse_moe`. */
  moePrefix(layer: number): string;
  /** Names of one expert's gate, up and down projections under the MoE prefix. */
  expertNames: { gate: string; up: string; down: string };
}

type Config = Record<string, unknown>;

function int(config: Config, key: string, fallback?: number): number {
  const v = config[key] ?? fallback;
  if (typeof v !== 'number' || !Number.isInteger(v) || v <= 0)
    throw new Error(`config.json: ${key} must be a positive integer, got ${JSON.stringify(v)}`);
  return v;
}

function num(config: Config, key: string, fallback: number): number {
  const v = config[key] ?? fallback;
  if (typeof v !== 'number' || !(v > 0))
    throw new Error(`config.json: ${key} must be a positive number, got ${JSON.stringify(v)}`);
  return v;
}

function bool(config: Config, key: string, fallback: boolean): boolean {
  const v = config[key] ?? fallback;
  if (typeof v !== 'boolean') throw new Error(`config.json: ${key} must be a boolean, got ${JSON.stringify(v)}`);
  return v;
}

/** The decoder a Hugging Face config describes, with each configuration class's defaults. */
export function decoderSpec(config: Config): DecoderSpec {
  const architecture = (config.architectures as string[] | undefined)?.[0] ?? '';
  const H = int(config, 'hidden_size');
  const heads = int(config, 'num_attention_heads');
  const base = {
    architecture,
    hiddenSize: H,
    numLayers: int(config, 'num_hidden_layers'),
    numHeads: heads,
    numKvHeads: int(config, 'num_key_value_heads', heads),
    headDim: int(config, 'head_dim', H / heads),
    vocabSize: int(config, 'vocab_size'),
    topK: int(config, 'num_experts_per_tok'),
    ropeTheta: num(config, 'rope_theta', 10000),
    rmsNormEps: num(config, 'rms_norm_eps', 1e-6),
    tieWordEmbeddings: bool(config, 'tie_word_embeddings', false),
  };
  const qwenMlp = {
    moePrefix: (l: number) => `model.layers.${l}.mlp`,
    expertNames: { gate: 'gate_proj', up: 'up_proj', down: 'down_proj' },
  };
  const onlySparse = () => {
    if ((config.decoder_sparse_step ?? 1) !== 1 || ((config.mlp_only_layers as unknown[] | undefined) ?? []).length) {
      throw new Error(
        'config.json: dense MLP layers (decoder_sparse_step, mlp_only_layers) are not modelled by this reference',
      );
    }
  };
  if (config.rope_scaling != null) throw new Error('config.json: rope_scaling is not modelled by this reference');
  switch (architecture) {
    case 'MixtralForCausalLM':
      return {
        ...base,
        numExperts: int(config, 'num_local_experts'),
        normTopK: true,
        qkNorm: 'none',
        qkvBias: false,
        sharedExpert: false,
        slidingWindow: config.sliding_window == null ? 0 : int(config, 'sliding_window'),
        moePrefix: (l) => `model.layers.${l}.block_sparse_moe`,
        expertNames: { gate: 'w1', up: 'w3', down: 'w2' },
      };
    case 'Qwen3MoeForCausalLM':
      onlySparse();
      return {
        ...base,
        numExperts: int(config, 'num_experts'),
        normTopK: bool(config, 'norm_topk_prob', false),
        qkNorm: 'per-head',
        qkvBias: bool(config, 'attention_bias', false),
        sharedExpert: false,
        slidingWindow: bool(config, 'use_sliding_window', false) ? int(config, 'sliding_window') : 0,
        ...qwenMlp,
      };
    case 'OlmoeForCausalLM':
      if (config.clip_qkv != null) throw new Error('config.json: clip_qkv is not modelled by this reference');
      return {
        ...base,
        numExperts: int(config, 'num_experts'),
        normTopK: bool(config, 'norm_topk_prob', false),
        qkNorm: 'whole',
        qkvBias: bool(config, 'attention_bias', false),
        sharedExpert: false,
        slidingWindow: 0,
        ...qwenMlp,
      };
    case 'Qwen2MoeForCausalLM':
      onlySparse();
      // Qwen2-MoE slides its window only on some layers; no test model here uses it.
      if (bool(config, 'use_sliding_window', false))
        throw new Error('config.json: use_sliding_window is not modelled for Qwen2-MoE');
      return {
        ...base,
        numExperts: int(config, 'num_experts'),
        normTopK: bool(config, 'norm_topk_prob', false),
        qkNorm: 'none',
        qkvBias: true,
        sharedExpert: int(config, 'shared_expert_intermediate_size', 0) > 0,
        slidingWindow: 0,
        ...qwenMlp,
      };
    default:
      throw new Error(
        `config.json: architecture ${JSON.stringify(architecture)} is not one of MixtralForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM, Qwen2MoeForCausalLM`,
      );
  }
}

/** W [rows, cols] times x [cols] (+ b), in float64. */
function matvec(
  W: ArrayLike<number>,
  rows: number,
  cols: number,
  x: ArrayLike<number>,
  bias?: Float64Array,
): Float64Array {
  const y = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    let s = bias ? bias[r] : 0;
    const o = r * cols;
    for (let c = 0; c < cols; c++) s += W[o + c] * x[c];
    y[r] = s;
  }
  return y;
}

/** RMSNorm of x[offset .. offset + n) in place: x * w / sqrt(mean(x^2) + eps). */
function rmsNorm(x: Float64Array, w: Float64Array, eps: number, offset = 0, n = w.length): void {
  let ss = 0;
  for (let i = 0; i < n; i++) ss += x[offset + i] ** 2;
  const inv = 1 / Math.sqrt(ss / n + eps);
  for (let i = 0; i < n; i++) x[offset + i] = x[offset + i] * inv * w[i];
}

/** Hugging Face RoPE: dimension i of a head turns with dimension i + D/2 by pos * theta^(-2i/D). */
function rope(x: Float64Array, heads: number, D: number, pos: number, theta: number): void {
  const half = D / 2;
  for (let h = 0; h < heads; h++) {
    const o = h * D;
    for (let i = 0; i < half; i++) {
      const angle = pos * Math.pow(theta, (-2 * i) / D);
      const c = Math.cos(angle),
        s = Math.sin(angle);
      const a = x[o + i],
        b = x[o + i + half];
      x[o + i] = a * c - b * s;
      x[o + i + half] = b * c + a * s;
    }
  }
}

interface LayerWeights {
  inputNorm: Float64Array;
  postNorm: Float64Array;
  q: Float64Array;
  k: Float64Array;
  v: Float64Array;
  o: Float64Array;
  qBias?: Float64Array;
  kBias?: Float64Array;
  vBias?: Float64Array;
  qNorm?: Float64Array;
  kNorm?: Float64Array;
  moe: RefLayer;
  shared?: { gate: Float64Array; up: Float64Array; down: Float64Array; ffn: number; gateWeight: Float64Array };
}

export interface ForwardResult {
  /** [tokens * vocab] logits in float64. */
  logits: Float64Array;
  /**
   * Per token, the smallest gap over layers between the k-th and (k+1)-th router logits: how far the
   * expert choice is from a tie that float32 rounding could flip.
   */
  routerGap: Float64Array;
}

/** The float64 reference decoder, with a KV cache so that generation costs one token per step. */
export class ReferenceDecoder {
  readonly spec: DecoderSpec;
  private readonly embed: Float64Array;
  private readonly finalNorm: Float64Array;
  private readonly lmHead: Float64Array;
  private readonly layers: LayerWeights[] = [];
  private keys: Float64Array[][] = [];
  private values: Float64Array[][] = [];

  constructor(config: Config, tensors: Map<string, Float64Tensor>) {
    const s = (this.spec = decoderSpec(config));
    const { hiddenSize: H, headDim: D, numHeads: NH, numKvHeads: NKV, numExperts: E, vocabSize: V } = s;
    const get = (name: string, shape: number[]): Float64Array => {
      const t = tensors.get(name);
      if (!t) throw new Error(`checkpoint: missing tensor ${name}`);
      if (t.shape.join() !== shape.join())
        throw new Error(`checkpoint: ${name} has shape [${t.shape}], expected [${shape}]`);
      return t.values;
    };
    this.embed = get('model.embed_tokens.weight', [V, H]);
    this.finalNorm = get('model.norm.weight', [H]);
    this.lmHead = s.tieWordEmbeddings ? this.embed : get('lm_head.weight', [V, H]);
    for (let l = 0; l < s.numLayers; l++) {
      const p = `model.layers.${l}`;
      const a = `${p}.self_attn`;
      const moe = s.moePrefix(l);
      const gate = get(`${moe}.gate.weight`, [E, H]);
      const F = tensors.get(`${moe}.experts.0.${s.expertNames.gate}.weight`)?.shape[0] ?? 0;
      const stack = (which: 'gate' | 'up' | 'down') => {
        const shape = which === 'down' ? [H, F] : [F, H];
        const out = new Float64Array(E * F * H);
        for (let e = 0; e < E; e++)
          out.set(get(`${moe}.experts.${e}.${s.expertNames[which]}.weight`, shape), e * F * H);
        return out;
      };
      const layer: LayerWeights = {
        inputNorm: get(`${p}.input_layernorm.weight`, [H]),
        postNorm: get(`${p}.post_attention_layernorm.weight`, [H]),
        q: get(`${a}.q_proj.weight`, [NH * D, H]),
        k: get(`${a}.k_proj.weight`, [NKV * D, H]),
        v: get(`${a}.v_proj.weight`, [NKV * D, H]),
        o: get(`${a}.o_proj.weight`, [H, NH * D]),
        moe: { H, F, E, k: s.topK, renorm: s.normTopK, gate, w1: stack('gate'), w3: stack('up'), w2: stack('down') },
      };
      if (s.qkvBias) {
        layer.qBias = get(`${a}.q_proj.bias`, [NH * D]);
        layer.kBias = get(`${a}.k_proj.bias`, [NKV * D]);
        layer.vBias = get(`${a}.v_proj.bias`, [NKV * D]);
      }
      if (s.qkNorm !== 'none') {
        layer.qNorm = get(`${a}.q_norm.weight`, [s.qkNorm === 'per-head' ? D : NH * D]);
        layer.kNorm = get(`${a}.k_norm.weight`, [s.qkNorm === 'per-head' ? D : NKV * D]);
      }
      if (s.sharedExpert) {
        const FS = int(config, 'shared_expert_intermediate_size');
        const q = `${moe}.shared_expert`;
        layer.shared = {
          ffn: FS,
          gate: get(`${q}.gate_proj.weight`, [FS, H]),
          up: get(`${q}.up_proj.weight`, [FS, H]),
          down: get(`${q}.down_proj.weight`, [H, FS]),
          gateWeight: get(`${moe}.shared_expert_gate.weight`, [1, H]),
        };
      }
      this.layers.push(layer);
    }
    this.reset();
  }

  /** Loads config.json and the safetensors of a Hugging Face folder. */
  static load(dir: string): ReferenceDecoder {
    const config = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8')) as Config;
    return new ReferenceDecoder(config, readCheckpoint(dir));
  }

  /** Forgets every cached position: the next forward starts a fresh sequence at position 0. */
  reset(): void {
    this.keys = this.layers.map(() => []);
    this.values = this.layers.map(() => []);
  }

  /** Number of positions in the cache. */
  get length(): number {
    return this.keys[0]?.length ?? 0;
  }

  /** Runs `tokens` at the next positions of the sequence and returns their logits. */
  forward(tokens: readonly number[]): ForwardResult {
    const s = this.spec;
    const { hiddenSize: H, vocabSize: V } = s;
    const T = tokens.length;
    const x = new Float64Array(T * H);
    tokens.forEach((tok, t) => {
      if (!Number.isInteger(tok) || tok < 0 || tok >= V)
        throw new RangeError(`token ${tok} at index ${t} is outside [0, ${V})`);
      x.set(this.embed.subarray(tok * H, (tok + 1) * H), t * H);
    });
    const routerGap = new Float64Array(T).fill(Infinity);
    const start = this.length;
    this.layers.forEach((layer, l) => {
      for (let t = 0; t < T; t++) {
        const xn = x.slice(t * H, (t + 1) * H);
        rmsNorm(xn, layer.inputNorm, s.rmsNormEps);
        const attn = this.attend(l, layer, xn, start + t);
        for (let i = 0; i < H; i++) x[t * H + i] += attn[i];
      }
      const xn = new Float64Array(T * H);
      for (let t = 0; t < T; t++) {
        xn.set(x.subarray(t * H, (t + 1) * H), t * H);
        rmsNorm(xn, layer.postNorm, s.rmsNormEps, t * H, H);
        routerGap[t] = Math.min(routerGap[t], this.routerGap(layer.moe, xn.subarray(t * H, (t + 1) * H)));
      }
      const moe = referenceMoe(layer.moe, xn, T);
      for (let i = 0; i < T * H; i++) x[i] += moe[i];
      if (layer.shared) {
        for (let t = 0; t < T; t++) {
          const out = sharedExpert(layer.shared, xn.subarray(t * H, (t + 1) * H), H);
          for (let i = 0; i < H; i++) x[t * H + i] += out[i];
        }
      }
    });
    const logits = new Float64Array(T * V);
    for (let t = 0; t < T; t++) {
      const xn = x.slice(t * H, (t + 1) * H);
      rmsNorm(xn, this.finalNorm, s.rmsNormEps);
      logits.set(matvec(this.lmHead, V, H, xn), t * V);
    }
    return { logits, routerGap };
  }

  /** One token's attention output (after o_proj) at position `pos`; appends its key and value to the cache. */
  private attend(l: number, layer: LayerWeights, xn: Float64Array, pos: number): Float64Array {
    const s = this.spec;
    const { hiddenSize: H, headDim: D, numHeads: NH, numKvHeads: NKV } = s;
    const q = matvec(layer.q, NH * D, H, xn, layer.qBias);
    const k = matvec(layer.k, NKV * D, H, xn, layer.kBias);
    const v = matvec(layer.v, NKV * D, H, xn, layer.vBias);
    if (s.qkNorm === 'per-head') {
      for (let h = 0; h < NH; h++) rmsNorm(q, layer.qNorm!, s.rmsNormEps, h * D, D);
      for (let h = 0; h < NKV; h++) rmsNorm(k, layer.kNorm!, s.rmsNormEps, h * D, D);
    } else if (s.qkNorm === 'whole') {
      rmsNorm(q, layer.qNorm!, s.rmsNormEps);
      rmsNorm(k, layer.kNorm!, s.rmsNormEps);
    }
    rope(q, NH, D, pos, s.ropeTheta);
    rope(k, NKV, D, pos, s.ropeTheta);
    const keys = this.keys[l],
      values = this.values[l];
    if (keys.length !== pos) throw new Error(`internal: cache holds ${keys.length} positions at position ${pos}`);
    keys.push(k);
    values.push(v);
    const first = s.slidingWindow > 0 ? Math.max(0, pos - s.slidingWindow + 1) : 0;
    const out = new Float64Array(NH * D);
    const scale = 1 / Math.sqrt(D);
    const group = NH / NKV;
    const scores = new Float64Array(pos + 1);
    for (let h = 0; h < NH; h++) {
      const kvh = Math.floor(h / group);
      let max = -Infinity;
      for (let j = first; j <= pos; j++) {
        let dot = 0;
        for (let d = 0; d < D; d++) dot += q[h * D + d] * keys[j][kvh * D + d];
        scores[j] = dot * scale;
        max = Math.max(max, scores[j]);
      }
      let sum = 0;
      for (let j = first; j <= pos; j++) sum += scores[j] = Math.exp(scores[j] - max);
      for (let j = first; j <= pos; j++) {
        const w = scores[j] / sum;
        for (let d = 0; d < D; d++) out[h * D + d] += w * values[j][kvh * D + d];
      }
    }
    return matvec(layer.o, H, NH * D, out);
  }

  private routerGap(moe: RefLayer, xn: Float64Array): number {
    const logits = matvec(moe.gate, moe.E, moe.H, xn);
    const sorted = Array.from(logits).sort((a, b) => b - a);
    return moe.k < moe.E ? sorted[moe.k - 1] - sorted[moe.k] : Infinity;
  }
}

function sharedExpert(w: NonNullable<LayerWeights['shared']>, x: Float64Array, H: number): Float64Array {
  const g = matvec(w.gate, w.ffn, H, x);
  const u = matvec(w.up, w.ffn, H, x);
  for (let f = 0; f < w.ffn; f++) g[f] = (g[f] / (1 + Math.exp(-g[f]))) * u[f];
  const out = matvec(w.down, H, w.ffn, g);
  let z = 0;
  for (let i = 0; i < H; i++) z += w.gateWeight[i] * x[i];
  const sig = 1 / (1 + Math.exp(-z));
  for (let i = 0; i < H; i++) out[i] *= sig;
  return out;
}

/** Index of the largest value of row `t` of a [rows, n] array; also the gap to the runner-up. */
export function argmaxRow(a: ArrayLike<number>, t: number, n: number): { index: number; gap: number } {
  let best = -Infinity,
    second = -Infinity,
    index = -1;
  for (let i = 0; i < n; i++) {
    const v = a[t * n + i];
    if (v > best) {
      second = best;
      best = v;
      index = i;
    } else if (v > second) second = v;
  }
  return { index, gap: best - second };
}

export interface GreedyRun {
  /** Logits of every prompt position, then of each generated token fed back: [(prompt + steps - 1) * vocab]. */
  logits: Float64Array;
  /** The generated tokens, argmax step by step. */
  tokens: number[];
  /** Smallest router gap over every token run through the model. */
  minRouterGap: number;
  /** Smallest gap between the best and second-best logit over the greedy steps. */
  minTop2Gap: number;
}

/** Runs the prompt, then `steps` greedy tokens (each fed back), on a fresh sequence. */
export function greedyRun(model: ReferenceDecoder, prompt: readonly number[], steps: number): GreedyRun {
  const V = model.spec.vocabSize;
  model.reset();
  const first = model.forward(prompt);
  const logits = new Float64Array((prompt.length + steps - 1) * V);
  logits.set(first.logits);
  let minRouterGap = Math.min(...first.routerGap);
  let minTop2Gap = Infinity;
  const tokens: number[] = [];
  let last = { logits: first.logits, row: prompt.length - 1 };
  for (let i = 0; i < steps; i++) {
    const { index, gap } = argmaxRow(last.logits, last.row, V);
    minTop2Gap = Math.min(minTop2Gap, gap);
    tokens.push(index);
    if (i === steps - 1) break;
    const next = model.forward([index]);
    logits.set(next.logits, (prompt.length + i) * V);
    minRouterGap = Math.min(minRouterGap, next.routerGap[0]);
    last = { logits: next.logits, row: 0 };
  }
  return { logits, tokens, minRouterGap, minTop2Gap };
}
