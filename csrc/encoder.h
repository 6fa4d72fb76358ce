// Python object -> MessagePack (FORMAT.md), written straight into a block of
// the pinned pool in one walk of the object tree.
#pragma once

#include <Python.h>

#include <ATen/ATen.h>

#include <cstddef>
#include <memory>
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
  // When set, the value is written here while it needs no more than
  // scratch_limit bytes, and into a pool block beyond that.
  std::vector<uint8_t>* scratch = nullptr;
  size_t scratch_limit = 0;
};

struct Encoded {
  at::Tensor block;          // a whole pool block, or undefined when the bytes are in opts.scratch
  uint8_t* data = nullptr;   // bytes [0, len) of the encoding, in block or scratch
  size_t len = 0;            // reserve + value bytes
  uint64_t device_len = 0;   // bytes of the device buffer the CUDA refs point into
};

// Returns false with a Python exception set. TypeError names the path to an
// unsupported object (`data[0]['messages'][2].content: unsupported type Foo`),
// including a class the receivers would not rebuild; ValueError (without
// allow_pickle) for reference cycles through containers and nesting past
// kMaxDepth. With allow_pickle a value holding such a cycle is written as one
// pickle, so receivers get pickle's result. An exception that is not
// an Exception (KeyboardInterrupt, SystemExit) raised by user code reaches
// the caller unchanged.
bool encode_object(PyObject* obj, const EncodeOptions& opts, Encoded* out);

// One encoder whose memo and class table last across several blocks: the
// segments of a streamed frame (stream.h). Each call encodes one item (or
// key/value pair) of the top-level container at the end of the current
// block; a failure sets the Python exception with the item's path, as
// encode_object does. The options are copied; their `trusted` tuple and
// `cuda_tensors` vector must outlive the session.
class EncoderSession {
 public:
  explicit EncoderSession(const EncodeOptions& opts);
  ~EncoderSession();
  // A new block of at least min_bytes whose first `room` bytes are left free.
  bool open(size_t min_bytes, size_t room);
  // pickle_cycles (allow_pickle only): an item holding a reference cycle
  // that does not run through the container travels as its own pickle.
  bool item(PyObject* container, Py_ssize_t index, PyObject* value, bool pickle_cycles = false);
  bool pair(PyObject* container, PyObject* key, PyObject* value, bool pickle_cycles = false);
  // After a failed item: a reference cycle failed it (allow_pickle only).
  bool found_cycle() const;
  // Starts over with one block of at least min_bytes holding, after `room`
  // free bytes, the whole of obj as one pickle.
  bool pickle_whole(PyObject* obj, size_t min_bytes, size_t room);
  bool append(const uint8_t* p, size_t n);
  uint8_t* data();
  size_t len() const;
  void truncate(size_t n);
  at::Tensor block() const;
  // Bytes of CUDA tensors collected since the last call (their device buffer).
  uint64_t take_device_len();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// 16-byte alignment of tensors inside the broadcast's device buffer.
inline constexpr size_t kDeviceAlign = 16;

}  // namespace fastbcast
