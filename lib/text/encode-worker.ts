/**
 * A worker thread that tokenizes long texts, so that the event loop (and with it every stream of the
 * step loop) goes on meanwhile: @huggingface/tokenizers encodes about 1 MB of text a second, and a
 * prompt of 256,000 characters (37,600 tokens) held the main thread 108 ms (`node bench/tokenize.js`).
 *
 * The worker builds its own tokenizer from the checkpoint's tokenizer.json, and only if the file still
 * holds the bytes the main thread loaded (the same SHA-256): its ids are the main thread's ids. Any
 * failure of the worker (it cannot start, the file changed, it dies) makes `encode` reject with
 * WorkerUnavailable, and the caller tokenizes on its own thread instead.
 */
import { Worker } from 'worker_threads';

/** What the worker needs to build the same tokenizer. */
export interface EncodeWorkerSource {
  /** tokenizer.json, read again by the worker. */
  file: string;
  /** SHA-256 (hex) of the file's text as the main thread read it. */
  sha256: string;
  /** tokenizer_config.json's object (special tokens). */
  config: Record<string, unknown>;
}

/** The worker cannot serve (did not start, stopped, or the file changed): tokenize elsewhere. */
export class WorkerUnavailable extends Error {}

// Plain JavaScript run as the worker (eval: the same source whether the package runs from dist/ or its
// TypeScript runs under a test transform). Ids travel as float64, so a value that is not a token id
// arrives as one the caller's check refuses (NaN), never as a wrapped integer.
const WORKER_SOURCE = `
const { parentPort, workerData } = require('worker_threads');
const text = require('fs').readFileSync(workerData.file, 'utf8');
const digest = require('crypto').createHash('sha256').update(text).digest('hex');
if (digest !== workerData.sha256) throw new Error(workerData.file + ' changed since it was loaded');
const { Tokenizer } = require(workerData.module);
const tokenizer = new Tokenizer(JSON.parse(text), workerData.config);
parentPort.on('message', (m) => {
  let ids;
  try {
    ids = tokenizer.encode(m.text, { add_special_tokens: m.addSpecialTokens }).ids;
  } catch (err) {
    parentPort.postMessage({ id: m.id, error: String((err && err.message) || err) });
    return;
  }
  const out = new Float64Array(ids.length);
  for (let i = 0; i < ids.length; i++) out[i] = typeof ids[i] === 'number' ? ids[i] : NaN;
  parentPort.postMessage({ id: m.id, ids: out }, [out.buffer]);
});
`;

interface Pending {
  resolve(ids: Float64Array): void;
  reject(err: Error): void;
}

export class EncodeWorker {
  readonly #source: EncodeWorkerSource;
  #worker: Worker | null = null;
  /** Set once the worker failed or was closed: every later call is WorkerUnavailable at once. */
  #unavailable: Error | null = null;
  readonly #pending = new Map<number, Pending>();
  #nextId = 0;

  constructor(source: EncodeWorkerSource) {
    this.#source = source;
  }

  /** Whether the thread has been started and has not failed or been closed. */
  get running(): boolean {
    return this.#worker !== null;
  }

  /** Starts the thread now (encode starts it otherwise): its tokenizer is built meanwhile. */
  start(): void {
    if (this.#unavailable || this.#worker) return;
    try {
      this.#worker = this.#start();
    } catch (err) {
      this.#fail(err);
    }
  }

  /** The ids of `text`, computed on the worker thread. */
  encode(text: string, addSpecialTokens: boolean): Promise<Float64Array> {
    this.start();
    const worker = this.#worker;
    if (!worker) return Promise.reject(this.#unavailable);
    const id = this.#nextId++;
    return new Promise<Float64Array>((resolve, reject) => {
      this.#pending.set(id, { resolve, reject });
      worker.ref(); // a pending encode keeps the process alive; an idle worker does not
      worker.postMessage({ id, text, addSpecialTokens });
    });
  }

  /** Stops the worker: pending calls reject with `reason`, later ones with WorkerUnavailable. */
  close(reason: Error): void {
    this.#unavailable ??= new WorkerUnavailable('the tokenizer worker was closed');
    this.#rejectAll(reason);
    const worker = this.#worker;
    this.#worker = null;
    if (worker) void worker.terminate();
  }

  #start(): Worker {
    const worker = new Worker(WORKER_SOURCE, {
      eval: true,
      workerData: {
        module: require.resolve('@huggingface/tokenizers'),
        file: this.#source.file,
        sha256: this.#source.sha256,
        config: this.#source.config,
      },
    });
    worker.unref();
    worker.on('message', (m: { id: number; ids?: Float64Array; error?: string }) => {
      const p = this.#pending.get(m.id);
      if (!p) return;
      this.#pending.delete(m.id);
      if (this.#pending.size === 0) worker.unref();
      // An encode that throws in the worker throws on the caller's thread too, with its own stack.
      if (m.ids) p.resolve(m.ids);
      else p.reject(new WorkerUnavailable(m.error ?? 'the tokenizer worker failed'));
    });
    worker.on('error', (err) => this.#fail(err));
    worker.on('exit', () => this.#fail(new Error('the tokenizer worker stopped')));
    return worker;
  }

  #fail(err: unknown): void {
    if (this.#unavailable) return;
    this.#unavailable = new WorkerUnavailable(
      `the tokenizer worker is unavailable: ${String((err as Error)?.message ?? err)}`,
    );
    this.close(this.#unavailable);
  }

  #rejectAll(reason: Error): void {
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const p of pending) p.reject(reason);
  }
}
