/** The public MoeLayer: shapes the API and checks every argument before the native code runs. */
import { binding, NativeCancel, NativeLayer, NativeWeightExtras, WeightArray } from './binding';
import { scheduler } from './scheduler';
import { AbortError, argRangeError, argTypeError, fromNative, MoeError } from './errors';
import {
  checkedProduct,
  checkInteger,
  checkObject,
  checkOneOf,
  checkSignal,
  checkTyped,
  describe,
  typedLength,
} from './validate';
import { FromSafetensorsOptions, loadLayer } from './safetensors/index';

export type Routing = 'softmax-topk-renorm' | 'softmax-topk' | 'sigmoid-topk' | 'sigmoid-topk-renorm';
export type WeightDtype = 'float32' | 'bfloat16' | 'float16';
export type Device = 'cpu' | 'cuda' | 'auto';
export type Quantize = 'none' | 'int8' | 'int4';
export type QuantGroupSize = 32 | 64 | 128;

/** Group-limited routing (DeepSeek-V2/V3): only the experts of the `topK` best groups can be picked. */
export interface ExpertGroups {
  /** Number of equal groups the experts are split into (divides numExperts). */
  count: number;
  /** Groups that compete, 1..count; topK (experts) must be at most topK * numExperts / count. */
  topK: number;
  /** A group's score: its best expert score ('max', DeepSeek-V2) or its two best summed ('top2-sum', V3). */
  score: 'max' | 'top2-sum';
}

export interface MoeConfig {
  /** H: size of a token's hidden state. */
  hiddenSize: number;
  /** F: size of each expert's SwiGLU intermediate. */
  intermediateSize: number;
  /** E: number of experts (1..1024). */
  numExperts: number;
  /** k: experts picked per token (1..E). */
  topK: number;
  /**
   * Scores and renormalisation: 'softmax-topk-renorm' (Mixtral, default), 'softmax-topk' (the picked
   * probabilities as they are), 'sigmoid-topk' (scores = sigmoid(logits)) or 'sigmoid-topk-renorm'
   * (the picked sigmoids divided by their sum + 1e-20, DeepSeek-V3).
   */
  routing?: Routing;
  /** Every routing weight is multiplied by it, after renormalisation (default 1). */
  routedScale?: number;
  /** Group-limited routing; null (default): every expert competes. */
  expertGroups?: ExpertGroups | null;
  /** Fs: width of a SwiGLU shared expert every token runs, added to the routed output; 0 (default): none. */
  sharedIntermediateSize?: number;
  /** Scale the shared expert's output by sigmoid(weights.shared.gate . x) per token (Qwen2-MoE). Default false. */
  sharedGate?: boolean;
  /** Element type of w1/w3/w2: 'float32' (Float32Array) or 16-bit (Uint16Array). Default 'float32'. */
  weightDtype?: WeightDtype;
  /** 'cpu' (default), 'cuda', or 'auto' (CUDA when available, else CPU). */
  device?: Device;
  /** At most this many of the shared pool's threads for this layer's forwards (never more); 0 (default): all. */
  threads?: number;
  /** CUDA device ordinal; default 0. */
  cudaDevice?: number;
  /**
   * Quantize w1/w3/w2 at load (CPU only): 'none' (default), 'int8' or 'int4'. Symmetric, one 16-bit
   * scale per quantGroupSize weights along the reduction axis; any weightDtype is accepted as input.
   */
  quantize?: Quantize;
  /** Weights per scale when quantized: 32, 64 or 128 (default). */
  quantGroupSize?: QuantGroupSize;
}

/** One array for all experts ([E, rows, cols]) or one array per expert. */
export type ExpertWeights = WeightArray | WeightArray[];

export interface MoeWeights {
  /** Router weight [E, H], float32. */
  gate: Float32Array;
  /** Gate projections [E, F, H]. */
  w1: ExpertWeights;
  /** Up projections [E, F, H]. */
  w3: ExpertWeights;
  /** Down projections [E, H, F]. */
  w2: ExpertWeights;
  /** [E] float32 added to the scores for choosing the experts only; the weights use the unbiased scores. */
  scoreBias?: Float32Array;
  /**
   * The shared expert, when config.sharedIntermediateSize > 0: w1, w3 [Fs, H] and w2 [H, Fs] in the
   * layer's weightDtype; gate [H] float32 when config.sharedGate. Several shared experts are one of
   * their summed width.
   */
  shared?: { w1: WeightArray; w3: WeightArray; w2: WeightArray; gate?: Float32Array };
}

export interface ForwardOptions {
  /** Where to write the result (T*H floats); a new array otherwise. */
  out?: Float32Array;
  /** Cancels the request: it rejects with an AbortError and stops at the next chunk boundary. */
  signal?: AbortSignal;
}

export interface RouteResult {
  /** [T, k] expert indices, in descending order of routing weight. */
  experts: Int32Array;
  /** [T, k] routing weights, after renormalisation and routedScale. */
  weights: Float32Array;
}

// Limits and names come from the core (csrc/core/options.h) through the binding: written once.
function normaliseConfig(config: unknown): Required<MoeConfig> {
  checkObject('config', config);
  const { limits, enums } = binding();
  const hiddenSize = checkInteger('config.hiddenSize', config.hiddenSize, 1, limits.maxDim);
  const intermediateSize = checkInteger('config.intermediateSize', config.intermediateSize, 1, limits.maxDim);
  const numExperts = checkInteger('config.numExperts', config.numExperts, 1, limits.maxExperts);
  const topK = checkInteger('config.topK', config.topK, 1, numExperts);
  const routing = checkOneOf('config.routing', config.routing ?? enums.routing[0], enums.routing as readonly Routing[]);
  const weightDtype = checkOneOf(
    'config.weightDtype',
    config.weightDtype ?? enums.weightDtype[0],
    enums.weightDtype as readonly WeightDtype[],
  );
  const device = checkOneOf('config.device', config.device ?? enums.device[0], enums.device as readonly Device[]);
  const threads = checkInteger('config.threads', config.threads ?? 0, 0, limits.maxThreads);
  const cudaDevice = checkInteger('config.cudaDevice', config.cudaDevice ?? 0, 0, limits.maxCudaDevice);
  const quantize = checkOneOf(
    'config.quantize',
    config.quantize ?? enums.quantize[0],
    enums.quantize as readonly Quantize[],
  );
  const routedScale = config.routedScale ?? 1;
  if (typeof routedScale !== 'number')
    throw argTypeError(`config.routedScale must be a number, got ${describe(routedScale)}`);
  if (!(Number.isFinite(routedScale) && routedScale > 0))
    throw argRangeError(`config.routedScale must be a finite number > 0, got ${routedScale}`);
  const expertGroups = normaliseGroups(config.expertGroups, numExperts, topK);
  const sharedIntermediateSize = checkInteger(
    'config.sharedIntermediateSize',
    config.sharedIntermediateSize ?? 0,
    0,
    limits.maxDim,
  );
  const sharedGate = config.sharedGate ?? false;
  if (typeof sharedGate !== 'boolean')
    throw argTypeError(`config.sharedGate must be a boolean, got ${describe(sharedGate)}`);
  if (sharedGate && sharedIntermediateSize === 0)
    throw argRangeError('config.sharedGate needs a shared expert: set config.sharedIntermediateSize > 0');
  const quantGroupSize = config.quantGroupSize ?? limits.defaultQuantGroupSize;
  const groups = limits.quantGroupSizes;
  if (!(groups as readonly unknown[]).includes(quantGroupSize))
    throw argRangeError(
      `config.quantGroupSize must be ${groups.slice(0, -1).join(', ')} or ${groups[groups.length - 1]}, ` +
        `got ${describe(quantGroupSize)}`,
    );
  if (quantize !== 'none' && device === 'cuda')
    throw argRangeError(`config.quantize '${quantize}' runs on the CPU only; use device 'cpu' or 'auto'`);
  checkedProduct(
    'numExperts * intermediateSize * hiddenSize',
    limits.maxElements,
    numExperts,
    intermediateSize,
    hiddenSize,
  );
  return {
    hiddenSize,
    intermediateSize,
    numExperts,
    topK,
    routing,
    weightDtype,
    device,
    threads,
    cudaDevice,
    quantize,
    quantGroupSize: quantGroupSize as QuantGroupSize,
    routedScale,
    expertGroups,
    sharedIntermediateSize,
    sharedGate,
  };
}

function normaliseGroups(v: unknown, numExperts: number, topK: number): ExpertGroups | null {
  if (v === undefined || v === null) return null;
  checkObject('config.expertGroups', v);
  const count = checkInteger('config.expertGroups.count', v.count, 1, numExperts);
  if (numExperts % count !== 0)
    throw argRangeError(`config.expertGroups.count must divide numExperts (${numExperts}), got ${count}`);
  const groupTopK = checkInteger('config.expertGroups.topK', v.topK, 1, count);
  const names = binding().enums.groupScore as readonly ExpertGroups['score'][];
  const score = checkOneOf('config.expertGroups.score', v.score ?? names[0], names);
  const perGroup = numExperts / count;
  if (score === 'top2-sum' && perGroup < 2)
    throw argRangeError(`config.expertGroups.score 'top2-sum' needs at least 2 experts per group, got ${perGroup}`);
  if (topK > groupTopK * perGroup)
    throw argRangeError(
      `config.topK (${topK}) must be at most expertGroups.topK * numExperts / expertGroups.count ` +
        `(${groupTopK * perGroup}): only the chosen groups' experts can be picked`,
    );
  return Object.freeze({ count, topK: groupTopK, score });
}

/** Splits one [E, rows, cols] array into E zero-copy views, or checks an array of E per-expert arrays. */
function expertViews(name: string, v: unknown, cfg: Required<MoeConfig>, rows: number, cols: number): WeightArray[] {
  const E = cfg.numExperts;
  const ctor = cfg.weightDtype === 'float32' ? Float32Array : Uint16Array;
  const detail = ` (weightDtype '${cfg.weightDtype}')`;
  const per = rows * cols;
  if (Array.isArray(v)) {
    if (v.length !== E)
      throw argRangeError(`${name} must hold ${E} per-expert arrays (numExperts), got ${v.length}`, 'ERR_MOE_SHAPE');
    return v.map((a, e) => checkTyped<WeightArray>(`${name}[${e}]`, a, ctor, per, detail));
  }
  const all = checkTyped<WeightArray>(
    name,
    v,
    ctor,
    checkedProduct(name, binding().limits.maxElements, E, rows, cols),
    detail,
  );
  const views: WeightArray[] = [];
  for (let e = 0; e < E; e++) views.push(all.subarray(e * per, (e + 1) * per));
  return views;
}

function layerArgs(config: MoeConfig, weights: MoeWeights) {
  const cfg = normaliseConfig(config);
  checkObject('weights', weights);
  const { hiddenSize: H, intermediateSize: F, numExperts: E } = cfg;
  const gate = checkTyped<Float32Array>(
    'weights.gate',
    weights.gate,
    Float32Array,
    checkedProduct('weights.gate', binding().limits.maxElements, E, H),
  );
  const w1 = expertViews('weights.w1', weights.w1, cfg, F, H);
  const w3 = expertViews('weights.w3', weights.w3, cfg, F, H);
  const w2 = expertViews('weights.w2', weights.w2, cfg, H, F);
  const extras: NativeWeightExtras = {};
  if (weights.scoreBias !== undefined) {
    extras.scoreBias = checkTyped<Float32Array>(
      'weights.scoreBias',
      weights.scoreBias,
      Float32Array,
      E,
      ' (numExperts)',
    );
    if (!extras.scoreBias.every(Number.isFinite))
      throw argRangeError('weights.scoreBias must hold finite numbers only');
  }
  const Fs = cfg.sharedIntermediateSize;
  if (Fs > 0) {
    const shared = weights.shared;
    if (shared === undefined)
      throw argTypeError(
        `weights.shared must be an object with w1, w3 and w2 (config.sharedIntermediateSize is ${Fs}), got undefined`,
      );
    checkObject('weights.shared', shared);
    const ctor = cfg.weightDtype === 'float32' ? Float32Array : Uint16Array;
    const detail = ` (weightDtype '${cfg.weightDtype}', sharedIntermediateSize ${Fs})`;
    const size = checkedProduct('weights.shared', binding().limits.maxElements, Fs, H);
    extras.shared = {
      w1: checkTyped<WeightArray>('weights.shared.w1', shared.w1, ctor, size, detail),
      w3: checkTyped<WeightArray>('weights.shared.w3', shared.w3, ctor, size, detail),
      w2: checkTyped<WeightArray>('weights.shared.w2', shared.w2, ctor, size, detail),
    };
    if (cfg.sharedGate)
      extras.shared.gate = checkTyped<Float32Array>(
        'weights.shared.gate',
        shared.gate,
        Float32Array,
        H,
        ' (hiddenSize)',
      );
  } else if (weights.shared !== undefined) {
    throw argRangeError('weights.shared is given but config.sharedIntermediateSize is 0');
  }
  return { cfg, gate, w1, w3, w2, extras };
}

export interface CreateOptions {
  /** Stops the build between steps: the promise rejects with an AbortError and the memory is freed. */
  signal?: AbortSignal;
  /** Longest stretch the event loop is held by one packing step, in milliseconds (default 10). */
  stepMs?: number;
}

/** A native layer and the checked config it was built from. */
interface BuiltLayer {
  native: NativeLayer;
  cfg: Required<MoeConfig>;
}

/** Checks the arguments and packs the weights on the calling thread. */
function buildNow(config: MoeConfig, weights: MoeWeights): BuiltLayer {
  const { cfg, gate, w1, w3, w2, extras } = layerArgs(config, weights);
  try {
    return { native: new (binding().NativeLayer)(cfg, gate, w1, w3, w2, extras), cfg };
  } catch (err) {
    throw fromNative(err);
  }
}

const nextTurn = () => new Promise<void>((resolve) => setImmediate(resolve));

export class MoeLayer {
  /** The configuration with defaults filled in. */
  readonly config: Readonly<Required<MoeConfig>>;
  /** Where this layer runs: 'cpu' or 'cuda' ('auto' resolved). */
  readonly device: 'cpu' | 'cuda';
  /** Kernel set (CPU ISA) or CUDA device name. */
  readonly kernels: string;
  /** Why a `device: 'auto'` layer runs on the CPU (no CUDA library, driver or device; quantized); else null. */
  readonly fallbackReason: string | null;
  #native: NativeLayer | undefined;
  #disposing = false;
  readonly #inFlight = new Set<Promise<unknown>>();

  /** Set by #adopt() only for the one constructor call it makes: that layer is built already. */
  static #adopting: BuiltLayer | undefined;

  /**
   * Builds the layer on the calling thread: the weights are packed (copied) before it returns, so this
   * holds the event loop for as long as packing takes (about a second per GB on two cores). On a server
   * that is already serving, use MoeLayer.create().
   */
  constructor(config: MoeConfig, weights: MoeWeights) {
    const built = MoeLayer.#adopting ?? buildNow(config, weights);
    this.#native = built.native;
    const info = built.native.info();
    this.config = Object.freeze(built.cfg);
    this.device = info.device;
    this.kernels = info.kernels;
    this.fallbackReason = info.fallbackReason;
  }

  /**
   * Builds the layer without holding the event loop: the weights are packed a few milliseconds at a
   * time (`stepMs`) between turns of the loop. The arrays are read while the promise is pending: do
   * not write to them until it settles; one that is detached or shrunk meanwhile makes the build
   * reject with a clear error (nothing is read from it afterwards). A CUDA layer is uploaded in one
   * step.
   */
  static async create(config: MoeConfig, weights: MoeWeights, options: CreateOptions = {}): Promise<MoeLayer> {
    const { cfg, gate, w1, w3, w2, extras } = layerArgs(config, weights);
    checkObject('options', options as unknown);
    const signal = checkSignal('options.signal', options.signal);
    const stepMs = options.stepMs === undefined ? 10 : checkInteger('options.stepMs', options.stepMs, 1, 60000);
    const aborted = () => new AbortError(undefined, { cause: signal?.reason });
    if (signal?.aborted) throw aborted();
    let native: NativeLayer;
    try {
      const builder = new (binding().NativeBuilder)(cfg);
      while (!builder.step(gate, w1, w3, w2, stepMs, extras)) {
        await nextTurn();
        if (signal?.aborted) throw aborted();
      }
      native = builder.finish();
    } catch (err) {
      throw err instanceof AbortError ? err : fromNative(err);
    }
    return MoeLayer.#adopt({ native, cfg }, weights);
  }

  /** The MoeLayer around a native layer built already: the constructor takes it instead of packing. */
  static #adopt(built: BuiltLayer, weights: MoeWeights): MoeLayer {
    MoeLayer.#adopting = built;
    try {
      return new MoeLayer(built.cfg, weights);
    } finally {
      MoeLayer.#adopting = undefined;
    }
  }

  /**
   * Builds the MoE block of one decoder layer from a safetensors checkpoint (a file, an index JSON or
   * a folder), reading only that layer's tensors through memory maps; the weights are packed as by
   * create(). See safetensors/load-layer.ts.
   */
  static fromSafetensors(path: string, options: FromSafetensorsOptions): Promise<MoeLayer> {
    return loadLayer(MoeLayer, path, options);
  }

  /** Bytes of native memory (packed weights) this layer holds; 0 after dispose(). */
  get nativeBytes(): number {
    return this.#native && !this.#disposing ? this.#native.info().nativeBytes : 0;
  }

  /** True once dispose() was called. */
  get disposed(): boolean {
    return this.#disposing;
  }

  /**
   * Runs the MoE block on x ([T, H] floats) off the event loop. Requests queue fairly across layers
   * (see scheduler.ts); x is copied if the request has to wait, so the caller may reuse it at once.
   */
  forward(x: Float32Array, options: ForwardOptions = {}): Promise<Float32Array> {
    let native: NativeLayer, out: Float32Array | undefined, signal: AbortSignal | undefined;
    try {
      native = this.#live();
      const T = this.#tokens(x);
      checkObject('options', options);
      // Without options.out the native side hands back its own result buffer (no copy).
      if (options.out !== undefined) out = this.#out(options.out, T);
      signal = checkSignal('options.signal', options.signal);
    } catch (err) {
      return Promise.reject(err);
    }
    if (signal?.aborted) return Promise.reject(new AbortError(undefined, { cause: signal.reason }));
    let input = x;
    const start = (): Promise<Float32Array> => {
      let cancel: NativeCancel | undefined;
      let onAbort: (() => void) | undefined;
      if (signal) {
        if (signal.aborted) return Promise.reject(new AbortError(undefined, { cause: signal.reason }));
        cancel = new (binding().NativeCancel)();
        onAbort = () => cancel!.cancel();
        signal.addEventListener('abort', onAbort, { once: true });
      }
      let pending: Promise<Float32Array>;
      try {
        pending = native.forward(input, out, cancel);
      } catch (err) {
        pending = Promise.reject(err);
      }
      return pending.then(
        (y) => {
          if (onAbort) signal!.removeEventListener('abort', onAbort);
          return y;
        },
        (err) => {
          if (onAbort) signal!.removeEventListener('abort', onAbort);
          throw (err as { code?: string })?.code === 'ABORT_ERR'
            ? new AbortError(undefined, { cause: signal?.reason })
            : fromNative(err);
        },
      );
    };
    const { promise, queued } = scheduler.submit(this, start, signal);
    if (queued) input = x.slice(); // the caller may reuse x while this request waits
    const tracked = promise.finally(() => {
      this.#inFlight.delete(tracked);
      if (this.#inFlight.size === 0 && this.#disposing) this.#release();
    });
    this.#inFlight.add(tracked);
    return tracked;
  }

  /** Same result as forward(), computed on the calling thread. */
  forwardSync(x: Float32Array, options: { out?: Float32Array } = {}): Float32Array {
    const native = this.#live();
    const T = this.#tokens(x);
    checkObject('options', options);
    const out = this.#out(options.out, T);
    try {
      native.forwardSync(x, out);
    } catch (err) {
      throw fromNative(err);
    }
    return out;
  }

  /** Routing only: which experts each token picks, and with what weight. */
  route(x: Float32Array): RouteResult {
    const native = this.#live();
    this.#tokens(x);
    try {
      return native.route(x);
    } catch (err) {
      throw fromNative(err);
    }
  }

  /**
   * Frees the native memory. Forwards already started or queued finish normally (the weights are freed
   * when the last one settles); any later call throws ERR_MOE_DISPOSED. Calling it twice is harmless.
   */
  dispose(): void {
    if (this.#disposing) return;
    this.#disposing = true;
    if (this.#inFlight.size === 0) this.#release();
  }

  #release(): void {
    this.#native?.dispose();
    this.#native = undefined;
  }

  #live(): NativeLayer {
    if (!this.#native || this.#disposing)
      throw new MoeError('ERR_MOE_DISPOSED', 'this MoeLayer was disposed; create a new one');
    return this.#native;
  }

  #tokens(x: unknown): number {
    if (!(x instanceof Float32Array)) throw argTypeError(`x must be a Float32Array, got ${describe(x)}`);
    const H = this.config.hiddenSize,
      n = typedLength(x); // what the native side reads, even from a subclass that says otherwise
    if (n % H !== 0)
      throw argRangeError(
        `x must hold T * hiddenSize (${H}) elements, got ${n} (not a multiple of ${H})`,
        'ERR_MOE_SHAPE',
      );
    return n / H;
  }

  #out(out: unknown, T: number): Float32Array {
    const n = T * this.config.hiddenSize;
    if (out === undefined) return new Float32Array(n);
    return checkTyped<Float32Array>('options.out', out, Float32Array, n, ' (T * hiddenSize)');
  }
}
