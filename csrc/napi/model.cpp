#include "model.h"

#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "../core/error.h"
#include "../core/options.h"
#include "addon_data.h"
#include "convert.h"
#include "layer.h"

namespace fmoe_napi {

using fmoe::ErrorCode;

static bool get_bool(Napi::Object o, const char* key) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined()) return false;
  if (!v.IsBoolean()) throw Napi::TypeError::New(o.Env(), std::string("config.") + key + " must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

static fmoe::DecoderConfig parse_decoder_config(Napi::Env env, Napi::Value v) {
  if (!v.IsObject()) throw Napi::TypeError::New(env, "config must be an object");
  Napi::Object c = v.As<Napi::Object>();
  fmoe::DecoderConfig d;
  d.vocab = get_int(c, "vocab", 0);
  d.hidden = get_int(c, "hidden", 0);
  d.layers = get_int(c, "layers", 0);
  d.heads = get_int(c, "heads", 0);
  d.kv_heads = get_int(c, "kvHeads", 0);
  d.head_dim = get_int(c, "headDim", 0);
  d.rope_theta = get_number(c, "ropeTheta", 10000, "config.");
  d.rms_eps = float(get_number(c, "rmsEps", 1e-5, "config."));
  d.window = get_int(c, "window", 0);
  d.qk_norm = fmoe::parse_enum(fmoe::kQkNormNames, "qkNorm", get_string(c, "qkNorm", "none"));
  d.qkv_bias = get_bool(c, "qkvBias");
  d.clip_qkv = float(get_number(c, "clipQkv", 0, "config."));
  d.num_experts = get_int(c, "numExperts", 0);
  d.top_k = get_int(c, "topK", 0);
  d.moe_intermediate = get_int(c, "moeIntermediate", 0);
  d.routing = fmoe::parse_enum(fmoe::kRoutingNames, "routing", get_string(c, "routing", "softmax-topk-renorm"));
  d.shared_intermediate = get_int(c, "sharedIntermediate", 0);
  d.shared_gate = get_bool(c, "sharedGate");
  d.dense_intermediate = get_int(c, "denseIntermediate", 0);
  Napi::Value flags = c.Get("moeLayers");
  if (!flags.IsArray()) throw Napi::TypeError::New(env, "config.moeLayers must be an array");
  Napi::Array a = flags.As<Napi::Array>();
  if (a.Length() > 4096) throw Napi::RangeError::New(env, "config.moeLayers is too long");
  for (uint32_t i = 0; i < a.Length(); i++) d.moe_layer.push_back(a.Get(i).ToBoolean().Value() ? 1 : 0);
  d.weight_dtype = fmoe::parse_enum(fmoe::kDTypeNames, "weightDtype", get_string(c, "weightDtype", "bfloat16"));
  d.embed_dtype = fmoe::parse_enum(fmoe::kDTypeNames, "embedDtype", get_string(c, "embedDtype", "bfloat16"));
  d.quant = fmoe::parse_enum(fmoe::kQuantNames, "quantize", get_string(c, "quantize", "none"));
  d.quant_group = get_int(c, "quantGroupSize", 32);
  d.kv_dtype = fmoe::parse_enum(fmoe::kDTypeNames, "kvDtype", get_string(c, "kvDtype", "bfloat16"));
  d.block_tokens = get_int(c, "blockTokens", 16);
  d.cache_blocks = get_int(c, "cacheBlocks", 0);
  d.context = get_int(c, "context", 0);
  d.threads = int(get_int(c, "threads", 0));
  return d;
}

Napi::Function NativeModel::Init(Napi::Env env) {
  return DefineClass(
      env, "NativeModel",
      {InstanceMethod<&NativeModel::Load>("load"), InstanceMethod<&NativeModel::Missing>("missing"),
       InstanceMethod<&NativeModel::SequenceCreate>("sequenceCreate"),
       InstanceMethod<&NativeModel::SequenceFree>("sequenceFree"),
       InstanceMethod<&NativeModel::SequenceLength>("sequenceLength"),
       InstanceMethod<&NativeModel::SequenceTruncate>("sequenceTruncate"),
       InstanceMethod<&NativeModel::SequenceFork>("sequenceFork"), InstanceMethod<&NativeModel::Step>("step"),
       InstanceMethod<&NativeModel::LogitsBuffer>("logitsBuffer"), InstanceMethod<&NativeModel::Info>("info"),
       InstanceMethod<&NativeModel::RoutedTokens>("routedTokens"), InstanceMethod<&NativeModel::StepTimes>("stepTimes"),
       InstanceMethod<&NativeModel::Dispose>("dispose")});
}

NativeModel::NativeModel(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeModel>(info) {
  Napi::Env env = info.Env();
  fmoe::DecoderConfig cfg =
      native_call(env, "read the model config", [&] { return parse_decoder_config(env, info[0]); });
  decoder_ =
      native_call(env, "build the model", [&] { return std::shared_ptr<fmoe::Decoder>(fmoe::make_cpu_decoder(cfg)); });
  external_bytes_ = int64_t(decoder_->native_bytes());
  Napi::MemoryManagement::AdjustExternalMemory(env, external_bytes_);
}

NativeModel::~NativeModel() = default;

void NativeModel::release(Napi::Env env) {
  decoder_.reset();
  step_logits_ = std::make_shared<std::vector<float>>();  // a running step keeps its own reference
  direct_logits_.reset();
  if (external_bytes_) Napi::MemoryManagement::AdjustExternalMemory(env, -external_bytes_);
  external_bytes_ = 0;
}

std::shared_ptr<fmoe::Decoder> NativeModel::idle(Napi::Env env) const {
  if (!decoder_) throw_moe_error(env, ErrorCode::Disposed, "this model was disposed");
  if (busy_->load()) throw_moe_error(env, ErrorCode::Invalid, "a load or step of this model is already running");
  return decoder_;
}

// Runs fn(decoder) on a libuv worker thread and settles a promise. Execute touches no JS value; the
// references keep the inputs' buffers alive until the work ends; busy is cleared before the promise settles.
class ModelWorker : public Napi::AsyncWorker {
 public:
  using Work = std::function<void(fmoe::Decoder&)>;
  using Done = std::function<Napi::Value(Napi::Env)>;
  ModelWorker(Napi::Env env, const char* name, std::shared_ptr<fmoe::Decoder> d,
              std::shared_ptr<std::atomic<bool>> busy, Work work, Done done, const char* doing)
      : Napi::AsyncWorker(env, name),
        deferred_(Napi::Promise::Deferred::New(env)),
        decoder_(std::move(d)),
        busy_(std::move(busy)),
        work_(std::move(work)),
        done_(std::move(done)),
        doing_(doing) {
    busy_->store(true);
  }
  Napi::Promise promise() const { return deferred_.Promise(); }
  std::vector<Napi::Reference<Napi::Value>> keep;

 protected:
  void Execute() override {
    try {
      work_(*decoder_);
    } catch (...) {
      const NativeFailure f = current_failure(doing_);
      code_ = f.code;
      SetError(f.message);
    }
    decoder_.reset();
  }
  void OnOK() override {
    busy_->store(false);
    try {
      deferred_.Resolve(done_ ? done_(Env()) : Env().Undefined());
    } catch (const Napi::Error& e) {
      try {
        deferred_.Reject(e.Value());
      } catch (const Napi::Error&) {
      }
    }
  }
  void OnError(const Napi::Error& e) override {
    busy_->store(false);
    try {
      deferred_.Reject(make_moe_error(Env(), code_, e.Message()).Value());
    } catch (const Napi::Error&) {
    }
  }

 private:
  Napi::Promise::Deferred deferred_;
  std::shared_ptr<fmoe::Decoder> decoder_;
  std::shared_ptr<std::atomic<bool>> busy_;
  Work work_;
  Done done_;
  const char* doing_;
  ErrorCode code_ = ErrorCode::Internal;
};

// (slot: string, layer: number, index: number, parts: (Float32Array | Uint16Array)[], dtypes: string[]) ->
// Promise<void>
Napi::Value NativeModel::Load(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto d = idle(env);
  if (!info[0].IsString()) throw Napi::TypeError::New(env, "slot must be a string");
  const fmoe::Slot slot = native_call(env, "read the slot", [&] {
    return fmoe::parse_enum(fmoe::kSlotNames, "slot", info[0].As<Napi::String>().Utf8Value());
  });
  if (!info[1].IsNumber() || !info[2].IsNumber()) throw Napi::TypeError::New(env, "layer and index must be numbers");
  const int64_t layer = info[1].As<Napi::Number>().Int64Value(), index = info[2].As<Napi::Number>().Int64Value();
  if (!info[3].IsArray() || !info[4].IsArray()) throw Napi::TypeError::New(env, "parts and dtypes must be arrays");
  Napi::Array arr = info[3].As<Napi::Array>(), dts = info[4].As<Napi::Array>();
  if (arr.Length() > 3 || dts.Length() != arr.Length())
    throw Napi::RangeError::New(env, "parts: at most 3, one dtype each");
  std::vector<fmoe::TensorPart> parts;
  std::vector<Napi::Reference<Napi::Value>> keep;
  for (uint32_t i = 0; i < arr.Length(); i++) {
    Napi::Value v = arr.Get(i);
    if (!v.IsTypedArray()) throw Napi::TypeError::New(env, "parts[" + std::to_string(i) + "] must be a typed array");
    Napi::TypedArray t = v.As<Napi::TypedArray>();
    const fmoe::DType dt = native_call(env, "read a dtype", [&] {
      return fmoe::parse_enum(fmoe::kDTypeNames, "dtype", dts.Get(i).ToString().Utf8Value());
    });
    const napi_typedarray_type want = dt == fmoe::DType::F32 ? napi_float32_array : napi_uint16_array;
    if (t.TypedArrayType() != want)
      throw Napi::TypeError::New(env, "parts[" + std::to_string(i) + "] must be a " +
                                          (dt == fmoe::DType::F32 ? "Float32Array" : "Uint16Array") + " for " +
                                          fmoe::dtype_name(dt));
    fmoe::TensorPart p;
    p.dtype = dt;
    p.elements = int64_t(t.ElementLength());
    p.data = typed_data(v, want, t.ElementLength(), "parts[" + std::to_string(i) + "]");
    parts.push_back(p);
    keep.push_back(Napi::Persistent(v));
  }
  auto* w = new ModelWorker(
      env, "fused-moe:model-load", std::move(d), busy_,
      [slot, layer, index, parts](fmoe::Decoder& dec) { dec.load(slot, layer, index, parts); }, nullptr,
      "load the model's weights");
  w->keep = std::move(keep);
  Napi::Promise p = w->promise();
  w->Queue();
  return p;
}

Napi::Value NativeModel::Missing(const Napi::CallbackInfo& info) {
  auto d = idle(info.Env());
  return Napi::String::New(info.Env(), d->missing());
}

Napi::Value NativeModel::SequenceCreate(const Napi::CallbackInfo& info) {
  auto d = idle(info.Env());
  return Napi::Number::New(info.Env(),
                           double(native_call(info.Env(), "create a sequence", [&] { return d->sequence_create(); })));
}

static int64_t sequence_id(Napi::Env env, Napi::Value v) {
  if (!v.IsNumber()) throw Napi::TypeError::New(env, "sequence id must be a number");
  return v.As<Napi::Number>().Int64Value();
}

Napi::Value NativeModel::SequenceFree(const Napi::CallbackInfo& info) {
  auto d = idle(info.Env());
  const int64_t id = sequence_id(info.Env(), info[0]);
  native_call(info.Env(), "free a sequence", [&] { d->sequence_free(id); });
  return info.Env().Undefined();
}

Napi::Value NativeModel::SequenceLength(const Napi::CallbackInfo& info) {
  auto d = idle(info.Env());
  const int64_t id = sequence_id(info.Env(), info[0]);
  return Napi::Number::New(info.Env(),
                           double(native_call(info.Env(), "read a sequence", [&] { return d->sequence_length(id); })));
}

Napi::Value NativeModel::SequenceTruncate(const Napi::CallbackInfo& info) {
  auto d = idle(info.Env());
  const int64_t id = sequence_id(info.Env(), info[0]);
  if (!info[1].IsNumber()) throw Napi::TypeError::New(info.Env(), "length must be a number");
  const int64_t n = info[1].As<Napi::Number>().Int64Value();
  native_call(info.Env(), "shorten a sequence", [&] { d->sequence_truncate(id, n); });
  return info.Env().Undefined();
}

Napi::Value NativeModel::SequenceFork(const Napi::CallbackInfo& info) {
  auto d = idle(info.Env());
  const int64_t id = sequence_id(info.Env(), info[0]);
  if (!info[1].IsNumber()) throw Napi::TypeError::New(info.Env(), "length must be a number");
  const int64_t n = info[1].As<Napi::Number>().Int64Value();
  return Napi::Number::New(info.Env(),
                           double(native_call(info.Env(), "fork a sequence", [&] { return d->sequence_fork(id, n); })));
}

// (tokens: Int32Array, seqs: Float64Array [id, count, all]*, logits: Float32Array, cancel?) -> Promise<Float32Array>
Napi::Value NativeModel::Step(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  auto d = idle(env);
  if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
    throw Napi::TypeError::New(env, "seqs must be a Float64Array");
  Napi::Float64Array sa = info[1].As<Napi::Float64Array>();
  if (sa.ElementLength() % 3 != 0) throw Napi::RangeError::New(env, "seqs must hold [id, count, all] triples");
  std::vector<fmoe::StepSequence> seqs(sa.ElementLength() / 3);
  int64_t T = 0;
  for (size_t i = 0; i < seqs.size(); i++) {
    const double id = sa[3 * i], count = sa[3 * i + 1];
    if (!(count >= 0 && count <= double(1 << 24)) || count != double(int64_t(count)) || id != double(int64_t(id)))
      throw Napi::RangeError::New(env, "seqs: ids and counts must be integers, counts in [0, 2^24]");
    seqs[i].id = int64_t(id);
    seqs[i].count = int64_t(count);
    seqs[i].all_logits = sa[3 * i + 2] != 0;
    T += seqs[i].count;
  }
  const int32_t* tok = static_cast<const int32_t*>(typed_data(info[0], napi_int32_array, size_t(T), "tokens"));
  const int64_t rows = fmoe::Decoder::logit_rows(seqs.data(), int64_t(seqs.size()));
  const int64_t V = d->config().vocab;
  float* const target = static_cast<float*>(typed_data_mut(info[2], napi_float32_array, size_t(rows * V), "logits"));
  std::shared_ptr<fmoe::CancelFlag> cancel;
  if (info.Length() > 3 && info[3].IsObject()) {
    AddonData* data = env.GetInstanceData<AddonData>();
    Napi::Object o = info[3].As<Napi::Object>();
    if (!o.InstanceOf(data->cancel_ctor.Value())) throw Napi::TypeError::New(env, "cancel must be a NativeCancel");
    cancel = NativeCancel::Unwrap(o)->flag();
  }
  auto tokens = std::make_shared<std::vector<int32_t>>(tok, tok + T);
  auto out_ref = std::make_shared<Napi::Reference<Napi::Value>>(Napi::Persistent(info[2]));
  // Logits that lie in the model's direct buffer (LogitsBuffer) are written in place.
  std::shared_ptr<std::vector<float>> direct = direct_logits_;
  if (!direct || rows * V == 0 || std::less<const float*>()(target, direct->data()) ||
      std::less<const float*>()(direct->data() + direct->size(), target + rows * V))
    direct.reset();
  ModelWorker::Work work;
  ModelWorker::Done done;
  if (direct) {
    work = [tokens, seqs, direct, target, cancel](fmoe::Decoder& dec) {
      dec.step(tokens->data(), seqs.data(), int64_t(seqs.size()), target, cancel.get());
    };
    done = [out_ref](Napi::Env) -> Napi::Value { return out_ref->Value(); };
  } else {
    // Any other array may be detached or resized while the step runs: the step writes a native buffer,
    // copied into the array once it is over. Steps of a few rows reuse the model's buffer; a large one
    // (every position of a long prompt) gets its own, freed after the step.
    constexpr int64_t kKeptLogitsBytes = int64_t(32) << 20;
    std::shared_ptr<std::vector<float>> out =
        rows * V * int64_t(sizeof(float)) <= kKeptLogitsBytes ? step_logits_ : std::make_shared<std::vector<float>>();
    work = [tokens, seqs, out, rows, V, cancel](fmoe::Decoder& dec) {
      out->resize(size_t(rows * V));  // grows only when a step has more rows than any before
      dec.step(tokens->data(), seqs.data(), int64_t(seqs.size()), out->data(), cancel.get());
    };
    // Back on the main thread: the logits go into the caller's array, which may have been detached.
    done = [out, out_ref](Napi::Env e) -> Napi::Value {
      Napi::Float32Array a = out_ref->Value().As<Napi::Float32Array>();
      if (a.ElementLength() != out->size() || (!out->empty() && a.Data() == nullptr))
        throw make_moe_error(e, ErrorCode::Shape, "logits was detached or resized during the step");
      if (!out->empty()) std::memcpy(a.Data(), out->data(), out->size() * sizeof(float));
      return a;
    };
  }
  auto* w = new ModelWorker(env, "fused-moe:model-step", std::move(d), busy_, std::move(work), std::move(done),
                            "run a model step");
  Napi::Promise p = w->promise();
  w->Queue();
  return p;
}

// (floats: number) -> Float32Array over native memory that steps write their logits into directly
// (direct_logits_); it replaces the model's previous one. Where the runtime refuses external buffers, a
// plain Float32Array (steps then copy into it).
Napi::Value NativeModel::LogitsBuffer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!decoder_) throw_moe_error(env, ErrorCode::Disposed, "this model was disposed");
  const double n = info[0].IsNumber() ? info[0].As<Napi::Number>().DoubleValue() : -1;
  if (!(n >= 1 && n <= double(int64_t(1) << 32)) || n != double(int64_t(n)))
    throw Napi::RangeError::New(env, "floats must be an integer in [1, 2^32]");
  auto mem = native_call(env, "allocate the logits", [&] { return std::make_shared<std::vector<float>>(size_t(n)); });
  auto* hold = new std::shared_ptr<std::vector<float>>(mem);
  const int64_t bytes = int64_t(mem->size() * sizeof(float));
  napi_value buffer;
  const napi_status status = napi_create_external_arraybuffer(
      env, mem->data(), size_t(bytes),
      [](napi_env e, void*, void* hint) {
        auto* held = static_cast<std::shared_ptr<std::vector<float>>*>(hint);
        int64_t total;
        napi_adjust_external_memory(e, -int64_t((*held)->size() * sizeof(float)), &total);
        delete held;
      },
      hold, &buffer);
  if (status != napi_ok) {
    delete hold;
    if (env.IsExceptionPending()) env.GetAndClearPendingException();
    return Napi::Float32Array::New(env, size_t(n));
  }
  Napi::MemoryManagement::AdjustExternalMemory(env, bytes);  // the garbage collector sees what it holds
  direct_logits_ = std::move(mem);
  return Napi::Float32Array::New(env, size_t(n), Napi::ArrayBuffer(env, buffer), 0);
}

Napi::Value NativeModel::Info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("nativeBytes", decoder_ ? double(decoder_->native_bytes()) : 0.0);
  o.Set("freeCachePositions", decoder_ && !busy_->load() ? double(decoder_->free_cache_positions()) : 0.0);
  return o;
}

// Tokens routed to each expert of each layer, [layers * experts]. Safe while a step runs: the counts
// are atomics and the layers are fixed once loaded (MoeModel calls it only on a loaded model).
Napi::Value NativeModel::RoutedTokens(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!decoder_) throw_moe_error(env, ErrorCode::Disposed, "this model was disposed");
  const std::vector<uint64_t> counts = decoder_->routed_tokens();
  Napi::Float64Array out = Napi::Float64Array::New(env, counts.size());
  for (size_t i = 0; i < counts.size(); i++) out[i] = double(counts[i]);
  return out;
}

// Steps, tokens and seconds per phase of every step completed since load (atomics, like RoutedTokens).
Napi::Value NativeModel::StepTimes(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!decoder_) throw_moe_error(env, ErrorCode::Disposed, "this model was disposed");
  const fmoe::StepTimes t = decoder_->step_times();
  static const char* const kNames[] = {"qkv", "attention", "output", "mlp", "lmHead", "other"};
  static_assert(sizeof(kNames) / sizeof(kNames[0]) == size_t(fmoe::StepPhase::Count), "a name per phase");
  Napi::Object seconds = Napi::Object::New(env);
  for (int i = 0; i < int(fmoe::StepPhase::Count); i++) seconds.Set(kNames[i], double(t.nanoseconds[i]) * 1e-9);
  Napi::Object o = Napi::Object::New(env);
  o.Set("steps", double(t.steps));
  o.Set("tokens", double(t.tokens));
  o.Set("seconds", seconds);
  return o;
}

Napi::Value NativeModel::Dispose(const Napi::CallbackInfo& info) {
  release(info.Env());
  return info.Env().Undefined();
}

}  // namespace fmoe_napi
