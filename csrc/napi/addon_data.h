// Per-environment state (the addon is context-aware: each worker_thread gets its own).
#pragma once
#include <napi.h>

namespace fmoe_napi {
struct AddonData {
  Napi::FunctionReference layer_ctor;
  Napi::FunctionReference cancel_ctor;
  Napi::FunctionReference sampler_ctor;
};
}  // namespace fmoe_napi
