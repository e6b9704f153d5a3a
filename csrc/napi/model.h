// NativeModel: the JS handle of one decoder (core decoder.h). Loads and steps run on worker threads and
// hold a shared_ptr to the decoder, so dispose() during one frees the memory when it ends. One load or
// step at a time: a second call while one runs throws (the facade queues its calls).
#pragma once
#include <napi.h>

#include <atomic>
#include <memory>
#include <vector>

#include "../core/decoder.h"

namespace fmoe_napi {

class NativeModel : public Napi::ObjectWrap<NativeModel> {
 public:
  static Napi::Function Init(Napi::Env env);
  explicit NativeModel(const Napi::CallbackInfo& info);
  ~NativeModel() override;

 private:
  Napi::Value Load(const Napi::CallbackInfo& info);
  Napi::Value Missing(const Napi::CallbackInfo& info);
  Napi::Value SequenceCreate(const Napi::CallbackInfo& info);
  Napi::Value SequenceFree(const Napi::CallbackInfo& info);
  Napi::Value SequenceLength(const Napi::CallbackInfo& info);
  Napi::Value SequenceTruncate(const Napi::CallbackInfo& info);
  Napi::Value SequenceFork(const Napi::CallbackInfo& info);
  Napi::Value Step(const Napi::CallbackInfo& info);
  Napi::Value LogitsBuffer(const Napi::CallbackInfo& info);
  Napi::Value Info(const Napi::CallbackInfo& info);
  Napi::Value RoutedTokens(const Napi::CallbackInfo& info);
  Napi::Value StepTimes(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);

  // The decoder, checked live and idle (no load or step running).
  std::shared_ptr<fmoe::Decoder> idle(Napi::Env env) const;
  void release(Napi::Env env);

  std::shared_ptr<fmoe::Decoder> decoder_;
  std::shared_ptr<std::atomic<bool>> busy_ = std::make_shared<std::atomic<bool>>(false);
  // The logits of the running step, kept from one step to the next (steps run one at a time): a fresh
  // buffer per step cost its allocation, zeroing and first-touch page faults each time.
  std::shared_ptr<std::vector<float>> step_logits_ = std::make_shared<std::vector<float>>();
  // The memory of the last LogitsBuffer(), which JS sees as an external ArrayBuffer: a step whose logits
  // array lies in it gets them written there, with no copy on the main thread after the step. The buffer's
  // finalizer holds a reference too, so neither dispose() nor a detached or collected array frees memory a
  // step still writes.
  std::shared_ptr<std::vector<float>> direct_logits_;
  int64_t external_bytes_ = 0;
};

}  // namespace fmoe_napi
