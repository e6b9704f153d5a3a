/** `fused-moe doctor`: the command a user runs to see which backend loaded and why; run as a user would. */
import { spawnSync } from 'child_process';
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { platformSupport, PREBUILT_PLATFORMS, RuntimeInfo } from '../lib/platform';

const root = path.join(__dirname, '..');
const bin = path.join(root, 'bin', 'fused-moe.js');
const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as { version: string };

function doctor(args: string[], env: Record<string, string | undefined> = {}) {
  const clean: Record<string, string | undefined> = {
    ...process.env,
    FUSED_MOE_ISA: undefined,
    FUSED_MOE_PREBUILD: undefined,
  };
  const r = spawnSync(process.execPath, [bin, ...args], {
    encoding: 'utf8',
    env: { ...clean, ...env },
    timeout: 60000,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

beforeAll(() => {
  if (!fs.existsSync(path.join(root, 'dist', 'doctor.js'))) throw new Error('dist/ is not built: run npm run build:ts');
});

test('text report: version, binary, CPU kernels, CUDA state', () => {
  const r = doctor(['doctor']);
  expect(r.stderr).toBe('');
  expect(r.status).toBe(0);
  expect(r.stdout).toMatch(new RegExp(`^fused-moe\\s+${pkg.version.replace(/\./g, '\\.')} `));
  expect(r.stdout).toMatch(
    new RegExp(`^runtime\\s+${process.platform}-${process.arch}.*Node\\.js ${process.versions.node}`, 'm'),
  );
  expect(r.stdout).toMatch(/^platform\s+(prebuilt binary for|no prebuilt binary|the \S+ prebuilt binary needs)/m);
  expect(r.stdout).toMatch(/^addon\s+(local build|prebuilt|other): \S+\.node$/m);
  expect(r.stdout).toMatch(/^cpu\s+\w+ kernels, \d+ threads/m);
  expect(r.stdout).toMatch(/kernel sets this CPU and build support: scalar/);
  expect(r.stdout).toMatch(/^cuda\s+(available, \d+ device\(s\)|not used)$/m);
  if (/^cuda\s+not used$/m.test(r.stdout)) expect(r.stdout).toMatch(/^\s+reason: \S/m);
  expect(r.stdout).toMatch(/^ok: layers can run here/m);
});

test('--json: one object with every field, consistent with itself', () => {
  const r = doctor(['doctor', '--json']);
  expect(r.status).toBe(0);
  const report = JSON.parse(r.stdout);
  expect(report.package).toEqual({ name: 'fused-moe', version: pkg.version, path: root });
  expect(report.runtime).toMatchObject({
    platform: process.platform,
    arch: process.arch,
    node: process.versions.node,
    addonNapi: 8,
  });
  expect(report.runtime.napi).toBeGreaterThanOrEqual(8);
  expect(typeof report.platform.prebuilt).toBe('boolean');
  expect(report.platform.kernels).toContain('scalar');
  // Every kernel set the CPU runs is one the platform's binary holds.
  for (const isa of report.cpu.supported) expect(report.platform.kernels).toContain(isa);
  if (process.platform === 'linux') expect(['glibc', 'musl']).toContain(report.runtime.libc.family);
  expect(report.addon.loaded).toBe(true);
  expect(fs.existsSync(report.addon.path)).toBe(true);
  expect(['local build', 'prebuilt', 'other']).toContain(report.addon.kind);
  expect(report.addon.searched.length).toBeGreaterThan(0);
  expect(report.addon.error).toBeNull();
  expect(report.cpu.supported).toContain('scalar');
  expect(report.cpu.supported).toContain(report.cpu.isa);
  const integer = ['avx2', 'avx512', 'avx512bf16'].includes(report.cpu.isa); // the x86 SIMD sets
  expect(report.cpu.int4Activations).toBe(integer ? 'int8' : 'float32');
  // int8 weights: int8 activations where VNNI's vpdpbusd takes them (avx512bf16), int16 on the other
  // x86 sets.
  expect(report.cpu.int8Activations).toBe(report.cpu.isa === 'avx512bf16' ? 'int8' : integer ? 'int16' : 'float32');
  expect(report.cpu.threads).toBeGreaterThan(0);
  expect(report.cpu.error).toBeNull();
  const cuda = report.cuda;
  expect(typeof cuda.available).toBe('boolean');
  expect(Array.isArray(cuda.devices)).toBe(true);
  if (cuda.available) {
    expect(cuda.reason).toBeNull();
    expect(cuda.libraryFound).toBe(true);
    expect(cuda.driverVersion).toMatch(/^\d+\.\d+$/);
    for (const d of cuda.devices) {
      expect(d).toEqual({
        index: expect.any(Number),
        name: expect.any(String),
        totalMemory: expect.any(Number),
        computeCapability: expect.stringMatching(/^\d+\.\d+$/),
        multiprocessors: expect.any(Number),
      });
    }
  } else {
    expect(typeof cuda.reason).toBe('string');
    expect(cuda.reason.length).toBeGreaterThan(10);
  }
  expect(report.exitCode).toBe(0);
});

test('a FUSED_MOE_ISA the CPU cannot run is reported, with exit code 1', () => {
  const r = doctor(['doctor', '--json'], { FUSED_MOE_ISA: 'sse9' });
  expect(r.status).toBe(1);
  const report = JSON.parse(r.stdout);
  expect(report.env.FUSED_MOE_ISA).toBe('sse9');
  expect(report.cpu.isa).toBeNull();
  expect(report.cpu.error).toMatch(/FUSED_MOE_ISA=sse9 is not a kernel set/);

  const forced = doctor(['doctor'], { FUSED_MOE_ISA: 'scalar' });
  expect(forced.status).toBe(0);
  expect(forced.stdout).toMatch(/^cpu\s+scalar kernels \(forced by FUSED_MOE_ISA=scalar\)/m);
});

test('an addon that cannot load is reported (paths, cause, fixes), never thrown', () => {
  const empty = fs.mkdtempSync(path.join(os.tmpdir(), 'fused-moe-doctor-'));
  try {
    const env = { FUSED_MOE_PREBUILD: empty };
    const json = doctor(['doctor', '--json'], env);
    expect(json.status).toBe(1);
    const report = JSON.parse(json.stdout);
    expect(report.addon.loaded).toBe(false);
    expect(report.addon.error.code).toBe('ERR_MOE_LOAD');
    expect(report.addon.error.message).toContain(path.join(empty, 'prebuilds', `${process.platform}-${process.arch}`));
    expect(report.addon.error.message).toMatch(/No native build was found/);
    expect(report.addon.error.message).toMatch(/Possible solutions:[\s\S]*npm rebuild fused-moe/);
    expect(report.cpu).toBeNull();
    expect(report.cuda).toBeNull();

    const text = doctor(['doctor'], env);
    expect(text.status).toBe(1);
    expect(text.stdout).toMatch(/^addon\s+NOT LOADED$/m);
    expect(text.stdout).toMatch(/looked in:/);
    expect(text.stdout).toMatch(/^not ok/m);
  } finally {
    fs.rmSync(empty, { recursive: true, force: true });
  }
});

test('usage and unknown commands', () => {
  expect(doctor(['--help'])).toMatchObject({ status: 0, stdout: expect.stringMatching(/^usage: fused-moe doctor/) });
  expect(doctor([])).toMatchObject({ status: 2, stdout: expect.stringMatching(/^usage:/) });
  expect(doctor(['doctr'])).toMatchObject({
    status: 2,
    stdout: expect.stringMatching(/unknown command or option 'doctr'/),
  });
});

describe('what each platform gets (platformSupport)', () => {
  const runtime = (platform: NodeJS.Platform, arch: string, family: 'glibc' | 'musl' | null, version: string | null) =>
    ({ platform, arch, libc: { family, version }, node: '20.0.0', napi: 9, addonNapi: 8 }) as RuntimeInfo;

  test.each([
    ['linux', 'x64', 'glibc', '2.28', true, ['scalar', 'avx2', 'avx512', 'avx512bf16']],
    ['linux', 'x64', 'glibc', '2.31', true, ['scalar', 'avx2', 'avx512', 'avx512bf16']],
    ['linux', 'arm64', 'glibc', '2.36', true, ['scalar', 'neon']],
    ['linux', 'x64', 'glibc', '2.27', false, ['scalar', 'avx2', 'avx512', 'avx512bf16']],
    ['linux', 'arm64', 'glibc', '2.17', false, ['scalar', 'neon']],
    ['linux', 'x64', 'musl', null, false, ['scalar', 'avx2', 'avx512', 'avx512bf16']],
    ['linux', 'arm64', 'musl', null, false, ['scalar', 'neon']],
    ['darwin', 'arm64', null, null, false, ['scalar', 'neon']],
    ['win32', 'x64', null, null, false, ['scalar', 'avx2', 'avx512', 'avx512bf16']],
    ['linux', 'riscv64', 'glibc', '2.36', false, ['scalar']],
  ] as const)('%s-%s %s %s: prebuilt %s', (platform, arch, family, version, prebuilt, kernels) => {
    const s = platformSupport(runtime(platform, arch, family, version));
    expect(s.prebuilt).toBe(prebuilt);
    expect(s.kernels).toEqual(kernels);
    if (prebuilt) expect(s.text).toMatch(new RegExp(`^prebuilt binary for ${platform}-${arch}, glibc >= 2\\.28 `));
    else expect(s.text).toMatch(/builds the CPU addon from source/);
    if (version && !prebuilt && arch !== 'riscv64') expect(s.text).toContain(`needs glibc 2.28, this is ${version}`);
  });

  test('the table names the glibc floor that pack-test checks, for both prebuilt platforms', () => {
    expect(PREBUILT_PLATFORMS.map((p) => `${p.platform}-${p.arch} ${p.libc} ${p.minGlibc}`)).toEqual([
      'linux-x64 glibc 2.28',
      'linux-arm64 glibc 2.28',
    ]);
  });
});
