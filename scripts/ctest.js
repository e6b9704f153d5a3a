// Configures, builds and runs the C++ core tests with CMake + ctest (no Node headers needed).
// Usage: node scripts/ctest.js [--sanitize]
'use strict';
const { execFileSync } = require('child_process');
const path = require('path');

const root = path.join(__dirname, '..');
const sanitize = process.argv.includes('--sanitize');
const dir = path.join(root, sanitize ? 'build-asan' : 'build-cpp');
const run = (cmd, args) => execFileSync(cmd, args, { cwd: root, stdio: 'inherit' });

run('cmake', ['-S', root, '-B', dir, '-DFMOE_CUDA=OFF', `-DFMOE_SANITIZE=${sanitize ? 'ON' : 'OFF'}`]);
run('cmake', ['--build', dir, '-j', '2']);
// Each kernel set is chosen once per process, so the tests run once per ISA the machine has.
for (const isa of ['scalar', 'avx2', 'avx512', 'avx512bf16']) {
  const env = { ...process.env, FUSED_MOE_ISA: isa };
  try {
    execFileSync(path.join(dir, 'test_core'), [], { env, stdio: 'pipe' });
  } catch (e) {
    const out = String(e.stdout || '') + String(e.stderr || '');
    if (/cannot run here/.test(out)) continue; // not this CPU
    process.stdout.write(out);
    throw new Error(`C++ core tests failed with FUSED_MOE_ISA=${isa}`, { cause: e });
  }
}
execFileSync('ctest', ['--test-dir', dir, '--output-on-failure'], { cwd: root, stdio: 'inherit' });
