// NativeLayer: the JS handle of one MoE layer. Owns a shared_ptr to the backend so work in flight keeps
// the weights alive after dispose(); the memory goes when the last forward finishes.
#pragma once
#include <napi.h>

#include <atomic>
#include <memory>
#include <string>

#include "../core/backend.h"

namespace fmoe_napi {

// A config object as parsed: the core's config plus where it asks to run.
struct ParsedConfig {
  fmoe::MoeConfig cfg;
  fmoe::DeviceRequest device = fmoe::DeviceRequest::Cpu;
  int cuda_device = 0;
};

// What NativeBuilder.finish() hands to the NativeLayer constructor (a type-tagged External).
struct BuiltLayer {
  std::shared_ptr<fmoe::Backend> backend;
  std::string fallback_reason;
};

class NativeLayer : public Napi::ObjectWrap<NativeLayer> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit NativeLayer(const Napi::CallbackInfo& info);
  ~NativeLayer() override;
  void Finalize(Napi::Env env) override;

 private:
  Napi::Value ForwardSync(const Napi::CallbackInfo& info);
  Napi::Value Forward(const Napi::CallbackInfo& info);
  Napi::Value Route(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value Info(const Napi::CallbackInfo& info);

  std::shared_ptr<fmoe::Backend> live(Napi::Env env) const;
  void release(Napi::Env env);

  std::shared_ptr<fmoe::Backend> backend_;
  std::string fallback_reason_;  // why an 'auto' layer runs on the CPU; empty otherwise
  int64_t external_bytes_ = 0;   // reported to V8 so the GC sees the native weights
};

// Builds a NativeLayer in steps (core LayerBuilder), so the facade can pack on the main thread a few
// milliseconds at a time and re-read the weight arrays before each step.
class NativeBuilder : public Napi::ObjectWrap<NativeBuilder> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit NativeBuilder(const Napi::CallbackInfo& info);

 private:
  Napi::Value Step(const Napi::CallbackInfo& info);
  Napi::Value Progress(const Napi::CallbackInfo& info);
  Napi::Value Finish(const Napi::CallbackInfo& info);

  fmoe::MoeConfig cfg_;
  bool done_ = false;
  std::unique_ptr<fmoe::LayerBuilder> builder_;
};

// A cancellation flag JS can set while a forward runs on a worker thread.
class NativeCancel : public Napi::ObjectWrap<NativeCancel> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit NativeCancel(const Napi::CallbackInfo& info);
  std::shared_ptr<fmoe::CancelFlag> flag() const { return flag_; }

 private:
  Napi::Value Cancel(const Napi::CallbackInfo& info);
  std::shared_ptr<fmoe::CancelFlag> flag_;
};

}  // namespace fmoe_napi
