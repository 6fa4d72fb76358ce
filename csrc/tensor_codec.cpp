#include "tensor_codec.h"

#include <torch/csrc/autograd/python_variable.h>

namespace fastbcast {

namespace {

// Index = FORMAT.md dtype code. Append only.
constexpr at::ScalarType kDtypes[] = {
    at::kBool,          at::kByte,           at::kChar,         at::kShort,          at::kInt,
    at::kLong,          at::kHalf,           at::kBFloat16,     at::kFloat,          at::kDouble,
    at::kComplexFloat,  at::kComplexDouble,  at::kFloat8_e4m3fn, at::kFloat8_e5m2,   at::kFloat8_e4m3fnuz,
    at::kFloat8_e5m2fnuz, at::kUInt16,       at::kUInt32,       at::kUInt64,
};
constexpr int kNumDtypes = sizeof(kDtypes) / sizeof(kDtypes[0]);

}  // namespace

// THPVariable_CheckExact also accepts nn.Parameter: a subclass must keep its
// class, so only torch.Tensor itself is a plain tensor here.
bool is_exact_tensor(PyObject* o) { return reinterpret_cast<PyObject*>(Py_TYPE(o)) == THPVariableClass; }

PyObject* tensor_class() { return THPVariableClass; }

const at::Tensor& unpack_tensor(PyObject* o) { return THPVariable_Unpack(o); }

PyObject* wrap_tensor(at::Tensor t) { return THPVariable_Wrap(std::move(t)); }

int dtype_code(at::ScalarType t) {
  for (int i = 0; i < kNumDtypes; ++i)
    if (kDtypes[i] == t) return i;
  return -1;
}

std::optional<at::ScalarType> dtype_from_code(uint8_t code) {
  if (code >= kNumDtypes) return std::nullopt;
  return kDtypes[code];
}

}  // namespace fastbcast
