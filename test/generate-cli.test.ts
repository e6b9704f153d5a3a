/** `fused-moe run`: run as a user would, on a tiny checkpoint with a tokenizer. */
import { spawn, spawnSync } from 'child_process';
import { EventEmitter } from 'events';
import * as fs from 'fs';
import * as path from 'path';
import * as readline from 'readline';
import { PassThrough } from 'stream';
import { chatLoop } from '../lib/cli';
import { MoeModel } from '../lib/index';
import { makeTempDir, removeTempDir } from './helpers/checkpoint';
import { writeRandomModel } from './helpers/model/random-model';
import { writeTokenizer } from './helpers/text/tokenizer-files';

const root = path.join(__dirname, '..');
const bin = path.join(root, 'bin', 'fused-moe.js');

let dir = '';
let hfDir = '';
beforeAll(() => {
  if (!fs.existsSync(path.join(root, 'dist', 'cli.js'))) throw new Error('dist/ is not built: run npm run build:ts');
  dir = makeTempDir('generate-cli');
  hfDir = writeRandomModel(path.join(dir, 'm'), { family: 'qwen2moe', seed: 41, gguf: false }).hfDir;
  writeTokenizer(hfDir, 'byte-level', 512);
});
afterAll(() => removeTempDir(dir));

function cli(args: string[]) {
  const r = spawnSync(process.execPath, [bin, ...args], { encoding: 'utf8', timeout: 60000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

test('run -p streams the text of complete() to stdout, progress and speeds to stderr', async () => {
  const r = cli(['run', hfDir, '-p', 'the café', '--temperature', '0', '-n', '12']);
  expect(r.status).toBe(0);
  const model = await MoeModel.load(hfDir);
  try {
    const expected = await model.complete('the café', { temperature: 0, maxTokens: 12 });
    expect(r.stdout).toBe(expected.text + '\n');
    // Not a terminal: a line per 10% instead of a redrawn bar.
    expect(r.stderr).toMatch(/^loading: 100% \(\d+\/\d+ tensors\)$/m);
    expect(r.stderr).not.toContain('\r');
    expect(r.stderr).toMatch(
      new RegExp(
        `prompt: ${expected.usage.promptTokens} tokens, [\\d.]+ tok/s; generation: ${expected.tokens.length} tokens, [\\d.]+ tok/s`,
      ),
    );
  } finally {
    model.dispose();
  }
});

test("without --temperature, run samples as the checkpoint's generation_config.json says (do_sample: false: greedy)", async () => {
  const greedyDir = path.join(dir, 'greedy');
  fs.cpSync(hfDir, greedyDir, { recursive: true });
  const gen = JSON.parse(fs.readFileSync(path.join(greedyDir, 'generation_config.json'), 'utf8'));
  fs.writeFileSync(path.join(greedyDir, 'generation_config.json'), JSON.stringify({ ...gen, do_sample: false }));
  const model = await MoeModel.load(hfDir);
  try {
    const greedy = await model.complete('the café', { temperature: 0, maxTokens: 16 });
    // run used to sample at its own 0.7 whatever the checkpoint said: 16 unseeded draws from a random
    // model's flat distributions all matching the argmax, twice, is out of reach by chance.
    const runs = [
      cli(['run', greedyDir, '-p', 'the café', '-n', '16']),
      cli(['run', greedyDir, '-p', 'the café', '-n', '16']),
    ];
    for (const r of runs) {
      expect(r.status).toBe(0);
      expect(r.stdout).toBe(greedy.text + '\n');
    }
  } finally {
    model.dispose();
  }
});

test('usage errors exit 2; a bad folder exits 1 with the reason; doctor still answers', () => {
  expect(cli(['run', '--help'])).toMatchObject({ status: 0, stdout: expect.stringMatching(/^usage: fused-moe run/) });
  expect(cli(['run', hfDir])).toMatchObject({
    status: 2,
    stderr: expect.stringMatching(/either -p "prompt" or --chat/),
  });
  expect(cli(['run', hfDir, '-p', 'x', '--bogus'])).toMatchObject({ status: 2 });
  // spawnSync gives the child a pipe, not a terminal.
  expect(cli(['run', hfDir, '--chat'])).toMatchObject({ status: 2, stderr: expect.stringMatching(/needs a terminal/) });
  expect(cli(['run', hfDir, '-p', 'x', '--temperature=-1'])).toMatchObject({
    status: 1,
    stderr: expect.stringMatching(/options\.temperature/),
  });
  expect(cli(['run', path.join(dir, 'nowhere'), '-p', 'x'])).toMatchObject({
    status: 1,
    stderr: expect.stringMatching(/config\.json/),
  });
  expect(cli(['doctor', '--json']).status).toBe(0);
  expect(cli(['--help']).stdout).toMatch(/^usage: fused-moe doctor[^]*^usage: fused-moe run/m);
});

test('bad options are refused before the model loads (a folder that does not exist is never read)', () => {
  const nowhere = path.join(dir, 'nowhere');
  expect(cli(['run', nowhere, '-p', ''])).toMatchObject({
    status: 2,
    stderr: expect.stringMatching(/-p needs a prompt/),
  });
  for (const [flag, message] of [
    [['-n', '0'], /--max-tokens must be an integer >= 1, got 0/],
    [['--top-p', '2'], /options\.topP/],
    [['--presence-penalty', '3'], /options\.presencePenalty must be in \[-2, 2\], got 3/],
    [['--frequency-penalty', 'lots'], /--frequency-penalty must be a number, got 'lots'/],
  ] as [string[], RegExp][]) {
    const r = cli(['run', nowhere, '-p', 'x', ...flag]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(message);
    expect(r.stderr).not.toMatch(/config\.json/);
  }
});

test('run -p into a reader that stops early (| head): exit 0, no stack trace', async () => {
  const child = spawn(
    process.execPath,
    [bin, 'run', hfDir, '-p', 'the', '-n', '100000', '--context', '4096', '--temperature', '0'],
    {
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  let err = '';
  child.stderr.setEncoding('utf8').on('data', (s: string) => (err += s));
  child.stdout.once('data', () => child.stdout.destroy()); // the reader goes away after the first text
  const code = await new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
  expect(code).toBe(0);
  expect(err).not.toMatch(/EPIPE|Error:| {4}at /);
});

describe('the chat loop (on streams in place of a terminal)', () => {
  test('a turn too long for the context is reported and the chat goes on; a long chat drops its oldest exchange', async () => {
    const model = await MoeModel.load(hfDir, { contextLength: 96 });
    const input = new PassThrough();
    const output = new PassThrough();
    let shown = '';
    output.setEncoding('utf8').on('data', (s: string) => (shown += s));
    const out: string[] = [];
    const err: string[] = [];
    const io = { out: (s: string) => void out.push(s), err: (s: string) => void err.push(s) };
    const once = jest.spyOn(EventEmitter.prototype, 'once'); // calls through; records each `this`
    const prompts = () => shown.split('> ').length - 1;
    const turn = async (line: string) => {
      const before = prompts();
      input.write(line + '\r');
      for (let t = 0; t < 3000 && prompts() === before; t++) await new Promise((r) => setTimeout(r, 2));
    };
    try {
      const loop = chatLoop(model, { temperature: 0, maxTokens: 6 }, 'be brief', io, input, output);
      for (let t = 0; t < 3000 && prompts() === 0; t++) await new Promise((r) => setTimeout(r, 2));
      await turn('x'.repeat(400)); // alone more than the context
      expect(err.join('')).toMatch(/fused-moe run: promptOrMessages holds \d+ tokens, more than the context of 96/);
      await turn('hello');
      expect(err.at(-1)).toMatch(/^prompt: \d+ tokens/);
      // The chat outgrows 96 positions.
      for (let i = 0; i < 12; i++) await turn(`and then ${i}?`);
      expect(err.join('')).toContain('(the oldest exchange was dropped to fit the context)');
      expect(err.at(-1)).toMatch(/^prompt: \d+ tokens/);
      // The chat's interface (the emitter it asked to tell it of 'close'): its two listeners (the closed
      // flag, the question waiting) and readline's own, however many turns (17 when each turn left one).
      const rl = once.mock.contexts.find(
        (c, i) => c instanceof readline.Interface && once.mock.calls[i][0] === 'close',
      );
      expect(rl).toBeDefined();
      expect((rl as readline.Interface).listenerCount('close')).toBeLessThanOrEqual(3);
      input.end(); // Ctrl-D
      await loop;
    } finally {
      once.mockRestore();
      model.dispose();
    }
  });
});
