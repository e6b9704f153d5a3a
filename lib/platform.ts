/** What a native binary has to match here: platform, arch, C library and Node-API version. */

/** The Node-API version the addon is built for (binding.gyp's NAPI_VERSION). */
export const ADDON_NAPI_VERSION = 8;

export interface LibcInfo {
  /** 'glibc' or 'musl' on Linux; null elsewhere or when it cannot be told. */
  family: 'glibc' | 'musl' | null;
  /** The glibc version this process runs with ('2.36'); null for musl and elsewhere. */
  version: string | null;
}

export interface RuntimeInfo {
  platform: NodeJS.Platform;
  arch: string;
  libc: LibcInfo;
  node: string;
  napi: number;
  addonNapi: number;
}

// The checks the install script makes, shared: scripts/install.js ships with the package and has to run
// before dist/ exists, so it is plain JavaScript and this file borrows from it.
// eslint-disable-next-line @typescript-eslint/no-require-imports -- plain JavaScript outside the TypeScript root
const installer = require('../scripts/install.js') as {
  GLIBC_FLOOR: string;
  libcInfo(): LibcInfo;
  toolInstallCommand(): string;
};

let libcCache: LibcInfo | undefined;

/** The C library of this process, from Node's diagnostic report (the method detect-libc uses). */
export function libcInfo(): LibcInfo {
  return (libcCache ??= installer.libcInfo());
}

export function runtimeInfo(): RuntimeInfo {
  return {
    platform: process.platform,
    arch: process.arch,
    libc: libcInfo(),
    node: process.versions.node,
    napi: Number(process.versions.napi),
    addonNapi: ADDON_NAPI_VERSION,
  };
}

/** "linux-x64, glibc 2.36, Node.js 20.20.2, Node-API 9 (the addon needs 8)" */
export function runtimeLine(info: RuntimeInfo = runtimeInfo()): string {
  const libc = info.libc.family ? `, ${info.libc.family}${info.libc.version ? ' ' + info.libc.version : ''}` : '';
  return (
    `${info.platform}-${info.arch}${libc}, Node.js ${info.node}, ` +
    `Node-API ${info.napi} (the addon needs ${info.addonNapi})`
  );
}

/** The command that installs python3, make and a C++ compiler on this system. */
export function toolInstallCommand(): string {
  return installer.toolInstallCommand();
}

/** A platform the package ships a prebuilt binary for (scripts/prebuild.js makes them). */
export interface PrebuiltPlatform {
  platform: NodeJS.Platform;
  arch: string;
  libc: 'glibc';
  /** The oldest glibc the binary loads on (its newest symbol version; scripts/pack-test.js checks it). */
  minGlibc: string;
  /** The kernel sets compiled in; the CPU decides at run time which of them can run. */
  kernels: string[];
}

export const PREBUILT_PLATFORMS: readonly PrebuiltPlatform[] = [
  {
    platform: 'linux',
    arch: 'x64',
    libc: 'glibc',
    minGlibc: installer.GLIBC_FLOOR,
    kernels: sourceKernels('x64'),
  },
  { platform: 'linux', arch: 'arm64', libc: 'glibc', minGlibc: installer.GLIBC_FLOOR, kernels: sourceKernels('arm64') },
];

/** The kernel sets a build for an architecture holds (csrc/cpu/isa_select.cpp), prebuilt or from source. */
export function sourceKernels(arch: string): string[] {
  if (arch === 'x64') return ['scalar', 'avx2', 'avx512', 'avx512bf16'];
  if (arch === 'arm64') return ['scalar', 'neon'];
  return ['scalar'];
}

export interface PlatformSupport {
  /** True when a prebuilt binary of this package fits this runtime: nothing is compiled at install. */
  prebuilt: boolean;
  /** The kernel sets the binary for this platform (prebuilt or built from source) holds. */
  kernels: string[];
  /** One line: what this platform gets, and why when it is not a prebuilt binary. */
  text: string;
}

function versionAtLeast(v: string, min: string): boolean {
  const a = v.split('.').map(Number),
    b = min.split('.').map(Number);
  for (let i = 0; i < Math.max(a.length, b.length); i++)
    if ((a[i] || 0) !== (b[i] || 0)) return (a[i] || 0) > (b[i] || 0);
  return true;
}

/** What the package offers this runtime: a prebuilt binary, or a source build, and its kernel sets. */
export function platformSupport(info: RuntimeInfo = runtimeInfo()): PlatformSupport {
  const tuple = `${info.platform}-${info.arch}`;
  const match = PREBUILT_PLATFORMS.find((p) => p.platform === info.platform && p.arch === info.arch);
  const source = sourceKernels(info.arch);
  const fromSource = (why: string) => ({
    prebuilt: false,
    kernels: source,
    text: `${why}: the install builds the CPU addon from source (kernels ${source.join(', ')})`,
  });
  if (!match) return fromSource(`no prebuilt binary for ${tuple}`);
  if (info.libc.family !== match.libc)
    return fromSource(
      `no prebuilt binary for ${tuple} with ${info.libc.family ?? 'this C library'} (only ${match.libc})`,
    );
  if (info.libc.version && !versionAtLeast(info.libc.version, match.minGlibc))
    return fromSource(`the ${tuple} prebuilt binary needs glibc ${match.minGlibc}, this is ${info.libc.version}`);
  return {
    prebuilt: true,
    kernels: match.kernels,
    text: `prebuilt binary for ${tuple}, glibc >= ${match.minGlibc} (kernels ${match.kernels.join(', ')}; the CPU picks)`,
  };
}
