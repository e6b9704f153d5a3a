// Benchmark-only helpers exported as `bench`: machine ceilings measured in the bench's own process.
#include <napi.h>

#include "../cpu/probes.h"

namespace fmoe_napi {

static Napi::Value ReadBandwidth(const Napi::CallbackInfo& info) {
  const double bytes = info[0].As<Napi::Number>().DoubleValue();
  const int threads = info[1].As<Napi::Number>().Int32Value();
  return Napi::Number::New(info.Env(), fmoe::probe_read_bandwidth(size_t(bytes), threads));
}

static Napi::Value FmaPeak(const Napi::CallbackInfo& info) {
  const int isa = info[0].As<Napi::Number>().Int32Value();
  const int threads = info[1].As<Napi::Number>().Int32Value();
  return Napi::Number::New(info.Env(), fmoe::probe_fma_peak(fmoe::Isa(isa), threads));
}

void register_bench_probes(Napi::Env env, Napi::Object exports) {
  Napi::Object bench = Napi::Object::New(env);
  bench.Set("readBandwidth", Napi::Function::New(env, ReadBandwidth, "readBandwidth"));
  bench.Set("fmaPeak", Napi::Function::New(env, FmaPeak, "fmaPeak"));
  exports.Set("bench", bench);
}

}  // namespace fmoe_napi
