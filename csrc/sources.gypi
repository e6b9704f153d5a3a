{
  "variables": {
    "fmoe_core_sources": [
      "csrc/core/config.cpp",
      "csrc/core/routing.cpp",
      "csrc/core/dispatch.cpp",
      "csrc/core/thread_pool.cpp",
      "csrc/core/memory.cpp",
      "csrc/core/backend_factory.cpp",
      "csrc/core/kv_blocks.cpp",
      "csrc/core/timeline.cpp"
    ],
    "fmoe_cpu_sources": [
      "csrc/cpu/packing.cpp",
      "csrc/cpu/isa_select.cpp",
      "csrc/cpu/cpu_backend.cpp",
      "csrc/cpu/linear.cpp",
      "csrc/cpu/attention.cpp",
      "csrc/cpu/decoder_ops.cpp",
      "csrc/cpu/sampler.cpp",
      "csrc/cpu/cpu_decoder.cpp"
    ],
    "fmoe_cuda_host_sources": [
      "csrc/cuda/host/cuda_backend.cpp"
    ],
    "fmoe_probe_sources": [
      "csrc/probes/probes.cpp"
    ],
    "fmoe_portable_sources": ["csrc/cpu/kernels_scalar.cpp", "csrc/cpu/attention_scalar.cpp"],
    "fmoe_avx2_sources": ["csrc/cpu/kernels_avx2.cpp", "csrc/cpu/attention_avx2.cpp"],
    "fmoe_avx512_sources": ["csrc/cpu/kernels_avx512.cpp", "csrc/cpu/attention_avx512.cpp"],
    "fmoe_avx512bf16_sources": ["csrc/cpu/kernels_avx512bf16.cpp"],
    "fmoe_neon_sources": ["csrc/cpu/kernels_neon.cpp", "csrc/cpu/attention_neon.cpp"],
    "fmoe_napi_sources": [
      "csrc/napi/convert.cpp",
      "csrc/napi/layer.cpp",
      "csrc/napi/model.cpp",
      "csrc/napi/addon.cpp",
      "csrc/napi/mmap.cpp",
      "csrc/napi/sampler.cpp",
      "csrc/probes/bench_binding.cpp"
    ]
  }
}
