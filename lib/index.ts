/** fused-moe: the Mixture-of-Experts block of Mixtral-class models for Node.js. */
import { binding } from './binding';

export { MoeLayer } from './layer';
export type { MoeConfig, MoeWeights, ExpertWeights, ForwardOptions, RouteResult, CreateOptions, Routing, WeightDtype, Device, Quantize, QuantGroupSize } from './layer';
export { openSafetensors } from './safetensors/index';
export type { SafetensorsFile, TensorInfo, TensorView, FromSafetensorsOptions } from './safetensors/index';
export { MoeError, AbortError } from './errors';
export type { MoeErrorCode } from './errors';

export interface CudaDeviceInfo {
  name: string;
  totalMemory: number;
  computeCapability: string;
  multiprocessors: number;
}

export interface BackendInfo {
  /**
   * isa: the kernel set in use; int8Activations / int4Activations: how int8 / int4 experts meet the
   * activations: 'int16' / 'int8' where the set quantizes them per group for integer dot products (the
   * x86 SIMD sets), 'float32' for the scalar and NEON sets.
   */
  cpu: { isa: string | null; int8Activations: 'float32' | 'int16' | null; int4Activations: 'float32' | 'int8' | null; threads: number; supported: string[]; error?: string };
  cuda: {
    available: boolean;
    devices: CudaDeviceInfo[];
    reason: string | null;
    library: string | null;
    driverVersion: number;
    runtimeVersion: number;
  };
}

/** Which backends can run here: the CPU kernel set and thread count, CUDA devices or why not. */
export function backendInfo(): BackendInfo {
  return binding().backendInfo();
}
