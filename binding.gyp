{
  # The CPU addon, built from source by node-gyp when no prebuilt binary fits. Each SIMD kernel set is
  # its own static library with its own flags; everything else targets baseline x86-64 (or arm64), so
  # the binary loads on any CPU of its architecture and picks kernels at run time.
  # The source lists live in csrc/sources.gypi, which CMakeLists.txt reads too: add a file there once.
  # FUSED_MOE_GLIBC_FLOOR=1 (set by scripts/prebuild.js) links the prebuilt binary so that it loads on
  # glibc 2.28: see csrc/platform/glibc_floor.cpp.
  "includes": ["csrc/sources.gypi", "csrc/platform/glibc_floor.gypi"],
  "variables": {
    "fmoe_glibc_floor%": "<!(node -p \"process.env.FUSED_MOE_GLIBC_FLOOR === '1' ? 1 : 0\")",
    "fmoe_cflags": ["-O3", "-fno-math-errno", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]
  },
  "target_defaults": {
    "cflags_cc": ["-std=c++17", "-fexceptions", "<@(fmoe_cflags)"],
    "cflags_cc!": ["-fno-exceptions", "-std=gnu++17", "-std=gnu++20"],
    "xcode_settings": {
      "GCC_ENABLE_CPP_EXCEPTIONS": "YES",
      "CLANG_CXX_LANGUAGE_STANDARD": "c++17",
      "OTHER_CPLUSPLUSFLAGS": ["-O3", "-fno-math-errno"]
    }
  },
  "targets": [
    {
      # The portable kernel sets, unfused (attention_scalar.cpp says why).
      "target_name": "fmoe_kernels_portable",
      "type": "static_library",
      "sources": ["<@(fmoe_portable_sources)"],
      "cflags_cc": ["-ffp-contract=off"],
      "xcode_settings": {"OTHER_CPLUSPLUSFLAGS": ["-O3", "-fno-math-errno", "-ffp-contract=off"]}
    },
    {
      "target_name": "fmoe_kernels_avx2",
      "type": "static_library",
      "sources": ["<@(fmoe_avx2_sources)"],
      "conditions": [["target_arch=='x64'", {"cflags_cc": ["-mavx2", "-mfma", "-mf16c"]}]]
    },
    {
      "target_name": "fmoe_kernels_avx512",
      "type": "static_library",
      "sources": ["<@(fmoe_avx512_sources)"],
      "conditions": [["target_arch=='x64'", {"cflags_cc": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-Wno-maybe-uninitialized"]}]]
    },
    {
      "target_name": "fmoe_kernels_avx512bf16",
      "type": "static_library",
      "sources": ["<@(fmoe_avx512bf16_sources)"],
      "conditions": [["target_arch=='x64'", {"cflags_cc": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mavx512vnni", "-mgfni", "-Wno-maybe-uninitialized"]}]]
    },
    {
      "target_name": "fmoe_kernels_neon",
      "type": "static_library",
      "sources": ["<@(fmoe_neon_sources)"]
    },
    {
      "target_name": "fused_moe",
      "dependencies": ["fmoe_kernels_portable", "fmoe_kernels_avx2", "fmoe_kernels_avx512", "fmoe_kernels_avx512bf16", "fmoe_kernels_neon"],
      "sources": ["<@(fmoe_core_sources)", "<@(fmoe_cpu_sources)", "<@(fmoe_cuda_host_sources)",
                  "<@(fmoe_probe_sources)", "<@(fmoe_napi_sources)"],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": ["NAPI_VERSION=8", "NODE_ADDON_API_DISABLE_DEPRECATED", "NAPI_CPP_EXCEPTIONS", "NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS"],
      "libraries": ["-ldl", "-lpthread"],
      "conditions": [["OS=='linux' and fmoe_glibc_floor==1", {
        "sources": ["<@(fmoe_glibc_floor_sources)"],
        "ldflags": ["<@(fmoe_glibc_floor_ldflags)"]
      }]]
    }
  ]
}
