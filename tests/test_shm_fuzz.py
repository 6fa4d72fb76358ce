"""Hostile bytes in a shared-memory ring reach the channel's receive path.

Writer and reader live in this one process, so the whole receive path runs
under `make sanitize` (this file is in the Makefile's SAN_TESTS). Whatever
the slot headers or the segment hold, recv returns bytes or raises
DecodeError / ShmTimeoutError / ShmPeerError: never a crash, never a read
outside the mapping (ASan would report it).
"""
from __future__ import annotations

import itertools
import mmap
import os
import random
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastbcast import _C

PREFIX = f"fbfuzz-{os.getpid()}-"
_names = itertools.count()
# SlotHeader in csrc/shm_ring.h: seq, msg_seq, msg_len (u64), index, nbytes (u32).
SLOT_HEADER = struct.Struct("<QQQII")
SLOTS, SLOT_BYTES = 4, 256
EXPECTED = (ValueError, TimeoutError, RuntimeError)  # DecodeError, ShmTimeoutError, ShmPeerError / broken channel


def pair():
    name = f"{PREFIX}{next(_names)}"
    pid = os.getpid()
    w = _C.ShmChannel.create(name, [0, 1], [pid, pid], SLOTS, SLOT_BYTES)
    r = _C.ShmChannel.attach(name, 0, [0, 1], [pid, pid], 1.0)
    return name, w, r


def drain(r, n=3):
    for _ in range(n):
        try:
            t = r.recv(0.0)
            assert t.dtype == torch.uint8 and t.dim() == 1
            t.sum()  # touch every byte it claims to have
        except EXPECTED:
            pass


near = st.sampled_from([0, 1, 2, 3, 4, 5, SLOT_BYTES - 1, SLOT_BYTES, SLOT_BYTES + 1, 3 * SLOT_BYTES,
                        2**31, 2**32 - 1, 2**48, 2**64 - 1])
u64 = st.one_of(near, st.integers(0, 2**64 - 1))
u32 = st.one_of(near.filter(lambda v: v < 2**32), st.integers(0, 2**32 - 1))
header = st.one_of(
    st.tuples(u64, u64, u64, u32, u32).map(lambda f: SLOT_HEADER.pack(*f)),
    st.binary(min_size=0, max_size=SLOT_HEADER.size),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(valid_first=st.integers(0, 3), headers=st.lists(st.tuples(header, st.booleans()), min_size=1, max_size=4))
def test_random_slot_headers(valid_first, headers):
    name, w, r = pair()
    try:
        w.unlink()
        for i in range(valid_first):
            w.send(torch.full((300 * i,), i, dtype=torch.uint8), 300 * i, 0.0)
            drain(r, 1)
        for h, publish in headers:
            w._inject(h, publish)
        drain(r)
    finally:
        w.close()
        r.close()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_scribbled_segment():
    rnd = random.Random(7)
    for trial in range(40):
        name, w, r = pair()
        with open(f"/dev/shm/{name}", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
            w.unlink()
            w.send(torch.arange(100, dtype=torch.uint8), 100)
            w.send(torch.ones(700, dtype=torch.uint8), 700)
            for _ in range(rnd.choice([1, 8, 64, 4096])):
                m[rnd.randrange(len(m))] = rnd.randrange(256)
            drain(r)
            try:
                w.send(torch.zeros(10, dtype=torch.uint8), 10, 0.0)
            except EXPECTED:
                pass
        w.close()
        r.close()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(PREFIX)]


class _Hooks:
    """The Broadcaster methods recv_object calls while it follows a stream."""

    def _stream_failure(self, kind, detail, route):
        return RuntimeError(f"{kind}: {detail}")

    def _stream_device(self, nbytes, route, deadline):
        raise RuntimeError("no device buffers here")

    def _check_seq(self, seq, route):
        raise RuntimeError("calls out of step")


def _stream(seed):
    from fastbcast._version import FORMAT_VERSION
    rnd = random.Random(seed)
    obj = [{"i": i, "s": "x" * rnd.randrange(60), "l": list(range(rnd.randrange(8)))} for i in range(60)]
    block, n, _, _, enc = _C.encode_frame_or_stream(obj, 1024, 4096, 1 << 26, FORMAT_VERSION, 1, first_segment=256)
    msgs = [bytearray(block[:n].numpy().tobytes())]
    while True:
        block, n, _, _, last = enc.next()
        msgs.append(bytearray(block[:n].numpy().tobytes()))
        if last:
            return obj, msgs


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 3), flips=st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 2**16),
                                                       st.integers(0, 255)), max_size=6))
@pytest.mark.parametrize("n_slots, slot_bytes", [(16, 4096), (64, 256)])   # 256: message 0 spans slots
def test_mutated_stream_through_recv_object(n_slots, slot_bytes, seed, flips):
    """A stream (FORMAT.md 3.1) with bytes changed anywhere (frame header,
    prologue, segment headers, bodies) decoded by recv_object in C++: the
    object, or an expected error, never a crash or a read out of bounds."""
    from fastbcast._version import FORMAT_VERSION
    obj, msgs = _stream(seed)
    for m, at, value in flips:
        msg = msgs[m % len(msgs)]
        msg[at % len(msg)] = value
    name = f"{PREFIX}{next(_names)}"
    pid = os.getpid()
    w = _C.ShmChannel.create(name, [0, 1], [pid, pid], n_slots, slot_bytes)
    r = _C.ShmChannel.attach(name, 0, [0, 1], [pid, pid], 1.0)
    try:
        w.unlink()
        for msg in msgs:
            t = torch.frombuffer(msg, dtype=torch.uint8)
            w.send(t, t.numel(), 0.0)
        try:
            got = r.recv_object(FORMAT_VERSION, 1, 1 << 20, False, (), 0.0, _Hooks())
            if not flips:
                assert got == obj
        except EXPECTED:
            pass
        drain(r, len(msgs))
    finally:
        w.close()
        r.close()
    assert not os.path.exists(f"/dev/shm/{name}")
