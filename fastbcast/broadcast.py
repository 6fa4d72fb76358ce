"""Broadcasting Python objects over a torch.distributed group: the protocol.

The source encodes the object behind a 40-byte header into a pinned pool
buffer (a frame, FORMAT.md section 3) and hands it to the group's transport;
every receiver gets the whole frame back from its transport, checks the
header and decodes. Where the bytes move is `fastbcast.transport`: shared
memory when every rank of the group sits on one host, the group's own
collective (gloo, or NCCL through device staging) otherwise. CUDA tensors
inside the object travel device to device over the group's collective.

Every frame carries the group's call number, counted on every rank, so a
receiver whose calls are out of step with the source's raises instead of
returning another call's object.

Failure handling (RELIABILITY.md has the whole table and the tests):

* The source that cannot send its object (an encode error, an object over
  `max_bytes`, an exhausted pool, Ctrl-C) still sends a frame: an error
  frame that makes every receiver raise BroadcastError with its message.
* `timeout=` bounds a whole broadcast call. Past the deadline the call
  raises BroadcastTimeoutError. A dead or stalled peer, or ranks that
  disagree about `src`, end there instead of waiting for the process group's
  own timeout (30 minutes by default for gloo, 10 for NCCL). On shared
  memory a dead peer ends every survivor's call within a second, timeout or
  not.
* After a transport failed or timed out the ranks are in an unknown state,
  so the Broadcaster refuses further use with BroadcastError; recreate the
  group.
* A group destroyed with `destroy_process_group` is detected before anything
  is sent: RuntimeError, on each rank that uses it.
"""
from __future__ import annotations

import contextlib
import datetime
import numbers
import os
import threading
import time
from typing import Any, Iterable

import torch
import torch.distributed as dist

from ._loader import _C
from .codec import _prefixes
from ._version import FORMAT_VERSION
from . import stream as streaming
from .mesh import Route, resolve
from .transport import (CHANNEL_ERRORS, CollectiveTransport, GroupState, ProtocolMismatch, ShmTransport,
                        TransportError, TransportTimeout, _env_int, _left, raise_channel_failure)

__all__ = ["Broadcaster", "BroadcastError", "BroadcastTimeoutError", "broadcast", "broadcast_pyobj",
           "DEFAULT_FIRST_CHUNKS", "DEFAULT_CHUNK", "DEFAULT_MAX_BYTES", "DEFAULT_TIMEOUT", "DEFAULT_TRANSPORT"]



#: Bytes of the first collective, per backend; FASTBCAST_FIRST_CHUNK sets
#: every backend's. Objects up to first_chunk - 40 bytes encoded need no
#: other collective. gloo pays for every byte of it on every call (an idle
#: SGLang step broadcasts `[]`); NCCL was no faster with 4 KiB, and 64 KiB
#: carries a whole scheduler step in one collective (BENCHMARKS.md, section 0).
DEFAULT_FIRST_CHUNKS = {"gloo": 4 << 10, "nccl": 64 << 10}
DEFAULT_FIRST_CHUNK = _env_int("FASTBCAST_FIRST_CHUNK", 0) or None
#: Bytes of each following collective (FASTBCAST_CHUNK).
DEFAULT_CHUNK = _env_int("FASTBCAST_CHUNK", 64 << 20)
#: Cap on the bytes one broadcast may carry: the encoded value plus its CUDA
#: tensors (FASTBCAST_MAX_BYTES, default 4 GiB). The source refuses a larger
#: object before sending anything but an error frame; a receiver refuses a
#: frame whose header announces more.
DEFAULT_MAX_BYTES = _env_int("FASTBCAST_MAX_BYTES", 4 << 30)


#: Default `timeout=` of every Broadcaster, in seconds (FASTBCAST_TIMEOUT;
#: unset: none, so only the process group's own timeout applies).
DEFAULT_TIMEOUT = _env_int("FASTBCAST_TIMEOUT", None, float)

TRANSPORTS = ("auto", "shm", "collective")
#: The default `transport=` of every Broadcaster (FASTBCAST_TRANSPORT).
DEFAULT_TRANSPORT = os.environ.get("FASTBCAST_TRANSPORT", "auto") or "auto"


#: Longer timeouts mean none: the deadline arithmetic (a timedelta, the
#: shared-memory wait's nanoseconds) cannot hold them, and nobody waits that long.
_MAX_TIMEOUT_S = 1e9


def _timeout_seconds(timeout) -> float | None:
    """`timeout=` as seconds, or None for no timeout (None, inf or over
    _MAX_TIMEOUT_S). Checked where the Broadcaster is made, so a bad value
    fails there and not at the group's first broadcast."""
    if timeout is None:
        return None
    if isinstance(timeout, datetime.timedelta):
        timeout = timeout.total_seconds()
    elif isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds, a datetime.timedelta or None, got "
                        f"{type(timeout).__name__} {timeout!r}")
    timeout = float(timeout)
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    return None if timeout > _MAX_TIMEOUT_S else timeout


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


# torch's registry of live process groups: a group destroyed with
# destroy_process_group leaves it. Checking membership costs a dict lookup
# where _require_live's public calls cost microseconds on every broadcast.
_PG_MAP = getattr(getattr(dist.distributed_c10d, "_world", None), "pg_map", None)


def _count_failed_call(group) -> None:
    """A call refused on this rank before anything was sent (a bad src or
    rank=) still counts as one of the group's calls. The other ranks' calls
    may have gone on: if the source's did, its frame now waits for this
    rank, and this rank's next call must find it out of step and raise
    instead of returning that frame as the next call's object."""
    GroupState.of(group).seq += 1


def _plain(key: tuple) -> bool:
    """Whether a (src, src_group_rank, rank) key may index a cache: plain
    ints or None (a 0-d tensor hashes by identity, and 1.0 and True equal 1:
    they must reach resolve() and its TypeError, not 1's route)."""
    s, g, r = key
    return (s is None or type(s) is int) and (g is None or type(g) is int) and (r is None or type(r) is int)


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
    device staging buffer (NCCL) and host buffers from fastbcast's pinned
    pool. Creating one is local (no collective); at the group's first
    broadcast the ranks agree on the transport with one collective, and at a
    source's first broadcast over shared memory they set its ring up with two
    more. `close()` (or leaving a `with` block) waits for copies still in
    flight and frees the buffers; the object must not be used afterwards.

    Threads: a Broadcaster is not shared between threads. A second thread
    that calls `broadcast` while another thread is inside it gets a
    RuntimeError at once (it does not wait): two threads driving one group
    would interleave their messages differently on different ranks. Use one
    group and one Broadcaster per thread. (The one-line functions share one
    cached Broadcaster per group, so the same holds for them.)

    Arguments:
        group: the ProcessGroup, or None for the default (world) group.
        mesh, dim: alternatively a DeviceMesh and the name of one of its dims;
            the group is that dim's group for this rank.
        device: the device that carries collectives. Default: the current
            CUDA device for an NCCL group, the CPU for any other backend.
        transport: "auto" (default, or FASTBCAST_TRANSPORT): shared memory
            when every rank of the group sits on this host and can map a
            ring in /dev/shm, the group's collective otherwise (a group on
            one host that cannot map the ring logs one warning saying why).
            "shm": shared memory, or ValueError at the first broadcast (on
            every rank). "collective": always the group's collective. Every
            rank of a group must ask for the same.
        first_chunk: bytes of the first collective (collective transport;
            default 4 KiB for gloo, 64 KiB for NCCL, or FASTBCAST_FIRST_CHUNK).
        chunk: bytes of each following collective (default 64 MiB).
        compat, allow_pickle: codec options for the source (see
            `fastbcast.encode`); allow_pickle also lets receivers accept
            pickles.
        trusted: module prefixes (a str or an iterable of str) whose classes
            receivers may rebuild (see `fastbcast.decode`).
        timeout: seconds (or a datetime.timedelta) that one `broadcast` call
            may take, from its start on this rank to its last transfer;
            None (default, or FASTBCAST_TIMEOUT), inf or more than 10^9 s
            waits as long as the process group's own timeout. Past it the call raises
            BroadcastTimeoutError. On the source the encode counts too, so
            allow for it on receivers. On NCCL a wait with a timeout blocks
            this CPU thread until the GPU finished the collective (torch
            documents that), a few microseconds per collective.
        max_bytes: the most bytes one broadcast may carry: the encoded value
            plus its CUDA tensors (default 4 GiB, or FASTBCAST_MAX_BYTES).
            The source refuses a larger object with ValueError before it
            sends anything but an error frame (a stream: as soon as its
            messages pass the limit, ending it with an error segment), so
            every receiver raises BroadcastError saying why. A receiver also refuses a frame whose
            header announces more than its own max_bytes and raises
            BroadcastError (after receiving the rest, so the source is not
            left waiting). Of a stream, each message's length is checked
            before its bytes are received: one past the limit is followed to
            the stream's end without being held, message 0 included.
        stream_bytes: a list, tuple or dict whose encoding passes this many
            bytes is sent as a stream of messages of about this size, each
            sent while the next is encoded and decoded while the next is
            in flight (default 256 KiB, or FASTBCAST_STREAM_BYTES; 0: never).
            Set on the source; receivers follow the source's.

    Raises:
        ValueError: bad arguments.
        TypeError: a timeout that is not a number, a timedelta or None.
    """

    def __init__(self, group=None, *, mesh=None, dim=None, device=None, transport: str | None = None,
                 first_chunk: int | None = None, chunk: int | None = None, compat: bool = False,
                 allow_pickle: bool = False, trusted: Iterable[str] | str = (),
                 timeout: float | datetime.timedelta | None = None, max_bytes: int | None = None,
                 stream_bytes: int | None = None):
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
        requested = transport or DEFAULT_TRANSPORT
        if requested not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {requested!r}")
        default_f = DEFAULT_FIRST_CHUNKS["nccl" if self.device.type == "cuda" else "gloo"]
        self.first_chunk = int(first_chunk or DEFAULT_FIRST_CHUNK or default_f)
        self.chunk = int(chunk or DEFAULT_CHUNK)
        if not _C.HEADER_BYTES <= self.first_chunk < 2**32 or not 0 < self.chunk < 2**32:
            raise ValueError(f"first_chunk must be in [{_C.HEADER_BYTES}, 2^32) and chunk in (0, 2^32), got "
                             f"{self.first_chunk} and {self.chunk} (Broadcaster(first_chunk=, chunk=) / "
                             f"FASTBCAST_FIRST_CHUNK, FASTBCAST_CHUNK)")
        self.compat = compat
        self.allow_pickle = allow_pickle
        self.trusted = _prefixes(trusted)
        self.timeout = _timeout_seconds(DEFAULT_TIMEOUT if timeout is None else timeout)
        self.max_bytes = int(DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes!r}")
        # No frame comes near 2^62 bytes; a larger cap means "no cap", and must
        # still fit the unsigned 64-bit arguments of the C++ core.
        self.max_bytes = min(self.max_bytes, 1 << 62)
        self.stream_bytes = int(streaming.DEFAULT_STREAM_BYTES if stream_bytes is None else stream_bytes)
        if self.stream_bytes < 0:
            raise ValueError(f"stream_bytes must be >= 0, got {stream_bytes!r}")
        self._pg = route.group if route.group is not None else dist.group.WORLD
        self._routes: dict = {}                     # (src, src_group_rank, rank) -> Route, resolved once
        self._lock = threading.Lock()
        self._closed = False
        self._requested = requested
        self._state: GroupState | None = None       # shared by every Broadcaster on the group
        self._transport = None                      # decided at the first broadcast
        self._told_receivers = False                # this call's source sent an error frame
        self._size_hint = 0                         # bytes of this source's previous frame (the first block's size)
        self._stream_segment = None                 # bytes of a stream's messages, once the transport is known

    # ---- public ---------------------------------------------------------
    @property
    def transport(self) -> str | None:
        """The transport in use, "shm" or "collective"; None until the first broadcast."""
        return None if self._transport is None else self._transport.name

    def broadcast(self, obj: Any = None, *, src: int | None = None, src_group_rank: int | None = None,
                  rank: int | None = None) -> Any:
        """Sends `obj` from the source to every rank of the group.

        Every rank of the group calls this with the same `src` (or
        `src_group_rank`), in the same order of calls; only the source's
        `obj` is read.

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
                different fastbcast format versions or chunk sizes, the
                frame is over this rank's `max_bytes`, or this rank's calls
                are out of step with the source's; (any rank) a peer died or
                a collective failed, or this Broadcaster is unusable after
                such a failure.
            BroadcastTimeoutError: the call took longer than `timeout`.
            RuntimeError: the group was destroyed, the Broadcaster was
                closed, or another thread is inside `broadcast`.
            DecodeError: (receivers) the bytes did not decode.
        """
        if _PG_MAP is None or self._pg not in _PG_MAP:
            _require_live(self.group)
        key = (src, src_group_rank, rank)
        route = self._routes.get(key) if _plain(key) else None
        if route is None:
            try:
                route = resolve(mesh=self._mesh, dim=self._dim, group=self.group if self._mesh is None else None,
                                src=src, src_group_rank=src_group_rank, rank=rank)
            except (ValueError, TypeError):
                _count_failed_call(self.group)
                raise
            if _plain(key) and len(self._routes) < 1024:
                self._routes[key] = route
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this Broadcaster is in use by another thread; use one Broadcaster per thread "
                               "(collectives on one group must not interleave)")
        try:
            if self._closed:
                raise RuntimeError("this Broadcaster was closed")
            if route.size == 1:
                if type(obj) is _Refused:
                    raise obj.error
                return obj
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            if self._transport is None:
                self._choose_transport(route, deadline)
            if self._state.broken is not None:
                raise BroadcastError(
                    f"this group can no longer be used: {self._state.broken}. The ranks may be out of step; "
                    f"destroy and recreate the group (and its Broadcasters).")
            self._state.seq += 1
            self._told_receivers = False
            try:
                if route.is_src:
                    return self._send(obj, route, deadline)
                return self._recv(route, deadline)
            except TransportError as e:
                self._raise_transport(e, route, "a broadcast")
            except BaseException as e:
                # Ctrl-C (or SystemExit from a signal handler) while bytes
                # were moving leaves this rank's transfer half done: give the
                # group up, so this rank's next call and its peers raise
                # instead of pairing frames of different calls. An encode
                # interrupted on the source is the exception: its error frame
                # has told the receivers, and the group is in step.
                if not isinstance(e, Exception) and not self._told_receivers:
                    role = "source" if route.is_src else "receiver"
                    self._state.give_up(f"global rank {route.rank} ({role}) was interrupted inside a broadcast "
                                        f"({type(e).__name__})")
                raise
        finally:
            self._lock.release()

    def close(self) -> None:
        """Waits for copies in flight and frees this Broadcaster's buffers.
        (The group's shared-memory rings stay for its other Broadcasters;
        they go with the group.)"""
        with self._lock:
            if self._transport is not None:
                self._transport.close()
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- protocol -------------------------------------------------------
    def _choose_transport(self, route: Route, deadline) -> None:
        """At the first broadcast: the group's shared state, and the
        transport (agreed with the other ranks unless "collective" was asked
        for; every rank must ask for the same)."""
        self._state = GroupState.of(route.group)
        if self._state.broken is not None:
            return   # refused by the caller: a new agreement would pair with the stale collectives
        collective_t = CollectiveTransport(self.device, self.first_chunk, self.chunk)
        if self._requested != "collective":
            try:
                self._state.agree(route, self.device, deadline)
            except TransportError as e:
                self._raise_transport(e, route, "agreeing on the transport")
            if self._requested == "shm" and self._state.no_shm:
                raise ValueError(f"transport='shm' cannot be used on group {list(route.ranks)}: "
                                 f"{self._state.no_shm}")
            if not self._state.no_shm:
                self._transport = ShmTransport(self._state, collective_t)
                return
        self._transport = collective_t

    def _raise_transport(self, error: TransportError, route: Route, what: str):
        """Turns a transport failure into BroadcastError(Timeout). The ranks
        are out of step after it, so the group is given up: every
        Broadcaster on it refuses further calls, and its rings are closed so
        that peers waiting on them raise too instead of waiting on."""
        role = "source" if route.is_src else f"receiver of global rank {route.src}"
        where = f"global rank {route.rank} ({role}, group {list(route.ranks)})"
        if isinstance(error, ProtocolMismatch):
            raise BroadcastError(str(error)) from error
        state = self._state
        dead = state.dead_ranks(route) if state is not None else []
        if dead:
            gone = ", ".join(f"global rank {r} (pid {p})" for r, p in dead)
            error = TransportError(f"{error}; no longer running (killed or exited): {gone}")
        if isinstance(error, TransportTimeout) and not dead:
            state.give_up(f"{what} timed out after {self.timeout:g} s on {where}")
            raise BroadcastTimeoutError(
                f"broadcast timed out after {self.timeout:g} s on {where} ({error}): a peer is dead or stalled, "
                f"or the ranks passed different src (every rank must name global rank {route.src} as the "
                f"source) or different transport=/first_chunk/chunk settings. The ranks may be out of step; "
                f"destroy and recreate the group.") from error.__cause__
        state.give_up(f"{what} failed on {where}: {error}")
        raise BroadcastError(f"broadcast failed on {where}: {error}") from error.__cause__

    def _send(self, obj, route: Route, deadline):
        t = self._transport
        t.settle()
        ch = t.inline_channel(route, deadline)
        stream = None
        left = _left(deadline)   # a call already past its timeout is not an encode failure
        try:
            if type(obj) is _Refused:
                raise obj.error
            if ch is not None:
                # One call encodes and sends a frame that fits one slot, or
                # a whole stream (calling _stream_send_device/_stream_cut); a
                # bigger frame, one with CUDA tensors, or either over
                # max_bytes comes back encoded, unsent.
                sent = ch.send_object(obj, self.stream_bytes, self.first_chunk, self.chunk, FORMAT_VERSION,
                                      self._state.seq, self.compat, self.allow_pickle, self.device.type == "cuda",
                                      self.trusted, self.max_bytes, left, self, route, deadline)
                if sent is None:
                    return obj
                block, used, cuda_tensors, device_len, stream = sent
            else:
                # A plain frame, or message 0 of a stream: C++ decides which.
                block, used, cuda_tensors, device_len, stream = streaming.encode(
                    self, obj, FORMAT_VERSION, max(t.min_capacity, self._size_hint))
            self._size_hint = used
            size = used - _C.HEADER_BYTES + device_len
            if size > self.max_bytes:
                del block, cuda_tensors
                # Of a stream only message 0 is encoded yet: the object is larger.
                raise ValueError(
                    f"the object encodes to {'more than ' if stream is not None else ''}{size} bytes, over this "
                    f"Broadcaster's max_bytes={self.max_bytes} (Broadcaster(max_bytes=) / FASTBCAST_MAX_BYTES); "
                    f"nothing was sent")
        except BaseException as e:
            if ch is not None and ch.sending:   # the send itself failed, not the encode
                raise_channel_failure(e, deadline, "a stream message" if getattr(ch, "streaming", False)
                                      else "collective 1 of 1 (the first chunk)")
            if self._told_receivers:
                raise   # send_object ended its stream with an error segment
            # Receivers are already waiting for a frame: tell them.
            block, used = _C.error_frame(streaming.encode_failure(route, e), self.first_chunk, self.chunk,
                                         FORMAT_VERSION, self._state.seq, max(self.first_chunk, 4096), t.min_capacity)
            t.send(block, used, route, deadline)
            self._told_receivers = True
            raise
        t.send(block, used, route, deadline)
        if device_len:
            t.send_device(_C.pack_device(cuda_tensors, device_len, self.device), route, deadline)
        if stream is not None:
            del block, cuda_tensors
            streaming.send_rest(self, stream, size, route, deadline)
        return obj

    def _recv(self, route: Route, deadline):
        t = self._transport
        ch = t.inline_channel(route, deadline)
        if ch is not None:
            # A plain frame of this call in one slot is decoded in place by
            # one call, and a stream is followed whole (message by message,
            # calling _stream_device/_stream_failure/_check_seq); anything
            # else stays pending for t.recv below.
            try:
                obj = ch.recv_object(FORMAT_VERSION, self._state.seq, self.max_bytes, self.allow_pickle,
                                     self.trusted, _left(deadline), self, route, deadline)
            except CHANNEL_ERRORS as e:
                raise_channel_failure(e, deadline, "collective 1 (the first chunk)")
            if obj is not _C.SHM_NOT_INLINE:
                return obj
        frame, header = t.recv(route, deadline, self.max_bytes)
        version, flags, _, payload_len, _, _, device_len, seq = header
        try:
            device_len = device_len if flags & _C.FLAG_CUDA else 0
            if version != FORMAT_VERSION:
                t.recv_device(device_len, route, deadline)   # dropped: the source must not be left sending
                raise BroadcastError(
                    f"fastbcast format version mismatch: the source (global rank {route.src}) sent version "
                    f"{version}, this rank (global rank {route.rank}) speaks version {FORMAT_VERSION}. Install the "
                    f"same fastbcast on every rank.")
            if flags & _C.FLAG_STREAM:
                return self._recv_stream(t, frame, header, route, deadline)
            announced = payload_len + device_len
            if flags & _C.FLAG_ERROR and frame is not None:
                # The source's reason, whatever this rank's max_bytes (an
                # error frame is small and has no device buffer).
                self._check_seq(seq, route)
                raise BroadcastError(_C.frame_message(frame, payload_len))
            if frame is None or announced > self.max_bytes:
                t.recv_device(device_len, route, deadline)
                raise BroadcastError(
                    f"the source (global rank {route.src}) sent a frame of {announced} bytes, over this rank's "
                    f"(global rank {route.rank}) max_bytes={self.max_bytes} (Broadcaster(max_bytes=) / "
                    f"FASTBCAST_MAX_BYTES); it was received and dropped. Configure every rank alike.")
            device_buffer = t.recv_device(device_len, route, deadline) if flags & _C.FLAG_CUDA else None
            # Everything the source sent has been received: errors from here
            # on leave no rank waiting.
            self._check_seq(seq, route)
            return _C.decode_frame(frame, payload_len, device_buffer, self.allow_pickle, self.trusted)
        finally:
            t.release()


    # ShmChannel.send_object / recv_object call these while they carry a stream.
    def _stream_send_device(self, cuda_tensors: list, device_len: int, route: Route, deadline) -> None:
        """A stream segment's device buffer, sent after its message."""
        self._transport.send_device(_C.pack_device(cuda_tensors, device_len, self.device), route, deadline)

    def _stream_cut(self, route: Route, error: BaseException | None, sent: int, last: bool) -> tuple:
        """A source's stream that fails after message 0: (the exception it
        raises, its error segment's text). error None: its messages passed
        max_bytes (`sent` bytes of them; `last`: all)."""
        if error is None:
            error = streaming.over_max_bytes(self, sent, last)
        return error, streaming.encode_failure(route, error)

    def _stream_device(self, nbytes: int, route: Route, deadline):
        """A stream segment's device buffer, received."""
        return self._transport.recv_device(nbytes, route, deadline)

    def _stream_failure(self, kind: str, detail, route: Route) -> Exception:
        """What a receiver raises once a stream is over (stream.failure_of)."""
        return streaming.failure_of(self, route, kind, detail, BroadcastError)

    def _check_seq(self, seq: int, route: Route) -> None:
        if seq != self._state.seq:
            self._state.give_up(f"global rank {route.rank} made its call {self._state.seq} on this group while "
                                f"the source (global rank {route.src}) sent its call {seq}")
            raise BroadcastError(
                f"calls out of step: {self._state.broken}. Every rank of a group must make the same broadcast calls "
                f"in the same order (a rank skipped a call or made an extra one).")

    def _recv_stream(self, t, frame, header: tuple, route: Route, deadline):
        """A streamed frame (fastbcast.stream): the whole stream is received
        before anything is raised, calls out of step first."""
        failure = None
        try:
            obj = streaming.receive(self, t, frame, header, route, deadline, BroadcastError)
        except TransportError:
            raise
        except (KeyboardInterrupt, SystemExit):
            self._state.give_up(f"global rank {route.rank} was interrupted inside a stream")
            raise
        except Exception as e:  # noqa: BLE001 - raised below, after the call-number check
            failure = e
        self._check_seq(header[7], route)
        if failure is not None:
            try:
                raise failure
            finally:
                failure = None   # see stream.receive: no exception -> traceback -> frame cycle
        return obj


class _Refused:
    """Sent in place of an object the caller refused before encoding: the
    source raises `error` after sending an error frame with its message, so
    every receiver raises BroadcastError at the same call."""
    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


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
    # Checked before it keys a cache (an unhashable one would say only that).
    _timeout_seconds(timeout)
    # A timedelta and its seconds must share one cached Broadcaster.
    return timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else timeout


def close_all() -> None:
    """Closes every Broadcaster the module-level functions created."""
    with _BROADCASTERS_LOCK:
        for b in _BROADCASTERS.values():
            b.close()
        _BROADCASTERS.clear()
        _PYOBJ.clear()


def broadcast(obj: Any = None, *, mesh=None, dim=None, group=None, src: int | None = None,
              src_group_rank: int | None = None, device=None, rank: int | None = None, compat: bool = False,
              allow_pickle: bool = False, trusted: Iterable[str] | str = (),
              timeout: float | datetime.timedelta | None = None, max_bytes: int | None = None,
              transport: str | None = None) -> Any:
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
        timeout, max_bytes, transport: as for `Broadcaster` (seconds the
            call may take; the most bytes it may carry; "auto", "shm" or
            "collective").

    Returns:
        `obj` on the source, an equal decoded object elsewhere.
    """
    if mesh is not None:
        # The mesh decides the default source (its slice's first rank, which
        # need not be the group's lowest rank), so resolve it here.
        try:
            route = resolve(mesh=mesh, dim=dim, group=group, src=src, src_group_rank=src_group_rank, rank=rank)
        except (ValueError, TypeError):
            with contextlib.suppress(Exception):
                _count_failed_call(resolve(mesh=mesh, dim=dim).group)
            raise
        group, src, src_group_rank = route.group, route.src, None
    b = _cached(group, device, compat=compat, allow_pickle=allow_pickle, trusted=_prefixes(trusted),
                timeout=_seconds(timeout), max_bytes=max_bytes, transport=transport)
    return b.broadcast(obj, src=src, src_group_rank=src_group_rank, rank=rank)


#: The drop-in's pickle policy (FASTBCAST_ALLOW_PICKLE=0 makes it strict).
DROP_IN_ALLOW_PICKLE = os.environ.get("FASTBCAST_ALLOW_PICKLE", "1") != "0"


def broadcast_pyobj(data: list, rank: int, dist_group=None, src: int = 0, force_cpu_device: bool = True, *,
                    allow_pickle: bool | None = None, trusted: Iterable[str] | str = (),
                    timeout: float | datetime.timedelta | None = None, max_bytes: int | None = None,
                    transport: str | None = None) -> list:
    """Drop-in for SGLang's `broadcast_pyobj`, with the same signature and results.

    Arguments:
        data: the list to send (read on the source only). On the source,
            data without a len() (None included) raises SGLang's TypeError,
            and every receiver raises BroadcastError at the same call.
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
        timeout, max_bytes, transport: as for `Broadcaster` (seconds the
            call may take, default FASTBCAST_TIMEOUT or none; the most bytes
            it may carry, default FASTBCAST_MAX_BYTES or 4 GiB; "auto"
            (default: shared memory when the group is on one host), "shm" or
            "collective", default FASTBCAST_TRANSPORT).

    Returns:
        `data` on the source; an equal list on every other rank; [] everywhere
        when `data` is [].
    """
    allow = DROP_IN_ALLOW_PICKLE if allow_pickle is None else allow_pickle
    trusted = _prefixes(trusted)
    key = (dist_group, force_cpu_device, allow, trusted, _seconds(timeout), max_bytes, transport)
    b = _PYOBJ.get(key)
    if b is None or b._closed:
        b = _PYOBJ[key] = _pyobj_broadcaster(dist_group, force_cpu_device, allow, trusted, timeout, max_bytes,
                                             transport)
    try:
        # SGLang's own takes len(data) on the source only (None included).
        empty = (data is not None or rank == src) and len(data) == 0
    except TypeError as e:
        # SGLang's own raises this on the source (len(data)) and leaves its
        # receivers waiting; here they raise BroadcastError at this call.
        # Receivers ignore `data`, as SGLang's do.
        return b.broadcast(_Refused(e), src=src, rank=rank)
    if empty:
        # SGLang sends size 0 for any empty `data` and receivers build `[]`:
        # an empty tuple must arrive as `[]` too. The source still returns
        # its own `data`.
        empty = []
        got = b.broadcast(empty, src=src, rank=rank)
        return data if got is empty else got
    return b.broadcast(data, src=src, rank=rank)

# The drop-in's Broadcaster per (group, options): the per-step call of SGLang's
# scheduler looks it up here in one dict access.
_PYOBJ: dict = {}


def _pyobj_broadcaster(dist_group, force_cpu_device, allow, trusted, timeout, max_bytes, transport) -> Broadcaster:
    group = dist.group.WORLD if dist_group is None else dist_group
    _require_live(group)
    resolve(group=dist_group)   # a non-member: resolve's ValueError, before torch's bare one below
    backend = _backend(group)
    if backend == "nccl" and force_cpu_device:
        raise ValueError("broadcast_pyobj(force_cpu_device=True) needs a group that carries CPU tensors (gloo); "
                         "this group's backend is nccl: pass its CPU group or force_cpu_device=False")
    device = None if backend == "nccl" else torch.device("cpu")
    return _cached(group, device, allow_pickle=allow, trusted=trusted, timeout=_seconds(timeout),
                   max_bytes=max_bytes, transport=transport)
