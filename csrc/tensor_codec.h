// The torch-facing half of the codec: recognising tensors among Python
// objects, the dtype codes of FORMAT.md, and building tensors on decode.
// Kept apart so that only this file includes torch's Python headers.
#pragma once

#include <Python.h>

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace fastbcast {

// True for an object whose exact type is torch.Tensor.
bool is_exact_tensor(PyObject* o);
// torch.Tensor itself (borrowed).
PyObject* tensor_class();
// The tensor behind a torch.Tensor object or an instance of a subclass.
const at::Tensor& unpack_tensor(PyObject* o);
// A new reference to a Python torch.Tensor owning `t`.
PyObject* wrap_tensor(at::Tensor t);

// FORMAT.md dtype code for a ScalarType, or -1 if it has none.
int dtype_code(at::ScalarType t);
// ScalarType for a dtype code, or nullopt for an unknown code.
std::optional<at::ScalarType> dtype_from_code(uint8_t code);

}  // namespace fastbcast
