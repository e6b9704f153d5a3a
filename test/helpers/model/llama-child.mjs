// Runs GGUF models in llama.cpp (through node-llama-cpp) and writes the next-token probabilities at
// every position, for the oracle tests. A separate process because node-llama-cpp is an ES module
// that jest's CommonJS runtime cannot load, and so that a llama.cpp abort cannot take a test runner
// down with it.
//
//   node llama-child.mjs --probe            exit 0 when the llama.cpp binary loads, else 3 and why
//   node llama-child.mjs request.json       request: { threads, jobs: [{ model, prompt, steps, vocab, out }] }
//
// For each job it evaluates `prompt` on a fresh sequence (no BOS added), then `steps` greedy tokens,
// each fed back; it writes the probabilities of every evaluated position as float32 [rows, vocab]
// to `out` (rows = prompt + steps - 1) and prints { jobs: [{ tokens }] } as JSON on stdout.
import * as fs from 'node:fs';

async function loadLlama() {
  const { getLlama, LlamaLogLevel } = await import('node-llama-cpp');
  // Prebuilt CPU binary only: never compile, download or probe a GPU from a test.
  return getLlama({ build: 'never', gpu: false, logLevel: LlamaLogLevel.error, progressLogs: false });
}

// Exactness: a float32 KV cache and no flash attention (an f16 cache or the CPU flash kernel moves the
// logits by 1e-4 or more), and probabilities at temperature 0, which are the softmax of the raw logits.
async function runJob(llama, job, threads) {
  const model = await llama.loadModel({ modelPath: job.model, gpuLayers: 0, useMmap: false });
  try {
    const contextSize = job.prompt.length + job.steps;
    const context = await model.createContext({
      contextSize,
      batchSize: contextSize,
      sequences: 1,
      threads,
      flashAttention: false,
      experimentalKvCacheKeyType: 'F32',
      experimentalKvCacheValueType: 'F32',
    });
    try {
      const sequence = context.getSequence();
      const ask = { generateNext: { probabilities: true, options: { temperature: 0 } } };
      const rows = job.prompt.length + job.steps - 1;
      const probs = new Float32Array(rows * job.vocab);
      let row = 0;
      const take = (outputs) => {
        for (const o of outputs) {
          const p = o?.next?.probabilities;
          if (!p || p.size !== job.vocab)
            throw new Error(`position ${row}: expected ${job.vocab} probabilities, got ${p?.size}`);
          for (const [token, value] of p) probs[row * job.vocab + token] = value;
          row++;
        }
        return outputs[outputs.length - 1].next.probabilities.keys().next().value; // sorted, best first
      };
      let next = take(await sequence.controlledEvaluate(job.prompt.map((t) => [t, ask])));
      const tokens = [next];
      while (tokens.length < job.steps) {
        next = take(await sequence.controlledEvaluate([[next, ask]]));
        tokens.push(next);
      }
      fs.writeFileSync(job.out, Buffer.from(probs.buffer));
      return { tokens };
    } finally {
      await context.dispose();
    }
  } finally {
    await model.dispose();
  }
}

async function main() {
  const arg = process.argv[2];
  if (arg === '--probe') {
    try {
      const llama = await loadLlama();
      await llama.dispose();
      process.stdout.write('ok\n');
    } catch (e) {
      process.stdout.write(`${e && e.message ? e.message : String(e)}\n`);
      process.exitCode = 3;
    }
    return;
  }
  const request = JSON.parse(fs.readFileSync(arg, 'utf8'));
  const llama = await loadLlama();
  const jobs = [];
  for (const job of request.jobs) jobs.push(await runJob(llama, job, request.threads ?? 1));
  await llama.dispose();
  process.stdout.write(JSON.stringify({ jobs }) + '\n');
}

main().catch((e) => {
  process.stderr.write(`${e && e.stack ? e.stack : String(e)}\n`);
  process.exitCode = 1;
});
