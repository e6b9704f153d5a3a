/**
 * The OpenAI-compatible server over a real (tiny, random) model with a real tokenizer and chat
 * template, driven by the official `openai` client: what the server answers must be what the model
 * generates on its own, streamed or not; stop strings, seeds, usage; 16 streams of which half
 * disconnect; and the routing telemetry against the tokens the model actually stepped.
 */
import * as path from 'path';
import { AddressInfo } from 'net';
import OpenAI from 'openai';
import { MoeModel } from '../lib/index';
import { createServer, FusedMoeServer } from '../lib/server/server';
import { forcedCall } from '../lib/server/tool-calls';
import { makeTempDir, removeTempDir } from './helpers/checkpoint';
import { writeRandomModel } from './helpers/model/random-model';
import {
  MISTRAL_SPECIALS,
  MISTRAL_TOOLS_TEMPLATE,
  TOOLS_TEMPLATE,
  TokenizerFileOptions,
  writeTokenizer,
} from './helpers/text/tokenizer-files';

const KEY = 'serve-key';
let dir = '';
let model: MoeModel;
let server: FusedMoeServer;
let base = '';
let client: OpenAI;

beforeAll(async () => {
  dir = makeTempDir('serve');
  const hf = writeRandomModel(path.join(dir, 'mixtral'), { family: 'mixtral', seed: 31, gguf: false }).hfDir;
  writeTokenizer(hf, 'byte-level', 320);
  model = await MoeModel.load(hf, { maxSequences: 16 });
  server = createServer(model, { apiKey: KEY, modelId: 'tiny-mixtral' });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  client = new OpenAI({ apiKey: KEY, baseURL: `${base}/v1`, maxRetries: 0 });
});
afterAll(async () => {
  await server?.shutdown(0);
  model?.dispose();
  removeTempDir(dir);
});

const chat = [
  { role: 'system' as const, content: 'You are terse.' },
  { role: 'user' as const, content: 'Name the experts: café, 日本, 🙂' },
];

/** A metric's value from /metrics, summed over its labels (0 while a labelled counter has no series). */
async function metric(name: string): Promise<number> {
  const text = await (await fetch(`${base}/metrics`)).text();
  if (!text.includes(`# TYPE ${name} `)) throw new Error(`${name} is not in /metrics`);
  return text
    .split('\n')
    .filter((l) => l.startsWith(name + ' ') || l.startsWith(name + '{'))
    .reduce((sum, l) => sum + Number(l.split(' ').pop()), 0);
}

test('chat, streamed and not, gives what model.complete gives, with its usage', async () => {
  const alone = await model.complete(chat, { temperature: 0, maxTokens: 12 });
  const r = await client.chat.completions.create({
    model: 'tiny-mixtral',
    messages: chat,
    temperature: 0,
    max_tokens: 12,
  });
  expect(r.choices[0].message.content).toBe(alone.text);
  expect(r.choices[0].finish_reason).toBe(alone.finishReason === 'stop' ? 'stop' : 'length');
  expect(r.usage).toEqual({
    prompt_tokens: alone.usage.promptTokens,
    completion_tokens: alone.usage.completionTokens,
    total_tokens: alone.usage.totalTokens,
    // The prompt's cache, kept after model.complete, all of it but the token fed to get the first logits.
    prompt_tokens_details: { cached_tokens: alone.usage.promptTokens - 1 },
  });
  const stream = await client.chat.completions.create({
    model: 'tiny-mixtral',
    messages: chat,
    temperature: 0,
    max_tokens: 12,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = '';
  let usage: OpenAI.CompletionUsage | null | undefined;
  for await (const chunk of stream) {
    if (chunk.choices.length) text += chunk.choices[0].delta.content ?? '';
    else usage = chunk.usage;
  }
  expect(text).toBe(alone.text);
  expect(usage?.completion_tokens).toBe(alone.usage.completionTokens);
});

test("/tokenize gives the ids a request's prompt gets; /detokenize gives their text back", async () => {
  const post = async (path: string, body: object) => {
    const r = await fetch(`${base}${path}`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
    });
    return { status: r.status, body: (await r.json()) as Record<string, unknown> };
  };
  const chatIds = await post('/tokenize', { messages: chat });
  const r = await client.chat.completions.create({ model: 'x', messages: chat, max_tokens: 1 });
  expect(chatIds.body).toMatchObject({ count: r.usage!.prompt_tokens, max_model_len: model.options.contextLength });
  const text = 'the café 日本 🙂';
  const { body } = await post('/tokenize', { prompt: text });
  expect(body.tokens).toEqual(model.tokenize(text));
  expect((await post('/detokenize', { tokens: body.tokens as number[] })).body).toEqual({ prompt: text });
  const V = model.config.vocabSize;
  const out = await post('/detokenize', { tokens: [5, V] });
  expect(out.status).toBe(400);
  expect(JSON.stringify(out.body)).toContain(`tokens[1] must be a token id in [0, ${V})`);
});

test('a model without tokenizer.json: /tokenize and /detokenize answer 404, token ids still generate', async () => {
  const hf = writeRandomModel(path.join(dir, 'no-tokenizer'), { family: 'mixtral', seed: 32, gguf: false }).hfDir;
  const bare = await MoeModel.load(hf, { maxSequences: 2 });
  const bareServer = createServer(bare, { apiKey: KEY, modelId: 'bare' });
  try {
    await new Promise<void>((r) => bareServer.listen(0, '127.0.0.1', r));
    const at = `http://127.0.0.1:${(bareServer.address() as AddressInfo).port}`;
    const post = async (route: string, body: object) => {
      const r = await fetch(`${at}${route}`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
      });
      return { status: r.status, text: await r.text() };
    };
    for (const [route, body] of [
      ['/tokenize', { prompt: 'hello' }],
      ['/detokenize', { tokens: [1, 2] }],
    ] as const) {
      const out = await post(route, body);
      expect(out.status).toBe(404);
      expect(out.text).toContain(`${route} needs a model with a tokenizer`);
    }
    const bareClient = new OpenAI({ apiKey: KEY, baseURL: `${at}/v1`, maxRetries: 0 });
    const r = await bareClient.completions.create({ model: 'bare', prompt: [3, 4, 5], max_tokens: 3, temperature: 0 });
    expect(r.usage).toMatchObject({ prompt_tokens: 3, completion_tokens: 3 });
  } finally {
    await bareServer.shutdown(0);
    bare.dispose();
  }
});

test('completions: a text prompt and token ids; a stop string cuts the text before it', async () => {
  const prompt = 'the quick brown fox';
  const alone = await model.complete(prompt, { temperature: 0, maxTokens: 16, ignoreEos: true });
  const r = await client.completions.create({
    model: 'x',
    prompt,
    temperature: 0,
    max_tokens: 16,
    ignore_eos: true,
  } as never);
  expect(r.choices[0].text).toBe(alone.text);
  const ids = model.tokenize(prompt);
  const byIds = await client.completions.create({
    model: 'x',
    prompt: ids,
    temperature: 0,
    max_tokens: 16,
    ignore_eos: true,
  } as never);
  expect(byIds.choices[0].text).toBe(alone.text);
  // A stop string from the middle of the greedy text: the answer ends right before it.
  const text = alone.text;
  const at = Math.max(1, Math.floor(text.length / 2));
  const stop = text.slice(at, at + 3);
  if (stop.length === 0) throw new Error('the greedy text is too short for this test');
  const cut = await client.completions.create({
    model: 'x',
    prompt,
    temperature: 0,
    max_tokens: 16,
    ignore_eos: true,
    stop: [stop],
  } as never);
  expect(cut.choices[0].text).toBe(text.slice(0, text.indexOf(stop)));
  expect(cut.choices[0].finish_reason).toBe('stop');
});

test('presence and frequency penalties and a logit bias through the client give what model.complete gives', async () => {
  const prompt = 'the quick brown fox';
  const alone = await model.complete(prompt, {
    temperature: 0,
    maxTokens: 12,
    presencePenalty: 0.5,
    frequencyPenalty: 0.9,
    logitBias: { 40: 5, 41: -100 },
    ignoreEos: true,
  });
  const r = await client.completions.create({
    model: 'x',
    prompt,
    temperature: 0,
    max_tokens: 12,
    presence_penalty: 0.5,
    frequency_penalty: 0.9,
    logit_bias: { '40': 5, '41': -100 },
    ignore_eos: true,
  } as never);
  expect(r.choices[0].text).toBe(alone.text);
  // A bias of 100 forces its token.
  const forced = await model.complete(prompt, {
    temperature: 0,
    maxTokens: 3,
    logitBias: { 65: 100 },
    ignoreEos: true,
  });
  expect(forced.tokens).toEqual([65, 65, 65]);
  const viaClient = await client.completions.create({
    model: 'x',
    prompt,
    temperature: 0,
    max_tokens: 3,
    logit_bias: { '65': 100 },
    ignore_eos: true,
  } as never);
  expect(viaClient.choices[0].text).toBe(model.detokenize([65, 65, 65]));
  // An id past the vocabulary is the client's error.
  const bad = await client.completions
    .create({ model: 'x', prompt, logit_bias: { '320': 1 } } as never)
    .catch((e: unknown) => e);
  expect(bad).toBeInstanceOf(OpenAI.BadRequestError);
  expect((bad as InstanceType<typeof OpenAI.APIError>).param).toBe('logit_bias');
  expect((bad as Error).message).toMatch(/logit_bias.*\[0, 320\).*"320"/);
  expect(await metric('fused_moe_active_sequences')).toBe(0);
});

test('log probabilities through the client are those of model.complete; their bytes join to the text', async () => {
  const options = { temperature: 0.8, seed: 4, maxTokens: 14 };
  const alone = await model.complete(chat, { ...options, logprobs: true, topLogprobs: 3 });
  const r = await client.chat.completions.create({
    model: 'x',
    messages: chat,
    temperature: 0.8,
    seed: 4,
    max_tokens: 14,
    logprobs: true,
    top_logprobs: 3,
  });
  const text = (t: number) => Buffer.from(model.tokenizer!.tokenBytes(t)).toString();
  const content = r.choices[0].logprobs!.content!;
  expect(content).toEqual(
    alone.logprobs!.map((e) => ({
      token: text(e.token),
      logprob: e.logprob,
      bytes: [...model.tokenizer!.tokenBytes(e.token)],
      top_logprobs: e.topLogprobs.map((t) => ({
        token: text(t.token),
        logprob: t.logprob,
        bytes: [...model.tokenizer!.tokenBytes(t.token)],
      })),
    })),
  );
  // Special tokens (ids 0-2) have no text; the others' bytes are the text's UTF-8.
  const bytes = content.filter((_, i) => alone.tokens[i] > 2).flatMap((e) => e.bytes!);
  expect(Buffer.from(bytes).toString()).toBe(r.choices[0].message.content);
  const c = await client.completions.create({
    model: 'x',
    prompt: 'the quick',
    temperature: 0,
    max_tokens: 5,
    logprobs: 2,
  });
  const greedy = await model.complete('the quick', { temperature: 0, maxTokens: 5, logprobs: true, topLogprobs: 2 });
  expect(c.choices[0].logprobs!.token_logprobs).toEqual(greedy.logprobs!.map((e) => e.logprob));
  expect(c.choices[0].logprobs!.tokens).toEqual(greedy.tokens.map(text));
});

test('echo with logprobs scores the prompt as an evaluation harness asks (max_tokens 1)', async () => {
  const prompt = 'the quick brown fox jumps over';
  const ids = model.tokenize(prompt);
  const r = await client.completions.create({
    model: 'x',
    prompt,
    echo: true,
    logprobs: 1,
    max_tokens: 1,
    temperature: 0,
  });
  const alone = await model.complete(prompt, {
    temperature: 0,
    maxTokens: 1,
    promptLogprobs: true,
    logprobs: true,
    topLogprobs: 1,
  });
  const text = (t: number) => Buffer.from(model.tokenizer!.tokenBytes(t)).toString();
  const lp = r.choices[0].logprobs!;
  expect(r.choices[0].text).toBe(prompt + alone.text);
  expect(lp.tokens).toEqual([...ids, ...alone.tokens].map(text));
  expect(lp.token_logprobs).toEqual([
    null,
    ...alone.promptLogprobs!.slice(1).map((e) => e.logprob),
    alone.logprobs![0].logprob,
  ]);
  expect(lp.top_logprobs![0]).toBeNull();
  expect(Object.values(lp.top_logprobs![1]).length).toBeGreaterThanOrEqual(1);
  // The sum over the prompt is the log-likelihood a harness reads: the same as from model.logits.
  const all = await model.logits(ids, { all: true });
  const V = model.config.vocabSize;
  let sum = 0;
  for (let p = 1; p < ids.length; p++) {
    const x = Float64Array.from(all.subarray((p - 1) * V, p * V));
    const m = Math.max(...x);
    sum += x[ids[p]] - m - Math.log(x.reduce((s, v) => s + Math.exp(v - m), 0));
  }
  const got = (lp.token_logprobs as (number | null)[]).slice(1, ids.length).reduce((s: number, v) => s + v!, 0);
  expect(Math.abs(got - sum)).toBeLessThan(1e-6 * ids.length);
});

test('n choices are the generations of seeds seed + i; a refused prompt ends them all', async () => {
  const options = { temperature: 1.1, maxTokens: 10 };
  const cachedBefore = await metric('fused_moe_prompt_tokens_cached_total');
  const r = await client.chat.completions.create({
    model: 'x',
    messages: chat,
    n: 3,
    seed: 40,
    max_tokens: 10,
    temperature: 1.1,
  });
  const alone = await Promise.all([40, 41, 42].map((seed) => model.complete(chat, { ...options, seed })));
  expect(r.choices.map((c) => c.message.content)).toEqual(alone.map((a) => a.text));
  expect(new Set(alone.map((a) => a.text)).size).toBeGreaterThan(1);
  expect(r.usage!.completion_tokens).toBe(alone.reduce((s, a) => s + a.usage.completionTokens, 0));
  // The prompt is computed at most once: the choices after the first wait for it, then fork all of it
  // but its last token (the first may reuse what earlier tests kept).
  expect(r.usage!.prompt_tokens).toBeGreaterThan(16);
  expect((await metric('fused_moe_prompt_tokens_cached_total')) - cachedBefore).toBeGreaterThanOrEqual(
    2 * (r.usage!.prompt_tokens - 1),
  );
  const long = 'word '.repeat(5000);
  const err = await client.completions.create({ model: 'x', prompt: long, n: 3 }).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(OpenAI.BadRequestError);
  expect(await metric('fused_moe_active_sequences')).toBe(0);
});

test('tools with a template that teaches no tool-call syntax: a 400 naming tools', async () => {
  const err = await client.chat.completions
    .create({ model: 'x', messages: chat, tools: [{ type: 'function', function: { name: 'f' } }] })
    .catch((e: unknown) => e);
  expect(err).toBeInstanceOf(OpenAI.BadRequestError);
  expect((err as InstanceType<typeof OpenAI.BadRequestError>).param).toBe('tools');
});

test('response_format json_object gives what model.complete gives in JSON mode: a JSON prefix', async () => {
  const options = { temperature: 0.9, seed: 8, maxTokens: 30 };
  const alone = await model.complete(chat, { ...options, responseFormat: 'json' });
  const r = await client.chat.completions.create({
    model: 'x',
    messages: chat,
    temperature: 0.9,
    seed: 8,
    max_tokens: 30,
    response_format: { type: 'json_object' },
  });
  expect(r.choices[0].message.content).toBe(alone.text);
  expect(alone.text.trimStart()[0]).toBe('{');
  expect((await model.complete(chat, options)).text).not.toBe(alone.text);
});

test('response_format json_schema gives what model.complete gives with that schema', async () => {
  const schema = {
    type: 'object',
    properties: { ok: { type: 'boolean' }, tag: { enum: ['a', 'b'] } },
    required: ['ok', 'tag'],
    additionalProperties: false,
  };
  const alone = await model.complete(chat, { temperature: 0.9, seed: 3, maxTokens: 40, responseFormat: { schema } });
  const r = await client.chat.completions.create({
    model: 'x',
    messages: chat,
    temperature: 0.9,
    seed: 3,
    max_tokens: 40,
    response_format: { type: 'json_schema', json_schema: { name: 'answer', schema, strict: true } },
  });
  expect(r.choices[0].message.content).toBe(alone.text);
  expect(alone.text).toMatch(/^\s*\{\s*("ok"|"tag"|$)/);
});

/** A tiny model with a tools template, served; `run` gets the model and a client, and everything closes after. */
async function withToolServer(
  name: string,
  seed: number,
  tokenizer: TokenizerFileOptions,
  run: (toolModel: MoeModel, c: OpenAI) => Promise<void>,
): Promise<void> {
  const hf = writeRandomModel(path.join(dir, name), { family: 'mixtral', seed, gguf: false }).hfDir;
  writeTokenizer(hf, 'byte-level', 320, tokenizer);
  const toolModel = await MoeModel.load(hf, { maxSequences: 4, contextLength: 1024 });
  const toolServer = createServer(toolModel);
  await new Promise<void>((r) => toolServer.listen(0, '127.0.0.1', r));
  try {
    const port = (toolServer.address() as AddressInfo).port;
    await run(toolModel, new OpenAI({ apiKey: 'none', baseURL: `http://127.0.0.1:${port}/v1`, maxRetries: 0 }));
  } finally {
    await toolServer.shutdown(0);
    toolModel.dispose();
  }
}

/** The parameters of the forced calls' function: what a call's arguments must fit. */
const WEATHER = {
  type: 'object',
  properties: { city: { type: 'string' }, days: { type: 'integer' } },
  required: ['city', 'days'],
  additionalProperties: false,
};

test('a forced tool call with a template that teaches the Hermes syntax: tool_calls whose arguments fit', async () => {
  await withToolServer('tools', 33, { chatTemplate: TOOLS_TEMPLATE }, async (toolModel, c) => {
    const tools = [
      { type: 'function' as const, function: { name: 'get_weather', parameters: WEATHER } },
      { type: 'function' as const, function: { name: 'get_time', parameters: { type: 'object' } } },
    ];
    const messages = [{ role: 'user' as const, content: 'weather in Bern for 3 days?' }];
    // A bias towards '"', so that random weights close their strings.
    const bias = { [toolModel.tokenize('"', { addSpecialTokens: false })[0]]: 3 };
    let called = 0;
    for (const seed of [1, 2, 3, 4]) {
      const r = await c.chat.completions.create({
        model: 'x',
        messages,
        tools,
        tool_choice: { type: 'function', function: { name: 'get_weather' } },
        temperature: 1,
        seed,
        max_tokens: 300,
        logit_bias: bias,
      });
      const alone = await toolModel.complete(messages, {
        tools,
        temperature: 1,
        seed,
        maxTokens: 300,
        logitBias: bias,
        responseFormat: forcedCall(tools, { name: 'get_weather' }),
      });
      expect(alone.text).toMatch(/^<tool_call>\n\s*\{/);
      if (r.choices[0].finish_reason !== 'tool_calls') continue;
      called++;
      const call = r.choices[0].message.tool_calls![0] as { function: { name: string; arguments: string } };
      expect(call.function.name).toBe('get_weather');
      const args = JSON.parse(call.function.arguments) as Record<string, unknown>;
      expect(Object.keys(args).sort()).toEqual(['city', 'days']);
      expect(typeof args.city).toBe('string');
      expect(Number.isInteger(args.days)).toBe(true);
      expect(JSON.parse(alone.text.slice('<tool_call>\n'.length, -'\n</tool_call>'.length))).toEqual({
        name: 'get_weather',
        arguments: args,
      });
    }
    expect(called).toBeGreaterThan(0);
  });
});

test("Mistral's syntax: a forced call, its ids taken back by the template, the special marker as text", async () => {
  const tokenizer = { chatTemplate: MISTRAL_TOOLS_TEMPLATE, specials: MISTRAL_SPECIALS };
  await withToolServer('mistral-tools', 34, tokenizer, async (toolModel, c) => {
    const tools = [{ type: 'function' as const, function: { name: 'get_weather', parameters: WEATHER } }];
    const messages = [{ role: 'user' as const, content: 'weather in Bern for 3 days?' }];
    const bias = { [toolModel.tokenize('"', { addSpecialTokens: false })[0]]: 3 };
    let called = 0;
    for (const seed of [1, 2, 3, 4]) {
      const ask = { model: 'x', messages, tools, temperature: 1, seed, max_tokens: 300, logit_bias: bias };
      const r = await c.chat.completions.create({ ...ask, tool_choice: 'required' });
      const alone = await toolModel.complete(messages, {
        tools,
        temperature: 1,
        seed,
        maxTokens: 300,
        logitBias: bias,
        responseFormat: forcedCall(tools, 'required', 'mistral'),
      });
      expect(alone.text).toMatch(/^\[TOOL_CALLS\] \[\s*\{/);
      if (r.choices[0].finish_reason !== 'tool_calls') continue;
      called++;
      const calls = r.choices[0].message.tool_calls! as { id: string; function: { name: string; arguments: string } }[];
      expect(calls.length).toBe(1);
      expect(calls[0].id).toMatch(/^[A-Za-z0-9]{9}$/);
      const args = JSON.parse(calls[0].function.arguments) as Record<string, unknown>;
      expect(JSON.parse(alone.text.slice('[TOOL_CALLS] ['.length, -1))).toEqual({
        name: 'get_weather',
        arguments: args,
      });
      // Streamed: the same call.
      const stream = await c.chat.completions.create({ ...ask, tool_choice: 'required', stream: true });
      let streamed = '';
      for await (const chunk of stream)
        for (const tc of chunk.choices[0]?.delta.tool_calls ?? []) streamed += tc.function?.arguments ?? '';
      expect(JSON.parse(streamed)).toEqual(args);
      // The next turn: the template takes the call back with its id, and the tool's answer.
      const next = await c.chat.completions.create({
        model: 'x',
        messages: [
          ...messages,
          { role: 'assistant', content: null, tool_calls: calls.map((x) => ({ ...x, type: 'function' as const })) },
          { role: 'tool', tool_call_id: calls[0].id, content: 'sunny' },
        ],
        tools,
        max_tokens: 2,
      });
      expect(next.choices[0].finish_reason).toMatch(/stop|length/);
    }
    expect(called).toBeGreaterThan(0);
    // [TOOL_CALLS] is a special token: decoding leaves it out, and with tools the server writes it back.
    const marker = toolModel.tokenize('[TOOL_CALLS]', { addSpecialTokens: false });
    expect(marker.length).toBe(1);
    expect(toolModel.tokenizer!.specialTokenIds.has(marker[0])).toBe(true);
    const forced = { model: 'x', messages, max_tokens: 1, logit_bias: { [marker[0]]: 100 } };
    const plain = await c.chat.completions.create(forced);
    expect(plain.choices[0].message.content).toBe('');
    const withTools = await c.chat.completions.create({ ...forced, tools });
    expect(withTools.choices[0].message.content).toBe('[TOOL_CALLS]'); // a marker alone is no call
  });
});

test('the same seed gives the same text twice', async () => {
  const ask = () =>
    client.chat.completions
      .create({ model: 'x', messages: chat, temperature: 1, top_p: 0.95, seed: 1234, max_tokens: 20 })
      .then((r) => r.choices[0].message.content);
  const [a, b] = await Promise.all([ask(), ask()]);
  expect(a).toBe(b);
  expect(await ask()).toBe(a);
});

test('errors through the client: no key, a prompt over the context, bad parameters', async () => {
  const anon = new OpenAI({ apiKey: 'nope', baseURL: `${base}/v1`, maxRetries: 0 });
  await expect(anon.chat.completions.create({ model: 'x', messages: chat })).rejects.toBeInstanceOf(
    OpenAI.AuthenticationError,
  );
  const long = Array.from({ length: 200 }, (_, i) => 300 + (i % 20));
  const err = await client.completions.create({ model: 'x', prompt: long }).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(OpenAI.BadRequestError);
  expect((err as InstanceType<typeof OpenAI.APIError>).code).toBe('context_length_exceeded');
  expect((err as Error).message).toContain('128');
  const bad = await client.completions.create({ model: 'x', prompt: [1, 99999] }).catch((e: unknown) => e);
  expect(bad).toBeInstanceOf(OpenAI.BadRequestError);
  expect((bad as Error).message).toContain('320');
  expect(await metric('fused_moe_active_sequences')).toBe(0);
});

test("a conversation long enough for the tokenizer's worker: refused by the template, or over the context", async () => {
  const turns = Array.from({ length: 100 }, (_, i) => ({
    role: i % 2 ? ('assistant' as const) : ('user' as const),
    content: `turn ${i}`,
  }));
  // The request's checks let a tool turn through; the test template refuses it, on the worker thread.
  const tool = { role: 'tool', content: 'x', tool_call_id: 'call-1' } as const;
  const refused = await client.chat.completions.create({ model: 'x', messages: [...turns, tool] }).catch((e) => e);
  expect(refused).toBeInstanceOf(OpenAI.BadRequestError);
  expect((refused as Error).message).toContain('the chat template refused the messages: unknown role tool');
  const long = await client.chat.completions.create({ model: 'x', messages: turns }).catch((e: unknown) => e);
  expect(long).toBeInstanceOf(OpenAI.BadRequestError);
  expect((long as InstanceType<typeof OpenAI.APIError>).code).toBe('context_length_exceeded');
  expect(await metric('fused_moe_active_sequences')).toBe(0);
});

test('16 streams, half disconnecting mid-way: the others finish with their own text, and nothing stays active', async () => {
  const cancelledBefore = await metric('fused_moe_requests_cancelled_total');
  const params = (i: number) => ({
    model: 'x',
    messages: [{ role: 'user' as const, content: `stream ${i}` }],
    temperature: 0.9,
    seed: 100 + i,
    max_tokens: 90,
    ignore_eos: true,
  });
  const runs = Array.from({ length: 16 }, async (_, i) => {
    const stream = await client.chat.completions.create({ ...params(i), stream: true } as never);
    let text = '';
    let chunks = 0;
    for await (const c of stream as unknown as AsyncIterable<OpenAI.ChatCompletionChunk>) {
      text += c.choices[0]?.delta.content ?? '';
      // Leaving the loop closes the connection: the server must cancel the sequence.
      if (i % 2 === 1 && ++chunks === 2) return { i, aborted: true, text };
    }
    return { i, aborted: false, text };
  });
  const results = await Promise.all(runs);
  for (const r of results.filter((x) => !x.aborted)) {
    const alone = await client.chat.completions.create(params(r.i) as never);
    expect(r.text).toBe((alone as OpenAI.ChatCompletion).choices[0].message.content);
  }
  // The aborted sequences are freed at the next step of the loop.
  for (let t = 0; t < 100 && (await metric('fused_moe_active_sequences')) !== 0; t++)
    await new Promise((res) => setTimeout(res, 20));
  expect(await metric('fused_moe_active_sequences')).toBe(0);
  expect(await metric('fused_moe_requests_cancelled_total')).toBe(cancelledBefore + 8);
  expect(model.generationStats).toMatchObject({ running: 0, waiting: 0 });
});

test('routing telemetry counts top_k picks for every token the model steps, per MoE layer', async () => {
  const k = model.config.moe.topK;
  const before = model.expertTokenCounts();
  const r = await model.complete([7, 300, 301, 302, 305, 309, 311], { temperature: 0, maxTokens: 5, ignoreEos: true });
  const after = model.expertTokenCounts();
  // Tokens fed to the model: the prompt (less any cached prefix) and every sampled token but the last.
  const stepped = r.usage.promptTokens - r.usage.cachedPromptTokens + r.usage.completionTokens - 1;
  for (let l = 0; l < after.length; l++) {
    const delta = after[l].reduce((s, v) => s + v, 0) - before[l].reduce((s, v) => s + v, 0);
    expect(delta).toBe(model.config.moeLayers[l] ? stepped * k : 0);
  }
  const text = await (await fetch(`${base}/metrics`)).text();
  for (let e = 0; e < after[0].length; e++)
    expect(text).toContain(`fused_moe_expert_tokens_total{layer="0",expert="${e}"} ${after[0][e]}`);
});

test('fused-moe serve: ready on /health, SIGTERM lets a running request finish and exits 0', async () => {
  const { spawn } = await import('child_process');
  const cli = path.join(__dirname, '..', 'bin', 'fused-moe.js');
  const child = spawn(
    process.execPath,
    [cli, 'serve', path.join(dir, 'mixtral', 'hf'), '--port', '0', '--grace', '20'],
    {
      stdio: ['ignore', 'ignore', 'pipe'],
    },
  );
  let err = '';
  child.stderr.setEncoding('utf8');
  const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
  const url = await new Promise<string>((resolve, reject) => {
    child.stderr.on('data', (s: string) => {
      err += s;
      const hit = /listening on (http:\/\/\S+)/.exec(err);
      if (hit) resolve(hit[1]);
    });
    void exited.then((code) => reject(new Error(`serve exited with ${code}: ${err}`)));
  });
  for (let t = 0; t < 500 && (await fetch(`${url}/health`)).status !== 200; t++)
    await new Promise((r) => setTimeout(r, 20));
  expect((await fetch(`${url}/health`)).status).toBe(200);
  const models = await (await fetch(`${url}/v1/models`)).json();
  expect((models as { data: { id: string }[] }).data[0].id).toBe('hf');
  const cli2 = new OpenAI({ apiKey: 'none', baseURL: `${url}/v1`, maxRetries: 0 });
  const running = cli2.completions.create({
    model: 'hf',
    prompt: 'the fox',
    max_tokens: 60,
    ignore_eos: true,
  } as never);
  await new Promise((r) => setTimeout(r, 5));
  child.kill('SIGTERM');
  const answer = (await running) as OpenAI.Completion;
  expect(answer.usage?.completion_tokens).toBe(60);
  expect(await exited).toBe(0);
  expect(err).toContain('SIGTERM');
});

test('fused-moe serve --cache-tokens reaches the model: below the context, the load is refused naming it', async () => {
  const { spawn } = await import('child_process');
  const cli = path.join(__dirname, '..', 'bin', 'fused-moe.js');
  const child = spawn(
    process.execPath,
    [cli, 'serve', path.join(dir, 'mixtral', 'hf'), '--port', '0', '--context', '64', '--cache-tokens', '32'],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let err = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (s: string) => (err += s));
  const code = await new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
  expect(code).toBe(1);
  expect(err).toMatch(/failed to load: options\.cacheTokens must be an integer in \[64, \d+\], got 32/);
});

test('fused-moe serve: a SIGTERM sent on the listening line (the model still loading) exits 0', async () => {
  const { spawn } = await import('child_process');
  const cli = path.join(__dirname, '..', 'bin', 'fused-moe.js');
  for (let round = 0; round < 3; round++) {
    const child = spawn(process.execPath, [cli, 'serve', path.join(dir, 'mixtral', 'hf'), '--port', '0'], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let err = '';
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (s: string) => {
      err += s;
      if (/listening on/.test(s)) child.kill('SIGTERM'); // as a supervisor that waits for the line would
    });
    const [code, signal] = await new Promise<[number | null, string | null]>((r) =>
      child.on('exit', (c, sig) => r([c, sig])),
    );
    // Killed by the signal itself (code null) where the handlers came after the line.
    expect([round, code, signal]).toEqual([round, 0, null]);
    expect(err).toContain('SIGTERM: finishing');
    expect(err).not.toContain('failed to load');
  }
});
