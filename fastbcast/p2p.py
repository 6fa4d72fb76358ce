"""Sending a Python object from one rank to one other rank: a drop-in for SGLang's
``point_to_point_pyobj``.

SGLang's pipeline-parallel scheduler moves the request list and each stage's
outputs to the next stage with ``point_to_point_pyobj`` over the world's gloo
group: a pickle, its size as one int64 message, then its bytes. This module
keeps that shape (a size message, then the bytes; size 0 for an empty list;
a negative size announces the source's error message)
and replaces pickle with fastbcast's codec. Both ends must use it.

The transport is picked per call by :func:`_transport`. Today that is the
group's own ``send``/``recv``; a same-host shared-memory transport is meant to
be added there (it must keep the results and the ``async_send`` contract).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

from . import codec
from .broadcast import BroadcastError, _require_live

__all__ = ["point_to_point_pyobj", "P2PWork"]


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


class _GroupSendRecv:
    """The group's own send/recv (any backend that carries CPU tensors)."""

    @staticmethod
    def send(tensors, dst: int, group, async_send: bool) -> list:
        works = []
        for t in tensors:
            if async_send:
                works.append(_work_class()(dist.isend(t, dst, group=group), t))
            else:
                dist.send(t, dst, group=group)
        return works

    @staticmethod
    def recv(tensor: torch.Tensor, src: int, group) -> None:
        dist.irecv(tensor, src=src, group=group).wait()


def _transport(group, src: int, dst: int):
    # The seam for a same-host shared-memory transport: choose it here when
    # src and dst share a host and it is available; same interface.
    return _GroupSendRecv


def point_to_point_pyobj(data: list, rank: int, group=None, src: int = 0, dst: int = 1,
                         async_send: bool = False, *, allow_pickle: bool | None = None,
                         trusted: Iterable[str] = ()) -> list:
    """Drop-in for SGLang's ``point_to_point_pyobj``: send ``data`` from ``src`` to ``dst``.

    Arguments:
        data: the list to send, read on ``src`` only.
        rank: this process's GLOBAL rank. A rank that is not this process
            raises ValueError (SGLang's would silently do nothing).
        group: the ProcessGroup (SGLang passes the world's gloo
            ``cpu_group``); None: the world.
        src, dst: GLOBAL ranks of the sender and the receiver.
        async_send: on ``src``, start the sends and return their works
            instead of waiting.
        allow_pickle: objects the codec cannot represent travel as pickles.
            None: the broadcast drop-in's default (allowed unless
            FASTBCAST_ALLOW_PICKLE=0). Use the same setting on both ends.
        trusted: module prefixes whose classes the receiver may rebuild, in
            addition to those trusted with :func:`fastbcast.trust`.

    Returns:
        On ``src``: a list of ``P2PWork(work, payload)`` to wait on when
        ``async_send``, else []. On ``dst``: a list equal to ``data`` ([] when
        ``data`` was empty). On any other rank: [] (nothing is sent).

    Raises:
        ValueError: ``rank`` is not this process's global rank, or src == dst.
        TypeError: (on ``src``) an object the codec cannot represent while
            pickle is off; ``dst`` then raises BroadcastError with its message
            (SGLang's would leave ``dst`` waiting).
        fastbcast.BroadcastError: (on ``dst``) the source could not encode.
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
    allow = DROP_IN_ALLOW_PICKLE if allow_pickle is None else allow_pickle
    transport = _transport(group, src, dst)
    if rank == src:
        if len(data) == 0:
            return transport.send([torch.zeros(1, dtype=torch.long)], dst, group, async_send)
        try:
            payload = codec.encode(data, allow_pickle=allow, trusted=trusted)
        except Exception as e:
            # The receiver is already waiting for a size: a negative one says
            # "an error message of that many bytes follows" so it raises too.
            msg = torch.frombuffer(bytearray(f"{type(e).__name__}: {e}".encode()), dtype=torch.uint8)
            transport.send([torch.tensor([-msg.numel()], dtype=torch.long), msg], dst, group, False)
            raise
        size = torch.tensor([payload.numel()], dtype=torch.long)
        return transport.send([size, payload], dst, group, async_send)
    if rank == dst:
        size = torch.zeros(1, dtype=torch.long)
        transport.recv(size, src, group)
        n = int(size.item())
        if n == 0:
            return []
        buf = torch.empty(abs(n), dtype=torch.uint8)
        transport.recv(buf, src, group)
        if n < 0:
            raise BroadcastError(f"point_to_point_pyobj: rank {src} could not send its object: "
                                 f"{bytes(buf.numpy()).decode(errors='replace')}")
        return codec.decode(buf, allow_pickle=allow, trusted=trusted)
    return []
