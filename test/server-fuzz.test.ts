/**
 * Hostile request bodies against the server over a real (tiny) model: thousands of requests built from
 * a valid one with one to three fields replaced by values of every JSON type and shape (out of range,
 * wrong type, nested, huge, malformed schemas and tools, cut-off JSON), seeded. Every answer must be
 * 200 or a 4xx carrying an OpenAI error object; none may be a 500 or a dropped connection, and
 * afterwards no sequence is left running and a plain request still gives the model's own text.
 */
import * as path from 'path';
import { AddressInfo } from 'net';
import { MoeModel } from '../lib/index';
import { createServer, FusedMoeServer } from '../lib/server/server';
import { rng } from './helpers/reference';
import { makeTempDir, removeTempDir } from './helpers/checkpoint';
import { writeRandomModel } from './helpers/model/random-model';
import { TOOLS_TEMPLATE, writeTokenizer } from './helpers/text/tokenizer-files';

let dir = '';
let model: MoeModel;
let server: FusedMoeServer;
let base = '';

beforeAll(async () => {
  dir = makeTempDir('server-fuzz');
  const hf = writeRandomModel(path.join(dir, 'mixtral'), { family: 'mixtral', seed: 5, gguf: false }).hfDir;
  writeTokenizer(hf, 'byte-level', 320, { chatTemplate: TOOLS_TEMPLATE });
  model = await MoeModel.load(hf, { maxSequences: 4, contextLength: 256 });
  server = createServer(model, { modelId: 'tiny' });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});
afterAll(async () => {
  await server?.shutdown(0);
  model?.dispose();
  removeTempDir(dir);
});

const nested = (depth: number): unknown => (depth === 0 ? 1 : [nested(depth - 1)]);
const schema = (s: object) => ({ type: 'json_schema', json_schema: { name: 'x', schema: s } });
const tool = (parameters: unknown) => [{ type: 'function', function: { name: 'f', parameters } }];
// prettier-ignore
const VALUES: unknown[] = [
  null, true, false, 0, 1, 2, -1, 1.5, -0.5, 1e20, -1e20, 5e-324, 1e308, 2 ** 53 + 1,
  '', 'x', 'tiny', 'a'.repeat(4000), '\u0000\ud800\udfff', '🙂'.repeat(200),
  [], {}, [1, 2], ['a', 'b'], [''], [0, 1, 2], [99999999], [-5], [[1, 2], [3]], [null], nested(64), { a: 1 },
  Array.from({ length: 300 }, (_, i) => i % 320), Array.from({ length: 40 }, (_, i) => `s${i}`), ['a'.repeat(3000)],
  { '1': 100 }, { '99999': 5 }, { '-1': 1 }, { '5': 'x' }, { '5': 1e9 }, { include_usage: true }, { include_usage: 'yes' },
  Object.fromEntries(Array.from({ length: 2000 }, (_, i) => [String(i % 400), 1])),
  [{ role: 'user', content: 'hi' }], [{ role: 'user', content: [{ type: 'text', text: 'hi' }] }],
  [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'x' } }] }], [{ role: 'user' }], [{ role: 7, content: 'x' }],
  [{ role: 'tool', content: 'x' }], [{ role: 'tool', tool_call_id: 'a', content: { a: 1 } }],
  [{ role: 'assistant', tool_calls: [{ id: 'a', type: 'function', function: { name: 'f', arguments: '{' } }] }],
  [{ role: 'assistant', tool_calls: 'x' }], [{ role: 'system', content: 'x' }, { role: 'user', content: null }],
  Array.from({ length: 200 }, (_, i) => ({ role: i % 2 ? 'assistant' : 'user', content: 'hi' })),
  { type: 'text' }, { type: 'json_object' }, { type: 'json_schema' }, { type: 'xml' },
  schema({ type: 'object', properties: { a: { type: 'integer', minimum: 5, maximum: 1 } } }), schema({ $ref: '#/nowhere' }),
  schema({ type: 'string', pattern: '(' }), schema({ enum: [] }), schema({ anyOf: [] }), schema({ type: ['string', 'null'] }),
  schema(nested(200) as object), schema({ type: 'array', items: { type: 'number' }, minItems: 3, maxItems: 1 }),
  tool({ type: 'object', properties: { x: { type: 'string', enum: [] } } }), tool({ type: 'array', minItems: 5, maxItems: 2 }),
  tool('x'), tool(null), [{ type: 'function' }], [{ type: 'function', function: { name: 7 } }], [{ type: 'retrieval' }],
  { type: 'function', function: { name: 'f' } }, { type: 'function', function: { name: 'g' } }, { type: 'function' },
  'required', 'auto', 'none',
];
// prettier-ignore
const FIELDS = [
  'model', 'messages', 'prompt', 'max_tokens', 'max_completion_tokens', 'temperature', 'top_p', 'top_k', 'min_p', 'n',
  'stop', 'seed', 'stream', 'stream_options', 'logit_bias', 'response_format', 'tools', 'tool_choice', 'logprobs',
  'top_logprobs', 'presence_penalty', 'frequency_penalty', 'repetition_penalty', 'user', 'echo', 'suffix', 'best_of',
  'parallel_tool_calls', 'add_special_tokens', 'tokens',
];
const ROUTES = ['/v1/chat/completions', '/v1/chat/completions', '/v1/completions', '/tokenize', '/detokenize'];

test('thousands of hostile bodies: 200 or a 4xx error object, never a 500; nothing left running', async () => {
  const rand = rng(20261206);
  const pick = <T>(list: T[]): T => list[Math.floor(rand() * list.length)];
  const bad: string[] = [];
  const statuses = new Map<number, number>();
  for (let i = 0; i < 2500 && bad.length < 5; i++) {
    const route = pick(ROUTES);
    const body: Record<string, unknown> =
      route === '/v1/chat/completions'
        ? { model: 'tiny', messages: [{ role: 'user', content: 'hi there' }], max_tokens: 2 }
        : route === '/detokenize'
          ? { tokens: [72, 105] }
          : { model: 'tiny', prompt: 'hello', max_tokens: 2 };
    const changes = 1 + Math.floor(rand() * 3);
    for (let c = 0; c < changes; c++) body[pick(FIELDS)] = pick(VALUES);
    // Accepted requests stay short: a few tokens each.
    for (const k of ['max_tokens', 'max_completion_tokens'])
      if (typeof body[k] === 'number' && (body[k] as number) > 4) body[k] = 4;
    if (typeof body.n === 'number' && body.n > 3) body.n = 3;
    const json = JSON.stringify(body);
    const sent = rand() < 0.05 ? json.slice(0, Math.floor(rand() * json.length)) : json;
    const answer = await fetch(base + route, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: sent,
      signal: AbortSignal.timeout(30_000),
    }).then(
      async (r) => ({ status: r.status, text: await r.text() }),
      (err: unknown) => ({ status: 0, text: `no answer (${String(err)})` }),
    );
    const { status, text } = answer;
    statuses.set(status, (statuses.get(status) ?? 0) + 1);
    const ok = status === 200 || (status >= 400 && status < 500 && errorObject(text));
    if (!ok) bad.push(`${status} ${text.slice(0, 200)} to ${route} ${sent.slice(0, 200)}`);
  }
  expect(bad).toEqual([]);
  // Both kinds of answer were exercised, not just the first check of every request.
  expect(statuses.get(200) ?? 0).toBeGreaterThan(100);
  expect(statuses.get(400) ?? 0).toBeGreaterThan(1000);
  expect(model.generationStats.running).toBe(0);
  const alone = await model.complete('hello', { temperature: 0, maxTokens: 4 });
  const r = await fetch(`${base}/v1/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'tiny', prompt: 'hello', max_tokens: 4, temperature: 0 }),
  });
  expect(((await r.json()) as { choices: { text: string }[] }).choices[0].text).toBe(alone.text);
}, 300_000);

/** Whether a body is an OpenAI error object: { error: { message: non-empty string, type: string } }. */
function errorObject(text: string): boolean {
  try {
    const e = (JSON.parse(text) as { error?: { message?: unknown; type?: unknown } }).error;
    return typeof e?.message === 'string' && e.message.length > 0 && typeof e.type === 'string';
  } catch {
    return false;
  }
}
