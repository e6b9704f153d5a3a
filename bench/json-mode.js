#!/usr/bin/env node
// What JSON mode costs per token: the mask of the tokens that can continue a JSON object
// (lib/generate/json-constraint.ts), computed before every draw, against the sampler's own pass over
// the vocabulary (a draw at temperature 1 with no filter, one exponential a token, in the same run),
// and the one-time gathering of the vocabulary's bytes with the longest hold of the event loop.
// The vocabularies are byte-level BPEs made here from a fixed seed in the proportions of a real one:
// words with and without a leading space, runs of spaces and newlines, digits, punctuation and
// bracket runs as code and JSON produce them, and words of accented and CJK text (the bytes of a
// character split over tokens as BPE does). The JSON texts fed through are random objects, tokenized
// by longest match over the vocabulary.
//
//   npm run build:ts && node bench/json-mode.js [--vocab 32000,151936] [--texts 40] [--runs 5]
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const { TextTokenizer } = require('../dist');
const { JsonConstraint } = require('../dist/generate/json-constraint');
const { ANY_OBJECT } = require('../dist/generate/json-schema');
const { Sampler } = require('../dist/generate/sampling');
const { baseVocab, byteChars, byteLevelJson } = require('./tokenizer-file');
const { fmt, longestGap, median, quantile } = require('./util');

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : fallback;
}
const VOCABS = arg('vocab', '32000,151936').split(',').map(Number);
const TEXTS = Number(arg('texts', 40));
const RUNS = Number(arg('runs', 5));

function lcg(seed) {
  let s = seed >>> 0;
  return () => (s = (Math.imul(s, 1103515245) + 12345) >>> 0) / 4294967296;
}

const LETTERS = 'etaoinshrdlcumwfgypbvkjxqz';
const PUNCT = '{}[]":,.;()=<>/\\_-+*#!?\'`|&%$@';
const WIDE = 'éèàüöñçßøåæœ東京日本語中文汉字한국어データ';

/** `count` distinct token strings (as text) in the proportions of a real byte-level vocabulary. */
function pieces(count, rand) {
  const pick = (s) => [...s][Math.floor(rand() * [...s].length)];
  const word = (n) => Array.from({ length: n }, () => pick(LETTERS)).join('');
  const out = new Set();
  while (out.size < count) {
    const r = rand();
    let p;
    if (r < 0.45) p = ' ' + word(2 + Math.floor(rand() * 9));
    else if (r < 0.7) p = word(2 + Math.floor(rand() * 9));
    else if (r < 0.78) p = Array.from({ length: 1 + Math.floor(rand() * 4) }, () => pick(PUNCT)).join('');
    else if (r < 0.84) p = (rand() < 0.5 ? ' ' : '') + String(Math.floor(rand() * 1000));
    else if (r < 0.88) p = ['\n', ' ', '\t', '\n\n'][Math.floor(rand() * 4)].repeat(1 + Math.floor(rand() * 8));
    else p = (rand() < 0.5 ? ' ' : '') + Array.from({ length: 1 + Math.floor(rand() * 3) }, () => pick(WIDE)).join('');
    if (r >= 0.88 && rand() < 0.3) {
      // A piece that ends inside a character, as byte-level merges make them.
      const b = Buffer.from(p, 'utf8');
      if (b.length > 2) p = b.subarray(0, b.length - 1);
    }
    out.add(typeof p === 'string' ? Buffer.from(p, 'utf8').toString('latin1') : p.toString('latin1'));
  }
  return [...out].map((s) => Buffer.from(s, 'latin1'));
}

/** Writes a byte-level tokenizer of `vocab` ids; returns the bytes of every id (specials empty). */
function writeVocabulary(dir, vocab) {
  const chars = byteChars();
  const v = baseVocab();
  const bytes = Array.from({ length: 259 }, (_, i) => (i < 3 ? Buffer.alloc(0) : Buffer.from([i - 3])));
  for (const b of pieces(vocab - 259, lcg(vocab))) {
    const spelled = [...b].map((x) => chars[x]).join('');
    if (spelled in v) continue;
    v[spelled] = bytes.length;
    bytes.push(b);
  }
  fs.writeFileSync(path.join(dir, 'tokenizer.json'), JSON.stringify(byteLevelJson(v, [])));
  fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify({ bos_token: '<s>', eos_token: '</s>' }));
  return bytes;
}

/** A random JSON object as a model might write it: keys, strings of words, numbers, lists, nesting. */
function randomObject(rand, depth) {
  const value = () => {
    const r = rand();
    if (depth < 3 && r < 0.15) return randomObject(rand, depth + 1);
    if (r < 0.3) return Array.from({ length: Math.floor(rand() * 4) }, () => Math.round(rand() * 1000) / 10);
    if (r < 0.5) return Math.round((rand() - 0.3) * 1e5) / 100;
    if (r < 0.6) return [true, false, null][Math.floor(rand() * 3)];
    const words = Array.from({ length: 1 + Math.floor(rand() * 8) }, () =>
      Array.from({ length: 2 + Math.floor(rand() * 7) }, () => LETTERS[Math.floor(rand() * 26)]).join(''),
    );
    return words.join(' ') + (rand() < 0.2 ? ' "quoted" é東' : '');
  };
  const o = {};
  for (let i = 1 + Math.floor(rand() * 5); i > 0; i--) o[`key_${Math.floor(rand() * 100)}`] = value();
  return o;
}

/** Token ids of `text` by longest match over the vocabulary's bytes. */
function tokenize(text, byBytes, longest) {
  const b = Buffer.from(text, 'utf8');
  const ids = [];
  for (let at = 0; at < b.length;) {
    for (let n = Math.min(longest, b.length - at); n > 0; n--) {
      const id = byBytes.get(b.subarray(at, at + n).toString('latin1'));
      if (id !== undefined) {
        ids.push(id);
        at += n;
        break;
      }
    }
  }
  return ids;
}

async function main() {
  console.log(
    '| vocabulary | bytes gathered: wall ms | event loop held at most, ms | mask per token: median, p90, max µs | a draw at temperature 1, µs | mask / draw | tokens allowed, median |',
  );
  console.log('| --- | --- | --- | --- | --- | --- | --- |');
  for (const V of VOCABS) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fused-moe-json-'));
    try {
      const bytes = writeVocabulary(dir, V);
      const byBytes = new Map(bytes.map((b, id) => [b.toString('latin1'), id]).filter(([k], id) => id >= 3 && k));
      const longest = bytes.reduce((m, b) => Math.max(m, b.length), 0);
      const tokenizer = await TextTokenizer.load(dir);
      const eos = new Set([2]);
      const built = await longestGap(() =>
        JsonConstraint.create(tokenizer, V, { schema: ANY_OBJECT, prefix: '', suffix: '' }, eos),
      );
      const rand = lcg(7);
      const masks = [];
      const allowed = [];
      const mask = new Uint8Array(V);
      for (let run = 0; run < RUNS; run++)
        for (let t = 0; t < TEXTS; t++) {
          const ids = tokenize(JSON.stringify(randomObject(rand, 0), null, rand() < 0.5 ? 2 : 0), byBytes, longest);
          const constraint = await JsonConstraint.create(
            tokenizer,
            V,
            { schema: ANY_OBJECT, prefix: '', suffix: '' },
            eos,
          );
          for (const id of ids) {
            const t0 = performance.now();
            constraint.allowed(mask);
            masks.push((performance.now() - t0) * 1e3);
            if (run === 0) allowed.push(mask.reduce((s, x) => s + x, 0));
            constraint.advance(id);
          }
        }
      const logits = Float32Array.from({ length: V }, () => (rand() * 2 - 1) * 8);
      const sampler = new Sampler({ temperature: 1, topK: 0, topP: 1, minP: 0, repetitionPenalty: 1, seed: 1 });
      const draws = [];
      for (let i = 0; i < 50 * RUNS; i++) {
        const t0 = performance.now();
        sampler.sample(logits, []);
        draws.push((performance.now() - t0) * 1e3);
      }
      const m = median(masks);
      const d = median(draws);
      console.log(
        `| ${V} | ${fmt(built.wallMs)} | ${fmt(built.longestMs)} | ${fmt(m)}, ${fmt(quantile(masks, 0.9))}, ${fmt(masks.reduce((a, b) => Math.max(a, b), 0))} | ${fmt(d)} | ${fmt(m / d)} | ${median(allowed)} |`,
      );
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
