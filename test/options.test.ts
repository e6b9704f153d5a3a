// The config contract: the core's limits and enum names (csrc/core/options.h), exported by the binding,
// are what the TypeScript types name and what MoeLayer checks.
import { binding } from '../lib/binding';
import { Device, ExpertGroups, MoeLayer, Quantize, Routing, WeightDtype } from '../lib/layer';

const { limits, enums } = binding();

// Record<Union, true> fails to compile when the union gains or loses a name; the test then checks
// the union against the core's table.
const routing: Record<Routing, true> = {
  'softmax-topk-renorm': true,
  'softmax-topk': true,
  'sigmoid-topk': true,
  'sigmoid-topk-renorm': true,
};
const groupScore: Record<ExpertGroups['score'], true> = { max: true, 'top2-sum': true };
const weightDtype: Record<WeightDtype, true> = { float32: true, bfloat16: true, float16: true };
const quantize: Record<Quantize, true> = { none: true, int8: true, int4: true };
const device: Record<Device, true> = { cpu: true, cuda: true, auto: true };

test('the TypeScript unions name exactly the core enums, defaults first', () => {
  expect([...enums.routing].sort()).toEqual(Object.keys(routing).sort());
  expect([...enums.weightDtype].sort()).toEqual(Object.keys(weightDtype).sort());
  expect([...enums.quantize].sort()).toEqual(Object.keys(quantize).sort());
  expect([...enums.device].sort()).toEqual(Object.keys(device).sort());
  expect([...enums.groupScore].sort()).toEqual(Object.keys(groupScore).sort());
  expect([enums.routing[0], enums.weightDtype[0], enums.quantize[0], enums.device[0]]).toEqual([
    'softmax-topk-renorm',
    'float32',
    'none',
    'cpu',
  ]);
  expect(Object.isFrozen(limits) && Object.isFrozen(enums)).toBe(true);
});

const H = 4,
  F = 8,
  E = 2;
const weights = () => ({
  gate: new Float32Array(E * H),
  w1: new Float32Array(E * F * H),
  w3: new Float32Array(E * F * H),
  w2: new Float32Array(E * H * F),
});
const base = { hiddenSize: H, intermediateSize: F, numExperts: E, topK: 1 };

test('MoeLayer accepts every exported name and group size, and refuses the next value past each limit', () => {
  for (const r of enums.routing) new MoeLayer({ ...base, routing: r as Routing }, weights()).dispose();
  for (const g of limits.quantGroupSizes)
    new MoeLayer({ ...base, quantize: 'int8', quantGroupSize: g as 32 }, weights()).dispose();
  const bad: [object, RegExp][] = [
    [
      { numExperts: limits.maxExperts + 1 },
      new RegExp(`numExperts must be an integer in \\[1, ${limits.maxExperts}\\]`),
    ],
    [{ hiddenSize: limits.maxDim + 1 }, new RegExp(`hiddenSize must be an integer in \\[1, ${limits.maxDim}\\]`)],
    [{ intermediateSize: limits.maxDim + 1 }, /intermediateSize must be an integer/],
    [{ threads: limits.maxThreads + 1 }, new RegExp(`threads must be an integer in \\[0, ${limits.maxThreads}\\]`)],
    [{ cudaDevice: limits.maxCudaDevice + 1 }, /cudaDevice must be an integer/],
    [{ quantGroupSize: 48 }, new RegExp(`quantGroupSize must be ${limits.quantGroupSizes.slice(0, -1).join(', ')} or`)],
    [{ routing: 'softmax' }, /config.routing must be one of 'softmax-topk-renorm', 'softmax-topk'/],
    [{ weightDtype: 'int8' }, /config.weightDtype must be one of/],
  ];
  for (const [patch, message] of bad) {
    expect(() => new MoeLayer({ ...base, ...patch } as typeof base, weights())).toThrow(RangeError);
    expect(() => new MoeLayer({ ...base, ...patch } as typeof base, weights())).toThrow(message);
  }
});

test('the raw binding parses names with the core tables and says what it expected', () => {
  const raw = (cfg: object) => () =>
    new (binding().NativeLayer)({ ...base, ...cfg } as never, new Float32Array(E * H), [], [], []);
  expect(raw({ routing: 'top1' })).toThrow(
    "routing must be 'softmax-topk-renorm', 'softmax-topk', 'sigmoid-topk' or 'sigmoid-topk-renorm', got 'top1'",
  );
  expect(raw({ device: 'tpu' })).toThrow("device must be 'cpu', 'cuda' or 'auto', got 'tpu'");
  expect(raw({ quantize: 'int2' })).toThrow("quantize must be 'none', 'int8' or 'int4', got 'int2'");
  expect(raw({ quantGroupSize: 16 })).toThrow('quantGroupSize must be 32, 64 or 128, got 16');
});

test("a layer built with device 'auto' says why it runs on the CPU", () => {
  const layer = new MoeLayer({ ...base, device: 'auto', quantize: 'int4' }, weights());
  expect(layer.device).toBe('cpu');
  expect(layer.fallbackReason).toMatch(/quantize 'int4' runs on the CPU backend only/);
  layer.dispose();
  const plain = new MoeLayer({ ...base, device: 'cpu' }, weights());
  expect(plain.fallbackReason).toBeNull();
  plain.dispose();
  const b = binding().NativeLayer;
  const w = weights();
  const native = new b(
    {
      ...base,
      routing: 'softmax-topk-renorm',
      weightDtype: 'float32',
      device: 'auto',
      threads: 0,
      cudaDevice: 0,
      quantize: 'int4',
      quantGroupSize: 32,
    },
    w.gate,
    [w.w1.subarray(0, F * H), w.w1.subarray(F * H)],
    [w.w3.subarray(0, F * H), w.w3.subarray(F * H)],
    [w.w2.subarray(0, H * F), w.w2.subarray(H * F)],
  );
  expect(native.info().fallbackReason).toMatch(/quantize 'int4' runs on the CPU backend only/);
  native.dispose();
  const cpu = new b(
    {
      ...base,
      routing: 'softmax-topk-renorm',
      weightDtype: 'float32',
      device: 'cpu',
      threads: 0,
      cudaDevice: 0,
      quantize: 'none',
      quantGroupSize: 128,
    },
    w.gate,
    [w.w1.subarray(0, F * H), w.w1.subarray(F * H)],
    [w.w3.subarray(0, F * H), w.w3.subarray(F * H)],
    [w.w2.subarray(0, H * F), w.w2.subarray(H * F)],
  );
  expect(cpu.info().fallbackReason).toBeNull();
  cpu.dispose();
});
