// Benchmark and test helpers exported as `binding.bench`, not part of the package API: machine ceilings
// measured in the bench's own process, and the load-time quantizer on its own (the tests check it bit
// for bit against hand-made groups).
#include <napi.h>

#include <string>
#include <vector>

#include "../core/quant.h"
#include "../core/thread_pool.h"
#include "../core/timeline.h"
#include "../cpu/attention.h"
#include "../cpu/kernels.h"
#include "../cpu/sampler.h"
#include "probes.h"

namespace fmoe_napi {

static Napi::Value ReadBandwidth(const Napi::CallbackInfo& info) {
  const double bytes = info[0].As<Napi::Number>().DoubleValue();
  const int threads = info[1].As<Napi::Number>().Int32Value();
  return Napi::Number::New(info.Env(), fmoe::probe_read_bandwidth(size_t(bytes), threads));
}

// (bytes, threads) -> Float64Array: each read pattern's GB/s (readBandwidth gives the highest).
static Napi::Value ReadPatterns(const Napi::CallbackInfo& info) {
  const double bytes = info[0].As<Napi::Number>().DoubleValue();
  const int threads = info[1].As<Napi::Number>().Int32Value();
  std::vector<double> rates;
  fmoe::probe_read_bandwidth(size_t(bytes), threads, &rates);
  Napi::Float64Array out = Napi::Float64Array::New(info.Env(), rates.size());
  for (size_t i = 0; i < rates.size(); i++) out[i] = rates[i];
  return out;
}

static Napi::Value FmaPeak(const Napi::CallbackInfo& info) {
  const int isa = info[0].As<Napi::Number>().Int32Value();
  const int threads = info[1].As<Napi::Number>().Int32Value();
  return Napi::Number::New(info.Env(), fmoe::probe_fma_peak(fmoe::Isa(isa), threads));
}

static Napi::Value Int8DotPeak(const Napi::CallbackInfo& info) {
  const int threads = info[0].As<Napi::Number>().Int32Value();
  const int group = info.Length() > 1 && info[1].IsNumber() ? info[1].As<Napi::Number>().Int32Value() : 0;
  return Napi::Number::New(info.Env(), fmoe::probe_int8_dot_peak(threads, group));
}

// (values: Float32Array [rows, K], K, 'int8' | 'int4', group) -> { scales: Float32Array [rows, ceil(K/group)],
// codes: Int8Array [rows, K] }: quant.h's groups along each row.
static Napi::Value Quantize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[0].IsTypedArray() ||
      info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw Napi::TypeError::New(env, "quantize(values: Float32Array, K, 'int8' | 'int4', group)");
  Napi::Float32Array v = info[0].As<Napi::Float32Array>();
  const int64_t K = info[1].As<Napi::Number>().Int64Value();
  const std::string bits = info[2].As<Napi::String>().Utf8Value();
  const int64_t g = info[3].As<Napi::Number>().Int64Value();
  if (K <= 0 || int64_t(v.ElementLength()) % K != 0) throw Napi::RangeError::New(env, "K must divide values.length");
  if (bits != "int8" && bits != "int4") throw Napi::RangeError::New(env, "bits must be 'int8' or 'int4'");
  if (!fmoe::quant_group_ok(g)) throw Napi::RangeError::New(env, "group must be one of binding.limits.quantGroupSizes");
  const int qmax = fmoe::quant_qmax(bits == "int8" ? fmoe::Quant::Int8 : fmoe::Quant::Int4);
  const int64_t rows = int64_t(v.ElementLength()) / K, ng = (K + g - 1) / g;
  Napi::Float32Array scales = Napi::Float32Array::New(env, size_t(rows * ng));
  Napi::Int8Array codes = Napi::Int8Array::New(env, size_t(rows * K));
  for (int64_t r = 0; r < rows; r++)
    for (int64_t i = 0; i < ng; i++) {
      const int64_t k0 = i * g, n = K - k0 < g ? K - k0 : g;
      scales[size_t(r * ng + i)] = fmoe::quantize_group(v.Data() + r * K + k0, n, qmax, codes.Data() + r * K + k0);
    }
  Napi::Object out = Napi::Object::New(env);
  out.Set("scales", scales);
  out.Set("codes", codes);
  return out;
}

// setTuning(name, value) -> the previous value. 'shortPanelBytes': kernels.h short_panel_bytes();
// 'decodeStreams' (0 or 1): kernels.h decode_streams(); 'tilePanels' (1 to 64): kernels.h tile_panels();
// 'attentionPrefetch', 'attentionInPlace' (0 or 1): attention.h attention_prefetch(), attention_in_place();
// 'attentionSpan' (1 to kMaxSpanBlocks): attention.h attention_span_blocks(); 'spinUs' (0 to 10000):
// thread_pool.h ThreadPool::spin_setting(); 'spreadDraws' (0 or 1): sampler.h spread_draws().
static Napi::Value SetTuning(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsNumber())
    throw Napi::TypeError::New(env, "setTuning(name: string, value: number)");
  const std::string name = info[0].As<Napi::String>().Utf8Value();
  const double value = info[1].As<Napi::Number>().DoubleValue();
  if (name == "spreadDraws") return Napi::Number::New(env, fmoe::spread_draws().exchange(value != 0 ? 1 : 0));
  if (name == "decodeStreams") return Napi::Number::New(env, fmoe::decode_streams().exchange(value != 0 ? 1 : 0));
  if (name == "attentionPrefetch")
    return Napi::Number::New(env, fmoe::attention_prefetch().exchange(value != 0 ? 1 : 0));
  if (name == "attentionInPlace")
    return Napi::Number::New(env, fmoe::attention_in_place().exchange(value != 0 ? 1 : 0));
  if (name == "attentionSpan") {
    if (!(value >= 1 && value <= fmoe::kMaxSpanBlocks && value == double(int(value))))
      throw Napi::RangeError::New(
          env, "setTuning: attentionSpan must be an integer from 1 to " + std::to_string(fmoe::kMaxSpanBlocks));
    return Napi::Number::New(env, fmoe::attention_span_blocks().exchange(int(value)));
  }
  if (name == "spinUs") {
    if (!(value >= 0 && value <= 10000 && value == double(int(value))))
      throw Napi::RangeError::New(env, "setTuning: spinUs must be an integer from 0 to 10000");
    return Napi::Number::New(env, fmoe::ThreadPool::spin_setting().exchange(int(value)));
  }
  if (name == "tilePanels") {
    if (!(value >= 1 && value <= 64 && value == double(int(value))))
      throw Napi::RangeError::New(env, "setTuning: tilePanels must be an integer from 1 to 64");
    return Napi::Number::New(env, fmoe::tile_panels().exchange(int(value)));
  }
  if (name != "shortPanelBytes")
    throw Napi::RangeError::New(
        env,
        "setTuning: name must be 'shortPanelBytes', 'decodeStreams', 'tilePanels', 'attentionPrefetch', "
        "'attentionInPlace', 'attentionSpan', 'spinUs' or 'spreadDraws'");
  if (!(value >= 0 && value <= double(1ull << 40)))
    throw Napi::RangeError::New(env, "setTuning: value must be a byte count from 0 to 2^40");
  return Napi::Number::New(env, double(fmoe::short_panel_bytes().exchange(size_t(value))));
}

// timeline('start', capacity): records the pool's jobs, items and step phases (timeline.h), at most
// `capacity` events a thread. timeline('stop') -> { events: Float64Array, 6 numbers an event (t0 and t1
// in steady-clock ns, kind, thread, tag, bytes), in order of t0; dropped: events past the capacity }.
static Napi::Value Timeline(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string action = info.Length() > 0 && info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "";
  if (action == "start") {
    const double capacity = info.Length() > 1 && info[1].IsNumber() ? info[1].As<Napi::Number>().DoubleValue() : -1;
    if (!(capacity >= 1 && capacity <= 1e8 && capacity == double(int64_t(capacity))))
      throw Napi::RangeError::New(env, "timeline: capacity must be an integer from 1 to 1e8");
    fmoe::timeline::start(size_t(capacity));
    return env.Undefined();
  }
  if (action != "stop") throw Napi::TypeError::New(env, "timeline('start', capacity) or timeline('stop')");
  size_t dropped = 0;
  const std::vector<fmoe::timeline::Event> events = fmoe::timeline::stop(&dropped);
  Napi::Float64Array out = Napi::Float64Array::New(env, events.size() * 6);
  for (size_t i = 0; i < events.size(); i++) {
    const fmoe::timeline::Event& e = events[i];
    const double row[6] = {double(e.t0),     double(e.t1),  double(e.kind),
                           double(e.thread), double(e.tag), double(e.bytes)};
    for (int j = 0; j < 6; j++) out[i * 6 + size_t(j)] = row[j];
  }
  Napi::Object result = Napi::Object::New(env);
  result.Set("events", out);
  result.Set("dropped", Napi::Number::New(env, double(dropped)));
  return result;
}

void register_bench(Napi::Env env, Napi::Object exports) {
  Napi::Object bench = Napi::Object::New(env);
  bench.Set("readBandwidth", Napi::Function::New(env, ReadBandwidth, "readBandwidth"));
  bench.Set("readPatterns", Napi::Function::New(env, ReadPatterns, "readPatterns"));
  bench.Set("fmaPeak", Napi::Function::New(env, FmaPeak, "fmaPeak"));
  bench.Set("int8DotPeak", Napi::Function::New(env, Int8DotPeak, "int8DotPeak"));
  bench.Set("quantize", Napi::Function::New(env, Quantize, "quantize"));
  bench.Set("setTuning", Napi::Function::New(env, SetTuning, "setTuning"));
  bench.Set("timeline", Napi::Function::New(env, Timeline, "timeline"));
  exports.Set("bench", bench);
}

}  // namespace fmoe_napi
