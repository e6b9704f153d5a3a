# How the prebuilt binaries are linked for a glibc 2.28 floor (binding.gyp with FUSED_MOE_GLIBC_FLOOR=1,
# and scripts/cross-arm64.js). libstdc++ is linked in, its symbols kept local (--exclude-libs) so that they
# never bind to a different libstdc++ the process has loaded; --wrap sends the glibc functions that have
# newer symbol versions to csrc/platform/glibc_floor.cpp.
{
  "variables": {
    "fmoe_glibc_floor_sources": ["csrc/platform/glibc_floor.cpp"],
    "fmoe_glibc_floor_ldflags": [
      "-static-libstdc++",
      "-Wl,--exclude-libs,ALL",
      "-Wl,--wrap=dlopen,--wrap=dlsym,--wrap=dladdr,--wrap=dlerror",
      "-Wl,--wrap=pthread_create,--wrap=pthread_join,--wrap=pthread_detach,--wrap=pthread_once",
      "-Wl,--wrap=pthread_mutex_trylock",
      "-Wl,--wrap=pthread_key_create,--wrap=__pthread_key_create,--wrap=pthread_key_delete",
      "-Wl,--wrap=pthread_getspecific,--wrap=pthread_setspecific",
      "-Wl,--wrap=exp,--wrap=log,--wrap=pow,--wrap=fstat,--wrap=fstat64,--wrap=arc4random,--wrap=__libc_single_threaded"
    ]
  }
}
