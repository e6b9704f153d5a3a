// Run-time choice of the CPU kernel set: cpuid + OS support, or the FUSED_MOE_ISA override.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../core/error.h"
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#elif defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1UL << 1)
#endif
#endif

namespace fmoe {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Scalar:
      return "scalar";
    case Isa::Avx2:
      return "avx2";
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx512Bf16:
      return "avx512bf16";
    case Isa::Neon:
      return "neon";
  }
  return "unknown";
}

#if defined(__x86_64__) || defined(_M_X64)
static uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}
#endif

bool cpu_supports(Isa isa) {
  if (isa == Isa::Scalar) return true;
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29), avx = c & (1u << 28);
  if (!osxsave || !avx) return false;
  const uint64_t xcr0 = xgetbv0();
  const bool ymm_os = (xcr0 & 0x6) == 0x6, zmm_os = (xcr0 & 0xe6) == 0xe6;
  unsigned a7 = 0, b7 = 0, c7 = 0, d7 = 0;
  __cpuid_count(7, 0, a7, b7, c7, d7);
  const bool avx2 = b7 & (1u << 5);
  const bool avx512f = b7 & (1u << 16), avx512bw = b7 & (1u << 30), avx512vl = b7 & (1u << 31),
             avx512dq = b7 & (1u << 17);
  unsigned a71 = 0, b71 = 0, c71 = 0, d71 = 0;
  __cpuid_count(7, 1, a71, b71, c71, d71);
  const bool avx512bf16 = a71 & (1u << 5), avx512vnni = c7 & (1u << 11), gfni = c7 & (1u << 8);
  const bool has_avx2 = ymm_os && avx2 && fma && f16c;
  const bool has_avx512 = has_avx2 && zmm_os && avx512f && avx512bw && avx512vl && avx512dq;
  switch (isa) {
    case Isa::Avx2:
      return has_avx2;
    case Isa::Avx512:
      return has_avx512;
    case Isa::Avx512Bf16:
      return has_avx512 && avx512bf16 && avx512vnni && gfni;
    default:
      return false;
  }
#elif defined(__aarch64__) && defined(__linux__)
  // Advanced SIMD is part of every Linux arm64 CPU profile, but the kernel says so: ask it.
  return isa == Isa::Neon && (getauxval(AT_HWCAP) & HWCAP_ASIMD) != 0;
#elif defined(__aarch64__)
  return isa == Isa::Neon;
#else
  return false;
#endif
}

static const KernelSet* built(Isa isa) {
  switch (isa) {
    case Isa::Scalar:
      return kernels_scalar();
    case Isa::Avx2:
      return kernels_avx2();
    case Isa::Avx512:
      return kernels_avx512();
    case Isa::Avx512Bf16:
      return kernels_avx512bf16();
    case Isa::Neon:
      return kernels_neon();
  }
  return nullptr;
}

const KernelSet* kernels_for(Isa isa) { return cpu_supports(isa) ? built(isa) : nullptr; }

static const KernelSet* choose() {
  const char* forced = std::getenv("FUSED_MOE_ISA");
  if (forced && *forced) {
    for (Isa isa : {Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Neon}) {
      if (std::strcmp(forced, isa_name(isa)) != 0) continue;
      if (const KernelSet* k = kernels_for(isa)) return k;
      fail(ErrorCode::Invalid, std::string("FUSED_MOE_ISA=") + forced +
                                   " cannot run here: this CPU or this build lacks it; use scalar, avx2, avx512, "
                                   "avx512bf16 or neon as the CPU allows, or unset it");
    }
    fail(ErrorCode::Invalid, std::string("FUSED_MOE_ISA=") + forced +
                                 " is not a kernel set; expected scalar, avx2, avx512, avx512bf16 or neon");
  }
  for (Isa isa : {Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Neon})
    if (const KernelSet* k = kernels_for(isa)) return k;
  return kernels_scalar();
}

const KernelSet* select_kernels() {
  // Chosen once (thread-safe static); a bad FUSED_MOE_ISA is reported on every call, never a crash.
  struct Choice {
    const KernelSet* kernels = nullptr;
    std::string error;
  };
  static const Choice choice = [] {
    Choice c;
    try {
      c.kernels = choose();
    } catch (const MoeException& e) {
      c.error = e.what();
    }
    return c;
  }();
  if (!choice.kernels) fail(ErrorCode::Invalid, choice.error);
  return choice.kernels;
}

std::atomic<size_t>& short_panel_bytes() {
  static std::atomic<size_t> bytes{size_t(24) << 10};
  return bytes;
}

std::atomic<int>& decode_streams() {
  static std::atomic<int> on{1};
  return on;
}

std::atomic<int>& tile_panels() {
  static std::atomic<int> panels{8};
  return panels;
}

ActEpoch new_activation_epoch() {
  static std::atomic<ActEpoch> last{kNoActCache};
  return last.fetch_add(1, std::memory_order_relaxed) + 1;  // only uniqueness matters, not order
}

}  // namespace fmoe
