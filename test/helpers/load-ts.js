// Loads a TypeScript helper of test/helpers in a plain-node child process (fixtures): transpiled on
// load, so generators and references exist once, in TypeScript.
'use strict';
const fs = require('fs');
const path = require('path');
const ts = require('typescript');

function loadTs(file) {
  const src = fs.readFileSync(path.join(__dirname, file), 'utf8');
  const js = ts.transpileModule(src, {
    compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2020 },
  }).outputText;
  const mod = { exports: {} };
  new Function('module', 'exports', 'require', js)(mod, mod.exports, require);
  return mod.exports;
}

module.exports = { loadTs };
