// The broadcast frame header (FORMAT.md section 3): written by the source in
// front of the encoded value, read by every receiver from the first chunk.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "wire.h"

namespace fastbcast {

void write_header(uint8_t* dst, const FrameHeader& h);

// Parses the 32 header bytes. Returns false with `error` set if the magic is
// wrong; a version mismatch is left to the caller, who knows both versions.
bool read_header(const uint8_t* src, size_t len, FrameHeader* h, std::string* error);

}  // namespace fastbcast
