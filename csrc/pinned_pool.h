// A pool of host buffers that the encoder writes into and the broadcast path
// copies from. On a machine with CUDA the buffers are pinned (page-locked), so
// host<->device copies run asynchronously at full bandwidth; without CUDA they
// are ordinary host memory.
//
// A buffer is lent out as a uint8 tensor and is free again once nobody else
// holds it: the pool keeps one handle of its own and treats a block as idle
// when that handle is the only reference to the block and to its storage.
// So views returned to Python keep their buffer busy exactly as long as they
// live, and nothing has to be "released" by hand.
//
// This is process-wide state (one pool per process, documented in README's
// configuration section): allocating pinned memory costs milliseconds per
// call, which is the reason to pool it at all.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <mutex>
#include <vector>

namespace fastbcast {

enum class PinMode { PAGEABLE, TORCH_PINNED, REGISTERED };

struct PoolStats {
  size_t blocks = 0;        // buffers held by the pool
  size_t bytes = 0;         // their total capacity
  size_t busy_blocks = 0;   // buffers referenced from outside the pool now
  size_t busy_bytes = 0;
  size_t limit = 0;         // cap on `bytes`
  size_t allocations = 0;   // buffers ever allocated (reuse keeps this flat)
  bool pinned = false;
  const char* mode = "pageable";  // "pinned", "registered" or "pageable"
};

class PinnedPool {
 public:
  static PinnedPool& instance();

  // A whole block of at least `min_bytes` (rounded up to a power of two, at
  // least kMinBlock). Throws c10::Error when the cap would be exceeded by
  // buffers that are all still in use.
  at::Tensor acquire(size_t min_bytes);

  PoolStats stats();
  // Frees every idle block; returns the bytes freed.
  size_t shrink();
  void set_limit(size_t bytes);

  static constexpr size_t kMinBlock = size_t(64) << 10;
  // acquire() reuses an idle block at most kMaxOversize times the rounded
  // request, or any idle block up to kReuseAnyBelow.
  static constexpr size_t kMaxOversize = 8;
  static constexpr size_t kReuseAnyBelow = size_t(1) << 20;

 private:
  PinnedPool();
  static bool idle(const at::Tensor& t);

  std::mutex mu_;
  std::vector<at::Tensor> blocks_;
  size_t bytes_ = 0;
  size_t limit_;
  size_t allocations_ = 0;
  PinMode mode_;
};

}  // namespace fastbcast
