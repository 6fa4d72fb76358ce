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
