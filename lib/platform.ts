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
const installer = require('../scripts/install.js') as { libcInfo(): LibcInfo; toolInstallCommand(): string };

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
