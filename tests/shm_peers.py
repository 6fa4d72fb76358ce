"""Peer processes for tests/test_shm_ring.py: readers and writers of a shared-memory channel.

Each peer is a fresh interpreter (multiprocessing "spawn") running one of the
role functions below. It first reports its pid (the writer must know every
pid before it creates the segment), then waits for its configuration on a
pipe, plays its role, and sends back ("ok", result) or ("err", type, message).
Roles that talk to the test mid-way use ``conn`` for that too.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import struct
import time
import zlib

import multiprocessing as mp

CTX = mp.get_context("spawn")


class Peer:
    """One spawned peer. ``env`` is set for the child only (knobs read once at startup)."""

    def __init__(self, role, *args, env=None):
        self.conn, child = CTX.Pipe()
        with _patched_env(env or {}):
            self.proc = CTX.Process(target=_main, args=(child, role, args), daemon=True)
            self.proc.start()
        child.close()

    @property
    def pid(self):
        return self.proc.pid

    def send(self, obj):
        self.conn.send(obj)

    def get(self, timeout=60.0):
        if not self.conn.poll(timeout):
            raise TimeoutError(f"peer {self.pid} sent nothing in {timeout} s")
        return self.conn.recv()

    def result(self, timeout=60.0):
        """The role's return value; its exception (type name and text) as a RuntimeError."""
        msg = self.get(timeout)
        while msg[0] not in ("ok", "err"):
            msg = self.get(timeout)
        if msg[0] == "err":
            raise RuntimeError(f"peer {self.pid} raised {msg[1]}: {msg[2]}")
        return msg[1]

    def outcome(self, timeout=60.0):
        """("ok", result) or ("err", type_name, message), skipping events."""
        msg = self.get(timeout)
        while msg[0] not in ("ok", "err"):
            msg = self.get(timeout)
        return msg

    def kill(self, sig=signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def stop(self):
        self.kill(signal.SIGCONT)
        self.kill(signal.SIGKILL)
        self.proc.join(10)


@contextlib.contextmanager
def _patched_env(env):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _main(conn, role, args):
    # A run started in the background (`cmd &` from a script) hands its
    # children SIGINT ignored; the Ctrl-C tests need Python's handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = role(conn, *args)
        conn.send(("ok", result))
    except BaseException as e:  # reported to the test, which decides
        conn.send(("err", type(e).__name__, str(e)))


def attach(conn, timeout_s=60.0):
    """Waits for the configuration and attaches as the reader it names."""
    from fastbcast import _C

    cfg = conn.recv()
    ch = _C.ShmChannel.attach(cfg["name"], cfg["reader"], cfg["ranks"], cfg["pids"], timeout_s)
    return ch, cfg


# ---- message bodies with their own sequence number and checksum ----

def make_message(seq: int) -> bytes:
    body = bytes((seq * 7 + i) & 0xFF for i in range(seq % 61))
    return struct.pack("<QI", seq, zlib.crc32(body)) + body


def check_message(buf: bytes, expect_seq: int) -> str | None:
    if len(buf) < 12:
        return f"message {expect_seq}: only {len(buf)} bytes"
    seq, crc = struct.unpack_from("<QI", buf)
    if seq != expect_seq:
        return f"message {expect_seq}: got sequence {seq}"
    if zlib.crc32(buf[12:]) != crc or len(buf) != 12 + seq % 61:
        return f"message {seq}: checksum or length mismatch"
    return None


# ---- roles ----

def reader_digests(conn, n, timeout_s=60.0):
    """Receives n messages; returns (length, sha256) of each."""
    ch, _ = attach(conn)
    out = []
    for _ in range(n):
        t = ch.recv(timeout_s)
        out.append((t.numel(), hashlib.sha256(t.numpy()).hexdigest()))
        ch.release()
    ch.close()
    return out


def reader_ordered(conn, n, timeout_s=None):
    """Receives n sequence-numbered messages; returns (received, first error)."""
    ch, _ = attach(conn)
    conn.send(("attached",))
    for i in range(n):
        err = check_message(ch.recv(timeout_s).numpy().tobytes(), i)
        if err:
            return i, err, None
    stats = ch.wait_stats
    ch.close()
    return n, None, stats


def reader_hold_then_sleep(conn):
    """Receives one message, keeps its slot, reports, then sleeps until killed."""
    ch, _ = attach(conn)
    ch.recv(30)
    conn.send(("holding",))
    time.sleep(600)


def reader_block(conn):
    """Attaches, reports, then waits in recv (asleep in the futex) until killed."""
    ch, _ = attach(conn)
    conn.send(("waiting",))
    ch.recv()


def reader_until_error(conn):
    """Receives until an error; returns (messages, error type, text, seconds from the last message to the error)."""
    ch, _ = attach(conn)
    conn.send(("attached",))
    n = 0
    last = time.monotonic()
    try:
        while True:
            ch.recv()
            ch.release()
            n += 1
            last = time.monotonic()
            conn.send(("got", n))
    except Exception as e:
        return n, type(e).__name__, str(e), time.monotonic() - last


def reader_raises_while_handling(conn, then):
    """Receives a message, fails while 'decoding' it, then calls recv again or closes."""
    ch, _ = attach(conn)
    ch.recv(30)
    try:
        raise ValueError("decoding failed")
    except ValueError:
        if then == "close":
            ch.close()
            conn.send(("closed",))
            time.sleep(600)
    got = []
    for _ in range(5):
        got.append(ch.recv(30).numpy().tobytes())
    return got


def reader_late(conn, delay_s):
    """Sleeps delay_s after receiving its configuration, then attaches and receives one message."""
    from fastbcast import _C

    cfg = conn.recv()
    time.sleep(delay_s)
    ch = _C.ShmChannel.attach(cfg["name"], cfg["reader"], cfg["ranks"], cfg["pids"], 60.0)
    conn.send(("attached",))
    return ch.recv(120).numpy().tobytes()  # the writer sends once the latest reader attached


def reader_idle(conn):
    """Waits 3 s with no message (CPU measured), then 1 s more with long-wait
    logging every 0.3 s, then without a timeout until SIGINT. Returns (cpu
    seconds, wall seconds, log lines, interrupt seen)."""
    import logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("fastbcast").addHandler(Keep())
    from fastbcast import _C

    ch, _ = attach(conn)
    c0, t0 = time.process_time(), time.monotonic()
    with contextlib.suppress(_C.ShmTimeoutError):
        ch.recv(3.0)    # long enough that the spin and the first slice's costs are not most of it
    cpu, wall = time.process_time() - c0, time.monotonic() - t0
    os.environ["FASTBCAST_SHM_WARN_S"] = "0.3"
    with contextlib.suppress(_C.ShmTimeoutError):
        ch.recv(1.0)
    interrupted = False
    try:
        # SIGINT may come before recv() is entered on a loaded machine: it
        # must count as interrupting the wait all the same.
        conn.send(("waiting",))
        ch.recv()
    except KeyboardInterrupt:
        interrupted = True
    return cpu, wall, records, interrupted


def writer_stream(conn, slot_bytes, n_slots, big):
    """Writer: creates, sends one small message, says so, then one `big`-byte message (blocked by a full ring)."""
    import torch
    from fastbcast import _C

    cfg = conn.recv()
    ch = _C.ShmChannel.create(cfg["name"], cfg["ranks"], cfg["pids"], n_slots, slot_bytes)
    ch.wait_attached(60)
    ch.unlink()
    ch.send(torch.zeros(10, dtype=torch.uint8), 10)
    conn.send(("streaming",))
    buf = torch.ones(big, dtype=torch.uint8)
    ch.send(buf, big)
    time.sleep(600)



def writer_ordered(conn, n, n_slots, slot_bytes):
    """Writer: creates the ring it is told about, sends n sequence-numbered messages; returns its wait stats."""
    import torch
    from fastbcast import _C

    cfg = conn.recv()
    ch = _C.ShmChannel.create(cfg["name"], cfg["ranks"], cfg["pids"], n_slots, slot_bytes)
    ch.wait_attached(60)
    ch.unlink()
    buf = torch.empty(64 + 61, dtype=torch.uint8)
    view = buf.numpy()
    for i in range(n):
        m = make_message(i)
        view[: len(m)] = memoryview(m)
        ch.send(buf, len(m))
    stats = ch.wait_stats
    conn.send(("sent",))
    conn.recv()  # the readers are done: closing earlier would end their waits
    ch.close()
    return stats
