import { parseDecoderConfig, tensorNames, expectedShapes, SUPPORTED_ARCHITECTURES } from '../lib/model/config';
import { MoeError } from '../lib/errors';

// Field names as the four families' config.json files spell them (sizes shrunk).
const mixtral = {
  architectures: ['MixtralForCausalLM'],
  hidden_size: 64,
  intermediate_size: 96,
  num_hidden_layers: 2,
  num_attention_heads: 8,
  num_key_value_heads: 2,
  num_local_experts: 4,
  num_experts_per_tok: 2,
  vocab_size: 300,
  rope_theta: 1e6,
  rms_norm_eps: 1e-5,
  sliding_window: null,
  max_position_embeddings: 512,
  bos_token_id: 1,
  eos_token_id: 2,
  tie_word_embeddings: false,
};
const qwen3 = {
  architectures: ['Qwen3MoeForCausalLM'],
  hidden_size: 64,
  intermediate_size: 128,
  moe_intermediate_size: 32,
  num_hidden_layers: 3,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  head_dim: 24,
  num_experts: 8,
  num_experts_per_tok: 2,
  norm_topk_prob: true,
  decoder_sparse_step: 1,
  mlp_only_layers: [1],
  vocab_size: 300,
  rope_theta: 1e6,
  use_sliding_window: false,
  sliding_window: 4096,
  eos_token_id: [5, 6],
  bos_token_id: null,
  tie_word_embeddings: true,
};
const olmoe = {
  architectures: ['OlmoeForCausalLM'],
  hidden_size: 64,
  intermediate_size: 32,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 4,
  num_experts: 8,
  num_experts_per_tok: 2,
  norm_topk_prob: false,
  vocab_size: 300,
  clip_qkv: null,
};
const qwen2 = {
  architectures: ['Qwen2MoeForCausalLM'],
  hidden_size: 64,
  intermediate_size: 128,
  moe_intermediate_size: 32,
  shared_expert_intermediate_size: 48,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 4,
  num_experts: 6,
  num_experts_per_tok: 2,
  vocab_size: 300,
  decoder_sparse_step: 2,
};

describe('parseDecoderConfig', () => {
  test('Mixtral: every layer MoE, renormalised top-k, head_dim from H / heads', () => {
    const c = parseDecoderConfig(mixtral);
    expect(c).toMatchObject({
      headDim: 8,
      numKvHeads: 2,
      slidingWindow: 0,
      qkNorm: 'none',
      qkvBias: false,
      ropeTheta: 1e6,
    });
    expect(c.moe).toEqual({
      numExperts: 4,
      topK: 2,
      intermediateSize: 96,
      routing: 'softmax-topk-renorm',
      sharedIntermediateSize: 0,
      sharedGate: false,
    });
    expect(c.moeLayers).toEqual([true, true]);
    expect(c.eosTokenIds).toEqual([2]);
    expect(tensorNames(c).layer(1).expert!(3)).toEqual({
      gate: 'model.layers.1.block_sparse_moe.experts.3.w1.weight',
      up: 'model.layers.1.block_sparse_moe.experts.3.w3.weight',
      down: 'model.layers.1.block_sparse_moe.experts.3.w2.weight',
    });
  });

  test('Qwen3-MoE: explicit head_dim, per-head q/k norm, dense layers from mlp_only_layers, tied head', () => {
    const c = parseDecoderConfig(qwen3);
    expect(c).toMatchObject({
      headDim: 24,
      qkNorm: 'head',
      slidingWindow: 0,
      tieWordEmbeddings: true,
      denseIntermediateSize: 128,
    });
    expect(c.moeLayers).toEqual([true, false, true]);
    expect(c.eosTokenIds).toEqual([5, 6]);
    expect(c.bosTokenId).toBeNull();
    const names = tensorNames(c);
    expect(names.lmHead).toBe('model.embed_tokens.weight');
    expect(names.layer(1).dense).toBeDefined();
    const shapes = expectedShapes(c, 0);
    expect(shapes.get('model.layers.0.self_attn.q_proj.weight')).toEqual([4 * 24, 64]);
    expect(shapes.get('model.layers.0.self_attn.q_norm.weight')).toEqual([24]);
    expect(shapes.get('model.layers.0.mlp.experts.7.down_proj.weight')).toEqual([64, 32]);
  });

  test('OLMoE: q/k norm over the whole projection, no renormalisation', () => {
    const c = parseDecoderConfig(olmoe);
    expect(c.qkNorm).toBe('projection');
    expect(c.moe.routing).toBe('softmax-topk');
    expect(expectedShapes(c, 1).get('model.layers.1.self_attn.k_norm.weight')).toEqual([64]);
  });

  test('Qwen2-MoE: q/k/v biases, a gated shared expert, decoder_sparse_step', () => {
    const c = parseDecoderConfig(qwen2);
    expect(c.qkvBias).toBe(true);
    expect(c.moe).toMatchObject({ routing: 'softmax-topk', sharedIntermediateSize: 48, sharedGate: true });
    expect(c.moeLayers).toEqual([false, true]);
    const shapes = expectedShapes(c, 1);
    expect(shapes.get('model.layers.1.mlp.shared_expert_gate.weight')).toEqual([1, 64]);
    expect(shapes.get('model.layers.1.self_attn.v_proj.bias')).toEqual([64]);
  });

  test('an unknown architecture names the supported ones', () => {
    const err = (() => {
      try {
        parseDecoderConfig({ ...mixtral, architectures: ['LlamaForCausalLM'] }, 'm/config.json');
      } catch (e) {
        return e as MoeError;
      }
    })();
    expect(err).toBeInstanceOf(MoeError);
    expect(err!.code).toBe('ERR_MOE_CHECKPOINT');
    for (const a of SUPPORTED_ARCHITECTURES) expect(err!.message).toContain(a);
    expect(err!.message).toContain('m/config.json');
  });

  test.each([
    [{ ...mixtral, hidden_size: undefined }, /'hidden_size' is missing/],
    [{ ...mixtral, num_key_value_heads: 3 }, /multiple of num_key_value_heads/],
    [{ ...mixtral, num_experts_per_tok: 9 }, /exceeds the number of experts/],
    [{ ...mixtral, rope_theta: -1 }, /'rope_theta' must be a positive finite number/],
    [{ ...mixtral, hidden_size: 2.5 }, /'hidden_size' must be an integer/],
    [{ ...qwen3, head_dim: 23 }, /head_dim must be even/],
    [{ ...qwen3, mlp_only_layers: 'all' }, /'mlp_only_layers' must be a list/],
    [{ ...mixtral, eos_token_id: 'x' }, /'eos_token_id' must be a token id/],
    [[], /must hold a JSON object/],
  ])('a bad config is a checkpoint error naming the field (%#)', (cfg, message) => {
    expect(() => parseDecoderConfig(cfg)).toThrow(message);
  });
});
