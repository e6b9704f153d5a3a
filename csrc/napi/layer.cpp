#include "layer.h"

#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "../core/error.h"
#include "addon_data.h"
#include "convert.h"

namespace fmoe_napi {

using fmoe::ErrorCode;

// ---- construction ------------------------------------------------------------------------------

static bool get_bool(Napi::Object obj, const char* key, bool fallback) {
  Napi::Value v = obj.Get(key);
  if (v.IsUndefined()) return fallback;
  if (!v.IsBoolean()) throw Napi::TypeError::New(obj.Env(), std::string(key) + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

// The config object -> MoeConfig, names parsed with the core's tables (options.h) and checked by the
// core; a bad value is a RangeError carrying the core's message.
static ParsedConfig parse_config(Napi::Env env, Napi::Value v) {
  if (!v.IsObject()) throw Napi::TypeError::New(env, "config must be an object");
  Napi::Object c = v.As<Napi::Object>();
  ParsedConfig p;
  fmoe::MoeConfig& cfg = p.cfg;
  const std::string routing = get_string(c, "routing", fmoe::kRoutingNames[0].name);
  const std::string dtype = get_string(c, "weightDtype", fmoe::kDTypeNames[0].name);
  const std::string quant = get_string(c, "quantize", fmoe::kQuantNames[0].name);
  const std::string device = get_string(c, "device", fmoe::kDeviceNames[0].name);
  cfg.hidden = get_int(c, "hiddenSize", 0);
  cfg.intermediate = get_int(c, "intermediateSize", 0);
  cfg.num_experts = get_int(c, "numExperts", 0);
  cfg.top_k = get_int(c, "topK", 0);
  cfg.threads = int(get_int(c, "threads", 0));
  cfg.quant_group = get_int(c, "quantGroupSize", fmoe::kDefaultQuantGroup);
  p.cuda_device = int(get_int(c, "cudaDevice", 0));
  cfg.routed_scale = get_number(c, "routedScale", 1.0);
  cfg.shared_intermediate = get_int(c, "sharedIntermediateSize", 0);
  cfg.shared_gate = get_bool(c, "sharedGate", false);
  std::string group_score = fmoe::kGroupScoreNames[0].name;
  const Napi::Value groups = c.Get("expertGroups");
  if (groups.IsObject()) {
    Napi::Object g = groups.As<Napi::Object>();
    cfg.groups.count = get_int(g, "count", 0);
    cfg.groups.top_k = get_int(g, "topK", 0);
    group_score = get_string(g, "score", group_score);
  } else if (!groups.IsUndefined() && !groups.IsNull()) {
    throw Napi::TypeError::New(env, "expertGroups must be an object");
  }
  try {
    cfg.groups.score = fmoe::parse_enum(fmoe::kGroupScoreNames, "expertGroups.score", group_score);
    cfg.routing = fmoe::parse_enum(fmoe::kRoutingNames, "routing", routing);
    cfg.weight_dtype = fmoe::parse_enum(fmoe::kDTypeNames, "weightDtype", dtype);
    cfg.quant = fmoe::parse_enum(fmoe::kQuantNames, "quantize", quant);
    p.device = fmoe::parse_enum(fmoe::kDeviceNames, "device", device);
    fmoe::validate_config(cfg);
  } catch (const fmoe::MoeException& e) {
    throw Napi::RangeError::New(env, e.what());
  }
  return p;
}

// info[first ..]: (gate: Float32Array, w1: TypedArray[E], w3: TypedArray[E], w2: TypedArray[E]); the
// pointers are valid until JS runs again.
static fmoe::WeightsView parse_weights(const Napi::CallbackInfo& info, size_t first, const fmoe::MoeConfig& cfg) {
  Napi::Env env = info.Env();
  const int64_t E = cfg.num_experts, H = cfg.hidden, F = cfg.intermediate;
  const napi_typedarray_type wtype = cfg.weight_dtype == fmoe::DType::F32 ? napi_float32_array : napi_uint16_array;
  fmoe::WeightsView w;
  w.gate = static_cast<const float*>(typed_data(info[first], napi_float32_array, size_t(E * H), "weights.gate"));
  const char* names[3] = {"weights.w1", "weights.w3", "weights.w2"};
  std::vector<const void*>* lists[3] = {&w.w1, &w.w3, &w.w2};
  for (int m = 0; m < 3; m++) {
    if (!info[first + 1 + m].IsArray()) throw Napi::TypeError::New(env, std::string(names[m]) + " must be an array");
    Napi::Array arr = info[first + 1 + m].As<Napi::Array>();
    if (int64_t(arr.Length()) != E)
      throw_moe_error(
          env, ErrorCode::Shape,
          std::string(names[m]) + " must hold " + std::to_string(E) + " experts, got " + std::to_string(arr.Length()));
    for (int64_t e = 0; e < E; e++)
      lists[m]->push_back(typed_data(arr.Get(uint32_t(e)), wtype, size_t(F * H),
                                     std::string(names[m]) + "[" + std::to_string(e) + "]"));
  }
  return w;
}

// extras: { scoreBias?: Float32Array [E], shared?: { w1, w3 [Fs, H], w2 [H, Fs], gate?: Float32Array [H] } },
// or undefined; the pointers are valid until JS runs again.
static void parse_extras(Napi::Env env, Napi::Value v, const fmoe::MoeConfig& cfg, fmoe::WeightsView& w) {
  if (v.IsUndefined() || v.IsNull()) return;
  if (!v.IsObject()) throw Napi::TypeError::New(env, "weights extras must be an object");
  Napi::Object o = v.As<Napi::Object>();
  const int64_t H = cfg.hidden, Fs = cfg.shared_intermediate;
  const Napi::Value bias = o.Get("scoreBias");
  if (!bias.IsUndefined())
    w.score_bias =
        static_cast<const float*>(typed_data(bias, napi_float32_array, size_t(cfg.num_experts), "weights.scoreBias"));
  const Napi::Value shared = o.Get("shared");
  if (shared.IsUndefined() || Fs == 0) return;
  if (!shared.IsObject()) throw Napi::TypeError::New(env, "weights.shared must be an object");
  Napi::Object sh = shared.As<Napi::Object>();
  const napi_typedarray_type wtype = cfg.weight_dtype == fmoe::DType::F32 ? napi_float32_array : napi_uint16_array;
  w.shared_w1 = typed_data(sh.Get("w1"), wtype, size_t(Fs * H), "weights.shared.w1");
  w.shared_w3 = typed_data(sh.Get("w3"), wtype, size_t(Fs * H), "weights.shared.w3");
  w.shared_w2 = typed_data(sh.Get("w2"), wtype, size_t(H * Fs), "weights.shared.w2");
  if (cfg.shared_gate)
    w.shared_gate =
        static_cast<const float*>(typed_data(sh.Get("gate"), napi_float32_array, size_t(H), "weights.shared.gate"));
}

// Marks the External that NativeBuilder.finish() hands to the NativeLayer constructor, so an External
// from anywhere else is refused rather than read as a backend.
static const napi_type_tag kBuiltBackendTag = {0x6a0f1e3c5b2d4e71ULL, 0x9c8d7e6f5a4b3c2dULL};

// info: (config, gate: Float32Array, w1: TypedArray[E], w3: TypedArray[E], w2: TypedArray[E], extras?),
// or (External<Backend>) from NativeBuilder.finish().
NativeLayer::NativeLayer(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeLayer>(info) {
  Napi::Env env = info.Env();
  if (info.Length() == 1 && info[0].IsExternal()) {
    auto ext = info[0].As<Napi::External<BuiltLayer>>();
    if (!ext.CheckTypeTag(&kBuiltBackendTag)) throw Napi::TypeError::New(env, "NativeLayer: not a built layer");
    backend_ = ext.Data()->backend;
    fallback_reason_ = ext.Data()->fallback_reason;
  } else {
    if (info.Length() < 5 || !info[0].IsObject())
      throw Napi::TypeError::New(env, "NativeLayer(config, gate, w1, w3, w2) expects 5 arguments");
    const ParsedConfig p = parse_config(env, info[0]);
    fmoe::WeightsView w = parse_weights(info, 1, p.cfg);
    parse_extras(env, info[5], p.cfg, w);
    fmoe::BuiltBackend built =
        native_call(env, "build the layer", [&] { return fmoe::make_backend(p.cfg, w, p.device, p.cuda_device); });
    backend_ = std::move(built.backend);
    fallback_reason_ = std::move(built.fallback_reason);
  }
  external_bytes_ = int64_t(backend_->native_bytes());
  Napi::MemoryManagement::AdjustExternalMemory(env, external_bytes_);
}

// Garbage-collected without dispose(): the shared_ptr frees the weights (or leaves them to the
// forwards still running) and V8 hears the memory is gone.
void NativeLayer::Finalize(Napi::Env env) { release(env); }

NativeLayer::~NativeLayer() = default;

void NativeLayer::release(Napi::Env env) {
  if (!backend_) return;
  backend_.reset();
  Napi::MemoryManagement::AdjustExternalMemory(env, -external_bytes_);
  external_bytes_ = 0;
}

std::shared_ptr<fmoe::Backend> NativeLayer::live(Napi::Env env) const {
  if (!backend_) throw_moe_error(env, ErrorCode::Disposed, "this MoeLayer was disposed; create a new one");
  return backend_;
}

// ---- work --------------------------------------------------------------------------------------

static int64_t tokens_of(Napi::Env env, Napi::Value x, int64_t H) {
  if (!x.IsTypedArray() || x.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw Napi::TypeError::New(env, "x must be a Float32Array");
  size_t n = x.As<Napi::TypedArray>().ElementLength();
  if (n % size_t(H) != 0)
    throw_moe_error(env, ErrorCode::Shape,
                    "x must hold T * hiddenSize (" + std::to_string(H) + ") elements, got " + std::to_string(n));
  return int64_t(n / size_t(H));
}

// (x: Float32Array, out: Float32Array) -> undefined; on the calling thread.
Napi::Value NativeLayer::ForwardSync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto backend = live(env);
  const int64_t H = backend->config().hidden;
  const int64_t T = tokens_of(env, info[0], H);
  const float* x = static_cast<const float*>(typed_data(info[0], napi_float32_array, size_t(T * H), "x"));
  float* out = static_cast<float*>(typed_data_mut(info[1], napi_float32_array, size_t(T * H), "options.out"));
  std::vector<float> x_copy;
  const size_t bytes = size_t(T * H) * sizeof(float);
  const char *xb = reinterpret_cast<const char*>(x), *ob = reinterpret_cast<const char*>(out);
  if (T > 0 && xb < ob + bytes && ob < xb + bytes) {  // out overlaps x: read from a copy
    x_copy.assign(x, x + T * H);
    x = x_copy.data();
  }
  native_call(env, "allocate the forward workspace", [&] { backend->forward(x, T, out, nullptr); });
  return env.Undefined();
}

// Runs one forward on a libuv worker thread. Execute touches no JS value: x is copied into native
// memory before it starts (the caller may mutate or transfer its array meanwhile) and the result is
// copied into `out` back on the main thread.
class ForwardWorker : public Napi::AsyncWorker {
 public:
  ForwardWorker(Napi::Env env, std::shared_ptr<fmoe::Backend> backend, std::vector<float> x, int64_t T, Napi::Value out,
                std::shared_ptr<fmoe::CancelFlag> cancel)
      : Napi::AsyncWorker(env, "fused-moe:forward"),
        deferred_(Napi::Promise::Deferred::New(env)),
        backend_(std::move(backend)),
        x_(std::move(x)),
        T_(T),
        cancel_(std::move(cancel)) {
    if (out.IsTypedArray()) out_ref_ = Napi::Persistent(out.As<Napi::Float32Array>());
  }
  Napi::Promise promise() const { return deferred_.Promise(); }

 protected:
  void Execute() override {
    try {
      y_ = std::make_unique<std::vector<float>>(x_.size());
      backend_->forward(x_.data(), T_, y_->data(), cancel_.get());
    } catch (...) {
      const NativeFailure f = current_failure("allocate the forward workspace");
      code_ = f.code;
      SetError(f.message);
    }
    backend_.reset();  // a disposed layer's memory goes as soon as its last forward ends
    x_ = std::vector<float>();
  }
  // Both settle the promise on the main thread. When the environment is shutting down (a worker
  // thread terminated mid-forward) JS can no longer run: the result is dropped, never thrown.
  void OnOK() override {
    try {
      deferred_.Resolve(result(Env()));
    } catch (const Napi::Error& e) {
      try {
        deferred_.Reject(e.Value());
      } catch (const Napi::Error&) {
      }
    }
  }
  void OnError(const Napi::Error& e) override {
    try {
      deferred_.Reject(make_moe_error(Env(), code_, e.Message()).Value());
    } catch (const Napi::Error&) {
    }
  }

 private:
  // The caller's `out` gets a copy; otherwise the result buffer itself becomes the ArrayBuffer, so
  // the main thread neither zero-fills nor copies T*H floats.
  Napi::Value result(Napi::Env env) {
    const size_t n = y_->size();
    if (!out_ref_.IsEmpty()) {
      Napi::Float32Array out = out_ref_.Value();
      if (out.ElementLength() != n || (n > 0 && out.Data() == nullptr))
        throw make_moe_error(env, ErrorCode::Shape, "options.out was detached or resized during forward");
      if (n > 0) std::memcpy(out.Data(), y_->data(), n * sizeof(float));
      return out;
    }
    if (n == 0) return Napi::Float32Array::New(env, 0);
    std::vector<float>* owned = y_.get();
    Napi::ArrayBuffer ab;
    try {
      ab = Napi::ArrayBuffer::New(
          env, owned->data(), n * sizeof(float), [](Napi::Env, void*, std::vector<float>* v) { delete v; }, owned);
      y_.release();
    } catch (const Napi::Error&) {  // runtimes that forbid external buffers: copy instead
      ab = Napi::ArrayBuffer::New(env, n * sizeof(float));
      std::memcpy(ab.Data(), owned->data(), n * sizeof(float));
    }
    return Napi::Float32Array::New(env, n, ab, 0);
  }

  Napi::Promise::Deferred deferred_;
  std::shared_ptr<fmoe::Backend> backend_;
  std::vector<float> x_;
  std::unique_ptr<std::vector<float>> y_;
  int64_t T_;
  std::shared_ptr<fmoe::CancelFlag> cancel_;
  Napi::Reference<Napi::Float32Array> out_ref_;
  ErrorCode code_ = ErrorCode::Internal;
};

// (x: Float32Array, out: Float32Array | undefined, cancel?: NativeCancel) -> Promise<Float32Array>
Napi::Value NativeLayer::Forward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto backend = live(env);
  const int64_t H = backend->config().hidden;
  const int64_t T = tokens_of(env, info[0], H);
  const float* x = static_cast<const float*>(typed_data(info[0], napi_float32_array, size_t(T * H), "x"));
  if (!info[1].IsUndefined()) typed_data_mut(info[1], napi_float32_array, size_t(T * H), "options.out");
  std::shared_ptr<fmoe::CancelFlag> cancel;
  if (info.Length() > 2 && info[2].IsObject()) {
    AddonData* data = env.GetInstanceData<AddonData>();
    Napi::Object o = info[2].As<Napi::Object>();
    if (!o.InstanceOf(data->cancel_ctor.Value())) throw Napi::TypeError::New(env, "cancel must be a NativeCancel");
    cancel = NativeCancel::Unwrap(o)->flag();
  }
  std::vector<float> xs;
  try {
    xs.assign(x, x + T * H);
  } catch (const std::bad_alloc&) {
    throw_moe_error(env, ErrorCode::OutOfMemory, "not enough memory to copy x");
  }
  auto* worker = new ForwardWorker(env, std::move(backend), std::move(xs), T, info[1], std::move(cancel));
  Napi::Promise p = worker->promise();
  worker->Queue();
  return p;
}

// (x: Float32Array) -> { experts: Int32Array, weights: Float32Array }
Napi::Value NativeLayer::Route(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto backend = live(env);
  const int64_t H = backend->config().hidden, k = backend->config().top_k;
  const int64_t T = tokens_of(env, info[0], H);
  const float* x = static_cast<const float*>(typed_data(info[0], napi_float32_array, size_t(T * H), "x"));
  Napi::Int32Array experts = Napi::Int32Array::New(env, size_t(T * k));
  Napi::Float32Array weights = Napi::Float32Array::New(env, size_t(T * k));
  native_call(env, "route", [&] { backend->route(x, T, experts.Data(), weights.Data()); });
  Napi::Object result = Napi::Object::New(env);
  result.Set("experts", experts);
  result.Set("weights", weights);
  return result;
}

Napi::Value NativeLayer::Dispose(const Napi::CallbackInfo& info) {
  release(info.Env());
  return info.Env().Undefined();
}

// -> { device, kernels, nativeBytes, fallbackReason }
Napi::Value NativeLayer::Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto backend = live(env);
  Napi::Object o = Napi::Object::New(env);
  o.Set("device", backend->name());
  o.Set("kernels", backend->kernel_name());
  o.Set("nativeBytes", double(backend->native_bytes()));
  o.Set("fallbackReason", fallback_reason_.empty() ? env.Null() : Napi::String::New(env, fallback_reason_));
  return o;
}

Napi::Function NativeLayer::Init(Napi::Env env) {
  return DefineClass(env, "NativeLayer",
                     {InstanceMethod<&NativeLayer::ForwardSync>("forwardSync"),
                      InstanceMethod<&NativeLayer::Forward>("forward"), InstanceMethod<&NativeLayer::Route>("route"),
                      InstanceMethod<&NativeLayer::Dispose>("dispose"), InstanceMethod<&NativeLayer::Info>("info")});
}

// ---- building in steps ---------------------------------------------------------------------------

// info: (config). The core factory picks the backend; a CPU layer is packed by step() calls, a CUDA one
// is uploaded by the first.
NativeBuilder::NativeBuilder(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeBuilder>(info) {
  Napi::Env env = info.Env();
  const ParsedConfig p = parse_config(env, info[0]);
  cfg_ = p.cfg;
  builder_ = native_call(env, "build the layer", [&] { return fmoe::make_builder(p.cfg, p.device, p.cuda_device); });
}

// (gate, w1[], w3[], w2[], maxMs, extras?) -> boolean (done). The arrays are looked up afresh on every call.
Napi::Value NativeBuilder::Step(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (done_) return Napi::Boolean::New(env, true);
  if (!builder_) throw_moe_error(env, ErrorCode::Disposed, "this layer builder failed or was finished");
  fmoe::WeightsView w = parse_weights(info, 0, cfg_);
  parse_extras(env, info[5], cfg_, w);
  const double max_ms = info[4].IsNumber() ? info[4].As<Napi::Number>().DoubleValue() : 0.0;
  try {
    done_ = native_call(env, "build the layer", [&] { return builder_->step(w, max_ms / 1000.0); });
  } catch (...) {
    builder_.reset();  // a failed build frees its memory at once
    throw;
  }
  return Napi::Boolean::New(env, done_);
}

Napi::Value NativeBuilder::Progress(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), done_ ? 1.0 : builder_ ? builder_->progress() : 0.0);
}

// () -> NativeLayer, once step() returned true.
Napi::Value NativeBuilder::Finish(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!done_)
    throw_moe_error(env, ErrorCode::Invalid, "the layer is not fully built yet: call step() until it returns true");
  if (!builder_) throw_moe_error(env, ErrorCode::Disposed, "this layer builder was already finished");
  BuiltLayer built;
  built.fallback_reason = builder_->fallback_reason();
  built.backend =
      native_call(env, "build the layer", [&] { return std::shared_ptr<fmoe::Backend>(builder_->finish()); });
  builder_.reset();
  AddonData* data = env.GetInstanceData<AddonData>();
  auto ext = Napi::External<BuiltLayer>::New(env, &built);
  ext.TypeTag(&kBuiltBackendTag);
  return data->layer_ctor.New({ext});
}

Napi::Function NativeBuilder::Init(Napi::Env env) {
  return DefineClass(
      env, "NativeBuilder",
      {InstanceMethod<&NativeBuilder::Step>("step"), InstanceMethod<&NativeBuilder::Progress>("progress"),
       InstanceMethod<&NativeBuilder::Finish>("finish")});
}

// ---- cancellation ------------------------------------------------------------------------------

NativeCancel::NativeCancel(const Napi::CallbackInfo& info)
    : Napi::ObjectWrap<NativeCancel>(info), flag_(std::make_shared<fmoe::CancelFlag>(false)) {}

Napi::Value NativeCancel::Cancel(const Napi::CallbackInfo& info) {
  flag_->store(true);
  return info.Env().Undefined();
}

Napi::Function NativeCancel::Init(Napi::Env env) {
  return DefineClass(env, "NativeCancel", {InstanceMethod<&NativeCancel::Cancel>("cancel")});
}

}  // namespace fmoe_napi
