/**
 * `fused-moe serve <checkpoint dir> [options]`: loads the model and serves the OpenAI API over it. The
 * server listens at once and answers /health with 503 until the model is ready; SIGTERM or SIGINT
 * stops accepting, lets running streams finish within the grace period, and exits 0.
 */
import * as path from 'path';
import { parseArgs } from 'util';
import { MoeModel } from '../model/model';
import { createServer } from './server';
import { progressPrinter } from '../cli';

export const SERVE_USAGE = `usage: fused-moe serve <checkpoint dir> [options]
  --port N            port to listen on (default 8080)
  --host ADDR         address to bind (default 127.0.0.1, loopback only)
  --quantize Q        none | int8 | int4 (default none)
  --max-sequences N   sequences decoded together (default 16)
  --context N         context length in tokens (default min(4096, the model's))
  --cache-tokens N    KV cache positions, shared by every sequence (default: max-sequences full
                      contexts; fewer save memory, and sequences that outgrow it wait their turn)
  --max-queue N       requests that may wait before 429 (default 64)
  --max-body BYTES    largest request body (default 1048576)
  --api-key KEY       require Authorization: Bearer KEY (default: FUSED_MOE_API_KEY if set)
  --model-id ID       the id /v1/models lists (default: the folder's name)
  --threads N         CPU threads (default: all)
  --grace S           seconds running streams get at shutdown (default 10)`;

function positiveInt(name: string, v: string | undefined, fallback: number | undefined): number | undefined {
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new Error(`--${name} must be a non-negative integer, got '${v}'`);
  return n;
}

export async function serveMain(argv: string[]): Promise<number> {
  let args;
  try {
    args = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        port: { type: 'string' },
        host: { type: 'string' },
        quantize: { type: 'string' },
        'max-sequences': { type: 'string' },
        context: { type: 'string' },
        'cache-tokens': { type: 'string' },
        'max-queue': { type: 'string' },
        'max-body': { type: 'string' },
        'api-key': { type: 'string' },
        'model-id': { type: 'string' },
        threads: { type: 'string' },
        grace: { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (err) {
    console.error(`fused-moe serve: ${(err as Error).message}\n${SERVE_USAGE}`);
    return 2;
  }
  const { values, positionals } = args;
  if (values.help) {
    console.log(SERVE_USAGE);
    return 0;
  }
  if (positionals.length !== 1) {
    console.error(`fused-moe serve: expected one checkpoint folder\n${SERVE_USAGE}`);
    return 2;
  }
  const dir = path.resolve(positionals[0]);
  let opts;
  try {
    const q = values.quantize ?? 'none';
    if (q !== 'none' && q !== 'int8' && q !== 'int4')
      throw new Error(`--quantize must be none, int8 or int4, got '${q}'`);
    opts = {
      quantize: q as 'none' | 'int8' | 'int4',
      port: positiveInt('port', values.port, 8080)!,
      maxSequences: positiveInt('max-sequences', values['max-sequences'], 16)!,
      grace: positiveInt('grace', values.grace, 10)!,
      contextLength: positiveInt('context', values.context, undefined),
      cacheTokens: positiveInt('cache-tokens', values['cache-tokens'], undefined),
      maxQueue: positiveInt('max-queue', values['max-queue'], 64),
      maxBodyBytes: positiveInt('max-body', values['max-body'], 1 << 20),
      threads: positiveInt('threads', values.threads, 0),
    };
  } catch (err) {
    console.error(`fused-moe serve: ${(err as Error).message}`);
    return 2;
  }
  const { quantize, port, maxSequences, grace, contextLength, cacheTokens, maxQueue, maxBodyBytes, threads } = opts;
  const host = values.host ?? '127.0.0.1';
  const modelId = values['model-id'] ?? path.basename(dir);
  const apiKey = values['api-key'] ?? process.env.FUSED_MOE_API_KEY;

  const loadAbort = new AbortController(); // a signal while the model loads stops the load too
  const loading = MoeModel.load(dir, {
    quantize,
    contextLength,
    maxSequences,
    cacheTokens,
    threads,
    signal: loadAbort.signal,
    onProgress: progressPrinter((t) => process.stderr.write(t), process.stderr.isTTY === true),
  });
  const server = createServer(loading, { apiKey, modelId, maxQueue, maxBodyBytes });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  }).catch((err) => {
    throw new Error(`cannot listen on ${host}:${port}: ${(err as Error).message}`);
  });
  // The bound port, not the asked one: --port 0 picks a free port (tests and benchmarks use it).
  const bound = (server.address() as { port: number }).port;
  let stopping = false;
  // The handlers are in place before the line that tells a supervisor the server is up.
  const exited = new Promise<number>((resolve) => {
    const stop = (signal: string) => {
      stopping = true;
      console.error(`fused-moe: ${signal}: finishing running requests (up to ${grace} s)`);
      loadAbort.abort();
      void server
        .shutdown(grace * 1000)
        .then(async () => (await loading.catch(() => undefined))?.dispose())
        .then(() => resolve(process.exitCode === 1 ? 1 : 0));
    };
    process.once('SIGTERM', () => stop('SIGTERM'));
    process.once('SIGINT', () => stop('SIGINT'));
  });
  console.error(`fused-moe: listening on http://${host}:${bound} (model '${modelId}' loading)`);
  loading.then(
    () => console.error(`fused-moe: model ready; try GET http://${host}:${bound}/v1/models`),
    (err) => {
      if (stopping) return; // the load was stopped by the signal
      console.error(`fused-moe: the model failed to load: ${(err as Error).message}`);
      process.exitCode = 1;
      void server.shutdown(0);
    },
  );
  return exited;
}
