/**
 * MoeModel against the float64 reference decoder (test/helpers/model), on random-weight checkpoints of
 * every family: logits of every position, in every storage format, each within the bound its rounding
 * allows.
 *
 * Bounds. A format that rounds to p significant bits has unit roundoff u = 2^-p: bf16 2^-8 (3.9e-3),
 * fp16 2^-11 (4.9e-4). Where the model's only inexact step is float32 arithmetic (float32 weights, or
 * bf16 weights, which are exact bf16 values, on sets that widen them to float), logits agree to 1e-5.
 * A bf16 or fp16 KV cache rounds every key and value once, and the bf16 dot-product set
 * (`avx512bf16`) rounds the activations to bf16 before every product with a bf16 matrix; each adds
 * about its u of relative error to the attention or projection outputs, and the logits carry 0.5-2u of
 * it (measured up to 2.3u, prompts 0.02 clear of router near-ties). The test allows 4 times the sum of the u's at
 * every position, and asks for at least u/16, so that the rounding is seen to happen.
 *
 * Quantization (`quantize`, groups of 32) is checked against the reference on the UNquantized weights.
 * Round to nearest leaves a weight's relative RMS error at e_w = 1/(2 qmax) for weights uniform in
 * +-a (test/quant.test.ts): int8 0.39%, int4 7.1%. The logits collect it from the LM head (e_w), and
 * from each layer's attention (q/k through the scores, v and o: about 2 e_w) and MoE block (the SwiGLU
 * chain: 1.92 e_w), independent errors adding in quadrature:
 *   e_logits ~ e_w * sqrt(1 + L (2^2 + 1.92^2)) = 4.05 e_w for L = 2 layers.
 * A perturbation this large flips near-tie router choices, and a flipped choice moves a position (and
 * the positions that attend to it) far more, so the MEDIAN position is bounded: by 1.5 times the model,
 * and from below by e_w / 2. A broken quantizer (a wrong scale, a lost nibble) gives errors of order 1.
 */
import { MoeModel } from '../lib/model/model';
import { binding } from '../lib/binding';
import { makeTempDir, removeTempDir } from './helpers/checkpoint';
import { centredRelErrors, maxOf, medianOf, pickPrompt } from './helpers/model/compare';
import { FAMILIES, Family, RandomModel, WeightDtype, writeRandomModel } from './helpers/model/random-model';
import { ReferenceDecoder } from './helpers/model/reference-decoder';
import { QMAX } from './helpers/quant';

const PROMPT = 24;
/** Prompts keep router choices this far (in logits) from a tie: beyond what bf16 rounding moves them. */
const ROUTER_MARGIN = 0.02;
const U = { float32: 0, bfloat16: 2 ** -8, float16: 2 ** -11 } as const;
/** Sets whose bf16 products round the activations to bf16 (csrc/cpu/simd_common.h, kBF16Dot). */
const BF16_DOT_SETS = ['avx512bf16'];
const FLOAT32_TOLERANCE = 1e-5;
const QUANT_CHAIN = 4.05;

const isa = binding().backendInfo().cpu.isa ?? 'none';

let dir = '';
const models = new Map<string, { model: RandomModel; ref: Float64Array; prompt: number[] }>();
/** The measured table, printed at the end: family, weights, KV cache, quantize -> max and median error. */
const table: string[] = [];

function prepared(family: Family, dtype: WeightDtype) {
  const key = `${family}-${dtype}`;
  if (!models.has(key)) {
    const index = FAMILIES.indexOf(family);
    const model = writeRandomModel(`${dir}/${key}`, { family, dtype, seed: 7 + index, gguf: false });
    const reference = ReferenceDecoder.load(model.hfDir);
    const { prompt } = pickPrompt(reference, 3 + index, PROMPT, 1, ROUTER_MARGIN, 100);
    reference.reset();
    models.set(key, { model, ref: reference.forward(prompt).logits, prompt });
  }
  return models.get(key)!;
}

async function errors(
  family: Family,
  dtype: WeightDtype,
  kvCacheDtype: 'float32' | 'bfloat16' | 'float16',
  quantize: 'none' | 'int8' | 'int4',
): Promise<number[]> {
  const { model, ref, prompt } = prepared(family, dtype);
  const moe = await MoeModel.load(model.hfDir, { kvCacheDtype, quantize, contextLength: 64 });
  try {
    const errs = centredRelErrors(await moe.logits(prompt, { all: true }), ref, PROMPT, model.shape.vocabSize);
    table.push(
      `| ${family} | ${dtype} | ${kvCacheDtype} | ${quantize} | ${maxOf(errs).toExponential(2)} | ${medianOf(errs).toExponential(2)} |`,
    );
    return errs;
  } finally {
    moe.dispose();
  }
}

beforeAll(() => {
  dir = makeTempDir('fmoe-model-');
});
afterAll(() => {
  removeTempDir(dir);
  console.log(
    `kernel set ${isa}; centred relative error of the logits, ${PROMPT} positions\n| family | weights | KV cache | quantize | max | median |\n|---|---|---|---|---|---|\n${table.join('\n')}`,
  );
});

describe.each(FAMILIES)('%s: MoeModel against the float64 reference', (family) => {
  test.each([
    ['float32', 'float32'],
    ['float32', 'bfloat16'],
    ['float32', 'float16'],
    ['bfloat16', 'float32'],
    ['bfloat16', 'bfloat16'],
    ['bfloat16', 'float16'],
  ] as const)('%s weights, %s KV cache: every position within the rounding bound', async (dtype, kv) => {
    const roundsActivations = dtype === 'bfloat16' && BF16_DOT_SETS.includes(isa);
    const u = U[kv] + (roundsActivations ? U.bfloat16 : 0);
    const errs = await errors(family, dtype, kv, 'none');
    if (u === 0) {
      expect(maxOf(errs)).toBeLessThan(FLOAT32_TOLERANCE);
    } else {
      expect(maxOf(errs)).toBeLessThan(4 * u);
      expect(medianOf(errs)).toBeGreaterThan(u / 16);
    }
  });

  test.each(['int8', 'int4'] as const)(
    '%s, groups of 32: the median position within the quantization error model',
    async (quantize) => {
      const ew = 1 / (2 * QMAX[quantize]);
      const median = medianOf(await errors(family, 'float32', 'float32', quantize));
      expect(median).toBeLessThan(1.5 * QUANT_CHAIN * ew);
      expect(median).toBeGreaterThan(0.5 * ew);
    },
  );
});
