#include "shm_channel.h"

#include <algorithm>
#include <cstring>

#include "pinned_pool.h"

namespace fastbcast {

namespace {
// No real message comes near this; a larger msg_len is garbage, refused
// before anything is allocated for it.
constexpr uint64_t kMaxMessage = uint64_t(1) << 48;

// Runs `f`; if it throws, `on_fail` sees the exception's text first.
template <class F, class G>
auto guarded(F f, G on_fail) -> decltype(f()) {
  try {
    return f();
  } catch (const std::exception& e) {
    on_fail(e.what());
    throw;
  }
}
}  // namespace

std::shared_ptr<ShmChannel> ShmChannel::create(const std::string& name, const std::vector<int>& ranks,
                                               const std::vector<int>& pids, uint32_t n_slots, uint64_t slot_bytes) {
  return std::shared_ptr<ShmChannel>(new ShmChannel(ShmRing::create(name, ranks, pids, n_slots, slot_bytes)));
}

std::shared_ptr<ShmChannel> ShmChannel::attach(const std::string& name, int reader, const std::vector<int>& ranks,
                                               const std::vector<int>& pids, const WaitPolicy& policy) {
  return std::shared_ptr<ShmChannel>(new ShmChannel(ShmRing::attach(name, reader, ranks, pids, policy)));
}

void ShmChannel::check_usable(bool writer) const {
  if (ring_->is_writer() != writer)
    throw std::runtime_error(std::string("fastbcast: ") + (writer ? "send()" : "recv()") + " on the " +
                             (ring_->is_writer() ? "writer" : "a reader") + "'s end of shm channel '" + ring_->name() +
                             "'");
  if (!broken_.empty())
    throw std::runtime_error("fastbcast: shm channel '" + ring_->name() + "' can no longer be used: " + broken_ +
                             "; close it and make a new one");
}

void ShmChannel::corrupt(const std::string& what) {
  std::string msg = "fastbcast shm channel '" + ring_->name() + "': global rank " +
                    std::to_string(ring_->rank_of(ring_->reader_index() + 1)) + " received a corrupt slot: " + what;
  broken_ = msg;
  throw ShmCorrupt(msg);
}

void ShmChannel::send(const uint8_t* data, uint64_t nbytes, const WaitPolicy& policy) {
  check_usable(true);
  sending_ = true;
  ring_->check_readers();
  const uint64_t sb = ring_->slot_bytes();
  const uint64_t n_slots = nbytes == 0 ? 1 : (nbytes + sb - 1) / sb;
  const uint64_t seq = msg_seq_ + 1;
  uint64_t off = 0;
  for (uint64_t i = 0; i < n_slots; ++i) {
    uint8_t* p;
    SlotHeader* h = guarded([&] { return ring_->acquire_write(policy, &p); },
                            [&](const char* why) {
                              if (i > 0)
                                broken_ = "a send stopped after " + std::to_string(i) + " of its " +
                                          std::to_string(n_slots) + " slots: " + why;
                            });
    uint32_t n = uint32_t(std::min(sb, nbytes - off));
    if (n) std::memcpy(p, data + off, n);  // an empty tensor's data may be null
    h->msg_seq = seq;
    h->msg_len = nbytes;
    h->index = uint32_t(i);
    h->nbytes = n;
    ring_->publish();
    off += n;
  }
  msg_seq_ = seq;
  sending_ = false;
}

void ShmChannel::check_slot(const SlotHeader& s, uint64_t seq, uint64_t index, uint64_t msg_len,
                            uint64_t remaining) {
  const uint64_t sb = ring_->slot_bytes();
  if (s.msg_seq != seq)
    corrupt("slot of message " + std::to_string(s.msg_seq) + " where message " + std::to_string(seq) +
            " was expected (a message was skipped or repeated)");
  if (s.index != index)
    corrupt("slot " + std::to_string(s.index) + " of a message where slot " + std::to_string(index) +
            " was expected");
  if (s.msg_len != msg_len)
    corrupt("message length changed from " + std::to_string(msg_len) + " to " + std::to_string(s.msg_len) +
            " within one message");
  if (s.nbytes != std::min(sb, remaining))
    corrupt("slot says it holds " + std::to_string(s.nbytes) + " bytes, but " + std::to_string(remaining) +
            " of the " + std::to_string(msg_len) + "-byte message remain and a slot holds " + std::to_string(sb));
}

SlotHeader ShmChannel::first_slot(const WaitPolicy& policy, const uint8_t** p) {
  if (pending_) {
    pending_ = false;
    *p = pending_p_;
    return pending_h_;
  }
  SlotHeader h = ring_->read_next(policy, p);
  if (h.msg_len > kMaxMessage) corrupt("message length " + std::to_string(h.msg_len) + " is impossible");
  check_slot(h, msg_seq_ + 1, 0, h.msg_len, h.msg_len);
  return h;
}

const uint8_t* ShmChannel::peek(const WaitPolicy& policy, uint64_t* len, const uint8_t** head) {
  check_usable(false);
  release();
  const uint8_t* p;
  pending_h_ = first_slot(policy, &p);
  pending_p_ = p;
  pending_ = true;
  *len = pending_h_.msg_len;
  if (head) *head = p;
  return pending_h_.msg_len <= ring_->slot_bytes() ? p : nullptr;
}

void ShmChannel::take_inline() {
  if (!pending_ || pending_h_.msg_len > ring_->slot_bytes())
    throw std::logic_error("fastbcast: take_inline() without a one-slot message from peek()");
  pending_ = false;
  holding_ = true;
  ++msg_seq_;
}

at::Tensor ShmChannel::recv(const WaitPolicy& policy, uint64_t max_len, uint64_t prefix) {
  check_usable(false);
  release();
  const uint64_t sb = ring_->slot_bytes();
  const uint64_t seq = msg_seq_ + 1;
  const uint8_t* p;
  SlotHeader h = first_slot(policy, &p);
  auto check = [&](const SlotHeader& s, uint64_t index, uint64_t msg_len, uint64_t remaining) {
    check_slot(s, seq, index, msg_len, remaining);
  };
  const uint64_t len = h.msg_len;
  if (len <= sb) {
    msg_seq_ = seq;
    holding_ = true;
    auto keep = ring_->mapping();  // the view keeps the segment mapped
    return at::from_blob(const_cast<uint8_t*>(p), {int64_t(len)}, [keep](void*) {},
                         at::TensorOptions().dtype(at::kByte));
  }
  auto mid = [&](const char* why) {
    if (broken_.empty()) broken_ = std::string("a receive stopped inside a message: ") + why;
  };
  // A message over max_len is drained: nothing past its first `prefix` bytes
  // is copied, so a refused message costs no buffer of its size.
  const uint64_t keep_len = len > max_len ? std::min(len, prefix) : len;
  at::Tensor block = guarded([&] { return PinnedPool::instance().acquire(keep_len); }, mid);
  uint8_t* dst = block.data_ptr<uint8_t>();
  uint64_t off = 0;
  for (uint64_t i = 0;; ++i) {
    if (off < keep_len) std::memcpy(dst + off, p, std::min<uint64_t>(h.nbytes, keep_len - off));
    off += h.nbytes;
    ring_->release();
    if (off == len) break;
    h = guarded([&] { return ring_->read_next(policy, &p); }, mid);
    check(h, i + 1, len, len - off);
  }
  msg_seq_ = seq;
  return block.narrow(0, 0, int64_t(keep_len));
}

void ShmChannel::release() {
  if (!holding_) return;
  holding_ = false;
  ring_->release();
}

void ShmChannel::close() { ring_->close(); }

}  // namespace fastbcast
