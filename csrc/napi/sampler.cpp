// NativeSampler: the JS handle of one generation's sampler (csrc/cpu/sampler.h; greedy draws read the
// logits where they are); logSoftmaxStats(), what log probabilities need. Conversion only: lib/generate/sampling.ts
// checks the parameters first. Draws run on the calling (JavaScript) thread: a fraction of a millisecond each, and the
// step loop needs them at once.
#include "../cpu/sampler.h"

#include <napi.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "convert.h"

namespace fmoe_napi {
namespace {

class NativeSampler : public Napi::ObjectWrap<NativeSampler> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "NativeSampler", {InstanceMethod<&NativeSampler::Sample>("sample")});
  }

  // (params: { temperature, topK, topP, minP, repetitionPenalty, presencePenalty, frequencyPenalty, seed,
  // biasIds?: Int32Array, biasValues?: Float64Array })
  explicit NativeSampler(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeSampler>(info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "params must be an object");
    Napi::Object o = info[0].As<Napi::Object>();
    fmoe::SamplerParams p;
    p.temperature = get_number(o, "temperature", 1, "params.");
    p.top_k = get_int(o, "topK", 0);
    p.top_p = get_number(o, "topP", 1, "params.");
    p.min_p = get_number(o, "minP", 0, "params.");
    p.repetition_penalty = get_number(o, "repetitionPenalty", 1, "params.");
    p.presence_penalty = get_number(o, "presencePenalty", 0, "params.");
    p.frequency_penalty = get_number(o, "frequencyPenalty", 0, "params.");
    p.seed = get_number(o, "seed", 0, "params.");
    if (!(p.temperature >= 0 && std::isfinite(p.temperature)) || p.top_k < 0 || !(p.top_p > 0 && p.top_p <= 1) ||
        !(p.min_p >= 0 && p.min_p <= 1) || !(p.repetition_penalty > 0 && std::isfinite(p.repetition_penalty)) ||
        !std::isfinite(p.presence_penalty) || !std::isfinite(p.frequency_penalty) ||
        !(p.seed >= 0 && p.seed <= 9007199254740991.0 && p.seed == std::floor(p.seed)))
      throw Napi::RangeError::New(env, "params: a sampling parameter is out of its range");
    if (!o.Get("biasIds").IsUndefined()) {
      size_t n = 0, m = 0;
      const int32_t* ids =
          static_cast<const int32_t*>(typed_data_any(o.Get("biasIds"), napi_int32_array, &n, "params.biasIds"));
      const double* values =
          static_cast<const double*>(typed_data_any(o.Get("biasValues"), napi_float64_array, &m, "params.biasValues"));
      if (n != m) throw Napi::RangeError::New(env, "params.biasIds and params.biasValues must have the same length");
      for (size_t i = 0; i < n; i++) {
        if (!std::isfinite(values[i])) throw Napi::RangeError::New(env, "params.biasValues must be finite");
        p.bias.emplace_back(ids[i], values[i]);
      }
    }
    sampler_ = std::make_unique<fmoe::TokenSampler>(p);
  }

 private:
  // (logits: Float32Array, history: Int32Array, clearHistory: boolean, output: Int32Array, clearOutput:
  // boolean, allowed?: Uint8Array) -> token, or -1 when no token can be drawn. history and output are the
  // tokens added since the last draw (all of them after a clear).
  Napi::Value Sample(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    size_t V = 0, nh = 0, no = 0;
    const float* logits = static_cast<const float*>(typed_data_any(info[0], napi_float32_array, &V, "logits"));
    const int32_t* history = static_cast<const int32_t*>(typed_data_any(info[1], napi_int32_array, &nh, "history"));
    const int32_t* output = static_cast<const int32_t*>(typed_data_any(info[3], napi_int32_array, &no, "output"));
    const uint8_t* allowed = nullptr;
    if (info.Length() > 5 && !info[5].IsUndefined())
      allowed = static_cast<const uint8_t*>(typed_data(info[5], napi_uint8_array, V, "allowed"));
    if (V == 0) throw Napi::RangeError::New(env, "logits must not be empty");
    return native_call(env, "draw a token", [&] {
      if (info[2].ToBoolean()) sampler_->clear_history();
      sampler_->add_history(history, int64_t(nh));
      if (info[4].ToBoolean()) sampler_->clear_output();
      sampler_->add_output(output, int64_t(no));
      return Napi::Number::New(env, double(sampler_->sample(logits, int64_t(V), allowed)));
    });
  }

  std::unique_ptr<fmoe::TokenSampler> sampler_;
};

// (logits: Float32Array, top: number) -> Float64Array [log-sum-exp of the logits, then the ids of the
// `top` largest, largest first] (sampler.h log_sum_exp, top_ids).
Napi::Value LogSoftmaxStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t V = 0;
  const float* logits = static_cast<const float*>(typed_data_any(info[0], napi_float32_array, &V, "logits"));
  if (!info[1].IsNumber()) throw Napi::TypeError::New(env, "top must be a number");
  const double top = info[1].As<Napi::Number>().DoubleValue();
  if (!(top >= 0 && top <= 1024 && top == std::floor(top)))
    throw Napi::RangeError::New(env, "top must be an integer in [0, 1024]");
  std::vector<int32_t> ids(static_cast<size_t>(top));
  const int64_t m = fmoe::top_ids(logits, int64_t(V), int64_t(top), ids.data());
  Napi::Float64Array out = Napi::Float64Array::New(env, size_t(m) + 1);
  out[0] = fmoe::log_sum_exp(logits, int64_t(V));
  for (int64_t i = 0; i < m; i++) out[size_t(i) + 1] = ids[size_t(i)];
  return out;
}

}  // namespace

void register_sampler(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeSampler", NativeSampler::Init(env));
  exports.Set("logSoftmaxStats", Napi::Function::New(env, LogSoftmaxStats, "logSoftmaxStats"));
}

}  // namespace fmoe_napi
