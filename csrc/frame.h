// The broadcast frame (FORMAT.md section 3): the header the source writes in
// front of the encoded value, read by every receiver from the first bytes it
// gets, and the device buffer that carries a frame's CUDA tensors.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "encoder.h"
#include "wire.h"

namespace fastbcast {

// Writes the kHeaderBytes header; h.payload_len is the value's length.
void write_header(uint8_t* dst, const FrameHeader& h, uint16_t version);

// Parses a header. Returns false with `error` set if the bytes are not a
// frame (wrong magic, too short, a length that overflows). A version other
// than `version` is not an error here: only the fixed part is read then
// (frame_len is set, so the caller can drain the frame and report both
// versions); payload_len and seq are left 0.
bool read_header(const uint8_t* src, size_t len, uint16_t version, FrameHeader* h, std::string* error);

// The device buffer of a frame: every tensor's bytes, each aligned to
// kDeviceAlign (encoder.h, where the EXT_CUDA_REF offsets into it are
// computed), in one uint8 tensor on `device`.
at::Tensor pack_device_buffer(const std::vector<at::Tensor>& tensors, uint64_t device_len, at::Device device);

}  // namespace fastbcast
