/** Types of the native module and the one place that loads it. */
import * as fs from 'fs';
import * as path from 'path';
import { MoeError } from './errors';
import { libcInfo, runtimeLine, toolInstallCommand } from './platform';

export interface NativeLayerConfig {
  hiddenSize: number;
  intermediateSize: number;
  numExperts: number;
  topK: number;
  routing: string;
  weightDtype: string;
  device: string;
  threads: number;
  cudaDevice: number;
  quantize: string;
  quantGroupSize: number;
  routedScale?: number;
  expertGroups?: { count: number; topK: number; score: string } | null;
  sharedIntermediateSize?: number;
  sharedGate?: boolean;
}

export type WeightArray = Float32Array | Uint16Array;

/** The weights beside gate/w1/w3/w2: the choice bias and the shared expert. */
export interface NativeWeightExtras {
  scoreBias?: Float32Array;
  shared?: { w1: WeightArray; w3: WeightArray; w2: WeightArray; gate?: Float32Array };
}

export interface NativeLayer {
  forwardSync(x: Float32Array, out: Float32Array): void;
  forward(x: Float32Array, out: Float32Array | undefined, cancel?: NativeCancel): Promise<Float32Array>;
  route(x: Float32Array): { experts: Int32Array; weights: Float32Array };
  dispose(): void;
  /** fallbackReason: why a device 'auto' layer runs on the CPU; null otherwise. */
  info(): { device: 'cpu' | 'cuda'; kernels: string; nativeBytes: number; fallbackReason: string | null };
}

export interface NativeBuilder {
  /** Packs for about maxMs; true when the layer is complete. The arrays are looked up on every call. */
  step(
    gate: Float32Array,
    w1: WeightArray[],
    w3: WeightArray[],
    w2: WeightArray[],
    maxMs: number,
    extras?: NativeWeightExtras,
  ): boolean;
  progress(): number;
  finish(): NativeLayer;
}

export interface NativeCancel {
  cancel(): void;
}

/** One CUDA device as backendInfo() lists it. */
export interface CudaDeviceInfo {
  name: string;
  totalMemory: number;
  computeCapability: string;
  multiprocessors: number;
}

/** What backendInfo() returns (the native shape, exported as is by the package). */
export interface BackendInfo {
  /**
   * isa: the kernel set in use; int8Activations / int4Activations: how int8 / int4 experts meet the
   * activations: 'int16' or 'int8' / 'int8' where the set quantizes them per group for integer dot
   * products (the x86 SIMD sets; int8 experts get int8 activations on avx512bf16, with VNNI), 'float32'
   * for the scalar and NEON sets.
   */
  cpu: {
    isa: string | null;
    int8Activations: 'float32' | 'int16' | 'int8' | null;
    int4Activations: 'float32' | 'int8' | null;
    threads: number;
    supported: string[];
    error?: string;
  };
  cuda: {
    available: boolean;
    devices: CudaDeviceInfo[];
    reason: string | null;
    library: string | null;
    driverVersion: number;
    runtimeVersion: number;
  };
}

/** The core's limits on a layer's config (csrc/core/options.h). */
export interface NativeLimits {
  maxExperts: number;
  maxDim: number;
  maxThreads: number;
  maxCudaDevice: number;
  /** Largest element count of a tensor or product of sizes (2^52). */
  maxElements: number;
  quantGroupSizes: readonly number[];
  defaultQuantGroupSize: number;
}

/** The names of the core's enums (csrc/core/options.h), the default first. */
export interface NativeEnums {
  routing: readonly string[];
  weightDtype: readonly string[];
  quantize: readonly string[];
  device: readonly string[];
  groupScore: readonly string[];
}

/** A sampler's parameters as lib/generate/sampling.ts checked them (csrc/cpu/sampler.h). */
export interface NativeSamplerParams {
  temperature: number;
  topK: number;
  topP: number;
  minP: number;
  repetitionPenalty: number;
  presencePenalty: number;
  frequencyPenalty: number;
  seed: number;
  biasIds: Int32Array;
  biasValues: Float64Array;
}

/** What a draw passes: its logits, the tokens added since the sampler's last draw, and a mask. */
export type NativeDrawArgs = [
  logits: Float32Array,
  history: Int32Array,
  clearHistory: boolean,
  output: Int32Array,
  clearOutput: boolean,
  allowed?: Uint8Array,
];

export interface NativeSampler {
  /**
   * The next token, or -1 when no token can be drawn. history and output: the tokens added since the
   * last draw (all of them when clearHistory / clearOutput is set).
   */
  sample(...args: NativeDrawArgs): number;
  /** Whether a draw is the plain argmax of its logits (greedy, nothing that changes them). */
  readonly plainGreedy: boolean;
}

/** One draw of sampleBatch(): the sampler, then the arguments of its sample(). */
export type NativeDraw = [sampler: NativeSampler, ...args: NativeDrawArgs];

export interface NativeBinding {
  NativeLayer: new (
    config: NativeLayerConfig,
    gate: Float32Array,
    w1: WeightArray[],
    w3: WeightArray[],
    w2: WeightArray[],
    extras?: NativeWeightExtras,
  ) => NativeLayer;
  NativeCancel: new () => NativeCancel;
  NativeBuilder: new (config: NativeLayerConfig) => NativeBuilder;
  /** A whole decoder (csrc/napi/model.cpp); lib/model/model.ts types and drives it. */
  NativeModel: new (config: object) => unknown;
  /** One generation's sampler (csrc/cpu/sampler.h); lib/generate/sampling.ts drives it. */
  NativeSampler: new (params: NativeSamplerParams) => NativeSampler;
  /**
   * One draw for each entry (each sampler at most once), spread over the pool's threads when it is
   * free: each entry's token as sample() gives it, or the error of that draw (a native error).
   */
  sampleBatch(draws: NativeDraw[]): (number | Error)[];
  /** The same on a libuv thread; its samplers refuse other draws until it settles. */
  sampleBatchAsync(draws: NativeDraw[]): Promise<(number | Error)[]>;
  /** [log-sum-exp of the logits (NaN counted as -Infinity), then the ids of the `top` largest, largest first]. */
  logSoftmaxStats(logits: Float32Array, top: number): Float64Array;
  backendInfo(): BackendInfo;
  limits: NativeLimits;
  enums: NativeEnums;
  /** Memory-maps [offset, offset + length) of a file copy-on-write; unmapped when the buffer is collected. */
  mapFile(path: string, offset?: number, length?: number): ArrayBuffer;
  /** The same, with every page brought in on a worker thread. */
  mapFileAsync(path: string, offset?: number, length?: number): Promise<ArrayBuffer>;
  /**
   * Drops the resident pages of a view of a mapping made by mapFile / mapFileAsync (they are read from
   * the file again if touched); false, and nothing done, for any other array.
   */
  dropPages(view: ArrayBufferView): boolean;
  /** Benchmark and test support (csrc/probes): not part of the package API, may change at any time. */
  bench: {
    /** GB/s of streaming reads: the fastest of a few read patterns (csrc/probes/probes.cpp). */
    readBandwidth(bytes: number, threads: number): number;
    /** Each read pattern's GB/s: 8, 4 and 2 streams a thread, 4 fetched ahead. */
    readPatterns(bytes: number, threads: number): Float64Array;
    fmaPeak(isa: number, threads: number): number;
    /**
     * GFLOP/s of vpdpbusd (the avx512bf16 set's int8 and int4 kernels), 0 where that set cannot run. With
     * group 32 or 128: with each quantized group's scaling beside the dot products (the tiles' ceiling).
     */
    int8DotPeak(threads: number, group?: number): number;
    quantize(values: Float32Array, K: number, kind: string, group: number): { scales: Float32Array; codes: Int8Array };
    /** Sets a tuning value for the whole process (csrc/cpu/kernels.h, attention.h, sampler.h); returns the previous one. */
    setTuning(
      name:
        | 'shortPanelBytes'
        | 'decodeStreams'
        | 'tilePanels'
        | 'attentionPrefetch'
        | 'attentionInPlace'
        | 'attentionSpan'
        | 'spinUs'
        | 'spreadDraws',
      value: number,
    ): number;
    /**
     * The pool's timeline (csrc/core/timeline.h): 'start' records its jobs, items and decode-step phases,
     * at most `capacity` events a thread; 'stop' gives them, 6 numbers an event (t0 and t1 in
     * steady-clock ns, kind: 0 job, 1 item, 2 phase; thread; tag; bytes), in order of t0.
     */
    timeline(action: 'start', capacity: number): void;
    timeline(action: 'stop'): { events: Float64Array; dropped: number };
  };
}

export const packageRoot = path.join(__dirname, '..');

type Loader = ((dir: string) => NativeBinding) & { resolve?: (dir: string) => string };

let cached: NativeBinding | undefined;
let loadedFrom: string | undefined;

/** Where the addon was loaded from (after the first load). */
export function bindingPath(): string | undefined {
  return loadedFrom;
}

/** Loads the addon once: a prebuilt binary that fits, or the local build (node-gyp-build). */
export function binding(): NativeBinding {
  if (cached) return cached;
  let file: string | undefined;
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports -- loaded lazily, so a missing addon is a MoeError
    const load = require('node-gyp-build') as Loader;
    if (load.resolve) file = load.resolve(packageRoot);
    // eslint-disable-next-line @typescript-eslint/no-require-imports -- a native addon found at run time
    cached = file ? (require(file) as NativeBinding) : load(packageRoot);
    loadedFrom = file;
  } catch (err) {
    throw new MoeError('ERR_MOE_LOAD', loadErrorMessage(err, file), { cause: err });
  }
  return cached;
}

/**
 * The places node-gyp-build looks, in its order: $FUSED_MOE_PREBUILD instead of the package folder,
 * then build/Release and build/Debug (skipped with PREBUILDS_ONLY=1), then prebuilds/<platform>-<arch>/
 * in the package and beside the node executable.
 */
export function bindingSearchPaths(): string[] {
  const dir = process.env.FUSED_MOE_PREBUILD || packageRoot;
  const tuple = `${process.platform}-${process.arch}`;
  const paths: string[] = [];
  if (!process.env.PREBUILDS_ONLY) paths.push(path.join(dir, 'build', 'Release'), path.join(dir, 'build', 'Debug'));
  paths.push(path.join(dir, 'prebuilds', tuple), path.join(path.dirname(process.execPath), 'prebuilds', tuple));
  return paths;
}

function describeFolder(dir: string): string {
  let names: string[];
  try {
    names = fs.readdirSync(dir).filter((n) => n.endsWith('.node'));
  } catch {
    return `${dir} (missing)`;
  }
  return `${dir} (${names.length ? names.join(', ') : 'no .node file'})`;
}

/** The ERR_MOE_LOAD message: what was tried, on what, why it failed, and the commands that fix it. */
export function loadErrorMessage(err: unknown, file?: string): string {
  const cause = (err instanceof Error ? err.message : String(err)).trim().replace(/\s*\n\s*/g, ' ');
  const libc = libcInfo();
  const lines = [
    `fused-moe: could not load the native addon${file ? ' ' + file : ''}.`,
    `  runtime: ${runtimeLine()}`,
    '  looked in:',
    ...bindingSearchPaths().map((p) => `    ${describeFolder(p)}`),
    `  cause: ${cause}`,
    'Possible solutions:',
  ];
  const rebuild = 'npm rebuild fused-moe --build-from-source';
  const tools = `${toolInstallCommand()}   # python3, make and a C++17 compiler, for the source build`;
  const glibc = /GLIBC_(\d+\.\d+)/.exec(cause);
  if (glibc) {
    lines.push(
      `- The binary needs glibc ${glibc[1]} or newer${libc.version ? `; this system has ${libc.version}` : ''}. ` +
        'Build it from source here:',
      `    ${tools}`,
      `    ${rebuild}`,
    );
  } else if (
    /invalid ELF header|wrong ELF class|ELF file|not a valid Win32|mach-o|incompatible architecture/i.test(cause)
  ) {
    lines.push(
      `- The binary was made for another platform (node_modules copied from another machine or image?). ` +
        'Reinstall here:',
      '    rm -rf node_modules && npm install',
    );
  } else if (/No native build was found/.test(cause)) {
    lines.push(
      `- No binary fits ${process.platform}-${process.arch}${libc.family ? ` (${libc.family})` : ''}: ` +
        'build one from source (needs python3, make and a C++17 compiler):',
      `    ${tools}`,
      '    npm rebuild fused-moe',
      '- If npm skipped the install script (--ignore-scripts, or strict-allow-scripts), allow it, then rebuild:',
      '    npm install-scripts approve fused-moe && npm rebuild fused-moe',
    );
    if (process.env.PREBUILDS_ONLY)
      lines.push('- PREBUILDS_ONLY is set, so build/ is not searched: unset it to use a local build.');
  } else {
    lines.push(
      '- Rebuild the addon from source (needs python3, make and a C++17 compiler):',
      `    ${tools}`,
      `    ${rebuild}`,
    );
  }
  lines.push('- Run `npx fused-moe doctor` for a full report.');
  return lines.join('\n');
}
