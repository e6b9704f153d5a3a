/** `fused-moe run`: run as a user would, on a tiny checkpoint with a tokenizer. */
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as path from 'path';
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
    expect(r.stderr).toMatch(/loading \[#+\] 100%/);
    expect(r.stderr).toMatch(
      new RegExp(
        `prompt: ${expected.usage.promptTokens} tokens, [\\d.]+ tok/s; generation: ${expected.tokens.length} tokens, [\\d.]+ tok/s`,
      ),
    );
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
