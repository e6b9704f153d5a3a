// JS values <-> core types. Conversion only: the facade has already checked every argument, these
// helpers re-check what memory safety depends on and throw a JS error naming the argument.
#pragma once
#include <napi.h>

#include <string>

#include "../core/error.h"

namespace fmoe_napi {

// Throws a JS Error whose `code` is the core's stable code name.
[[noreturn]] void throw_moe_error(Napi::Env env, fmoe::ErrorCode code, const std::string& message);
Napi::Error make_moe_error(Napi::Env env, fmoe::ErrorCode code, const std::string& message);

// An exception from the core, classified the one way every entry point reports it: MoeException keeps
// its code and message; std::bad_alloc is OutOfMemory, "not enough memory to <doing>"; anything else is
// Internal. Call from a catch block (no JS needed, so worker threads use it too).
struct NativeFailure {
  fmoe::ErrorCode code;
  std::string message;
};
NativeFailure current_failure(const char* doing);

// Runs fn on the JS thread; a core exception becomes the JS error (code: its stable name) the facade
// maps to MoeError. JS exceptions pass through unchanged.
template <typename Fn>
auto native_call(Napi::Env env, const char* doing, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const Napi::Error&) {
    throw;
  } catch (...) {
    const NativeFailure f = current_failure(doing);
    throw_moe_error(env, f.code, f.message);
  }
}

int64_t get_int(Napi::Object obj, const char* key, int64_t fallback);
// A number field, `fallback` when undefined; the error names it as prefix + key ("config.ropeTheta").
double get_number(Napi::Object obj, const char* key, double fallback, const char* prefix = "");
std::string get_string(Napi::Object obj, const char* key, const std::string& fallback);

// A typed array's data pointer (byteOffset applied) after checking its element type and length.
const void* typed_data(Napi::Value v, napi_typedarray_type type, size_t expected_len, const std::string& what);
void* typed_data_mut(Napi::Value v, napi_typedarray_type type, size_t expected_len, const std::string& what);
// The same for a typed array of any length, which goes to *len.
const void* typed_data_any(Napi::Value v, napi_typedarray_type type, size_t* len, const std::string& what);

}  // namespace fmoe_napi
