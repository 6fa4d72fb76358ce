// One broadcast collective on a torch.distributed ProcessGroup, made from
// C++ through c10d's own API. The collective transport's per-step path
// (a frame that fits its first collective, on a CPU group such as gloo)
// encodes, broadcasts and decodes in one call: around a gloo collective the
// Python of a call costs as much as the pickle design's whole call
// (BENCHMARKS.md, section 0b), so none is left there.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastbcast {

// The collective itself failed (a peer died or closed its end, the wait
// passed its timeout). `type` is the c10d error's class, for the message.
struct CollectiveFailed : std::runtime_error {
  CollectiveFailed(const std::string& type, const std::string& what) : std::runtime_error(what), type(type) {}
  std::string type;
};

class GroupCollective {
 public:
  // first_chunk: bytes of the collective every frame starts with; chunk:
  // of each one after it.
  GroupCollective(c10::intrusive_ptr<c10d::ProcessGroup> pg, uint32_t first_chunk, uint32_t chunk);

  // Broadcasts t (contiguous, on the group's device) from group rank `root`
  // and waits for it, at most timeout_s seconds (< 0: the group's own
  // timeout). Call without the GIL. Throws CollectiveFailed.
  void broadcast(const at::Tensor& t, int root, double timeout_s);
  // The two halves of broadcast(): post starts one without waiting and
  // keeps t alive until it completes; wait_for waits, at most timeout_s
  // seconds (< 0: the group's own timeout). Both throw CollectiveFailed.
  // Call both without the GIL: a gloo worker dropping a finished work's
  // tensors may wait for the GIL while holding the queue a post needs.
  c10::intrusive_ptr<c10d::Work> post(const at::Tensor& t, int root);
  static void wait_for(const c10::intrusive_ptr<c10d::Work>& work, double timeout_s);

  // The source of the frames sent and received next, as a group rank.
  int root = 0;

  uint32_t first_chunk() const { return first_chunk_; }
  uint32_t chunk() const { return chunk_; }
  uint64_t collectives() const { return collectives_; }

  // Source: a frame within first_chunk is encoded here (first_chunk bytes,
  // so the collective can move all of them).
  std::vector<uint8_t>& scratch() { return *scratch_; }
  // The scratch's first first_chunk bytes as a tensor that keeps them
  // alive: a collective whose wait timed out may still read them after this
  // channel is gone.
  at::Tensor scratch_tensor() const;
  // Source: bytes of the previous frame, so a large one starts in a block
  // of about its size rather than growing into one.
  size_t size_hint = 0;
  // Source: inside broadcast(), or a broadcast that threw: a failure then is
  // the transport's, not the encoder's.
  bool sending = false;
  // Source: the failure came while send_object sent a stream.
  bool streaming = false;

  // Receiver: where frames are received, at least first_chunk bytes: the
  // caller's kept receive buffer (set_buffer), else a pool block taken at
  // the first receive (a source never needs one).
  at::Tensor& buffer();
  void set_buffer(at::Tensor b) { buffer_ = std::move(b); }
  // Receiver: the first collective of the next frame was received into
  // buffer() and not decoded; the caller's general path takes it from there.
  bool pending = false;

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  uint32_t first_chunk_, chunk_;
  uint64_t collectives_ = 0;
  std::shared_ptr<std::vector<uint8_t>> scratch_;
  at::Tensor buffer_;
};

}  // namespace fastbcast
