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
"""
from __future__ import annotations

import os
import threading
from typing import Any, Iterable

import torch
import torch.distributed as dist

from ._loader import _C
from ._version import FORMAT_VERSION
from .mesh import Route, resolve

__all__ = ["Broadcaster", "BroadcastError", "broadcast", "broadcast_pyobj", "DEFAULT_FIRST_CHUNK", "DEFAULT_CHUNK"]

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


class BroadcastError(RuntimeError):
    """A broadcast failed on another rank or between ranks: the source could
    not encode its object, or the ranks disagree on the protocol (format
    version, chunk sizes). Raised on every receiving rank alike."""


def _backend(group) -> str:
    return str(dist.get_backend(group)).lower()


class Broadcaster:
    """Broadcasts objects within one process group, reusing its buffers.

    Create one per group and keep it for the life of the group: it caches a
    device staging buffer (NCCL) that grows to the largest object sent and
    host buffers from fastbcast's pinned pool. `close()` (or leaving a `with`
    block) waits for copies still in flight and frees the device buffer; the
    object must not be used afterwards. A Broadcaster refuses to be entered by
    two threads at once (RuntimeError) rather than interleave collectives.

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
    """

    def __init__(self, group=None, *, mesh=None, dim=None, device=None, first_chunk: int | None = None,
                 chunk: int | None = None, compat: bool = False, allow_pickle: bool = False,
                 trusted: Iterable[str] = ()):
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
        self._staging: torch.Tensor | None = None   # device bytes (CUDA transport only)
        self._inflight = None                       # (host block, event) the last H2D copy reads
        self._recv_hint = self.first_chunk          # size of the last frame received
        self._lock = threading.Lock()
        self._closed = False

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
                (nothing is sent; raised on the ranks that passed them).
            TypeError: (source) an object the codec cannot represent;
                receivers then raise BroadcastError with the same message.
            BroadcastError: (receivers) the source failed, or the ranks run
                different fastbcast format versions.
            DecodeError: (receivers) the bytes did not decode.
        """
        route = resolve(mesh=self._mesh, dim=self._dim, group=self.group if self._mesh is None else None,
                        src=src, src_group_rank=src_group_rank, rank=rank)
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("this Broadcaster is in use by another thread; use one Broadcaster per thread "
                               "(collectives on one group must not interleave)")
        try:
            if self._closed:
                raise RuntimeError("this Broadcaster was closed")
            if route.size == 1:
                return obj
            if route.is_src:
                return self._send(obj, route)
            return self._recv(route)
        finally:
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

    def _collectives(self, buf: torch.Tensor, total: int, route: Route):
        """Broadcasts buf[:first_chunk], then buf[first_chunk:total] in chunks."""
        f, c = self.first_chunk, self.chunk
        dist.broadcast(buf[:f], src=route.src, group=route.group)
        for off in range(f, total, c):
            dist.broadcast(buf[off:min(off + c, total)], src=route.src, group=route.group)

    def _send(self, obj, route: Route):
        self._settle()
        try:
            block, used, cuda_tensors, device_len = _C.encode_frame(
                obj, self.first_chunk, self.chunk, FORMAT_VERSION, self.compat, self.allow_pickle, self._cuda)
        except Exception as e:
            # Receivers are already waiting on the first chunk: tell them.
            msg = f"source (global rank {route.src}) failed to encode: {type(e).__name__}: {e}"
            self._send_frame(_C.error_frame(msg, self.first_chunk, self.chunk, FORMAT_VERSION),
                             self.first_chunk, route)
            raise
        total = max(used, self.first_chunk)
        self._send_frame(block, total, route, used)
        if device_len:
            dist.broadcast(self._pack_device(cuda_tensors, device_len), src=route.src, group=route.group)
        return obj

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
        host = _C.pool_acquire(max(self._recv_hint, f))
        if self._cuda:
            dev = self._stage(max(self._recv_hint, f))
            dist.broadcast(dev[:f], src=route.src, group=route.group)
            self._to_host(dev, host, 0, f)
        else:
            dist.broadcast(host[:f], src=route.src, group=route.group)
        version, flags, payload_len, first_chunk, chunk, device_len = _C.read_header(host[:HEADER_BYTES])
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
        self._recv_hint = total
        if total > f:
            if host.numel() < total:
                bigger = _C.pool_acquire(total)
                bigger[:f].copy_(host[:f])
                host = bigger
            if self._cuda:
                dev = self._stage(total)
                for off in range(f, total, chunk):
                    dist.broadcast(dev[off:min(off + chunk, total)], src=route.src, group=route.group)
                self._to_host(dev, host, f, total)
            else:
                for off in range(f, total, chunk):
                    dist.broadcast(host[off:min(off + chunk, total)], src=route.src, group=route.group)
        device_buffer = None
        if flags & _C.FLAG_CUDA:
            device_buffer = torch.empty(device_len, dtype=torch.uint8, device=self.device if self._cuda else "cpu")
            if device_len:  # the source sends the device buffer only when it has bytes
                dist.broadcast(device_buffer, src=route.src, group=route.group)
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


def close_all() -> None:
    """Closes every Broadcaster the module-level functions created."""
    with _BROADCASTERS_LOCK:
        for b in _BROADCASTERS.values():
            b.close()
        _BROADCASTERS.clear()


def broadcast(obj: Any = None, *, mesh=None, dim=None, group=None, src: int | None = None,
              src_group_rank: int | None = None, device=None, rank: int | None = None, compat: bool = False,
              allow_pickle: bool = False, trusted: Iterable[str] = ()) -> Any:
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

    Returns:
        `obj` on the source, an equal decoded object elsewhere.
    """
    if mesh is not None:
        # The mesh decides the default source (its slice's first rank, which
        # need not be the group's lowest rank), so resolve it here.
        route = resolve(mesh=mesh, dim=dim, src=src, src_group_rank=src_group_rank, rank=rank)
        group, src, src_group_rank = route.group, route.src, None
    b = _cached(group, device, compat=compat, allow_pickle=allow_pickle, trusted=tuple(trusted))
    return b.broadcast(obj, src=src, src_group_rank=src_group_rank, rank=rank)


#: The drop-in's pickle policy (FASTBCAST_ALLOW_PICKLE=0 makes it strict).
DROP_IN_ALLOW_PICKLE = os.environ.get("FASTBCAST_ALLOW_PICKLE", "1") != "0"


def broadcast_pyobj(data: list, rank: int, dist_group=None, src: int = 0, force_cpu_device: bool = True, *,
                    allow_pickle: bool | None = None) -> list:
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

    Returns:
        `data` on the source; an equal list on every other rank; [] everywhere
        when `data` is [].
    """
    allow = DROP_IN_ALLOW_PICKLE if allow_pickle is None else allow_pickle
    if dist_group is None:
        dist_group = dist.group.WORLD
    backend = _backend(dist_group)
    if backend == "nccl" and force_cpu_device:
        raise ValueError("broadcast_pyobj(force_cpu_device=True) needs a group that carries CPU tensors (gloo); "
                         "this group's backend is nccl: pass its CPU group or force_cpu_device=False")
    device = None if backend == "nccl" else torch.device("cpu")
    b = _cached(dist_group, device, allow_pickle=allow)
    return b.broadcast(data, src=src, rank=rank)
