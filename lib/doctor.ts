/**
 * `npx fused-moe doctor`: which native binary loaded and from where, which CPU kernels run, whether the
 * CUDA backend can run and, when it cannot, why. It never throws: a failure to load is part of the
 * report. Exit code 0 when layers can run here, 1 when the addon does not load or the CPU backend
 * cannot run (a bad FUSED_MOE_ISA).
 */
import * as fs from 'fs';
import * as path from 'path';
import { BackendInfo, binding, bindingPath, bindingSearchPaths, CudaDeviceInfo, packageRoot } from './binding';
import { ENV_VARS, envSettings } from './env';
import { PlatformSupport, platformSupport, RuntimeInfo, runtimeInfo, runtimeLine } from './platform';

export interface DoctorDevice extends CudaDeviceInfo {
  index: number;
}

export interface DoctorReport {
  package: { name: string; version: string; path: string };
  runtime: RuntimeInfo;
  /** What the package offers this platform: a prebuilt binary (and its glibc floor) or a source build. */
  platform: PlatformSupport;
  addon: {
    loaded: boolean;
    /** The .node file node-gyp-build picked (null when none was found). */
    path: string | null;
    /** 'prebuilt' (prebuilds/ of the package), 'local build' (build/), 'other' ($FUSED_MOE_PREBUILD, ...). */
    kind: 'prebuilt' | 'local build' | 'other' | null;
    searched: string[];
    error: { code: string; message: string } | null;
  };
  /** null when the addon did not load. */
  cpu:
    | (Omit<BackendInfo['cpu'], 'error'> & {
        /** The FUSED_MOE_ISA override, when set. */
        forced: string | null;
        error: string | null;
      })
    | null;
  /** null when the addon did not load. */
  cuda: {
    available: boolean;
    /** Where the CUDA backend library was looked for (beside the addon, or $FUSED_MOE_CUDA_LIBRARY). */
    library: string | null;
    libraryFound: boolean;
    /** "12.4"; null when there is no driver or the library did not load. */
    driverVersion: string | null;
    runtimeVersion: string | null;
    devices: DoctorDevice[];
    /** Why CUDA cannot be used; null when it can. */
    reason: string | null;
  } | null;
  /** The environment variables of lib/env.ts that are set, with their values. */
  env: Record<string, string>;
  /** 0: layers can run here; 1: they cannot (see addon.error or cpu.error). */
  exitCode: number;
}

/** CUDA's integer version (1000 * major + 10 * minor) as "major.minor"; null for 0. */
export function cudaVersion(v: number): string | null {
  if (!Number.isFinite(v) || v <= 0) return null;
  return `${Math.floor(v / 1000)}.${Math.floor((v % 1000) / 10)}`;
}

function packageInfo(): DoctorReport['package'] {
  try {
    const pkg = JSON.parse(fs.readFileSync(path.join(packageRoot, 'package.json'), 'utf8')) as {
      name?: string;
      version?: string;
    };
    return { name: String(pkg.name), version: String(pkg.version), path: packageRoot };
  } catch {
    return { name: 'fused-moe', version: 'unknown', path: packageRoot };
  }
}

function binaryKind(file: string): 'prebuilt' | 'local build' | 'other' {
  const rel = path.relative(packageRoot, file);
  if (rel.startsWith('..') || path.isAbsolute(rel)) return 'other';
  if (rel.startsWith('prebuilds' + path.sep)) return 'prebuilt';
  if (rel.startsWith('build' + path.sep)) return 'local build';
  return 'other';
}

function errorOf(err: unknown): { code: string; message: string } {
  const e = err as { code?: unknown; message?: unknown };
  return {
    code: typeof e?.code === 'string' ? e.code : 'ERR_MOE_INTERNAL',
    message: typeof e?.message === 'string' ? e.message : String(err),
  };
}

/** Gathers the report. Never throws. */
export function doctorReport(): DoctorReport {
  const env = envSettings();
  const runtime = runtimeInfo();
  const report: DoctorReport = {
    package: packageInfo(),
    runtime,
    platform: platformSupport(runtime),
    addon: { loaded: false, path: null, kind: null, searched: bindingSearchPaths(), error: null },
    cpu: null,
    cuda: null,
    env,
    exitCode: 1,
  };

  let native;
  try {
    native = binding();
    const file = bindingPath() ?? null;
    report.addon = { ...report.addon, loaded: true, path: file, kind: file ? binaryKind(file) : null };
  } catch (err) {
    report.addon.error = errorOf(err);
    return report;
  }

  try {
    const info = native.backendInfo();
    report.cpu = {
      isa: info.cpu.isa,
      int8Activations: info.cpu.int8Activations ?? null,
      int4Activations: info.cpu.int4Activations ?? null,
      threads: info.cpu.threads,
      supported: info.cpu.supported,
      forced: process.env.FUSED_MOE_ISA || null,
      error: info.cpu.error ?? null,
    };
    const c = info.cuda;
    report.cuda = {
      available: c.available,
      library: c.library,
      libraryFound: c.library !== null && fs.existsSync(c.library),
      driverVersion: cudaVersion(c.driverVersion),
      runtimeVersion: cudaVersion(c.runtimeVersion),
      devices: c.devices.map((d, index) => ({ index, ...d })),
      reason: c.available ? null : (c.reason ?? 'unknown'),
    };
    report.exitCode = report.cpu.isa && !report.cpu.error ? 0 : 1;
  } catch (err) {
    const e = errorOf(err);
    report.cpu = {
      isa: null,
      int8Activations: null,
      int4Activations: null,
      threads: 0,
      supported: [],
      forced: process.env.FUSED_MOE_ISA || null,
      error: e.message,
    };
  }
  return report;
}

function gib(bytes: number): string {
  return `${(bytes / 2 ** 30).toFixed(1)} GiB`;
}

/** The report as text for a terminal. */
export function formatReport(r: DoctorReport): string {
  const out: string[] = [];
  const row = (label: string, text: string) => out.push(`${label.padEnd(9)} ${text}`);
  const more = (text: string) => out.push(`${''.padEnd(9)} ${text}`);

  row(r.package.name, `${r.package.version} (${r.package.path})`);
  row('runtime', runtimeLine(r.runtime));
  row('platform', r.platform.text);
  if (r.addon.loaded) {
    row('addon', `${r.addon.kind ?? 'loaded'}: ${r.addon.path ?? '(path unknown)'}`);
  } else {
    row('addon', 'NOT LOADED');
    for (const line of (r.addon.error?.message ?? '').split('\n')) more(line);
  }

  if (r.cpu) {
    if (r.cpu.error) {
      row('cpu', `cannot run: ${r.cpu.error}`);
    } else {
      const forced = r.cpu.forced ? ` (forced by FUSED_MOE_ISA=${r.cpu.forced})` : '';
      row('cpu', `${r.cpu.isa} kernels${forced}, ${r.cpu.threads} threads by default`);
    }
    more(`kernel sets this CPU and build support: ${r.cpu.supported.join(', ') || 'none'}`);
    if (r.cpu.int8Activations && r.cpu.int4Activations)
      more(
        `quantized experts: int8 weights with ${r.cpu.int8Activations} activations, int4 with ${r.cpu.int4Activations}`,
      );
  }

  if (r.cuda) {
    const c = r.cuda;
    row('cuda', c.available ? `available, ${c.devices.length} device(s)` : 'not used');
    if (c.library) more(`library: ${c.library} (${c.libraryFound ? 'found' : 'not found'})`);
    else more('library: not looked for');
    more(`driver: ${c.driverVersion ?? 'none'}, runtime: ${c.runtimeVersion ?? 'none'}`);
    for (const d of c.devices) {
      more(
        `device ${d.index}: ${d.name}, ${gib(d.totalMemory)}, compute capability ${d.computeCapability}, ` +
          `${d.multiprocessors} multiprocessors`,
      );
    }
    if (c.reason) more(`reason: ${c.reason}`);
  }
  row('env', 'the variables that change what loads and how it runs:');
  for (const v of ENV_VARS) more(`${v.name}=${r.env[v.name] ?? '(unset)'}`);
  out.push('');
  out.push(
    r.exitCode === 0
      ? 'ok: layers can run here' + (r.cuda?.available ? " (device: 'cuda' or 'cpu')" : " (device: 'cpu')")
      : 'not ok: layers cannot run here; see above',
  );
  return out.join('\n');
}

const USAGE = [
  'usage: fused-moe doctor [--json]',
  '',
  '  doctor   which native binary loaded and from where, the CPU kernels and threads, the CUDA library,',
  '           driver and devices, or why CUDA is not used. --json prints the same as one JSON object.',
  '           Exit code 0 when layers can run here, 1 when they cannot.',
].join('\n');

/** The command line: returns the exit code. Never throws. */
export function main(argv: string[], write: (s: string) => void = (s) => process.stdout.write(s)): number {
  const args = argv.filter((a) => a !== '--json');
  const json = argv.includes('--json');
  if (args.includes('--help') || args.includes('-h') || args.length === 0) {
    write(USAGE + '\n');
    return args.length === 0 ? 2 : 0;
  }
  if (args[0] !== 'doctor' || args.length > 1) {
    write(`fused-moe: unknown command or option '${args.join(' ')}'\n${USAGE}\n`);
    return 2;
  }
  let report: DoctorReport;
  try {
    report = doctorReport();
  } catch (err) {
    // doctorReport catches what it can; this is the last net.
    const e = errorOf(err);
    write(json ? JSON.stringify({ exitCode: 1, error: e }, null, 2) + '\n' : `fused-moe doctor failed: ${e.message}\n`);
    return 1;
  }
  write(json ? JSON.stringify(report, null, 2) + '\n' : formatReport(report) + '\n');
  return report.exitCode;
}
