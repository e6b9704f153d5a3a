/**
 * The step budget of continuous batching (lib/generate/engine.ts), on a stand-in model that records
 * each step: a long prompt joins in chunks whose work, attention to the positions before them
 * included, stays within that of a 256-token prompt alone, so chunks deep in a prompt are shorter.
 */
import { ATTENTION_MAC_COST, DecoderConfig, parseDecoderConfig, positionCost } from '../lib/model/config';
import type { ModelSequence, StepEntry } from '../lib/model/model';
import { Engine, EngineModel, Request, TOKENS_PER_STEP } from '../lib/generate/engine';
import { checkSampling } from '../lib/generate/sampling';

// The Qwen3-30B-A3B shape with 4 layers: its attention is a large share of a token's work.
const qwen3 = parseDecoderConfig({
  architectures: ['Qwen3MoeForCausalLM'],
  hidden_size: 2048,
  intermediate_size: 6144,
  moe_intermediate_size: 768,
  num_hidden_layers: 4,
  num_attention_heads: 32,
  num_key_value_heads: 4,
  head_dim: 128,
  num_experts: 128,
  num_experts_per_tok: 8,
  norm_topk_prob: true,
  vocab_size: 64,
  rope_theta: 1e6,
  eos_token_id: 63,
});

interface Entry {
  position: number;
  tokens: number;
  /** The first token fed. */
  token?: number;
}

/** A model whose steps only advance the sequences and record what they were given. */
function standIn(config: DecoderConfig, steps: Entry[][], quantize = 'none'): EngineModel {
  return {
    config,
    options: { contextLength: 16384, maxSequences: 8, quantize, cacheTokens: 16384 * 8 },
    cacheBlockTokens: 16,
    createSequence: () => ({ length: 0 }) as ModelSequence,
    async step(batch: readonly StepEntry[]) {
      steps.push(batch.map((e) => ({ position: e.sequence.length, tokens: e.tokens.length, token: e.tokens[0] })));
      for (const e of batch) e.sequence.length += e.tokens.length;
      await new Promise((r) => setImmediate(r));
      return batch.map(() => {
        const logits = new Float32Array(config.vocabSize);
        logits[7] = 1; // greedy picks 7, never the EOS id
        return logits;
      });
    },
    freeSequence() {},
    async forkSequence(_: ModelSequence, n: number) {
      return { length: n } as ModelSequence;
    },
    async truncateSequence(s: ModelSequence, n: number) {
      s.length = n;
    },
  };
}

function request(prompt: number[], maxTokens: number): Request {
  return new Request(prompt, checkSampling('options', { temperature: 0 }), maxTokens, [], undefined, new Set([63]));
}

async function drain(r: Request): Promise<void> {
  while (!(await r.next()).done);
}

test('positionCost: the attention multiply-adds per position, weighted by format, over the weight multiply-adds per token', () => {
  // Per layer: q and o 2 * 2048 * 4096, k and v 2 * 2048 * 512, 8 experts of 3 * 2048 * 768, the router
  // 128 * 2048; attention 2 * 32 * 128 per position.
  const weights = 2 * 2048 * 4096 + 2 * 2048 * 512 + 8 * 3 * 2048 * 768 + 128 * 2048;
  for (const q of ['none', 'int8', 'int4'])
    expect(positionCost(qwen3, q)).toBeCloseTo((ATTENTION_MAC_COST[q] * 2 * 32 * 128) / weights, 12);
  expect(positionCost(qwen3)).toBe(positionCost(qwen3, 'none'));
  // Attention weighs more beside the faster integer projections.
  expect(ATTENTION_MAC_COST.int4).toBeGreaterThan(ATTENTION_MAC_COST.none);
  expect(ATTENTION_MAC_COST.int8).toBeGreaterThan(ATTENTION_MAC_COST.none);
});

const longChunkCounts: Record<string, number> = {};
test.each(['none', 'int4'])(
  'a long prompt beside running streams (quantize %s): every step within the work of a 256-token prompt alone',
  async (quantize) => {
    const steps: Entry[][] = [];
    const engine = new Engine(standIn(qwen3, steps, quantize));
    const streams = Array.from({ length: 3 }, (_, i) => request([1 + i, 2, 3], 400));
    for (const s of streams) engine.submit(s);
    const long = request(
      Array.from({ length: 3000 }, (_, i) => 1 + (i % 60)),
      1,
    );
    engine.submit(long);
    await Promise.all([...streams, long].map(drain));

    // The cost model, written out: a token at position p attends p + 1 positions.
    const a = positionCost(qwen3, quantize);
    const cost = (e: Entry) => e.tokens + a * (e.tokens * e.position + (e.tokens * (e.tokens + 1)) / 2);
    const budget = cost({ position: 0, tokens: TOKENS_PER_STEP });
    const chunks: Entry[] = [];
    for (const step of steps) {
      const prompt = step.filter((e) => e.tokens > 1);
      chunks.push(...prompt);
      const total = step.reduce((s, e) => s + cost(e), 0);
      if (prompt.length > 0) expect(total).toBeLessThanOrEqual(budget + 1e-9);
    }
    // The long prompt is fed once, in order, in chunks that shrink as its context grows.
    const longChunks = chunks.filter((e) => e.tokens > 3 || e.position >= 3);
    let next = 0;
    for (const c of longChunks) {
      expect(c.position).toBe(next);
      next += c.tokens;
    }
    expect(next).toBe(3000);
    expect(longChunks[0].tokens).toBeGreaterThan(longChunks[longChunks.length - 2].tokens * 1.5);
    // It took more steps than 256-token chunks would (3000 / 253 rounds up to 12).
    expect(longChunks.length).toBeGreaterThan(12);
    longChunkCounts[quantize] = longChunks.length;
    // With int4 projections attention weighs more, so the same prompt takes more, shorter chunks.
    if (quantize === 'int4') expect(longChunkCounts.int4).toBeGreaterThan(longChunkCounts.none);
  },
);

test('a prompt always gets some tokens, however much of the budget the running streams take', async () => {
  // Few weights and wide attention; the streams' decode tokens alone then outweigh a step once their
  // positions add up to more than a 256-token prompt's (32,896).
  const wide = parseDecoderConfig({
    architectures: ['Qwen3MoeForCausalLM'],
    hidden_size: 64,
    intermediate_size: 96,
    moe_intermediate_size: 32,
    num_hidden_layers: 1,
    num_attention_heads: 32,
    num_key_value_heads: 4,
    head_dim: 128,
    num_experts: 8,
    num_experts_per_tok: 2,
    vocab_size: 64,
    eos_token_id: 63,
  });
  const a = positionCost(wide);
  const cost = (e: Entry) => e.tokens + a * (e.tokens * e.position + (e.tokens * (e.tokens + 1)) / 2);
  const budget = cost({ position: 0, tokens: TOKENS_PER_STEP });

  const steps: Entry[][] = [];
  const engine = new Engine(standIn(wide, steps));
  // Seven streams that decode until cancelled, then a prompt that shares no prefix with them.
  const deep = Array.from({ length: 7 }, (_, i) =>
    request(
      Array.from({ length: 6500 }, (_, j) => 1 + ((i + j) % 60)),
      8000,
    ),
  );
  for (const s of deep) engine.submit(s);
  const draining = deep.map(drain);
  while (deep.some((s) => s.generated.length < 2)) await new Promise((r) => setImmediate(r));
  const late = request(
    Array.from({ length: 20 }, (_, i) => 61 + (i % 2)),
    2,
  );
  engine.submit(late);
  await drain(late);
  for (const s of deep) engine.cancel(s);
  await Promise.all(draining);
  // Its first chunk runs beside the seven decode tokens, which take more than the budget: it gets the
  // floor of 16 prompt tokens.
  const isLate = (e: Entry) => e.position === 0 && e.token === 61;
  const first = steps.find((step) => step.some(isLate));
  expect(first).toBeDefined();
  const decoding = first!.filter((e) => !isLate(e));
  expect(decoding.length).toBe(7);
  expect(decoding.reduce((sum, e) => sum + cost(e), 0)).toBeGreaterThan(budget);
  expect(first!.find(isLate)!.tokens).toBe(16);
  expect(decoding.every((e) => e.tokens === 1)).toBe(true);
  expect(late.generated.length).toBe(2);
});
