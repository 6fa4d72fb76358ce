#include "group_collective.h"

#include <chrono>
#include <cmath>

#include "pinned_pool.h"

namespace fastbcast {

GroupCollective::GroupCollective(c10::intrusive_ptr<c10d::ProcessGroup> pg, uint32_t first_chunk, uint32_t chunk)
    : pg_(std::move(pg)),
      first_chunk_(first_chunk),
      chunk_(chunk),
      scratch_(std::make_shared<std::vector<uint8_t>>(first_chunk)) {}

at::Tensor GroupCollective::scratch_tensor() const {
  return at::from_blob(
      scratch_->data(), {int64_t(first_chunk_)}, [keep = scratch_](void*) {}, at::TensorOptions(at::kByte));
}

at::Tensor& GroupCollective::buffer() {
  if (!buffer_.defined()) buffer_ = PinnedPool::instance().acquire(first_chunk_);
  return buffer_;
}

namespace {

// c10d's errors as CollectiveFailed, keeping their class for the message.
template <typename F>
auto translated(F f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::DistBackendError& e) {
    throw CollectiveFailed("DistBackendError", e.what_without_backtrace());
  } catch (const c10::DistNetworkError& e) {
    throw CollectiveFailed("DistNetworkError", e.what_without_backtrace());
  } catch (const c10::DistStoreError& e) {
    throw CollectiveFailed("DistStoreError", e.what_without_backtrace());
  } catch (const c10::Error& e) {
    throw CollectiveFailed("RuntimeError", e.what_without_backtrace());
  } catch (const CollectiveFailed&) {
    throw;
  } catch (const std::exception& e) {
    throw CollectiveFailed("RuntimeError", e.what());
  }
}

}  // namespace

c10::intrusive_ptr<c10d::Work> GroupCollective::post(const at::Tensor& t, int root) {
  ++collectives_;
  std::vector<at::Tensor> tensors{t};
  c10d::BroadcastOptions opts;
  opts.rootRank = root;
  opts.rootTensor = 0;
  return translated([&] { return pg_->broadcast(tensors, opts); });
}

void GroupCollective::wait_for(const c10::intrusive_ptr<c10d::Work>& work, double timeout_s) {
  translated([&] {
    if (timeout_s < 0) {
      work->wait();
    } else {
      // Rounded up: a wait of 0 ms would mean "no timeout" to some backends.
      auto ms = std::chrono::milliseconds(std::max<int64_t>(1, int64_t(std::ceil(timeout_s * 1e3))));
      work->wait(ms);
    }
  });
}

void GroupCollective::broadcast(const at::Tensor& t, int root, double timeout_s) {
  wait_for(post(t, root), timeout_s);
}

}  // namespace fastbcast
