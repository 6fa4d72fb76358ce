#include "pinned_pool.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#ifdef FASTBCAST_WITH_CUDA
#include <cuda_runtime.h>
#include <sys/mman.h>
#endif

#include "exception.h"

namespace fastbcast {

namespace {

size_t round_up_pow2(size_t n) {
  size_t p = PinnedPool::kMinBlock;
  while (p < n) p <<= 1;
  return p;
}

size_t default_limit() {
  // FASTBCAST_POOL_LIMIT_MB overrides the 8 GiB default.
  if (const char* s = std::getenv("FASTBCAST_POOL_LIMIT_MB")) {
    char* end = nullptr;
    unsigned long long mb = std::strtoull(s, &end, 10);
    if (end != s && *end == '\0') return size_t(mb) << 20;
  }
  return size_t(8) << 30;
}

bool cuda_usable() {
  // Pinning needs a CUDA driver and at least one device; a CUDA build of torch
  // on a machine without GPUs must fall back to ordinary memory.
  try {
    return at::globalContext().hasCUDA();
  } catch (...) {
    return false;
  }
}

// FASTBCAST_PINNED chooses how pool memory is made:
//   "1" (default): torch's pinned allocator (cudaHostAlloc);
//   "register": 2 MiB-aligned memory advised to use transparent huge pages,
//     then page-locked with cudaHostRegister. The CPU walks it with fewer TLB
//     misses, which measured faster for encode/decode on some hosts;
//   "0": ordinary pageable memory; host<->device copies then go through the
//     driver's staging buffers.
// Without CUDA the pool is always ordinary memory.
PinMode pin_mode() {
  if (!cuda_usable()) return PinMode::PAGEABLE;
  const char* s = std::getenv("FASTBCAST_PINNED");
  std::string v = s ? s : "1";
  if (v == "0") return PinMode::PAGEABLE;
#ifdef FASTBCAST_WITH_CUDA
  if (v == "register") return PinMode::REGISTERED;
#endif
  return PinMode::TORCH_PINNED;
}

constexpr size_t kHugePage = size_t(2) << 20;

#ifdef FASTBCAST_WITH_CUDA
at::Tensor alloc_registered(size_t n) {
  constexpr size_t kHuge = kHugePage;
  size_t len = (n + kHuge - 1) / kHuge * kHuge;
  void* p = std::aligned_alloc(kHuge, len);
  FB_CHECK(p, "cannot allocate ", len, " bytes of host memory");
  madvise(p, len, MADV_HUGEPAGE);  // a hint: without THP the memory still works
  std::memset(p, 0, len);          // fault the pages in before locking them
  cudaError_t err = cudaHostRegister(p, len, cudaHostRegisterDefault);
  if (err != cudaSuccess) {
    std::free(p);
    FB_CHECK(false, "cudaHostRegister of ", len, " bytes failed: ", cudaGetErrorString(err));
  }
  return at::from_blob(
      p, {int64_t(n)},
      [](void* q) {
        cudaHostUnregister(q);
        std::free(q);
      },
      at::TensorOptions().dtype(at::kByte));
}
#endif

}  // namespace

PinnedPool& PinnedPool::instance() {
  static PinnedPool* pool = new PinnedPool();  // never destroyed: tensors may outlive static destructors
  return *pool;
}

PinnedPool::PinnedPool() : limit_(default_limit()), mode_(pin_mode()) {}

bool PinnedPool::idle(const at::Tensor& t) {
  return t.use_count() == 1 && t.storage().use_count() == 1;
}

at::Tensor PinnedPool::acquire(size_t min_bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  // An idle block far larger than asked for is left alone: handing it to a
  // small object would keep it busy as long as that object lives (after one
  // large encode, three small ones held 537 MB in issue 12). A new small
  // block costs one allocation, once.
  const size_t largest = std::max({round_up_pow2(min_bytes) * kMaxOversize, kReuseAnyBelow,
                                   mode_ == PinMode::REGISTERED ? kHugePage : 0});
  at::Tensor* best = nullptr;
  for (auto& b : blocks_) {
    size_t n = size_t(b.numel());
    if (n >= min_bytes && n <= largest && idle(b) && (!best || b.numel() < best->numel())) best = &b;
  }
  // Hand out an alias (a new TensorImpl over the same storage), never the
  // pool's own handle: once torch has wrapped a TensorImpl in a Python object
  // that impl stays referenced after the Python object is gone, so a block
  // whose own handle reached Python (pool_acquire, encode_frame, error_frame)
  // would look busy forever and the pool would grow by one block per call.
  if (best) return best->alias();

  size_t want = round_up_pow2(min_bytes);
  // Registered memory is made in whole 2 MiB huge pages: a block is as large
  // as what it pins, so the pool's count and limit see every byte.
  if (mode_ == PinMode::REGISTERED) want = std::max(want, kHugePage);
  if (bytes_ + want > limit_) {
    // Free idle blocks until the new one fits.
    std::vector<at::Tensor> keep;
    for (auto& b : blocks_) {
      if (bytes_ + want > limit_ && idle(b)) {
        bytes_ -= b.numel();
      } else {
        keep.push_back(std::move(b));
      }
    }
    blocks_.swap(keep);
  }
  FB_CHECK(bytes_ + want <= limit_, "pinned pool exhausted: a ", want, "-byte buffer is needed but ", bytes_,
           " of the ", limit_, "-byte limit are held by live buffers (results of fastbcast.encode still referenced?). "
           "Raise it with fastbcast.set_pool_limit() or FASTBCAST_POOL_LIMIT_MB.");
  at::Tensor t;
#ifdef FASTBCAST_WITH_CUDA
  if (mode_ == PinMode::REGISTERED) t = alloc_registered(want);
#endif
  if (!t.defined()) {
    auto opts = at::TensorOptions().dtype(at::kByte).pinned_memory(mode_ == PinMode::TORCH_PINNED);
    t = at::empty({int64_t(want)}, opts);
  }
  blocks_.push_back(t);
  bytes_ += want;
  allocations_ += 1;
  return t.alias();
}

PoolStats PinnedPool::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  PoolStats s;
  s.blocks = blocks_.size();
  s.bytes = bytes_;
  s.limit = limit_;
  s.allocations = allocations_;
  s.pinned = mode_ != PinMode::PAGEABLE;
  s.mode = mode_ == PinMode::PAGEABLE ? "pageable" : mode_ == PinMode::REGISTERED ? "registered" : "pinned";
  for (auto& b : blocks_) {
    if (!idle(b)) {
      s.busy_blocks += 1;
      s.busy_bytes += b.numel();
    }
  }
  return s;
}

size_t PinnedPool::shrink() {
  std::lock_guard<std::mutex> lock(mu_);
  size_t freed = 0;
  std::vector<at::Tensor> keep;
  for (auto& b : blocks_) {
    if (idle(b)) {
      freed += b.numel();
    } else {
      keep.push_back(std::move(b));
    }
  }
  blocks_.swap(keep);
  bytes_ -= freed;
  return freed;
}

void PinnedPool::set_limit(size_t bytes) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    limit_ = bytes;
  }
  if (stats().bytes > bytes) shrink();
}

}  // namespace fastbcast
