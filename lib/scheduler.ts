/**
 * The queue every forward() goes through. At most `maxConcurrent` native forwards run at once (each
 * holds a libuv worker thread, and the native pool runs one job at a time anyway), so file and DNS work
 * of the host application keeps its threads. Each layer runs one forward at a time and layers take
 * turns (round-robin), so a small request on one layer starts while a long prefill runs on another,
 * and their native phases interleave in arrival order. A request aborted while it waits is dropped
 * without ever reaching native code.
 */
import { AbortError } from './errors';

interface Job {
  start: () => Promise<Float32Array>;
  resolve: (y: Float32Array) => void;
  reject: (err: unknown) => void;
  signal?: AbortSignal;
  onAbort?: () => void;
}

export class Scheduler {
  readonly #queues = new Map<object, Job[]>();
  /** Layers with queued jobs, in turn order. */
  readonly #ready: object[] = [];
  /** Layers with a forward running. */
  readonly #busy = new Set<object>();
  #running = 0;
  readonly #maxConcurrent: number;

  constructor(maxConcurrent: number) {
    this.#maxConcurrent = maxConcurrent;
  }

  /**
   * Runs start() when this layer's turn comes and settles the promise as start()'s does; `queued` is
   * true when the job has to wait (it did not start at once). Aborting `signal` while the job waits
   * drops it with an AbortError.
   */
  submit(
    layer: object,
    start: () => Promise<Float32Array>,
    signal?: AbortSignal,
  ): { promise: Promise<Float32Array>; queued: boolean } {
    let job!: Job;
    const promise = new Promise<Float32Array>((resolve, reject) => {
      job = { start, resolve, reject, signal };
    });
    if (this.#running < this.#maxConcurrent && !this.#busy.has(layer) && !this.#queues.has(layer)) {
      this.#run(layer, job);
      return { promise, queued: false };
    }
    let q = this.#queues.get(layer);
    if (!q) this.#queues.set(layer, (q = []));
    if (q.length === 0) this.#ready.push(layer);
    q.push(job);
    if (signal) {
      job.onAbort = () => {
        const i = q!.indexOf(job);
        if (i < 0) return; // already started: the native side sees the abort
        q!.splice(i, 1);
        if (q!.length === 0) this.#forget(layer);
        job.reject(new AbortError(undefined, { cause: signal.reason }));
      };
      signal.addEventListener('abort', job.onAbort, { once: true });
    }
    return { promise, queued: true };
  }

  #forget(layer: object): void {
    this.#queues.delete(layer);
    const i = this.#ready.indexOf(layer);
    if (i >= 0) this.#ready.splice(i, 1);
  }

  #run(layer: object, job: Job): void {
    if (job.onAbort) job.signal!.removeEventListener('abort', job.onAbort);
    this.#running++;
    this.#busy.add(layer);
    let p: Promise<Float32Array>;
    try {
      p = job.start();
    } catch (err) {
      p = Promise.reject(err);
    }
    p.then(job.resolve, job.reject).finally(() => {
      this.#running--;
      this.#busy.delete(layer);
      this.#pump();
    });
  }

  /** Starts queued jobs: the first layer in turn order that is not already running one. */
  #pump(): void {
    while (this.#running < this.#maxConcurrent) {
      const i = this.#ready.findIndex((l) => !this.#busy.has(l));
      if (i < 0) return;
      const layer = this.#ready.splice(i, 1)[0];
      const q = this.#queues.get(layer)!;
      const job = q.shift()!;
      if (q.length > 0) this.#ready.push(layer);
      else this.#queues.delete(layer);
      this.#run(layer, job);
    }
  }
}

function defaultConcurrency(): number {
  const v = Number(process.env.FUSED_MOE_MAX_CONCURRENT);
  return Number.isInteger(v) && v >= 1 && v <= 64 ? v : 2;
}

/** The scheduler of this JS realm (each worker thread has its own). */
export const scheduler = new Scheduler(defaultConcurrency());
