#include "frame.h"

#include <cstring>

namespace fastbcast {

void write_header(uint8_t* dst, const FrameHeader& h) {
  std::memset(dst, 0, kHeaderBytes);
  std::memcpy(dst, kMagic, 4);
  store_le<uint16_t>(dst + 4, h.version);
  store_le<uint16_t>(dst + 6, h.flags);
  store_le<uint64_t>(dst + 8, h.payload_len);
  store_le<uint32_t>(dst + 16, h.first_chunk);
  store_le<uint32_t>(dst + 20, h.chunk);
  store_le<uint64_t>(dst + 24, h.device_len);
}

bool read_header(const uint8_t* src, size_t len, FrameHeader* h, std::string* error) {
  if (len < kHeaderBytes) {
    *error = "frame shorter than its " + std::to_string(kHeaderBytes) + "-byte header";
    return false;
  }
  if (std::memcmp(src, kMagic, 4) != 0) {
    char got[64];
    std::snprintf(got, sizeof got, "%02x %02x %02x %02x", src[0], src[1], src[2], src[3]);
    *error = std::string("corrupt frame header: magic bytes are ") + got + ", expected 46 42 43 01 (\"FBC\\x01\")";
    return false;
  }
  h->version = load_le<uint16_t>(src + 4);
  h->flags = load_le<uint16_t>(src + 6);
  h->payload_len = load_le<uint64_t>(src + 8);
  h->first_chunk = load_le<uint32_t>(src + 16);
  h->chunk = load_le<uint32_t>(src + 20);
  h->device_len = load_le<uint64_t>(src + 24);
  return true;
}

}  // namespace fastbcast
