/** fused-moe: the Mixture-of-Experts block of Mixtral-class models for Node.js. */
import { BackendInfo, binding } from './binding';

export { MoeLayer } from './layer';
export type {
  MoeConfig,
  MoeWeights,
  ExpertWeights,
  ForwardOptions,
  RouteResult,
  CreateOptions,
  Routing,
  WeightDtype,
  Device,
  Quantize,
  QuantGroupSize,
} from './layer';
export { openSafetensors } from './safetensors/index';
export type { SafetensorsFile, TensorInfo, TensorView, FromSafetensorsOptions } from './safetensors/index';
export { MoeModel } from './model/model';
export type { LoadOptions, LoadProgress, LogitsOptions, KvCacheDtype, StepPhase, StepTimes } from './model/model';
export type { DecoderConfig, MoeBlockConfig, QkNorm, Architecture } from './model/config';
export { SUPPORTED_ARCHITECTURES } from './model/config';
export type {
  Prompt,
  Generation,
  GenerateOptions,
  GenerationPiece,
  GenerationResult,
  FinishReason,
  SamplingOptions,
  TokenLogprob,
  TokenLogprobs,
  PromptTokenLogprobs,
} from './generate/index';
export { TextTokenizer } from './text/tokenizer';
export type { ChatMessage } from './text/chat';
export { createServer } from './server/server';
export type { ServerOptions, FusedMoeServer } from './server/server';
export { modelEngine } from './server/model-engine';
export type { GenerationEngine, GenerationRun } from './server/engine';
export type { CompletionRequest } from './server/request';
export { MoeError, AbortError } from './errors';
export type { MoeErrorCode } from './errors';
export type { BackendInfo, CudaDeviceInfo } from './binding';

/** Which backends can run here: the CPU kernel set and thread count, CUDA devices or why not. */
export function backendInfo(): BackendInfo {
  return binding().backendInfo();
}
