// Python object -> MessagePack (FORMAT.md), written straight into a block of
// the pinned pool in one walk of the object tree.
#pragma once

#include <Python.h>

#include <ATen/ATen.h>

#include <cstddef>
#include <vector>

namespace fastbcast {

struct EncodeOptions {
  bool compat = false;        // plain MessagePack only (no ext types)
  bool allow_pickle = false;  // unsupported leaves travel as EXT_PICKLE
  PyObject* trusted = nullptr;  // tuple of module prefixes (borrowed) or NULL: classes under them travel natively
  size_t reserve = 0;         // bytes left free in front of the value (room for a frame header)
  size_t min_capacity = 0;    // the block is at least this big (a broadcast's first chunk, or its caller's
                              // size hint: the previous frame's size on that Broadcaster)
  // Broadcast only: CUDA tensors are appended here and written as EXT_CUDA_REF
  // pointing into one device buffer laid out 16-byte aligned. NULL: a CUDA
  // tensor is a TypeError.
  std::vector<at::Tensor>* cuda_tensors = nullptr;
};

struct Encoded {
  at::Tensor block;          // a whole pool block; bytes [0, len) are valid
  size_t len = 0;            // reserve + value bytes
  uint64_t device_len = 0;   // bytes of the device buffer the CUDA refs point into
};

// Returns false with a Python exception set. TypeError names the path to an
// unsupported object (`data[0]['messages'][2].content: unsupported type Foo`),
// including a class the receivers would not rebuild; ValueError for cycles
// and (without allow_pickle) nesting past kMaxDepth. An exception that is not
// an Exception (KeyboardInterrupt, SystemExit) raised by user code reaches
// the caller unchanged.
bool encode_object(PyObject* obj, const EncodeOptions& opts, Encoded* out);

// 16-byte alignment of tensors inside the broadcast's device buffer.
inline constexpr size_t kDeviceAlign = 16;

}  // namespace fastbcast
