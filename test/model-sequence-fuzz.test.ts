/**
 * The KV cache's blocks under a seeded storm of sequence operations (MoeModel.createSequence / step /
 * forkSequence / truncateSequence / freeSequence, internal) on a cache too small for all of them:
 * batched steps of several sequences, forks at any length, truncations, frees, the cache filling up,
 * and bad calls mixed in (a freed sequence, a token past the vocabulary, one sequence twice in a
 * batch, a fork past the end). A refused call changes nothing; every sequence left holds exactly its
 * tokens (one more token on it gives the bits of model.logits over them: no block was shared wrongly,
 * freed early or overwritten), and freeing them all gives every position back.
 */
import { MoeModel, ModelSequence } from '../lib/model/model';
import { rng } from './helpers/reference';
import { makeTempDir, removeTempDir } from './helpers/checkpoint';
import { firstBitDifference } from './helpers/model/compare';
import { writeRandomModel } from './helpers/model/random-model';

let dir = '';
let model: MoeModel;
let hfDir = '';
beforeAll(async () => {
  dir = makeTempDir('fmoe-sequence-fuzz-');
  hfDir = writeRandomModel(`${dir}/mixtral`, { family: 'mixtral', seed: 77, gguf: false }).hfDir;
  // 4 sequences of 64 positions: 16 blocks of 16 for everything, so the storm runs out of them.
  model = await MoeModel.load(hfDir, { contextLength: 64, maxSequences: 4 });
});
afterAll(() => {
  model?.dispose();
  if (dir) removeTempDir(dir);
});

interface Live {
  sequence: ModelSequence;
  tokens: number[];
}

test('forks, truncations, frees and a full cache: each sequence keeps its tokens, nothing leaks', async () => {
  const V = model.config.vocabSize;
  const rand = rng(4242);
  const int = (n: number) => Math.floor(rand() * n);
  const tokensOf = (n: number) => Array.from({ length: n }, () => int(V));
  const startFree = model.nativeFreeCachePositions();
  let live: Live[] = [];
  const freed: ModelSequence[] = [];
  const counts = { step: 0, full: 0, fork: 0, truncate: 0, free: 0, refused: 0 };
  /** A call that must be refused with a clear error and change no sequence's length. */
  const refused = async (call: () => Promise<unknown>, message: RegExp) => {
    const lengths = live.map((l) => l.sequence.length);
    await expect(call()).rejects.toThrow(message);
    expect(live.map((l) => l.sequence.length)).toEqual(lengths);
    counts.refused++;
  };

  for (let op = 0; op < 600; op++) {
    const r = rand();
    if (live.length === 0 || (r < 0.12 && live.length < 8)) {
      live.push({ sequence: model.createSequence(), tokens: [] });
    } else if (r < 0.55) {
      // A batch of one to three sequences, 0 to 12 tokens each.
      const picked = [...live].sort(() => rand() - 0.5).slice(0, 1 + int(Math.min(3, live.length)));
      const add = picked.map(() => tokensOf(int(13)));
      const batch = picked.map((l, i) => ({ sequence: l.sequence, tokens: add[i] }));
      const room = picked.every((l, i) => l.tokens.length + add[i].length <= 64);
      try {
        await model.step(batch);
        expect(room).toBe(true);
        picked.forEach((l, i) => l.tokens.push(...add[i]));
        counts.step++;
      } catch (err) {
        // Past a sequence's context, or no free block: nothing of the batch was kept.
        expect(String(err)).toMatch(room ? /KV cache is full/ : /context|longer than|positions/);
        picked.forEach((l) => expect(l.sequence.length).toBe(l.tokens.length));
        counts.full++;
      }
    } else if (r < 0.68) {
      const source = live[int(live.length)];
      const length = int(source.tokens.length + 1);
      try {
        const sequence = await model.forkSequence(source.sequence, length);
        live.push({ sequence, tokens: source.tokens.slice(0, length) });
        counts.fork++;
      } catch (err) {
        expect(String(err)).toMatch(/KV cache is full/);
        counts.full++;
      }
    } else if (r < 0.78) {
      const l = live[int(live.length)];
      const length = int(l.tokens.length + 1);
      try {
        await model.truncateSequence(l.sequence, length);
        l.tokens.length = length;
        counts.truncate++;
      } catch (err) {
        expect(String(err)).toMatch(/KV cache is full/); // a shared partial block copied first
        counts.full++;
      }
    } else if (r < 0.9) {
      const i = int(live.length);
      live[i].sequence.free();
      freed.push(live[i].sequence);
      live = live.filter((_, j) => j !== i);
      counts.free++;
    } else {
      const l = live[int(live.length)];
      const bad = int(4);
      if (bad === 0 && freed.length > 0)
        await refused(() => model.step([{ sequence: freed[int(freed.length)], tokens: [1] }]), /freed/);
      else if (bad === 1) await refused(() => model.step([{ sequence: l.sequence, tokens: [1, V] }]), /tokens/);
      else if (bad === 2)
        await refused(
          () =>
            model.step([
              { sequence: l.sequence, tokens: [1] },
              { sequence: l.sequence, tokens: [2] },
            ]),
          /twice/,
        );
      else await refused(() => model.forkSequence(l.sequence, l.tokens.length + 1), /length must be an integer/);
    }
    for (const l of live) expect(l.sequence.length).toBe(l.tokens.length);
  }
  // The storm reached every path, the full cache included.
  for (const [name, n] of Object.entries(counts)) expect([name, n > 5]).toEqual([name, true]);

  // Each sequence holds its own tokens: one more on it gives the bits of the whole list from scratch
  // (computed by a second copy of the model, whose cache is its own). A sequence checked is freed,
  // which makes room for the next; one that finds the cache full still is skipped.
  const fresh = await MoeModel.load(hfDir, { contextLength: 64, maxSequences: 1 });
  let checked = 0;
  try {
    for (const l of live.filter((x) => x.tokens.length > 0 && x.tokens.length < 64)) {
      const next = int(V);
      const got = await model.step([{ sequence: l.sequence, tokens: [next] }]).then(
        ([rows]) => rows.slice(),
        (err: unknown) => {
          expect(String(err)).toMatch(/KV cache is full/);
          return undefined;
        },
      );
      l.sequence.free();
      if (!got) continue;
      expect(firstBitDifference(got, await fresh.logits([...l.tokens, next]))).toBe(-1);
      checked++;
    }
  } finally {
    fresh.dispose();
  }
  expect(checked).toBeGreaterThan(0);
  live.forEach((l) => l.sequence.free());
  await model.step([{ sequence: model.createSequence(), tokens: [] }]); // runs after the queued frees
  expect(model.nativeFreeCachePositions()).toBe(startFree);
}, 300_000);
