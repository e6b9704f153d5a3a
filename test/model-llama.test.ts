/**
 * MoeModel against llama.cpp, an implementation nobody here wrote: one random-weight model of each
 * family, written as a Hugging Face folder (read by MoeModel) and as float32 GGUF (read by llama.cpp
 * through node-llama-cpp, in a child process). Both run in float32 with a float32 KV cache, so they
 * agree to float32 rounding: every position of a 64-token prompt and of 32 greedy tokens, fed back
 * step by step, within 1e-4 relative (observed about 1e-6), and the same greedy tokens.
 */
import { MoeModel } from '../lib/model/model';
import { makeTempDir, removeTempDir } from './helpers/checkpoint';
import { argmaxRow, ReferenceDecoder } from './helpers/model/reference-decoder';
import { centredRelErrors, maxOf, pickPrompt } from './helpers/model/compare';
import { llamaUnavailableReason, OracleResult, runLlama } from './helpers/model/llama-oracle';
import { FAMILIES, Family, RandomModel, writeRandomModel } from './helpers/model/random-model';

const PROMPT = 64;
const STEPS = 32;
const TOLERANCE = 1e-4;
/** Prompts keep every router choice and greedy pick this far (in logits) from a tie (see oracle.test.ts). */
const MARGIN = 1e-3;

const unavailable = llamaUnavailableReason();
if (unavailable)
  console.warn(`model-llama.test.ts skipped: node-llama-cpp's prebuilt llama.cpp does not load here: ${unavailable}`);
const describeLlama = unavailable ? describe.skip : describe;

interface Ours {
  /** Logits of the prompt's positions, then of each greedy token fed back: [(PROMPT + STEPS - 1) * V]. */
  logits: Float32Array;
  tokens: number[];
}

/** The prompt in one step, then STEPS greedy tokens, each fed back as a one-token step. */
async function greedy(model: MoeModel, prompt: number[]): Promise<Ours> {
  const V = model.config.vocabSize;
  const logits = new Float32Array((PROMPT + STEPS - 1) * V);
  const sequence = model.createSequence();
  try {
    let [rows] = await model.step([{ sequence, tokens: prompt, all: true }]);
    logits.set(rows);
    const tokens: number[] = [];
    let last = PROMPT - 1;
    for (;;) {
      const next = argmaxRow(logits, last, V).index;
      tokens.push(next);
      if (tokens.length === STEPS) break;
      [rows] = await model.step([{ sequence, tokens: [next] }]);
      logits.set(rows, ++last * V);
    }
    return { logits, tokens };
  } finally {
    sequence.free();
  }
}

describeLlama('MoeModel agrees with llama.cpp', () => {
  let dir = '';
  const cases = new Map<Family, { model: RandomModel; prompt: number[]; llama: OracleResult; ours: Ours }>();

  beforeAll(async () => {
    dir = makeTempDir('fmoe-model-llama-');
    const written = FAMILIES.map((family, i) => {
      const model = writeRandomModel(`${dir}/${family}`, { family, dtype: 'float32', seed: 31 + i });
      const { prompt } = pickPrompt(ReferenceDecoder.load(model.hfDir), 41 + i, PROMPT, STEPS, MARGIN);
      return { family, model, prompt };
    });
    const llama = await runLlama(
      written.map(({ model, prompt }) => ({
        ggufPath: model.ggufPath!,
        prompt,
        steps: STEPS,
        vocab: model.shape.vocabSize,
      })),
      dir,
    );
    for (const [i, { family, model, prompt }] of written.entries()) {
      const ours = await MoeModel.load(model.hfDir, { kvCacheDtype: 'float32', contextLength: PROMPT + STEPS });
      try {
        cases.set(family, { model, prompt, llama: llama[i], ours: await greedy(ours, prompt) });
      } finally {
        ours.dispose();
      }
    }
  });

  afterAll(() => {
    if (dir) removeTempDir(dir);
  });

  test.each(FAMILIES)(
    '%s: every position of a 64-token prompt within 1e-4, and 32 greedy tokens the same',
    (family) => {
      const c = cases.get(family)!;
      const V = c.model.shape.vocabSize;
      const errs = centredRelErrors(c.ours.logits, c.llama.logProbs, PROMPT + STEPS - 1, V);
      console.log(
        `${family}: max centred relative error vs llama.cpp, prompt ${maxOf(errs.slice(0, PROMPT)).toExponential(2)}, greedy ${maxOf(errs.slice(PROMPT)).toExponential(2)}`,
      );
      expect(maxOf(errs.slice(0, PROMPT))).toBeLessThanOrEqual(TOLERANCE);
      expect(c.ours.tokens).toEqual(c.llama.tokens);
      expect(maxOf(errs.slice(PROMPT))).toBeLessThanOrEqual(TOLERANCE);
      // A row that is a constant shift of another compares equal; the greedy tokens are not all one token.
      expect(new Set(c.ours.tokens).size).toBeGreaterThan(1);
    },
  );
});
