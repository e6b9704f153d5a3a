/** Types of the native module and the one place that loads it. */
import * as path from 'path';
import { MoeError } from './errors';

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
}

export type WeightArray = Float32Array | Uint16Array;

export interface NativeLayer {
  forwardSync(x: Float32Array, out: Float32Array): void;
  forward(x: Float32Array, out: Float32Array, cancel?: NativeCancel): Promise<Float32Array>;
  route(x: Float32Array): { experts: Int32Array; weights: Float32Array };
  dispose(): void;
  info(): { device: 'cpu' | 'cuda'; kernels: string; nativeBytes: number };
}

export interface NativeCancel {
  cancel(): void;
}

export interface NativeCudaDevice {
  name: string;
  totalMemory: number;
  computeCapability: string;
  multiprocessors: number;
}

export interface NativeBackendInfo {
  cpu: { isa: string | null; threads: number; supported: string[]; error?: string };
  cuda: {
    available: boolean;
    reason: string | null;
    library: string | null;
    driverVersion: number;
    runtimeVersion: number;
    devices: NativeCudaDevice[];
  };
}

export interface NativeBinding {
  NativeLayer: new (
    config: NativeLayerConfig,
    gate: Float32Array,
    w1: WeightArray[],
    w3: WeightArray[],
    w2: WeightArray[],
  ) => NativeLayer;
  NativeCancel: new () => NativeCancel;
  backendInfo(): NativeBackendInfo;
  abiVersion: number;
  bench: { readBandwidth(bytes: number, threads: number): number; fmaPeak(isa: number, threads: number): number };
}

export const packageRoot = path.join(__dirname, '..');

let cached: NativeBinding | undefined;
let loadedFrom: string | undefined;

/** Where the addon was loaded from (after the first load). */
export function bindingPath(): string | undefined {
  return loadedFrom;
}

/** Loads the addon once: a prebuilt binary that fits, or the local build (node-gyp-build). */
export function binding(): NativeBinding {
  if (cached) return cached;
  // eslint-disable-next-line @typescript-eslint/no-var-requires
  const load = require('node-gyp-build') as ((dir: string) => NativeBinding) & { resolve?: (dir: string) => string };
  try {
    if (load.resolve) loadedFrom = load.resolve(packageRoot);
    cached = load(packageRoot);
  } catch (err) {
    throw new MoeError('ERR_MOE_LOAD', loadErrorMessage(err), { cause: err });
  }
  return cached;
}

function loadErrorMessage(err: unknown): string {
  const cause = err instanceof Error ? err.message : String(err);
  return [
    'fused-moe: could not load the native addon.',
    `  platform: ${process.platform}, arch: ${process.arch}, node: ${process.versions.node}, ` +
      `node-api: ${process.versions.napi}`,
    `  looked in: ${path.join(packageRoot, 'prebuilds', `${process.platform}-${process.arch}`)} and ` +
      `${path.join(packageRoot, 'build', 'Release')}`,
    `  cause: ${cause}`,
    '  to fix: reinstall so the source build runs (npm rebuild fused-moe); it needs python3, make and a C++17',
    '  compiler (Debian/Ubuntu: apt-get install python3 make g++). Run `npx fused-moe doctor` for details.',
  ].join('\n');
}
