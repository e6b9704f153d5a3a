// The layer's options as the core defines them: the limits, the enums and the name of every enum value.
// The binding exports these (binding.limits, binding.enums) and parses strings with these tables only,
// and the TypeScript facade validates against the exported values, so a limit or a name is written once.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "error.h"

namespace fmoe {

// ---- limits ---------------------------------------------------------------------------------------
constexpr int64_t kMaxExperts = 1024;
constexpr int64_t kMaxDim = int64_t(1) << 20;  // hidden or intermediate size
constexpr int64_t kMaxThreads = 1024;          // a layer's thread cap (0: the pool's size)
constexpr int64_t kMaxCudaDevice = 1023;       // highest CUDA device ordinal a config may name
// Largest element count of any tensor or product of sizes: 2^52 keeps every size and byte count exact
// in a double (JavaScript numbers) and far from int64 overflow in the byte arithmetic.
constexpr int64_t kMaxElements = int64_t(1) << 52;
constexpr int64_t kQuantGroupSizes[] = {32, 64, 128};  // weights per scale along the reduction axis
constexpr int64_t kDefaultQuantGroup = 128;

inline bool quant_group_ok(int64_t g) {
  for (int64_t s : kQuantGroupSizes)
    if (g == s) return true;
  return false;
}

// ---- enums ----------------------------------------------------------------------------------------
// The integer values are part of the CUDA C ABI for Routing and DType (static_asserts in
// cuda/host/cuda_backend.cpp): append, never renumber.
enum class Routing : int { SoftmaxTopkRenorm = 0, SoftmaxTopk = 1, SigmoidTopk = 2, SigmoidTopkRenorm = 3 };
// How a group of experts is scored for group-limited routing: the best expert score (DeepSeek-V2) or
// the sum of the two best (DeepSeek-V3). Not part of any ABI.
enum class GroupScore : int { Max = 0, Top2Sum = 1 };
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };           // element type of the expert weights
enum class Quant : int { None = 0, Int8 = 1, Int4 = 2 };         // quantization of the experts at load (quant.h)
enum class DeviceRequest : int { Cpu = 0, Cuda = 1, Auto = 2 };  // where a layer is asked to run

template <class E>
struct EnumName {
  E value;
  const char* name;
};

// The first entry of each table is the default.
constexpr EnumName<Routing> kRoutingNames[] = {{Routing::SoftmaxTopkRenorm, "softmax-topk-renorm"},
                                               {Routing::SoftmaxTopk, "softmax-topk"},
                                               {Routing::SigmoidTopk, "sigmoid-topk"},
                                               {Routing::SigmoidTopkRenorm, "sigmoid-topk-renorm"}};
constexpr EnumName<GroupScore> kGroupScoreNames[] = {{GroupScore::Max, "max"}, {GroupScore::Top2Sum, "top2-sum"}};
constexpr EnumName<DType> kDTypeNames[] = {{DType::F32, "float32"}, {DType::BF16, "bfloat16"}, {DType::F16, "float16"}};
constexpr EnumName<Quant> kQuantNames[] = {{Quant::None, "none"}, {Quant::Int8, "int8"}, {Quant::Int4, "int4"}};
constexpr EnumName<DeviceRequest> kDeviceNames[] = {
    {DeviceRequest::Cpu, "cpu"}, {DeviceRequest::Cuda, "cuda"}, {DeviceRequest::Auto, "auto"}};

template <class E, size_t N>
constexpr const char* enum_name(const EnumName<E> (&table)[N], E v) {
  for (const EnumName<E>& n : table)
    if (n.value == v) return n.name;
  return "unknown";
}

template <class E, size_t N>
constexpr bool enum_known(const EnumName<E> (&table)[N], E v) {
  for (const EnumName<E>& n : table)
    if (n.value == v) return true;
  return false;
}

// "'a', 'b' or 'c'": the allowed names, for messages.
template <class E, size_t N>
std::string enum_choices(const EnumName<E> (&table)[N]) {
  std::string s;
  for (size_t i = 0; i < N; i++) {
    if (i) s += i + 1 == N ? " or " : ", ";
    s += std::string("'") + table[i].name + "'";
  }
  return s;
}

// The value named `name`; throws MoeException(Invalid) "<field> must be <choices>, got '<name>'".
template <class E, size_t N>
E parse_enum(const EnumName<E> (&table)[N], const char* field, const std::string& name) {
  for (const EnumName<E>& n : table)
    if (name == n.name) return n.value;
  fail(ErrorCode::Invalid, std::string(field) + " must be " + enum_choices(table) + ", got '" + name + "'");
}

inline const char* routing_name(Routing r) { return enum_name(kRoutingNames, r); }
inline bool routing_renormalises(Routing r) {
  return r == Routing::SoftmaxTopkRenorm || r == Routing::SigmoidTopkRenorm;
}
inline bool routing_sigmoid(Routing r) { return r == Routing::SigmoidTopk || r == Routing::SigmoidTopkRenorm; }
inline const char* dtype_name(DType dt) { return enum_name(kDTypeNames, dt); }
inline const char* quant_name(Quant q) { return enum_name(kQuantNames, q); }
inline const char* device_name(DeviceRequest d) { return enum_name(kDeviceNames, d); }

}  // namespace fmoe
