#!/usr/bin/env node
// How long a prompt holds the event loop while it is tokenized: TextTokenizer.encode on the calling
// thread against encodeAsync, which sends a text of WORKER_MIN_CHARS or more to a worker thread
// (lib/text/encode-worker.ts); and while a conversation is rendered through the chat template:
// renderChat against renderChatAsync, which sends one of WORKER_MIN_MESSAGES or more there. Every
// stream of the generation loop waits while the event loop is held, so the figure that matters is the
// longest gap between two turns of the loop during the call, not the call's own time. The tokenizer is
// a byte-level BPE whose merges are learnt here, from a fixed seed, on text of a made-up language with
// a Zipf-like word distribution (the same text style is tokenized): 6,000 words, so the merges end when
// every word is one token (about 4,000). The chat template is one in the style of the ChatML family's
// (a reverse scan for the last user turn, earlier reasoning cut from assistant turns); the
// conversations are of short turns, as many as a request body of a megabyte holds at the most.
//
//   npm run build:ts && node bench/tokenize.js [--sizes 16000,64000,256000] [--messages 1000,5000,20000]
//     [--runs 5] [--merges 4000]
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const { TextTokenizer } = require('../dist');
const { baseVocab, byteChars, byteLevelJson } = require('./tokenizer-file');
const { fmt, longestGap, median } = require('./util');

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : fallback;
}
const SIZES = arg('sizes', '16000,64000,256000').split(',').map(Number);
const MESSAGES = arg('messages', '1000,5000,20000').split(',').map(Number);
const RUNS = Number(arg('runs', 5));
const MERGES = Number(arg('merges', 4000));

function lcg(seed) {
  let s = seed >>> 0;
  return () => (s = (Math.imul(s, 1103515245) + 12345) >>> 0) / 4294967296;
}

// A lexicon of 6,000 words of 1 to 4 syllables, drawn with weight 1 / rank.
const rand = lcg(2026);
const SYL = ['ka', 'to', 'ri', 'men', 'sa', 'lo', 've', 'dun', 'pi', 'shor', 'el', 'tha', 'qu', 'ing', 'ba', 'zo'];
const LEXICON = Array.from({ length: 6000 }, () => {
  let w = '';
  for (let n = 1 + Math.floor(rand() * 4); n > 0; n--) w += SYL[Math.floor(rand() * SYL.length)];
  return w;
});
const CUMULATIVE = [];
LEXICON.reduce((sum, _, i) => (CUMULATIVE[i] = sum + 1 / (i + 1)), 0);
function text(r, chars) {
  let s = '';
  const total = CUMULATIVE[CUMULATIVE.length - 1];
  while (s.length < chars) {
    const x = r() * total;
    let lo = 0,
      hi = CUMULATIVE.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (CUMULATIVE[mid] < x) lo = mid + 1;
      else hi = mid;
    }
    s += (s && r() < 0.08 ? '. ' : ' ') + LEXICON[lo];
  }
  return s.slice(0, chars);
}

const CHAT_TEMPLATE =
  "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}" +
  '{%- set ns = namespace(last_user=messages|length - 1, found=false) %}' +
  '{%- for message in messages[::-1] %}{%- if not ns.found and message.role == "user" %}' +
  '{%- set ns.found = true %}{%- set ns.last_user = (messages|length - 1) - loop.index0 %}{%- endif %}{%- endfor %}' +
  '{%- for message in messages %}' +
  '{%- if message.role == "user" or (message.role == "system" and not loop.first) %}' +
  "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}" +
  '{%- elif message.role == "assistant" %}{%- set content = message.content %}' +
  "{%- if loop.index0 < ns.last_user and '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}" +
  "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}" +
  "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/** A conversation of `n` short turns (3 to 8 words), a system turn first. */
function conversation(r, n) {
  return Array.from({ length: n }, (_, i) => ({
    role: i === 0 ? 'system' : i % 2 ? 'user' : 'assistant',
    content: text(r, 15 + Math.floor(r() * 30)),
  }));
}

/** tokenizer.json of a byte-level BPE with `count` merges learnt on `corpus` (words counted once each). */
function writeTokenizer(dir, corpus, count) {
  const bytes = byteChars();
  const counts = new Map();
  for (const w of corpus.split(/(?= )/)) counts.set(w, (counts.get(w) || 0) + 1);
  let words = [...counts].map(([w, c]) => [[...Buffer.from(w, 'utf8')].map((b) => bytes[b]), c]);
  const vocab = baseVocab();
  const merges = [];
  while (merges.length < count) {
    const pairs = new Map();
    for (const [s, c] of words)
      for (let i = 0; i + 1 < s.length; i++) {
        const key = s[i] + '\u0000' + s[i + 1];
        pairs.set(key, (pairs.get(key) || 0) + c);
      }
    let best = null,
      bestCount = 0;
    for (const [k, c] of pairs) if (c > bestCount || (c === bestCount && k < best)) [best, bestCount] = [k, c];
    if (!best) break;
    const [a, b] = best.split('\u0000');
    merges.push([a, b]);
    if (!(a + b in vocab)) vocab[a + b] = Object.keys(vocab).length;
    words = words.map(([s, c]) => {
      const out = [];
      for (let i = 0; i < s.length; i++)
        if (i + 1 < s.length && s[i] === a && s[i + 1] === b) {
          out.push(a + b);
          i++;
        } else out.push(s[i]);
      return [out, c];
    });
  }
  fs.writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(byteLevelJson(vocab, merges)));
  fs.writeFileSync(
    path.join(dir, 'tokenizer_config.json'),
    JSON.stringify({ bos_token: '<s>', eos_token: '</s>', chat_template: CHAT_TEMPLATE }),
  );
  return merges.length;
}

/**
 * RUNS times: the async call on a fresh input (its wall time and the longest gap of the event loop),
 * then the sync call on another (its time, which is the event loop's hold); medians, and what the last
 * sync call returned. The async call goes first, so that the garbage of the sync call is not collected
 * during it.
 */
async function compare(asyncInput, asyncCall, syncInput, syncCall) {
  const sync = [],
    wall = [],
    held = [];
  let last;
  for (let r = 0; r < RUNS; r++) {
    const other = asyncInput(r);
    const a = await longestGap(() => asyncCall(other));
    wall.push(a.wallMs);
    held.push(a.longestMs);
    const input = syncInput(r);
    const t0 = performance.now();
    last = syncCall(input);
    sync.push(performance.now() - t0);
  }
  return { sync: median(sync), wall: median(wall), held: median(held), last };
}

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fused-moe-tokenize-'));
  try {
    const learnt = writeTokenizer(dir, text(lcg(1), 400_000), MERGES);
    const tokenizer = await TextTokenizer.load(dir);
    console.log(`byte-level BPE of ${learnt} merges; worker from ${TextTokenizer.WORKER_MIN_CHARS} characters`);
    // The worker starts on first use: its start (a thread, the tokenizer built again) is timed apart.
    const first = text(lcg(2), TextTokenizer.WORKER_MIN_CHARS);
    const warm = await longestGap(() => tokenizer.encodeAsync(first));
    console.log(
      `worker start and first encode: ${fmt(warm.wallMs)} ms, event loop held at most ${fmt(warm.longestMs)} ms`,
    );
    console.log(
      '| characters | tokens | encode (event loop held), ms | encodeAsync: wall ms | encodeAsync: event loop held at most, ms |',
    );
    console.log('| --- | --- | --- | --- | --- |');
    for (const size of SIZES) {
      // Fresh texts each run (the BPE cache holds words, not texts).
      const m = await compare(
        (r) => text(lcg(200 + r), size),
        (t) => tokenizer.encodeAsync(t),
        (r) => text(lcg(100 + r), size),
        (t) => tokenizer.encode(t).length,
      );
      console.log(`| ${size} | ${m.last} | ${fmt(m.sync)} | ${fmt(m.wall)} | ${fmt(m.held)} |`);
    }
    console.log(`\nchat template: worker from ${TextTokenizer.WORKER_MIN_MESSAGES} messages`);
    console.log(
      '| messages | characters | JSON bytes | renderChat (event loop held), ms | renderChatAsync: wall ms | renderChatAsync: event loop held at most, ms |',
    );
    console.log('| --- | --- | --- | --- | --- | --- |');
    for (const n of MESSAGES) {
      let bytes = 0;
      const m = await compare(
        (r) => conversation(lcg(400 + r), n),
        (c) => tokenizer.renderChatAsync(c, true, 'messages'),
        (r) => {
          const c = conversation(lcg(300 + r), n);
          bytes = JSON.stringify({ messages: c }).length;
          return c;
        },
        (c) => tokenizer.renderChat(c, true, 'messages').length,
      );
      console.log(`| ${n} | ${m.last} | ${bytes} | ${fmt(m.sync)} | ${fmt(m.wall)} | ${fmt(m.held)} |`);
    }
    tokenizer.dispose();
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
