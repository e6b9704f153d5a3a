/**
 * A worker thread that tokenizes long texts and renders long conversations through the chat template,
 * so that the event loop (and with it every stream of the step loop) goes on meanwhile:
 * @huggingface/tokenizers encodes about 1 MB of text a second, and a prompt of 256,000 characters
 * (37,600 tokens) held the main thread 108-124 ms; @huggingface/jinja's time goes by the message, and
 * the 20,000 short turns of a megabyte's request body held it 81-103 ms (`node bench/tokenize.js`).
 *
 * The worker builds its own tokenizer from the checkpoint's tokenizer.json, and only if the file still
 * holds the bytes the main thread loaded (the same SHA-256): its ids are the main thread's ids. Its
 * template is parsed from the same source as the main thread's, with the same special tokens. Any
 * failure of the worker (it cannot start, the file changed, it dies, the messages cannot be copied to
 * it) makes `encode` and `render` reject with WorkerUnavailable, and the caller does the work on its
 * own thread instead; a template that refuses the messages is a TemplateRefusal.
 */
import { Worker } from 'worker_threads';
import { messageOf } from '../errors';

/** What the worker needs to build the same tokenizer. */
export interface EncodeWorkerSource {
  /** tokenizer.json, read again by the worker. */
  file: string;
  /** SHA-256 (hex) of the file's text as the main thread read it. */
  sha256: string;
  /** tokenizer_config.json's object (special tokens). */
  config: Record<string, unknown>;
  /** The chat template's source and the special tokens it is given (ChatTemplate), or null. */
  chatTemplate: { source: string; bosToken: string; eosToken: string } | null;
}

/** The worker cannot serve (did not start, stopped, or the file changed): do the work elsewhere. */
export class WorkerUnavailable extends Error {}

/** The chat template raised on the worker; the message is the template's own. */
export class TemplateRefusal extends Error {}

// Plain JavaScript run as the worker (eval: the same source whether the package runs from dist/ or its
// TypeScript runs under a test transform). Ids travel as float64, so a value that is not a token id
// arrives as one the caller's check refuses (NaN), never as a wrapped integer. The template is parsed
// at the first render (it parsed on the main thread already); an error there is not a refusal.
const WORKER_SOURCE = `
const { parentPort, workerData } = require('worker_threads');
const text = require('fs').readFileSync(workerData.file, 'utf8');
const digest = require('crypto').createHash('sha256').update(text).digest('hex');
if (digest !== workerData.sha256) throw new Error(workerData.file + ' changed since it was loaded');
const { Tokenizer } = require(workerData.module);
const tokenizer = new Tokenizer(JSON.parse(text), workerData.config);
let template = null;
function render(m) {
  const t = workerData.chatTemplate;
  try {
    if (!template) template = new (require(workerData.jinja).Template)(t.source);
  } catch (err) {
    return { id: m.id, error: String((err && err.message) || err) };
  }
  try {
    const context = { messages: m.messages, add_generation_prompt: m.addGenerationPrompt,
      bos_token: t.bosToken, eos_token: t.eosToken };
    if (m.tools) context.tools = m.tools;
    return { id: m.id, text: template.render(context) };
  } catch (err) {
    return { id: m.id, refused: err instanceof Error ? err.message : String(err) };
  }
}
parentPort.on('message', (m) => {
  if (m.kind === 'render') {
    parentPort.postMessage(render(m));
    return;
  }
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

/** A reply of the worker: ids (encode), text (render), the template's refusal, or its failure. */
interface Reply {
  id: number;
  ids?: Float64Array;
  text?: string;
  refused?: string;
  error?: string;
}

interface Pending {
  resolve(reply: Reply): void;
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
  async encode(text: string, addSpecialTokens: boolean): Promise<Float64Array> {
    const reply = await this.#call({ kind: 'encode', text, addSpecialTokens });
    if (reply.ids) return reply.ids;
    // An encode that throws in the worker throws on the caller's thread too, with its own stack.
    throw new WorkerUnavailable(reply.error ?? 'the tokenizer worker failed');
  }

  /**
   * The chat template's text of `messages`, rendered on the worker thread. A template that raises
   * rejects with TemplateRefusal; messages that cannot be copied to the thread, with WorkerUnavailable.
   */
  async render(messages: readonly object[], addGenerationPrompt: boolean, tools?: readonly object[]): Promise<string> {
    if (!this.#source.chatTemplate) throw new WorkerUnavailable('the checkpoint has no chat template');
    const reply = await this.#call({ kind: 'render', messages, addGenerationPrompt, tools });
    if (typeof reply.text === 'string') return reply.text;
    if (reply.refused !== undefined) throw new TemplateRefusal(reply.refused);
    throw new WorkerUnavailable(reply.error ?? 'the tokenizer worker failed');
  }

  #call(message: Record<string, unknown>): Promise<Reply> {
    this.start();
    const worker = this.#worker;
    if (!worker) return Promise.reject(this.#unavailable);
    const id = this.#nextId++;
    return new Promise<Reply>((resolve, reject) => {
      try {
        worker.postMessage({ ...message, id }); // throws for a value the thread cannot receive (a function)
      } catch (err) {
        reject(new WorkerUnavailable(`the worker cannot take the request: ${messageOf(err)}`));
        return;
      }
      this.#pending.set(id, { resolve, reject });
      worker.ref(); // a pending call keeps the process alive; an idle worker does not
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
        jinja: require.resolve('@huggingface/jinja'),
        file: this.#source.file,
        sha256: this.#source.sha256,
        config: this.#source.config,
        chatTemplate: this.#source.chatTemplate,
      },
    });
    worker.unref();
    worker.on('message', (m: Reply) => {
      const p = this.#pending.get(m.id);
      if (!p) return;
      this.#pending.delete(m.id);
      if (this.#pending.size === 0) worker.unref();
      p.resolve(m);
    });
    worker.on('error', (err) => this.#fail(err));
    worker.on('exit', () => this.#fail(new Error('the tokenizer worker stopped')));
    return worker;
  }

  #fail(err: unknown): void {
    if (this.#unavailable) return;
    this.#unavailable = new WorkerUnavailable(`the tokenizer worker is unavailable: ${messageOf(err)}`);
    this.close(this.#unavailable);
  }

  #rejectAll(reason: Error): void {
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const p of pending) p.reject(reason);
  }
}
