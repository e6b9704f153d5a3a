/**
 * Response schemas (lib/generate/json-schema): random instances of each schema and structured
 * mutations of them, against a validator of the same JSON Schema subset written here; every prefix of
 * a valid text accepted; what the compiler refuses; and generations that end in a valid instance.
 */
import * as path from 'path';
import { MoeModel } from '../lib/index';
import { compileSchema, jsonAdvance, jsonComplete, jsonStart } from '../lib/generate/json-schema';
import { makeTempDir, removeTempDir } from './helpers/checkpoint';
import { writeRandomModel } from './helpers/model/random-model';
import { rng } from './helpers/reference';
import { writeTokenizer } from './helpers/text/tokenizer-files';

type Schema = Record<string, unknown>;

const ADDRESS: Schema = {
  type: 'object',
  properties: { city: { type: 'string' }, zip: { type: ['string', 'null'] } },
  required: ['city'],
  additionalProperties: false,
};
const SCHEMAS: Record<string, Schema> = {
  'flat, every key required': {
    type: 'object',
    properties: {
      name: { type: 'string', minLength: 1 },
      age: { type: 'integer' },
      score: { type: 'number' },
      ok: { type: 'boolean' },
      color: { enum: ['red', 'green', 'blue "b"', 7, null] },
      kind: { const: 'person' },
    },
    required: ['name', 'age', 'score', 'ok', 'color', 'kind'],
    additionalProperties: false,
  },
  'nested, optional keys, arrays, anyOf, extra keys of a type': {
    type: 'object',
    properties: {
      tags: { type: 'array', items: { type: 'string' } },
      address: ADDRESS,
      value: { anyOf: [{ type: 'integer' }, { type: 'string' }, { type: 'array', items: { type: 'boolean' } }] },
    },
    required: ['tags'],
    additionalProperties: { type: 'number' },
  },
  'recursive, through $defs': {
    $defs: {
      node: {
        type: 'object',
        properties: { label: { type: 'string' }, children: { type: 'array', items: { $ref: '#/$defs/node' } } },
        required: ['label', 'children'],
        additionalProperties: false,
      },
    },
    $ref: '#/$defs/node',
  },
};

/** The subset's meaning, from its definition: does `v` fit `schema` (with `root` for $ref)? */
function valid(v: unknown, schema: unknown, root: Schema): boolean {
  if (schema === true) return true;
  const s = schema as Schema;
  if (typeof s.$ref === 'string') return valid(v, (root.$defs as Schema)[s.$ref.split('/').pop()!], root);
  const branches = (s.anyOf ?? s.oneOf) as unknown[] | undefined;
  if (branches) return branches.some((b) => valid(v, b, root));
  if ('const' in s) return JSON.stringify(v) === JSON.stringify(s.const);
  if (Array.isArray(s.enum)) return s.enum.some((e) => JSON.stringify(e) === JSON.stringify(v));
  const types = s.type === undefined ? null : ([] as unknown[]).concat(s.type);
  const typeOf = (x: unknown) =>
    x === null
      ? 'null'
      : Array.isArray(x)
        ? 'array'
        : typeof x === 'number'
          ? Number.isInteger(x)
            ? 'integer'
            : 'number'
          : typeof x;
  const t = typeOf(v);
  if (types && !types.includes(t) && !(t === 'integer' && types.includes('number'))) return false;
  if (t === 'object') {
    const o = v as Record<string, unknown>;
    const props = (s.properties ?? {}) as Record<string, unknown>;
    for (const k of (s.required ?? []) as string[]) if (!(k in o)) return false;
    for (const [k, x] of Object.entries(o)) {
      if (k in props) {
        if (!valid(x, props[k], root)) return false;
      } else if (s.additionalProperties === false) return false;
      else if (s.additionalProperties !== undefined && !valid(x, s.additionalProperties, root)) return false;
    }
  }
  if (t === 'array' && s.items !== undefined) return (v as unknown[]).every((x) => valid(x, s.items, root));
  return true;
}

/** A random instance of the schema. */
function instance(schema: unknown, root: Schema, rand: () => number, depth = 0): unknown {
  const s = schema as Schema;
  const pick = <T>(list: T[]) => list[Math.floor(rand() * list.length)];
  if (typeof s.$ref === 'string') return instance((root.$defs as Schema)[s.$ref.split('/').pop()!], root, rand, depth);
  if (s.anyOf) return instance(pick(s.anyOf as unknown[]), root, rand, depth);
  if ('const' in s) return s.const;
  if (Array.isArray(s.enum)) return pick(s.enum);
  const type = pick(([] as string[]).concat((s.type as string) ?? 'string'));
  if (type === 'object') {
    const o: Record<string, unknown> = {};
    const props = (s.properties ?? {}) as Record<string, unknown>;
    for (const k of Object.keys(props))
      if (((s.required ?? []) as string[]).includes(k) || (rand() < 0.6 && depth < 4))
        o[k] = instance(props[k], root, rand, depth + 1);
    if (isSchema(s.additionalProperties) && rand() < 0.5)
      o[`extra${Math.floor(rand() * 9)}`] = instance(s.additionalProperties, root, rand, depth + 1);
    return o;
  }
  if (type === 'array')
    return depth > 3
      ? []
      : Array.from({ length: Math.floor(rand() * 3) }, () => instance(s.items, root, rand, depth + 1));
  if (type === 'integer') return Math.floor((rand() - 0.5) * 2000);
  if (type === 'number') return Math.round((rand() - 0.5) * 1e6) / 1e3;
  if (type === 'boolean') return rand() < 0.5;
  if (type === 'null') return null;
  return pick(['', 'Zürich', 'a "q" \\ b', 'line\nbreak', '東京 🙂']);
}
const isSchema = (v: unknown) => typeof v === 'object' && v !== null;

/** A structured change of a value: a key dropped or added, a value of another type or out of the enum. */
function mutate(v: unknown, rand: () => number): unknown {
  if (v === null || typeof v !== 'object') {
    return [1.5, 'text', true, null, [], {}, 42, 'blue'][Math.floor(rand() * 8)];
  }
  if (Array.isArray(v)) {
    if (v.length === 0 || rand() < 0.3) return [...v, [7, 'x', false, {}][Math.floor(rand() * 4)]];
    const i = Math.floor(rand() * v.length);
    return v.map((x, j) => (j === i ? mutate(x, rand) : x));
  }
  const o = { ...(v as Record<string, unknown>) };
  const keys = Object.keys(o);
  const r = rand();
  if (r < 0.25 && keys.length > 0) delete o[keys[Math.floor(rand() * keys.length)]];
  else if (r < 0.45) o[['name', 'unknown', 'extra1', 'city'][Math.floor(rand() * 4)]] = 'added';
  else if (keys.length > 0) {
    const k = keys[Math.floor(rand() * keys.length)];
    o[k] = mutate(o[k], rand);
  }
  return o;
}

const bytesOf = (text: string) => new Uint8Array(Buffer.from(text, 'utf8'));

describe.each(Object.entries(SCHEMAS))('schema: %s', (_, schema) => {
  const root = compileSchema(schema, 'schema');

  test('every prefix of a valid instance is accepted, and the whole text is complete', () => {
    const rand = rng(11);
    for (let i = 0; i < 200; i++) {
      const value = instance(schema, schema, rand);
      expect(valid(value, schema, schema)).toBe(true);
      const text = JSON.stringify(value, null, rand() < 0.5 ? 2 : undefined);
      const bytes = bytesOf(text);
      let s = jsonStart(root);
      for (let k = 0; k < bytes.length; k++) {
        const next = jsonAdvance(s, bytes.subarray(k, k + 1));
        if (!next) throw new Error(`refused byte ${k} of ${text}`);
        s = next;
      }
      expect(jsonComplete(s)).toBe(true);
    }
  });

  test('mutated instances: complete exactly when the reference validator accepts them', () => {
    const rand = rng(12);
    let accepted = 0;
    let refused = 0;
    for (let i = 0; i < 1500; i++) {
      const value = mutate(instance(schema, schema, rand), rand);
      const text = JSON.stringify(value);
      const s = jsonAdvance(jsonStart(root), bytesOf(text));
      const complete = s !== null && jsonComplete(s);
      expect([text, complete]).toEqual([text, valid(value, schema, schema)]);
      if (complete) accepted++;
      else refused++;
    }
    expect(accepted).toBeGreaterThan(50);
    expect(refused).toBeGreaterThan(200);
  });
});

test('integers take no fraction or exponent; an enum value must end where one does', () => {
  const root = compileSchema(SCHEMAS['flat, every key required'], 's');
  const base = '{"name": "x", "age": 3, "score": 1, "ok": true, "color": "red", "kind": "person"}';
  const complete = (text: string) => {
    const s = jsonAdvance(jsonStart(root), bytesOf(text));
    return s !== null && jsonComplete(s);
  };
  expect(complete(base)).toBe(true);
  expect(complete(base.replace('"age": 3', '"age": 3.5'))).toBe(false);
  expect(complete(base.replace('"age": 3', '"age": 3e2'))).toBe(false);
  expect(complete(base.replace('"score": 1', '"score": -1.5e-3'))).toBe(true);
  expect(complete(base.replace('"red"', '"re"'))).toBe(false);
  expect(complete(base.replace('"red"', '"blue \\"b\\""'))).toBe(true);
  expect(complete(base.replace('"red"', '7'))).toBe(true);
  expect(complete(base.replace('"red"', '70'))).toBe(false);
  expect(jsonAdvance(jsonStart(root), bytesOf('{"nam'))).not.toBeNull();
  expect(jsonAdvance(jsonStart(root), bytesOf('{"nax'))).toBeNull();
  expect(jsonAdvance(jsonStart(root), bytesOf('{"name": "a", "name"'))).toBeNull(); // a key once
  expect(jsonAdvance(jsonStart(root), bytesOf('{"name": "a"}'))).toBeNull(); // required keys missing
});

test.each([
  [{ type: 'object', allOf: [] }, /the keyword 'allOf' is not supported/],
  [{ type: 'object', properties: { a: { not: {} } } }, /schema\.properties\["a"\]: the keyword 'not'/],
  [{ $ref: '#/$defs/missing' }, /schema\.\$ref: "#\/\$defs\/missing" names no definition/],
  [{ anyOf: [{ type: 'object' }, { type: 'object', properties: {} }] }, /branches must start with different kinds/],
  [{ type: 'object', properties: {}, required: ['a'] }, /required names 'a', which is not in its properties/],
  [{ type: 'tuple' }, /schema\.type must be one of object, array, string/],
  [
    { $defs: { a: { anyOf: [{ $ref: '#/$defs/a' }] } }, $ref: '#/$defs/a' },
    /refers to itself through anyOf or \$ref alone/,
  ],
  [{ $defs: { a: { $ref: '#/$defs/a' } }, $ref: '#/$defs/a' }, /"#\/\$defs\/a" refers to itself alone/],
  ['object', /schema must be a JSON Schema object/],
  [{ enum: Array.from({ length: 1025 }, (_, i) => i) }, /schema\.enum holds 1025 values; at most 1024/],
  [
    { type: 'object', properties: Object.fromEntries(Array.from({ length: 1025 }, (_, i) => [`k${i}`, {}])) },
    /properties holds more than 1024 keys/,
  ],
])('refused: %j', (schema, message) => {
  expect(() => compileSchema(schema, 'schema')).toThrow(message);
});

test('exact text before and after the value: a tool call in the Hermes syntax', () => {
  const root = compileSchema(
    {
      type: 'object',
      properties: { name: { const: 'get_weather' }, arguments: { type: 'object' } },
      required: ['name', 'arguments'],
      additionalProperties: false,
    },
    's',
  );
  const wrap = { prefix: '<tool_call>\n', suffix: '\n</tool_call>' };
  const run = (text: string) => jsonAdvance(jsonStart(root, wrap), bytesOf(text));
  const call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bern"}}\n</tool_call>';
  expect(jsonComplete(run(call)!)).toBe(true);
  expect(jsonComplete(run(call.slice(0, -1))!)).toBe(false);
  for (let k = 0; k <= call.length; k++) expect(run(call.slice(0, k))).not.toBeNull();
  expect(run('{"name"')).toBeNull();
  expect(run('<tool_call>\n{"name": "other"')).toBeNull();
  expect(run(call.replace('}\n</', '} \n</'))).toBeNull(); // the suffix is exact
  expect(run(call + ' ')).not.toBeNull(); // space after the whole text, as after any value
});

test('schemas nest 64 levels deep at most, and hold 10,000 schemas at most', () => {
  const nested = (n: number) => {
    let s: object = { type: 'string' };
    for (let i = 0; i < n; i++) s = { type: 'array', items: s };
    return s;
  };
  expect(() => compileSchema(nested(64), 'schema')).not.toThrow();
  expect(() => compileSchema(nested(65), 'schema')).toThrow(/schemas nest deeper than 64 levels/);
  expect(() => compileSchema(nested(100000), 'schema')).toThrow(/schemas nest deeper than 64 levels/);
  const wide = {
    type: 'object',
    properties: Object.fromEntries(Array.from({ length: 1000 }, (_, i) => [`k${i}`, {}])),
  };
  const many = {
    type: 'object',
    properties: Object.fromEntries(Array.from({ length: 11 }, (_, i) => [`w${i}`, wide])),
  };
  expect(() => compileSchema(many, 'schema')).toThrow(/schema has more than 10000 schemas in it/);
});

describe('generation with a response schema', () => {
  let dir = '';
  let model: MoeModel;
  beforeAll(async () => {
    dir = makeTempDir('json-schema');
    const hf = writeRandomModel(path.join(dir, 'model'), { family: 'qwen3moe', seed: 25, gguf: false }).hfDir;
    writeTokenizer(hf, 'sentencepiece', 384);
    model = await MoeModel.load(hf, { maxSequences: 8, contextLength: 512 });
  });
  afterAll(() => {
    model.dispose();
    removeTempDir(dir);
  });

  test('sampled texts are prefixes of instances, and those that end are valid instances', async () => {
    const schema = {
      type: 'object',
      properties: { ok: { type: 'boolean' }, color: { enum: ['red', 'green'] }, n: { type: 'integer' } },
      required: ['ok', 'color', 'n'],
      additionalProperties: false,
    };
    const root = compileSchema(schema, 'schema');
    const results = await Promise.all(
      Array.from({ length: 8 }, (_, seed) =>
        model.complete('JSON please', { temperature: 1, seed, maxTokens: 400, responseFormat: { schema } }),
      ),
    );
    let whole = 0;
    for (const r of results) {
      // The SentencePiece decoder drops the first space of the text; the mask saw it.
      expect(jsonAdvance(jsonStart(root), bytesOf(r.text))).not.toBeNull();
      if (r.finishReason === 'stop') {
        expect(valid(JSON.parse(r.text), schema, schema)).toBe(true);
        whole++;
      }
    }
    expect(whole).toBeGreaterThan(0);
    expect(() => model.generate('x', { responseFormat: { schema: { type: 'object', not: {} } } })).toThrow(
      /options\.responseFormat\.schema: the keyword 'not' is not supported/,
    );
  });
});
