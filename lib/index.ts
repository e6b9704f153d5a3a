/** fused-moe: the Mixture-of-Experts block of Mixtral-class models for Node.js. */
import { binding } from './binding';

export { MoeLayer } from './layer';
export type { MoeConfig, MoeWeights, ExpertWeights, ForwardOptions, RouteResult, Routing, WeightDtype, Device, Quantize, QuantGroupSize } from './layer';
export { openSafetensors } from './safetensors';
export type { SafetensorsFile, TensorInfo, TensorView, FromSafetensorsOptions } from './safetensors';
export { MoeError, AbortError } from './errors';
export type { MoeErrorCode } from './errors';

export interface CudaDeviceInfo {
  name: string;
  totalMemory: number;
  computeCapability: string;
  multiprocessors: number;
}

export interface BackendInfo {
  cpu: { isa: string | null; threads: number; supported: string[]; error?: string };
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
