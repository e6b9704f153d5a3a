/** Hugging Face conventions: the fields of config.json and the tensor names of a Mixtral MoE block. */
import * as path from 'path';
import { checkpointError } from '../errors';
import { describe, isRecord } from '../validate';
import { isFile, readJson } from './resolve';

/** The config.json fields read, each checked; undefined where the file does not give it. */
export interface HfConfig {
  hiddenSize?: number;
  intermediateSize?: number;
  numExperts?: number;
  topK?: number;
  numLayers?: number;
  normTopkProb?: boolean;
}

/** The checkpoint folder's config.json, checked; undefined when the folder has none. */
export async function readHfConfig(dir: string): Promise<{ file: string; config: HfConfig } | undefined> {
  const file = path.join(dir, 'config.json');
  if (!(await isFile(file))) return undefined;
  const json = await readJson(file, 'model config');
  if (!isRecord(json)) throw checkpointError(file, 'config.json is not a JSON object');
  const int = (key: string): number | undefined => {
    const v = json[key];
    if (v === undefined || v === null) return undefined;
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1)
      throw checkpointError(file, `${key} must be an integer >= 1, got ${describe(v)}`);
    return v;
  };
  const norm = json.norm_topk_prob;
  if (norm !== undefined && norm !== null && typeof norm !== 'boolean')
    throw checkpointError(file, `norm_topk_prob must be a boolean, got ${describe(norm)}`);
  return {
    file,
    config: {
      hiddenSize: int('hidden_size'),
      intermediateSize: int('intermediate_size'),
      numExperts: int('num_local_experts'),
      topK: int('num_experts_per_tok'),
      numLayers: int('num_hidden_layers'),
      normTopkProb: typeof norm === 'boolean' ? norm : undefined,
    },
  };
}

/** Where a Mixtral checkpoint keeps the MoE block of decoder layer `layer`. */
export function moeBlockPrefix(layer: number): string {
  return `model.layers.${layer}.block_sparse_moe`;
}

/** The router weight of the MoE block under `prefix`: [experts, hidden]. */
export function moeGateName(prefix: string): string {
  return `${prefix}.gate.weight`;
}

/** One projection of every expert of the MoE block under `prefix`: w1 (gate), w3 (up), w2 (down). */
export function moeExpertNames(prefix: string, numExperts: number, projection: 'w1' | 'w3' | 'w2'): string[] {
  return Array.from({ length: numExperts }, (_, e) => `${prefix}.experts.${e}.${projection}.weight`);
}
