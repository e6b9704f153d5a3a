/**
 * llama.cpp as an independent oracle: runs GGUF models through node-llama-cpp in a child process
 * (llama-child.mjs) and returns the log-probabilities of the next token at every position.
 */
import { execFile, spawnSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';

const SCRIPT = path.join(__dirname, 'llama-child.mjs');

/** null when llama.cpp's prebuilt binary loads here; otherwise the reason it does not. */
export function llamaUnavailableReason(): string | null {
  const r = spawnSync(process.execPath, [SCRIPT, '--probe'], { encoding: 'utf8', timeout: 60000 });
  if (r.status === 0) return null;
  const why = `${r.stdout ?? ''}${r.stderr ?? ''}`.trim() || (r.error ? r.error.message : `exit ${r.status}`);
  return why;
}

export interface OracleJob {
  ggufPath: string;
  prompt: number[];
  /** Greedy tokens to generate after the prompt (at least 1). */
  steps: number;
  vocab: number;
}

export interface OracleResult {
  /** Greedy tokens, argmax step by step, each fed back. */
  tokens: number[];
  /** log p(next token) at every evaluated position: [(prompt + steps - 1) * vocab]. */
  logProbs: Float64Array;
}

/**
 * Runs every job in one child process (one llama.cpp start-up), in `workDir`. One thread by default:
 * llama.cpp's workers spin at each barrier, and on a loaded machine two threads made a tiny model's
 * decode steps a thousand times slower than one.
 */
export async function runLlama(jobs: OracleJob[], workDir: string, threads = 1): Promise<OracleResult[]> {
  const request = {
    threads,
    jobs: jobs.map((j, i) => ({
      model: j.ggufPath,
      prompt: j.prompt,
      steps: j.steps,
      vocab: j.vocab,
      out: path.join(workDir, `oracle-${i}.f32`),
    })),
  };
  const requestPath = path.join(workDir, 'oracle-request.json');
  fs.writeFileSync(requestPath, JSON.stringify(request));
  const stdout = await new Promise<string>((resolve, reject) => {
    execFile(process.execPath, [SCRIPT, requestPath], { maxBuffer: 64 << 20, timeout: 120000 }, (err, out, errOut) => {
      if (err) reject(new Error(`llama-oracle failed: ${err.message}\n${errOut}`));
      else resolve(out);
    });
  });
  const { jobs: results } = JSON.parse(stdout.trim().split('\n').pop()!) as { jobs: { tokens: number[] }[] };
  return results.map((r, i) => {
    const buf = fs.readFileSync(request.jobs[i].out);
    const probs = new Float32Array(buf.buffer, buf.byteOffset, buf.byteLength / 4);
    return { tokens: r.tokens, logProbs: Float64Array.from(probs, Math.log) };
  });
}
