// Checkpoint loading: writes a synthetic safetensors checkpoint of one Mixtral-8x7B MoE layer in bf16
// (8 experts x 3 x 4096 x 14336 x 2 bytes, about 2.8 GB, plus config.json) to the temp folder, then
// times openSafetensors (headers only, maps nothing) and MoeLayer.fromSafetensors (maps, packs in steps,
// with the longest event-loop stall meanwhile), prints
// resident memory before and after, and deletes the checkpoint.
// Usage: node --expose-gc bench/load.js [--small] [--threads N] [--dir PATH] [--json]
//   --small: a quarter of the width (H 1024, F 3584), for a quick run.
// The file was just written, so it is read from the page cache: a cold load adds the disk's read time.
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');
const { monitorEventLoopDelay } = require('perf_hooks');
const { MoeLayer, openSafetensors } = require('../dist');
const { fill, fmt } = require('./util');
const { cliOptions } = require('./child');

const { opt, args } = cliOptions({ values: ['--threads', '--dir'], flags: ['--small'], common: ['--json'] });
const arg = (name, fallback) => opt(`--${name}`) ?? fallback;
const small = args.includes('--small');
const H = small ? 1024 : 4096,
  F = small ? 3584 : 14336,
  E = 8,
  k = 2; // hidden, intermediate, experts, top-k
const threads = Number(arg('threads', 0));
const base = arg('dir', os.tmpdir());
const MB = 2 ** 20;

// Resident memory, split into anonymous (heap, packed weights) and file-backed (mapped checkpoint) pages.
function rss() {
  const out = { rss: process.memoryUsage().rss / MB, anon: NaN, file: NaN };
  try {
    const status = fs.readFileSync('/proc/self/status', 'utf8');
    const kb = (key) => Number((new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status) || [])[1]) / 1024;
    out.anon = kb('RssAnon');
    out.file = kb('RssFile');
  } catch {
    // not Linux: rss only
  }
  return out;
}
const showRss = (r) => `rss ${fmt(r.rss)} MB (anon ${fmt(r.anon)}, file ${fmt(r.file)})`;

function writeCheckpoint(dir) {
  const tensors = [['model.layers.0.block_sparse_moe.gate.weight', [E, H]]];
  for (let e = 0; e < E; e++)
    for (const m of ['w1', 'w2', 'w3'])
      tensors.push([`model.layers.0.block_sparse_moe.experts.${e}.${m}.weight`, m === 'w2' ? [H, F] : [F, H]]);
  const header = { __metadata__: { format: 'pt' } };
  let offset = 0;
  for (const [name, shape] of tensors) {
    const bytes = shape[0] * shape[1] * 2;
    header[name] = { dtype: 'BF16', shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (Buffer.byteLength(json) % 8)) % 8);
  const total = 8 + Buffer.byteLength(json) + offset;

  const st = fs.statfsSync(base);
  const free = st.bavail * st.bsize;
  if (free < total + 512 * MB) {
    console.error(
      `not enough free disk in ${base}: ${fmt(free / 2 ** 30)} GiB free, ${fmt(total / 2 ** 30)} GiB needed (+0.5)`,
    );
    process.exit(2);
  }
  fs.mkdirSync(dir);
  const file = path.join(dir, 'model.safetensors');
  const fd = fs.openSync(file, 'w');
  try {
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
    fs.writeSync(fd, len);
    fs.writeSync(fd, json);
    tensors.forEach(([name, shape], i) => {
      const scale = name.endsWith('gate.weight') ? 2 / Math.sqrt(H) : 1 / Math.sqrt(name.includes('.w2.') ? F : H);
      const data = fill(shape[0] * shape[1], true, scale, 1 + i); // fixed seed per tensor
      const bytes = new Uint8Array(data.buffer);
      for (let done = 0; done < bytes.length;) done += fs.writeSync(fd, bytes, done, bytes.length - done);
    });
  } finally {
    fs.closeSync(fd);
  }
  const config = {
    architectures: ['MixtralForCausalLM'],
    model_type: 'mixtral',
    hidden_size: H,
    intermediate_size: F,
    num_local_experts: E,
    num_experts_per_tok: k,
    num_hidden_layers: 1,
    torch_dtype: 'bfloat16',
  };
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(config, null, 2));
  return { file, total };
}

async function main() {
  const dir = path.join(base, `fused-moe-load-${process.pid}`);
  const cleanup = () => fs.rmSync(dir, { recursive: true, force: true });
  process.on('SIGINT', () => {
    cleanup();
    process.exit(130);
  });
  try {
    let t = performance.now();
    const { total } = writeCheckpoint(dir);
    const writeS = (performance.now() - t) / 1000;
    console.log(
      `checkpoint: one MoE layer, H ${H}, F ${F}, E ${E}, bf16, ${fmt(total / 1e9)} GB, written in ${fmt(writeS)} s (${fmt(total / 1e9 / writeS)} GB/s)`,
    );
    global.gc?.();
    await new Promise((r) => setTimeout(r, 50));
    const r0 = rss();
    console.log(`before:                     ${showRss(r0)}`);

    t = performance.now();
    const ck = await openSafetensors(dir);
    const openMs = performance.now() - t;
    t = performance.now();
    const w = ck.get('model.layers.0.block_sparse_moe.experts.7.w2.weight');
    const viewMs = performance.now() - t;
    const r1 = rss();
    console.log(
      `openSafetensors:            ${fmt(openMs)} ms (${ck.tensors.size} tensors), get() of a ${fmt(w.byteLength / MB)} MB tensor ${fmt(viewMs)} ms; ${showRss(r1)}`,
    );
    ck.close();

    const delay = monitorEventLoopDelay({ resolution: 1 });
    delay.enable();
    t = performance.now();
    const layer = await MoeLayer.fromSafetensors(dir, { layer: 0, threads });
    const loadS = (performance.now() - t) / 1000;
    await new Promise((r) => setTimeout(r, 30)); // lets the delay monitor record the last block
    delay.disable();
    const blockMs = delay.max / 1e6; // the longest packing step (or any other stall)
    const r2 = rss();
    console.log(
      `MoeLayer.fromSafetensors:   ${fmt(loadS)} s (${fmt(total / 1e9 / loadS)} GB/s; maps and reads on workers, then packs in steps between turns of the event loop: longest stall ${fmt(blockMs)} ms, p99 ${fmt(delay.percentile(99) / 1e6)} ms; ${layer.kernels})`,
    );
    console.log(`                            ${showRss(r2)}; nativeBytes ${fmt(layer.nativeBytes / MB)} MB`);
    global.gc?.();
    await new Promise((r) => setTimeout(r, 50)); // let the finalizers unmap
    const r3 = rss();
    console.log(`after gc (mappings dropped): ${showRss(r3)}`);

    const x = new Float32Array(H).fill(0.01);
    t = performance.now();
    await layer.forward(x);
    const fwdMs = performance.now() - t;
    layer.dispose();
    console.log(`first forward (T=1):        ${fmt(fwdMs)} ms`);
    const result = {
      H,
      F,
      E,
      bytes: total,
      writeS,
      openMs,
      viewMs,
      loadS,
      blockMs,
      fwdMs,
      rssMB: { before: r0, open: r1, loaded: r2, afterGc: r3 },
    };
    if (args.includes('--json')) console.log(JSON.stringify(result));
  } finally {
    cleanup();
  }
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
