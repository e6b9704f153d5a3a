/**
 * Every environment variable the package reads, in one table: `fused-moe doctor` prints them from it,
 * the README's "Environment variables" table matches it (test/env.test.ts checks both ways, and that
 * every variable the sources read is listed here).
 */
export interface EnvVar {
  name: string;
  /** What it changes. */
  effect: string;
  /** Which part reads it. */
  readBy: string;
  /** Its value is never printed (doctor shows only that it is set). */
  secret?: boolean;
}

export const ENV_VARS: readonly EnvVar[] = [
  {
    name: 'FUSED_MOE_ISA',
    effect:
      "forces the CPU kernel set: scalar, avx2 (AVX2, FMA, F16C), avx512 (AVX-512 F, BW, VL, DQ), avx512bf16 (avx512's and AVX-512 BF16, VNNI, GFNI: Zen 4 and later, Sapphire Rapids and later) or neon (one this CPU and build support)",
    readBy: 'native addon (csrc/cpu/isa_select.cpp)',
  },
  {
    name: 'FUSED_MOE_THREADS',
    effect: 'size of the process-wide CPU thread pool (default: the physical cores the process may run on)',
    readBy: 'native addon (csrc/core/thread_pool.cpp)',
  },
  {
    name: 'FUSED_MOE_SPIN_US',
    effect:
      'microseconds a pool thread spins for its next job before it sleeps (default 100; 0 never spins, for shared machines)',
    readBy: 'native addon (csrc/core/thread_pool.cpp)',
  },
  {
    name: 'FUSED_MOE_PIN_THREADS',
    effect:
      "'0': leave the pool threads' placement to the OS (default: each worker pinned to a core of its own when the pool fits the process's cores)",
    readBy: 'native addon (csrc/core/thread_pool.cpp)',
  },
  {
    name: 'FUSED_MOE_DECODE_ROWS',
    effect: 'most rows per expert that take the decode tile shape (default 3), for tuning on other machines',
    readBy: 'native addon (csrc/cpu/simd_gemm.h)',
  },
  {
    name: 'FUSED_MOE_CUDA_LIBRARY',
    effect: 'path of libfused_moe_cuda.so (default: beside the addon)',
    readBy: 'native addon (csrc/cuda/host/cuda_backend.cpp)',
  },
  {
    name: 'CUDA_VISIBLE_DEVICES',
    effect: 'which NVIDIA GPUs the CUDA backend sees, and their order',
    readBy: 'the CUDA runtime (in libfused_moe_cuda.so)',
  },
  {
    name: 'FUSED_MOE_MAX_CONCURRENT',
    effect: 'forwards that run at once across all layers (default 2)',
    readBy: 'TypeScript facade (lib/scheduler.ts)',
  },
  {
    name: 'FUSED_MOE_PREBUILD',
    effect: 'folder searched for build/ and prebuilds/ instead of the package folder',
    readBy: 'addon loader (lib/binding.ts, node-gyp-build)',
  },
  {
    name: 'PREBUILDS_ONLY',
    effect: 'never compile on install, and load only prebuilt binaries (build/ is not searched)',
    readBy: 'install script (scripts/install.js), addon loader (lib/binding.ts, node-gyp-build)',
  },
  {
    name: 'FUSED_MOE_API_KEY',
    effect: 'the API key `fused-moe serve` requires when --api-key is not given',
    readBy: 'the serve command (lib/server/cli.ts)',
    secret: true,
  },
  {
    name: 'npm_config_build_from_source',
    effect: "'true': build the addon from source on install even when a prebuilt binary fits",
    readBy: 'install script (scripts/install.js)',
  },
];

/** The variables of the table that are set, with their values. */
export function envSettings(env: NodeJS.ProcessEnv = process.env): Record<string, string> {
  const set: Record<string, string> = {};
  for (const v of ENV_VARS) if (env[v.name] !== undefined) set[v.name] = v.secret ? '(set)' : (env[v.name] as string);
  return set;
}
