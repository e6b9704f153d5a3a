#include "convert.h"

#include <new>

namespace fmoe_napi {

Napi::Error make_moe_error(Napi::Env env, fmoe::ErrorCode code, const std::string& message) {
  Napi::Error err = Napi::Error::New(env, message);
  err.Value().Set("code", Napi::String::New(env, fmoe::error_code_name(code)));
  return err;
}

void throw_moe_error(Napi::Env env, fmoe::ErrorCode code, const std::string& message) {
  throw make_moe_error(env, code, message);
}

NativeFailure current_failure(const char* doing) {
  try {
    throw;
  } catch (const fmoe::MoeException& e) {
    return {e.code(), e.what()};
  } catch (const std::bad_alloc&) {
    return {fmoe::ErrorCode::OutOfMemory, std::string("not enough memory to ") + doing};
  } catch (const std::exception& e) {
    return {fmoe::ErrorCode::Internal, e.what()};
  } catch (...) {
    return {fmoe::ErrorCode::Internal, std::string("unknown failure while trying to ") + doing};
  }
}

int64_t get_int(Napi::Object obj, const char* key, int64_t fallback) {
  Napi::Value v = obj.Get(key);
  if (v.IsUndefined()) return fallback;
  if (!v.IsNumber()) throw Napi::TypeError::New(obj.Env(), std::string(key) + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= -9.0e15 && d <= 9.0e15) || d != static_cast<double>(static_cast<int64_t>(d)))
    throw Napi::RangeError::New(obj.Env(), std::string(key) + " must be an integer");
  return static_cast<int64_t>(d);
}

double get_number(Napi::Object obj, const char* key, double fallback, const char* prefix) {
  Napi::Value v = obj.Get(key);
  if (v.IsUndefined()) return fallback;
  if (!v.IsNumber()) throw Napi::TypeError::New(obj.Env(), std::string(prefix) + key + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

std::string get_string(Napi::Object obj, const char* key, const std::string& fallback) {
  Napi::Value v = obj.Get(key);
  if (v.IsUndefined()) return fallback;
  if (!v.IsString()) throw Napi::TypeError::New(obj.Env(), std::string(key) + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

static const char* type_name(napi_typedarray_type t) {
  switch (t) {
    case napi_float32_array:
      return "Float32Array";
    case napi_uint16_array:
      return "Uint16Array";
    case napi_int32_array:
      return "Int32Array";
    case napi_uint8_array:
      return "Uint8Array";
    case napi_float64_array:
      return "Float64Array";
    default:
      return "typed array";
  }
}

void* typed_data_mut(Napi::Value v, napi_typedarray_type type, size_t expected_len, const std::string& what) {
  Napi::Env env = v.Env();
  if (!v.IsTypedArray()) throw Napi::TypeError::New(env, what + " must be a " + type_name(type));
  Napi::TypedArray ta = v.As<Napi::TypedArray>();
  if (ta.TypedArrayType() != type) throw Napi::TypeError::New(env, what + " must be a " + type_name(type));
  if (ta.ElementLength() != expected_len)
    throw_moe_error(
        env, fmoe::ErrorCode::Shape,
        what + " must have " + std::to_string(expected_len) + " elements, got " + std::to_string(ta.ElementLength()));
  napi_value ab;
  void* data = nullptr;
  size_t len = 0, offset = 0;
  napi_typedarray_type t;
  if (napi_get_typedarray_info(env, ta, &t, &len, &data, &ab, &offset) != napi_ok)
    throw Napi::TypeError::New(env, what + " could not be read");
  if (expected_len > 0 && data == nullptr)
    throw_moe_error(env, fmoe::ErrorCode::Shape, what + " is detached (its ArrayBuffer was transferred)");
  return data;  // napi_get_typedarray_info already applies byteOffset
}

const void* typed_data(Napi::Value v, napi_typedarray_type type, size_t expected_len, const std::string& what) {
  return typed_data_mut(v, type, expected_len, what);
}

const void* typed_data_any(Napi::Value v, napi_typedarray_type type, size_t* len, const std::string& what) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != type)
    throw Napi::TypeError::New(v.Env(), what + " must be a " + type_name(type));
  *len = v.As<Napi::TypedArray>().ElementLength();
  return typed_data(v, type, *len, what);
}

}  // namespace fmoe_napi
