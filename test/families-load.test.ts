/**
 * MoeLayer.fromSafetensors on a tiny checkpoint of each family, written in that family's own tensor
 * naming and config.json fields: the block it builds matches the float64 reference of the family's
 * routing and shared expert, and a layer the checkpoint keeps dense is refused by name.
 */
import * as fs from 'fs';
import * as path from 'path';
import { MoeLayer } from '../lib/layer';
import { makeTempDir, RawTensor, removeTempDir, StDtype, writeSafetensors } from './helpers/checkpoint';
import { FamilyCase, familyCases, familyForward, makeFamilyCase } from './helpers/families-reference';
import { relL2 } from './helpers/reference';
import { FLOAT32_TOL } from './helpers/tolerance';

let dir = '';
beforeAll(() => {
  dir = makeTempDir('families');
});
afterAll(() => removeTempDir(dir));

const raw = (a: Float32Array, shape: number[], dtype: StDtype = 'F32'): RawTensor => ({
  dtype,
  shape,
  data: new Uint8Array(a.buffer, a.byteOffset, a.byteLength),
});

/** config.json of each family, in its own field names; the MoE block sits at decoder layer 1. */
function configJson(c: FamilyCase): Record<string, unknown> {
  const common = { hidden_size: c.H, num_experts_per_tok: c.k, num_hidden_layers: 2 };
  switch (c.name) {
    case 'mixtral':
      return {
        architectures: ['MixtralForCausalLM'],
        ...common,
        intermediate_size: c.F,
        num_local_experts: c.E,
      };
    case 'qwen2-moe':
      return {
        architectures: ['Qwen2MoeForCausalLM'],
        ...common,
        intermediate_size: 99,
        moe_intermediate_size: c.F,
        num_experts: c.E,
        norm_topk_prob: false,
        shared_expert_intermediate_size: c.Fs,
        decoder_sparse_step: 1,
        mlp_only_layers: [0],
      };
    case 'qwen3-moe':
      return {
        architectures: ['Qwen3MoeForCausalLM'],
        ...common,
        intermediate_size: 99,
        moe_intermediate_size: c.F,
        num_experts: c.E,
        norm_topk_prob: true,
        decoder_sparse_step: 1,
        mlp_only_layers: [],
      };
    case 'olmoe':
      return { architectures: ['OlmoeForCausalLM'], ...common, intermediate_size: c.F, num_experts: c.E };
    case 'deepseek-v2':
      return {
        architectures: ['DeepseekV2ForCausalLM'],
        ...common,
        intermediate_size: 99,
        moe_intermediate_size: c.F,
        n_routed_experts: c.E,
        n_shared_experts: (c.Fs as number) / c.F,
        topk_method: 'group_limited_greedy',
        n_group: c.groups!.count,
        topk_group: c.groups!.topK,
        routed_scaling_factor: c.routedScale,
        norm_topk_prob: false,
        scoring_func: 'softmax',
        first_k_dense_replace: 1,
        moe_layer_freq: 1,
      };
    case 'deepseek-v3':
      return {
        architectures: ['DeepseekV3ForCausalLM'],
        ...common,
        intermediate_size: 99,
        moe_intermediate_size: c.F,
        n_routed_experts: c.E,
        n_shared_experts: (c.Fs as number) / c.F,
        topk_method: 'noaux_tc',
        n_group: c.groups!.count,
        topk_group: c.groups!.topK,
        routed_scaling_factor: c.routedScale,
        norm_topk_prob: true,
        scoring_func: 'sigmoid',
        first_k_dense_replace: 1,
      };
  }
  throw new Error(c.name);
}

/** The tensors of layer 1's block, as each family names them. */
function blockTensors(c: FamilyCase, w: ReturnType<typeof makeFamilyCase>['weights']): Map<string, RawTensor> {
  const { H, F, E } = c;
  const m = new Map<string, RawTensor>();
  const mixtral = c.name === 'mixtral';
  const p = mixtral ? 'model.layers.1.block_sparse_moe' : 'model.layers.1.mlp';
  const names = mixtral ? { w1: 'w1', w3: 'w3', w2: 'w2' } : { w1: 'gate_proj', w3: 'up_proj', w2: 'down_proj' };
  m.set(`${p}.gate.weight`, raw(w.gate, [E, H]));
  for (let e = 0; e < E; e++)
    for (const proj of ['w1', 'w3', 'w2'] as const) {
      const all = w[proj] as Float32Array;
      m.set(
        `${p}.experts.${e}.${names[proj]}.weight`,
        raw(all.subarray(e * F * H, (e + 1) * F * H), proj === 'w2' ? [H, F] : [F, H]),
      );
    }
  if (w.shared) {
    const dirName = c.name.startsWith('qwen') ? 'shared_expert' : 'shared_experts';
    const Fs = c.Fs as number;
    m.set(`${p}.${dirName}.gate_proj.weight`, raw(w.shared.w1 as Float32Array, [Fs, H]));
    m.set(`${p}.${dirName}.up_proj.weight`, raw(w.shared.w3 as Float32Array, [Fs, H]));
    m.set(`${p}.${dirName}.down_proj.weight`, raw(w.shared.w2 as Float32Array, [H, Fs]));
    if (w.shared.gate) m.set(`${p}.shared_expert_gate.weight`, raw(w.shared.gate, [1, H]));
  }
  if (w.scoreBias) m.set(`${p}.gate.e_score_correction_bias`, raw(w.scoreBias, [E]));
  return m;
}

for (const c of familyCases('float32', 700, 9))
  test(`${c.name}: the block of layer 1 matches the reference`, async () => {
    const folder = path.join(dir, c.name);
    fs.mkdirSync(folder);
    const { weights, x, ref } = makeFamilyCase(c);
    writeSafetensors(path.join(folder, 'model.safetensors'), blockTensors(c, weights));
    fs.writeFileSync(path.join(folder, 'config.json'), JSON.stringify(configJson(c)));
    const layer = await MoeLayer.fromSafetensors(folder, { layer: 1 });
    try {
      expect(layer.config).toMatchObject({
        numExperts: c.E,
        intermediateSize: c.F,
        topK: c.k,
        routing: c.routing,
        routedScale: c.routedScale ?? 1,
        expertGroups: c.groups ?? null,
        sharedIntermediateSize: c.Fs ?? 0,
        sharedGate: c.sharedGate ?? false,
      });
      expect(relL2(await layer.forward(x), familyForward(ref, x, c.T))).toBeLessThan(FLOAT32_TOL);
    } finally {
      layer.dispose();
    }
    // Layer 0 is dense where the family allows dense layers (first_k_dense_replace, mlp_only_layers).
    if (c.name === 'qwen2-moe' || c.name.startsWith('deepseek'))
      await expect(MoeLayer.fromSafetensors(folder, { layer: 0 })).rejects.toThrow(
        /options\.layer 0 is a dense MLP in .*config\.json \((first_k_dense_replace 1|mlp_only_layers)\)/,
      );
  });

test('decoder_sparse_step and moe_layer_freq mark the dense layers', async () => {
  const folder = path.join(dir, 'steps');
  fs.mkdirSync(folder);
  const c = familyCases('float32', 800)[2]; // qwen3-moe
  const { weights } = makeFamilyCase(c);
  writeSafetensors(path.join(folder, 'model.safetensors'), blockTensors(c, weights));
  fs.writeFileSync(path.join(folder, 'config.json'), JSON.stringify({ ...configJson(c), decoder_sparse_step: 2 }));
  await expect(MoeLayer.fromSafetensors(folder, { layer: 0 })).rejects.toThrow(RangeError);
  await expect(MoeLayer.fromSafetensors(folder, { layer: 0 })).rejects.toThrow(/decoder_sparse_step 2/);
  const layer = await MoeLayer.fromSafetensors(folder, { layer: 1 });
  expect(layer.config.numExperts).toBe(c.E);
  layer.dispose();
});

test("DeepSeek-V2's 'gready' spelling of topk_method is the plain top-k", async () => {
  const folder = path.join(dir, 'gready');
  fs.mkdirSync(folder);
  const c = { ...familyCases('float32', 850)[4], groups: null }; // deepseek-v2
  const { weights, x, ref } = makeFamilyCase(c);
  writeSafetensors(path.join(folder, 'model.safetensors'), blockTensors(c, weights));
  const json = { ...configJson({ ...c, groups: { count: 8, topK: 3, score: 'max' } }), topk_method: 'gready' };
  fs.writeFileSync(path.join(folder, 'config.json'), JSON.stringify(json));
  const layer = await MoeLayer.fromSafetensors(folder, { layer: 1 });
  expect(layer.config.expertGroups).toBeNull();
  expect(relL2(layer.forwardSync(x), familyForward(ref, x, c.T))).toBeLessThan(FLOAT32_TOL);
  layer.dispose();
});
