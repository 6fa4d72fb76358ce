// MessagePack (FORMAT.md) -> Python objects. The input is untrusted: every
// read is bounds-checked through one primitive, no length is believed before
// the bytes behind it are known to exist, and failures raise
// fastbcast.DecodeError naming the offset.
#pragma once

#include <Python.h>

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <memory>

namespace fastbcast {

struct DecodeOptions {
  bool allow_pickle = false;
  PyObject* trusted = nullptr;                  // tuple of module prefixes (borrowed) or NULL
  const at::Tensor* device_buffer = nullptr;    // the broadcast's device buffer, for EXT_CUDA_REF
};

// Decodes the single value that fills [data, data + len). Returns a new
// reference, or NULL with fastbcast.DecodeError set. `base_offset` is added
// to offsets in error messages (the value's position in a larger frame).
PyObject* decode_object(const uint8_t* data, size_t len, const DecodeOptions& opts, size_t base_offset = 0);

// One decoder whose memo and class table last across several inputs: the
// segments of a streamed frame (stream.h). The options are copied; their
// `trusted` tuple must outlive the session.
class DecoderSession {
 public:
  explicit DecoderSession(const DecodeOptions& opts);
  ~DecoderSession();
  // Decodes `count` values that fill [data, data + len) exactly and appends
  // them to the list `out`, or `count` key/value pairs into the dict `out`.
  // false with fastbcast.DecodeError set (offsets counted from `base`).
  bool values(const uint8_t* data, size_t len, size_t base, uint64_t count, PyObject* out,
              const at::Tensor* device_buffer);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The fastbcast.DecodeError class (a ValueError subclass); created once by
// the module init and kept for the life of the process.
PyObject* decode_error_type();
void set_decode_error_type(PyObject* cls);

}  // namespace fastbcast
