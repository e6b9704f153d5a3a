/**
 * The pool's timeline (csrc/core/timeline.h, binding.bench.timeline) and bench/timeline.js's reading of
 * it, on a tiny bf16 model: a step's phases in the decoder's order, back to back; every item inside a
 * job, on a pool thread; the LM head's items adding up to its packed bytes; a recording holding only
 * what ran while it recorded; events past the capacity dropped and counted; bad arguments refused.
 */
import * as path from 'path';
import { MoeModel } from '../lib';
import { binding } from '../lib/binding';
import { makeTempDir, removeTempDir } from './helpers/checkpoint';
import { DEFAULT_SHAPES, writeRandomModel } from './helpers/model/random-model';

interface TimelineEvent {
  t0: number;
  t1: number;
  kind: number;
  thread: number;
  tag: number;
  bytes: number;
}
interface Job extends TimelineEvent {
  label: string;
  items: TimelineEvent[];
}
// eslint-disable-next-line @typescript-eslint/no-require-imports
const report = require('../bench/timeline.js') as {
  PHASES: string[];
  eventsOf(flat: Float64Array): TimelineEvent[];
  streamingJobs(events: TimelineEvent[]): { jobs: Job[]; phases: TimelineEvent[] };
  jobTable(jobs: Job[]): {
    label: string;
    jobs: number;
    MB: number;
    threads: { thread: number; busy: number; gapUs: number; absent: number }[];
  }[];
  phaseTable(jobs: Job[], phases: TimelineEvent[]): { phase: string; count: number; us: number; outsideUs: number }[];
};

const shape = DEFAULT_SHAPES.mixtral;
let dir: string;
let model: MoeModel;
const timeline = () => binding().bench.timeline;

beforeAll(async () => {
  dir = makeTempDir('timeline');
  const hf = writeRandomModel(path.join(dir, 'm'), {
    family: 'mixtral',
    dtype: 'bfloat16',
    seed: 21,
    gguf: false,
  }).hfDir;
  model = await MoeModel.load(hf, { maxSequences: 1, contextLength: 64 });
});

afterAll(() => {
  model?.dispose();
  removeTempDir(dir);
});

const prompt = Array.from({ length: 21 }, (_, i) => 3 + ((i * 37) % 300));

test("one step's phases, jobs and items", async () => {
  timeline()('start', 100000);
  await model.logits(prompt);
  const { events, dropped } = timeline()('stop');
  expect(dropped).toBe(0);
  const all = report.eventsOf(events);
  const phases = all.filter((e) => e.kind === 2);
  const named = phases.map((e) => report.PHASES[e.tag]).filter((p) => p !== 'other');
  const layer = ['qkv', 'attention', 'output', 'mlp'];
  expect(named).toEqual([...Array.from({ length: shape.numLayers }, () => layer).flat(), 'lmHead']);
  for (let i = 1; i < phases.length; i++) expect(phases[i].t0).toBe(phases[i - 1].t1); // back to back

  const jobs = all.filter((e) => e.kind === 0);
  const items = all.filter((e) => e.kind === 1);
  expect(items.length).toBeGreaterThan(0);
  const threads = binding().backendInfo().cpu.threads;
  for (const it of items) {
    expect(it.t1).toBeGreaterThanOrEqual(it.t0);
    expect(it.thread >= 0 && it.thread < threads).toBe(true);
    expect(it.bytes).toBeGreaterThan(0);
    expect(jobs.some((j) => j.t0 <= it.t0 && it.t1 <= j.t1)).toBe(true);
  }

  // The LM head reads the last position's row: one streaming job whose items are every column once,
  // bf16, vocabSize x hiddenSize x 2 bytes (the vocabulary is a whole number of panels).
  const { jobs: streaming, phases: p } = report.streamingJobs(all);
  const head = streaming.filter((j) => j.label === 'lmHead 1');
  expect(head).toHaveLength(1);
  expect(head[0].items.reduce((s, i) => s + i.bytes, 0)).toBe(shape.vocabSize * shape.hiddenSize * 2);
  expect(head[0].items.every((i) => i.tag === 1)).toBe(true); // one row
  // The prompt's 21 rows through each layer's Q/K/V and output projections.
  for (const label of ['qkv 1', 'output 1']) {
    const list = streaming.filter((j) => j.label === label);
    expect(list).toHaveLength(shape.numLayers);
    for (const j of list) expect(j.items.every((i) => i.tag === prompt.length)).toBe(true);
  }
  const table = report.jobTable(streaming);
  expect(table.find((r) => r.label === 'lmHead 1')!.MB * 1e6).toBeCloseTo(shape.vocabSize * shape.hiddenSize * 2, 3);
  for (const r of table)
    for (const t of r.threads) {
      expect(t.busy > 0 && t.busy <= 1).toBe(true);
      // A thread's items follow one another: the gap between two is never negative.
      expect(Number.isNaN(t.gapUs) || t.gapUs >= 0).toBe(true);
      expect(t.absent >= 0 && t.absent < 1).toBe(true);
    }
  // Of two jobs of one label, thread 1 ran items in one: absent from half of them; thread 0 from none.
  const item = (thread: number, t0: number) => ({ t0, t1: t0 + 1000, kind: 1, thread, tag: 1, bytes: 64 });
  const made = [
    { t0: 0, t1: 3000, label: 'x 1', items: [item(0, 0), item(1, 0), item(0, 1000)] },
    { t0: 5000, t1: 8000, label: 'x 1', items: [item(0, 5000), item(0, 6000), item(0, 7000)] },
  ];
  const row = report.jobTable(made as unknown as Parameters<typeof report.jobTable>[0])[0];
  expect(row.threads.map((t) => [t.thread, t.absent])).toEqual([
    [0, 0],
    [1, 0.5],
  ]);
  const byPhase = report.phaseTable(streaming, p);
  expect(byPhase.find((r) => r.phase === 'mlp')!.count).toBe(shape.numLayers);
  for (const r of byPhase) expect(r.outsideUs >= 0 && r.outsideUs <= r.us).toBe(true);
});

test("one token's step streams each layer's router as items of tag 0, before the experts' items", async () => {
  timeline()('start', 100000);
  await model.logits(prompt.slice(0, 1)); // a one-token step
  const { events } = timeline()('stop');
  const { jobs: streaming } = report.streamingJobs(report.eventsOf(events));
  const routers = streaming.filter((j) => j.label === 'mlp 1');
  expect(routers).toHaveLength(shape.numLayers);
  for (const j of routers) {
    expect(j.items.every((i) => i.tag === 0)).toBe(true);
    // Every expert's row once, bf16 (the checkpoint's router is bf16, kept so).
    expect(j.items.reduce((s, i) => s + i.bytes, 0)).toBe(shape.numExperts * shape.hiddenSize * 2);
  }
  for (const label of ['mlp 2', 'mlp 3'])
    for (const j of streaming.filter((x) => x.label === label)) expect(j.items.every((i) => i.tag === 1)).toBe(true);
  expect(streaming.filter((j) => j.label === 'mlp 2')).toHaveLength(shape.numLayers);
});

test('a recording holds only what ran while it recorded; events past the capacity are dropped and counted', async () => {
  timeline()('start', 100000);
  timeline()('stop');
  await model.logits(prompt); // not recording
  timeline()('start', 100000);
  expect(timeline()('stop').events).toHaveLength(0);

  timeline()('start', 3);
  await model.logits(prompt);
  const { events, dropped } = timeline()('stop');
  expect(dropped).toBeGreaterThan(0);
  expect(events.length / 6).toBeLessThanOrEqual(3 * (binding().backendInfo().cpu.threads + 1));
});

test('bad arguments are refused', () => {
  const tl = timeline() as unknown as (...args: unknown[]) => unknown;
  // The addon's errors come from Node's realm, not jest's: their names tell them apart.
  const error = (f: () => unknown) => {
    try {
      f();
    } catch (err) {
      return `${(err as Error).name}: ${(err as Error).message}`;
    }
    return 'no error';
  };
  expect(error(() => tl('start', 0))).toMatch(/^RangeError: timeline: capacity must be an integer/);
  expect(error(() => tl('start', 1.5))).toMatch(/^RangeError: timeline: capacity must be an integer/);
  expect(error(() => tl('pause'))).toMatch(/^TypeError: timeline\('start', capacity\) or timeline\('stop'\)/);
  expect(error(() => tl())).toMatch(/^TypeError/);
});
