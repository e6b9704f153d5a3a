// The one exception type of the core. Codes are stable: the binding maps them to MoeError codes.
#pragma once
#include <stdexcept>
#include <string>

namespace fmoe {

enum class ErrorCode : int {
  Invalid = 0,      // ERR_MOE_INVALID: an argument or option is wrong
  Shape = 1,        // ERR_MOE_SHAPE: a size does not match the config
  Dtype = 2,        // ERR_MOE_DTYPE: an element type is not supported here
  NoDevice = 3,     // ERR_MOE_NO_DEVICE: the CUDA backend cannot run
  Cuda = 4,         // ERR_MOE_CUDA: a CUDA call failed
  OutOfMemory = 5,  // ERR_MOE_OUT_OF_MEMORY
  Disposed = 6,     // ERR_MOE_DISPOSED
  Aborted = 7,      // ABORT_ERR: the caller cancelled the request
  Internal = 8,     // ERR_MOE_INTERNAL: a bug; please report it
};

inline const char* error_code_name(ErrorCode c) {
  switch (c) {
    case ErrorCode::Invalid:
      return "ERR_MOE_INVALID";
    case ErrorCode::Shape:
      return "ERR_MOE_SHAPE";
    case ErrorCode::Dtype:
      return "ERR_MOE_DTYPE";
    case ErrorCode::NoDevice:
      return "ERR_MOE_NO_DEVICE";
    case ErrorCode::Cuda:
      return "ERR_MOE_CUDA";
    case ErrorCode::OutOfMemory:
      return "ERR_MOE_OUT_OF_MEMORY";
    case ErrorCode::Disposed:
      return "ERR_MOE_DISPOSED";
    case ErrorCode::Aborted:
      return "ABORT_ERR";
    case ErrorCode::Internal:
      return "ERR_MOE_INTERNAL";
  }
  return "ERR_MOE_INTERNAL";
}

class MoeException : public std::runtime_error {
 public:
  MoeException(ErrorCode code, const std::string& msg) : std::runtime_error(msg), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

[[noreturn]] inline void fail(ErrorCode code, const std::string& msg) { throw MoeException(code, msg); }

}  // namespace fmoe
