/**
 * Safetensors checkpoints, read with no copy. Headers are read off the event loop and checked against
 * the file's size before anything is used (format.ts); a checkpoint's files are found from a file, an
 * index or a folder (resolve.ts); tensor data is memory-mapped by the addon, one mapping per tensor,
 * and handed out as typed-array views (map.ts), so opening a 90 GB checkpoint reads only its headers
 * and a layer reads only its own tensors (hf.ts names them, load-layer.ts builds the layer).
 */
export { openSafetensors } from './checkpoint';
export type { SafetensorsFile, TensorInfo } from './checkpoint';
export type { TensorView } from './map';
export { loadLayer } from './load-layer';
export type { FromSafetensorsOptions } from './load-layer';
