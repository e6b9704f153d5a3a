/**
 * MoeModel: a whole decoder of the MoE families from a Hugging Face checkpoint folder, run by the native
 * decoder (csrc/core/decoder.h) one step at a time. Loading reads config.json, generation_config.json
 * and the safetensors shards (memory-mapped, packed on worker threads, never on the event loop).
 */
import * as path from 'path';
import { binding, NativeCancel } from '../binding';
import { AbortError, MoeError, argRangeError, argTypeError, checkpointError, fromNative } from '../errors';
import { openSafetensors } from '../safetensors/index';
import { dropPages } from '../safetensors/map';
import type { SafetensorsFile, TensorView } from '../safetensors/index';
import { isFile, readJson } from '../safetensors/resolve';
import { checkInteger, checkObject, checkOneOf, checkSignal, describe } from '../validate';
import { DecoderConfig, expectedShapes, parseDecoderConfig, tensorNames } from './config';
import { Engine } from '../generate/engine';
import {
  Generation,
  GenerateOptions,
  GenerationResult,
  Prompt,
  complete,
  generate,
  noTokenizer,
} from '../generate/index';
import { TextTokenizer } from '../text/tokenizer';
import { SamplingOptions, samplingDefaults } from '../generate/sampling';

export type KvCacheDtype = 'bfloat16' | 'float16' | 'float32';

export interface LoadProgress {
  /** Bytes of tensor data loaded so far, and in all. */
  bytes: number;
  totalBytes: number;
  /** Tensors loaded so far, and in all. */
  tensors: number;
  totalTensors: number;
}

export interface LoadOptions {
  /** Quantize every projection matrix (attention, experts, LM head) at load; embeddings stay as stored. */
  quantize?: 'none' | 'int8' | 'int4';
  /** Weights per scale along the reduction axis: 32 (default, as llama.cpp's Q8_0 and Q4_0), 64 or 128. */
  quantGroupSize?: 32 | 64 | 128;
  /** Element type of the KV cache; default 'bfloat16'. */
  kvCacheDtype?: KvCacheDtype;
  /** Longest sequence in positions; default min(4096, max_position_embeddings). */
  contextLength?: number;
  /** Sequences that run at once; default 1. */
  maxSequences?: number;
  /**
   * Positions the KV cache holds, shared by every sequence in blocks of 16: default maxSequences full
   * contexts. Fewer save memory (sequences seldom all reach the context; forks share their prefix):
   * when running generations outgrow it, the ones started last give their cache back and wait to
   * compute their tokens anew. At least contextLength.
   */
  cacheTokens?: number;
  /** CPU threads for this model; 0 (default): every pool thread. */
  threads?: number;
  signal?: AbortSignal;
  onProgress?: (progress: LoadProgress) => void;
}

export interface LogitsOptions {
  /** Logits of every position ([T * vocab]) instead of the last one's ([vocab]). */
  all?: boolean;
  signal?: AbortSignal;
}

/**
 * A sequence of the model's KV cache, for step(): empty when created, `length` positions after its
 * steps; free() gives its cache blocks back.
 * @internal
 */
export class ModelSequence {
  /** The native sequence id, assigned by the first step (sequences are made inside the model's queue). */
  nativeId: number | undefined;
  /** Positions the cache holds for this sequence. */
  length = 0;
  freed = false;
  constructor(readonly model: MoeModel) {}

  /** Frees the sequence's cache blocks once the steps queued before this call have run. */
  free(): void {
    this.model.freeSequence(this);
  }
}

/**
 * One sequence's share of a step: `tokens` appended at its next positions; logits of every new token
 * with `all`, else of the last one.
 * @internal
 */
export interface StepEntry {
  sequence: ModelSequence;
  tokens: ArrayLike<number>;
  all?: boolean;
}

/** A checked StepEntry: its tokens as ids and the argument name errors cite. */
interface PreparedEntry {
  sequence: ModelSequence;
  ids: Int32Array;
  all: boolean;
  name: string;
}

/** The native decoder as the binding exposes it (csrc/napi/model.cpp). */
export interface NativeModel {
  load(slot: string, layer: number, index: number, parts: TensorView[], dtypes: string[]): Promise<void>;
  missing(): string;
  sequenceCreate(): number;
  sequenceFree(id: number): void;
  sequenceLength(id: number): number;
  sequenceTruncate(id: number, length: number): void;
  sequenceFork(id: number, length: number): number;
  /** seqs: [id, count, allLogits (0/1)] per sequence. Resolves with `logits` once it is written. */
  step(tokens: Int32Array, seqs: Float64Array, logits: Float32Array, cancel?: NativeCancel): Promise<Float32Array>;
  /** A Float32Array over native memory that steps write their logits into in place (no copy after the step). */
  logitsBuffer(floats: number): Float32Array;
  info(): { nativeBytes: number; freeCachePositions: number };
  routedTokens(): Float64Array;
  stepTimes(): StepTimes;
  dispose(): void;
}

/** The parts of a step that stepTimes() times. */
export type StepPhase = 'qkv' | 'attention' | 'output' | 'mlp' | 'lmHead' | 'other';

/**
 * Steps completed since load, the tokens they held, and the seconds they spent in each part of the
 * model: the Q/K/V projections (with their norms and rotary embedding), the KV cache write and attention,
 * the output projection, the MoE block or dense MLP, the final norm and LM head, and the rest
 * (embedding, RMSNorms, residuals).
 */
export interface StepTimes {
  steps: number;
  tokens: number;
  seconds: Record<StepPhase, number>;
}

const KV_DTYPES: readonly KvCacheDtype[] = ['bfloat16', 'float16', 'float32'];
const QUANTIZE = ['none', 'int8', 'int4'] as const;
/** Positions per KV cache block. */
const BLOCK_TOKENS = 16;
/** Prompt tokens per native step in logits(): bounds the step's workspace. */
const CHUNK_TOKENS = 512;
const WEIGHT_DTYPES: Record<string, 'float32' | 'bfloat16' | 'float16'> = {
  F32: 'float32',
  BF16: 'bfloat16',
  F16: 'float16',
};

/** One native load call: a slot and the checkpoint tensors that fill it. */
interface LoadItem {
  slot: string;
  layer: number;
  index: number;
  names: string[];
}

function loadPlan(cfg: DecoderConfig): LoadItem[] {
  const names = tensorNames(cfg);
  const items: LoadItem[] = [
    { slot: 'embedding', layer: 0, index: 0, names: [names.embedding] },
    { slot: 'finalNorm', layer: 0, index: 0, names: [names.finalNorm] },
    { slot: 'lmHead', layer: 0, index: 0, names: [names.lmHead] },
  ];
  for (let l = 0; l < cfg.numLayers; l++) {
    const n = names.layer(l);
    items.push({ slot: 'attnNorm', layer: l, index: 0, names: [n.inputNorm] });
    items.push({ slot: 'qkv', layer: l, index: 0, names: [n.q, n.k, n.v] });
    if (n.qBias && n.kBias && n.vBias)
      items.push({ slot: 'qkvBias', layer: l, index: 0, names: [n.qBias, n.kBias, n.vBias] });
    if (n.qNorm) items.push({ slot: 'qNorm', layer: l, index: 0, names: [n.qNorm] });
    if (n.kNorm) items.push({ slot: 'kNorm', layer: l, index: 0, names: [n.kNorm] });
    items.push({ slot: 'o', layer: l, index: 0, names: [n.o] });
    items.push({ slot: 'ffnNorm', layer: l, index: 0, names: [n.postAttentionNorm] });
    if (n.dense) items.push({ slot: 'dense', layer: l, index: 0, names: [n.dense.gate, n.dense.up, n.dense.down] });
    if (n.router && n.expert) {
      items.push({ slot: 'router', layer: l, index: 0, names: [n.router] });
      for (let e = 0; e < cfg.moe.numExperts; e++) {
        const x = n.expert(e);
        items.push({ slot: 'expert', layer: l, index: e, names: [x.gate, x.up, x.down] });
      }
    }
    if (n.shared) {
      items.push({ slot: 'shared', layer: l, index: 0, names: [n.shared.gate, n.shared.up, n.shared.down] });
      if (n.shared.sharedGate) items.push({ slot: 'sharedGate', layer: l, index: 0, names: [n.shared.sharedGate] });
    }
  }
  return items;
}

/** Checks that every tensor the config implies is there with its shape; returns the matrices' dtype. */
function checkTensors(
  file: SafetensorsFile,
  cfg: DecoderConfig,
  dir: string,
): { weightDtype: string; embedDtype: string } {
  const { vocabSize: V, hiddenSize: H } = cfg;
  const names = tensorNames(cfg);
  const q0 = names.layer(0).q;
  let weightDtype: string | undefined;
  const check = (name: string, shape: number[]) => {
    const t = file.tensors.get(name);
    if (!t) throw checkpointError(dir, `tensor '${name}' is missing (config.json implies it)`);
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i]))
      throw checkpointError(
        dir,
        `tensor '${name}' has shape [${t.shape.join(', ')}], config.json implies [${shape.join(', ')}]`,
      );
    if (!(t.dtype in WEIGHT_DTYPES))
      throw checkpointError(dir, `tensor '${name}' is ${t.dtype}; F32, BF16 or F16 is expected`);
    // Every projection and expert matrix shares one dtype (the packed kernels read one).
    if (shape.length === 2 && name !== names.embedding && !name.endsWith('shared_expert_gate.weight')) {
      weightDtype ??= t.dtype;
      if (t.dtype !== weightDtype)
        throw checkpointError(
          dir,
          `tensor '${name}' is ${t.dtype} while '${q0}' is ${weightDtype}; mixed matrix dtypes are not supported`,
        );
    }
  };
  // Layer by layer, so that a config.json that implies far more tensors than the files hold fails at
  // the first one missing, not after listing them all.
  check(names.embedding, [V, H]);
  check(names.finalNorm, [H]);
  for (let l = 0; l < cfg.numLayers; l++) {
    const shapes = expectedShapes(cfg, l);
    if (l === 0) check(q0, shapes.get(q0)!); // the matrices' dtype is the first projection's
    for (const [name, shape] of shapes) check(name, shape);
  }
  check(names.lmHead, [V, H]);
  return { weightDtype: weightDtype!, embedDtype: file.tensors.get(names.embedding)!.dtype };
}

export class MoeModel {
  /** The decoder as config.json describes it. */
  readonly config: DecoderConfig;
  /** The options the model was loaded with, defaults filled in. */
  readonly options: Readonly<{
    quantize: string;
    quantGroupSize: number;
    kvCacheDtype: KvCacheDtype;
    contextLength: number;
    maxSequences: number;
    cacheTokens: number;
    threads: number;
  }>;
  /** The checkpoint's tokenizer (tokenizer.json), or undefined when the folder has none. */
  readonly tokenizer: TextTokenizer | undefined;
  /**
   * Sampling defaults from generation_config.json (temperature, topK, topP, minP, repetitionPenalty;
   * `do_sample: false` is temperature 0): what generate uses for an option left out.
   */
  readonly generationDefaults: Readonly<Omit<SamplingOptions, 'seed'>>;
  /**
   * Positions per KV cache block.
   * @internal
   */
  readonly cacheBlockTokens = BLOCK_TOKENS;
  #native: NativeModel | undefined;
  /** step()'s logits with reuseLogits, kept from one step to the next. */
  #stepLogits: Float32Array | undefined;
  #busy: Promise<unknown> = Promise.resolve();
  /** Calls queued on #busy that have not settled. */
  #pending = 0;
  #engine: Engine | undefined;

  private constructor(
    config: DecoderConfig,
    options: MoeModel['options'],
    native: NativeModel,
    tokenizer: TextTokenizer | undefined,
    generationDefaults: Omit<SamplingOptions, 'seed'>,
  ) {
    this.config = config;
    this.options = options;
    this.#native = native;
    this.tokenizer = tokenizer;
    this.generationDefaults = Object.freeze(generationDefaults);
  }

  /** Loads a Hugging Face checkpoint folder (config.json, safetensors shards, generation_config.json). */
  static async load(dir: string, options: LoadOptions = {}): Promise<MoeModel> {
    if (typeof dir !== 'string' || dir.length === 0)
      throw argTypeError(`dir must be a folder path, got ${describe(dir)}`);
    checkObject('options', options);
    const signal = checkSignal('options.signal', options.signal);
    const quantize = checkOneOf('options.quantize', options.quantize ?? 'none', QUANTIZE);
    const quantGroupSize = checkOneOf('options.quantGroupSize', String(options.quantGroupSize ?? 32), [
      '32',
      '64',
      '128',
    ]);
    const kvCacheDtype = checkOneOf('options.kvCacheDtype', options.kvCacheDtype ?? 'bfloat16', KV_DTYPES);
    const maxSequences = checkInteger('options.maxSequences', options.maxSequences ?? 1, 1, 4096);
    const threads = checkInteger('options.threads', options.threads ?? 0, 0, 1024);
    if (options.onProgress !== undefined && typeof options.onProgress !== 'function')
      throw argTypeError(`options.onProgress must be a function, got ${describe(options.onProgress)}`);
    const aborted = () => new AbortError(undefined, { cause: signal?.reason });
    if (signal?.aborted) throw aborted();

    const cfg = parseDecoderConfig(
      await readJson(path.join(dir, 'config.json'), 'model config'),
      path.join(dir, 'config.json'),
    );
    const genFile = path.join(dir, 'generation_config.json');
    const gen = ((await isFile(genFile)) ? await readJson(genFile, 'generation config') : undefined) as
      Record<string, unknown> | undefined;
    if (gen && gen.eos_token_id !== undefined) {
      const extra = (Array.isArray(gen.eos_token_id) ? gen.eos_token_id : [gen.eos_token_id]).filter((x): x is number =>
        Number.isSafeInteger(x),
      );
      for (const id of extra) if (!cfg.eosTokenIds.includes(id)) cfg.eosTokenIds.push(id);
    }
    const tokenizer = await TextTokenizer.load(dir);
    if (tokenizer && tokenizer.vocabLimit > cfg.vocabSize)
      throw checkpointError(
        path.join(dir, 'tokenizer.json'),
        `the tokenizer has ids up to ${tokenizer.vocabLimit - 1}, beyond the model's vocab_size of ${cfg.vocabSize}`,
      );
    const contextLength = checkInteger(
      'options.contextLength',
      options.contextLength ?? Math.min(4096, cfg.maxPositions),
      1,
      1 << 24,
    );
    const blocksPerSequence = Math.ceil(contextLength / BLOCK_TOKENS);
    if (options.cacheTokens === undefined && blocksPerSequence * maxSequences > 2 ** 30)
      throw argRangeError(
        `options.contextLength x options.maxSequences must be at most 2^34 positions (2^30 cache blocks of ` +
          `${BLOCK_TOKENS}), got ${contextLength} x ${maxSequences}; a smaller options.cacheTokens shares less`,
      );
    const cacheTokens = options.cacheTokens ?? blocksPerSequence * maxSequences * BLOCK_TOKENS;
    const cacheBlocks = Math.ceil(
      checkInteger('options.cacheTokens', cacheTokens, contextLength, 2 ** 34) / BLOCK_TOKENS,
    );
    if (signal?.aborted) throw aborted();

    const file = await openSafetensors(dir);
    let native: NativeModel | undefined;
    try {
      const { weightDtype, embedDtype } = checkTensors(file, cfg, dir);
      const nativeConfig = {
        vocab: cfg.vocabSize,
        hidden: cfg.hiddenSize,
        layers: cfg.numLayers,
        heads: cfg.numHeads,
        kvHeads: cfg.numKvHeads,
        headDim: cfg.headDim,
        ropeTheta: cfg.ropeTheta,
        rmsEps: cfg.rmsNormEps,
        window: cfg.slidingWindow,
        qkNorm: cfg.qkNorm,
        qkvBias: cfg.qkvBias,
        clipQkv: cfg.clipQkv,
        numExperts: cfg.moe.numExperts,
        topK: cfg.moe.topK,
        moeIntermediate: cfg.moe.intermediateSize,
        routing: cfg.moe.routing,
        sharedIntermediate: cfg.moe.sharedIntermediateSize,
        sharedGate: cfg.moe.sharedGate,
        denseIntermediate: cfg.denseIntermediateSize,
        moeLayers: cfg.moeLayers.map((m) => (m ? 1 : 0)),
        weightDtype: WEIGHT_DTYPES[weightDtype],
        embedDtype: WEIGHT_DTYPES[embedDtype],
        quantize,
        quantGroupSize: Number(quantGroupSize),
        kvDtype: kvCacheDtype,
        blockTokens: BLOCK_TOKENS,
        cacheBlocks,
        context: contextLength,
        threads,
      };
      try {
        const Ctor = binding().NativeModel;
        native = new Ctor(nativeConfig) as NativeModel;
      } catch (err) {
        throw fromNative(err);
      }
      const plan = loadPlan(cfg);
      const bytesOf = (n: string) => {
        const t = file.tensors.get(n)!;
        return t.shape.reduce((a, b) => a * b, 1) * (t.dtype === 'F32' ? 4 : 2);
      };
      const totalBytes = plan.reduce((s, it) => s + it.names.reduce((a, n) => a + bytesOf(n), 0), 0);
      const totalTensors = plan.reduce((s, it) => s + it.names.length, 0);
      let bytes = 0,
        tensors = 0;
      for (const item of plan) {
        if (signal?.aborted) throw aborted();
        const views = item.names.map((n) => file.get(n));
        try {
          await native.load(
            item.slot,
            item.layer,
            item.index,
            views,
            item.names.map((n) => WEIGHT_DTYPES[file.tensors.get(n)!.dtype]),
          );
        } catch (err) {
          throw fromNative(err);
        }
        dropPages(views); // copied into the model: the mapping's pages are not needed until GC unmaps it
        bytes += item.names.reduce((a, n) => a + bytesOf(n), 0);
        tensors += item.names.length;
        options.onProgress?.({ bytes, totalBytes, tensors, totalTensors });
      }
      const missing = native.missing();
      if (missing) throw new MoeError('ERR_MOE_INTERNAL', `the model was not fully loaded: ${missing} is missing`);
      const model = new MoeModel(
        cfg,
        {
          quantize,
          quantGroupSize: Number(quantGroupSize),
          kvCacheDtype,
          contextLength,
          maxSequences,
          cacheTokens: cacheBlocks * BLOCK_TOKENS,
          threads,
        },
        native,
        tokenizer,
        samplingDefaults(gen),
      );
      native = undefined;
      return model;
    } finally {
      native?.dispose();
      file.close();
    }
  }

  /** Bytes of native memory the model holds (weights and KV cache); 0 after dispose(). */
  get nativeBytes(): number {
    return this.#native ? this.#native.info().nativeBytes : 0;
  }

  /**
   * Tokens routed to each expert of each layer since load: [layer][expert] (zeros for dense layers);
   * what the server's routing telemetry reports.
   */
  expertTokenCounts(): number[][] {
    const flat = this.#live().routedTokens();
    const E = this.config.moe.numExperts;
    return Array.from({ length: this.config.numLayers }, (_, l) => Array.from(flat.subarray(l * E, (l + 1) * E)));
  }

  /**
   * Where the native steps' time went since load, by part of the model. Two readings around a run give
   * its split (bench/model.js reports each part against the bytes it reads).
   */
  stepTimes(): StepTimes {
    return this.#live().stepTimes(); // a fresh object from the binding at every call
  }

  /**
   * Generations running in the step loop and waiting for a sequence, finished prefixes kept, the KV
   * cache positions that neither hold (counted once the steps planned have run), and how many times a
   * running generation gave its cache back to wait again (a cacheTokens below maxSequences contexts).
   */
  get generationStats(): {
    running: number;
    waiting: number;
    kept: number;
    freeCachePositions: number;
    preemptions: number;
  } {
    return (
      this.#engine?.stats ?? {
        running: 0,
        waiting: 0,
        kept: 0,
        freeCachePositions: this.options.cacheTokens,
        preemptions: 0,
      }
    );
  }

  /**
   * The cache positions the native pool has free (0 while a call runs): what the engine's count is
   * checked against.
   * @internal
   */
  nativeFreeCachePositions(): number {
    return this.#live().info().freeCachePositions;
  }

  /** Token ids of `text`, with the special tokens the tokenizer adds (such as BOS) unless told not to. */
  tokenize(text: string, options: { addSpecialTokens?: boolean } = {}): number[] {
    if (typeof text !== 'string') throw argTypeError(`text must be a string, got ${describe(text)}`);
    checkObject('options', options);
    if (!this.tokenizer) throw noTokenizer();
    return this.tokenizer.encode(text, options.addSpecialTokens !== false);
  }

  /** Text of token ids, special tokens left out. */
  detokenize(ids: ArrayLike<number>): string {
    const checked = this.#tokens('ids', ids, false);
    if (!this.tokenizer) throw noTokenizer();
    return this.tokenizer.decode(Array.from(checked));
  }

  /**
   * Generates from a prompt (text, a conversation for the chat template, or token ids): an async
   * iterator of { token, text } pieces as they are sampled, whose return value is the whole result.
   * Runs in the model's shared step loop with every other generation.
   */
  generate(promptOrMessages: Prompt, options: GenerateOptions = {}): Generation {
    this.#live();
    return generate(this, this.#generator(), promptOrMessages, options);
  }

  /** Generates to the end: { text, tokens, finishReason, usage }. */
  complete(promptOrMessages: Prompt, options: GenerateOptions = {}): Promise<GenerationResult> {
    try {
      this.#live();
      return complete(this, this.#generator(), promptOrMessages, options);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  /**
   * Logits of a fresh sequence that starts at position 0 with exactly these tokens (no BOS added): of
   * the last position ([vocab]), or of every position ([T * vocab]) with `all`.
   */
  logits(tokens: ArrayLike<number>, options: LogitsOptions = {}): Promise<Float32Array> {
    let ids: Int32Array;
    let signal: AbortSignal | undefined;
    try {
      this.#live();
      ids = this.#tokens('tokens', tokens);
      checkObject('options', options);
      signal = checkSignal('options.signal', options.signal);
    } catch (err) {
      return Promise.reject(err);
    }
    const all = options.all === true;
    if (ids.length === 0) return Promise.reject(argRangeError('tokens must hold at least one token'));
    // Kept generation prefixes give way to this call's sequence (their blocks are freed before it runs).
    this.#engine?.makeRoom(ids.length);
    return this.#exclusive(async () => {
      const native = this.#live();
      const V = this.config.vocabSize;
      const out = new Float32Array((all ? ids.length : 1) * V);
      const sequence = new ModelSequence(this);
      try {
        for (let t0 = 0; t0 < ids.length; t0 += CHUNK_TOKENS) {
          const chunk = ids.subarray(t0, Math.min(ids.length, t0 + CHUNK_TOKENS));
          const last = t0 + chunk.length === ids.length;
          // A chunk that is neither wanted whole nor last still writes its last row: into scratch.
          const logits = all ? out.subarray(t0 * V, (t0 + chunk.length) * V) : last ? out : new Float32Array(V);
          await this.#run(native, [{ sequence, ids: chunk, all, name: 'tokens' }], logits, signal);
        }
      } finally {
        if (sequence.nativeId !== undefined) native.sequenceFree(sequence.nativeId);
      }
      return out;
    });
  }

  /**
   * A new, empty sequence for step().
   * @internal
   */
  createSequence(): ModelSequence {
    this.#live();
    return new ModelSequence(this);
  }

  /**
   * Runs one native step over several sequences: each entry's tokens go to its sequence's next
   * positions. Resolves with each entry's logits ([count * vocab] with `all`, else [vocab]; empty for
   * no tokens), views of one buffer. Steps queue behind every earlier call on the model. With
   * `reuseLogits`, that buffer is the model's own, native memory the step writes in place, and the next
   * step with `reuseLogits` overwrites it while it runs: for a caller that reads the logits before it
   * asks for the next step (a fresh 600 KB array per decode step of a 150k vocabulary cost its
   * allocation and garbage collection every token, and copying it in after the step 25-50 µs). A step
   * that fails may leave it partly written.
   * @internal
   */
  step(
    batch: readonly StepEntry[],
    options: { signal?: AbortSignal; reuseLogits?: boolean } = {},
  ): Promise<Float32Array[]> {
    let entries: PreparedEntry[];
    let signal: AbortSignal | undefined;
    try {
      this.#live();
      if (!Array.isArray(batch) || batch.length === 0)
        throw argTypeError(`batch must be a non-empty array of { sequence, tokens, all }, got ${describe(batch)}`);
      const seen = new Set<ModelSequence>();
      entries = batch.map((entry: unknown, i) => {
        checkObject(`batch[${i}]`, entry);
        const sequence = this.#sequence(`batch[${i}].sequence`, entry.sequence);
        if (seen.has(sequence)) throw argRangeError(`batch[${i}].sequence appears twice in the batch`);
        seen.add(sequence);
        const name = `batch[${i}].tokens`;
        return { sequence, ids: this.#tokens(name, entry.tokens as ArrayLike<number>), all: entry.all === true, name };
      });
      checkObject('options', options);
      signal = checkSignal('options.signal', options.signal);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.#exclusive(async () => {
      const native = this.#live();
      const V = this.config.vocabSize;
      const rows = entries.map((e) => (e.all ? e.ids.length : Math.min(1, e.ids.length)));
      const n = rows.reduce((a, b) => a + b, 0) * V;
      let logits: Float32Array;
      if (options.reuseLogits === true) {
        if (!this.#stepLogits || this.#stepLogits.length < n)
          this.#stepLogits = n > 0 ? native.logitsBuffer(n) : new Float32Array(0);
        logits = this.#stepLogits.subarray(0, n);
      } else {
        logits = new Float32Array(n);
      }
      await this.#run(native, entries, logits, signal);
      let at = 0;
      return rows.map((r) => logits.subarray(at * V, (at += r) * V));
    });
  }

  /**
   * Frees a sequence's cache blocks once the steps queued before this call have run; later steps
   * refuse it. Freeing twice does nothing.
   * @internal
   */
  freeSequence(sequence: ModelSequence): void {
    const seq = this.#sequence('sequence', sequence, true);
    if (seq.freed) return;
    seq.freed = true;
    if (!this.#native) return; // dispose() frees every sequence
    void this.#exclusive(async () => {
      if (seq.nativeId !== undefined && this.#native) this.#native.sequenceFree(seq.nativeId);
      seq.nativeId = undefined;
    }).catch(() => undefined);
  }

  /**
   * Shortens a sequence to its first `length` positions once the steps queued before this call have run
   * (a partly filled last block that a fork shares is copied first: ERR_MOE_OUT_OF_MEMORY without a
   * free block).
   * @internal
   */
  truncateSequence(sequence: ModelSequence, length: number): Promise<void> {
    return this.#withPrefix(sequence, length, (native, seq) => {
      if (seq.nativeId !== undefined) native.sequenceTruncate(seq.nativeId, length);
      seq.length = length;
    });
  }

  /**
   * A new sequence holding the first `length` positions of `sequence`, once the steps queued before this
   * call have run: the full cache blocks among them shared, a partial last one copied, so that each
   * sequence then grows on its own. Rejects with ERR_MOE_OUT_OF_MEMORY when that copy finds no free
   * block.
   * @internal
   */
  forkSequence(sequence: ModelSequence, length: number): Promise<ModelSequence> {
    return this.#withPrefix(sequence, length, (native, seq) => {
      const fork = new ModelSequence(this);
      if (length > 0) fork.nativeId = native.sequenceFork(seq.nativeId!, length);
      fork.length = length;
      return fork;
    });
  }

  /** Checks `length` against a live sequence, then runs fn after the calls queued before (native errors converted). */
  #withPrefix<T>(
    sequence: ModelSequence,
    length: number,
    fn: (native: NativeModel, seq: ModelSequence) => T,
  ): Promise<T> {
    try {
      const seq = this.#sequence('sequence', sequence);
      checkInteger('length', length, 0, seq.length);
      return this.#exclusive(async () => {
        const native = this.#live();
        try {
          return fn(native, seq);
        } catch (err) {
          throw fromNative(err);
        }
      });
    } catch (err) {
      return Promise.reject(err);
    }
  }

  /**
   * Frees the weights and the KV cache: at once when no call is running or queued (so that memory is
   * back before the caller's next synchronous line), else once the running call ends; later calls throw.
   */
  dispose(): void {
    const native = this.#native;
    if (!native) return;
    this.#native = undefined;
    this.#stepLogits = undefined;
    this.tokenizer?.dispose(disposedError());
    if (this.#pending === 0) native.dispose();
    else void this.#busy.finally(() => native.dispose());
  }

  #generator(): Engine {
    return (this.#engine ??= new Engine(this));
  }

  #live(): NativeModel {
    if (!this.#native) throw disposedError();
    return this.#native;
  }

  /** Runs fn after every earlier call on this model has settled (one native step at a time). */
  #exclusive<T>(fn: () => Promise<T>): Promise<T> {
    this.#pending++;
    const run = this.#busy.then(fn, fn);
    const settled = () => {
      this.#pending--;
    };
    this.#busy = run.then(settled, settled);
    return run;
  }

  #sequence(name: string, v: unknown, freedOk = false): ModelSequence {
    if (!(v instanceof ModelSequence) || v.model !== this)
      throw argTypeError(`${name} must be a sequence of this model (from createSequence()), got ${describe(v)}`);
    if (v.freed && !freedOk) throw argRangeError(`${name} was freed`);
    return v;
  }

  /**
   * One native step, inside the queue: creates the entries' native sequences on first use, writes the
   * logits rows into `logits`, and grows the sequences once the step succeeded. An abort of `signal`
   * cancels the running step.
   */
  async #run(
    native: NativeModel,
    entries: PreparedEntry[],
    logits: Float32Array,
    signal: AbortSignal | undefined,
  ): Promise<void> {
    const aborted = () => new AbortError(undefined, { cause: signal?.reason });
    if (signal?.aborted) throw aborted();
    for (const e of entries)
      if (e.sequence.length + e.ids.length > this.options.contextLength)
        throw argRangeError(
          `${e.name} holds ${e.ids.length} tokens after ${e.sequence.length}, more than the context of ${this.options.contextLength}`,
        );
    for (const e of entries) if (e.sequence.nativeId === undefined) e.sequence.nativeId = native.sequenceCreate();
    const tokens = new Int32Array(entries.reduce((a, e) => a + e.ids.length, 0));
    const seqs = new Float64Array(3 * entries.length);
    let at = 0;
    entries.forEach((e, i) => {
      tokens.set(e.ids, at);
      at += e.ids.length;
      seqs.set([e.sequence.nativeId!, e.ids.length, e.all ? 1 : 0], 3 * i);
    });
    let cancel: NativeCancel | undefined;
    const onAbort = () => cancel!.cancel();
    if (signal) {
      cancel = new (binding().NativeCancel)();
      signal.addEventListener('abort', onAbort, { once: true });
    }
    try {
      await native.step(tokens, seqs, logits, cancel);
    } catch (err) {
      throw (err as { code?: string })?.code === 'ABORT_ERR' ? aborted() : fromNative(err);
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
    for (const e of entries) e.sequence.length += e.ids.length;
  }

  #tokens(name: string, tokens: ArrayLike<number>, withinContext = true): Int32Array {
    if (tokens === null || typeof tokens !== 'object' || typeof (tokens as { length?: unknown }).length !== 'number')
      throw argTypeError(`${name} must be an array of token ids, got ${describe(tokens)}`);
    const n = tokens.length;
    if (!Number.isSafeInteger(n) || n < 0)
      throw argRangeError(`${name}.length must be a non-negative integer, got ${n}`);
    if (withinContext && n > this.options.contextLength)
      throw argRangeError(`${name} holds ${n} tokens, more than the context of ${this.options.contextLength}`);
    // Read once, into an array that grows as ids check out: an array-like with a huge length and no ids
    // allocates nothing.
    const V = this.config.vocabSize;
    const ids: number[] = [];
    for (let i = 0; i < n; i++) {
      const t = tokens[i];
      if (typeof t !== 'number' || !Number.isInteger(t) || t < 0 || t >= V)
        throw argRangeError(`${name}[${i}] must be a token id in [0, ${V}), got ${describe(t)}`);
      ids.push(t);
    }
    return Int32Array.from(ids);
  }
}

function disposedError(): MoeError {
  return new MoeError('ERR_MOE_DISPOSED', 'this MoeModel was disposed; load a new one');
}
