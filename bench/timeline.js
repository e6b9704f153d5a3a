#!/usr/bin/env node
// Where a decode step's time goes, job by job: records the pool's timeline (binding.bench.timeline,
// csrc/core/timeline.h) over decode steps of one of bench/model.js's models and prints, for each job
// that streams weights (by phase of the step and order within it: with fewer than four tokens a thread
// `mlp 1` is the router, `mlp 2` the experts' w1/w3, `mlp 3` their w2), its median time and rate, how
// much of it each thread spent in its items, how fast those items streamed, how late each thread's
// first item started and how long the first took against the others, the median gap between two of its
// items (the pool's hand-out and the call), how long each thread waited at the end, and in what share
// of the jobs it ran no item at all (a worker kept off a core while the caller did the whole job); then
// the time of each phase outside those jobs (norms, RoPE, the attention, top-k), with --rows the
// experts' items by their rows, and with --layout each phase as the sequence of all its pool jobs (those
// that stream no weights too: the attention, the combine) and the gaps between them. The read probe is
// taken before and after the recording, to set the rates against. Not a timed test: a tool for finding
// what a kernel or a schedule loses.
//
//   node bench/model.js --models qwen3moe --formats int4 --engines ours   (writes the model files once)
//   node bench/timeline.js qwen3moe int4 [steps = 100] [streams = 1] [--rows] [--layout] [--prefix N] [--cache-dir DIR]
'use strict';
const os = require('os');
const path = require('path');
const { benchModelDir, benchToken, feedPrompt, median } = require('./util');

const PHASES = ['qkv', 'attention', 'output', 'mlp', 'lmHead', 'other']; // decoder.h StepPhase
const KIND = { job: 0, item: 1, phase: 2 };

/** Float64Array of 6 numbers an event (binding.bench.timeline('stop').events) -> event objects. */
function eventsOf(flat) {
  const out = [];
  for (let i = 0; i < flat.length; i += 6)
    out.push({
      t0: flat[i],
      t1: flat[i + 1],
      kind: flat[i + 2],
      thread: flat[i + 3],
      tag: flat[i + 4],
      bytes: flat[i + 5],
    });
  return out;
}

/**
 * The streaming jobs of a recording: each job with items, labelled by the phase it ran in and its
 * order among the streaming jobs of that phase occurrence, with its items by thread.
 */
function streamingJobs(events) {
  const phases = events.filter((e) => e.kind === KIND.phase);
  const items = events.filter((e) => e.kind === KIND.item);
  const jobs = [];
  let next = 0; // items are in order of t0; a job's items start inside it
  for (const job of events.filter((e) => e.kind === KIND.job)) {
    while (next < items.length && items[next].t0 < job.t0) next++;
    const mine = [];
    for (let i = next; i < items.length && items[i].t0 <= job.t1; i++) mine.push(items[i]);
    if (mine.length === 0) continue;
    const phase = phases.find((p) => p.t0 <= job.t0 && job.t1 <= p.t1);
    jobs.push({ ...job, items: mine, phase });
  }
  // Order within each phase occurrence: the nth streaming job of that phase.
  const seen = new Map();
  for (const j of jobs) {
    const n = (seen.get(j.phase) ?? 0) + 1;
    seen.set(j.phase, n);
    j.label = `${j.phase ? PHASES[j.phase.tag] : 'none'} ${n}`;
  }
  return { jobs, phases };
}

/** Per label: medians over the jobs of its time, rate and per-thread figures. */
function jobTable(jobs) {
  const byLabel = new Map();
  for (const j of jobs) {
    if (!byLabel.has(j.label)) byLabel.set(j.label, []);
    byLabel.get(j.label).push(j);
  }
  const rows = [];
  for (const [label, list] of byLabel) {
    const threads = [...new Set(list.flatMap((j) => j.items.map((i) => i.thread)))].sort((a, b) => a - b);
    const per = threads.map((t) => {
      const busy = [],
        rate = [],
        lag = [],
        wait = [],
        first = [],
        gap = [];
      let absent = 0;
      for (const j of list) {
        const mine = j.items.filter((i) => i.thread === t);
        if (mine.length === 0) {
          absent++;
          continue;
        }
        const time = mine.reduce((s, i) => s + (i.t1 - i.t0), 0);
        busy.push(time / (j.t1 - j.t0));
        rate.push(mine.reduce((s, i) => s + i.bytes, 0) / time);
        lag.push((mine[0].t0 - j.t0) / 1e3);
        wait.push((j.t1 - mine[mine.length - 1].t1) / 1e3);
        for (let k = 1; k < mine.length; k++) gap.push((mine[k].t0 - mine[k - 1].t1) / 1e3);
        if (mine.length >= 3) first.push((mine[0].t1 - mine[0].t0) / median(mine.slice(1).map((i) => i.t1 - i.t0)));
      }
      return {
        thread: t,
        busy: median(busy),
        itemGBs: median(rate),
        startUs: median(lag),
        waitUs: median(wait),
        gapUs: gap.length ? median(gap) : NaN,
        first: first.length ? median(first) : NaN,
        absent: absent / list.length,
      };
    });
    rows.push({
      label,
      jobs: list.length,
      us: median(list.map((j) => (j.t1 - j.t0) / 1e3)),
      MB: median(list.map((j) => j.items.reduce((s, i) => s + i.bytes, 0) / 1e6)),
      GBs: median(list.map((j) => j.items.reduce((s, i) => s + i.bytes, 0) / (j.t1 - j.t0))),
      threads: per,
    });
  }
  return rows;
}

/** Per phase: the median over its occurrences of its time, and of that time outside streaming jobs. */
function phaseTable(jobs, phases) {
  const rows = [];
  for (let p = 0; p < PHASES.length; p++) {
    const list = phases.filter((e) => e.tag === p);
    if (list.length === 0) continue;
    const outside = list.map((e) => {
      const inside = jobs.filter((j) => j.phase === e).reduce((s, j) => s + (j.t1 - j.t0), 0);
      return (e.t1 - e.t0 - inside) / 1e3;
    });
    rows.push({
      phase: PHASES[p],
      count: list.length,
      us: median(list.map((e) => (e.t1 - e.t0) / 1e3)),
      outsideUs: median(outside),
    });
  }
  return rows;
}

/**
 * Each phase as the sequence of all its jobs: over the occurrences with the most common count of jobs,
 * the median gap before each job, its time, and its items (0: a job that streams no weights).
 */
function layoutTable(events) {
  const phases = events.filter((e) => e.kind === KIND.phase);
  const jobs = events.filter((e) => e.kind === KIND.job);
  const items = events.filter((e) => e.kind === KIND.item);
  const rows = [];
  for (let p = 0; p < PHASES.length; p++) {
    const seqs = phases
      .filter((e) => e.tag === p)
      .map((ph) => {
        let last = ph.t0;
        const seq = [];
        for (const j of jobs.filter((j) => j.t0 >= ph.t0 && j.t1 <= ph.t1)) {
          const n = items.filter((i) => i.t0 >= j.t0 && i.t0 <= j.t1).length;
          seq.push({ gap: j.t0 - last, us: j.t1 - j.t0, items: n });
          last = j.t1;
        }
        return { seq, tail: ph.t1 - last };
      });
    if (seqs.length === 0) continue;
    const counts = new Map();
    for (const s of seqs) counts.set(s.seq.length, (counts.get(s.seq.length) ?? 0) + 1);
    const len = [...counts].sort((a, b) => b[1] - a[1])[0][0];
    const same = seqs.filter((s) => s.seq.length === len);
    const cells = [];
    for (let i = 0; i < len; i++)
      cells.push(
        `${(median(same.map((s) => s.seq[i].gap)) / 1e3).toFixed(1)} + ` +
          `[${(median(same.map((s) => s.seq[i].us)) / 1e3).toFixed(1)}, ${median(same.map((s) => s.seq[i].items))}]`,
      );
    cells.push(`${(median(same.map((s) => s.tail)) / 1e3).toFixed(1)}`);
    rows.push({ phase: PHASES[p], count: same.length, of: seqs.length, cells });
  }
  return rows;
}

/**
 * The items of the MoE phase (w1/w3 and w2; not the router's, tag 0) by their rows: share of the items'
 * time, bytes per ns.
 */
function rowsTable(jobs) {
  const by = new Map();
  let total = 0;
  for (const j of jobs)
    if (j.phase && PHASES[j.phase.tag] === 'mlp')
      for (const i of j.items) {
        if (i.tag === 0) continue;
        const r = by.get(i.tag) ?? { rows: i.tag, ns: 0, bytes: 0 };
        r.ns += i.t1 - i.t0;
        r.bytes += i.bytes;
        total += i.t1 - i.t0;
        by.set(i.tag, r);
      }
  return [...by.values()]
    .sort((a, b) => a.rows - b.rows)
    .map((r) => ({ rows: r.rows, share: r.ns / total, itemGBs: r.bytes / r.ns }));
}

module.exports = { eventsOf, streamingJobs, jobTable, phaseTable, rowsTable, PHASES };

if (require.main === module) {
  const args = process.argv.slice(2);
  const take = (flag) => {
    const at = args.indexOf(flag);
    return at >= 0 ? args.splice(at, 2)[1] : undefined;
  };
  const flag = (name) => {
    const at = args.indexOf(name);
    return at >= 0 && args.splice(at, 1).length > 0;
  };
  const byRows = flag('--rows');
  const layout = flag('--layout');
  const cacheDir = take('--cache-dir') ?? path.join(os.tmpdir(), 'fused-moe-bench-models');
  const prefix = Number(take('--prefix') ?? 16);
  const [model, quantize, stepsArg, streamsArg] = args;
  const steps = Number(stepsArg ?? 100),
    streams = Number(streamsArg ?? 1);
  const modelDir = benchModelDir(cacheDir, model);
  if (!model || !quantize || !modelDir || !(steps >= 1) || !(streams >= 1) || !(prefix >= 1)) {
    console.error(
      'usage: node bench/timeline.js <mixtral | qwen3moe> <none | int8 | int4> [steps] [streams] [--rows] [--layout] [--prefix N] [--cache-dir DIR]\n' +
        `(the model's files come from bench/model.js --models MODEL, in ${cacheDir})`,
    );
    process.exit(2);
  }
  const root = path.join(__dirname, '..');
  const binding = require('node-gyp-build')(root);
  const { MoeModel } = require(path.join(root, 'dist'));
  const f1 = (x) => (Number.isFinite(x) ? x.toFixed(1) : '-');
  const f2 = (x) => (Number.isFinite(x) ? x.toFixed(2) : '-');
  const pct = (x) => (Number.isFinite(x) ? `${(100 * x).toFixed(0)}%` : '-');
  (async () => {
    const m = await MoeModel.load(modelDir, {
      quantize,
      contextLength: prefix + steps + 64,
      maxSequences: streams,
      threads: binding.backendInfo().cpu.threads,
    });
    try {
      const seqs = Array.from({ length: streams }, () => m.createSequence());
      await feedPrompt(m, seqs, prefix);
      const step = (i) =>
        m.step(
          seqs.map((s, j) => ({ sequence: s, tokens: [benchToken(j, 7919 * i)] })),
          { reuseLogits: true },
        );
      const probe = () => binding.bench.readBandwidth(256 << 20, binding.backendInfo().cpu.threads);
      const before = probe();
      for (let i = 0; i < 4; i++) await step(i); // warm
      binding.bench.timeline('start', 1 << 22);
      for (let i = 0; i < steps; i++) await step(4 + i);
      const { events, dropped } = binding.bench.timeline('stop');
      const after = probe();
      const all = eventsOf(events);
      const { jobs, phases } = streamingJobs(all);
      console.log(
        `${model} ${quantize}, ${streams} stream(s), ${steps} steps after ${prefix} tokens; ${binding.backendInfo().cpu.isa}, ` +
          `${binding.backendInfo().cpu.threads} threads; read probe ${f1(before)} GB/s before, ${f1(after)} after` +
          `${dropped ? `; ${dropped} events dropped` : ''}\n`,
      );
      console.log(
        '| job | count | µs | MB | GB/s | thread: busy, items GB/s, first item µs late, first item / others, µs between two items, µs waiting at the end, share of the jobs it ran no item of |',
      );
      console.log('| --- | --- | --- | --- | --- | --- |');
      for (const r of jobTable(jobs)) {
        const t = r.threads.map(
          (x) =>
            `${x.thread}: ${f2(x.busy)}, ${f1(x.itemGBs)}, ${f1(x.startUs)}, ${f2(x.first)}, ${f2(x.gapUs)}, ${f1(x.waitUs)}, ` +
            `${pct(x.absent)}`,
        );
        console.log(`| ${r.label} | ${r.jobs} | ${f1(r.us)} | ${f2(r.MB)} | ${f1(r.GBs)} | ${t.join('; ')} |`);
      }
      console.log('\n| phase | count | µs (median) | µs outside the streaming jobs |');
      console.log('| --- | --- | --- | --- |');
      for (const r of phaseTable(jobs, phases))
        console.log(`| ${r.phase} | ${r.count} | ${f1(r.us)} | ${f1(r.outsideUs)} |`);
      if (layout) {
        console.log(
          '\n| phase | occurrences | its jobs in order: µs of gap + [µs of the job, its items], then µs to its end |',
        );
        console.log('| --- | --- | --- |');
        for (const r of layoutTable(all))
          console.log(`| ${r.phase} | ${r.count} of ${r.of} | ${r.cells.join(' · ')} |`);
      }
      if (byRows) {
        console.log("\n| rows | share of the experts' item time | items GB/s a thread |");
        console.log('| --- | --- | --- |');
        for (const r of rowsTable(jobs))
          console.log(`| ${r.rows} | ${(100 * r.share).toFixed(1)}% | ${f1(r.itemGBs)} |`);
      }
    } finally {
      m.dispose();
    }
  })().catch((err) => {
    console.error(err);
    process.exit(1);
  });
}
