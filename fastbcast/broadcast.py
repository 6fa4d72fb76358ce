"""Broadcasting Python objects over a torch.distributed group.

The protocol (FORMAT.md section 3): the source encodes the object behind a
32-byte header into a pinned pool buffer; the first collective always moves
`first_chunk` bytes, so a small object needs exactly one collective and no
size has to be sent ahead. A larger object continues in collectives of
`chunk` bytes, whose count every receiver derives from the header. CUDA
tensors inside the object are packed into one device buffer and sent with one
more collective, device to device.

NCCL groups stage through a cached device buffer with asynchronous copies on
the current stream; receivers wait on CUDA events (never `.item()` or a device
sync). gloo groups use the host buffers directly.

The collectives are driven from Python: each costs one `dist.broadcast` call
(a few microseconds of dispatch), against encode/decode work that is measured
in milliseconds for the payloads that matter; see BENCHMARKS.md.

Failure handling (RELIABILITY.md has the whole table and the tests):

* The source that cannot send its object (an encode error, an object over
  `max_bytes`, an exhausted pool) still sends a first chunk: an error frame
  that makes every receiver raise BroadcastError with the source's message.
* `timeout=` bounds a whole broadcast call. Each collective is started with
  `async_op=True` and waited on with the time left; past the deadline the
  call raises BroadcastTimeoutError. A dead or stalled peer, or ranks that
  disagree about `src`, end there instead of waiting for the process group's
  own timeout (30 minutes by default for gloo, 10 for NCCL).
* After a collective failed or timed out the group is in an unknown state (a
  collective may still be pending inside torch.distributed), so the
  Broadcaster refuses further use with BroadcastError; recreate the group.
* A group destroyed with `destroy_process_group` is detected before anything
  is sent: RuntimeError, on each rank that uses it.
"""
from __future__ import annotations

import datetime
import os
import struct
import threading
import time
from typing import Any, Iterable

import torch
import torch.distributed as dist

from ._loader import _C
from ._version import FORMAT_VERSION
from .mesh import Route, resolve

__all__ = ["Broadcaster", "BroadcastError", "BroadcastTimeoutError", "broadcast", "broadcast_pyobj",
           "DEFAULT_FIRST_CHUNK", "DEFAULT_CHUNK", "DEFAULT_MAX_BYTES", "DEFAULT_TIMEOUT"]

HEADER_BYTES = _C.HEADER_BYTES
DEVICE_ALIGN = _C.DEVICE_ALIGN


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v else default


#: Bytes of the first collective, for every backend (FASTBCAST_FIRST_CHUNK).
#: Objects up to first_chunk - 32 bytes encoded need no other collective.
DEFAULT_FIRST_CHUNK = _env_int("FASTBCAST_FIRST_CHUNK", 64 << 10)
#: Bytes of each following collective (FASTBCAST_CHUNK).
DEFAULT_CHUNK = _env_int("FASTBCAST_CHUNK", 64 << 20)
#: Cap on the bytes one broadcast may carry: the encoded value plus its CUDA
#: tensors (FASTBCAST_MAX_BYTES, default 4 GiB). The source refuses a larger
#: object before sending anything but an error frame; a receiver refuses a
#: frame whose header announces more.
DEFAULT_MAX_BYTES = _env_int("FASTBCAST_MAX_BYTES", 4 << 30)


def _env_seconds(name: str) -> float | None:
    v = os.environ.get(name)
    return float(v) if v else None


#: Default `timeout=` of every Broadcaster, in seconds (FASTBCAST_TIMEOUT;
#: unset: none, so only the process group's own timeout applies).
DEFAULT_TIMEOUT = _env_seconds("FASTBCAST_TIMEOUT")


class BroadcastError(RuntimeError):
    """A broadcast failed on another rank or between ranks: the source could
    not encode its object, or the ranks disagree on the protocol (format
    version, chunk sizes), or a collective failed (a peer died). Raised on
    every receiving rank alike."""


class BroadcastTimeoutError(BroadcastError):
    """A broadcast did not finish within its `timeout=`: a peer is dead or
    stalled, or the ranks disagree about the source. The group may still
    hold the unfinished collective, so the Broadcaster that raised this
    refuses further use; destroy and recreate the group."""


def _backend(group) -> str:
    return str(dist.get_backend(group)).lower()


def _require_live(group) -> None:
    """RuntimeError if `group` (None: the world) was destroyed.

    A destroyed group object stays referenced by its Broadcaster (and by the
    mesh layer's cache), and torch would only notice at the first collective;
    checking first (under a microsecond) makes the error say what happened,
    on every rank, before anything is sent."""
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group() (or "
            "init_device_mesh()) first; if it was, the default process group has been destroyed since, and "
            "with it every group a Broadcaster could use")
    if not isinstance(group, dist.ProcessGroup):
        return  # None (the world) or not a group at all: resolve() says what is wrong
    try:
        dist.get_backend(group)
    except (ValueError, RuntimeError, KeyError) as e:
        raise RuntimeError(
            f"the process group was destroyed (torch.distributed.destroy_process_group) or belongs to a "
            f"torn-down world ({type(e).__name__}: {e}); create a new group and a new Broadcaster") from e


class Broadcaster:
    """Broadcasts objects within one process group, reusing its buffers.

    Create one per group and keep it for the life of the group: it caches a
    device staging buffer (NCCL) that grows to the largest object sent and
    host buffers from fastbcast's pinned pool. `close()` (or leaving a `with`
    block) waits for copies still in flight and frees the device buffer; the
    object must not be used afterwards.

    Threads: a Broadcaster is not shared between threads. A second thread
    that calls `broadcast` while another thread is inside it gets a
    RuntimeError at once (it does not wait): two threads driving collectives
    on one group would interleave them differently on different ranks. Use
    one group and one Broadcaster per thread. (The one-line functions share
    one cached Broadcaster per group, so the same holds for them.)

    Arguments:
        group: the ProcessGroup, or None for the default (world) group.
        mesh, dim: alternatively a DeviceMesh and the name of one of its dims;
            the group is that dim's group for this rank.
        device: the device that carries the bytes. Default: the current CUDA
            device for an NCCL group, the CPU for any other backend.
        first_chunk: bytes of the first collective (default 64 KiB).
        chunk: bytes of each following collective (default 64 MiB).
        compat, allow_pickle: codec options for the source (see
            `fastbcast.encode`); allow_pickle also lets receivers accept
            pickles.
        trusted: module prefixes whose classes receivers may rebuild (see
            `fastbcast.decode`).
        timeout: seconds (or a datetime.timedelta) that one `broadcast` call
            may take, from its start on this rank to its last collective;
            None (default, or FASTBCAST_TIMEOUT) waits as long as the process
            group's own timeout. Past it the call raises
            BroadcastTimeoutError. On the source the encode counts too, so
            allow for it on receivers. On gloo the wait is
            `work.wait(timeout)`; on NCCL the same call blocks this CPU
            thread until the GPU finished the collective (torch documents
            that a wait with a timeout does), which costs a few microseconds
            per collective that the default stream-ordered wait does not.
        max_bytes: the most bytes one broadcast may carry: the encoded value
            plus its CUDA tensors (default 4 GiB, or FASTBCAST_MAX_BYTES).
            The source refuses a larger object with ValueError before it
            sends anything but an error frame, so every receiver raises
            BroadcastError saying why. A receiver also refuses a frame whose
            header announces more than its own max_bytes: it takes the rest
            of the frame in chunk-sized pieces (so nothing large is held and
            the source is not left waiting) and raises BroadcastError.
    """

    def __init__(self, group=None, *, mesh=None, dim=None, device=None, first_chunk: int | None = None,
                 chunk: int | None = None, compat: bool = False, allow_pickle: bool = False,
                 trusted: Iterable[str] = (), timeout: float | datetime.timedelta | None = None,
                 max_bytes: int | None = None):
        _require_live(group)
        route = resolve(mesh=mesh, dim=dim, group=group)
        self._mesh, self._dim = mesh, dim
        self.group = route.group
        self.backend = route.backend
        if device is None:
            # A mixed default group ("cpu:gloo,cuda:nccl") can carry either;
            # take the device path when it has NCCL.
            has_nccl = "nccl" in self.backend and torch.cuda.is_available()
            device = torch.device("cuda", torch.cuda.current_device()) if has_nccl else torch.device("cpu")
        self.device = torch.device(device)
        if self.backend == "nccl" and self.device.type != "cuda":
            raise ValueError(f"an NCCL group carries CUDA buffers; device={self.device} is not a CUDA device")
        self.first_chunk = int(first_chunk or DEFAULT_FIRST_CHUNK)
        self.chunk = int(chunk or DEFAULT_CHUNK)
        if not HEADER_BYTES <= self.first_chunk < 2**32 or not 0 < self.chunk < 2**32:
            raise ValueError(f"first_chunk must be in [{HEADER_BYTES}, 2^32) and chunk in (0, 2^32)")
        self.compat = compat
        self.allow_pickle = allow_pickle
        self.trusted = tuple(trusted) or None
        if timeout is None:
            timeout = DEFAULT_TIMEOUT
        if isinstance(timeout, datetime.timedelta):
            timeout = timeout.total_seconds()
        if timeout is not None and not (float(timeout) > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        self.timeout = None if timeout is None else float(timeout)
        self.max_bytes = int(DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes!r}")
        self._staging: torch.Tensor | None = None   # device bytes (CUDA transport only)
        self._inflight = None                       # (host block, event) the last H2D copy reads
        self._recv_hint = self.first_chunk          # size of the last frame received
        self._lock = threading.Lock()
        self._closed = False
        self._broken: str | None = None             # why the group can no longer be trusted
        self._deadline: float | None = None         # time.monotonic() deadline of the call in progress

    # ---- public ---------------------------------------------------------
    def broadcast(self, obj: Any = None, *, src: int | None = None, src_group_rank: int | None = None,
                  rank: int | None = None) -> Any:
        """Sends `obj` from the source to every rank of the group.

        Every rank of the group calls this with the same `src` (or
        `src_group_rank`); only the source's `obj` is read.

        Arguments:
            obj: the object, on the source (ignored elsewhere).
            src: the source as a GLOBAL rank. Default: the group's first
                rank (for a mesh: `mesh[dim].mesh[0]` of this rank's slice).
            src_group_rank: the source as a GROUP rank (0 .. size-1), instead
                of `src`.
            rank: optionally, this process's GLOBAL rank as the caller
                believes it; a mismatch is a ValueError before anything is
                sent (it catches group-local ranks passed by mistake).

        Returns:
            The source returns `obj` itself; every other rank returns an
            equal object decoded from the bytes.

        Raises:
            ValueError: src/rank are not in the group or not this process
                (nothing is sent; raised on the ranks that passed them);
                (source) the object encodes to more than `max_bytes`.
            TypeError: (source) an object the codec cannot represent;
                receivers then raise BroadcastError with the same message.
            BroadcastError: (receivers) the source failed, the ranks run
                different fastbcast format versions, or the frame is over
                this rank's `max_bytes`; (any rank) a collective failed (a
                peer died), or this Broadcaster is unusable after such a
                failure.
            BroadcastTimeoutError: the call took longer than `timeout`.
            RuntimeError: the group was destroyed, the Broadcaster was
                closed, or another thread is inside `broadcast`.
            DecodeError: (receivers) the bytes did not decode.
        """
        self._check_group_alive()
        route = resolve(mesh=self._mesh, dim=self._dim, group=self.group if self._mesh is None else None,
                        src=src, src_group_rank=src_group_rank, rank=rank)
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this Broadcaster is in use by another thread; use one Broadcaster per thread "
                               "(collectives on one group must not interleave)")
        try:
            if self._closed:
                raise RuntimeError("this Broadcaster was closed")
            if self._broken is not None:
                raise BroadcastError(
                    f"this Broadcaster can no longer be used: {self._broken}. The process group may still "
                    f"hold an unfinished collective, so its ranks are out of step; destroy and recreate the "
                    f"group (and the Broadcaster).")
            if route.size == 1:
                return obj
            self._deadline = None if self.timeout is None else time.monotonic() + self.timeout
            if route.is_src:
                return self._send(obj, route)
            return self._recv(route)
        finally:
            self._deadline = None
            self._lock.release()

    def close(self) -> None:
        """Waits for copies in flight and frees the cached device buffer."""
        with self._lock:
            self._settle()
            self._staging = None
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- checks ---------------------------------------------------------
    def _check_group_alive(self):
        _require_live(self.group)

    # ---- transport ------------------------------------------------------
    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    def _settle(self):
        # The previous source call's H2D copy may still read its host block;
        # wait for it before the block can go back to the pool.
        if self._inflight is not None:
            self._inflight[1].synchronize()
            self._inflight = None

    def _stage(self, nbytes: int) -> torch.Tensor:
        if self._staging is None or self._staging.numel() < nbytes:
            size = 1 << max(nbytes - 1, 1).bit_length()
            self._staging = torch.empty(size, dtype=torch.uint8, device=self.device)
        return self._staging

    @staticmethod
    def _host(nbytes: int) -> torch.Tensor:
        """A host buffer of at least nbytes: a pool block, or, when the pool's
        cap is reached, ordinary memory (slower to copy to a GPU, but a rank
        that cannot join a collective would leave its peers waiting)."""
        try:
            return _C.pool_acquire(nbytes)
        except RuntimeError:
            return torch.empty(nbytes, dtype=torch.uint8)

    def _bcast(self, buf: torch.Tensor, route: Route, what: str):
        """One collective, bounded by the call's deadline when there is one.
        Any failure leaves the ranks out of step: the Broadcaster is marked
        unusable and the error is raised as BroadcastError(Timeout)."""
        deadline = self._deadline
        try:
            if deadline is None:
                dist.broadcast(buf, src=route.src, group=route.group)
                return
            left = deadline - time.monotonic()
            if left > 0:
                work = dist.broadcast(buf, src=route.src, group=route.group, async_op=True)
                work.wait(timeout=datetime.timedelta(seconds=left))
                return
            error = None
        except RuntimeError as e:
            error = e
        role = "source" if route.is_src else f"receiver of global rank {route.src}"
        timed_out = deadline is not None and (error is None or time.monotonic() >= deadline - 1e-3
                                              or "timed out" in str(error).lower())
        if timed_out:
            self._broken = (f"a broadcast timed out after {self.timeout:g} s on global rank {route.rank} ({role}) "
                            f"during {what}")
            raise BroadcastTimeoutError(
                f"broadcast timed out after {self.timeout:g} s on global rank {route.rank} ({role}, group "
                f"{list(route.ranks)}) during {what}: a peer is dead or stalled, or the ranks passed different "
                f"src (every rank must name global rank {route.src} as the source). The group may still hold "
                f"this collective; destroy and recreate it.") from error
        self._broken = f"a collective failed on global rank {route.rank} ({role}) during {what}: {error}"
        raise BroadcastError(
            f"broadcast failed on global rank {route.rank} ({role}, group {list(route.ranks)}) during {what}: "
            f"{type(error).__name__}: {error}") from error

    def _collectives(self, buf: torch.Tensor, total: int, route: Route):
        """Broadcasts buf[:first_chunk], then buf[first_chunk:total] in chunks."""
        f, c = self.first_chunk, self.chunk
        n = 1 + max(0, -(-(total - f) // c))
        self._bcast(buf[:f], route, f"collective 1 of {n} (the first chunk)")
        for i, off in enumerate(range(f, total, c)):
            self._bcast(buf[off:min(off + c, total)], route, f"collective {i + 2} of {n}")

    def _send(self, obj, route: Route):
        self._settle()
        try:
            block, used, cuda_tensors, device_len = _C.encode_frame(
                obj, self.first_chunk, self.chunk, FORMAT_VERSION, self.compat, self.allow_pickle, self._cuda)
            size = used - HEADER_BYTES + device_len
            if size > self.max_bytes:
                del block, cuda_tensors
                raise ValueError(
                    f"the object encodes to {size} bytes, over this Broadcaster's max_bytes={self.max_bytes} "
                    f"(Broadcaster(max_bytes=) / FASTBCAST_MAX_BYTES); nothing was sent")
        except Exception as e:
            # Receivers are already waiting on the first chunk: tell them.
            msg = f"source (global rank {route.src}) failed to encode: {type(e).__name__}: {e}"
            self._send_frame(self._error_frame(msg), self.first_chunk, route)
            raise
        total = max(used, self.first_chunk)
        self._send_frame(block, total, route, used)
        if device_len:
            self._bcast(self._pack_device(cuda_tensors, device_len), route, "the device buffer")
        return obj

    def _error_frame(self, msg: str) -> torch.Tensor:
        f = self.first_chunk
        try:
            return _C.error_frame(msg, f, self.chunk, FORMAT_VERSION)
        except RuntimeError:
            # The pool is at its cap (often the very reason the encode
            # failed): build the frame in ordinary memory, or the receivers
            # would wait for a first chunk that never comes. The header
            # layout is FORMAT.md section 3, fixed for every version.
            data = msg.encode("utf-8", "replace")[:f - HEADER_BYTES]
            header = struct.pack("<4sHHQIIQ", b"FBC\x01", FORMAT_VERSION, _C.FLAG_ERROR, len(data), f,
                                 self.chunk, 0)
            frame = torch.zeros(f, dtype=torch.uint8)
            frame[:HEADER_BYTES + len(data)] = torch.frombuffer(bytearray(header + data), dtype=torch.uint8)
            return frame

    def _send_frame(self, block: torch.Tensor, total: int, route: Route, used: int | None = None):
        if not self._cuda:
            self._collectives(block, total, route)
            return
        used = total if used is None else used
        dev = self._stage(total)
        dev[:used].copy_(block[:used], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._inflight = (block, event)
        self._collectives(dev, total, route)

    def _pack_device(self, tensors, device_len: int) -> torch.Tensor:
        flat = torch.empty(device_len, dtype=torch.uint8, device=self.device)
        off = 0
        for t in tensors:
            off = (off + DEVICE_ALIGN - 1) // DEVICE_ALIGN * DEVICE_ALIGN
            n = t.numel() * t.element_size()
            if n:
                flat[off:off + n].copy_(t.reshape(-1).view(torch.uint8))
            off += n
        return flat

    def _recv(self, route: Route):
        f = self.first_chunk
        host = self._host(max(self._recv_hint, f))
        if self._cuda:
            dev = self._stage(max(self._recv_hint, f))
            self._bcast(dev[:f], route, "collective 1 (the first chunk)")
            self._to_host(dev, host, 0, f)
        else:
            self._bcast(host[:f], route, "collective 1 (the first chunk)")
        try:
            version, flags, payload_len, first_chunk, chunk, device_len = _C.read_header(host[:HEADER_BYTES])
        except ValueError as e:  # DecodeError: not a fastbcast frame, so where the source is is unknown
            self._broken = f"global rank {route.rank} received a corrupt frame header from global rank {route.src}"
            raise BroadcastError(f"{self._broken}: {e}") from e
        mismatch = None
        if (first_chunk, chunk) != (f, self.chunk):
            mismatch = BroadcastError(
                f"chunk sizes differ between ranks: the source (global rank {route.src}) uses first_chunk="
                f"{first_chunk}, chunk={chunk}; this rank (global rank {route.rank}) uses first_chunk={f}, "
                f"chunk={self.chunk}. Configure every rank alike (FASTBCAST_FIRST_CHUNK / FASTBCAST_CHUNK).")
            if first_chunk != f:
                # The first collective itself did not line up: there is no
                # frame to follow, so nothing more can be received safely.
                raise mismatch
            # Otherwise follow the source's chunking to the end of the frame
            # (so the source is not left sending), then raise.
        total = max(HEADER_BYTES + payload_len, f)
        announced = payload_len + (device_len if flags & _C.FLAG_CUDA else 0)
        if announced > self.max_bytes:
            self._drain(route, total, chunk, device_len if flags & _C.FLAG_CUDA else 0)
            raise BroadcastError(
                f"the source (global rank {route.src}) sent a frame of {announced} bytes, over this rank's "
                f"(global rank {route.rank}) max_bytes={self.max_bytes} (Broadcaster(max_bytes=) / "
                f"FASTBCAST_MAX_BYTES); it was received in pieces and dropped. Configure every rank alike.")
        self._recv_hint = total
        if total > f:
            if host.numel() < total:
                bigger = self._host(total)
                bigger[:f].copy_(host[:f])
                host = bigger
            n = 1 + -(-(total - f) // chunk)
            if self._cuda:
                dev = self._stage(total)
                for i, off in enumerate(range(f, total, chunk)):
                    self._bcast(dev[off:min(off + chunk, total)], route, f"collective {i + 2} of {n}")
                self._to_host(dev, host, f, total)
            else:
                for i, off in enumerate(range(f, total, chunk)):
                    self._bcast(host[off:min(off + chunk, total)], route, f"collective {i + 2} of {n}")
        device_buffer = None
        if flags & _C.FLAG_CUDA:
            device_buffer = torch.empty(device_len, dtype=torch.uint8, device=self.device if self._cuda else "cpu")
            if device_len:  # the source sends the device buffer only when it has bytes
                self._bcast(device_buffer, route, "the device buffer")
        # Everything the source sent has been received: errors from here on
        # leave no rank waiting.
        if mismatch is not None:
            raise mismatch
        if version != FORMAT_VERSION:
            raise BroadcastError(
                f"fastbcast format version mismatch: the source (global rank {route.src}) sent version {version}, "
                f"this rank (global rank {route.rank}) speaks version {FORMAT_VERSION}. Install the same fastbcast "
                f"on every rank.")
        if flags & _C.FLAG_ERROR:
            raise BroadcastError(bytes(host[HEADER_BYTES:HEADER_BYTES + payload_len].numpy()).decode("utf-8", "replace"))
        return _C.decode_frame(host, payload_len, device_buffer, self.allow_pickle, self.trusted)

    def _drain(self, route: Route, total: int, chunk: int, device_len: int):
        """Receives the rest of a refused frame into one reused piece of at
        most `chunk` bytes, so the source finishes and nothing large is kept."""
        f = self.first_chunk
        if total > f:
            piece = min(chunk, total - f)
            scratch = self._stage(piece) if self._cuda else torch.empty(piece, dtype=torch.uint8)
            n = 1 + -(-(total - f) // chunk)
            for i, off in enumerate(range(f, total, chunk)):
                self._bcast(scratch[:min(chunk, total - off)], route, f"collective {i + 2} of {n} (dropped)")
        if device_len:
            scratch = torch.empty(device_len, dtype=torch.uint8, device=self.device if self._cuda else "cpu")
            self._bcast(scratch, route, "the device buffer (dropped)")

    @staticmethod
    def _to_host(dev: torch.Tensor, host: torch.Tensor, start: int, stop: int):
        host[start:stop].copy_(dev[start:stop], non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        event.synchronize()


# Broadcaster per (group, device, options) for the one-line functions below:
# a documented cache so repeated calls reuse the staging buffers. Entries live
# as long as the process (process groups normally do too); see close_all().
_BROADCASTERS: dict = {}
_BROADCASTERS_LOCK = threading.Lock()


def _cached(group, device, **opts) -> Broadcaster:
    key = (group, None if device is None else str(device), tuple(sorted(opts.items())))
    with _BROADCASTERS_LOCK:
        b = _BROADCASTERS.get(key)
        if b is None or b._closed:
            b = _BROADCASTERS[key] = Broadcaster(group, device=device, **opts)
        return b


def _seconds(timeout):
    # A timedelta and its seconds must share one cached Broadcaster.
    return timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout


def close_all() -> None:
    """Closes every Broadcaster the module-level functions created."""
    with _BROADCASTERS_LOCK:
        for b in _BROADCASTERS.values():
            b.close()
        _BROADCASTERS.clear()


def broadcast(obj: Any = None, *, mesh=None, dim=None, group=None, src: int | None = None,
              src_group_rank: int | None = None, device=None, rank: int | None = None, compat: bool = False,
              allow_pickle: bool = False, trusted: Iterable[str] = (),
              timeout: float | datetime.timedelta | None = None, max_bytes: int | None = None) -> Any:
    """Broadcasts `obj` from one rank to every rank of a group, in one line.

    Every rank of the group calls it; every rank returns an equal object.

    Arguments:
        obj: the object, on the source (ignored elsewhere).
        mesh, dim: a DeviceMesh and the name of the dim to broadcast along
            (e.g. "tp"); the group is this rank's slice along that dim.
        group: instead of a mesh, a ProcessGroup (None: the world).
        src: the source, as a GLOBAL rank. Default: the group's first rank.
        src_group_rank: the source as a GROUP rank, instead of `src`.
        device: the transport device (default: current CUDA device for NCCL
            groups, CPU otherwise).
        rank: optionally this process's GLOBAL rank, checked.
        compat, allow_pickle, trusted: codec options (see `fastbcast.encode`
            and `fastbcast.decode`).
        timeout, max_bytes: as for `Broadcaster` (seconds the call may take;
            the most bytes it may carry).

    Returns:
        `obj` on the source, an equal decoded object elsewhere.
    """
    if mesh is not None:
        # The mesh decides the default source (its slice's first rank, which
        # need not be the group's lowest rank), so resolve it here.
        route = resolve(mesh=mesh, dim=dim, src=src, src_group_rank=src_group_rank, rank=rank)
        group, src, src_group_rank = route.group, route.src, None
    b = _cached(group, device, compat=compat, allow_pickle=allow_pickle, trusted=tuple(trusted),
                timeout=_seconds(timeout), max_bytes=max_bytes)
    return b.broadcast(obj, src=src, src_group_rank=src_group_rank, rank=rank)


#: The drop-in's pickle policy (FASTBCAST_ALLOW_PICKLE=0 makes it strict).
DROP_IN_ALLOW_PICKLE = os.environ.get("FASTBCAST_ALLOW_PICKLE", "1") != "0"


def broadcast_pyobj(data: list, rank: int, dist_group=None, src: int = 0, force_cpu_device: bool = True, *,
                    allow_pickle: bool | None = None, trusted: Iterable[str] = (),
                    timeout: float | datetime.timedelta | None = None, max_bytes: int | None = None) -> list:
    """Drop-in for SGLang's `broadcast_pyobj`, with the same signature and results.

    Arguments:
        data: the list to send (read on the source only).
        rank: this process's GLOBAL rank. A group-local rank here (the bug
            this project exists for) raises ValueError instead of silently
            returning [].
        dist_group: the ProcessGroup (None: the world).
        src: the source's GLOBAL rank.
        force_cpu_device: True sends through the host (the group must be
            able to move CPU tensors, e.g. gloo); False uses the current CUDA
            device when the group is an NCCL group. A gloo group always
            carries host buffers, the fastest path it has.
        allow_pickle: objects the codec cannot represent natively travel as
            pickles when True. Default True (FASTBCAST_ALLOW_PICKLE=0 flips
            it), which keeps every payload that works with SGLang's pickle
            version working; natively representable objects never use pickle.
            Pass False for the secure setting: no pickle on the wire.
        trusted: module prefixes whose classes receivers may rebuild, in
            addition to those given to `fastbcast.trust` (see `fastbcast.decode`).
        timeout, max_bytes: as for `Broadcaster` (seconds the call may take,
            default FASTBCAST_TIMEOUT or none; the most bytes it may carry,
            default FASTBCAST_MAX_BYTES or 4 GiB).

    Returns:
        `data` on the source; an equal list on every other rank; [] everywhere
        when `data` is [].
    """
    allow = DROP_IN_ALLOW_PICKLE if allow_pickle is None else allow_pickle
    if dist_group is None:
        dist_group = dist.group.WORLD
    _require_live(dist_group)
    backend = _backend(dist_group)
    if backend == "nccl" and force_cpu_device:
        raise ValueError("broadcast_pyobj(force_cpu_device=True) needs a group that carries CPU tensors (gloo); "
                         "this group's backend is nccl: pass its CPU group or force_cpu_device=False")
    device = None if backend == "nccl" else torch.device("cpu")
    b = _cached(dist_group, device, allow_pickle=allow, trusted=tuple(trusted), timeout=_seconds(timeout),
                max_bytes=max_bytes)
    if data is not None and len(data) == 0 and dist.get_rank() == src:
        # SGLang sends size 0 for any empty `data` and receivers build `[]`:
        # an empty tuple must arrive as `[]` too.
        b.broadcast([], src=src, rank=rank)
        return data
    return b.broadcast(data, src=src, rank=rank)
