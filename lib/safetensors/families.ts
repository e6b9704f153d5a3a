/**
 * Where each MoE family keeps one decoder layer's MoE block, and how its config.json maps to the
 * MoeLayer fields: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2 and DeepSeek-V3 (README,
 * "MoE families"). A checkpoint without config.json, or of another architecture, is read as Mixtral.
 */
import { argRangeError, checkpointError } from '../errors';
import type { ExpertGroups, Routing } from '../layer';
import { describe, isRecord } from '../validate';
import { moeBlockPrefix, moeExpertNames, moeGateName } from './hf';

export type Family = 'mixtral' | 'qwen2-moe' | 'qwen3-moe' | 'olmoe' | 'deepseek-v2' | 'deepseek-v3';

const ARCHITECTURES: Record<string, Family> = {
  MixtralForCausalLM: 'mixtral',
  Qwen2MoeForCausalLM: 'qwen2-moe',
  Qwen3MoeForCausalLM: 'qwen3-moe',
  OlmoeForCausalLM: 'olmoe',
  DeepseekV2ForCausalLM: 'deepseek-v2',
  DeepseekV3ForCausalLM: 'deepseek-v3',
};

/** One MoE block: its tensor names and the config fields the checkpoint fixes. */
export interface BlockLayout {
  family: Family;
  gate: string;
  experts(projection: 'w1' | 'w3' | 'w2', numExperts: number): string[];
  /** [E] choice bias (DeepSeek-V3). */
  scoreBias?: string;
  /** The shared expert's w1, w3, w2 and (Qwen2-MoE) its [1, H] gate. */
  shared?: { w1: string; w3: string; w2: string; gate?: string };
  numExperts?: number;
  intermediateSize?: number;
  routing: Routing;
  routedScale: number;
  expertGroups: ExpertGroups | null;
  sharedIntermediateSize: number;
  sharedGate: boolean;
}

/** The family config.json names (architectures[0]); Mixtral when it names none this package knows. */
export function familyOf(json: Record<string, unknown>): Family {
  const arch = Array.isArray(json.architectures) ? json.architectures[0] : undefined;
  return (typeof arch === 'string' && ARCHITECTURES[arch]) || 'mixtral';
}

/**
 * The block of decoder layer `layer` (or under `prefix`) as config.json describes it. A layer the
 * checkpoint keeps dense is a RangeError naming it: it has no router.
 */
export function blockLayout(
  json: Record<string, unknown>,
  file: string,
  layer: number | undefined,
  prefix: string | undefined,
): BlockLayout {
  const family = familyOf(json);
  const int = (key: string, fallback?: number, min = 1): number | undefined => {
    const v = json[key];
    if (v === undefined || v === null) return fallback;
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min)
      throw checkpointError(file, `${key} must be an integer >= ${min}, got ${describe(v)}`);
    return v;
  };
  const bool = (key: string, fallback: boolean): boolean => {
    const v = json[key];
    if (v === undefined || v === null) return fallback;
    if (typeof v !== 'boolean') throw checkpointError(file, `${key} must be a boolean, got ${describe(v)}`);
    return v;
  };
  const num = (key: string, fallback: number): number => {
    const v = json[key];
    if (v === undefined || v === null) return fallback;
    if (typeof v !== 'number' || !(Number.isFinite(v) && v > 0))
      throw checkpointError(file, `${key} must be a number > 0, got ${describe(v)}`);
    return v;
  };
  const dense = (why: string) =>
    argRangeError(
      `options.layer ${layer} is a dense MLP in ${file} (${why}), not an MoE block; ` +
        'its gate_proj/up_proj/down_proj can run as a one-expert MoeLayer',
    );

  if (family === 'mixtral') {
    const p = prefix ?? moeBlockPrefix(layer as number);
    return {
      family,
      gate: moeGateName(p),
      experts: (projection, E) => moeExpertNames(p, E, projection),
      numExperts: int('num_local_experts'),
      intermediateSize: int('intermediate_size'),
      routing: bool('norm_topk_prob', true) ? 'softmax-topk-renorm' : 'softmax-topk',
      routedScale: 1,
      expertGroups: null,
      sharedIntermediateSize: 0,
      sharedGate: false,
    };
  }

  // Every other family: model.layers.{l}.mlp with gate_proj/up_proj/down_proj experts.
  const p = prefix ?? `model.layers.${layer}.mlp`;
  const common = {
    family,
    gate: `${p}.gate.weight`,
    experts: (projection: 'w1' | 'w3' | 'w2', E: number) => {
      const name = { w1: 'gate_proj', w3: 'up_proj', w2: 'down_proj' }[projection];
      return Array.from({ length: E }, (_, e) => `${p}.experts.${e}.${name}.weight`);
    },
  };
  const sharedNames = (dir: string, gate?: string) => ({
    w1: `${p}.${dir}.gate_proj.weight`,
    w3: `${p}.${dir}.up_proj.weight`,
    w2: `${p}.${dir}.down_proj.weight`,
    ...(gate ? { gate } : {}),
  });

  if (family === 'olmoe')
    return {
      ...common,
      numExperts: int('num_experts'),
      intermediateSize: int('intermediate_size'),
      routing: bool('norm_topk_prob', false) ? 'softmax-topk-renorm' : 'softmax-topk',
      routedScale: 1,
      expertGroups: null,
      sharedIntermediateSize: 0,
      sharedGate: false,
    };

  if (family === 'qwen2-moe' || family === 'qwen3-moe') {
    const qwen2 = family === 'qwen2-moe';
    if (layer !== undefined && prefix === undefined) {
      const step = int('decoder_sparse_step', 1) as number;
      const mlpOnly = json.mlp_only_layers ?? [];
      if (!Array.isArray(mlpOnly) || mlpOnly.some((i) => !Number.isInteger(i)))
        throw checkpointError(file, `mlp_only_layers must be a list of layer indices, got ${describe(mlpOnly)}`);
      if ((mlpOnly as number[]).includes(layer)) throw dense('mlp_only_layers');
      if ((layer + 1) % step !== 0) throw dense(`decoder_sparse_step ${step}`);
    }
    const Fs = qwen2 ? (int('shared_expert_intermediate_size', 0, 0) as number) : 0;
    return {
      ...common,
      numExperts: int('num_experts'),
      intermediateSize: int('moe_intermediate_size'),
      routing: bool('norm_topk_prob', !qwen2) ? 'softmax-topk-renorm' : 'softmax-topk',
      routedScale: 1,
      expertGroups: null,
      sharedIntermediateSize: Fs,
      sharedGate: Fs > 0,
      ...(Fs > 0 ? { shared: sharedNames('shared_expert', `${p}.shared_expert_gate.weight`) } : {}),
    };
  }

  // DeepSeek-V2 and V3.
  const v3 = family === 'deepseek-v3';
  if (layer !== undefined && prefix === undefined) {
    const firstDense = int('first_k_dense_replace', 0, 0) as number;
    const freq = int('moe_layer_freq', 1) as number;
    if (layer < firstDense) throw dense(`first_k_dense_replace ${firstDense}`);
    if (layer % freq !== 0) throw dense(`moe_layer_freq ${freq}`);
  }
  const F = int('moe_intermediate_size');
  const nShared = int('n_shared_experts', 0, 0) as number;
  const scoring = json.scoring_func ?? (v3 ? 'sigmoid' : 'softmax');
  if (scoring !== 'softmax' && scoring !== 'sigmoid')
    throw checkpointError(file, `scoring_func must be 'softmax' or 'sigmoid', got ${describe(scoring)}`);
  // DeepSeek-V2's own config class spells the plain top-k 'gready'.
  const spelled = json.topk_method ?? (v3 ? 'noaux_tc' : 'greedy');
  const method = spelled === 'gready' ? 'greedy' : spelled;
  if (method !== 'greedy' && method !== 'group_limited_greedy' && method !== 'noaux_tc')
    throw checkpointError(
      file,
      `topk_method must be 'greedy', 'group_limited_greedy' or 'noaux_tc', got ${describe(method)}`,
    );
  const topK = int('num_experts_per_tok') ?? 1;
  const norm = bool('norm_topk_prob', false);
  const factor = num('routed_scaling_factor', 1);
  const expertGroups: ExpertGroups | null =
    method === 'greedy'
      ? null
      : {
          count: int('n_group', 1) as number,
          topK: int('topk_group', 1) as number,
          score: method === 'noaux_tc' ? 'top2-sum' : 'max',
        };
  // V2 renormalises (k > 1 and norm_topk_prob) or scales, never both; V3 always scales.
  const renorm = v3 ? norm : norm && topK > 1;
  const routing: Routing =
    scoring === 'sigmoid'
      ? renorm
        ? 'sigmoid-topk-renorm'
        : 'sigmoid-topk'
      : renorm
        ? 'softmax-topk-renorm'
        : 'softmax-topk';
  return {
    ...common,
    numExperts: int('n_routed_experts'),
    intermediateSize: F,
    routing,
    routedScale: v3 || !renorm ? factor : 1,
    expertGroups,
    sharedIntermediateSize: F !== undefined ? nShared * F : 0,
    sharedGate: false,
    ...(method === 'noaux_tc' ? { scoreBias: `${p}.gate.e_score_correction_bias` } : {}),
    ...(nShared > 0 ? { shared: sharedNames('shared_experts') } : {}),
  };
}

/** config.json as a plain object, or an empty one when there is none. */
export function configObject(json: unknown, file: string): Record<string, unknown> {
  if (!isRecord(json)) throw checkpointError(file, 'config.json is not a JSON object');
  return json;
}
