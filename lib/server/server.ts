/**
 * An OpenAI-compatible HTTP server over one model: `/v1/chat/completions`, `/v1/completions` (streaming
 * or not), `/v1/models`, `/health` and `/metrics`. It adds no scheduler of its own: every request
 * becomes one generation in the model's shared step loop, and the queue bound here only decides when
 * to answer 429 instead of waiting.
 */
import * as http from 'http';
import { randomBytes, timingSafeEqual } from 'crypto';
import { ApiError, invalidRequest } from './api-error';
import { CompletionRequest, parseCompletionRequest, parseDetokenizeRequest, parseTokenizeRequest } from './request';
import { ServerMetrics } from './metrics';
import { LogprobWriter } from './logprobs';
import { ToolCallStream, parseToolCalls } from './tool-calls';
import type { GenerationEngine, FinishReason, GeneratedToken } from './engine';
import { MoeModel } from '../model/model';
import { modelEngine } from './model-engine';
import { messageOf } from '../errors';

export interface ServerOptions {
  /** Requests must carry `Authorization: Bearer <apiKey>`; /health and /metrics stay open. */
  apiKey?: string;
  /** The id `/v1/models` lists and responses carry; default 'fused-moe'. */
  modelId?: string;
  /** Requests that may wait for a sequence slot before new ones get 429 (a choice of n counts as one); default 64. */
  maxQueue?: number;
  /** Largest request body in bytes; default 1 MiB. */
  maxBodyBytes?: number;
}

export interface FusedMoeServer extends http.Server {
  /**
   * Stops accepting requests, lets running ones finish for up to `graceMs` (default 10 s), then
   * aborts the rest and closes every connection.
   */
  shutdown(graceMs?: number): Promise<void>;
}

interface Running {
  /** Sequences its choices take. */
  sequences: number;
  abort: AbortController;
  done: Promise<void>;
}

const JSON_TYPE = 'application/json; charset=utf-8';

/**
 * The server over a model (or any GenerationEngine), or a promise of one: until it resolves, /health
 * answers 503 and generating requests get 503.
 */
export function createServer(
  model: MoeModel | GenerationEngine | Promise<MoeModel | GenerationEngine>,
  options: ServerOptions = {},
): FusedMoeServer {
  const modelId = options.modelId ?? 'fused-moe';
  const maxQueue = options.maxQueue ?? 64;
  const maxBodyBytes = options.maxBodyBytes ?? 1 << 20;
  const created = Math.floor(Date.now() / 1000);
  const key = options.apiKey === undefined ? undefined : Buffer.from(`Bearer ${options.apiKey}`);
  let ready: GenerationEngine | undefined;
  let loadError: unknown;
  let stopping = false;
  const running = new Set<Running>();

  const metrics = new ServerMetrics({
    queueDepth: () => ready?.queueDepth() ?? 0,
    activeSequences: () => ready?.activeSequences() ?? 0,
    expertTokens: () => ready?.expertTokens() ?? [],
    preemptions: () => ready?.preemptions?.() ?? 0,
  });

  Promise.resolve(model).then(
    (m) => (ready = m instanceof MoeModel ? modelEngine(m) : m),
    (err) => (loadError = err),
  );

  const server = http.createServer((req, res) => {
    const endpoint = endpointOf(req);
    res.on('finish', () => metrics.requests.inc({ endpoint, status: String(res.statusCode) }));
    handle(req, res, endpoint).catch((err) => fail(res, err));
  }) as FusedMoeServer;

  async function handle(req: http.IncomingMessage, res: http.ServerResponse, endpoint: string): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://localhost');
    const route = `${req.method} ${url.pathname}`;
    if (url.pathname === '/health') {
      if (req.method !== 'GET') throw methodNotAllowed(req, 'GET');
      if (loadError) return send(res, 503, { status: 'failed', error: messageOf(loadError) });
      if (stopping) return send(res, 503, { status: 'stopping' });
      return send(res, ready ? 200 : 503, { status: ready ? 'ok' : 'loading' });
    }
    if (url.pathname === '/metrics') {
      if (req.method !== 'GET') throw methodNotAllowed(req, 'GET');
      const text = await metrics.registry.metrics();
      res.writeHead(200, { 'Content-Type': metrics.registry.contentType });
      res.end(text);
      return;
    }
    authorize(req);
    if (url.pathname === '/v1/models') {
      if (req.method !== 'GET') throw methodNotAllowed(req, 'GET');
      return send(res, 200, { object: 'list', data: [modelObject()] });
    }
    if (url.pathname.startsWith('/v1/models/')) {
      if (req.method !== 'GET') throw methodNotAllowed(req, 'GET');
      const raw = url.pathname.slice('/v1/models/'.length);
      let id: string;
      try {
        id = decodeURIComponent(raw);
      } catch {
        throw new ApiError(
          400,
          `The model id '${raw}' is not valid percent-encoding`,
          'invalid_request_error',
          'model',
        );
      }
      if (id !== modelId)
        throw new ApiError(
          404,
          `The model '${id}' does not exist; this server has '${modelId}'`,
          'invalid_request_error',
          'model',
          'model_not_found',
        );
      return send(res, 200, modelObject());
    }
    if (url.pathname === '/tokenize' || url.pathname === '/detokenize') {
      if (req.method !== 'POST') throw methodNotAllowed(req, 'POST');
      const body = await readJson(req);
      const engine = readyEngine();
      if (url.pathname === '/detokenize') {
        const tokens = parseDetokenizeRequest(body);
        if (!engine.detokenize) throw noTokenizerRoute(url.pathname);
        return send(res, 200, { prompt: engine.detokenize(tokens) });
      }
      const request = parseTokenizeRequest(body);
      if (!engine.tokenize) throw noTokenizerRoute(url.pathname);
      const tokens = await engine.tokenize(request);
      return send(res, 200, { count: tokens.length, max_model_len: engine.contextLength ?? null, tokens });
    }
    const kind =
      route === 'POST /v1/chat/completions' ? 'chat' : route === 'POST /v1/completions' ? 'completion' : undefined;
    if (!kind) {
      if (url.pathname === '/v1/chat/completions' || url.pathname === '/v1/completions')
        throw methodNotAllowed(req, 'POST');
      throw new ApiError(404, `Invalid URL (${req.method} ${url.pathname})`, 'invalid_request_error');
    }
    const body = await readJson(req);
    const request = parseCompletionRequest(kind, body);
    const engine = readyEngine();
    if (request.tools && !engine.toolCallSyntax)
      throw invalidRequest(
        "'tools' needs a chat template that teaches the model a tool-call syntax this server reads " +
          "(Hermes-style <tool_call> tags, as Qwen's, or Mistral's [TOOL_CALLS]); this model's does not",
        'tools',
        'unsupported_parameter',
      );
    // Each choice is a sequence: n of them count as n requests against the queue.
    const capacity = engine.maxSequences + maxQueue;
    if (request.n > capacity)
      throw invalidRequest(
        `'n' must be at most ${capacity} on this server (${engine.maxSequences} running and ${maxQueue} waiting), got ${request.n}`,
        'n',
        'invalid_value',
      );
    let inFlight = 0;
    for (const r of running) inFlight += r.sequences;
    if (inFlight + request.n > capacity)
      throw new ApiError(
        429,
        `Too many requests: ${engine.maxSequences} running and ${maxQueue} waiting is the limit; retry later`,
        'requests',
        null,
        'rate_limit_exceeded',
        { 'Retry-After': '1' },
      );
    await generate(engine, request, req, res, endpoint);
  }

  async function generate(
    engine: GenerationEngine,
    request: CompletionRequest,
    req: http.IncomingMessage,
    res: http.ServerResponse,
    endpoint: string,
  ): Promise<void> {
    const abort = new AbortController();
    let settle!: () => void;
    const entry: Running = { sequences: request.n, abort, done: new Promise<void>((r) => (settle = r)) };
    running.add(entry);
    // A client that goes away cancels its sequence; the step loop frees it at its next step.
    const onClose = () => {
      if (res.writableFinished) return;
      metrics.cancelled.inc({ endpoint });
      abort.abort();
    };
    res.on('close', onClose);
    const arrived = performance.now();
    try {
      // One generation per choice (n), each a sequence of the step loop; with a seed, choice i uses seed + i.
      const runs = Array.from({ length: request.n }, (_, i) =>
        engine.start(
          request.seed === undefined || i === 0 ? request : { ...request, seed: request.seed + i },
          abort.signal,
        ),
      );
      const id = `${request.endpoint === 'chat' ? 'chatcmpl' : 'cmpl'}-${randomBytes(12).toString('hex')}`;
      const object = request.endpoint === 'chat' ? 'chat.completion' : 'text_completion';
      const chunkObject = request.endpoint === 'chat' ? 'chat.completion.chunk' : 'text_completion';
      const createdAt = Math.floor(Date.now() / 1000);
      // The first tokens are awaited before any header, so that a request the model refuses (a prompt
      // over the context, a template that throws) still gets a plain 400; the other choices then end.
      const firsts = await Promise.all(runs.map((r) => r.next()));
      // Cancelled by shutdown() before its first token (waiting for a sequence, or reading its prompt).
      if (stopping && firsts.some((f, i) => f.done && runs[i].result().finishReason === 'abort')) throw shuttingDown();
      const choices = runs.map((run, index) => ({
        run,
        index,
        first: firsts[index],
        text: '',
        tokens: 0,
        last: 0,
        logprobs: request.topLogprobs === undefined ? null : new LogprobWriter(engine.tokenBytes?.bind(engine)),
        toolCalls: request.tools && request.stream ? new ToolCallStream(engine.toolCallSyntax) : null,
      }));
      type Choice = (typeof choices)[number];
      /** What echo puts first: the prompt as sent (token ids as their text). */
      const promptText = !request.echo
        ? ''
        : typeof request.prompt === 'string'
          ? request.prompt
          : (engine.detokenize?.(request.prompt as number[]) ?? '');
      /** Echo: the prompt's text, its tokens' log probabilities gathered before the generated ones. */
      const echo = (c: Choice) => {
        const scored = c.first.done ? undefined : c.first.value.promptLogprobs;
        if (scored) c.logprobs?.addPrompt(scored);
        return promptText;
      };
      const onToken = (c: Choice, piece: GeneratedToken) => {
        const now = performance.now();
        if (c.tokens === 0) metrics.timeToFirstToken.observe({ endpoint }, (now - arrived) / 1000);
        else metrics.interTokenLatency.observe({ endpoint }, (now - c.last) / 1000);
        c.last = now;
        c.tokens++;
        metrics.token(endpoint);
        c.logprobs?.add(piece);
      };
      /** Runs a choice to its end, `onPiece` for each token; its result. */
      const drain = async (c: Choice, onPiece: (piece: GeneratedToken) => void) => {
        for (let piece = c.first; !piece.done; piece = await c.run.next()) {
          onToken(c, piece.value);
          onPiece(piece.value);
        }
        const result = c.run.result();
        metrics.promptTokens.inc({ endpoint }, result.promptTokens);
        metrics.cachedPromptTokens.inc({ endpoint }, result.cachedTokens ?? 0);
        return result;
      };
      /** The log probabilities of the choice's tokens gathered since the last call, in the endpoint's shape. */
      const takeLogprobs = (c: Choice) =>
        !c.logprobs || c.logprobs.pending === 0
          ? null
          : request.endpoint === 'chat'
            ? c.logprobs.takeChat()
            : c.logprobs.takeCompletion();
      const delta = (c: Choice, content: string, finish: FinishReason | 'tool_calls' | null) =>
        request.endpoint === 'chat'
          ? {
              index: c.index,
              delta: content === '' && finish ? {} : { content },
              logprobs: takeLogprobs(c),
              finish_reason: finish,
            }
          : { index: c.index, text: content, logprobs: takeLogprobs(c), finish_reason: finish };
      if (request.stream) {
        res.writeHead(200, {
          'Content-Type': 'text/event-stream; charset=utf-8',
          'Cache-Control': 'no-cache',
          Connection: 'keep-alive',
        });
        const usageField = request.includeUsage ? { usage: null } : {};
        // Once a choice fails the stream has ended with the error; the other choices' last pieces go nowhere.
        const event = (data: unknown) => void (res.writableEnded || res.write(`data: ${JSON.stringify(data)}\n\n`));
        const chunk = (c: unknown) =>
          event({ id, object: chunkObject, created: createdAt, model: modelId, choices: [c], ...usageField });
        const results = await Promise.all(
          choices.map(async (c) => {
            if (request.endpoint === 'chat')
              chunk({ index: c.index, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null });
            if (request.echo) chunk(delta(c, echo(c), null));
            const result = await drain(c, (piece) => {
              const text = c.toolCalls ? c.toolCalls.push(piece.text) : piece.text;
              if (text !== '') chunk(delta(c, text, null));
            });
            if (result.finishReason === 'abort') return result;
            let finish: FinishReason | 'tool_calls' = result.finishReason;
            if (c.toolCalls) {
              // The text held from the first <tool_call> on: the calls, whole, or content after all.
              const end = c.toolCalls.finish();
              if (end.content !== '') chunk(delta(c, end.content, null));
              if (end.calls) {
                const calls = end.calls.map((call, k) => ({ index: k, ...call }));
                chunk({ index: c.index, delta: { tool_calls: calls }, logprobs: takeLogprobs(c), finish_reason: null });
                if (finish === 'stop') finish = 'tool_calls';
              }
            }
            chunk(delta(c, '', finish));
            return result;
          }),
        );
        if (results.some((r) => r.finishReason === 'abort')) {
          // Cut by shutdown(): the client is still there, and an error event tells it the answer is not whole.
          if (stopping) fail(res, shuttingDown());
          return void res.end();
        }
        if (request.includeUsage)
          event({ id, object: chunkObject, created: createdAt, model: modelId, choices: [], usage: usage(results) });
        res.end('data: [DONE]\n\n');
        return;
      }
      if (request.echo) for (const c of choices) c.text = echo(c);
      const results = await Promise.all(choices.map((c) => drain(c, (piece) => (c.text += piece.text))));
      if (results.some((r) => r.finishReason === 'abort')) {
        if (stopping) throw shuttingDown();
        return void res.destroy();
      }
      const answers = choices.map((c, i) => {
        const finish = results[i].finishReason;
        if (request.endpoint === 'completion')
          return { index: c.index, text: c.text, logprobs: takeLogprobs(c), finish_reason: finish };
        const called = request.tools ? parseToolCalls(c.text, engine.toolCallSyntax) : null;
        return {
          index: c.index,
          message: called
            ? { role: 'assistant', content: called.content, tool_calls: called.calls, refusal: null }
            : { role: 'assistant', content: c.text, refusal: null },
          logprobs: takeLogprobs(c),
          finish_reason: called && finish === 'stop' ? 'tool_calls' : finish,
        };
      });
      send(res, 200, { id, object, created: createdAt, model: modelId, choices: answers, usage: usage(results) });
    } catch (err) {
      abort.abort(); // the other choices of the request end too
      fail(res, err); // answered before `done` settles: shutdown() closes the connections once all are
    } finally {
      res.off('close', onClose);
      running.delete(entry);
      settle();
    }
  }

  /** The model's engine, or the 503 that says why there is none yet (or any more). */
  function readyEngine(): GenerationEngine {
    if (stopping) throw shuttingDown();
    if (loadError) throw new ApiError(503, `The model failed to load: ${messageOf(loadError)}`, 'server_error');
    if (!ready)
      throw new ApiError(
        503,
        'The model is still loading; retry when /health answers 200',
        'server_error',
        null,
        'loading',
        { 'Retry-After': '5' },
      );
    return ready;
  }

  function noTokenizerRoute(path: string): ApiError {
    return new ApiError(404, `${path} needs a model with a tokenizer; this one has none`, 'invalid_request_error');
  }

  function shuttingDown(): ApiError {
    return new ApiError(503, 'The server is shutting down', 'server_error', null, 'shutting_down');
  }

  /**
   * Usage of a request's choices: the prompt once (with the tokens of it that the first choice found
   * in the cache), the generated tokens of every choice.
   */
  function usage(results: { promptTokens: number; completionTokens: number; cachedTokens?: number }[]) {
    const completion = results.reduce((sum, r) => sum + r.completionTokens, 0);
    const cached = results[0].cachedTokens;
    return {
      prompt_tokens: results[0].promptTokens,
      completion_tokens: completion,
      total_tokens: results[0].promptTokens + completion,
      ...(cached === undefined ? {} : { prompt_tokens_details: { cached_tokens: cached } }),
    };
  }

  function modelObject() {
    return { id: modelId, object: 'model', created, owned_by: 'fused-moe' };
  }

  function authorize(req: http.IncomingMessage): void {
    if (!key) return;
    const got = Buffer.from(req.headers.authorization ?? '');
    if (got.length !== key.length || !timingSafeEqual(got, key))
      throw new ApiError(
        401,
        'Incorrect or missing API key: send Authorization: Bearer <key>',
        'invalid_request_error',
        null,
        'invalid_api_key',
      );
  }

  function readJson(req: http.IncomingMessage): Promise<unknown> {
    const declared = Number(req.headers['content-length'] ?? 0);
    if (declared > maxBodyBytes) return Promise.reject(tooLarge(declared));
    return new Promise((resolve, reject) => {
      const parts: Buffer[] = [];
      let size = 0;
      req.on('data', (b: Buffer) => {
        size += b.length;
        if (size > maxBodyBytes) {
          req.removeAllListeners('data');
          req.resume();
          reject(tooLarge(size));
        } else parts.push(b);
      });
      req.on('error', reject);
      req.on('end', () => {
        if (size > maxBodyBytes) return;
        const text = Buffer.concat(parts).toString('utf8');
        try {
          resolve(JSON.parse(text));
        } catch (err) {
          reject(invalidRequest(`The request body is not valid JSON: ${messageOf(err)}`, null, 'invalid_json'));
        }
      });
    });
  }

  function tooLarge(size: number): ApiError {
    return invalidRequest(
      `The request body is too large: ${size} bytes, the limit is ${maxBodyBytes}`,
      null,
      'body_too_large',
    );
  }

  function fail(res: http.ServerResponse, err: unknown): void {
    if (res.headersSent) {
      // A stream already under way: an error event in the OpenAI shape, then the end of the stream.
      const api = err instanceof ApiError ? err : new ApiError(500, messageOf(err), 'server_error');
      if (!res.writableEnded) res.end(`data: ${JSON.stringify(api.body())}\n\n`);
      return;
    }
    const api = toApiError(err);
    send(res, api.status, api.body(), api.headers);
  }

  server.shutdown = async (graceMs = 10_000) => {
    stopping = true;
    const closed = new Promise<void>((r) => server.close(() => r()));
    server.closeIdleConnections();
    const all = () => Promise.all([...running].map((r) => r.done));
    let timer: NodeJS.Timeout | undefined;
    const graceOver = new Promise<void>((r) => (timer = setTimeout(r, graceMs)));
    await Promise.race([all(), graceOver]);
    clearTimeout(timer);
    for (const r of running) r.abort.abort();
    await all();
    server.closeAllConnections();
    await closed;
  };
  return server;
}

function methodNotAllowed(req: http.IncomingMessage, allowed: string): ApiError {
  return new ApiError(
    405,
    `Method ${req.method} is not allowed here; use ${allowed}`,
    'invalid_request_error',
    null,
    null,
    { Allow: allowed },
  );
}

/** Errors of the generator: a bad argument is the client's (400), anything else the server's (500). */
function toApiError(err: unknown): ApiError {
  if (err instanceof ApiError) return err;
  if (err instanceof TypeError || err instanceof RangeError) {
    const tooLong = /context/i.test(err.message);
    return invalidRequest(err.message, null, tooLong ? 'context_length_exceeded' : 'invalid_value');
  }
  return new ApiError(500, `The server failed: ${messageOf(err)}`, 'server_error');
}

function send(res: http.ServerResponse, status: number, body: unknown, headers: Record<string, string> = {}): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': JSON_TYPE, 'Content-Length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

/** The metrics label of a request: its route, or 'other' (never the raw path, which a client picks). */
function endpointOf(req: http.IncomingMessage): string {
  const p = (req.url ?? '').split('?')[0];
  return [
    '/v1/chat/completions',
    '/v1/completions',
    '/v1/models',
    '/health',
    '/metrics',
    '/tokenize',
    '/detokenize',
  ].includes(p)
    ? p
    : p.startsWith('/v1/models/')
      ? '/v1/models/{id}'
      : 'other';
}
