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

int64_t get_int(Napi::Object obj, const char* key, int64_t fallback);
std::string get_string(Napi::Object obj, const char* key, const std::string& fallback);

// A typed array's data pointer (byteOffset applied) after checking its element type and length.
const void* typed_data(Napi::Value v, napi_typedarray_type type, size_t expected_len, const std::string& what);
void* typed_data_mut(Napi::Value v, napi_typedarray_type type, size_t expected_len, const std::string& what);

}  // namespace fmoe_napi
