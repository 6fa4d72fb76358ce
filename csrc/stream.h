// Streamed frames (FORMAT.md section 3.1): a large top-level list, tuple or
// dict travels as several messages, each sent as soon as it is encoded and
// decoded as soon as it arrives, so the source's encode, the transfer and
// the receivers' decode overlap.
//
// One EncoderSession (DecoderSession) lives for the whole stream, so class
// definitions and shared references made in one segment are meaningful in
// the next: the bytes of all segments together are one message in the
// sense of FORMAT.md sections 1.1 and 1.2. Segments end only between items
// of the top-level container.
#pragma once

#include <Python.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "decoder.h"
#include "encoder.h"
#include "frame.h"
#include "wire.h"

namespace fastbcast {

// A message's bytes: block[0, len) (block is a whole pool block, at least
// segment_bytes long past message 0), and its CUDA tensors.
struct StreamMessage {
  at::Tensor block;
  size_t len = 0;
  uint64_t items = 0;
  uint64_t device_len = 0;
  std::vector<at::Tensor> cuda;
  bool last = false;
};

// Message 0's size of a stream over shared memory, where later messages
// double up to the segment size: a scheduler step of a few requests
// (tens of KiB) then streams in a few messages, and receivers decode the
// first requests while the source encodes the rest.
inline constexpr uint64_t kShmFirstSegmentBytes = uint64_t(8) << 10;

// The source's side. `obj` must be an exact list, tuple or dict (held).
class StreamEncoder {
 public:
  // opts.cuda_tensors is ignored: collect_cuda gathers CUDA tensors per segment.
  // first_segment (0: segment_bytes) is message 0's size; each later
  // message's doubles up to segment_bytes. Only a transport whose receivers
  // need not know a message's size before it arrives (shared memory) may
  // ask for it: a small first message starts the receivers' decode early.
  StreamEncoder(PyObject* obj, uint64_t segment_bytes, const EncodeOptions& opts, bool collect_cuda,
                uint64_t first_segment = 0);
  ~StreamEncoder();
  StreamEncoder(const StreamEncoder&) = delete;
  StreamEncoder& operator=(const StreamEncoder&) = delete;

  // Message 0 in a block of at least min_capacity. If the whole container
  // ends within segment_bytes (or its last item takes it past), it is an
  // ordinary frame (no FLAG_STREAM), byte for byte what encode_object
  // writes, and *streaming is false. false: Python error set.
  bool first(FrameHeader h, uint16_t version, size_t min_capacity, StreamMessage* out, bool* streaming);
  // The next segment; out->last on the final one. false: Python error set.
  bool next(StreamMessage* out);
  // A segment that ends the stream with a message for the receivers (the
  // source failed mid-stream); ordinary memory when the pool is full.
  // unsent: the segment next() returned last is dropped (over max_bytes),
  // so the error segment takes its index.
  StreamMessage error_segment(const std::string& message, bool unsent = false);
  uint64_t segment_bytes() const { return segment_bytes_; }

 private:
  bool encode_next();
  // The size the segment being made aims at.
  uint64_t target() const {
    return first_segment_ ? std::min(segment_bytes_, first_segment_ << std::min<uint32_t>(index_, 30)) : segment_bytes_;
  }
  bool segment(size_t min_bytes, size_t room, StreamMessage* out);
  // Hands out the current block as a segment of `items` items; from
  // carry_from (if not 0) on, its bytes move to the next segment's block.
  bool close(uint64_t items, size_t carry_from, StreamMessage* out);

  PyObject* obj_;
  StreamKind kind_;
  uint64_t n_;
  uint64_t segment_bytes_;
  uint64_t first_segment_;
  bool compat_;
  std::vector<at::Tensor> cuda_;
  EncoderSession session_;
  uint64_t next_ = 0;       // items encoded so far
  Py_ssize_t dict_pos_ = 0;
  uint32_t index_ = 0;      // segments made so far
  bool open_ = false;       // the session's block already holds the next segment's start
  uint64_t carried_ = 0;    // items in it
};

// A receiver's side: made from message 0 (a frame with FLAG_STREAM).
class StreamDecoder {
 public:
  // Reads the prologue; false with DecodeError set if it is not one.
  StreamDecoder(const DecodeOptions& opts);
  ~StreamDecoder();
  bool open(const uint8_t* frame, size_t frame_len, uint64_t payload_len);
  // The header of the next segment, from the first bytes of its message
  // (message 0: the whole frame). Sets the message's length, device_len and
  // flags. false with DecodeError set if it is not the segment expected.
  bool segment(const uint8_t* msg, size_t avail, uint64_t* message_len, uint64_t* device_len, uint16_t* flags);
  // Decodes the segment whose header was read last; `msg` holds the whole message.
  bool decode(const uint8_t* msg, size_t avail, const at::Tensor* device_buffer);
  // An error segment's text.
  std::string error_text(const uint8_t* msg, size_t avail) const;
  // The container, once the last segment is decoded (new reference).
  PyObject* result();

  uint64_t segment_bytes() const { return segment_bytes_; }

 private:
  bool fail(const std::string& what);
  bool whole(size_t avail);

  DecoderSession session_;
  PyObject* out_ = nullptr;   // list (list and tuple streams) or dict
  StreamKind kind_ = STREAM_LIST;
  uint64_t n_ = 0;
  uint64_t segment_bytes_ = 0;
  uint64_t decoded_ = 0;      // items announced by segment headers so far
  uint32_t index_ = 0;        // the next segment's index
  size_t body_ = 0;           // the pending segment: body offset in its message, length, items
  size_t body_len_ = 0;
  uint64_t items_ = 0;
  size_t base_ = 0;           // bytes of the stream before the pending message (for error offsets)
  size_t msg_len_ = 0;
  bool done_ = false;
};

}  // namespace fastbcast
