"""Sending a Python object from one rank to one other rank: a drop-in for SGLang's
``point_to_point_pyobj``.

SGLang's pipeline-parallel scheduler moves the request list and each stage's
outputs to the next stage with ``point_to_point_pyobj`` over the world's gloo
group: a pickle, its size as one int64 message, then its bytes. This module
keeps that shape (a size message, then the bytes; size 0 for an empty list;
a negative size announces the source's error message) and replaces pickle
with fastbcast's codec. Both ends must use it (FORMAT.md section 5).

Transport, per direction of each pair of ranks (`_Pair`): when the group is
gloo and both ends sit on one host, the pair's messages move through a
shared-memory ring (`_C.ShmChannel`, one writer and one reader) that the two
ranks set up between themselves, with no call on the rest of the group;
otherwise, and until the ring is up, through the group's ``send``/``recv``.
The set-up rides on the pair's first messages and never makes a send wait:
gloo completes a send only once the receiver posted its receive, so the
source reads the receiver's answer when a send of its own completes. Through
the ring an asynchronous send returns at once unless the receiver is a whole
ring behind (SGLang waits on each kind of send before the next, so it stays
a few messages ahead at most); a payload longer than the ring goes over the
group so that it never waits for the receiver.
"""
from __future__ import annotations

import logging
import os
import secrets
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

from . import codec
from ._loader import _C
from .broadcast import BroadcastError, _backend, _require_live
from .transport import ATTACH_TIMEOUT_S, TransportError, _host, _shm_call, host_key, shm_geometry, shm_probe

__all__ = ["point_to_point_pyobj", "P2PWork"]

logger = logging.getLogger("fastbcast")

#: gloo tags of a pair's one-time set-up (FORMAT.md section 5.1): the
#: source's offer and the receiver's answer. Apart from the data's tag 0, so
#: that neither is taken for a size message of either direction.
OFFER_TAG, ANSWER_TAG = 0x6662, 0x6663
#: The size message after which every message of the pair comes through its ring.
SWITCH = -(1 << 63)
#: Answer codes; a positive answer is the errno that keeps one host from sharing memory.
_SHARE, _APART = 0, -1


@dataclass
class P2PWork:
    """An unfinished asynchronous send and the tensor it reads (kept alive until
    the send completes). The fields are SGLang's ``P2PWork``'s; when SGLang is
    loaded, its own class is returned instead of this one."""

    work: Optional[Any]
    payload: Optional[torch.Tensor]


def _work_class():
    # SGLang's type when it is loaded (its code may check it); never imported here.
    mod = sys.modules.get("sglang.srt.distributed.parallel_state")
    return getattr(mod, "P2PWork", None) or P2PWork


class _Then:
    """A send's work whose wait() also runs what its completion allows (the
    source learns the receiver's answer once the receiver took a message)."""

    def __init__(self, work, then: Callable[[], None]):
        self._work, self._then = work, then

    def wait(self, timeout=None) -> bool:
        ok = self._work.wait() if timeout is None else self._work.wait(timeout)
        then, self._then = self._then, None
        if then is not None:
            then()
        return ok

    def is_completed(self) -> bool:
        return self._then is None and self._work.is_completed()


def _group_send(tensors, dst: int, group, async_send: bool, then=None, tag: int = 0) -> list:
    """The group's send of each tensor in order; `then` runs once the last completed."""
    if not async_send:
        for t in tensors:
            dist.send(t, dst, group=group, tag=tag)
        if then is not None:
            then()
        return []
    works = [dist.isend(t, dst, group=group, tag=tag) for t in tensors]
    if then is not None:
        works[-1] = _Then(works[-1], then)
    return [_work_class()(w, t) for w, t in zip(works, tensors)]


def _group_recv(tensor: torch.Tensor, src: int, group, tag: int = 0) -> None:
    dist.irecv(tensor, src=src, group=group, tag=tag).wait()


def _ring_name(uid: int, token: int) -> str:
    return f"fastbcast-{uid}-p2p-{token:x}"


class _Pair:
    """One direction (src -> dst) of a group's pair of ranks, at one end.

    The source offers (host key, pid, uid, a name token, whether it wants
    shared memory) with its first send; the receiver reads the offer at its
    first receive and answers (`_SHARE`, `_APART` or an errno, and its pid).
    The source reads the answer once one of its sends completed (the
    receiver answered before it took that message); at its next send it
    makes the ring and sends `SWITCH` as that send's size message; the receiver attaches when it
    reads it, and the source unlinks the name once it attached. State:
    (source) "new" -> "offered" -> "agreed" -> "ring", or "group" for good;
    (receiver) "new" -> "group" -> "ring".
    """

    def __init__(self, group, src: int, dst: int):
        self.group, self.src, self.dst = group, src, dst
        self.state = "new"
        self.ring = None
        self.unlinked = False
        self.broken: str | None = None
        self._pending: list = []   # set-up (work, tensor) in flight
        self._answer = None
        self._offer = None

    # -- source --------------------------------------------------------
    def offer(self) -> None:
        wants = _shares_memory()
        self._offer = (secrets.randbits(62), os.getuid())   # + the receiver's pid, from its answer
        msg = torch.tensor([host_key(), os.getpid(), int(wants), *self._offer], dtype=torch.int64)
        self._answer = torch.zeros(2, dtype=torch.int64)
        self._pending = [(dist.isend(msg, self.dst, group=self.group, tag=OFFER_TAG), msg),
                         (dist.irecv(self._answer, src=self.dst, group=self.group, tag=ANSWER_TAG), self._answer)]
        self.state = "offered"

    def read_answer(self) -> None:
        """Source: the receiver's answer is in (one of this pair's sends completed)."""
        if self.state != "offered":
            return
        for work, _ in self._pending:
            work.wait()
        self._pending = []
        code, pid = self._answer.tolist()
        self.state = "agreed" if code == _SHARE else "group"
        self._offer += (pid,)
        if code > 0:
            self._warn(f"global rank {self.dst} cannot map shared memory ({os.strerror(code)})")

    def make_ring(self) -> bool:
        """Source, at the send after the answer: the ring, made only now so that
        a pair that never sends again leaves nothing in /dev/shm."""
        token, uid, pid = self._offer
        slots, slot_bytes = shm_geometry()
        try:
            self.ring = _C.ShmChannel.create(_ring_name(uid, token), [self.src, self.dst], [os.getpid(), pid],
                                             slots, slot_bytes)
        except (OSError, ValueError) as e:
            self._warn(f"global rank {self.src} cannot make the ring ({e})")
            self.state = "group"
            return False
        self.state = "ring"
        return True

    def attached(self, timeout: float | None = ATTACH_TIMEOUT_S) -> None:
        """Source: once the receiver attached, the name goes (nothing is left in
        /dev/shm whatever happens to either process afterwards)."""
        if self.unlinked or self.ring is None:
            return
        try:
            _shm_call(self.ring.wait_attached, timeout)
        except TransportError as e:
            if timeout == 0:
                return   # not yet: a later call looks again
            self.fail(f"global rank {self.dst} did not attach the ring: {e}")
        self.ring.unlink()
        self.unlinked = True

    # -- receiver ------------------------------------------------------
    def answer(self) -> None:
        """Receiver: reads the source's offer, answers it (the source reads
        the answer later), and stays on the group until SWITCH."""
        offer = torch.zeros(5, dtype=torch.int64)
        _group_recv(offer, self.src, self.group, OFFER_TAG)
        key, pid, wants, token, uid = offer.tolist()
        code = _APART
        if wants and _shares_memory() and key == host_key():
            code = shm_probe(4096)
            if code:
                self._warn(f"global rank {self.dst} cannot map shared memory ({os.strerror(code)})")
        self._offer = (token, uid, pid)
        msg = torch.tensor([code, os.getpid()], dtype=torch.int64)
        self._pending = [(dist.isend(msg, self.src, group=self.group, tag=ANSWER_TAG), msg)]
        self.state = "group"

    def settle_answer(self) -> None:
        # The source posted its receive of the answer before its first send.
        for work, _ in self._pending:
            work.wait()
        self._pending = []

    def attach(self) -> None:
        token, uid, pid = self._offer
        try:
            self.ring = _shm_call(_C.ShmChannel.attach, _ring_name(uid, token), 0, [self.src, self.dst],
                                  [pid, os.getpid()], ATTACH_TIMEOUT_S)
        except (OSError, ValueError, TransportError) as e:
            self.fail(f"global rank {self.dst} could not attach the ring global rank {self.src} made: {e}")
        self.state = "ring"

    # -- both ------------------------------------------------------------
    def fail(self, why: str):
        self.broken = why
        self.close()
        raise BroadcastError(f"point_to_point_pyobj {self.src} -> {self.dst}: {why}")

    def _warn(self, why: str) -> None:
        logger.warning("fastbcast: point_to_point_pyobj %d -> %d uses the group's send/recv instead of shared "
                       "memory: %s", self.src, self.dst, why)

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None


def _shares_memory() -> bool:
    from .broadcast import DEFAULT_TRANSPORT

    return DEFAULT_TRANSPORT != "collective" and hasattr(_C, "ShmChannel")


_PAIRS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # group -> {(src, dst): _Pair}


def _pair(group, src: int, dst: int) -> _Pair | None:
    """This rank's end of src -> dst on `group`; None where the group cannot
    carry the set-up (tagged send/recv of CPU tensors: gloo)."""
    pairs = _PAIRS.get(group)
    if pairs is None:
        if _backend(group) != "gloo":
            return None
        pairs = _PAIRS[group] = {}
        weakref.finalize(group, lambda ps=pairs: [p.close() for p in ps.values()])
    p = pairs.get((src, dst))
    if p is None:
        p = pairs[(src, dst)] = _Pair(group, src, dst)
    if p.broken:
        raise BroadcastError(f"point_to_point_pyobj {src} -> {dst} failed earlier ({p.broken}); "
                             "the pair cannot be used again")
    return p


def _ring_call(pair: _Pair, fn, *args):
    try:
        return _shm_call(fn, *args)
    except TransportError as e:
        pair.fail(str(e))


def _send(pair: _Pair | None, group, dst: int, n: int, payload: torch.Tensor | None, async_send: bool) -> list:
    """Source: size message `n`, then `payload` (n bytes, or -n for an error
    message) unless n is 0."""
    size = torch.tensor([n], dtype=torch.long)
    tensors = [size] if payload is None else [size, payload]
    if pair is None:
        return _group_send(tensors, dst, group, async_send)
    if pair.state == "new":
        pair.offer()
    if pair.state == "offered":
        return _group_send(tensors, dst, group, async_send, then=pair.read_answer)
    works = []
    if pair.state == "agreed" and pair.make_ring():
        works = _group_send([torch.tensor([SWITCH], dtype=torch.long)], dst, group, async_send,
                            then=pair.attached)
    elif not pair.unlinked:
        pair.attached(0)
    if pair.state != "ring":
        return _group_send(tensors, dst, group, async_send)
    nbytes = 0 if payload is None else payload.numel()
    # An asynchronous send must not wait for the receiver: a payload longer
    # than the whole ring goes over the group (the ring says so: a message
    # of the size alone, with a non-zero size).
    inline = nbytes + 8 <= pair.ring.n_slots * pair.ring.slot_bytes or not async_send
    msg = _host(8 + (nbytes if inline else 0))
    msg[:8].copy_(size.view(torch.uint8))
    if inline and nbytes:
        msg[8:8 + nbytes].copy_(payload)
    _ring_call(pair, pair.ring.send, msg, 8 + (nbytes if inline else 0), None)
    if not inline:
        works += _group_send([payload], dst, group, async_send)
    return works


def _recv(pair: _Pair | None, group, src: int, decode: Callable[[torch.Tensor], Any]) -> Any:
    """Receiver: the size message, then what it announces; `decode` turns
    the bytes into the result."""
    if pair is not None and pair.state == "new":
        pair.answer()
    if pair is None or pair.state != "ring":
        size = torch.zeros(1, dtype=torch.long)
        _group_recv(size, src, group)
        n = int(size.item())
        if pair is not None:
            pair.settle_answer()
            if n == SWITCH:
                pair.attach()
        if pair is None or pair.state != "ring":
            return _finish(n, None, src, group, decode)
    msg = _ring_call(pair, pair.ring.recv, None)
    try:
        n = int(msg[:8].view(torch.int64)[0])
        return _finish(n, msg[8:] if msg.numel() > 8 else None, src, group, decode)
    finally:
        if pair.ring is not None:
            pair.ring.release()


def _finish(n: int, body: torch.Tensor | None, src: int, group, decode) -> Any:
    if n == 0:
        return []
    if body is None:
        body = torch.empty(abs(n), dtype=torch.uint8)
        _group_recv(body, src, group)
    if n < 0:
        raise BroadcastError(f"point_to_point_pyobj: rank {src} could not send its object: "
                             f"{bytes(body.numpy()).decode(errors='replace')}")
    return decode(body)


def point_to_point_pyobj(data: list, rank: int, group=None, src: int = 0, dst: int = 1,
                         async_send: bool = False, *, allow_pickle: bool | None = None,
                         trusted: Iterable[str] = ()) -> list:
    """Drop-in for SGLang's ``point_to_point_pyobj``: send ``data`` from ``src`` to ``dst``.

    On one host (a gloo group) the pair's messages move through shared
    memory from the pair's second message on; see the module docstring.

    Arguments:
        data: the list to send, read on ``src`` only.
        rank: this process's GLOBAL rank. A rank that is not this process
            raises ValueError (SGLang's would silently do nothing).
        group: the ProcessGroup (SGLang passes the world's gloo
            ``cpu_group``); None: the world.
        src, dst: GLOBAL ranks of the sender and the receiver.
        async_send: on ``src``, start the sends and return their works
            instead of waiting. Through shared memory a send needs no wait
            (there is nothing to return) unless the ring is full.
        allow_pickle: objects the codec cannot represent travel as pickles.
            None: the broadcast drop-in's default (allowed unless
            FASTBCAST_ALLOW_PICKLE=0). Use the same setting on both ends.
        trusted: module prefixes whose classes the receiver may rebuild, in
            addition to those trusted with :func:`fastbcast.trust`.

    Returns:
        On ``src``: a list of ``P2PWork(work, payload)`` to wait on when
        ``async_send`` (empty for what went through shared memory), else [].
        On ``dst``: a list equal to ``data`` ([] when ``data`` was empty).
        On any other rank: [] (nothing is sent).

    Raises:
        ValueError: ``rank`` is not this process's global rank, or src == dst.
        TypeError: (on ``src``) an object the codec cannot represent while
            pickle is off; ``dst`` then raises BroadcastError with its message
            (SGLang's would leave ``dst`` waiting).
        fastbcast.BroadcastError: (on ``dst``) the source could not encode;
            (either end) the other end died while this one waited on shared
            memory, or the pair failed earlier.
        fastbcast.DecodeError: (on ``dst``) the bytes cannot be decoded (a
            pickle while pickle is off, an untrusted class).
    """
    from .broadcast import DROP_IN_ALLOW_PICKLE

    if group is None:
        group = dist.group.WORLD
    _require_live(group)
    me = dist.get_rank()
    if rank != me:
        raise ValueError(f"point_to_point_pyobj: rank={rank} is not this process's global rank ({me}); "
                         "pass the GLOBAL rank (a group-local rank sends nothing)")
    if src == dst:
        raise ValueError(f"point_to_point_pyobj: src and dst are the same rank ({src})")
    if rank not in (src, dst):
        return []
    allow = DROP_IN_ALLOW_PICKLE if allow_pickle is None else allow_pickle
    pair = _pair(group, src, dst)
    if rank == src:
        if len(data) == 0:
            return _send(pair, group, dst, 0, None, async_send)
        try:
            payload = codec.encode(data, allow_pickle=allow, trusted=trusted)
        except Exception as e:
            # The receiver is already waiting for a size: a negative one says
            # "an error message of that many bytes follows" so it raises too.
            msg = torch.frombuffer(bytearray(f"{type(e).__name__}: {e}".encode()), dtype=torch.uint8)
            _send(pair, group, dst, -msg.numel(), msg, False)
            raise
        return _send(pair, group, dst, payload.numel(), payload, async_send)
    return _recv(pair, group, src, lambda buf: codec.decode(buf, allow_pickle=allow, trusted=trusted))
