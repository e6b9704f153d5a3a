// Linked into the prebuilt binaries only (binding.gyp with FUSED_MOE_GLIBC_FLOOR=1, and the arm64 cross
// build), so that they load on glibc 2.28. A build machine with a newer glibc binds these functions to
// the symbol versions it introduced (dlopen and pthread_* at GLIBC_2.34, exp, log and pow at 2.29, fstat at
// 2.33, arc4random at 2.36), and the static libstdc++ brings some of them in too. The linker's --wrap
// (csrc/platform/glibc_floor.gypi) sends every reference, ours and libstdc++'s, to the __wrap_ functions
// here, which call the architecture's first version of each function: the one every glibc exports.
#if defined(__linux__)
#include <dlfcn.h>
#include <pthread.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#endif

#if defined(__linux__) && defined(__GLIBC__)
#if defined(__x86_64__)
#define FMOE_GLIBC_BASE "GLIBC_2.2.5"
#elif defined(__aarch64__)
#define FMOE_GLIBC_BASE "GLIBC_2.17"
#else
#error "glibc_floor.cpp: no base glibc version known for this architecture"
#endif

// fmoe_old_NAME is NAME at the base version; __wrap_NAME forwards to it.
#define FMOE_OLD_VERSION(ret, name, params, args)                   \
  extern "C" ret fmoe_old_##name params;                            \
  __asm__(".symver fmoe_old_" #name "," #name "@" FMOE_GLIBC_BASE); \
  extern "C" __attribute__((visibility("hidden"))) ret __wrap_##name params { return fmoe_old_##name args; }

FMOE_OLD_VERSION(void*, dlopen, (const char* file, int mode), (file, mode))
FMOE_OLD_VERSION(void*, dlsym, (void* handle, const char* name), (handle, name))
FMOE_OLD_VERSION(int, dladdr, (const void* addr, Dl_info* info), (addr, info))
FMOE_OLD_VERSION(char*, dlerror, (), ())
FMOE_OLD_VERSION(int, pthread_create, (pthread_t * t, const pthread_attr_t* attr, void* (*fn)(void*), void* arg),
                 (t, attr, fn, arg))
FMOE_OLD_VERSION(int, pthread_join, (pthread_t t, void** ret), (t, ret))
FMOE_OLD_VERSION(int, pthread_detach, (pthread_t t), (t))
FMOE_OLD_VERSION(int, pthread_once, (pthread_once_t * once, void (*fn)()), (once, fn))
FMOE_OLD_VERSION(int, pthread_mutex_trylock, (pthread_mutex_t * m), (m))  // the pool's lock_spinning
FMOE_OLD_VERSION(int, pthread_key_create, (pthread_key_t * key, void (*fn)(void*)), (key, fn))
FMOE_OLD_VERSION(int, __pthread_key_create, (pthread_key_t * key, void (*fn)(void*)), (key, fn))
FMOE_OLD_VERSION(int, pthread_key_delete, (pthread_key_t key), (key))
FMOE_OLD_VERSION(void*, pthread_getspecific, (pthread_key_t key), (key))
FMOE_OLD_VERSION(int, pthread_setspecific, (pthread_key_t key, const void* v), (key, v))
FMOE_OLD_VERSION(double, exp, (double x), (x))
FMOE_OLD_VERSION(double, log, (double x), (x))
FMOE_OLD_VERSION(double, pow, (double x, double y), (x, y))

// fstat and fstat64 became symbols in 2.33 (before, inline calls of __fxstat, whose first argument
// differs between architectures). On both 64-bit targets glibc's struct stat and stat64 are the kernel's
// struct stat, so the system call fills them as they are.
extern "C" __attribute__((visibility("hidden"))) int __wrap_fstat(int fd, struct stat* st) {
  return int(syscall(SYS_fstat, fd, st));
}
extern "C" __attribute__((visibility("hidden"))) int __wrap_fstat64(int fd, struct stat64* st) {
  return int(syscall(SYS_fstat, fd, st));
}

// libstdc++'s std::random_device; getentropy is 2.25.
extern "C" __attribute__((visibility("hidden"))) uint32_t __wrap_arc4random() {
  uint32_t v = 0;
  if (getentropy(&v, sizeof v) != 0) {
    // Kernels before 3.17 lack getrandom: read the device instead.
    FILE* f = std::fopen("/dev/urandom", "rb");
    const bool ok = f && std::fread(&v, sizeof v, 1, f) == 1;
    if (f) std::fclose(f);
    if (!ok) std::perror("fused-moe: no source of random bytes");
  }
  return v;
}

// glibc 2.32's flag that lets libstdc++ skip atomics while a process has one thread. Zero here: always
// use them, which is right for any process.
extern "C" {
__attribute__((visibility("hidden"))) char __wrap___libc_single_threaded = 0;
}
#endif
