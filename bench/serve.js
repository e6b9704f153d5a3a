#!/usr/bin/env node
// The server load test: `fused-moe serve` on the Mixtral-width benchmark model, driven over loopback.
//
//   npm run bench:serve                 bf16; about 10 minutes after the model files exist
//   node bench/serve.js --quick         small shapes, a minute
//   --quantize int4  --tokens 32  --cache-dir DIR  --json
//
// Phases (each request: a distinct token-id prompt, greedy, end-of-sequence ignored):
//   1. one at a time: SINGLE streaming requests, each alone (the single-stream rate and latency);
//   2. 16 concurrent streaming clients (as many as --max-sequences: all decode together);
//   3. 32 concurrent streaming clients against --max-sequences 16 (16 run, 16 wait);
//   4. a burst of 200 requests against a queue of 50: those past 16 running + 50 waiting get 429.
// Every request must end with a full answer, a 429 or a 400: nothing may be lost. Reported: requests
// completed and refused, time to first token and inter-token latency p50/p99, aggregate tokens/s over
// the phase's wall time, and the decode rate while all of a phase's streams run.
'use strict';
const { spawn } = require('child_process');
const os = require('os');
const fs = require('fs');
const path = require('path');
const { MODELS, QUICK_MODELS, benchTokens, ensureModel } = require('./model-files');
const { cliOptions } = require('./child');
const { writeBenchTokenizer } = require('./tokenizer-file');
const { fmt, quantile } = require('./util');

const { args, opt, quick, jsonOut, log } = cliOptions({ values: ['--quantize', '--tokens', '--cache-dir'] });
const quantize = opt('--quantize') || 'none';
const m = (quick ? QUICK_MODELS : MODELS).mixtral;
const cacheDir = opt('--cache-dir') || path.join(os.tmpdir(), 'fused-moe-bench-models' + (quick ? '-quick' : ''));
const TOKENS = Number(opt('--tokens') || (quick ? 16 : 32));
const PROMPT = quick ? 16 : 32;
const SINGLE = quick ? 3 : 4;
const MAX_SEQUENCES = 16,
  MAX_QUEUE = 50;
const now = () => Number(process.hrtime.bigint()) / 1e6;

/** One streaming completion; resolves with its status and token times (never rejects). */
async function request(base, seed) {
  const start = now();
  const times = [];
  try {
    const res = await fetch(`${base}/v1/completions`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({
        prompt: benchTokens(PROMPT, m.V, seed),
        max_tokens: TOKENS,
        temperature: 0,
        stream: true,
        ignore_eos: true,
        stream_options: { include_usage: true },
      }),
    });
    if (res.status !== 200) {
      await res.text();
      return { status: res.status, start, times };
    }
    const decoder = new TextDecoder();
    let buffered = '';
    let usage,
      done = false;
    for await (const part of res.body) {
      buffered += decoder.decode(part, { stream: true });
      let cut;
      while ((cut = buffered.indexOf('\n\n')) >= 0) {
        const event = buffered.slice(0, cut);
        buffered = buffered.slice(cut + 2);
        if (!event.startsWith('data: ')) continue;
        const data = event.slice(6);
        if (data === '[DONE]') done = true;
        else {
          const chunk = JSON.parse(data);
          if (chunk.usage) usage = chunk.usage;
          else if (chunk.choices[0].text) times.push(now());
        }
      }
    }
    const complete = done && usage && usage.completion_tokens === TOKENS;
    return { status: complete ? 200 : 'incomplete', start, times, usage };
  } catch (err) {
    return { status: `error: ${err.message}`, start, times };
  }
}

function figures(results, ms, oneAtATime = false) {
  const ok = results.filter((r) => r.status === 200);
  const itl = ok.flatMap((r) => r.times.slice(1).map((t, i) => t - r.times[i]));
  const ttft = ok.map((r) => r.times[0] - r.start);
  const statuses = {};
  for (const r of results) statuses[r.status] = (statuses[r.status] || 0) + 1;
  const tokens = ok.reduce((s, r) => s + r.usage.completion_tokens, 0);
  // The decode rate while every stream of the phase runs: tokens between the last first token and the
  // first last token, over that time; one at a time, each request's own rate.
  const from = Math.max(...ok.map((r) => r.times[0])),
    to = Math.min(...ok.map((r) => r.times[r.times.length - 1]));
  let inWindow = 0;
  for (const r of ok) for (const x of r.times) if (x > from && x <= to) inWindow++;
  const own = ok.map((r) => ((r.times.length - 1) / (r.times[r.times.length - 1] - r.times[0])) * 1e3);
  // Phases in waves (more clients than sequences) have no such window: no figure.
  const decodeTokS = oneAtATime
    ? own.sort((a, b) => a - b)[own.length >> 1]
    : to > from
      ? (inWindow / (to - from)) * 1e3
      : NaN;
  return {
    requests: results.length,
    decodeTokS,
    statuses,
    tokens,
    tokS: (tokens / ms) * 1e3,
    ttftP50: quantile(ttft, 0.5),
    ttftP99: quantile(ttft, 0.99),
    itlP50: quantile(itl, 0.5),
    itlP99: quantile(itl, 0.99),
  };
}

async function main() {
  const files = ensureModel(cacheDir, 'mixtral', m, [], log);
  writeBenchTokenizer(files.hf, m.V);
  const cli = path.join(__dirname, '..', 'bin', 'fused-moe.js');
  const server = spawn(
    process.execPath,
    [
      cli,
      'serve',
      files.hf,
      '--port',
      '0',
      '--quantize',
      quantize,
      '--max-sequences',
      String(MAX_SEQUENCES),
      '--max-queue',
      String(MAX_QUEUE),
      '--context',
      String(PROMPT + TOKENS + 64),
      '--threads',
      '2',
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let base;
  server.stderr.setEncoding('utf8');
  await new Promise((resolve, reject) => {
    server.stderr.on('data', (s) => {
      const hit = /listening on (http:\/\/\S+)/.exec(s);
      if (hit) base = hit[1];
      if (/model ready/.test(s)) resolve();
      if (/failed/.test(s)) reject(new Error(s));
    });
    server.on('exit', (code) => reject(new Error(`the server exited with ${code}`)));
  });
  log(
    `server at ${base}, ${quantize === 'none' ? 'bf16' : quantize}; ${TOKENS} tokens per request, prompts of ${PROMPT}`,
  );
  await request(base, 1); // warm-up
  const phases = {};
  let t = now();
  const single = [];
  for (let i = 0; i < SINGLE; i++) single.push(await request(base, 100 + i));
  phases.single = figures(single, now() - t, true);
  t = now();
  const sixteen = await Promise.all(Array.from({ length: MAX_SEQUENCES }, (_, i) => request(base, 300 + i)));
  phases.concurrent16 = figures(sixteen, now() - t);
  t = now();
  const conc = await Promise.all(Array.from({ length: 32 }, (_, i) => request(base, 200 + i)));
  phases.concurrent32 = figures(conc, now() - t);
  t = now();
  const burst = await Promise.all(Array.from({ length: 200 }, (_, i) => request(base, 1000 + i)));
  phases.burst200 = figures(burst, now() - t);
  const metrics = await (await fetch(`${base}/metrics`)).text();
  server.kill('SIGTERM');
  const exit = await new Promise((r) => server.on('exit', (code) => r(code)));

  log(`\n| phase | requests | outcome | tokens/s (agg., wall) | decode tok/s | TTFT p50/p99 ms | ITL p50/p99 ms |`);
  log(`| --- | --- | --- | --- | --- | --- | --- |`);
  for (const [name, f] of Object.entries(phases))
    log(
      `| ${name} | ${f.requests} | ${Object.entries(f.statuses)
        .map(([s, n]) => `${n}× ${s}`)
        .join(
          ', ',
        )} | ${fmt(f.tokS)} | ${Number.isNaN(f.decodeTokS) ? '—' : fmt(f.decodeTokS)} | ${fmt(f.ttftP50)} / ${fmt(f.ttftP99)} | ${fmt(f.itlP50)} / ${fmt(f.itlP99)} |`,
    );
  const lost = [...single, ...sixteen, ...conc, ...burst].filter(
    (r) => r.status !== 200 && r.status !== 429 && r.status !== 400,
  ).length;
  log(`\nlost (neither a full answer nor 429/400): ${lost}; server exit code after SIGTERM: ${exit}`);
  log(
    `16 streams / one at a time: ${fmt(phases.concurrent16.decodeTokS / phases.single.decodeTokS)}× decode rate; ITL p99 ${fmt(phases.concurrent16.itlP99)} ms`,
  );
  log(
    `32 clients / one at a time: ${fmt(phases.concurrent32.tokS / phases.single.tokS)}× aggregate; ITL p99 ${fmt(phases.concurrent32.itlP99)} ms against single-stream ${fmt(phases.single.itlP99)} ms`,
  );
  const queueLine = metrics
    .split('\n')
    .find((l) => l.startsWith('fused_moe_requests_total{endpoint="/v1/completions",status="429"}'));
  log(`metrics: ${queueLine || 'no 429 counted'}`);
  const out = {
    date: new Date().toISOString(),
    command: `node bench/serve.js ${args.join(' ')}`.trim(),
    cpu: os.cpus()[0].model,
    quantize,
    tokens: TOKENS,
    prompt: PROMPT,
    phases,
    lost,
    exit,
  };
  const file = path.join(__dirname, 'results', `serve-${out.date.replace(/[:.]/g, '-')}${quick ? '-quick' : ''}.json`);
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, JSON.stringify(out, null, 1));
  if (jsonOut) process.stdout.write(JSON.stringify(out) + '\n');
  if (lost > 0 || exit !== 0) process.exitCode = 1;
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
