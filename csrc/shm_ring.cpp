#include "shm_ring.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace fastbcast {

namespace {

using Clock = std::chrono::steady_clock;
constexpr uint64_t kBusySpinNs = 5000;  // pure spin before the yielding part

// Bumped in every forked child, so an object can tell it was inherited.
uint64_t g_fork_gen = 0;
void register_fork_handler() {
  static std::once_flag once;
  std::call_once(once, [] { pthread_atfork(nullptr, nullptr, [] { ++g_fork_gen; }); });
}

template <class T>
T load_acq(const T* p) {
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
template <class T>
T load_rlx(const T* p) {
  return __atomic_load_n(p, __ATOMIC_RELAXED);
}
template <class T>
void store_rel(T* p, T v) {
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

long futex(uint32_t* word, int op, uint32_t val, const timespec* ts) {
  // Not FUTEX_PRIVATE_FLAG: the word is shared between processes.
  return syscall(SYS_futex, word, op, val, ts, nullptr, 0);
}

uint64_t env_u64(const char* name, uint64_t dflt) {
  const char* s = std::getenv(name);
  if (!s || !*s) return dflt;
  char* end = nullptr;
  unsigned long long v = std::strtoull(s, &end, 10);
  return (end && *end == '\0') ? uint64_t(v) : dflt;
}

// Test hook (FASTBCAST_SHM_TEST_DELAY_US): a random pause at the two places
// where a lost wake-up could hide: between a sleeper's last check and its
// FUTEX_WAIT, and between a notifier's change and its wake.
void test_delay() {
  uint32_t max_us = ShmTuning::get().test_delay_us;
  if (__builtin_expect(max_us == 0, 1)) return;
  thread_local uint64_t x = 0x9e3779b97f4a7c15ull ^ uint64_t(getpid());
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  uint64_t us = x % (max_us + 1);
  if (x & (1ull << 40)) {
    timespec ts{0, long(us * 1000)};
    nanosleep(&ts, nullptr);
  } else {
    auto end = Clock::now() + std::chrono::microseconds(us);
    while (Clock::now() < end) cpu_relax();
  }
}

std::string sys_err(int e) { return std::string(std::strerror(e)) + " (errno " + std::to_string(e) + ")"; }

void check_name(const std::string& name) {
  if (name.empty() || name.size() > 200 || name.find('/') != std::string::npos || name == "." || name == "..")
    throw std::invalid_argument("fastbcast: shared-memory name must be 1-200 characters without '/', got '" + name +
                                "'");
}

void check_peers(const std::vector<int>& ranks, const std::vector<int>& pids) {
  if (ranks.size() != pids.size() || ranks.size() < 2 || ranks.size() > size_t(kShmMaxPeers))
    throw std::invalid_argument("fastbcast: ranks and pids must be equally long lists of 2 to " +
                                std::to_string(kShmMaxPeers) + " entries (writer first), got " +
                                std::to_string(ranks.size()) + " ranks and " + std::to_string(pids.size()) + " pids");
  for (int p : pids)
    if (p <= 0) throw std::invalid_argument("fastbcast: pid " + std::to_string(p) + " is not a process id");
}

struct AsleepGuard {
  explicit AsleepGuard(uint32_t* c) : c_(c) { __atomic_fetch_add(c_, 1, __ATOMIC_SEQ_CST); }
  ~AsleepGuard() { __atomic_fetch_sub(c_, 1, __ATOMIC_SEQ_CST); }
  uint32_t* c_;
};

}  // namespace

const ShmTuning& ShmTuning::get() {
  static const ShmTuning t = [] {
    ShmTuning v;
    // 1 ms: long enough that receivers of a step loop are still spinning
    // when ranks reach the call some tens of microseconds apart (at 50 us,
    // world 8 had a p90 of 100 us against 8 us; BENCHMARKS.md section 0a),
    // short enough that a reader idle for a second spends 0.1 % of a core.
    v.spin_ns = env_u64("FASTBCAST_SHM_SPIN_US", 1000) * 1000;
    v.slice_ms = uint32_t(std::clamp<uint64_t>(env_u64("FASTBCAST_SHM_TEST_SLICE_MS", 100), 1, 60000));
    v.test_delay_us = uint32_t(std::min<uint64_t>(env_u64("FASTBCAST_SHM_TEST_DELAY_US", 0), 1000000));
    return v;
  }();
  return t;
}

ShmMapping::~ShmMapping() {
  if (base) munmap(base, len);
}

bool pid_alive(pid_t pid) {
  if (pid == getpid()) return true;
  if (kill(pid, 0) != 0 && errno == ESRCH) return false;
  // kill() succeeds on a zombie: a killed child its parent has not reaped.
  char path[64];
  std::snprintf(path, sizeof path, "/proc/%d/stat", int(pid));
  FILE* f = std::fopen(path, "re");
  if (!f) return errno != ENOENT;
  char buf[512];
  size_t n = std::fread(buf, 1, sizeof buf - 1, f);
  std::fclose(f);
  buf[n] = '\0';
  const char* paren = std::strrchr(buf, ')');  // the command name may hold ')' too
  if (!paren || paren[1] != ' ') return true;
  char state = paren[2];
  return state != 'Z' && state != 'X';
}

void ShmRing::watch_peers() {
  pidfds_.assign(pids_.size(), -1);
  for (size_t i = 0; i < pids_.size(); ++i) {
    bool mine = is_writer() ? i > 0 : i == 0;  // the writer watches readers, a reader the writer
    if (!mine || pids_[i] == getpid()) continue;
#ifdef SYS_pidfd_open
    pidfds_[i] = int(syscall(SYS_pidfd_open, pids_[i], 0));  // -1 (ESRCH, ENOSYS): fall back to kill/proc
#endif
    if (pidfds_[i] >= 0 && is_writer()) reader_polls_.push_back(pollfd{pidfds_[i], POLLIN, 0});
  }
}

bool ShmRing::peer_dead(int peer) const {
  int fd = pidfds_.empty() ? -1 : pidfds_[peer];
  if (fd < 0) return !pid_alive(pids_[peer]);
  pollfd p{fd, POLLIN, 0};
  return poll(&p, 1, 0) > 0;
}

size_t ShmRing::ctrl_bytes_for(uint32_t n_readers, uint32_t n_slots) {
  size_t n = sizeof(SegmentHeader) + 2 * sizeof(WakeLine) + sizeof(WriterLine) + n_readers * sizeof(ReaderLine) +
             n_slots * sizeof(SlotHeader);
  return (n + 4095) / 4096 * 4096;
}

void ShmRing::bind(std::shared_ptr<ShmMapping> map, uint32_t n_readers, uint32_t n_slots, uint64_t slot_bytes) {
  map_ = std::move(map);
  auto* base = static_cast<uint8_t*>(map_->base);
  hdr_ = reinterpret_cast<SegmentHeader*>(base);
  pub_ = reinterpret_cast<WakeLine*>(hdr_ + 1);
  rel_ = pub_ + 1;
  wline_ = reinterpret_cast<WriterLine*>(rel_ + 1);
  rlines_ = reinterpret_cast<ReaderLine*>(wline_ + 1);
  slots_ = reinterpret_cast<SlotHeader*>(rlines_ + n_readers);
  payload_ = base + ctrl_bytes_for(n_readers, n_slots);
  n_readers_ = n_readers;
  n_slots_ = n_slots;
  slot_bytes_ = slot_bytes;
  fork_gen_ = g_fork_gen;
}

std::unique_ptr<ShmRing> ShmRing::create(const std::string& name, const std::vector<int>& ranks,
                                         const std::vector<int>& pids, uint32_t n_slots, uint64_t slot_bytes) {
  register_fork_handler();
  check_name(name);
  check_peers(ranks, pids);
  if (n_slots < 1 || n_slots > kShmMaxSlots)
    throw std::invalid_argument("fastbcast: n_slots must be 1.." + std::to_string(kShmMaxSlots) + ", got " +
                                std::to_string(n_slots));
  if (slot_bytes < 64 || slot_bytes > kShmMaxSlotBytes || slot_bytes % 64)
    throw std::invalid_argument("fastbcast: slot_bytes must be a multiple of 64 from 64 to 1 GiB, got " +
                                std::to_string(slot_bytes));
  if (pids[0] != getpid())
    throw std::invalid_argument("fastbcast: pids[0] must be the writer's own pid " + std::to_string(getpid()) +
                                ", got " + std::to_string(pids[0]));
  uint32_t n_readers = uint32_t(ranks.size() - 1);
  size_t ctrl = ctrl_bytes_for(n_readers, n_slots);
  size_t total = ctrl + size_t(n_slots) * slot_bytes;
  std::string path = "/" + name;

  int fd = shm_open(path.c_str(), O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) {
    int e = errno;
    throw ShmOSError(e, "fastbcast: cannot create shared-memory segment /dev/shm/" + name + ": " + sys_err(e));
  }
  // Reserve every page now: on a full tmpfs a lazily backed mapping would
  // fail later with SIGBUS in the middle of a copy.
  int r;
  do r = posix_fallocate(fd, 0, off_t(total));
  while (r == EINTR);
  void* base = MAP_FAILED;
  if (r == 0) {
    base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) r = errno;
  }
  ::close(fd);
  if (r != 0) {
    shm_unlink(path.c_str());
    throw ShmOSError(r, "fastbcast: cannot reserve " + std::to_string(total) + " bytes of shared memory for /dev/shm/" +
                            name + " (" + std::to_string(n_slots) + " slots x " + std::to_string(slot_bytes) +
                            " bytes): " + sys_err(r) + "; /dev/shm may be too small (Docker: --shm-size)");
  }

  std::unique_ptr<ShmRing> ring(new ShmRing());
  ring->bind(std::make_shared<ShmMapping>(base, total), n_readers, n_slots, slot_bytes);
  ring->name_ = name;
  ring->ranks_ = ranks;
  ring->pids_ = pids;
  ring->creator_ = true;
  ring->watch_peers();
  SegmentHeader* h = ring->hdr_;  // fresh tmpfs pages are zero
  h->version = kShmVersion;
  h->n_readers = n_readers;
  h->n_slots = n_slots;
  h->slot_bytes = slot_bytes;
  h->ctrl_bytes = ctrl;
  h->total_bytes = total;
  h->creator_pid = getpid();
  for (size_t i = 0; i < ranks.size(); ++i) {
    h->ranks[i] = ranks[i];
    h->pids[i] = pids[i];
  }
  store_rel(&h->magic, kShmMagic);
  return ring;
}

std::unique_ptr<ShmRing> ShmRing::attach(const std::string& name, int reader, const std::vector<int>& ranks,
                                         const std::vector<int>& pids, const WaitPolicy& policy) {
  register_fork_handler();
  check_name(name);
  check_peers(ranks, pids);
  if (reader < 0 || reader >= int(ranks.size()) - 1)
    throw std::invalid_argument("fastbcast: reader index " + std::to_string(reader) + " is outside 0.." +
                                std::to_string(int(ranks.size()) - 2));
  if (pids[reader + 1] != getpid())
    throw std::invalid_argument("fastbcast: pids[" + std::to_string(reader + 1) + "] = " +
                                std::to_string(pids[reader + 1]) + " should be this reader's own pid " +
                                std::to_string(getpid()));
  std::string path = "/" + name;
  std::string me = "global rank " + std::to_string(ranks[reader + 1]) + " (reader " + std::to_string(reader) + ")";
  auto start = Clock::now();
  auto last_hook = start;
  int nap_us = 200;
  for (;;) {
    int fd = shm_open(path.c_str(), O_RDWR | O_CLOEXEC, 0);
    if (fd < 0 && errno != ENOENT) {
      int e = errno;
      throw ShmOSError(e, "fastbcast: cannot open shared-memory segment /dev/shm/" + name + ": " + sys_err(e));
    }
    if (fd >= 0) {
      struct stat st;
      void* base = MAP_FAILED;
      size_t size = 0;
      if (fstat(fd, &st) == 0 && size_t(st.st_size) >= sizeof(SegmentHeader)) {
        size = size_t(st.st_size);
        base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      }
      ::close(fd);
      if (base != MAP_FAILED) {
        auto map = std::make_shared<ShmMapping>(base, size);
        const SegmentHeader* h = static_cast<const SegmentHeader*>(base);
        uint64_t magic = load_acq(&h->magic);
        if (magic != 0) {
          auto bad = [&](const std::string& what) {
            return std::invalid_argument("fastbcast: /dev/shm/" + name + " does not match what " + me +
                                         " was told: " + what);
          };
          if (magic != kShmMagic) throw bad("it is not a fastbcast ring (magic)");
          if (h->version != kShmVersion)
            throw bad("format version " + std::to_string(h->version) + ", this build speaks " +
                      std::to_string(kShmVersion));
          uint32_t nr = h->n_readers, ns = h->n_slots;
          uint64_t sb = h->slot_bytes;
          if (nr != ranks.size() - 1)
            throw bad(std::to_string(nr) + " readers, expected " + std::to_string(ranks.size() - 1));
          if (ns < 1 || ns > kShmMaxSlots || sb < 64 || sb > kShmMaxSlotBytes || sb % 64)
            throw bad("impossible geometry " + std::to_string(ns) + " x " + std::to_string(sb));
          size_t ctrl = ctrl_bytes_for(nr, ns);
          if (h->ctrl_bytes != ctrl || h->total_bytes != ctrl + ns * sb || h->total_bytes != size)
            throw bad("its sizes do not add up (" + std::to_string(size) + " bytes)");
          for (size_t i = 0; i < ranks.size(); ++i)
            if (h->ranks[i] != ranks[i] || h->pids[i] != pids[i])
              throw bad("peer " + std::to_string(i) + " is rank " + std::to_string(h->ranks[i]) + " pid " +
                        std::to_string(h->pids[i]) + ", expected rank " + std::to_string(ranks[i]) + " pid " +
                        std::to_string(pids[i]));
          if (h->creator_pid != pids[0]) throw bad("it was created by pid " + std::to_string(h->creator_pid));
          std::unique_ptr<ShmRing> ring(new ShmRing());
          ring->bind(std::move(map), nr, ns, sb);
          ring->name_ = name;
          ring->ranks_ = ranks;
          ring->pids_ = pids;
          ring->reader_ = reader;
          ring->watch_peers();
          ReaderLine* rl = &ring->rlines_[reader];
          uint32_t zero = 0;
          if (!__atomic_compare_exchange_n(&rl->attached, &zero, 1u, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            throw std::invalid_argument("fastbcast: reader " + std::to_string(reader) + " of /dev/shm/" + name +
                                        " is already attached (pid " + std::to_string(load_rlx(&rl->pid)) + ")");
          store_rel(&rl->pid, int32_t(getpid()));
          ring->notify(ring->rel_, false);
          return ring;
        }
      }
    }
    // Not there yet (or half made): the writer may be slow, or gone.
    double waited = std::chrono::duration<double>(Clock::now() - start).count();
    if (!pid_alive(pids[0]))
      throw ShmPeerDied("fastbcast: the writer (global rank " + std::to_string(ranks[0]) + ", pid " +
                        std::to_string(pids[0]) + ") died while " + me + " was waiting for it to create /dev/shm/" +
                        name);
    if (policy.timeout_s >= 0 && waited >= policy.timeout_s)
      throw ShmTimedOut("fastbcast: " + me + " timed out after " + std::to_string(waited) +
                        " s waiting for the writer (global rank " + std::to_string(ranks[0]) + ") to create /dev/shm/" +
                        name);
    if (policy.on_slice && Clock::now() - last_hook >= std::chrono::milliseconds(100)) {
      last_hook = Clock::now();
      policy.on_slice(WaitInfo{waited, [&] {
                                 return "fastbcast: " + me + " is still waiting for the writer (global rank " +
                                        std::to_string(ranks[0]) + ") to create /dev/shm/" + name;
                               }});
    }
    usleep(nap_us);
    nap_us = std::min(nap_us * 2, 10000);
  }
}

ShmRing::~ShmRing() {
  close();
  for (int fd : pidfds_)
    if (fd >= 0) ::close(fd);
}

bool ShmRing::foreign() const { return fork_gen_ != g_fork_gen; }

std::string ShmRing::who() const {
  std::string me = is_writer() ? "writer" : "reader " + std::to_string(reader_);
  return "fastbcast shm ring '" + name_ + "': global rank " + std::to_string(ranks_[reader_ + 1]) + " (" + me + ")";
}

bool ShmRing::writer_gone(std::string* why) const {
  std::string w = "the writer (global rank " + std::to_string(ranks_[0]) + ", pid " + std::to_string(pids_[0]) + ")";
  if (load_acq(&wline_->closed)) {
    uint32_t f = load_rlx(&wline_->failed_peer);  // from the segment: checked before use
    if (f >= 1 && f <= n_readers_)
      *why = w + " gave up on the channel because reader global rank " + std::to_string(ranks_[f]) +
             " died or closed its end";
    else
      *why = w + " closed the channel";
    return true;
  }
  if (peer_dead(0)) {
    *why = w + " died";
    return true;
  }
  return false;
}

bool ShmRing::reader_gone(int i, std::string* why) const {
  std::string r = "reader global rank " + std::to_string(ranks_[i + 1]) + " (pid " + std::to_string(pids_[i + 1]) + ")";
  if (load_acq(&rlines_[i].closed)) {
    *why = r + " closed its end";
    return true;
  }
  if (peer_dead(i + 1)) {
    *why = r + " died";
    return true;
  }
  return false;
}

void ShmRing::give_up(int reader, const std::string& msg) {
  // Every other reader waits on this writer, not on the dead one: closing
  // with the reason ends their waits within a slice.
  if (!closed_) {
    __atomic_store_n(&wline_->failed_peer, uint32_t(reader + 1), __ATOMIC_RELAXED);
    store_rel(&wline_->closed, 1u);
    notify(pub_, true);
  }
  throw ShmPeerDied(msg);
}

void ShmRing::check_readers() {
  // Only the cheap signs here: the closed flags, and one poll() over the
  // readers' pidfds. Where pidfds are missing (Linux < 5.3) a dead reader is
  // found once the writer waits for it.
  std::string why;
  for (uint32_t i = 0; i < n_readers_; ++i)
    if (load_acq(&rlines_[i].closed) && reader_gone(int(i), &why))
      give_up(int(i), who() + ": " + why + "; nothing more can be sent on this channel");
  if (reader_polls_.empty() || poll(reader_polls_.data(), reader_polls_.size(), 0) <= 0) return;
  for (uint32_t i = 0; i < n_readers_; ++i)
    if (reader_gone(int(i), &why)) give_up(int(i), who() + ": " + why + "; nothing more can be sent on this channel");
}

template <class Ready, class Check>
void ShmRing::wait(WakeLine* line, const WaitPolicy& policy, Ready ready, Check check_peers,
                   const std::function<std::string()>& describe) {
  if (ready()) return;
  const ShmTuning& tune = ShmTuning::get();
  auto start = Clock::now();
  if (tune.spin_ns) {
    // Busy for the first few microseconds (the peer is usually running on
    // another core), then yielding: when cores are oversubscribed the peer
    // we wait for may need this very core, and a pure spin would hold it
    // off for the whole spin time.
    bool yielding = false;
    for (uint64_t spins = 1;; ++spins) {
      if (yielding)
        sched_yield();
      else
        cpu_relax();
      if (ready()) return;
      if ((spins & 15) == 0) {
        uint64_t ns = uint64_t((Clock::now() - start).count());
        if (ns >= tune.spin_ns) break;
        yielding = ns >= kBusySpinNs;
      }
    }
  }
  for (bool first = true;; first = false) {
    double waited = std::chrono::duration<double>(Clock::now() - start).count();
    if (!first) {
      // Only between slices: a wait that a wake ends at once costs no
      // liveness check and no GIL.
      check_peers();
      if (policy.on_slice) policy.on_slice(WaitInfo{waited, [&] { return who() + " is still " + describe(); }});
    }
    double left_s = 1e9;
    if (policy.timeout_s >= 0) {
      left_s = policy.timeout_s - waited;
      if (left_s <= 0) throw ShmTimedOut(who() + " timed out after " + std::to_string(waited) + " s " + describe());
    }
    int64_t slice_ns = std::min<int64_t>(int64_t(tune.slice_ms) * 1000000, int64_t(left_s * 1e9) + 1);
    timespec ts{time_t(slice_ns / 1000000000), long(slice_ns % 1000000000)};
    long r;
    int err;
    {
      AsleepGuard asleep(&line->asleep);
      __atomic_thread_fence(__ATOMIC_SEQ_CST);
      uint32_t v = __atomic_load_n(&line->word, __ATOMIC_SEQ_CST);
      if (ready()) return;
      test_delay();
      r = futex(&line->word, FUTEX_WAIT, v, &ts);
      err = errno;
    }
    ++stats_.futex_waits;
    if (r != 0 && err == ETIMEDOUT) {
      ++stats_.futex_timeouts;
      if (ready()) {
        ++stats_.timeout_wakes;
        return;
      }
    } else if (ready()) {
      return;
    }
  }
}

void ShmRing::notify(WakeLine* line, bool always) {
  test_delay();
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  if (always || __atomic_load_n(&line->asleep, __ATOMIC_RELAXED) != 0) {
    __atomic_fetch_add(&line->word, 1u, __ATOMIC_SEQ_CST);
    futex(&line->word, FUTEX_WAKE, INT_MAX, nullptr);
    ++stats_.futex_wakes;
  }
}

namespace {
void check_usable(const ShmRing& r, bool closed) {
  if (r.foreign())
    throw std::runtime_error("fastbcast: shm ring '" + r.name() +
                             "' was inherited through fork(); only the process that made it may use it");
  if (closed) throw std::runtime_error("fastbcast: shm ring '" + r.name() + "' is closed");
}
}  // namespace

void ShmRing::wait_attached(const WaitPolicy& policy) {
  check_usable(*this, closed_);
  if (!is_writer()) throw std::runtime_error("fastbcast: wait_attached() is for the writer");
  auto first_missing = [&] {
    for (uint32_t i = 0; i < n_readers_; ++i)
      if (!load_acq(&rlines_[i].attached)) return int(i);
    return -1;
  };
  wait(
      rel_, policy, [&] { return first_missing() < 0; },
      [&] {
        std::string why;
        for (uint32_t i = 0; i < n_readers_; ++i)
          if (!load_acq(&rlines_[i].attached) && reader_gone(int(i), &why))
            give_up(int(i), who() + ": " + why + " before it attached");
      },
      [&] {
        int i = std::max(first_missing(), 0);
        return "waiting for reader rank " + std::to_string(ranks_[i + 1]) + " to attach";
      });
}

SlotHeader* ShmRing::acquire_write(const WaitPolicy& policy, uint8_t** payload) {
  check_usable(*this, closed_);
  const uint64_t k = cursor_;
  const uint64_t need = k + 1 > n_slots_ ? k + 1 - n_slots_ : 0;
  const uint32_t pos = uint32_t(k % n_slots_);
  if (min_released_ < need) {
    auto lagging = [&](int* who_lags) {
      uint64_t lo = UINT64_MAX;
      for (uint32_t i = 0; i < n_readers_; ++i) {
        uint64_t r = load_acq(&rlines_[i].released);
        if (r > k)
          throw ShmCorrupt(who() + ": reader " + std::to_string(i) + " claims to have released " + std::to_string(r) +
                           " slots, but only " + std::to_string(k) + " were written: the segment is corrupt");
        if (r < lo) {
          lo = r;
          if (who_lags) *who_lags = int(i);
        }
      }
      return lo;
    };
    wait(
        rel_, policy,
        [&] {
          min_released_ = lagging(nullptr);
          return min_released_ >= need;
        },
        [&] {
          std::string why;
          for (uint32_t i = 0; i < n_readers_; ++i)
            if (load_acq(&rlines_[i].released) < need && reader_gone(int(i), &why))
              give_up(int(i), who() + ": " + why + " while the writer was waiting for it to release slot " +
                                  std::to_string(pos));
        },
        [&] {
          int i = 0;
          lagging(&i);
          return "waiting for reader rank " + std::to_string(ranks_[i + 1]) + " to release slot " + std::to_string(pos);
        });
  }
  *payload = payload_ + size_t(pos) * slot_bytes_;
  return &slots_[pos];
}

void ShmRing::publish() {
  const uint64_t k = cursor_;
  store_rel(&slots_[k % n_slots_].seq, k + 1);
  cursor_ = k + 1;
  notify(pub_, false);
}

SlotHeader ShmRing::read_next(const WaitPolicy& policy, const uint8_t** payload) {
  check_usable(*this, closed_);
  if (held_) throw std::logic_error("fastbcast internal error: read_next() while a slot is held");
  const uint64_t k = cursor_;
  const uint32_t pos = uint32_t(k % n_slots_);
  const uint64_t want = k + 1, before = k + 1 > n_slots_ ? k + 1 - n_slots_ : 0;
  SlotHeader* s = &slots_[pos];
  wait(
      pub_, policy,
      [&] {
        uint64_t seq = load_acq(&s->seq);
        if (seq == want) return true;
        if (seq != before)
          throw ShmCorrupt(who() + ": slot " + std::to_string(pos) + " carries sequence " + std::to_string(seq) +
                           ", expected " + std::to_string(want) + " (or " + std::to_string(before) +
                           " before it is written): the segment is corrupt");
        return false;
      },
      [&] {
        std::string why;
        if (writer_gone(&why))
          throw ShmPeerDied(who() + ": " + why + " while this reader was waiting for it to publish slot " +
                            std::to_string(pos));
      },
      [&] {
        return "waiting for the writer (global rank " + std::to_string(ranks_[0]) + ") to publish slot " +
               std::to_string(pos);
      });
  // Each field read once, after the acquire; the caller checks them.
  SlotHeader h;
  h.seq = want;
  h.msg_seq = load_rlx(&s->msg_seq);
  h.msg_len = load_rlx(&s->msg_len);
  h.index = load_rlx(&s->index);
  h.nbytes = load_rlx(&s->nbytes);
  *payload = payload_ + size_t(pos) * slot_bytes_;
  held_ = true;
  return h;
}

void ShmRing::release() {
  if (!held_ || foreign()) return;
  held_ = false;
  cursor_ += 1;
  store_rel(&rlines_[reader_].released, cursor_);
  notify(rel_, false);
}

void ShmRing::unlink() {
  if (!creator_) throw std::runtime_error("fastbcast: only the writer that created shm ring '" + name_ + "' unlinks it");
  if (foreign()) throw std::runtime_error("fastbcast: a forked child may not unlink shm ring '" + name_ + "'");
  if (unlinked_) return;
  unlinked_ = true;
  shm_unlink(("/" + name_).c_str());
}

void ShmRing::close() {
  if (closed_) return;
  closed_ = true;
  if (!map_) return;
  if (!foreign()) {
    if (is_writer()) {
      store_rel(&wline_->closed, 1u);
      notify(pub_, true);
    } else {
      release();
      store_rel(&rlines_[reader_].closed, 1u);
      notify(rel_, true);
    }
    if (creator_ && !unlinked_) {
      unlinked_ = true;
      shm_unlink(("/" + name_).c_str());
    }
  }
  map_.reset();  // unmapped once the last view of a slot is gone too
}

void ShmRing::inject(const uint8_t* bytes, size_t n, bool do_publish) {
  check_usable(*this, closed_);
  if (!is_writer()) throw std::runtime_error("fastbcast: inject() is for the writer");
  SlotHeader* s = &slots_[cursor_ % n_slots_];
  std::memcpy(s, bytes, std::min(n, sizeof(SlotHeader)));
  if (do_publish)
    publish();
  else
    notify(pub_, true);
}

}  // namespace fastbcast
