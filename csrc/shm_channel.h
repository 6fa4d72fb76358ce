// One message of any length through a ShmRing: the writer streams it slot by
// slot, each reader takes it slot by slot. Every slot says which message it
// belongs to (msg_seq), where in it (index), the whole length (msg_len) and
// its own byte count (nbytes); a reader checks all four against what it
// expects, so a skipped, repeated or garbled slot is a ShmCorrupt
// (fastbcast.DecodeError), never a read past the slot.
//
// A message that fits one slot is returned as a view of the slot (zero copy),
// held until release() or the next recv(); a longer one is copied into a
// PinnedPool block, each slot released as soon as it is copied.
//
// A send or recv that fails between two slots of one message leaves the
// stream out of step: that end refuses further use (close it, and make a new
// channel). A timeout before the first slot moved changes nothing.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <vector>

#include "shm_ring.h"

namespace fastbcast {

class ShmChannel {
 public:
  static std::shared_ptr<ShmChannel> create(const std::string& name, const std::vector<int>& ranks,
                                            const std::vector<int>& pids, uint32_t n_slots, uint64_t slot_bytes);
  static std::shared_ptr<ShmChannel> attach(const std::string& name, int reader, const std::vector<int>& ranks,
                                            const std::vector<int>& pids, const WaitPolicy& policy);

  // Writer: returns once the last slot is published.
  void send(const uint8_t* data, uint64_t nbytes, const WaitPolicy& policy);
  // Reader: the next whole message (uint8, 1-D). A message longer than
  // max_len (and than one slot) is drained: only its first `prefix` bytes are
  // copied and returned (a receiver that refuses it needs no more than its
  // header), the rest of its slots are released unread.
  at::Tensor recv(const WaitPolicy& policy, uint64_t max_len = UINT64_MAX, uint64_t prefix = 0);
  // Reader: waits for the next message's first slot without taking the
  // message: the next recv() or take_inline() returns it. Returns its
  // payload if the whole message sits in that slot, else nullptr; *len is
  // the message's length either way, and *head (if given) that first slot's
  // payload (min(*len, slot_bytes) bytes: enough to read a frame header).
  const uint8_t* peek(const WaitPolicy& policy, uint64_t* len, const uint8_t** head = nullptr);
  // Reader: takes the one-slot message peek() returned; its slot stays held
  // (the pointer valid) until release(). This is how a small message is
  // decoded straight from the ring, with no tensor made for it.
  void take_inline();
  void release();
  void close();
  bool sending() const { return sending_ || in_stream_; }
  // Writer: a stream's messages go out in several sends; between them (a
  // device buffer, the next encode) a failure still counts as the send's.
  void set_in_stream(bool on) { in_stream_ = on; }
  // Writer: memory a small frame is encoded into before it is sent.
  std::vector<uint8_t>& scratch() { return scratch_; }

  ShmRing& ring() { return *ring_; }

 private:
  explicit ShmChannel(std::unique_ptr<ShmRing> r) : ring_(std::move(r)) {}
  void check_usable(bool writer) const;
  [[noreturn]] void corrupt(const std::string& what);
  void check_slot(const SlotHeader& s, uint64_t seq, uint64_t index, uint64_t msg_len, uint64_t remaining);
  // The first slot of the next message: the one peek() left, or a new one.
  SlotHeader first_slot(const WaitPolicy& policy, const uint8_t** payload);

  std::unique_ptr<ShmRing> ring_;
  uint64_t msg_seq_ = 0;  // writer: messages sent; reader: messages received
  bool holding_ = false;  // reader: a one-slot message's slot is still held
  bool pending_ = false;  // reader: peek() read the next message's first slot
  SlotHeader pending_h_{};
  const uint8_t* pending_p_ = nullptr;
  std::string broken_;    // why this end can no longer be used
  bool sending_ = false;  // writer: inside send(), or a send() that threw
  bool in_stream_ = false;  // writer: inside a stream (set_in_stream)
  std::vector<uint8_t> scratch_;
};

}  // namespace fastbcast
