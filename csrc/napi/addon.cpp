// Module registration: classes, backendInfo(), and the core's limits and enum names. No math here.
#include <napi.h>

#include "../core/error.h"
#include "../core/options.h"
#include "../core/thread_pool.h"
#include "../cpu/kernels.h"
#include "../cuda/host/cuda_backend.h"
#include "addon_data.h"
#include "convert.h"
#include "layer.h"
#include "model.h"

namespace fmoe_napi {

// Benchmark support (csrc/probes), exported as `bench`: not part of the package API.
void register_bench(Napi::Env env, Napi::Object exports);
void register_mmap(Napi::Env env, Napi::Object exports);
void register_sampler(Napi::Env env, Napi::Object exports);

// -> { cpu: { isa, int8Activations, int4Activations, threads, supported, error? }, cuda: { available, reason, library,
// driverVersion, runtimeVersion, devices } }
static Napi::Value BackendInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object cpu = Napi::Object::New(env);
  try {
    const fmoe::KernelSet* ks = fmoe::select_kernels();
    cpu.Set("isa", ks->name);
    cpu.Set("int8Activations", ks->int8_activations);
    cpu.Set("int4Activations", ks->int4_activations);
  } catch (const fmoe::MoeException& e) {
    cpu.Set("isa", env.Null());
    cpu.Set("int8Activations", env.Null());
    cpu.Set("int4Activations", env.Null());
    cpu.Set("error", e.what());
  }
  cpu.Set("threads", fmoe::ThreadPool::default_threads());
  Napi::Array supported = Napi::Array::New(env);
  uint32_t n = 0;
  for (fmoe::Isa isa : {fmoe::Isa::Scalar, fmoe::Isa::Avx2, fmoe::Isa::Avx512, fmoe::Isa::Avx512Bf16, fmoe::Isa::Neon})
    if (fmoe::kernels_for(isa)) supported.Set(n++, fmoe::isa_name(isa));
  cpu.Set("supported", supported);

  const fmoe::CudaStatus& s = fmoe::cuda_status();
  Napi::Object cuda = Napi::Object::New(env);
  cuda.Set("available", s.available);
  cuda.Set("reason", s.available ? env.Null() : Napi::String::New(env, s.reason));
  cuda.Set("library", s.library_path.empty() ? env.Null() : Napi::String::New(env, s.library_path));
  cuda.Set("driverVersion", s.driver_version);
  cuda.Set("runtimeVersion", s.runtime_version);
  Napi::Array devices = Napi::Array::New(env, s.devices.size());
  for (size_t i = 0; i < s.devices.size(); i++) {
    Napi::Object d = Napi::Object::New(env);
    d.Set("name", s.devices[i].name);
    d.Set("totalMemory", double(s.devices[i].total_memory));
    d.Set("computeCapability", std::to_string(s.devices[i].major) + "." + std::to_string(s.devices[i].minor));
    d.Set("multiprocessors", s.devices[i].multiprocessors);
    devices.Set(uint32_t(i), d);
  }
  cuda.Set("devices", devices);

  Napi::Object result = Napi::Object::New(env);
  result.Set("cpu", cpu);
  result.Set("cuda", cuda);
  return result;
}

template <class E, size_t N>
static Napi::Array names_of(Napi::Env env, const fmoe::EnumName<E> (&table)[N]) {
  Napi::Array a = Napi::Array::New(env, N);
  for (size_t i = 0; i < N; i++) a.Set(uint32_t(i), table[i].name);
  return a;
}

// { maxExperts, maxDim, maxThreads, maxCudaDevice, maxElements, quantGroupSizes, defaultQuantGroupSize }
static Napi::Object Limits(Napi::Env env) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("maxExperts", double(fmoe::kMaxExperts));
  o.Set("maxDim", double(fmoe::kMaxDim));
  o.Set("maxThreads", double(fmoe::kMaxThreads));
  o.Set("maxCudaDevice", double(fmoe::kMaxCudaDevice));
  o.Set("maxElements", double(fmoe::kMaxElements));
  Napi::Array groups = Napi::Array::New(env);
  uint32_t n = 0;
  for (int64_t g : fmoe::kQuantGroupSizes) groups.Set(n++, double(g));
  o.Set("quantGroupSizes", groups);
  o.Set("defaultQuantGroupSize", double(fmoe::kDefaultQuantGroup));
  o.Freeze();
  return o;
}

// { routing, weightDtype, quantize, device, groupScore }: the names of each enum, the default first.
static Napi::Object Enums(Napi::Env env) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("routing", names_of(env, fmoe::kRoutingNames));
  o.Set("weightDtype", names_of(env, fmoe::kDTypeNames));
  o.Set("quantize", names_of(env, fmoe::kQuantNames));
  o.Set("device", names_of(env, fmoe::kDeviceNames));
  o.Set("groupScore", names_of(env, fmoe::kGroupScoreNames));
  o.Freeze();
  return o;
}

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  Napi::Function layer = NativeLayer::Init(env);
  Napi::Function cancel = NativeCancel::Init(env);
  data->layer_ctor = Napi::Persistent(layer);
  data->cancel_ctor = Napi::Persistent(cancel);
  env.SetInstanceData<AddonData>(data);
  exports.Set("NativeLayer", layer);
  exports.Set("NativeCancel", cancel);
  exports.Set("NativeBuilder", NativeBuilder::Init(env));
  exports.Set("NativeModel", NativeModel::Init(env));
  exports.Set("backendInfo", Napi::Function::New(env, BackendInfo, "backendInfo"));
  exports.Set("limits", Limits(env));
  exports.Set("enums", Enums(env));
  register_bench(env, exports);
  register_mmap(env, exports);
  register_sampler(env, exports);
  return exports;
}

}  // namespace fmoe_napi

static Napi::Object InitModule(Napi::Env env, Napi::Object exports) { return fmoe_napi::Init(env, exports); }

NODE_API_MODULE(fused_moe, InitModule)
