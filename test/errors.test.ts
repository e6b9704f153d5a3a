/** Every bad argument is refused before native code runs, with an error naming it. */
import { backendInfo, MoeError, MoeLayer } from '../lib';
import { fromNative } from '../lib/errors';
import { makeCase } from './helpers/reference';

const good = makeCase({ H: 16, F: 24, E: 4, k: 2, T: 3, dtype: 'float32', routing: 'softmax-topk-renorm', seed: 40 });

function expectThrow(fn: () => unknown, type: ErrorConstructor | typeof MoeError, pattern: RegExp, code?: string) {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(caught).toBeInstanceOf(type);
  expect((caught as Error).message).toMatch(pattern);
  if (code) expect((caught as { code?: string }).code).toBe(code);
}

describe('config errors', () => {
  const bad: [string, unknown, ErrorConstructor, RegExp][] = [
    ['hiddenSize', undefined, TypeError, /config\.hiddenSize must be a number, got undefined/],
    ['hiddenSize', '16', TypeError, /config\.hiddenSize must be a number, got the string '16'/],
    ['hiddenSize', 0, RangeError, /config\.hiddenSize must be an integer in \[1, 1048576\], got 0/],
    ['hiddenSize', -5, RangeError, /config\.hiddenSize.*got -5/],
    ['hiddenSize', 16.5, RangeError, /config\.hiddenSize.*got 16\.5/],
    ['hiddenSize', NaN, RangeError, /config\.hiddenSize.*got NaN/],
    ['hiddenSize', Infinity, RangeError, /config\.hiddenSize.*got Infinity/],
    ['intermediateSize', 2 ** 40, RangeError, /config\.intermediateSize/],
    ['numExperts', 0, RangeError, /config\.numExperts/],
    ['numExperts', 5000, RangeError, /config\.numExperts.*1024.*5000/],
    ['topK', 5, RangeError, /config\.topK must be an integer in \[1, 4\], got 5/],
    ['topK', 0, RangeError, /config\.topK/],
    [
      'routing',
      'softmax',
      RangeError,
      /config\.routing must be one of 'softmax-topk-renorm', 'softmax-topk', 'sigmoid-topk', 'sigmoid-topk-renorm', got 'softmax'/,
    ],
    ['routing', 3, TypeError, /config\.routing/],
    [
      'weightDtype',
      'int8',
      RangeError,
      /config\.weightDtype must be one of 'float32', 'bfloat16', 'float16', got 'int8'/,
    ],
    ['device', 'gpu', RangeError, /config\.device must be one of 'cpu', 'cuda', 'auto', got 'gpu'/],
    ['threads', -1, RangeError, /config\.threads/],
    ['threads', 1.5, RangeError, /config\.threads/],
  ];
  test.each(bad)('%s = %p', (key, value, type, pattern) => {
    expectThrow(() => new MoeLayer({ ...good.config, [key]: value } as never, good.weights), type, pattern);
  });

  test('config and weights must be objects', () => {
    expectThrow(() => new MoeLayer(null as never, good.weights), TypeError, /config must be an object, got null/);
    expectThrow(() => new MoeLayer(good.config, 5 as never), TypeError, /weights must be an object, got number 5/);
  });

  test('a huge config is refused on the weight sizes, before any allocation', () => {
    const huge = { hiddenSize: 2 ** 20, intermediateSize: 2 ** 20, numExperts: 1024, topK: 2 };
    expectThrow(
      () => new MoeLayer(huge, good.weights),
      RangeError,
      /weights\.gate must have 1073741824 elements, got 64/,
    );
  });
});

describe('weight errors', () => {
  const { weights, config } = good;
  test('wrong length names the argument, expected and actual', () => {
    expectThrow(
      () => new MoeLayer(config, { ...weights, gate: new Float32Array(10) }),
      RangeError,
      /weights\.gate must have 64 elements, got 10/,
      'ERR_MOE_SHAPE',
    );
    expectThrow(
      () => new MoeLayer(config, { ...weights, w2: new Float32Array(5) }),
      RangeError,
      /weights\.w2 must have 1536 elements \(weightDtype 'float32'\), got 5/,
      'ERR_MOE_SHAPE',
    );
  });
  test('wrong type for the dtype', () => {
    expectThrow(
      () => new MoeLayer(config, { ...weights, w1: new Uint16Array(4 * 24 * 16) }),
      TypeError,
      /weights\.w1 must be a Float32Array \(weightDtype 'float32'\), got Uint16Array/,
    );
    expectThrow(
      () => new MoeLayer({ ...config, weightDtype: 'bfloat16' }, weights),
      TypeError,
      /weights\.w1 must be a Uint16Array \(weightDtype 'bfloat16'\), got Float32Array/,
    );
    expectThrow(
      () => new MoeLayer(config, { ...weights, gate: [1, 2] as never }),
      TypeError,
      /weights\.gate must be a Float32Array, got an array of length 2/,
    );
  });
  test('per-expert arrays: count and each length', () => {
    const per = 24 * 16;
    const arrays = (n: number, len: number) => Array.from({ length: n }, () => new Float32Array(len));
    expectThrow(
      () => new MoeLayer(config, { ...weights, w3: arrays(3, per) }),
      RangeError,
      /weights\.w3 must hold 4 per-expert arrays \(numExperts\), got 3/,
    );
    expectThrow(
      () => new MoeLayer(config, { ...weights, w3: [...arrays(3, per), new Float32Array(7)] }),
      RangeError,
      /weights\.w3\[3\] must have 384 elements/,
    );
  });
  test('missing weights', () => {
    expectThrow(
      () => new MoeLayer(config, { gate: weights.gate } as never),
      TypeError,
      /weights\.w1 must be a Float32Array.*got undefined/,
    );
  });
  test('a detached weight buffer is refused', () => {
    const w1 = Float32Array.from(weights.w1 as Float32Array);
    structuredClone(w1.buffer, { transfer: [w1.buffer] });
    expectThrow(
      () => new MoeLayer(config, { ...weights, w1 }),
      RangeError,
      /weights\.w1 must have 1536 elements.*got 0/,
    );
  });
});

describe('call errors', () => {
  const layer = new MoeLayer(good.config, good.weights);
  afterAll(() => layer.dispose());

  test('x must be a Float32Array of T * H', async () => {
    expectThrow(
      () => layer.forwardSync(new Float64Array(16) as never),
      TypeError,
      /x must be a Float32Array, got Float64Array/,
    );
    expectThrow(
      () => layer.forwardSync(new Float32Array(17)),
      RangeError,
      /x must hold T \* hiddenSize \(16\) elements, got 17/,
      'ERR_MOE_SHAPE',
    );
    expectThrow(() => layer.route([1, 2] as never), TypeError, /x must be a Float32Array/);
    await expect(layer.forward(new Float32Array(15))).rejects.toThrow(
      /x must hold T \* hiddenSize \(16\) elements, got 15/,
    );
    await expect(layer.forward('x' as never)).rejects.toBeInstanceOf(TypeError);
  });
  test('out must fit', async () => {
    expectThrow(
      () => layer.forwardSync(new Float32Array(32), { out: new Float32Array(16) }),
      RangeError,
      /options\.out must have 32 elements \(T \* hiddenSize\), got 16/,
    );
    await expect(layer.forward(new Float32Array(32).fill(0.5), { out: new Uint8Array(32) as never })).rejects.toThrow(
      /options\.out must be a Float32Array/,
    );
    await expect(layer.forward(new Float32Array(16), { signal: {} as never })).rejects.toThrow(
      /options\.signal must be an AbortSignal/,
    );
  });
  test('a disposed layer throws ERR_MOE_DISPOSED everywhere', async () => {
    const l = new MoeLayer(good.config, good.weights);
    l.dispose();
    l.dispose(); // twice is fine
    expect(l.disposed).toBe(true);
    expectThrow(() => l.forwardSync(good.x), MoeError, /disposed/, 'ERR_MOE_DISPOSED');
    expectThrow(() => l.route(good.x), MoeError, /disposed/, 'ERR_MOE_DISPOSED');
    await expect(l.forward(good.x)).rejects.toMatchObject({ code: 'ERR_MOE_DISPOSED' });
    expect(l.nativeBytes).toBe(0);
  });
  test('device "cuda" without a usable CUDA backend throws ERR_MOE_NO_DEVICE with the reason', () => {
    const info = backendInfo();
    if (info.cuda.available) return; // covered by cuda.test.ts on a GPU machine
    let caught: unknown;
    try {
      new MoeLayer({ ...good.config, device: 'cuda' }, good.weights);
    } catch (e) {
      caught = e;
    }
    expect(caught).toBeInstanceOf(MoeError);
    expect((caught as MoeError).code).toBe('ERR_MOE_NO_DEVICE');
    expect(typeof info.cuda.reason).toBe('string');
    expect((caught as MoeError).message).toContain(String(info.cuda.reason));
    const auto = new MoeLayer({ ...good.config, device: 'auto' }, good.weights);
    expect(auto.device).toBe('cpu');
    auto.dispose();
  });
});

describe('native errors', () => {
  // Errors from the addon are plain Errors with a code; they come from the main realm, not jest's.
  const native = (code: string, message = 'from the addon') => Object.assign(new Error(message), { code });

  test('native argument checks become RangeErrors that keep their code', () => {
    for (const code of ['ERR_MOE_INVALID', 'ERR_MOE_DTYPE']) {
      const e = fromNative(native(code, `weightDtype must be 'float32', 'bfloat16' or 'float16'`));
      expect(e).toBeInstanceOf(RangeError);
      expect(e).toMatchObject({ code, message: "weightDtype must be 'float32', 'bfloat16' or 'float16'" });
    }
  });

  test('other native failures become MoeErrors with the same code; unknown ones ERR_MOE_INTERNAL', () => {
    for (const code of [
      'ERR_MOE_NO_DEVICE',
      'ERR_MOE_CUDA',
      'ERR_MOE_OUT_OF_MEMORY',
      'ERR_MOE_DISPOSED',
      'ERR_MOE_CHECKPOINT',
      'ERR_MOE_SHAPE',
    ]) {
      const e = fromNative(native(code));
      expect(e).toBeInstanceOf(MoeError);
      expect((e as MoeError).code).toBe(code);
    }
    expect(fromNative(new Error('odd'))).toMatchObject({ name: 'MoeError', code: 'ERR_MOE_INTERNAL', message: 'odd' });
    expect(fromNative('text')).toMatchObject({ name: 'MoeError', code: 'ERR_MOE_INTERNAL' });
  });
});
