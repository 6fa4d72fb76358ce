#include "frame.h"

#include <cstdio>
#include <cstring>

namespace fastbcast {

void write_header(uint8_t* dst, const FrameHeader& h, uint16_t version) {
  std::memset(dst, 0, kHeaderBytes);
  std::memcpy(dst, kMagic, 4);
  store_le<uint16_t>(dst + 4, version);
  store_le<uint16_t>(dst + 6, h.flags);
  store_le<uint64_t>(dst + 8, (kHeaderBytes - kFixedHeaderBytes) + h.payload_len);
  store_le<uint32_t>(dst + 16, h.first_chunk);
  store_le<uint32_t>(dst + 20, h.chunk);
  store_le<uint64_t>(dst + 24, h.device_len);
  store_le<uint64_t>(dst + 32, h.seq);
}

bool read_header(const uint8_t* src, size_t len, uint16_t version, FrameHeader* h, std::string* error) {
  if (len < kFixedHeaderBytes) {
    *error = "frame shorter than its " + std::to_string(kFixedHeaderBytes) + "-byte fixed header";
    return false;
  }
  if (std::memcmp(src, kMagic, 4) != 0) {
    char got[64];
    std::snprintf(got, sizeof got, "%02x %02x %02x %02x", src[0], src[1], src[2], src[3]);
    *error = std::string("corrupt frame header: magic bytes are ") + got + ", expected 46 42 43 01 (\"FBC\\x01\")";
    return false;
  }
  *h = FrameHeader{};
  h->version = load_le<uint16_t>(src + 4);
  h->flags = load_le<uint16_t>(src + 6);
  uint64_t rest = load_le<uint64_t>(src + 8);
  h->first_chunk = load_le<uint32_t>(src + 16);
  h->chunk = load_le<uint32_t>(src + 20);
  h->device_len = load_le<uint64_t>(src + 24);
  if (rest > (uint64_t(1) << 62) || h->device_len > (uint64_t(1) << 62)) {
    *error = "corrupt frame header: length " + std::to_string(rest) + " / device length " +
             std::to_string(h->device_len) + " is not a real size";
    return false;
  }
  h->frame_len = kFixedHeaderBytes + rest;
  if (h->version != version) return true;
  if (len < kHeaderBytes || rest < kHeaderBytes - kFixedHeaderBytes) {
    *error = "corrupt frame header: shorter than the " + std::to_string(kHeaderBytes) + "-byte header of version " +
             std::to_string(version);
    return false;
  }
  h->payload_len = rest - (kHeaderBytes - kFixedHeaderBytes);
  h->seq = load_le<uint64_t>(src + 32);
  return true;
}

at::Tensor pack_device_buffer(const std::vector<at::Tensor>& tensors, uint64_t device_len, at::Device device) {
  at::Tensor flat = at::empty({int64_t(device_len)}, at::TensorOptions().dtype(at::kByte).device(device));
  uint64_t off = 0;
  for (const at::Tensor& t : tensors) {
    off = (off + kDeviceAlign - 1) / kDeviceAlign * kDeviceAlign;
    int64_t n = t.numel() * int64_t(t.element_size());
    if (n) flat.narrow(0, int64_t(off), n).copy_(t.reshape({-1}).view(at::kByte));
    off += uint64_t(n);
  }
  return flat;
}

}  // namespace fastbcast
