// Runs the C++ core tests and a short Node workload under AddressSanitizer + UBSan builds; fails on
// any report. Usage: node scripts/memcheck.js
'use strict';
const { execFileSync } = require('child_process');
const path = require('path');

const root = path.join(__dirname, '..');
const run = (cmd, args, env) =>
  execFileSync(cmd, args, { cwd: root, stdio: 'inherit', env: { ...process.env, ...env } });
const sanitizerEnv = {
  ASAN_OPTIONS: 'abort_on_error=1:detect_leaks=1',
  UBSAN_OPTIONS: 'halt_on_error=1:print_stacktrace=1',
};

// 1. The C++ tests, sanitized (leaks included).
run(process.execPath, [path.join(__dirname, 'ctest.js'), '--sanitize'], sanitizerEnv);

// 2. The addon, sanitized, under Node. Node itself is not built with ASan, so the runtime is preloaded
// and leak checking is off (V8 keeps memory until exit by design).
const out = path.join(root, 'build-asan-addon');
run(process.execPath, [
  require.resolve('cmake-js/bin/cmake-js'),
  'compile',
  '-O',
  out,
  '--CDFMOE_SANITIZE=ON',
  '--CDFMOE_CUDA=OFF',
]);
const libasan = execFileSync('c++', ['-print-file-name=libasan.so'], { encoding: 'utf8' }).trim();
const libubsan = execFileSync('c++', ['-print-file-name=libubsan.so'], { encoding: 'utf8' }).trim();
run(
  process.execPath,
  [path.join(root, 'test', 'fixtures', 'memcheck-workload.js'), path.join(out, 'Release', 'fused_moe.node')],
  {
    LD_PRELOAD: `${libasan} ${libubsan}`,
    ASAN_OPTIONS: 'abort_on_error=1:detect_leaks=0',
    UBSAN_OPTIONS: 'halt_on_error=1:print_stacktrace=1',
  },
);
console.log('memcheck: no sanitizer reports');
