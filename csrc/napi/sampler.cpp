// NativeSampler: the JS handle of one generation's sampler (csrc/cpu/sampler.h; greedy draws read the
// logits where they are); sampleBatch(), one draw for each of several samplers (a step's streams, spread
// over the pool's threads when it is free: sampler.h sample_all), and sampleBatchAsync(), the same off
// the JavaScript thread for batches of milliseconds; logSoftmaxStats(), what log probabilities need.
// Conversion only: lib/generate/sampling.ts checks the parameters first.
#include "../cpu/sampler.h"

#include <napi.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "addon_data.h"
#include "convert.h"

namespace fmoe_napi {
namespace {

class NativeSampler : public Napi::ObjectWrap<NativeSampler> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "NativeSampler",
                       {InstanceMethod<&NativeSampler::Sample>("sample"),
                        InstanceAccessor<&NativeSampler::PlainGreedy>("plainGreedy")});
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

  // The tokens added since the sampler's last draw (all of them after a clear).
  void add_tokens(const int32_t* history, size_t nh, bool clear_history, const int32_t* output, size_t no,
                  bool clear_output) {
    if (clear_history) sampler_->clear_history();
    sampler_->add_history(history, int64_t(nh));
    if (clear_output) sampler_->clear_output();
    sampler_->add_output(output, int64_t(no));
  }
  fmoe::TokenSampler* native() const { return sampler_.get(); }
  // A sampler in a batch that draws off the JavaScript thread (sampleBatchAsync) takes no other draw
  // until that batch settles. Only the JavaScript thread reads or sets it.
  void set_busy(bool busy) { busy_ = busy; }
  void check_idle(Napi::Env env) const {
    if (busy_) throw Napi::Error::New(env, "this sampler is drawing in a batch that has not settled");
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
    check_idle(env);
    return native_call(env, "draw a token", [&] {
      add_tokens(history, nh, info[2].ToBoolean(), output, no, info[4].ToBoolean());
      return Napi::Number::New(env, double(sampler_->sample(logits, int64_t(V), allowed)));
    });
  }

  // Whether a draw is the plain argmax of its logits (sampler.h plain_greedy).
  Napi::Value PlainGreedy(const Napi::CallbackInfo& info) {
    return Napi::Boolean::New(info.Env(), sampler_->plain_greedy());
  }

  std::unique_ptr<fmoe::TokenSampler> sampler_;
  bool busy_ = false;
};

// A batch of draws as read from JavaScript: each draw, and what its sampler is to add before it.
struct DrawBatch {
  struct Added {
    NativeSampler* owner;
    const int32_t *history, *output;
    size_t nh, no;
    bool clear_history, clear_output;
  };
  std::vector<fmoe::BatchDraw> draws;
  std::vector<Added> added;

  // Adds each sampler's new tokens, then draws (sampler.h sample_all).
  void run() {
    for (const Added& a : added) a.owner->add_tokens(a.history, a.nh, a.clear_history, a.output, a.no, a.clear_output);
    fmoe::sample_all(draws.data(), int64_t(draws.size()));
  }

  // Each draw's token, or its error.
  Napi::Array results(Napi::Env env) const {
    Napi::Array out = Napi::Array::New(env, draws.size());
    for (uint32_t i = 0; i < draws.size(); i++) {
      if (!draws[i].error) {
        out.Set(i, Napi::Number::New(env, double(draws[i].token)));
        continue;
      }
      NativeFailure f;
      try {
        std::rethrow_exception(draws[i].error);
      } catch (...) {
        f = current_failure("draw a token");
      }
      out.Set(i, make_moe_error(env, f.code, f.message).Value());
    }
    return out;
  }
};

// Reads and checks every entry of info[0] before any sampler changes: a bad entry leaves them all as they
// were. keep (where given) gets a reference to each value the draws read, for a draw off this thread.
DrawBatch read_draws(const Napi::CallbackInfo& info, std::vector<Napi::Reference<Napi::Value>>* keep) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsArray()) throw Napi::TypeError::New(env, "draws must be an array");
  Napi::Array list = info[0].As<Napi::Array>();
  const uint32_t n = list.Length();
  AddonData* data = env.GetInstanceData<AddonData>();
  DrawBatch b;
  b.draws.resize(n);
  b.added.resize(n);
  for (uint32_t i = 0; i < n; i++) {
    const std::string at = "draws[" + std::to_string(i) + "]";
    Napi::Value v = list.Get(i);
    if (!v.IsArray() || v.As<Napi::Array>().Length() < 6)
      throw Napi::TypeError::New(env, at + " must be [sampler, logits, history, clearHistory, output, clearOutput]");
    Napi::Array e = v.As<Napi::Array>();
    Napi::Value s = e.Get(0u);
    if (!s.IsObject() || !s.As<Napi::Object>().InstanceOf(data->sampler_ctor.Value()))
      throw Napi::TypeError::New(env, at + "[0] must be a NativeSampler");
    DrawBatch::Added& a = b.added[i];
    a.owner = NativeSampler::Unwrap(s.As<Napi::Object>());
    a.owner->check_idle(env);
    for (uint32_t j = 0; j < i; j++)
      if (b.added[j].owner == a.owner)
        throw Napi::RangeError::New(env, at + "[0]: a sampler draws at most once a batch");
    fmoe::BatchDraw& d = b.draws[i];
    size_t V = 0;
    d.logits = static_cast<const float*>(typed_data_any(e.Get(1u), napi_float32_array, &V, at + ".logits"));
    if (V == 0) throw Napi::RangeError::New(env, at + ".logits must not be empty");
    d.vocab = int64_t(V);
    a.history = static_cast<const int32_t*>(typed_data_any(e.Get(2u), napi_int32_array, &a.nh, at + ".history"));
    a.clear_history = e.Get(3u).ToBoolean();
    a.output = static_cast<const int32_t*>(typed_data_any(e.Get(4u), napi_int32_array, &a.no, at + ".output"));
    a.clear_output = e.Get(5u).ToBoolean();
    Napi::Value allowed = e.Get(6u);
    if (!allowed.IsUndefined())
      d.allowed = static_cast<const uint8_t*>(typed_data(allowed, napi_uint8_array, V, at + ".allowed"));
    d.sampler = a.owner->native();
    if (keep)  // the sampler and the arrays (the flags are read already)
      for (uint32_t k : {0u, 1u, 2u, 4u, 6u})
        if (e.Get(k).IsObject()) keep->push_back(Napi::Persistent(e.Get(k)));
  }
  return b;
}

// (draws: [sampler: NativeSampler, logits: Float32Array, history: Int32Array, clearHistory: boolean, output:
// Int32Array, clearOutput: boolean, allowed?: Uint8Array][]) -> (number | Error)[]: each draw's token as
// sample() gives it (-1: no token can be drawn), or the error of that draw. Every sampler at most once.
Napi::Value SampleBatch(const Napi::CallbackInfo& info) {
  DrawBatch b = read_draws(info, nullptr);
  native_call(info.Env(), "draw tokens", [&] { b.run(); });
  return b.results(info.Env());
}

// sampleBatchAsync(draws) -> Promise<(number | Error)[]>: the same on a libuv thread, for batches long
// enough to hold the event loop (milliseconds: many streams over a large vocabulary). Its samplers
// refuse other draws until it settles; the values it reads are held until then.
class DrawWorker : public Napi::AsyncWorker {
 public:
  DrawWorker(Napi::Env env, DrawBatch batch, std::vector<Napi::Reference<Napi::Value>> keep)
      : Napi::AsyncWorker(env, "fused-moe:draw"),
        deferred_(Napi::Promise::Deferred::New(env)),
        batch_(std::move(batch)),
        keep_(std::move(keep)) {
    for (const DrawBatch::Added& a : batch_.added) a.owner->set_busy(true);
  }
  Napi::Promise promise() const { return deferred_.Promise(); }

 protected:
  void Execute() override {
    try {
      batch_.run();
    } catch (...) {
      failure_ = current_failure("draw tokens");
      SetError(failure_.message);
    }
  }
  void OnOK() override {
    release();
    deferred_.Resolve(batch_.results(Env()));
  }
  void OnError(const Napi::Error&) override {
    release();
    deferred_.Reject(make_moe_error(Env(), failure_.code, failure_.message).Value());
  }

 private:
  void release() {
    for (const DrawBatch::Added& a : batch_.added) a.owner->set_busy(false);
  }
  Napi::Promise::Deferred deferred_;
  DrawBatch batch_;
  std::vector<Napi::Reference<Napi::Value>> keep_;
  NativeFailure failure_{fmoe::ErrorCode::Internal, ""};
};

Napi::Value SampleBatchAsync(const Napi::CallbackInfo& info) {
  std::vector<Napi::Reference<Napi::Value>> keep;
  DrawBatch b = read_draws(info, &keep);
  auto* w = new DrawWorker(info.Env(), std::move(b), std::move(keep));
  Napi::Promise p = w->promise();
  w->Queue();
  return p;
}

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
  Napi::Function sampler = NativeSampler::Init(env);
  env.GetInstanceData<AddonData>()->sampler_ctor = Napi::Persistent(sampler);
  exports.Set("NativeSampler", sampler);
  exports.Set("sampleBatch", Napi::Function::New(env, SampleBatch, "sampleBatch"));
  exports.Set("sampleBatchAsync", Napi::Function::New(env, SampleBatchAsync, "sampleBatchAsync"));
  exports.Set("logSoftmaxStats", Napi::Function::New(env, LogSoftmaxStats, "logSoftmaxStats"));
}

}  // namespace fmoe_napi
