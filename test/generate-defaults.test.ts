/**
 * Sampling defaults from generation_config.json: a checkpoint's temperature, top_k, top_p, min_p and
 * repetition_penalty apply to options left out, `do_sample: false` makes the default greedy, values
 * out of range are left out, and options given by the caller always win.
 */
import * as fs from 'fs';
import * as path from 'path';
import { MoeModel } from '../lib/index';
import { samplingDefaults } from '../lib/generate/sampling';
import { makeTempDir, removeTempDir } from './helpers/checkpoint';
import { writeRandomModel } from './helpers/model/random-model';

let dir = '';
let hf = '';
beforeAll(() => {
  dir = makeTempDir('gen-defaults');
  hf = writeRandomModel(path.join(dir, 'mixtral'), { family: 'mixtral', seed: 41, gguf: false }).hfDir;
});
afterAll(() => removeTempDir(dir));

function setGenerationConfig(fields: Record<string, unknown>): void {
  fs.writeFileSync(
    path.join(hf, 'generation_config.json'),
    JSON.stringify({ bos_token_id: 1, eos_token_id: 2, ...fields }),
  );
}

test('the fields map to options; out-of-range values are left out; do_sample false is greedy', () => {
  expect(samplingDefaults({ temperature: 0.6, top_p: 0.9, top_k: 20, min_p: 0.05, repetition_penalty: 1.1 })).toEqual({
    temperature: 0.6,
    topP: 0.9,
    topK: 20,
    minP: 0.05,
    repetitionPenalty: 1.1,
  });
  expect(samplingDefaults({ temperature: -1, top_p: 0, top_k: 2.5, min_p: 2, repetition_penalty: 0 })).toEqual({});
  expect(samplingDefaults({ temperature: 'hot', top_p: null })).toEqual({});
  expect(samplingDefaults({ do_sample: false, temperature: 0.7 })).toEqual({ temperature: 0 });
  expect(samplingDefaults(undefined)).toEqual({});
});

test('generate uses the checkpoint defaults for options left out, and the caller wins', async () => {
  setGenerationConfig({ do_sample: true, temperature: 0.7, top_k: 5, top_p: 0.8 });
  const model = await MoeModel.load(hf);
  try {
    expect(model.generationDefaults).toEqual({ temperature: 0.7, topK: 5, topP: 0.8 });
    const prompt = [5, 300, 301, 302];
    const run = (o: object) => model.complete(prompt, { maxTokens: 12, ignoreEos: true, seed: 9, ...o });
    const implicit = await run({});
    const explicit = await run({ temperature: 0.7, topK: 5, topP: 0.8 });
    expect(implicit.tokens).toEqual(explicit.tokens);
    // Greedy given by the caller overrides the checkpoint's sampling; it must equal greedy by defaults.
    const greedy = await run({ temperature: 0 });
    setGenerationConfig({ do_sample: false });
    const greedyModel = await MoeModel.load(hf);
    try {
      expect(greedyModel.generationDefaults).toEqual({ temperature: 0 });
      expect((await greedyModel.complete(prompt, { maxTokens: 12, ignoreEos: true, seed: 123 })).tokens).toEqual(
        greedy.tokens,
      );
    } finally {
      greedyModel.dispose();
    }
  } finally {
    model.dispose();
  }
});
