// A Mixtral-proportioned MoE layer (a quarter of Mixtral-8x7B's width) from seeded random weights:
// prefill and decode on the CPU, routing counts per expert, tokens/s.
// Usage: node bench/demo.js [--dtype float32|bfloat16] [--device cpu|cuda|auto]
'use strict';
const { MoeLayer, backendInfo } = require('../dist');
const { fill, median } = require('./util');
const { cliOptions } = require('./child');

const { opt } = cliOptions({ values: ['--dtype', '--device'], common: [] });
const arg = (name, fallback) => opt(`--${name}`) ?? fallback;
const dtype = arg('dtype', 'bfloat16');
const device = arg('device', 'cpu');
const H = 1024,
  F = 3584,
  E = 8,
  k = 2;

// Seeded, so every run builds the same layer.
let seed = 2024;
const f32 = (n, scale) => fill(n, false, scale, seed++);
const weight = (n, scale) => fill(n, dtype !== 'float32', scale, seed++);

async function main() {
  const info = backendInfo();
  console.log(`fused-moe demo: H=${H} F=${F} E=${E} top-${k}, ${dtype} weights, device ${device}`);
  console.log(
    `cpu kernels: ${info.cpu.isa}, threads: ${info.cpu.threads}; cuda: ${info.cuda.available ? info.cuda.devices.map((d) => d.name).join(', ') : 'no (' + info.cuda.reason + ')'}`,
  );
  const t0 = performance.now();
  const layer = new MoeLayer(
    { hiddenSize: H, intermediateSize: F, numExperts: E, topK: k, weightDtype: dtype, device },
    {
      gate: f32(E * H, 2 / Math.sqrt(H)),
      w1: weight(E * F * H, 1 / Math.sqrt(H)),
      w3: weight(E * F * H, 1 / Math.sqrt(H)),
      w2: weight(E * H * F, 1 / Math.sqrt(F)),
    },
  );
  console.log(
    `built in ${(performance.now() - t0).toFixed(0)} ms on ${layer.device} (${layer.kernels}), ${(layer.nativeBytes / 2 ** 20).toFixed(0)} MiB of packed weights\n`,
  );

  const prompt = f32(128 * H, 1);
  const { experts } = layer.route(prompt);
  const counts = new Array(E).fill(0);
  for (const e of experts) counts[e]++;
  console.log('routing of a 128-token prompt (tokens per expert):');
  console.log(counts.map((c, e) => `  expert ${e}: ${'#'.repeat(Math.round(c / 4))} ${c}`).join('\n'));

  await layer.forward(prompt); // warm-up
  const rows = [];
  for (const [name, T, reps] of [
    ['prefill', 128, 3],
    ['decode', 1, 20],
    ['decode batch', 8, 10],
  ]) {
    const x = f32(T * H, 1);
    const times = [];
    for (let r = 0; r < reps; r++) {
      const s = performance.now();
      await layer.forward(x);
      times.push(performance.now() - s);
    }
    const ms = median(times);
    rows.push({
      case: name,
      tokens: T,
      'ms per call (median)': ms.toFixed(2),
      'tokens/s': ((T / ms) * 1000).toFixed(1),
    });
  }
  console.log('');
  console.table(rows);
  layer.dispose();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
