/**
 * JSON mode: the byte automaton (lib/generate/json-prefix) against JSON.parse on random object texts
 * and their mutations, its mask over real vocabularies against the automaton token by token, and
 * whole generations that stay JSON and end with a whole object.
 */
import * as fs from 'fs';
import * as path from 'path';
import { MoeModel } from '../lib/index';
import { JsonConstraint } from '../lib/generate/json-constraint';
import { ANY_OBJECT, JsonState, MAX_GAP, jsonAdvance, jsonComplete, jsonStart } from '../lib/generate/json-schema';
import { TextTokenizer } from '../lib/text/tokenizer';
import { makeTempDir, removeTempDir } from './helpers/checkpoint';
import { writeRandomModel } from './helpers/model/random-model';
import { rng } from './helpers/reference';
import { writeTokenizer } from './helpers/text/tokenizer-files';

const bytesOf = (s: string) => new Uint8Array(Buffer.from(s, 'utf8'));
const JSON_START = jsonStart(ANY_OBJECT);
const run = (s: string) => jsonAdvance(JSON_START, bytesOf(s));

/** A random JSON value written by JSON.stringify, with random space between tokens. */
function randomValue(rand: () => number, depth: number): unknown {
  const r = rand();
  if (depth > 3 || r < 0.35) {
    const pick = Math.floor(rand() * 6);
    if (pick === 0) return Math.round((rand() - 0.5) * 1e6) / (rand() < 0.5 ? 1 : 1000);
    if (pick === 1) return (rand() - 0.5) * 10 ** Math.floor(rand() * 40 - 20);
    if (pick === 2) return [true, false, null][Math.floor(rand() * 3)];
    const chars = 'ab "\\/\n\t\u0001é東🙂{}[],:';
    return Array.from({ length: Math.floor(rand() * 8) }, () => [...chars][Math.floor(rand() * 15)]).join('');
  }
  if (r < 0.6) return Array.from({ length: Math.floor(rand() * 4) }, () => randomValue(rand, depth + 1));
  return randomObject(rand, depth + 1);
}
function randomObject(rand: () => number, depth: number): Record<string, unknown> {
  const o: Record<string, unknown> = {};
  for (let i = Math.floor(rand() * 4); i > 0; i--) o[`k${Math.floor(rand() * 100)}é`] = randomValue(rand, depth);
  return o;
}
function spaced(text: string, rand: () => number): string {
  // Space only outside strings: after structural characters.
  let out = '';
  let inString = false;
  let escaped = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    out += c;
    if (inString && (escaped || c === '\\')) escaped = !escaped;
    else if (c === '"') inString = !inString;
    else if (!inString && '{[,:'.includes(c) && rand() < 0.3)
      out += [' ', '\n', '\t', '\r\n  '][Math.floor(rand() * 4)];
  }
  return (rand() < 0.3 ? ' \n' : '') + out + (rand() < 0.3 ? '\n' : '');
}
function parsesAsObject(text: string): boolean {
  try {
    const v: unknown = JSON.parse(text);
    return v !== null && typeof v === 'object' && !Array.isArray(v);
  } catch {
    return false;
  }
}

test('every byte prefix of a JSON object text is accepted, and the whole text is complete', () => {
  const rand = rng(3);
  for (let i = 0; i < 300; i++) {
    const text = spaced(JSON.stringify(randomObject(rand, 0)), rand);
    const bytes = bytesOf(text);
    let s: JsonState | null = JSON_START;
    for (let k = 0; k < bytes.length; k++) {
      s = jsonAdvance(s!, bytes.subarray(k, k + 1));
      expect(s).not.toBeNull();
    }
    expect(jsonComplete(s!)).toBe(true);
    // Cut anywhere, the two parts give the same state as the whole.
    const cut = Math.floor(rand() * bytes.length);
    const split = jsonAdvance(jsonAdvance(JSON_START, bytes.subarray(0, cut))!, bytes.subarray(cut));
    expect(split).toEqual(s);
  }
});

test('on mutated texts the automaton agrees with JSON.parse: complete exactly when it parses as an object', () => {
  const rand = rng(4);
  const alphabet = ' {}[],:"\\-+.0123456789eEtrufalsn\u0001é';
  let accepted = 0;
  let refused = 0;
  for (let i = 0; i < 3000; i++) {
    let text = JSON.stringify(randomObject(rand, 0));
    for (let m = 1 + Math.floor(rand() * 2); m > 0; m--) {
      const at = Math.floor(rand() * (text.length + 1));
      const c = [...alphabet][Math.floor(rand() * alphabet.length)];
      const op = Math.floor(rand() * 3);
      text = text.slice(0, at) + (op === 2 ? '' : c) + text.slice(op === 0 ? at : at + 1);
    }
    const s = run(text);
    const complete = s !== null && jsonComplete(s);
    expect([text, complete]).toEqual([text, parsesAsObject(text)]);
    if (complete) accepted++;
    else refused++;
  }
  expect(accepted).toBeGreaterThan(100);
  expect(refused).toBeGreaterThan(1000);
});

test.each([
  ['{"a": 01}', false],
  ['{"a": -}', false],
  ['{"a": 1.}', false],
  ['{"a": 1e+}', false],
  ['{"a": .5}', false],
  ['{"a": "\\u12G4"}', false],
  ['{"a": "tab\there"}', false],
  ['[1, 2]', false],
  ['"text"', false],
  ['{"a": 1,}', false],
  ['{"a" 1}', false],
  ['{"a": 1}}', false],
  ['{"a": 1} x', false],
  ['{"a": [1, {"b": null}], "c": -0.5e-3, "d": "\\u00e9\\n"}  \n', true],
])('%j: complete %s', (text, complete) => {
  const s = run(text);
  expect(s !== null && jsonComplete(s)).toBe(complete);
  expect(parsesAsObject(text)).toBe(complete);
});

test('a gap between tokens holds at most MAX_GAP space bytes', () => {
  expect(jsonComplete(run(`{${' '.repeat(MAX_GAP)}"a":${'\n'.repeat(MAX_GAP)}1}`)!)).toBe(true);
  expect(run(`{${' '.repeat(MAX_GAP + 1)}`)).toBeNull();
  expect(run(`{"a": 1,${'\t'.repeat(MAX_GAP)}\n`)).toBeNull();
  expect(run(`{"a": "${' '.repeat(3 * MAX_GAP)}"}`)).not.toBeNull(); // inside a string, space is text
});

test.each([
  ['{"a": tru', true],
  ['{"a": -', true],
  ['{"a": 1e', true],
  ['{"a": "\\u00', true],
  ['{"a": [', true],
  ['{"a": 01', false],
  ['{"a": tx', false],
  ['x', false],
])('prefix %j is accepted: %s', (text, ok) => {
  expect(run(text) !== null).toBe(ok);
});

let dir = '';
beforeAll(() => {
  dir = makeTempDir('json');
});
afterAll(() => removeTempDir(dir));

describe.each(['byte-level', 'sentencepiece'] as const)('%s vocabulary', (kind) => {
  let tokenizer: TextTokenizer;
  const V = 384;
  beforeAll(async () => {
    const d = path.join(dir, `tok-${kind}`);
    fs.mkdirSync(d, { recursive: true });
    writeTokenizer(d, kind, V);
    tokenizer = (await TextTokenizer.load(d))!;
  });

  test('the mask is the automaton run on each token, in every state of a text', async () => {
    const rand = rng(kind === 'byte-level' ? 5 : 6);
    const eos = new Set([2]);
    for (let i = 0; i < 12; i++) {
      const text = spaced(JSON.stringify(randomObject(rand, 0)), rand);
      const ids = tokenizer.encode(text, false);
      const constraint = await JsonConstraint.create(tokenizer, V, { schema: ANY_OBJECT, prefix: '', suffix: '' }, eos);
      let state: JsonState = JSON_START;
      const mask = new Uint8Array(V);
      for (const id of ids) {
        constraint.allowed(mask);
        for (let t = 0; t < V; t++) {
          const bytes = tokenizer.specialTokenIds.has(t) ? new Uint8Array(0) : tokenizer.tokenBytes(t);
          const expected = jsonComplete(state) ? eos.has(t) : bytes.length > 0 && jsonAdvance(state, bytes) !== null;
          if (mask[t] !== (expected ? 1 : 0))
            throw new Error(`token ${t} after ${JSON.stringify(text)}: mask ${mask[t]}`);
        }
        const next = jsonAdvance(state, tokenizer.tokenBytes(id));
        if (next === null) break; // the text's own tokens may not start at the object (a leading space piece)
        state = next;
        constraint.advance(id);
      }
    }
  });
});

describe('generation in JSON mode', () => {
  let model: MoeModel;
  beforeAll(async () => {
    const hf = writeRandomModel(path.join(dir, 'model'), { family: 'mixtral', seed: 24, gguf: false }).hfDir;
    writeTokenizer(hf, 'byte-level', 320);
    model = await MoeModel.load(hf, { maxSequences: 4, contextLength: 512 });
  });
  afterAll(() => model.dispose());

  test('greedy: at each step the argmax of model.logits over the tokens that keep the text JSON', async () => {
    const prompt = model.tokenize('Answer in JSON:');
    const result = await model.complete(prompt, { temperature: 0, maxTokens: 40, responseFormat: 'json' });
    let state: JsonState = JSON_START;
    const seq = [...prompt];
    for (const token of result.tokens) {
      const logits = await model.logits(seq);
      let best = -1;
      for (let t = 0; t < logits.length; t++) {
        const fits = jsonComplete(state)
          ? t === 2
          : !model.tokenizer!.specialTokenIds.has(t) && jsonAdvance(state, model.tokenizer!.tokenBytes(t)) !== null;
        if (fits && (best < 0 || logits[t] > logits[best])) best = t;
      }
      expect(token).toBe(best);
      if (token === 2) break;
      state = jsonAdvance(state, model.tokenizer!.tokenBytes(token))!;
      seq.push(token);
    }
    const plain = await model.complete(prompt, { temperature: 0, maxTokens: 40 });
    expect(plain.tokens).not.toEqual(result.tokens); // the constraint did change the choices
  });

  test('sampled: every text is a JSON prefix, and those that end are whole objects', async () => {
    // A bias towards the closing characters, so that random weights finish their objects.
    const bias: Record<number, number> = {};
    for (const c of ['"', '}', ']']) for (const t of model.tokenize(c, { addSpecialTokens: false })) bias[t] = 4;
    const results = await Promise.all(
      Array.from({ length: 8 }, (_, seed) =>
        model.complete('JSON please', {
          temperature: 1,
          topP: 0.95,
          seed,
          maxTokens: 200,
          logitBias: bias,
          responseFormat: 'json',
        }),
      ),
    );
    let whole = 0;
    for (const r of results) {
      const state = run(r.text);
      expect(state).not.toBeNull();
      if (r.finishReason === 'stop') {
        expect(parsesAsObject(r.text)).toBe(true);
        expect(r.tokens.at(-1)).toBe(2);
        whole++;
      }
    }
    expect(whole).toBeGreaterThan(0);
    expect(() => model.generate('x', { responseFormat: 'yaml' as never })).toThrow(
      /options\.responseFormat must be 'text', 'json' or \{ schema, prefix\?, suffix\? \}, got the string 'yaml'/,
    );
  });
});
