/**
 * MoeModel against the float64 reference decoder (test/helpers/model), on random-weight checkpoints of
 * every family: logits of every position, prefill and decode, alone and in a batch.
 */
import { MoeModel } from '../lib/model/model';
import { makeTempDir, removeTempDir } from './helpers/checkpoint';
import { rng } from './helpers/reference';
import { FAMILIES, TOKENS, writeRandomModel } from './helpers/model/random-model';
import { ReferenceDecoder } from './helpers/model/reference-decoder';
import { readCheckpoint } from './helpers/model/safetensors-read';

function centredRelError(a: ArrayLike<number>, b: ArrayLike<number>, rows: number, V: number): number {
  let worst = 0;
  for (let r = 0; r < rows; r++) {
    let ma = 0, mb = 0;
    for (let i = 0; i < V; i++) (ma += a[r * V + i]), (mb += b[r * V + i]);
    ma /= V;
    mb /= V;
    let num = 0, den = 0;
    for (let i = 0; i < V; i++) {
      const x = a[r * V + i] - ma, y = b[r * V + i] - mb;
      num += (x - y) ** 2;
      den += y ** 2;
    }
    worst = Math.max(worst, Math.sqrt(num / den));
  }
  return worst;
}

describe('MoeModel matches the float64 reference', () => {
  let dir = '';
  beforeAll(() => {
    dir = makeTempDir('fmoe-model-');
  });
  afterAll(() => removeTempDir(dir));

  test.each(FAMILIES)('%s, float32 weights, float32 KV cache', async (family) => {
    const m = writeRandomModel(`${dir}/${family}`, { family, dtype: 'float32', seed: 7, gguf: false });
    const ref = new ReferenceDecoder(JSON.parse(require('fs').readFileSync(`${m.hfDir}/config.json`, 'utf8')), readCheckpoint(m.hfDir));
    const rand = rng(3);
    const V = m.shape.vocabSize;
    const tokens = Array.from({ length: 40 }, () => TOKENS.firstByte + Math.floor(rand() * (V - TOKENS.firstByte)));
    const want = ref.forward(tokens).logits;
    const model = await MoeModel.load(m.hfDir, { kvCacheDtype: 'float32', contextLength: 128 });
    try {
      const got = await model.logits(tokens, { all: true });
      const err = centredRelError(got, want, tokens.length, V);
      console.log(family, 'max centred relative error', err.toExponential(2));
      expect(err).toBeLessThan(1e-5);
    } finally {
      model.dispose();
    }
  });
});
