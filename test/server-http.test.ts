/**
 * The HTTP layer of the OpenAI-compatible server, driven by the official `openai` client, over a fake
 * engine whose output the test can predict (the prompt's text reversed, one character per token). The
 * real model behind the same server is tested in server-model.test.ts.
 */
import { AddressInfo } from 'net';
import OpenAI from 'openai';
import { createServer, FusedMoeServer } from '../lib/server/server';
import type { GenerationEngine, GenerationRun } from '../lib/server/engine';
import type { CompletionRequest, TokenizeRequest } from '../lib/server/request';

const KEY = 'test-key-7';

class FakeEngine implements GenerationEngine {
  maxSequences = 2;
  toolCallSyntax: 'hermes' | undefined = 'hermes';
  started: { request: CompletionRequest; signal: AbortSignal }[] = [];
  /**
   * When set, every generation waits for it before each token, after the first N of a prompt that
   * starts with `N:` (a prompt written `2:abc` yields 'c' and 'b' before it waits).
   */
  gate: Promise<void> | undefined;
  active = 0;

  start(request: CompletionRequest, signal: AbortSignal): GenerationRun {
    this.started.push({ request, signal });
    const source =
      typeof request.prompt === 'string'
        ? request.prompt
        : Array.isArray(request.prompt) && typeof request.prompt[0] === 'number'
          ? (request.prompt as number[]).join(',')
          : (request.prompt as { content: string }[]).map((m) => m.content).join('|');
    if (source.includes('TOO-LONG')) {
      return {
        next: () => Promise.reject(new RangeError('the prompt has 9000 tokens; the context holds 4096')),
        result: () => ({ finishReason: 'stop', promptTokens: 0, completionTokens: 0 }),
      };
    }
    const out = [...source].reverse();
    const limit = request.maxTokens ?? out.length;
    let i = 0;
    let finish: 'stop' | 'length' | 'abort' = 'stop';
    this.active++;
    let counted = true;
    const release = () => {
      if (counted) this.active--;
      counted = false;
    };
    return {
      next: async () => {
        if (this.gate && i >= Number(/^(\d+):/.exec(source)?.[1] ?? 0)) await this.gate;
        if (signal.aborted) {
          finish = 'abort';
          release();
          return { done: true, value: undefined };
        }
        if (i >= out.length || i >= limit) {
          finish = i < out.length ? 'length' : 'stop';
          release();
          return { done: true, value: undefined };
        }
        // 'FAIL' in the prompt: an odd seed's generation fails at its third token (a model error mid-way).
        if (source.includes('FAIL') && (request.seed ?? 0) % 2 === 1 && i === 2) {
          release();
          throw new Error('the step failed');
        }
        const token = out[i].codePointAt(0)!;
        // '~' stands for a token whose text is held back (part of a character): it has none of its own.
        const piece = { token, text: out[i] === '~' ? '' : out[i] };
        i++;
        if (request.topLogprobs === undefined) return { done: false, value: piece };
        // Made-up log probabilities: -i/10 for the i-th token; its alternatives are the next code points,
        // the second of them impossible (-Infinity).
        const logprob = -i / 10;
        const topLogprobs = Array.from({ length: request.topLogprobs }, (_, k) => ({
          token: token + 1 + k,
          logprob: k === 1 ? -Infinity : logprob - 1 - k,
        }));
        // Echo: the prompt's characters, scored -k/100 (the first not at all), on the first token.
        const promptLogprobs =
          request.echo && i === 1
            ? [...source].map((ch, k) => ({
                token: ch.codePointAt(0)!,
                logprob: k === 0 ? null : -k / 100,
                topLogprobs: [],
              }))
            : undefined;
        return { done: false, value: { ...piece, logprob, topLogprobs, ...(promptLogprobs && { promptLogprobs }) } };
      },
      // Half the prompt found in the cache, as far as usage and the metrics are concerned.
      result: () => ({
        finishReason: finish,
        promptTokens: [...source].length,
        completionTokens: i,
        cachedTokens: [...source].length >> 1,
      }),
    };
  }
  tokenBytes?: (token: number) => Uint8Array | undefined = (token) => Buffer.from(String.fromCodePoint(token));
  detokenize(ids: number[]): string {
    return ids.map((t) => String.fromCodePoint(t)).join(',');
  }
  queueDepth() {
    return Math.max(0, this.active - this.maxSequences);
  }
  activeSequences() {
    return Math.min(this.active, this.maxSequences);
  }
  contextLength = 4096;
  /** One id per code point: of the text, or of the messages' contents joined by '|'. */
  async tokenize({ prompt, tools }: TokenizeRequest) {
    const text =
      typeof prompt === 'string' ? prompt : prompt.map((m) => m.content).join('|') + (tools ? `|${tools.length}` : '');
    return [...text].map((c) => c.codePointAt(0)!);
  }
  /** Counted up by each /metrics read, so the metric shows the source's latest value. */
  preemptionReads = 0;
  preemptions() {
    return ++this.preemptionReads;
  }
  expertTokens() {
    return [
      [3, 1],
      [0, 4],
    ];
  }
}

async function listen(server: FusedMoeServer): Promise<string> {
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

const reverse = (s: string) => [...s].reverse().join('');

describe('server over a fake engine', () => {
  let engine: FakeEngine;
  let server: FusedMoeServer;
  let base: string;
  let client: OpenAI;

  beforeEach(async () => {
    engine = new FakeEngine();
    server = createServer(engine, { apiKey: KEY, modelId: 'tiny-moe', maxQueue: 1, maxBodyBytes: 4096 });
    base = await listen(server);
    client = new OpenAI({ apiKey: KEY, baseURL: `${base}/v1`, maxRetries: 0 });
  });
  afterEach(async () => {
    engine.gate = undefined;
    await server.shutdown(0);
  });

  test('chat completion, not streamed: text, usage and finish reason', async () => {
    const r = await client.chat.completions.create({
      model: 'tiny-moe',
      messages: [{ role: 'user', content: 'héllo wörld' }],
    });
    expect(r.object).toBe('chat.completion');
    expect(r.model).toBe('tiny-moe');
    expect(r.choices[0].message).toMatchObject({ role: 'assistant', content: reverse('héllo wörld') });
    expect(r.choices[0].finish_reason).toBe('stop');
    expect(r.usage).toEqual({
      prompt_tokens: 11,
      completion_tokens: 11,
      total_tokens: 22,
      prompt_tokens_details: { cached_tokens: 5 },
    });
  });

  test('chat completion, streamed with usage: chunks join to the text, then a usage chunk', async () => {
    const stream = await client.chat.completions.create({
      model: 'tiny-moe',
      messages: [{ role: 'user', content: 'abcdefgh' }],
      max_tokens: 5,
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = '';
    const finishes: (string | null)[] = [];
    let usage: OpenAI.CompletionUsage | null | undefined;
    for await (const chunk of stream) {
      expect(chunk.object).toBe('chat.completion.chunk');
      if (chunk.choices.length) {
        text += chunk.choices[0].delta.content ?? '';
        finishes.push(chunk.choices[0].finish_reason);
      } else usage = chunk.usage;
    }
    expect(text).toBe('hgfed');
    expect(finishes.at(-1)).toBe('length');
    expect(finishes.slice(0, -1).every((f) => f === null)).toBe(true);
    expect(usage).toEqual({
      prompt_tokens: 8,
      completion_tokens: 5,
      total_tokens: 13,
      prompt_tokens_details: { cached_tokens: 4 },
    });
  });

  test('completions with a string prompt and with token ids, streamed and not', async () => {
    const r = await client.completions.create({ model: 'tiny-moe', prompt: 'xyz', max_tokens: 2 });
    expect(r.object).toBe('text_completion');
    expect(r.choices[0]).toMatchObject({ text: 'zy', finish_reason: 'length' });
    const s = await client.completions.create({ model: 'tiny-moe', prompt: [12, 34], stream: true });
    let text = '';
    for await (const c of s) text += c.choices[0]?.text ?? '';
    expect(text).toBe(reverse('12,34'));
    expect(engine.started.at(-1)!.request.prompt).toEqual([12, 34]);
  });

  test('chat log probabilities, streamed and not: text, bytes, alternatives, held-back tokens', async () => {
    const messages = [{ role: 'user' as const, content: 'ab~é' }]; // tokens é, ~, b, a
    const expected = [...'é~ba'].map((c, i) => ({
      token: c,
      logprob: -(i + 1) / 10,
      bytes: [...Buffer.from(c)],
      top_logprobs: [
        { token: String.fromCodePoint(c.codePointAt(0)! + 1), logprob: -(i + 1) / 10 - 1, bytes: expect.any(Array) },
        { token: String.fromCodePoint(c.codePointAt(0)! + 2), logprob: -9999, bytes: expect.any(Array) },
      ],
    }));
    const r = await client.chat.completions.create({ model: 'x', messages, logprobs: true, top_logprobs: 2 });
    expect(r.choices[0].message.content).toBe('éba');
    expect(r.choices[0].logprobs).toEqual({ content: expected, refusal: null });
    expect(engine.started.at(-1)!.request.topLogprobs).toBe(2);

    const stream = await client.chat.completions.create({
      model: 'x',
      messages,
      logprobs: true,
      top_logprobs: 2,
      stream: true,
    });
    const chunks: { text: string; tokens: string[] }[] = [];
    const streamed: unknown[] = [];
    for await (const c of stream) {
      const content = c.choices[0]?.logprobs?.content ?? [];
      streamed.push(...content);
      chunks.push({ text: c.choices[0]?.delta.content ?? '', tokens: content.map((e) => e.token) });
    }
    expect(streamed).toEqual(expected);
    // The held-back token goes out with the next chunk of text.
    expect(chunks.filter((c) => c.tokens.length > 0)).toEqual([
      { text: 'é', tokens: ['é'] },
      { text: 'b', tokens: ['~', 'b'] },
      { text: 'a', tokens: ['a'] },
    ]);

    const none = await client.chat.completions.create({ model: 'x', messages });
    expect(none.choices[0].logprobs).toBeNull();
    expect(engine.started.at(-1)!.request.topLogprobs).toBeUndefined();
    // Without the engine's token bytes a token is named by its id.
    engine.tokenBytes = undefined;
    const ids = await client.chat.completions.create({ model: 'x', messages, logprobs: true });
    expect(ids.choices[0].logprobs!.content!.map((e) => [e.token, e.bytes, e.top_logprobs])).toEqual(
      [...'é~ba'].map((c) => [`token_id:${c.codePointAt(0)}`, null, []]),
    );
  });

  test('completions log probabilities: tokens, log probabilities, alternatives with the token, offsets', async () => {
    const expected = (top: number) => ({
      tokens: [...'é~ba'],
      token_logprobs: [-0.1, -0.2, -0.3, -0.4],
      top_logprobs: [...'é~ba'].map((c, i) => {
        const cp = c.codePointAt(0)!;
        const alternatives = [
          [String.fromCodePoint(cp + 1), -(i + 1) / 10 - 1],
          [String.fromCodePoint(cp + 2), -9999],
        ].slice(0, top);
        return Object.fromEntries([...alternatives, [c, -(i + 1) / 10]]);
      }),
      text_offset: [0, 1, 2, 3],
    });
    for (const top of [0, 2]) {
      const r = await client.completions.create({ model: 'x', prompt: 'ab~é', logprobs: top });
      expect(r.choices[0].text).toBe('éba');
      expect(r.choices[0].logprobs).toEqual(expected(top));
    }
    const stream = await client.completions.create({ model: 'x', prompt: 'ab~é', logprobs: 2, stream: true });
    const parts: NonNullable<OpenAI.Completions.CompletionChoice['logprobs']>[] = [];
    for await (const c of stream) if (c.choices[0]?.logprobs) parts.push(c.choices[0].logprobs);
    expect(parts.map((p) => p.tokens)).toEqual([['é'], ['~', 'b'], ['a']]);
    const joined = { tokens: [], token_logprobs: [], top_logprobs: [], text_offset: [] } as Record<string, unknown[]>;
    for (const p of parts)
      for (const key of Object.keys(joined)) joined[key].push(...(p as Record<string, unknown[]>)[key]);
    expect(joined).toEqual(expected(2));
    // A token whose text is '__proto__' is a key like any other.
    engine.tokenBytes = () => Buffer.from('__proto__');
    const proto = await client.completions.create({ model: 'x', prompt: 'ab', logprobs: 1 });
    expect(Object.entries(proto.choices[0].logprobs!.top_logprobs![0])).toEqual([['__proto__', -1.1]]);
    for (const [patch, param] of [
      [{ logprobs: true }, 'logprobs'],
      [{ logprobs: 21 }, 'logprobs'],
      [{ top_logprobs: 2 }, 'top_logprobs'],
    ] as const) {
      const err = await client.completions
        .create({ model: 'x', prompt: 'hi', ...patch } as never)
        .catch((e: unknown) => e as InstanceType<typeof OpenAI.BadRequestError>);
      expect(err).toBeInstanceOf(OpenAI.BadRequestError);
      expect((err as InstanceType<typeof OpenAI.BadRequestError>).param).toBe(param);
    }
  });

  test('n choices: one generation each, seeds seed + i, usage counting the prompt once; streamed by index', async () => {
    const messages = [{ role: 'user' as const, content: 'ab~é' }];
    const r = await client.chat.completions.create({ model: 'x', messages, n: 3, seed: 10, logprobs: true });
    expect(r.choices.map((c) => [c.index, c.message.content, c.finish_reason])).toEqual([
      [0, 'éba', 'stop'],
      [1, 'éba', 'stop'],
      [2, 'éba', 'stop'],
    ]);
    expect(r.choices.map((c) => c.logprobs!.content!.length)).toEqual([4, 4, 4]);
    expect(engine.started.map((s) => s.request.seed)).toEqual([10, 11, 12]);
    expect(r.usage).toEqual({
      prompt_tokens: 4,
      completion_tokens: 12,
      total_tokens: 16,
      prompt_tokens_details: { cached_tokens: 2 },
    });

    const stream = await client.completions.create({
      model: 'x',
      prompt: 'xyz',
      n: 2,
      max_tokens: 2,
      stream: true,
      stream_options: { include_usage: true },
    });
    const texts = ['', ''];
    const finishes: (string | null)[] = [null, null];
    let usage: OpenAI.CompletionUsage | undefined;
    for await (const c of stream) {
      for (const ch of c.choices) {
        texts[ch.index] += ch.text;
        if (ch.finish_reason) finishes[ch.index] = ch.finish_reason;
      }
      if (c.usage) usage = c.usage;
    }
    expect(texts).toEqual(['zy', 'zy']);
    expect(finishes).toEqual(['length', 'length']);
    expect(usage).toEqual({
      prompt_tokens: 3,
      completion_tokens: 4,
      total_tokens: 7,
      prompt_tokens_details: { cached_tokens: 1 },
    });
    // Without a seed each choice draws its own.
    await client.completions.create({ model: 'x', prompt: 'q', n: 2 });
    expect(engine.started.slice(-2).map((s) => s.request.seed)).toEqual([undefined, undefined]);
  });

  test('n streamed choices, one failing mid-way: an error event ends the stream, the others are cancelled', async () => {
    const res = await fetch(`${base}/v1/completions`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ prompt: 'FAIL' + 'x'.repeat(60), n: 2, seed: 0, stream: true }),
    });
    expect(res.status).toBe(200);
    const text = await res.text();
    expect(text).toMatch(/data: \{"error":\{"message":"the step failed","type":"server_error"/);
    expect(text).not.toContain('[DONE]');
    expect(engine.started.map((s) => s.signal.aborted)).toEqual([true, true]); // the other choice too
    await waitFor(() => engine.active === 0);
    const after = await client.completions.create({ model: 'x', prompt: 'ok' });
    expect(after.choices[0].text).toBe('ko');
  });

  test('echo: the prompt first, in the text and in the log probabilities; streamed first', async () => {
    const plain = await client.completions.create({ model: 'x', prompt: 'xyz', echo: true });
    expect(plain.choices[0].text).toBe('xyzzyx');
    expect(plain.choices[0].logprobs).toBeNull();
    const ids = await client.completions.create({ model: 'x', prompt: [65, 66], echo: true, max_tokens: 1 });
    expect(ids.choices[0].text).toBe('A,B6'); // the ids' text, then the fake's first token of '65,66' reversed
    const scored = await client.completions.create({
      model: 'x',
      prompt: 'xyz',
      echo: true,
      logprobs: 1,
      max_tokens: 2,
    });
    expect(scored.choices[0].text).toBe('xyzzy');
    expect(scored.choices[0].logprobs).toEqual({
      tokens: ['x', 'y', 'z', 'z', 'y'],
      token_logprobs: [null, -0.01, -0.02, -0.1, -0.2],
      top_logprobs: [null, { y: -0.01 }, { z: -0.02 }, { '{': -1.1, z: -0.1 }, { z: -1.2, y: -0.2 }],
      text_offset: [0, 1, 2, 3, 4],
    });
    const stream = await client.completions.create({
      model: 'x',
      prompt: 'xyz',
      echo: true,
      logprobs: 0,
      stream: true,
    });
    const chunks: [string, string[] | undefined][] = [];
    for await (const c of stream) chunks.push([c.choices[0].text, c.choices[0].logprobs?.tokens]);
    expect(chunks).toEqual([
      ['xyz', ['x', 'y', 'z']],
      ['z', ['z']],
      ['y', ['y']],
      ['x', ['x']],
      ['', undefined],
    ]);
    const chat = await client.chat.completions
      .create({ model: 'x', messages: [{ role: 'user', content: 'hi' }], echo: true } as never)
      .catch((e: unknown) => e);
    expect(chat).toBeInstanceOf(OpenAI.BadRequestError);
    expect((chat as InstanceType<typeof OpenAI.BadRequestError>).param).toBe('echo');
  });

  test('tools: the calls in the text become tool_calls, streamed and not; tool turns reach the engine', async () => {
    const calls = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>';
    // The fake answers with its prompt reversed: this prompt makes it write text, then a call.
    const messages = [{ role: 'user' as const, content: reverse('Checking.' + calls) }];
    const tools = [
      {
        type: 'function' as const,
        function: { name: 'get_weather', parameters: { type: 'object', properties: { city: { type: 'string' } } } },
      },
    ];
    const r = await client.chat.completions.create({ model: 'x', messages, tools });
    expect(r.choices[0].finish_reason).toBe('tool_calls');
    expect(r.choices[0].message.content).toBe('Checking.');
    expect(r.choices[0].message.tool_calls).toEqual([
      {
        id: expect.stringMatching(/^call_/),
        type: 'function',
        function: { name: 'get_weather', arguments: '{"city":"Zürich"}' },
      },
    ]);
    expect(engine.started.at(-1)!.request.tools).toEqual(tools);

    const stream = await client.chat.completions.create({ model: 'x', messages, tools, stream: true });
    let content = '';
    const deltas: unknown[] = [];
    let finish: string | null = null;
    for await (const c of stream) {
      content += c.choices[0]?.delta.content ?? '';
      if (c.choices[0]?.delta.tool_calls) deltas.push(...c.choices[0].delta.tool_calls);
      finish = c.choices[0]?.finish_reason ?? finish;
    }
    expect(content).toBe('Checking.');
    expect(deltas).toEqual([
      {
        index: 0,
        id: expect.stringMatching(/^call_/),
        type: 'function',
        function: { name: 'get_weather', arguments: '{"city":"Zürich"}' },
      },
    ]);
    expect(finish).toBe('tool_calls');

    // tool_choice 'none': no tools in the prompt, the text as it is.
    const none = await client.chat.completions.create({ model: 'x', messages, tools, tool_choice: 'none' });
    expect(none.choices[0].message.content).toBe('Checking.' + calls);
    expect(none.choices[0].finish_reason).toBe('stop');
    expect(engine.started.at(-1)!.request.tools).toBeUndefined();

    // The turns of a tool conversation reach the template: arguments as objects, the tool's answer by id.
    await client.chat.completions.create({
      model: 'x',
      tools,
      messages: [
        { role: 'user', content: 'weather?' },
        {
          role: 'assistant',
          content: null,
          tool_calls: [
            { id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city":"Bern"}' } },
          ],
        },
        { role: 'tool', tool_call_id: 'call_1', content: '21 C' },
      ],
    });
    expect(engine.started.at(-1)!.request.prompt).toEqual([
      { role: 'user', content: 'weather?' },
      {
        role: 'assistant',
        content: '',
        tool_calls: [
          { id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: { city: 'Bern' } } },
        ],
      },
      { role: 'tool', content: '21 C', tool_call_id: 'call_1' },
    ]);

    // A forced call reaches the engine as such.
    await client.chat.completions.create({ model: 'x', messages, tools, tool_choice: 'required' });
    expect(engine.started.at(-1)!.request.toolChoice).toBe('required');
    await client.chat.completions.create({
      model: 'x',
      messages,
      tools,
      tool_choice: { type: 'function', function: { name: 'get_weather' } },
    });
    expect(engine.started.at(-1)!.request.toolChoice).toEqual({ name: 'get_weather' });

    const before = engine.started.length;
    for (const [patch, param] of [
      [{ tool_choice: { type: 'function', function: { name: 'other' } } }, 'tool_choice'],
      [{ tool_choice: 'always' }, 'tool_choice'],
      [{ tools: undefined, tool_choice: 'required' }, 'tool_choice'],
      [{ tool_choice: 'required', response_format: { type: 'json_object' } }, 'response_format'],
      [
        {
          tools: [{ type: 'function', function: { name: 'f', parameters: { type: 'object', allOf: [] } } }],
          tool_choice: 'required',
        },
        'tools[0].function.parameters',
      ],
      [{ tools: [{ type: 'function', function: {} }] }, 'tools[0]'],
      [{ tools: [{ type: 'retrieval' }] }, 'tools[0]'],
      [{ tools: 'all' }, 'tools'],
      [
        { messages: [{ role: 'assistant', content: null, tool_calls: [{ function: 5 }] }] },
        'messages[0].tool_calls[0]',
      ],
      [{ messages: [{ role: 'tool', tool_call_id: 7, content: 'x' }] }, 'messages[0].tool_call_id'],
    ] as const) {
      const err = await client.chat.completions
        .create({ model: 'x', messages, tools, ...patch } as never)
        .catch((e: unknown) => e as InstanceType<typeof OpenAI.BadRequestError>);
      expect(err).toBeInstanceOf(OpenAI.BadRequestError);
      expect((err as InstanceType<typeof OpenAI.BadRequestError>).param).toBe(param);
    }
    // A model whose template teaches no syntax the server reads refuses tools.
    engine.toolCallSyntax = undefined;
    const err = await client.chat.completions.create({ model: 'x', messages, tools }).catch((e: unknown) => e);
    expect((err as InstanceType<typeof OpenAI.BadRequestError>).param).toBe('tools');
    expect((err as Error).message).toMatch(/tool_call/);
    expect(engine.started.length).toBe(before);
  });

  test('models, health and the parameters the engine receives', async () => {
    const models = await client.models.list();
    expect(models.data.map((m) => m.id)).toEqual(['tiny-moe']);
    expect((await client.models.retrieve('tiny-moe')).id).toBe('tiny-moe');
    await expect(client.models.retrieve('other')).rejects.toBeInstanceOf(OpenAI.NotFoundError);
    expect((await fetch(`${base}/health`)).status).toBe(200);
    await client.chat.completions.create({
      model: 'x',
      messages: [
        { role: 'system', content: 'be brief' },
        { role: 'user', content: [{ type: 'text', text: 'hi' }] },
      ],
      temperature: 0.5,
      top_p: 0.9,
      seed: 42,
      stop: ['a', 'bc'],
      max_completion_tokens: 7,
      presence_penalty: 0.5,
      frequency_penalty: -0.25,
      logit_bias: { '17': -100, '3': 2.5 },
    });
    await client.chat.completions.create({ model: 'x', messages: [{ role: 'user', content: 'hi' }] });
    expect(engine.started.at(-1)!.request.responseFormat).toBe('text');
    await client.chat.completions.create({
      model: 'x',
      messages: [{ role: 'user', content: 'hi' }],
      response_format: { type: 'json_object' },
    });
    expect(engine.started.at(-1)!.request.responseFormat).toBe('json');
    const schema = { type: 'object', properties: { a: { type: 'integer' } }, required: ['a'] };
    await client.chat.completions.create({
      model: 'x',
      messages: [{ role: 'user', content: 'hi' }],
      response_format: { type: 'json_schema', json_schema: { name: 'thing', schema, strict: true } },
    });
    expect(engine.started.at(-1)!.request.responseFormat).toEqual({ schema });
    await client.chat.completions.create({
      model: 'x',
      messages: [{ role: 'user', content: 'hi' }],
      response_format: { type: 'text' },
    });
    expect(engine.started.at(-1)!.request.responseFormat).toBe('text');
    expect(engine.started.at(-5)!.request).toMatchObject({
      presencePenalty: 0.5,
      frequencyPenalty: -0.25,
      logitBias: { '17': -100, '3': 2.5 },
      endpoint: 'chat',
      prompt: [
        { role: 'system', content: 'be brief' },
        { role: 'user', content: 'hi' },
      ],
      temperature: 0.5,
      topP: 0.9,
      seed: 42,
      stop: ['a', 'bc'],
      maxTokens: 7,
      stream: false,
    });
  });

  test('/tokenize and /detokenize: the ids of a prompt or of messages, and back; a bad body is a 400 naming its field', async () => {
    const post = (path: string, body: unknown, key = KEY) =>
      fetch(`${base}${path}`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
      });
    const ids = (text: string) => [...text].map((c) => c.codePointAt(0));
    expect(await (await post('/tokenize', { model: 'tiny-moe', prompt: 'héllo 🙂' })).json()).toEqual({
      count: 7,
      max_model_len: 4096,
      tokens: ids('héllo 🙂'),
    });
    const tools = [{ type: 'function', function: { name: 'f' } }];
    const chat = [
      { role: 'system', content: 'be brief' },
      { role: 'user', content: [{ type: 'text', text: 'hi' }] },
    ];
    expect(await (await post('/tokenize', { messages: chat, tools })).json()).toMatchObject({
      tokens: ids('be brief|hi|1'),
    });
    expect(await (await post('/detokenize', { tokens: ids('hé') })).json()).toEqual({ prompt: 'h,é' });
    const cases: [string, unknown, string, string][] = [
      ['/tokenize', {}, 'prompt', 'invalid_type'],
      ['/tokenize', { prompt: '' }, 'prompt', 'invalid_type'],
      ['/tokenize', { prompt: 'a', messages: chat }, 'prompt', 'invalid_value'],
      ['/tokenize', { prompt: 'a', add_special_tokens: false }, 'add_special_tokens', 'unsupported_parameter'],
      ['/tokenize', { messages: chat, add_generation_prompt: false }, 'add_generation_prompt', 'unsupported_parameter'],
      ['/tokenize', { messages: [{ role: 'robot', content: 'x' }] }, 'messages[0].role', 'invalid_value'],
      ['/tokenize', { prompt: 'a', model: 5 }, 'model', 'invalid_type'],
      ['/detokenize', { tokens: [1, 2.5] }, 'tokens', 'invalid_type'],
      ['/detokenize', { tokens: 'abc' }, 'tokens', 'invalid_type'],
    ];
    for (const [path, body, param, code] of cases) {
      const r = await post(path, body);
      expect([path, JSON.stringify(body), r.status]).toEqual([path, JSON.stringify(body), 400]);
      expect((await json(r)).error).toMatchObject({ type: 'invalid_request_error', param, code });
    }
    expect((await post('/tokenize', { prompt: 'a' }, 'wrong')).status).toBe(401);
    expect((await fetch(`${base}/tokenize`, { headers: { Authorization: `Bearer ${KEY}` } })).status).toBe(405);
  });

  test('401 without the key; /health and /metrics stay open', async () => {
    const anon = new OpenAI({ apiKey: 'wrong', baseURL: `${base}/v1`, maxRetries: 0 });
    const err = await anon.models.list().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OpenAI.AuthenticationError);
    expect((err as InstanceType<typeof OpenAI.APIError>).code).toBe('invalid_api_key');
    const raw = await fetch(`${base}/v1/models`);
    expect(raw.status).toBe(401);
    expect((await json(raw)).error).toMatchObject({ type: 'invalid_request_error', code: 'invalid_api_key' });
    expect((await fetch(`${base}/metrics`)).status).toBe(200);
  });

  test.each([
    [{ temperature: 'hot' }, 'temperature'],
    [{ temperature: 2.5 }, 'temperature'],
    [{ top_p: 0 }, 'top_p'],
    [{ top_p: 1.5 }, 'top_p'],
    [{ max_tokens: 2.5 }, 'max_tokens'],
    [{ max_tokens: 0 }, 'max_tokens'],
    [
      { response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'object', not: {} } } } },
      'response_format.json_schema.schema',
    ],
    [{ response_format: { type: 'json_schema', json_schema: { schema: {} } } }, 'response_format.json_schema'],
    [{ response_format: { type: 'xml' } }, 'response_format'],
    [{ response_format: 'json' }, 'response_format'],
    [{ n: 0 }, 'n'],
    [{ n: 1.5 }, 'n'],
    [{ n: 4 }, 'n'],
    [{ seed: 'x' }, 'seed'],
    [{ stop: [1, 2] }, 'stop'],
    [{ stop: ['a', 'b', 'c', 'd', 'e'] }, 'stop'],
    [{ stream: 'yes' }, 'stream'],
    [{ logprobs: 1 }, 'logprobs'],
    [{ logprobs: true, top_logprobs: 21 }, 'top_logprobs'],
    [{ logprobs: true, top_logprobs: 1.5 }, 'top_logprobs'],
    [{ top_logprobs: 3 }, 'top_logprobs'],
    [{ presence_penalty: 2.5 }, 'presence_penalty'],
    [{ frequency_penalty: 'x' }, 'frequency_penalty'],
    [{ logit_bias: [5] }, 'logit_bias'],
    [{ logit_bias: { five: 1 } }, 'logit_bias'],
    [{ logit_bias: { '-5': 1 } }, 'logit_bias'],
    [{ logit_bias: { '5': 101 } }, 'logit_bias'],
    [{ logit_bias: { '5': '1' } }, 'logit_bias'],
    [{ messages: [] }, 'messages'],
    [{ messages: [{ role: 'wizard', content: 'x' }] }, 'messages[0].role'],
    [{ messages: [{ role: 'user', content: 5 }] }, 'messages[0].content'],
  ])('bad parameter %j is a 400 naming %s, and never reaches the engine', async (patch, param) => {
    const body = { model: 'tiny-moe', messages: [{ role: 'user', content: 'hi' }], ...patch };
    const err = await client.chat.completions.create(body as never).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OpenAI.BadRequestError);
    const e = err as InstanceType<typeof OpenAI.BadRequestError>;
    expect(e.param).toBe(param);
    expect(e.type).toBe('invalid_request_error');
    expect(e.message).toContain(param.split('[')[0]);
    expect(engine.started).toHaveLength(0);
  });

  test('malformed JSON, a body over the limit and an unknown route: OpenAI error objects', async () => {
    const post = (path: string, body: string) =>
      fetch(`${base}${path}`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' },
        body,
      });
    const bad = await post('/v1/chat/completions', '{"messages": [');
    expect(bad.status).toBe(400);
    expect((await json(bad)).error).toMatchObject({ type: 'invalid_request_error', code: 'invalid_json', param: null });
    const big = await post('/v1/completions', JSON.stringify({ prompt: 'x'.repeat(5000) }));
    expect(big.status).toBe(400);
    expect((await json(big)).error.message).toMatch(/too large.*4096/);
    // The same limit through the client's own error class.
    const viaClient = await client.completions
      .create({ model: 'm', prompt: 'y'.repeat(5000) })
      .catch((e: unknown) => e);
    expect(viaClient).toBeInstanceOf(OpenAI.BadRequestError);
    expect((viaClient as InstanceType<typeof OpenAI.APIError>).code).toBe('body_too_large');
    const none = await post('/v1/embeddings', '{}');
    expect(none.status).toBe(404);
    expect((await json(none)).error.message).toContain('/v1/embeddings');
    const wrongMethod = await fetch(`${base}/v1/chat/completions`, { headers: { Authorization: `Bearer ${KEY}` } });
    expect(wrongMethod.status).toBe(405);
    // A model id that is not valid percent-encoding: the client's mistake, not a server error.
    const badId = await fetch(`${base}/v1/models/%E0%A4%A`, { headers: { Authorization: `Bearer ${KEY}` } });
    expect(badId.status).toBe(400);
    expect((await json(badId)).error).toMatchObject({ type: 'invalid_request_error', param: 'model' });
    expect(engine.started).toHaveLength(0);
  });

  test('a prompt the model refuses is a 400 with context_length_exceeded, streamed or not', async () => {
    for (const stream of [false, true]) {
      const err = await client.completions
        .create({ model: 'tiny-moe', prompt: 'TOO-LONG', stream } as never)
        .catch((e: unknown) => e);
      expect(err).toBeInstanceOf(OpenAI.BadRequestError);
      expect((err as InstanceType<typeof OpenAI.APIError>).code).toBe('context_length_exceeded');
      expect((err as Error).message).toContain('4096');
    }
  });

  test('past maxSequences + maxQueue requests get 429 with Retry-After', async () => {
    let open!: () => void;
    engine.gate = new Promise((r) => (open = r));
    const held = [0, 1, 2].map(() =>
      client.completions.create({ model: 'tiny-moe', prompt: 'abc' }).then((r) => r.choices[0].text),
    );
    await waitFor(() => engine.started.length === 3);
    const res = await fetch(`${base}/v1/completions`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ prompt: 'abc' }),
    });
    expect(res.status).toBe(429);
    expect(res.headers.get('retry-after')).toBe('1');
    expect((await json(res)).error.code).toBe('rate_limit_exceeded');
    const err = await client.completions.create({ model: 'tiny-moe', prompt: 'abc' }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OpenAI.RateLimitError);
    open();
    expect(await Promise.all(held)).toEqual(['cba', 'cba', 'cba']);
    // Each choice is a sequence: two requests of n = 2 are past the 3 that fit.
    engine.gate = new Promise((r) => (open = r));
    const pair = client.completions.create({ model: 'x', prompt: 'abc', n: 2 });
    await waitFor(() => engine.started.length === 5);
    const second = await client.completions.create({ model: 'x', prompt: 'abc', n: 2 }).catch((e: unknown) => e);
    expect(second).toBeInstanceOf(OpenAI.RateLimitError);
    open();
    expect((await pair).choices.map((c) => c.text)).toEqual(['cba', 'cba']);
  });

  test('a client that disconnects aborts its generation', async () => {
    let open!: () => void;
    engine.gate = new Promise((r) => (open = r));
    const abort = new AbortController();
    const pending = client.chat.completions
      .create(
        { model: 'tiny-moe', messages: [{ role: 'user', content: 'abc' }], stream: true },
        { signal: abort.signal },
      )
      .catch((e: unknown) => e);
    await waitFor(() => engine.started.length === 1);
    abort.abort();
    await waitFor(() => engine.started[0].signal.aborted);
    open();
    expect(await pending).toBeInstanceOf(OpenAI.APIUserAbortError);
  });

  test('metrics: requests by status, token counters, latency histograms and expert routing', async () => {
    await client.chat.completions.create({ model: 'm', messages: [{ role: 'user', content: 'abcd' }] });
    await client.chat.completions.create({ model: 'm', messages: [] }).catch(() => undefined);
    const text = await (await fetch(`${base}/metrics`)).text();
    expect(text).toContain('fused_moe_requests_total{endpoint="/v1/chat/completions",status="200"} 1');
    expect(text).toContain('fused_moe_requests_total{endpoint="/v1/chat/completions",status="400"} 1');
    expect(text).toContain('fused_moe_generated_tokens_total{endpoint="/v1/chat/completions"} 4');
    expect(text).toContain('fused_moe_prompt_tokens_total{endpoint="/v1/chat/completions"} 4');
    expect(text).toContain('fused_moe_prompt_tokens_cached_total{endpoint="/v1/chat/completions"} 2');
    expect(text).toContain('fused_moe_time_to_first_token_seconds_count{endpoint="/v1/chat/completions"} 1');
    expect(text).toContain('fused_moe_inter_token_latency_seconds_count{endpoint="/v1/chat/completions"} 3');
    expect(text).toContain('fused_moe_expert_tokens_total{layer="1",expert="1"} 4');
    expect(text).toMatch(/fused_moe_queue_depth 0/);
    const again = await (await fetch(`${base}/metrics`)).text();
    const preemptions = (t: string) => Number(/\nfused_moe_preemptions_total (\d+)\n/.exec(t)?.[1]);
    expect(preemptions(text)).toBeGreaterThan(0);
    expect(preemptions(again)).toBe(preemptions(text) + 1);
  });

  test('shutdown lets a running stream finish, then refuses connections', async () => {
    let open!: () => void;
    engine.gate = new Promise((r) => (open = r));
    const pending = client.completions.create({ model: 'm', prompt: 'abc' });
    await waitFor(() => engine.started.length === 1);
    const stopped = server.shutdown(5000);
    expect((await fetch(`${base}/health`).catch(() => undefined))?.status ?? 'refused').not.toBe(200);
    open();
    expect((await pending).choices[0].text).toBe('cba');
    await stopped;
    await expect(fetch(`${base}/health`)).rejects.toThrow();
  });

  test('shutdown past its grace: a stream under way ends with an error event, a request with no token yet gets 503', async () => {
    let open!: () => void;
    engine.gate = new Promise((r) => (open = r));
    const post = (body: object) =>
      fetch(`${base}/v1/completions`, {
        method: 'POST',
        headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
      });
    const streamed = await post({ prompt: '2:abcdef', stream: true }); // headers come with its first token
    const waiting = post({ prompt: 'xyz' });
    await waitFor(() => engine.started.length === 2);
    const stopped = server.shutdown(0);
    await waitFor(() => engine.started.every((s) => s.signal.aborted)); // the grace (0 ms) is over
    open();
    const events = (await streamed.text()).split('\n\n').filter((e) => e !== '');
    expect(events.map((e) => JSON.parse(e.slice('data: '.length)))).toEqual([
      expect.objectContaining({ choices: [expect.objectContaining({ text: 'f', finish_reason: null })] }),
      expect.objectContaining({ choices: [expect.objectContaining({ text: 'e', finish_reason: null })] }),
      { error: expect.objectContaining({ code: 'shutting_down', type: 'server_error' }) },
    ]);
    const refused = await waiting;
    expect(refused.status).toBe(503);
    expect((await json(refused)).error).toMatchObject({ code: 'shutting_down' });
    await stopped;
  });
});

test('/health answers 503 until the engine is ready', async () => {
  let ready!: (e: GenerationEngine) => void;
  const server = createServer(new Promise<GenerationEngine>((r) => (ready = r)));
  const base = await listen(server);
  try {
    const loading = await fetch(`${base}/health`);
    expect(loading.status).toBe(503);
    expect(await json(loading)).toEqual({ status: 'loading' });
    const early = await fetch(`${base}/v1/completions`, { method: 'POST', body: '{"prompt":"x"}' });
    expect(early.status).toBe(503);
    ready(new FakeEngine());
    await waitFor(async () => (await fetch(`${base}/health`)).status === 200);
  } finally {
    await server.shutdown(0);
  }
});

/** A response's JSON error body, typed for the assertions. */
async function json(
  res: Response,
): Promise<{ error: { message: string; type: string; code: string | null; param: string | null } }> {
  return (await res.json()) as never;
}

async function waitFor(cond: () => boolean | Promise<boolean>, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 10));
  }
}
