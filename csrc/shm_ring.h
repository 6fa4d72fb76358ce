// A ring of fixed-size slots in a POSIX shared-memory segment: one writer,
// N readers, every reader takes every slot. This file is the data structure
// and its waiting; what a slot's bytes mean (messages spread over slots) is
// ShmChannel's business (shm_channel.h).
//
// Segment layout (offsets from the start of the mapping; every block starts
// on a 64-byte cache line, the payload area on a page):
//
//   0      SegmentHeader   magic, version, geometry, creator pid,
//                          ranks[kMaxPeers], pids[kMaxPeers] (index 0 = writer)
//   +      WakeLine "pub"  word, asleep      (readers sleep here)
//   +      WakeLine "rel"  word, asleep      (the writer sleeps here)
//   +      WriterLine      closed, failed_peer
//   +      ReaderLine x n_readers: released, attached, closed, pid
//   +      SlotHeader x n_slots:   seq, msg_seq, msg_len, index, nbytes
//   ctrl   payload x n_slots, slot_bytes each        (ctrl = page-rounded)
//   total = ctrl + n_slots * slot_bytes
//
// Slots are numbered globally: slot k (k = 0, 1, 2, ...) lives in ring
// position k % n_slots. The writer publishes slot k by storing
// SlotHeader.seq = k + 1. Reader i has released every slot below
// ReaderLine[i].released. So the writer may fill slot k once every reader's
// released >= k + 1 - n_slots, and a reader may read slot k once that
// position's seq == k + 1. Any other seq than k + 1 or the one it replaces
// (k + 1 - n_slots, or 0 in the first lap) is corruption, not a wait.
//
// Memory ordering (release/acquire pairs):
//   1. writer: payload and SlotHeader fields (plain stores), then
//      seq = k + 1 (RELEASE)  --pairs with-->  reader: seq (ACQUIRE), then
//      reads the fields and payload. A reader never sees the flag before
//      the bytes (vLLM's aarch64 corruption: a plain flag store).
//   2. reader: done with slot k's bytes, then released = k + 1 (RELEASE)
//      --pairs with-->  writer: released (ACQUIRE) before it overwrites that
//      position. A slow reader never reads bytes overwritten under it.
//   3. creator: every header field, then magic (RELEASE)  --pairs with-->
//      attacher: magic (ACQUIRE) before it reads the geometry.
//   4. attach: attached = 1 (SEQ_CST CAS) --> writer's wait_attached load.
//   5. Sleeping (Dekker, both directions): the sleeper increments its
//      *_asleep counter, SEQ_CST fence, reads the wake word, re-checks its
//      condition, then FUTEX_WAITs on the word's value. The notifier makes
//      its change (1 or 2 above), SEQ_CST fence, and if *_asleep != 0 bumps
//      the word and FUTEX_WAKEs. With fences on both sides at least one of
//      them sees the other: either the sleeper's re-check sees the change,
//      or the notifier sees the sleeper and the word changes under (or
//      wakes) its FUTEX_WAIT. No wake-up is lost, and nobody makes a
//      syscall while nobody sleeps.
//
// Waiting: spin for FASTBCAST_SHM_SPIN_US (default 1000: busy for 5 us, then
// yielding the core), then sleep in FUTEX_WAIT slices of at most 100 ms.
// Between slices the waiter checks the peers it waits for (a pidfd per peer,
// which polls readable once the process has exited, zombie or not; kill(pid,
// 0) and /proc/<pid>/stat where pidfds are missing; and their `closed`
// flag), its deadline, and calls the caller's hook (signals, long-wait
// logging). A peer's death is therefore seen within one slice. The writer
// also checks every reader (one poll() over the pidfds) before each message,
// so a dead reader fails the next send even when the ring has room; it then
// marks the segment closed with failed_peer set, which ends every reader's
// wait.
//
// Lifecycle: the writer creates the name with O_CREAT|O_EXCL, mode 0600, and
// reserves every page with posix_fallocate (a full tmpfs fails here, not
// with SIGBUS later); the protocol unlinks it once every reader attached, so
// a SIGKILL afterwards leaves nothing in /dev/shm. Only the creating process
// unlinks, and only the name it created; close() by the creator unlinks a
// name still there. A process forked from a user of the ring inherits the
// mapping but may only unmap it (a fork generation counter, bumped in
// pthread_atfork's child hook, tells it apart).
//
// Everything read from the segment is treated like bytes from a socket:
// geometry is validated once at attach and then kept in this process; a
// bad seq or cursor raises ShmCorrupt. Nothing read from the mapping is ever
// used as an offset without a check.
#pragma once

#include <poll.h>
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastbcast {

constexpr uint64_t kShmMagic = 0x676e697262736266ull;  // "fbsbring" little-endian
constexpr uint32_t kShmVersion = 1;
constexpr int kShmMaxPeers = 128;  // writer + 127 readers
constexpr uint32_t kShmMaxSlots = 4096;
constexpr uint64_t kShmMaxSlotBytes = uint64_t(1) << 30;
// Defaults the protocol passes: 16 slots of 1 MiB less one page, so the
// whole segment (with up to 127 readers' control lines) stays within 16 MiB
// and fits Docker's 64 MiB /dev/shm. Finer slots than 8 x 2 MiB let several
// readers copy a long message in a closer pipeline; any message up to a
// slot (every per-step scheduler message) still arrives zero-copy.
// benchmarks/bench_shm_ring.py measures the alternatives.
constexpr uint32_t kShmDefaultSlots = 16;
constexpr uint64_t kShmDefaultSlotBytes = (uint64_t(1) << 20) - 4096;

// ---- errors (translated to Python types in python_api.cpp) ----
struct ShmPeerDied : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ShmTimedOut : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ShmCorrupt : std::runtime_error {  // -> fastbcast.DecodeError
  using std::runtime_error::runtime_error;
};
struct ShmOSError : std::runtime_error {  // -> OSError(err, message)
  ShmOSError(int e, const std::string& m) : std::runtime_error(m), err(e) {}
  int err;
};
// Thrown by a WaitHook that found a Python exception pending (a signal).
struct ShmInterrupted : std::runtime_error {
  ShmInterrupted() : std::runtime_error("interrupted") {}
};

// ---- the segment's records ----
struct alignas(64) SegmentHeader {
  uint64_t magic;  // stored last, with release
  uint32_t version;
  uint32_t n_readers;
  uint32_t n_slots;
  uint32_t pad0;
  uint64_t slot_bytes;
  uint64_t ctrl_bytes;   // offset of the payload area
  uint64_t total_bytes;  // size of the segment
  int32_t creator_pid;
  int32_t pad1;
  int32_t ranks[kShmMaxPeers];
  int32_t pids[kShmMaxPeers];
};
struct alignas(64) WakeLine {
  uint32_t word;    // FUTEX_WAIT target; bumped by the notifier when someone sleeps
  uint32_t asleep;  // how many are (about to be) asleep on `word`
};
struct alignas(64) WriterLine {
  uint32_t closed;
  // 1 + the index of the reader whose death (or close) made the writer give
  // up, so the other readers can say why; 0 if it closed normally.
  uint32_t failed_peer;
};
struct alignas(64) ReaderLine {
  uint64_t released;  // slots 0 .. released-1 are released by this reader
  uint32_t attached;
  uint32_t closed;
  int32_t pid;
};
struct alignas(64) SlotHeader {
  uint64_t seq;  // k + 1 once global slot k is published (release store)
  // Message framing, written and checked by ShmChannel:
  uint64_t msg_seq;  // 1-based message number
  uint64_t msg_len;  // whole message length in bytes
  uint32_t index;    // this slot's position within the message
  uint32_t nbytes;   // payload bytes in this slot
};

// Counters for tests and diagnostics (process-local, not in the segment).
struct WaitStats {
  uint64_t futex_waits = 0;     // FUTEX_WAIT calls
  uint64_t futex_timeouts = 0;  // of which ended by their timeout slice
  uint64_t timeout_wakes = 0;   // a timed-out slice after which the condition held:
                                // a wake that only the fallback delivered
  uint64_t futex_wakes = 0;     // FUTEX_WAKE calls made
};

// What a blocked wait is waiting for, for the caller's hook (logging).
struct WaitInfo {
  double waited_s;
  // "fastbcast shm ring 'x': global rank 2 (reader 1) is still waiting for
  // the writer (global rank 0) to publish slot 3"
  std::function<std::string()> describe;
};
using WaitHook = std::function<void(const WaitInfo&)>;

struct WaitPolicy {
  double timeout_s = -1;  // < 0: no deadline
  WaitHook on_slice;      // called between sleeps, about every 100 ms; may throw
};

// The mapped memory; views handed out hold it so that an unmap waits for them.
struct ShmMapping {
  ShmMapping(void* b, size_t n) : base(b), len(n) {}
  ~ShmMapping();
  ShmMapping(const ShmMapping&) = delete;
  ShmMapping& operator=(const ShmMapping&) = delete;
  void* base;
  size_t len;
};

// Environment knobs, read once per process.
struct ShmTuning {
  uint64_t spin_ns;      // FASTBCAST_SHM_SPIN_US
  uint32_t slice_ms;     // FASTBCAST_SHM_TEST_SLICE_MS (test only; default 100)
  uint32_t test_delay_us;  // FASTBCAST_SHM_TEST_DELAY_US (test only; default 0)
  static const ShmTuning& get();
};

class ShmRing {
 public:
  // Writer: creates "/<name>" (O_CREAT|O_EXCL, 0600), reserves every page
  // (posix_fallocate), maps it and publishes the header.
  static std::unique_ptr<ShmRing> create(const std::string& name, const std::vector<int>& ranks,
                                         const std::vector<int>& pids, uint32_t n_slots, uint64_t slot_bytes);
  // Reader `reader` (0-based): waits for the segment, validates it against
  // ranks/pids, marks itself attached.
  static std::unique_ptr<ShmRing> attach(const std::string& name, int reader, const std::vector<int>& ranks,
                                         const std::vector<int>& pids, const WaitPolicy& policy);
  ~ShmRing();

  // ---- writer ----
  void wait_attached(const WaitPolicy& policy);
  // Waits until the next slot may be written; returns its header and payload.
  SlotHeader* acquire_write(const WaitPolicy& policy, uint8_t** payload);
  void publish();  // publishes the slot acquire_write returned
  // Throws ShmPeerDied (and closes the channel for every reader) if a reader
  // died or closed its end. About a microsecond.
  void check_readers();
  void unlink();   // creator process only; idempotent

  // ---- reader ----
  // Waits for the next published slot; returns its header (fields copied
  // after the acquire) and payload.
  SlotHeader read_next(const WaitPolicy& policy, const uint8_t** payload);
  void release();  // releases the slot read_next returned

  void close();
  // True in a process forked from the one that made this object: it may
  // only unmap.
  bool foreign() const;

  uint32_t n_slots() const { return n_slots_; }
  uint64_t slot_bytes() const { return slot_bytes_; }
  uint32_t n_readers() const { return n_readers_; }
  bool is_writer() const { return reader_ < 0; }
  int reader_index() const { return reader_; }
  const std::string& name() const { return name_; }
  int rank_of(int peer) const { return ranks_[peer]; }  // peer 0 = writer
  const WaitStats& stats() const { return stats_; }
  const std::shared_ptr<ShmMapping>& mapping() const { return map_; }
  uint64_t cursor() const { return cursor_; }  // next global slot

  // Test hook: overwrite the next slot's header with `bytes` (at most
  // sizeof(SlotHeader)), and if `publish`, publish it as slot `cursor`.
  void inject(const uint8_t* bytes, size_t n, bool publish);

 private:
  ShmRing() = default;
  static size_t ctrl_bytes_for(uint32_t n_readers, uint32_t n_slots);
  void bind(std::shared_ptr<ShmMapping> map, uint32_t n_readers, uint32_t n_slots, uint64_t slot_bytes);
  std::string who() const;
  bool peer_dead(int peer) const;
  bool writer_gone(std::string* why) const;
  bool reader_gone(int i, std::string* why) const;
  [[noreturn]] void give_up(int reader, const std::string& msg);
  void watch_peers();
  template <class Ready, class Check>
  void wait(WakeLine* line, const WaitPolicy& policy, Ready ready, Check check_peers,
            const std::function<std::string()>& describe);
  void notify(WakeLine* line, bool always);

  std::shared_ptr<ShmMapping> map_;
  SegmentHeader* hdr_ = nullptr;
  WakeLine* pub_ = nullptr;
  WakeLine* rel_ = nullptr;
  WriterLine* wline_ = nullptr;
  ReaderLine* rlines_ = nullptr;
  SlotHeader* slots_ = nullptr;
  uint8_t* payload_ = nullptr;

  std::string name_;
  std::vector<int> ranks_, pids_;
  uint32_t n_readers_ = 0, n_slots_ = 0;
  uint64_t slot_bytes_ = 0;
  int reader_ = -1;           // -1: writer
  uint64_t cursor_ = 0;       // next global slot to write / read
  uint64_t min_released_ = 0;  // writer's cached minimum over the readers
  bool creator_ = false, unlinked_ = false, closed_ = false;
  bool held_ = false;  // reader: read_next returned a slot not yet released
  std::vector<int> pidfds_;  // per peer (0 = writer); -1: not watched by pidfd
  std::vector<pollfd> reader_polls_;  // writer: the readers' pidfds, for one poll()
  uint64_t fork_gen_ = 0;
  WaitStats stats_;
};

bool pid_alive(pid_t pid);

}  // namespace fastbcast
