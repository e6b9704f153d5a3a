/**
 * The model's sequences and steps (MoeModel.createSequence / step / freeSequence, internal): a row's
 * logits are one fixed computation whatever else runs with it. A batch of sequences gives the same
 * bits as each sequence alone; a prompt cut into chunks the same bits as in one call; a decode after a
 * prefill the same bits as that token inside a longer prefill. Checked on every family in bf16 with the
 * default bf16 KV cache, and with int4 weights (whose kernels quantize each token's activations).
 */
import { MoeModel, ModelSequence } from '../lib/model/model';
import { makeTempDir, removeTempDir } from './helpers/checkpoint';
import { firstBitDifference, randomTokens } from './helpers/model/compare';
import { FAMILIES, RandomModel, writeRandomModel } from './helpers/model/random-model';

let dir = '';
const written = new Map<string, RandomModel>();
beforeAll(() => {
  dir = makeTempDir('fmoe-model-session-');
  FAMILIES.forEach((family, i) =>
    written.set(family, writeRandomModel(`${dir}/${family}`, { family, dtype: 'bfloat16', seed: 51 + i, gguf: false })),
  );
});
afterAll(() => {
  if (dir) removeTempDir(dir);
});

/** A step's logits, copied out of the step's shared buffer. */
async function run(
  model: MoeModel,
  entries: { sequence: ModelSequence; tokens: number[]; all?: boolean }[],
): Promise<Float32Array[]> {
  return (await model.step(entries)).map((rows) => rows.slice());
}

/** Logits of `tokens` on a fresh sequence, fed in chunks of the given sizes (all rows). */
async function chunked(model: MoeModel, tokens: number[], sizes: number[]): Promise<Float32Array> {
  const V = model.config.vocabSize;
  const out = new Float32Array(tokens.length * V);
  const sequence = model.createSequence();
  let at = 0;
  for (const n of sizes) {
    const [rows] = await run(model, [{ sequence, tokens: tokens.slice(at, at + n), all: true }]);
    out.set(rows, at * V);
    at += n;
  }
  expect(at).toBe(tokens.length);
  expect(sequence.length).toBe(tokens.length);
  sequence.free();
  return out;
}

const variants = [
  ...FAMILIES.map((family) => ({ name: `${family} bf16`, family, quantize: 'none' as const })),
  { name: 'qwen2moe int4', family: 'qwen2moe', quantize: 'int4' as const },
];

describe.each(variants)('$name: the same bits however the work is batched', ({ family, quantize }) => {
  let model: MoeModel;
  let V = 0;
  beforeAll(async () => {
    model = await MoeModel.load(written.get(family)!.hfDir, { quantize, contextLength: 640, maxSequences: 4 });
    V = model.config.vocabSize;
  });
  afterAll(() => model.dispose());

  test('a batch of sequences (prefill, then decode) gives each sequence alone', async () => {
    const prompts = [randomTokens(37, V, 1), randomTokens(5, V, 2), randomTokens(1, V, 3)];
    const next = [randomTokens(1, V, 4), randomTokens(3, V, 5), randomTokens(1, V, 6)];
    const batched = prompts.map(() => model.createSequence());
    const prefill = await run(
      model,
      prompts.map((tokens, i) => ({ sequence: batched[i], tokens, all: true })),
    );
    const decode = await run(
      model,
      next.map((tokens, i) => ({ sequence: batched[i], tokens, all: i === 1 })),
    );
    batched.forEach((s) => s.free());
    for (let i = 0; i < prompts.length; i++) {
      const sequence = model.createSequence();
      const [alonePrefill] = await run(model, [{ sequence, tokens: prompts[i], all: true }]);
      const [aloneDecode] = await run(model, [{ sequence, tokens: next[i], all: i === 1 }]);
      sequence.free();
      expect([i, firstBitDifference(prefill[i], alonePrefill), firstBitDifference(decode[i], aloneDecode)]).toEqual([
        i,
        -1,
        -1,
      ]);
    }
    expect(decode[1].length).toBe(3 * V);
    expect(decode[0].length).toBe(V);
  });

  test('a prompt in chunks gives the same bits as in one call', async () => {
    const tokens = randomTokens(70, V, 7);
    const whole = await chunked(model, tokens, [70]);
    expect(firstBitDifference(await chunked(model, tokens, [16, 1, 30, 23]), whole)).toBe(-1);
    expect(firstBitDifference(await chunked(model, tokens, Array(70).fill(1)), whole)).toBe(-1);
    expect(firstBitDifference(await chunked(model, tokens, [70]), whole)).toBe(-1); // run to run
    // logits() cuts prompts longer than 512 tokens itself.
    const long = randomTokens(600, V, 8);
    expect(firstBitDifference(await model.logits(long, { all: true }), await chunked(model, long, [100, 500]))).toBe(
      -1,
    );
  });

  test('a decode after a prefill gives that token inside a longer prefill', async () => {
    const tokens = randomTokens(41, V, 9);
    const sequence = model.createSequence();
    await run(model, [{ sequence, tokens: tokens.slice(0, 40) }]);
    const [decoded] = await run(model, [{ sequence, tokens: [tokens[40]] }]);
    sequence.free();
    expect(firstBitDifference(decoded, await model.logits(tokens))).toBe(-1);
  });

  test("reuseLogits: each step writes the bits of a fresh buffer into the model's own", async () => {
    const tokens = randomTokens(7, V, 10);
    const fresh = model.createSequence(),
      reused = model.createSequence();
    let previous: Float32Array | undefined;
    for (let i = 0; i < tokens.length; i++) {
      const [expected] = await run(model, [{ sequence: fresh, tokens: [tokens[i]] }]);
      const [rows] = await model.step([{ sequence: reused, tokens: [tokens[i]] }], { reuseLogits: true });
      expect([i, firstBitDifference(rows, expected)]).toEqual([i, -1]);
      if (previous) expect(rows.buffer).toBe(previous.buffer); // the next step overwrote it
      previous = rows;
    }
    // More rows than any step before: a larger buffer, still the same bits, and the sizes of each entry.
    const [a, b] = await model.step(
      [
        { sequence: fresh, tokens: tokens.slice(0, 3), all: true },
        { sequence: reused, tokens: tokens.slice(0, 2), all: true },
      ],
      { reuseLogits: true },
    );
    expect([a.length, b.length, a.buffer === b.buffer, a.buffer === previous!.buffer]).toEqual([
      3 * V,
      2 * V,
      true,
      false,
    ]);
    // A smaller step after it uses the same (larger) buffer.
    const [again] = await model.step([{ sequence: fresh, tokens: [tokens[3]] }], { reuseLogits: true });
    expect([again.length, again.buffer === a.buffer]).toEqual([V, true]);
    fresh.free();
    reused.free();
  });

  test("reuseLogits: the model's buffer transferred during a step leaves the steps' bits alone", async () => {
    const tokens = randomTokens(4, V, 12);
    const fresh = model.createSequence(),
      reused = model.createSequence();
    const [first] = await model.step([{ sequence: reused, tokens: [tokens[0]] }], { reuseLogits: true });
    await run(model, [{ sequence: fresh, tokens: [tokens[0]] }]);
    for (let i = 1; i < tokens.length; i++) {
      const running = model.step([{ sequence: reused, tokens: [tokens[i]] }], { reuseLogits: true });
      // The runtime may copy the native memory or detach the array; either way the step writes memory
      // the model still owns.
      const buffer = first.buffer as ArrayBuffer;
      const moved = structuredClone(buffer, { transfer: [buffer] });
      expect(moved.byteLength).toBeGreaterThanOrEqual(V * 4);
      const [rows] = await running;
      const [expected] = await run(model, [{ sequence: fresh, tokens: [tokens[i]] }]);
      expect([i, firstBitDifference(rows, expected)]).toEqual([i, -1]);
    }
    fresh.free();
    reused.free();
  });

  test('a fork goes on as the whole sequence would, and so does its source, shortened or not', async () => {
    const prefix = randomTokens(37, V, 12); // two blocks of 16 positions and 5 of a third
    const source = model.createSequence();
    await run(model, [{ sequence: source, tokens: prefix }]);
    /** The rows of `more` after `before`, fed to a fresh sequence in one call. */
    const fresh = async (before: number[], more: number[]) =>
      (await chunked(model, [...before, ...more], [before.length + more.length])).subarray(before.length * V);
    for (const length of [0, 16, 21, 37]) {
      const fork = await model.forkSequence(source, length);
      expect(fork.length).toBe(length);
      const more = randomTokens(20, V, 13 + length);
      const [rows] = await run(model, [{ sequence: fork, tokens: more, all: true }]);
      expect(firstBitDifference(rows, await fresh(prefix.slice(0, length), more))).toBe(-1);
      fork.free();
    }
    // The child shares the source's first two blocks; shortened to 20 positions, the source writes its
    // next tokens into a copy of its second block, not into the child's.
    const child = await model.forkSequence(source, 37);
    await model.truncateSequence(source, 20);
    const [d, e] = [randomTokens(9, V, 60), randomTokens(9, V, 61)];
    const [sourceRows, childRows] = await run(model, [
      { sequence: source, tokens: d, all: true },
      { sequence: child, tokens: e, all: true },
    ]);
    expect(firstBitDifference(sourceRows, await fresh(prefix.slice(0, 20), d))).toBe(-1);
    expect(firstBitDifference(childRows, await fresh(prefix, e))).toBe(-1);
    // Shortened to a block's end: the next block is a new one.
    await model.truncateSequence(child, 32);
    const [rows] = await run(model, [{ sequence: child, tokens: d, all: true }]);
    expect(firstBitDifference(rows, await fresh(prefix.slice(0, 32), d))).toBe(-1);
    source.free();
    child.free();
  });
});

describe('sequences', () => {
  let model: MoeModel;
  beforeAll(async () => {
    model = await MoeModel.load(written.get('mixtral')!.hfDir, { contextLength: 48, maxSequences: 1 });
  });
  afterAll(() => model.dispose());

  test('a freed sequence gives its cache back: a full-context sequence fits again and again', async () => {
    const tokens = randomTokens(48, model.config.vocabSize, 10);
    for (let i = 0; i < 5; i++) {
      const sequence = model.createSequence();
      await model.step([{ sequence, tokens }]);
      expect(sequence.length).toBe(48);
      sequence.free();
      sequence.free(); // twice: nothing more
    }
  });

  test('bad batches are refused, naming the argument; the sequence is unchanged', async () => {
    const sequence = model.createSequence();
    await model.step([{ sequence, tokens: [5, 6] }]);
    const other = await MoeModel.load(written.get('mixtral')!.hfDir, { contextLength: 48 });
    try {
      await expect(model.step([])).rejects.toThrow(TypeError);
      await expect(model.step([{ sequence: other.createSequence(), tokens: [5] }])).rejects.toThrow(
        /batch\[0\]\.sequence must be a sequence of this model/,
      );
      await expect(
        model.step([
          { sequence, tokens: [5] },
          { sequence, tokens: [6] },
        ]),
      ).rejects.toThrow(/batch\[1\]\.sequence appears twice/);
      await expect(model.step([{ sequence, tokens: [5, 1e9] }])).rejects.toThrow(
        /batch\[0\]\.tokens\[1\] must be a token id/,
      );
      const tooLong = model.step([{ sequence, tokens: Array(47).fill(5) }]);
      await expect(tooLong).rejects.toThrow(RangeError);
      await expect(tooLong).rejects.toThrow(/batch\[0\]\.tokens holds 47 tokens after 2, more than the context of 48/);
      expect(sequence.length).toBe(2);
      await expect(model.step([{ sequence, tokens: Array(46).fill(5) }])).resolves.toHaveLength(1);
      sequence.free();
      await expect(model.step([{ sequence, tokens: [5] }])).rejects.toThrow(/batch\[0\]\.sequence was freed/);
    } finally {
      other.dispose();
    }
  });

  test('free() waits for the steps queued before it', async () => {
    const sequence = model.createSequence();
    const step = model.step([{ sequence, tokens: [7, 8, 9] }]);
    sequence.free();
    await expect(step).resolves.toHaveLength(1);
    expect(sequence.length).toBe(3);
    // The cache is whole again: a full-context prompt fits.
    await expect(model.logits(randomTokens(48, model.config.vocabSize, 11))).resolves.toHaveLength(
      model.config.vocabSize,
    );
  });

  test('stepTimes() counts the steps that completed, their tokens, and time within their wall time', async () => {
    const before = model.stepTimes();
    const sequence = model.createSequence();
    const t0 = process.hrtime.bigint();
    await model.step([{ sequence, tokens: randomTokens(9, model.config.vocabSize, 12) }]);
    for (let i = 0; i < 3; i++) await model.step([{ sequence, tokens: [20 + i] }]);
    const wall = Number(process.hrtime.bigint() - t0) / 1e9;
    // A refused step (past the context) adds nothing.
    await expect(model.step([{ sequence, tokens: Array(40).fill(5) }])).rejects.toThrow(RangeError);
    const after = model.stepTimes();
    sequence.free();
    expect(after.steps - before.steps).toBe(4);
    expect(after.tokens - before.tokens).toBe(12);
    const phases = Object.keys(after.seconds).sort();
    expect(phases).toEqual(['attention', 'lmHead', 'mlp', 'other', 'output', 'qkv']);
    let spent = 0;
    for (const p of phases) {
      const d = after.seconds[p as keyof typeof after.seconds] - before.seconds[p as keyof typeof before.seconds];
      expect(d).toBeGreaterThan(0); // every phase runs in every step of this model
      spent += d;
    }
    expect(spent).toBeLessThanOrEqual(wall);
  });
});

test('stepTimes() of a disposed model throws', async () => {
  const model = await MoeModel.load(written.get('mixtral')!.hfDir, { contextLength: 16 });
  model.dispose();
  expect(() => model.stepTimes()).toThrow(/disposed/);
});

test('a fork shares its full blocks: it fits where a copy would not, and keeps them when its source goes', async () => {
  // 48 positions in all: three blocks of 16.
  const model = await MoeModel.load(written.get('mixtral')!.hfDir, { contextLength: 48 });
  try {
    const V = model.config.vocabSize;
    const tokens = randomTokens(48, V, 70);
    const source = model.createSequence();
    await model.step([{ sequence: source, tokens }]);
    const fork = await model.forkSequence(source, 32);
    const full = model.forkSequence(source, 40);
    await expect(full).rejects.toMatchObject({ code: 'ERR_MOE_OUT_OF_MEMORY' });
    await expect(full).rejects.toThrow(/KV cache is full: forking sequence \d+ needs a block of 16 positions/);
    await expect(model.step([{ sequence: fork, tokens: [tokens[32]] }])).rejects.toThrow(/KV cache is full/);
    expect(fork.length).toBe(32);
    await expect(model.forkSequence(source, 49)).rejects.toThrow(/length must be an integer in \[0, 48\]/);
    source.free();
    await expect(model.forkSequence(source, 1)).rejects.toThrow(/sequence was freed/);
    // The third block is free again; the fork's two stay with it.
    const [rows] = await model.step([{ sequence: fork, tokens: tokens.slice(32), all: true }]);
    const last = rows.slice(15 * V);
    fork.free();
    expect(firstBitDifference(last, await model.logits(tokens))).toBe(-1);
  } finally {
    model.dispose();
  }
});
