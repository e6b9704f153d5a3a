// Runs MoeModel in a child process, whose kernel set FUSED_MOE_ISA fixes (it is chosen once per
// process), for test/model-kernels.test.ts. lib/ is compiled on load, so the test needs no build.
//   node model-child.js request.json
//   request: { cases: [{ dir, options, prompt, out }] }
// For each case it loads the model, writes the logits of every prompt position (float32) to `out`,
// then the prompt's last token once more as a decode step after the rest (one row), and prints
// { isa } as JSON.
'use strict';
const fs = require('fs');
const ts = require('typescript');

require.extensions['.ts'] = (module, filename) => {
  const src = fs.readFileSync(filename, 'utf8');
  const js = ts.transpileModule(src, {
    compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022 },
    fileName: filename,
  }).outputText;
  module._compile(js, filename);
};

async function main() {
  const { MoeModel } = require('../../../lib/model/model.ts');
  const { binding } = require('../../../lib/binding.ts');
  const request = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  for (const c of request.cases) {
    const model = await MoeModel.load(c.dir, c.options);
    try {
      const all = await model.logits(c.prompt, { all: true });
      const sequence = model.createSequence();
      await model.step([{ sequence, tokens: c.prompt.slice(0, -1) }]);
      const [decode] = await model.step([{ sequence, tokens: c.prompt.slice(-1) }]);
      sequence.free();
      fs.writeFileSync(
        c.out,
        Buffer.concat([
          Buffer.from(all.buffer, all.byteOffset, all.byteLength),
          Buffer.from(decode.buffer, decode.byteOffset, decode.byteLength),
        ]),
      );
    } finally {
      model.dispose();
    }
  }
  process.stdout.write(JSON.stringify({ isa: binding().backendInfo().cpu.isa }) + '\n');
}

main().catch((e) => {
  process.stderr.write(`${e && e.stack ? e.stack : String(e)}\n`);
  process.exitCode = 1;
});
