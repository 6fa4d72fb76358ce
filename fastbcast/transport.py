"""Where a broadcast's bytes move: the two transports under the protocol.

The protocol (`fastbcast.broadcast.Broadcaster`) builds a frame (FORMAT.md
section 3) and hands it to a transport; receivers get the whole frame back
from theirs. A transport moves bytes and nothing else: it never looks inside
the value, and what a header means is asked of the C++ core (`_C`).

* `CollectiveTransport`: the group's own broadcast collective. gloo moves the
  host buffer; NCCL stages it through a cached device buffer with
  asynchronous copies (receivers wait on CUDA events, never `.item()`). The
  first collective always moves `first_chunk` bytes, so a frame that fits
  needs exactly one; a longer one continues in collectives of `chunk` bytes
  whose count every receiver derives from the header.
* `ShmTransport`: a ring of slots in POSIX shared memory per source
  (`_C.ShmChannel`, csrc/shm_ring.h), for groups whose ranks all sit on one
  host. The ring is set up the first time a source sends, with two small
  collectives on the group; after that a broadcast is a few stores and
  loads in shared memory. The rings belong to the group (`GroupState`),
  shared by every Broadcaster on it.

CUDA tensors inside an object always travel device to device over the
group's collective (`send_device` / `recv_device`), whatever carried the host
bytes.

Both transports raise `TransportError` (a peer died, a collective failed) and
`TransportTimeout` (the call's deadline passed); the protocol turns them into
`BroadcastError` / `BroadcastTimeoutError` with the group's ranks in the
message.
"""
from __future__ import annotations

import datetime
import errno as errno_mod
import hashlib
import logging
import mmap
import os
import secrets
import socket
import time
import weakref

import torch
import torch.distributed as dist

from ._loader import _C
from ._version import FORMAT_VERSION
from .mesh import Route

logger = logging.getLogger("fastbcast")

__all__ = ["CollectiveTransport", "ShmTransport", "GroupState", "TransportError", "TransportTimeout"]


# torch 2.13 renamed all_gather_into_tensor; 2.11 (the GPU machines) has only the old name.
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TransportError(RuntimeError):
    """Bytes could not be moved: a peer died or a collective failed."""


class TransportTimeout(TransportError):
    """The call's deadline passed while waiting for a peer."""


def _left(deadline: float | None) -> float | None:
    """Seconds until `deadline` (a time.monotonic() value); None: no deadline."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TransportTimeout("the call's timeout passed")
    return left


def collective(op, tensor: torch.Tensor, route: Route, deadline: float | None, what: str, **kwargs):
    """Runs one collective (`dist.all_gather_into_tensor`, ...) on the
    route's group, bounded by `deadline` when there is one."""
    try:
        work = op(tensor, group=route.group, async_op=True, **kwargs)
    except RuntimeError as e:
        raise _failure(e, deadline, what) from e
    wait(work, deadline, what)


def bcast(tensor: torch.Tensor, route: Route, deadline: float | None, what: str) -> None:
    """Broadcasts `tensor` from route's source over its group, bounded by
    `deadline` when there is one. This is every broadcast of the protocol,
    the per-step call's included, so it calls the ProcessGroup itself:
    `dist.broadcast`'s Python checks cost more than the rest of a small
    call's Python on the source (BENCHMARKS.md, section 0b). A call past
    its deadline posts nothing (a gloo root's broadcast would complete into
    receivers that may already have given up)."""
    _left(deadline)
    wait(post_bcast(tensor, route, what), deadline, what)


def post_bcast(tensor: torch.Tensor, route: Route, what: str):
    """Starts one broadcast from route's source without waiting for it;
    finish it with `wait`."""
    try:
        pg = route.group if route.group is not None else dist.group.WORLD
        return pg.broadcast(tensor, route.src_group_rank)
    except RuntimeError as e:
        raise _failure(e, None, what) from e


def wait(work, deadline: float | None, what: str) -> None:
    """Waits for a collective started with `post`, bounded by `deadline`.
    (On NCCL without a deadline this only orders the current CUDA stream
    after it.)"""
    try:
        if deadline is None:
            work.wait()
        else:
            work.wait(timeout=datetime.timedelta(seconds=_left(deadline)))
    except TransportError:
        raise
    except RuntimeError as e:
        raise _failure(e, deadline, what) from e


def _failure(e: RuntimeError, deadline: float | None, what: str) -> TransportError:
    if deadline is not None and (time.monotonic() >= deadline - 1e-3 or "timed out" in str(e).lower()):
        return TransportTimeout(f"{what}: {e}")
    # A CollectiveError's text starts with the class of the c10d error.
    name = "" if isinstance(e, _C.CollectiveError) else f"{type(e).__name__}: "
    return TransportError(f"{what}: {name}{e}")


def read_header(buf: torch.Tensor, route: Route) -> tuple:
    """The header of a received frame (`_C.read_header`). Bytes that are not
    a frame at all leave nothing to tell where the source is in its
    protocol: a TransportError, so the group is given up."""
    try:
        return _C.read_header(buf, FORMAT_VERSION)
    except ValueError as e:
        raise TransportError(f"global rank {route.rank} received a corrupt frame header from global rank "
                             f"{route.src}: {e}") from e


def _host(nbytes: int) -> torch.Tensor:
    """A host buffer of at least nbytes: a pool block or, when the pool's cap
    is reached, ordinary memory (a rank that cannot join a collective would
    leave its peers waiting)."""
    try:
        return _C.pool_acquire(nbytes)
    except RuntimeError:
        return torch.empty(nbytes, dtype=torch.uint8)


#: Whether a CPU group's small frames take the one-call path
#: (`CollectiveTransport.inline_channel`); off, every collective is made
#: from Python through `post_bcast` (tests that hook it turn this off).
ONE_CALL = True
#: The longest a rank waits to map a ring that its source has made.
ATTACH_TIMEOUT_S = 60.0
#: Receive buffers up to this size are kept for the next call.
KEEP_RECV_BUFFER = 16 << 20


class CollectiveTransport:
    """Frames over the group's broadcast collective.

    Arguments:
        device: the device the collectives move (CPU for gloo, the current
            CUDA device for NCCL).
        first_chunk: bytes of the first collective; every frame's first.
        chunk: bytes of each following collective.
    """

    name = "collective"

    def __init__(self, device: torch.device, first_chunk: int, chunk: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.first_chunk = first_chunk
        self.chunk = chunk
        self.min_capacity = first_chunk     # the source's block is read first_chunk bytes deep
        self._staging: torch.Tensor | None = None   # device bytes (NCCL only)
        self._inflight = None                       # (host block, event) of the last H2D copy
        self._recv_buf: torch.Tensor | None = None  # receivers reuse one host buffer
        self._channel = False                       # CollectiveChannel; None: not usable; False: not made yet

    # -- helpers ---------------------------------------------------------
    def _stage(self, nbytes: int) -> torch.Tensor:
        if self._staging is None or self._staging.numel() < nbytes:
            self._staging = torch.empty(1 << max(nbytes - 1, 1).bit_length(), dtype=torch.uint8, device=self.device)
        return self._staging

    def _chunks(self, buf: torch.Tensor, total: int, route: Route, deadline) -> None:
        """Source: moves buf[first_chunk:total] in collectives of `chunk` bytes."""
        c = self.chunk
        n = 1 + -(-(total - self.first_chunk) // c)
        for i, off in enumerate(range(self.first_chunk, total, c)):
            bcast(buf[off:min(off + c, total)], route, deadline, f"collective {i + 2} of {n}")

    def inline_channel(self, route: Route, deadline):
        """The one-call channel of route's source (`_C.CollectiveChannel`)
        on a CPU group: a frame that fits the first collective is encoded,
        broadcast and decoded by one call each (send_object / recv_object),
        with no Python around the collective. None on NCCL (frames are
        staged through device memory here), with ONE_CALL off, or for a
        group that C++ cannot drive."""
        if self.cuda or not ONE_CALL:
            return None
        ch = self._channel
        if ch is False:
            pg = route.group if route.group is not None else dist.group.WORLD
            try:
                ch = _C.CollectiveChannel(pg, self.first_chunk, self.chunk)
                ch.buffer = self._recv_buf
            except (TypeError, RuntimeError):   # not a c10d ProcessGroup of this torch
                ch = None
            self._channel = ch
        if ch is not None and ch.root != route.src_group_rank:
            ch.root = route.src_group_rank
        return ch

    def settle(self) -> None:
        # The previous source call's H2D copy may still read its host block;
        # wait for it before the block can go back to the pool.
        if self._inflight is not None:
            self._inflight[1].synchronize()
            self._inflight = None

    # -- frames ----------------------------------------------------------
    def send(self, block: torch.Tensor, nbytes: int, route: Route, deadline) -> None:
        """Source: block[:nbytes] is the frame; block is at least first_chunk long."""
        total = max(nbytes, self.first_chunk)
        buf = block
        if self.cuda:
            buf = self._stage(total)
            buf[:nbytes].copy_(block[:nbytes], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._inflight = (block, event)
        n = 1 + -(-(total - self.first_chunk) // self.chunk)
        bcast(buf[:self.first_chunk], route, deadline, f"collective 1 of {n} (the first chunk)")
        self._chunks(buf, total, route, deadline)

    def recv(self, route: Route, deadline, max_bytes: int):
        """Receiver: the whole frame. Returns (buf, header): buf is None when
        the frame was over max_bytes (its bytes were received in chunk-sized
        pieces and dropped, so the source finished); for a stream's message
        0 over max_bytes it holds only the first STREAM_PREFIX_BYTES, what
        the receiver needs to follow the rest of the stream."""
        f = self.first_chunk
        first = self._channel.take() if self._channel else None   # what recv_object received, not decoded
        if first is not None:
            host = first
        elif self.cuda:
            host = self._recv_buf if self._recv_buf is not None else _host(f)
            dev = self._stage(max(f, host.numel()))
            bcast(dev[:f], route, deadline, "collective 1 (the first chunk)")
            _to_host(dev, host, 0, f)
        else:
            host = self._recv_buf if self._recv_buf is not None else _host(f)
            bcast(host[:f], route, deadline, "collective 1 (the first chunk)")
        header = read_header(host, route)
        version, flags, total, _, first_chunk, chunk, device_len, _ = header
        # What the frame carries, not the first_chunk it is padded to.
        announced = total - _C.HEADER_BYTES + (device_len if flags & _C.FLAG_CUDA else 0)
        if (first_chunk, chunk) != (f, self.chunk):
            msg = (f"chunk sizes differ between ranks: the source (global rank {route.src}) uses first_chunk="
                   f"{first_chunk}, chunk={chunk}; this rank (global rank {route.rank}) uses first_chunk={f}, "
                   f"chunk={self.chunk}. Configure every rank alike (FASTBCAST_FIRST_CHUNK / FASTBCAST_CHUNK).")
            if first_chunk <= f:
                # Follow the source's chunking to the frame's end (a stream:
                # to its LAST segment), so the source is not left sending
                # and the next call pairs with the next frame, then raise.
                # (A source's first_chunk above this rank's ends in gloo
                # itself: the first collective does not fit.)
                if flags & _C.FLAG_STREAM:
                    from . import stream
                    keep = min(total, max(first_chunk, _C.STREAM_PREFIX_BYTES))
                    host = _grown(host, keep, first_chunk)
                    self.receive(host, first_chunk, total, keep, route, deadline, "collective", chunk)
                    stream.receive(None, self, host[:keep], header, route, deadline, None, chunk)
                else:
                    self._drain(route, deadline, total, chunk, first_chunk)
                    if flags & _C.FLAG_CUDA:
                        self.recv_device(device_len, route, deadline)
            raise ProtocolMismatch(msg)
        total = max(total, f)
        keep = total
        # An error frame (at most max(first_chunk, 4 KiB)) is kept whatever
        # max_bytes says: its text is the source's reason.
        if version == FORMAT_VERSION and announced > max_bytes and not flags & _C.FLAG_ERROR:
            if not flags & _C.FLAG_STREAM:
                self._drain(route, deadline, total, self.chunk)
                return None, header
            # Over max_bytes already, but a stream goes on after message 0:
            # its prologue is all the receiver needs to follow the rest.
            keep = min(total, max(f, _C.STREAM_PREFIX_BYTES))
        host = _grown(host, keep, f)
        self._keep(host)
        self.receive(host, f, total, keep, route, deadline, "collective")
        return (host if keep == total else host[:keep]), header

    def receive(self, buf: torch.Tensor, have: int, total: int, keep: int, route: Route, deadline, what: str,
                chunk: int | None = None) -> None:
        """Receives bytes [have, total) of a message whose first `have` are in
        buf, in collectives of `chunk` bytes. Only bytes below `keep` land in
        buf; the others go through one reused piece of at most a chunk, so a
        refused message is followed to its end (no rank is left waiting)
        without a buffer of its size."""
        c = chunk or self.chunk
        keep = min(keep, total)
        n = 1 + -(-(total - have) // c)
        dev = self._stage(min(total, keep + c)) if self.cuda else None
        scratch = None
        for i, off in enumerate(range(have, total, c)):
            end = min(off + c, total)
            if dev is not None:
                # Past keep + c, a collective reuses the staging past keep.
                dst = dev[off:end] if end <= keep + c else dev[keep:keep + end - off]
            elif end <= keep:
                dst = buf[off:end]
            else:
                if scratch is None:
                    scratch = torch.empty(min(c, total - off), dtype=torch.uint8)
                dst = scratch[:end - off]
            bcast(dst, route, deadline, f"{what} {i + 2} of {n}" + ("" if end <= keep else " (dropped)"))
            if dev is None and off < keep < end:
                buf[off:keep].copy_(scratch[:keep - off])
        if dev is not None and keep > have:
            _to_host(dev, buf, have, keep)

    def _drain(self, route: Route, deadline, total: int, chunk: int, have: int | None = None) -> None:
        """Receives the rest of a refused frame (past its first `have` bytes,
        default first_chunk) into one reused piece of at most `chunk` bytes,
        so the source finishes and nothing large is kept."""
        self.receive(None, have or self.first_chunk, total, 0, route, deadline, "collective", chunk)

    def release(self) -> None:
        """Receiver: done with the frame returned by recv. Its buffer is kept
        for the next call unless it is large: a Broadcaster lives as long as
        its group, and one large frame must not pin its size for good."""
        if self._recv_buf is not None and self._recv_buf.numel() > KEEP_RECV_BUFFER:
            self._keep(None)

    def _keep(self, buf: torch.Tensor | None) -> None:
        """The receive buffer for the next frame, shared with the one-call channel."""
        self._recv_buf = buf
        if self._channel:
            self._channel.buffer = buf

    # -- CUDA tensors ----------------------------------------------------
    def send_device(self, buf: torch.Tensor, route: Route, deadline) -> None:
        bcast(buf, route, deadline, "the device buffer")

    def recv_device(self, nbytes: int, route: Route, deadline) -> torch.Tensor:
        """Receiver: the frame's device buffer (bytes the source sent with send_device)."""
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if nbytes:  # the source sends the device buffer only when it has bytes
            bcast(buf, route, deadline, "the device buffer")
        return buf

    def close(self) -> None:
        self.settle()
        self._staging = None
        self._recv_buf = None
        self._channel = False


class ProtocolMismatch(TransportError):
    """The ranks are configured differently (chunk sizes); raised after the
    frame was received, so no rank is left waiting."""


def _to_host(dev: torch.Tensor, host: torch.Tensor, start: int, stop: int) -> None:
    host[start:stop].copy_(dev[start:stop], non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    event.synchronize()


# ---------------------------------------------------------------------------
# Shared memory
# ---------------------------------------------------------------------------

def _env_int(name: str, default, kind=int):
    """The integer (kind=float: number) in environment variable `name`, or
    `default` if it is unset or empty; a ValueError naming the variable if
    it is neither."""
    v = os.environ.get(name)
    if not v:
        return default
    try:
        return kind(v)
    except ValueError:
        raise ValueError(f"{name}={v!r} is not {'an integer' if kind is int else 'a number'}") from None


def _alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a killed process
    stays one until its parent reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def shm_geometry() -> tuple[int, int]:
    """(slots, slot_bytes) of each ring: FASTBCAST_SHM_SLOTS and
    FASTBCAST_SHM_BYTES (the whole ring, split evenly and rounded down to
    the ring's 64-byte slot alignment), or the C++ defaults."""
    slots = _env_int("FASTBCAST_SHM_SLOTS", _C.SHM_DEFAULT_SLOTS)
    total = _env_int("FASTBCAST_SHM_BYTES", slots * _C.SHM_DEFAULT_SLOT_BYTES)
    if slots < 2 or total // slots < 4096:
        raise ValueError(f"FASTBCAST_SHM_SLOTS={slots} / FASTBCAST_SHM_BYTES={total}: need at least 2 slots of "
                         f"at least 4 KiB")
    return slots, total // slots // 64 * 64


def host_key() -> int:
    """Processes that can share a POSIX shared-memory segment get equal keys:
    same kernel boot, same IPC namespace and same /dev/shm mount."""
    parts = [socket.gethostname()]
    for path in ("/proc/sys/kernel/random/boot_id",):
        try:
            with open(path) as f:
                parts.append(f.read().strip())
        except OSError:
            parts.append("-")
    for path in ("/proc/self/ns/ipc", "/dev/shm"):
        try:
            st = os.stat(path)
            parts.append(f"{st.st_dev}:{st.st_ino}")
        except OSError:
            parts.append("-")
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


#: Bytes the probe reserves and maps: enough to show /dev/shm works.
PROBE_BYTES = 4096


def _available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (shared-memory pages are RAM
    and count as used there); no limit if it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62


def shm_probe(nbytes: int) -> int:
    """0 if this process can create and map a segment in /dev/shm and a ring
    of `nbytes` fits its free space and this host's available memory;
    otherwise the errno that stopped it. Every rank probes at once, so it
    reserves one page, not the ring (reserving the ring on every rank at
    once put a rank in the OOM killer's way); the source's ring creation
    reserves the ring, and every rank falls back if that fails."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError as e:
        return e.errno or errno_mod.EIO
    if st.f_bavail * st.f_frsize < nbytes:
        return errno_mod.ENOSPC
    if _available_memory() < nbytes:
        return errno_mod.ENOMEM
    path = f"/dev/shm/fastbcast-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError as e:
        return e.errno or errno_mod.EIO
    try:
        os.unlink(path)
        n = min(nbytes, PROBE_BYTES)
        os.posix_fallocate(fd, 0, n)
        mmap.mmap(fd, n).close()
        return 0
    except OSError as e:
        return e.errno or errno_mod.EIO
    finally:
        os.close(fd)


#: agree()'s code for a rank whose FASTBCAST_SHM_* settings make no ring (not an errno).
BAD_SETTINGS = -1


def _cannot_map(rank: int, code: int, own_reason: str | None) -> str:
    if code == BAD_SETTINGS:
        return f"global rank {rank}: {own_reason or 'its FASTBCAST_SHM_SLOTS / FASTBCAST_SHM_BYTES are unusable'}"
    return f"global rank {rank} cannot map its shared-memory ring in /dev/shm ({os.strerror(code)})"


class GroupState:
    """What every Broadcaster on one process group shares, on this rank.

    The one-line functions keep one Broadcaster per set of options, and
    ranks may pass different options (the source allow_pickle, receivers
    trusted=...), so what must pair up across ranks lives here, per group:
    the call number, whether the group is still in step, the transport the
    ranks agreed on, and the shared-memory rings.

    Found (or made, empty) by `GroupState.of`; `agree` settles the
    transport with one collective at the group's first broadcast that may
    use shared memory.
    """

    _all: "weakref.WeakKeyDictionary" = None   # process group -> GroupState

    def __init__(self):
        self.seq = 0
        self.broken: str | None = None
        self.agreed = False
        self.no_shm: str | None = None          # why shared memory cannot be used (after agree)
        self.pids: list[int] = []
        self.token = 0
        self.rings: dict[int, object] = {}     # source group rank -> ShmChannel, or None: use the collective

    @classmethod
    def of(cls, group) -> "GroupState":
        """The state of `group` (None: the world) on this rank, made empty the first time."""
        if cls._all is None:
            cls._all = weakref.WeakKeyDictionary()
        key = group if group is not None else dist.group.WORLD
        state = cls._all.get(key)
        if state is None:
            state = cls._all[key] = cls()
            weakref.finalize(key, state.close)
        return state

    def agree(self, route: Route, device: torch.device, deadline) -> None:
        """Settles, once per group, whether shared memory can carry the
        group's bytes: one all-gather of every rank's host key, pid and
        whether it can map a ring. Every rank calls it at the same call (the
        first broadcast on the group that may use shared memory)."""
        if self.agreed:
            return
        reason = None
        try:
            slots, slot_bytes = shm_geometry()
            probe = shm_probe(slots * slot_bytes)
        except ValueError as e:
            # This rank's settings are wrong: it still joins the collective
            # below, so the group falls back instead of waiting, and the
            # fallback's warning says why.
            reason, probe = str(e), BAD_SETTINGS
        mine = torch.tensor([host_key(), os.getpid(), probe, secrets.randbits(62)], dtype=torch.int64, device=device)
        every = torch.empty(route.size * 4, dtype=torch.int64, device=device)
        collective(all_gather, every, route, deadline, "agreeing on the transport", input_tensor=mine)
        rows = every.view(route.size, 4).tolist()
        self.pids = [r[1] for r in rows]
        self.token = rows[0][3]
        failed = [(route.ranks[i], r[2]) for i, r in enumerate(rows) if r[2]]
        if len({r[0] for r in rows}) != 1:
            self.no_shm = "the group spans more than one host (or IPC namespace, or /dev/shm mount)"
        elif failed:
            self.no_shm = "; ".join(_cannot_map(rk, e, reason if rk == route.rank else None) for rk, e in failed)
            logger.warning("fastbcast: group %s uses the collective transport instead of shared memory: %s",
                           list(route.ranks), self.no_shm)
        self.agreed = True

    def close(self) -> None:
        for ch in self.rings.values():
            if ch is not None:
                ch.close()
        self.rings.clear()

    def give_up(self, why: str) -> None:
        """The ranks are out of step: refuse further calls, and close the
        rings so that peers waiting on this rank's end raise instead."""
        if self.broken is None:
            self.broken = why
        self.close()

    def dead_ranks(self, route: Route) -> list[tuple[int, int]]:
        """(global rank, pid) of the group's processes that no longer exist
        (known once the ranks agreed on the transport; all on this host)."""
        if not self.pids or self.no_shm:
            return []
        return [(rank, pid) for rank, pid in zip(route.ranks, self.pids) if not _alive(pid)]

    def ring(self, route: Route, collective_t: "CollectiveTransport", deadline):
        """The ring of route's source, made the first time it sends: the
        source says whether it made the segment, then every rank says
        whether it attached (two small collectives, on every rank at the same
        call). Only then does the source unlink the name, so nothing is left
        in /dev/shm whatever happens to any process afterwards. None: the
        ring could not be made, and that source uses the collective."""
        ch = self.rings.get(route.src_group_rank, False)
        if ch is not False:
            return ch
        s = route.src_group_rank
        order = [s] + [i for i in range(route.size) if i != s]   # writer first, then the readers
        ranks = [route.ranks[i] for i in order]
        pids = [self.pids[i] for i in order]
        name = f"fastbcast-{os.getuid()}-{self.token:x}-{s}"
        slots, slot_bytes = shm_geometry()
        dev = collective_t.device
        ch, err = None, 0
        if route.is_src:
            try:
                ch = _C.ShmChannel.create(name, ranks, pids, slots, slot_bytes)
            except OSError as e:
                err = e.errno or errno_mod.EIO
            except ValueError as e:  # a geometry the ring refuses: every rank falls back, none is left waiting
                err = errno_mod.EINVAL
                logger.warning("fastbcast: cannot make the shared-memory ring of %d slots of %d bytes: %s",
                               slots, slot_bytes, e)
        made = torch.tensor([err], dtype=torch.int64, device=dev)
        bcast(made, route, deadline, "setting up the shared-memory ring")
        err = int(made.item())
        if not err and not route.is_src:
            try:
                # The segment exists (the source said so) and stays named until
                # every rank has answered, so the wait is short; bounded all
                # the same, and a failure here is this rank's answer.
                ch = _shm_call(_C.ShmChannel.attach, name, order.index(route.group_rank) - 1, ranks, pids,
                               min(_left(deadline) or ATTACH_TIMEOUT_S, ATTACH_TIMEOUT_S))
            except (OSError, ValueError, TransportError) as e:
                err = getattr(e, "errno", None) or errno_mod.EIO
        every = torch.empty(route.size, dtype=torch.int64, device=dev)
        collective(all_gather, every, route, deadline, "attaching the shared-memory ring",
                   input_tensor=torch.tensor([err], dtype=torch.int64, device=dev))
        codes = every.tolist()
        if ch is not None and route.is_src:
            if not any(codes):
                _shm_call(ch.wait_attached, _left(deadline))
            ch.unlink()
        if any(codes):
            bad = ", ".join(f"global rank {route.ranks[i]}: {os.strerror(c)}" for i, c in enumerate(codes) if c)
            logger.warning("fastbcast: source global rank %d of group %s uses the collective transport: the "
                           "shared-memory ring could not be set up (%s)", route.src, list(route.ranks), bad)
            if ch is not None:
                ch.close()
            ch = None
        self.rings[s] = ch
        return ch


class ShmTransport:
    """Frames through the group's shared-memory rings, one per source.

    Arguments:
        state: the group's GroupState (owns the rings).
        collective: this Broadcaster's CollectiveTransport: it carries CUDA
            tensors, and every frame of a source whose ring could not be
            made.
    """

    name = "shm"
    min_capacity = 0

    def __init__(self, state: GroupState, collective: CollectiveTransport):
        self.state = state
        self.collective = collective
        self._held = None

    def inline_channel(self, route: Route, deadline):
        """The ring of route's source, when it carries this source's frames:
        small frames then go through its send_object / recv_object, one
        call each, with no tensor made for them. A source without a ring
        uses the collective's channel."""
        ch = self.state.ring(route, self.collective, deadline)
        return ch if ch is not None else self.collective.inline_channel(route, deadline)

    def send(self, block: torch.Tensor, nbytes: int, route: Route, deadline) -> None:
        ch = self.state.ring(route, self.collective, deadline)
        if ch is None:
            # The collective path reads first_chunk bytes of the source's block.
            self.collective.send(_grown(block, self.collective.first_chunk, nbytes), nbytes, route, deadline)
            return
        _shm_call(ch.send, block, nbytes, _left(deadline))

    def recv(self, route: Route, deadline, max_bytes: int):
        ch = self.state.ring(route, self.collective, deadline)
        if ch is None:
            return self.collective.recv(route, deadline, max_bytes)
        # A frame over max_bytes is drained in the ring, not copied; of a
        # stream's message 0 its prologue is kept, to follow the stream.
        buf = _shm_call(ch.recv, _left(deadline), max_bytes + _C.HEADER_BYTES, _C.STREAM_PREFIX_BYTES)
        self._held = ch
        header = read_header(buf, route)
        whole = buf.numel() >= header[2]
        return (buf if whole or header[1] & _C.FLAG_STREAM else None), header

    def release(self) -> None:
        if self._held is not None:
            self._held, ch = None, self._held
            ch.release()

    def send_device(self, buf, route, deadline) -> None:
        self.collective.send_device(buf, route, deadline)

    def recv_device(self, nbytes, route, deadline):
        return self.collective.recv_device(nbytes, route, deadline)

    def settle(self) -> None:
        self.collective.settle()

    def close(self) -> None:
        self.release()
        self.collective.close()


def _grown(host: torch.Tensor, nbytes: int, have: int) -> torch.Tensor:
    """`host`, or a buffer of at least nbytes holding its first `have` bytes."""
    if host.numel() >= nbytes:
        return host
    bigger = _host(nbytes)
    bigger[:have].copy_(host[:have])
    return bigger


def _shm_call(fn, *args):
    try:
        return fn(*args)
    except (_C.ShmTimeoutError, _C.ShmPeerError) as e:
        raise_channel_failure(e)


#: What an inline channel (ShmChannel, CollectiveChannel) raises when bytes could not move.
CHANNEL_ERRORS = (_C.ShmTimeoutError, _C.ShmPeerError, _C.CollectiveError)


def raise_channel_failure(e: BaseException, deadline: float | None = None, what: str = ""):
    """Raises what an inline channel's exception means to the protocol, from
    e (a TransportTimeout / TransportError); e itself if it means nothing
    more. `what` names the collective a CollectiveError came from."""
    if isinstance(e, _C.ShmTimeoutError):
        raise TransportTimeout(str(e)) from e
    if isinstance(e, _C.ShmPeerError):
        raise TransportError(str(e)) from e
    if isinstance(e, _C.CollectiveError):
        raise _failure(e, deadline, what) from e
    raise e
