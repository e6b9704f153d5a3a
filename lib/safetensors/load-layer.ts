/**
 * MoeLayer.fromSafetensors(): one MoE block of a checkpoint, its shapes checked against config.json,
 * built into a layer. Only the shards holding the block's tensors are opened.
 */
import { argRangeError, argTypeError, checkpointError } from '../errors';
import type { MoeConfig, MoeWeights, Routing, WeightDtype } from '../layer';
import { checkInteger, checkObject, checkOneOf, checkSignal, describe } from '../validate';
import { TensorEntry, widenToFloat32 } from './format';
import { blockLayout, configObject } from './families';
import { readHfConfig } from './hf';
import { dropPages, isViewable, mapTensor, mapTensorResident } from './map';
import { readJson, resolveCheckpoint, ShardHeaders } from './resolve';

/**
 * Options of MoeLayer.fromSafetensors(): where the layer's tensors are, plus the MoeConfig options that
 * are not read from the checkpoint (device, threads, cudaDevice, quantize, quantGroupSize).
 */
export interface FromSafetensorsOptions extends Pick<
  MoeConfig,
  'device' | 'threads' | 'cudaDevice' | 'quantize' | 'quantGroupSize'
> {
  /**
   * Decoder layer index: tensors are read under `model.layers.{layer}.block_sparse_moe` (Mixtral) or
   * `model.layers.{layer}.mlp` (the other families, by config.json's architectures).
   */
  layer?: number;
  /** Tensor name prefix instead of the family's block prefix (`{layer}` is substituted). */
  prefix?: string;
  /** k; default: config.json's num_experts_per_tok (required when there is no config.json). */
  topK?: number;
  /** Default: from config.json, by family (README, "MoE families"). */
  routing?: Routing;
  /**
   * Asserts the expert weights' dtype: the checkpoint's own dtype is used, never converted, and a
   * different value is a RangeError with code 'ERR_MOE_DTYPE'.
   */
  weightDtype?: WeightDtype;
  /** Cancels the load: the promise rejects with an AbortError (checked between packing steps). */
  signal?: AbortSignal;
}

/** The layer dtype of each checkpoint dtype the experts may have. */
const WEIGHT_DTYPES = { F32: 'float32', BF16: 'bfloat16', F16: 'float16' } as const satisfies Record<
  string,
  WeightDtype
>;

/** The class loadLayer() builds with (MoeLayer), passed in so that this module needs only its types. */
interface LayerFactory<L> {
  create(config: MoeConfig, weights: MoeWeights, options: { signal?: AbortSignal }): Promise<L>;
}

function expectShape(e: TensorEntry, expected: number[], why: string): void {
  if (e.shape.length !== expected.length || e.shape.some((d, i) => d !== expected[i]))
    throw checkpointError(
      e.file,
      `tensor '${e.name}' has shape [${e.shape.join(', ')}], expected [${expected.join(', ')}] (${why})`,
    );
}

/** The router weight as float32: a 16-bit gate (E·H values, small) is widened here. */
function gateToFloat32(e: TensorEntry): Float32Array {
  const v = mapTensor(e);
  if (v instanceof Float32Array) return v;
  return widenToFloat32(e.dtype === 'BF16' ? 'BF16' : 'F16', v);
}

/** The tensor name prefix the options give (undefined: the family's own), and the layer index. */
function blockPrefix(options: FromSafetensorsOptions): { prefix?: string; layer?: number } {
  if (options.prefix !== undefined) {
    if (typeof options.prefix !== 'string' || options.prefix === '')
      throw argTypeError(`options.prefix must be a non-empty string, got ${describe(options.prefix)}`);
    const layer = options.layer === undefined ? undefined : checkInteger('options.layer', options.layer, 0, 1e6);
    if (options.prefix.includes('{layer}') && layer === undefined)
      throw argTypeError(`options.prefix '${options.prefix}' contains {layer}: pass options.layer too`);
    return { prefix: options.prefix.replace(/\{layer\}/g, String(layer)), layer };
  }
  if (options.layer === undefined)
    throw argTypeError('options.layer (the decoder layer index) or options.prefix is required');
  return { layer: checkInteger('options.layer', options.layer, 0, 1e6) };
}

/**
 * Reads one MoE block's tensors from a checkpoint (a file, an index JSON or a folder) and builds the
 * layer with `factory.create()`: sizes from config.json or the tensors' shapes, every shape checked,
 * the expert weights used in the checkpoint's dtype. Bad options are TypeError/RangeError; a
 * checkpoint that does not hold a valid block is MoeError ERR_MOE_CHECKPOINT.
 */
export async function loadLayer<L>(factory: LayerFactory<L>, p: string, options: FromSafetensorsOptions): Promise<L> {
  checkObject('options', options as unknown);
  checkSignal('options.signal', options.signal);
  const { prefix, layer } = blockPrefix(options);
  const wantDtype =
    options.weightDtype === undefined
      ? undefined
      : checkOneOf('options.weightDtype', options.weightDtype, ['float32', 'bfloat16', 'float16'] as const);

  const layout = await resolveCheckpoint(p);
  const found = await readHfConfig(layout.dir);
  const hf = found?.config ?? {};
  if (
    found &&
    options.prefix === undefined &&
    hf.numLayers !== undefined &&
    layer !== undefined &&
    layer >= hf.numLayers
  )
    throw argRangeError(
      `options.layer must be below num_hidden_layers (${hf.numLayers}) of ${found.file}, got ${layer}`,
    );
  const topK = options.topK ?? hf.topK;
  if (topK === undefined)
    throw argTypeError(
      `options.topK is required: ${found ? `${found.file} has no num_experts_per_tok` : `there is no config.json beside ${layout.index ?? layout.files[0]}`}`,
    );
  const block = blockLayout(
    found ? configObject(await readJson(found.file, 'model config'), found.file) : {},
    found?.file ?? '',
    layer,
    prefix,
  );
  const routing = options.routing ?? block.routing;

  const shards = new ShardHeaders(layout);
  const gate = await shards.entry(block.gate);
  if (gate.shape.length !== 2)
    throw checkpointError(
      gate.file,
      `tensor '${gate.name}' has shape [${gate.shape.join(', ')}], expected [experts, hidden]`,
    );
  const [E, H] = gate.shape;
  const why = found ? `from ${found.file}` : 'from the gate and experts.0.w1 shapes';
  if (block.numExperts !== undefined || hf.hiddenSize !== undefined)
    expectShape(gate, [block.numExperts ?? E, hf.hiddenSize ?? H], `experts, hidden_size ${why}`);
  if (E < 1 || H < 1)
    throw checkpointError(
      gate.file,
      `tensor '${gate.name}' has shape [${gate.shape.join(', ')}]: no experts or hidden size 0`,
    );

  const entries = (projection: 'w1' | 'w3' | 'w2') =>
    Promise.all(block.experts(projection, E).map((n) => shards.entry(n)));
  const [w1, w3, w2] = await Promise.all([entries('w1'), entries('w3'), entries('w2')]);
  const F = block.intermediateSize ?? (w1[0].shape.length === 2 ? w1[0].shape[0] : -1);
  if (F < 1)
    throw checkpointError(
      w1[0].file,
      `tensor '${w1[0].name}' has shape [${w1[0].shape.join(', ')}], expected [intermediate, ${H}]`,
    );
  for (const e of [...w1, ...w3]) expectShape(e, [F, H], `expert intermediate size, hidden_size ${why}`);
  for (const e of w2) expectShape(e, [H, F], `hidden_size, expert intermediate size ${why}`);
  const Fs = block.sharedIntermediateSize;
  const shared = block.shared
    ? await Promise.all([block.shared.w1, block.shared.w3, block.shared.w2].map((n) => shards.entry(n)))
    : [];
  if (shared.length) {
    expectShape(shared[0], [Fs, H], `shared expert width, hidden_size ${why}`);
    expectShape(shared[1], [Fs, H], `shared expert width, hidden_size ${why}`);
    expectShape(shared[2], [H, Fs], `hidden_size, shared expert width ${why}`);
  }
  const sharedGate = block.shared?.gate ? await shards.entry(block.shared.gate) : undefined;
  if (sharedGate) expectShape(sharedGate, [1, H], `one gate row of hidden_size ${why}`);
  const scoreBias = block.scoreBias ? await shards.entry(block.scoreBias) : undefined;
  if (scoreBias) expectShape(scoreBias, [E], `one bias per expert ${why}`);

  const dtype = w1[0].dtype;
  if (!isViewable(dtype))
    throw checkpointError(
      w1[0].file,
      `tensor '${w1[0].name}' has dtype ${dtype}; expert weights must be F32, BF16 or F16`,
    );
  for (const e of [...w1, ...w3, ...w2, ...shared])
    if (e.dtype !== dtype)
      throw checkpointError(
        e.file,
        `tensor '${e.name}' has dtype ${e.dtype} but '${w1[0].name}' has ${dtype}: the experts must share one dtype`,
      );
  for (const g of [gate, sharedGate, scoreBias])
    if (g && !isViewable(g.dtype))
      throw checkpointError(g.file, `tensor '${g.name}' has dtype ${g.dtype}; it must be F32, BF16 or F16`);
  const weightDtype = WEIGHT_DTYPES[dtype];
  if (wantDtype !== undefined && wantDtype !== weightDtype)
    throw argRangeError(
      `options.weightDtype must be '${weightDtype}' (the checkpoint stores the experts as ${dtype}; weights are used as stored, not converted), got '${wantDtype}'`,
      'ERR_MOE_DTYPE',
    );

  const config: MoeConfig = {
    hiddenSize: H,
    intermediateSize: F,
    numExperts: E,
    topK,
    routing,
    weightDtype,
    device: options.device,
    threads: options.threads,
    cudaDevice: options.cudaDevice,
    quantize: options.quantize,
    quantGroupSize: options.quantGroupSize,
    routedScale: block.routedScale,
    expertGroups: block.expertGroups,
    sharedIntermediateSize: Fs,
    sharedGate: block.sharedGate,
  };
  // The pages are brought in on worker threads; the layer then packs (copies) the weights from memory
  // in short steps between turns of the event loop, and the mappings are dropped afterwards.
  const [v1, v3, v2, s] = await Promise.all(
    [w1, w3, w2, shared].map((list) => Promise.all(list.map(mapTensorResident))),
  );
  const weights: MoeWeights = { gate: gateToFloat32(gate), w1: v1, w3: v3, w2: v2 };
  if (s.length) weights.shared = { w1: s[0], w3: s[1], w2: s[2], gate: sharedGate && gateToFloat32(sharedGate) };
  if (scoreBias) weights.scoreBias = gateToFloat32(scoreBias);
  const created = await factory.create(config, weights, { signal: options.signal });
  dropPages([...v1, ...v3, ...v2, ...s]); // packed into the layer (the mappings go when collected)
  return created;
}
