/** What a native binary has to match here: platform, arch, C library and Node-API version. */
import * as fs from 'fs';

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

let libcCache: LibcInfo | undefined;

/** The C library of this process, from Node's diagnostic report (the method detect-libc uses). */
export function libcInfo(): LibcInfo {
  if (libcCache) return libcCache;
  libcCache = { family: null, version: null };
  if (process.platform !== 'linux') return libcCache;
  try {
    const report = process.report?.getReport() as unknown as {
      header?: { glibcVersionRuntime?: string };
      sharedObjects?: string[];
    };
    if (report?.header?.glibcVersionRuntime) {
      libcCache = { family: 'glibc', version: report.header.glibcVersionRuntime };
    } else if ((report?.sharedObjects ?? []).some((o) => /ld-musl|libc\.musl/.test(o))) {
      libcCache = { family: 'musl', version: null };
    }
  } catch {
    // fall through to the file-system check
  }
  if (!libcCache.family && fs.existsSync('/etc/alpine-release')) libcCache = { family: 'musl', version: null };
  return libcCache;
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
  if (process.platform === 'darwin') return 'xcode-select --install';
  if (process.platform === 'win32') {
    return 'install Visual Studio Build Tools ("Desktop development with C++") and Python 3';
  }
  let ids = '';
  try {
    const text = fs.readFileSync('/etc/os-release', 'utf8');
    ids = `${/^ID=(.*)$/m.exec(text)?.[1] ?? ''} ${/^ID_LIKE=(.*)$/m.exec(text)?.[1] ?? ''}`.replace(/"/g, '');
  } catch {
    // unknown distribution: the Debian command is the most common answer
  }
  if (/alpine/.test(ids)) return 'apk add python3 make g++';
  if (/fedora|rhel|centos|rocky|almalinux|amzn/.test(ids)) return 'dnf install python3 make gcc-c++';
  if (/suse/.test(ids)) return 'zypper install python3 make gcc-c++';
  if (/arch/.test(ids)) return 'pacman -S python make gcc';
  return 'apt-get install -y python3 make g++';
}
