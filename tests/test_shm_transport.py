"""The shared-memory transport under the broadcast protocol, on gloo groups of
CPU processes on this host (run in CI).

tests/test_broadcast.py runs the whole broadcast suite on both transports and
tests/test_shm_ring.py the ring itself; this file covers what belongs to the
choice of transport and to faults seen through `Broadcaster`: the automatic
choice, the fallback when /dev/shm cannot be used, calls out of step, several
groups at once, slot-boundary sizes, a long run with RSS and /dev/shm flat, a
stalled source, and peers killed with SIGKILL. After each run /dev/shm holds
nothing of ours.
"""
from __future__ import annotations

import datetime
import errno
import logging
import os
import signal
import sys
import threading
import time
import zlib

import pytest
import torch.distributed as dist

from distributed import expect_check_ok, run_checks, run_distributed, run_distributed_may_die
from test_reliability import _expect

SLACK_S = 4.0          # scheduling slack on a loaded 2-core box


def _fb():
    import fastbcast
    return fastbcast


def _mod(name):
    _fb()
    return sys.modules[f"fastbcast.{name}"]


def _ours() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(("fastbcast-", "fb-"))}


def _group(ranks, timeout=30):
    # Only the members call it: in the fault tests some ranks are dead.
    return dist.new_group(sorted(ranks), timeout=datetime.timedelta(seconds=timeout), use_local_synchronization=True)


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


# --------------------------------------------------------------------------
# Checks sharing one 4-rank run
# --------------------------------------------------------------------------

CHECKS: dict = {}


def check(fn):
    CHECKS[fn.__name__[len("_check_"):]] = fn
    return fn


@check
def _check_auto_is_shm_on_one_host(rank, world):
    fb = _fb()
    g = _group(range(world))
    b = fb.Broadcaster(g)
    assert b.transport is None          # decided at the first broadcast
    assert b.broadcast({"r": rank} if rank == 0 else None, src=0) == {"r": 0}
    assert b.transport == "shm"
    # the drop-in too, and a Broadcaster asking for the collective
    assert fb.broadcast_pyobj([rank] if rank == 1 else None, rank, g, 1) == [1]
    c = fb.Broadcaster(g, transport="collective")
    assert c.broadcast("x" if rank == 2 else None, src=2) == "x" and c.transport == "collective"
    # FASTBCAST_TRANSPORT=collective is the default's switch
    _mod("broadcast").DEFAULT_TRANSPORT = "collective"
    try:
        d = fb.Broadcaster(g)
        assert d.broadcast(7 if rank == 3 else None, src=3) == 7 and d.transport == "collective"
    finally:
        _mod("broadcast").DEFAULT_TRANSPORT = "auto"
    e = _expect(ValueError, fb.Broadcaster, g, transport="tcp")[0]
    assert "auto" in str(e), str(e)


@check
def _check_fallback_when_dev_shm_unusable(rank, world):
    """/dev/shm unusable on one rank (simulated: its probe fails with
    ENOSPC): every rank takes the collective path and logs one warning that
    says why; transport="shm" is a ValueError on every rank."""
    fb = _fb()
    tmod = _mod("transport")
    handler = _Warnings()
    logging.getLogger("fastbcast").addHandler(handler)
    probe = tmod.shm_probe
    if rank == 1:
        tmod.shm_probe = lambda nbytes: errno.ENOSPC
    try:
        g = _group(range(world))
        b = fb.Broadcaster(g)
        for src in range(world):
            assert b.broadcast([src, "fb"] if rank == src else None, src=src) == [src, "fb"]
        assert b.transport == "collective"
        s = fb.Broadcaster(g, transport="shm")
        e = _expect(ValueError, s.broadcast, 1 if rank == 0 else None, src=0)[0]
        assert "global rank 1" in str(e) and os.strerror(errno.ENOSPC) in str(e), str(e)
    finally:
        tmod.shm_probe = probe
        logging.getLogger("fastbcast").removeHandler(handler)
    warned = [m for m in handler.messages if "shared memory" in m]
    assert len(warned) == 1, handler.messages
    assert "global rank 1" in warned[0] and os.strerror(errno.ENOSPC) in warned[0], warned


@check
def _check_calls_out_of_step(rank, world):
    """Rank 2 skips a call: at the next one (from another source) it gets
    a frame of a later call and raises, instead of returning the wrong
    object; the others are not affected. (On the collective path the same
    skip pairs collectives of different sources, which gloo does not
    define; the sequence number is checked there too, when frames pair.)"""
    fb = _fb()
    g = _group(range(world))
    b = fb.Broadcaster(g, transport="shm")
    assert b.broadcast("first" if rank == 0 else None, src=0) == "first"
    if rank != 2:
        assert b.broadcast("skipped by 2" if rank == 0 else None, src=0) == "skipped by 2"
    if rank == 2:
        e = _expect(fb.BroadcastError, b.broadcast, None, src=1)[0]
        assert "out of step" in str(e) and "call 2" in str(e) and "call 3" in str(e), str(e)
        e = _expect(fb.BroadcastError, b.broadcast, None, src=1)[0]
        assert "can no longer be used" in str(e), str(e)
    else:
        assert b.broadcast("third" if rank == 1 else None, src=1) == "third"


@check
def _check_groups_and_broadcasters_at_once(rank, world):
    """Two groups send at the same time; two Broadcasters with different
    options share one group (the drop-in keeps one per option set, and
    ranks may pass different options)."""
    fb = _fb()
    g01, g23 = _group([0, 1]), _group([2, 3])
    g = g01 if rank < 2 else g23
    members = [0, 1] if rank < 2 else [2, 3]
    a, b = fb.Broadcaster(g), fb.Broadcaster(g, allow_pickle=True)
    for i in range(50):
        src = members[i % 2]
        mine = {"group": members, "i": i, "from": rank}
        bc = a if (i + rank) % 2 else b          # ranks use different Broadcasters in one call
        got = bc.broadcast(mine if rank == src else None, src=src)
        assert got == {"group": members, "i": i, "from": src}, got
    assert a.transport == b.transport == "shm"


@check
def _check_slot_boundaries(rank, world):
    """Frames around the slot size and far beyond the ring, byte-exact
    (a ring of 4 slots of 64 KiB for this group)."""
    fb = _fb()
    os.environ["FASTBCAST_SHM_SLOTS"], os.environ["FASTBCAST_SHM_BYTES"] = "4", str(4 << 16)
    try:
        g = _group(range(world))
        b = fb.Broadcaster(g)
        b.broadcast(None if rank else "setup", src=0)
        slot = b._transport.state.rings[0].slot_bytes
        header = fb._C.HEADER_BYTES
        assert slot <= 1 << 16
        for frame in (header + 6, slot - 1, slot, slot + 1, 3 * slot - 1, 3 * slot + 1, 10 * 4 * slot):
            n = frame - header - 6        # [bytes]: fixarray + bin8/16/32 header, 1 + 5 bytes at most
            payload = os.urandom(n)
            src = frame % world
            got = b.broadcast([payload] if rank == src else None, src=src)
            # every rank checks against the source's digest
            want = b.broadcast(zlib.crc32(payload) if rank == src else None, src=src)
            assert zlib.crc32(got[0]) == want and len(got[0]) == n, (frame, len(got[0]), n)
    finally:
        del os.environ["FASTBCAST_SHM_SLOTS"], os.environ["FASTBCAST_SHM_BYTES"]


def _falls_back_with_one_warning(rank, world, must_say: str) -> None:
    """A new group's Broadcaster works on the collective transport on every
    rank, each of which logged one warning containing must_say."""
    fb = _fb()
    handler = _Warnings()
    logging.getLogger("fastbcast").addHandler(handler)
    try:
        g = _group(range(world))
        b = fb.Broadcaster(g, timeout=30)
        for src in range(world):
            assert b.broadcast({"from": src} if rank == src else None, src=src) == {"from": src}
        assert b.transport == "collective", b.transport
    finally:
        logging.getLogger("fastbcast").removeHandler(handler)
    assert len(handler.messages) == 1 and must_say in handler.messages[0], handler.messages


@check
def _check_one_rank_with_a_bad_ring_setting(rank, world):
    """One rank's FASTBCAST_SHM_BYTES is unusable (under 4 KiB a slot): the
    group falls back to the collective on every rank, with nobody left
    waiting in the agreement, and every rank's one warning says why."""
    if rank == 2:
        os.environ["FASTBCAST_SHM_SLOTS"], os.environ["FASTBCAST_SHM_BYTES"] = "2", "8191"
    try:
        _falls_back_with_one_warning(rank, world, "global rank 2: FASTBCAST_SHM_SLOTS=2 / FASTBCAST_SHM_BYTES=8191: "
                                     "need at least 2 slots of at least 4 KiB" if rank == 2 else
                                     "global rank 2: its FASTBCAST_SHM_SLOTS / FASTBCAST_SHM_BYTES are unusable")
    finally:
        if rank == 2:
            del os.environ["FASTBCAST_SHM_SLOTS"], os.environ["FASTBCAST_SHM_BYTES"]


@check
def _check_bad_ring_setting_on_every_rank(rank, world):
    """The same unusable setting everywhere: the warning gives the setting's
    reason, not a failure to map /dev/shm."""
    os.environ["FASTBCAST_SHM_SLOTS"] = "1"
    try:
        _falls_back_with_one_warning(rank, world, f"global rank {rank}: FASTBCAST_SHM_SLOTS=1 / FASTBCAST_SHM_BYTES=")
    finally:
        del os.environ["FASTBCAST_SHM_SLOTS"]


@check
def _check_dev_shm_without_room_for_the_ring(rank, world):
    """/dev/shm has less room than a ring (mocked statvfs on every rank):
    each rank's probe refuses without reserving the ring, and the group
    falls back with one warning naming the reason."""
    reserved = []
    real_statvfs, real_fallocate = os.statvfs, os.posix_fallocate
    os.statvfs = lambda path: os.statvfs_result((4096, 4096, 256, 16, 16, 0, 0, 0, 0, 255))   # 64 KiB free
    os.posix_fallocate = lambda fd, off, n: (reserved.append(n), real_fallocate(fd, off, n))[1]
    try:
        _falls_back_with_one_warning(rank, world, os.strerror(errno.ENOSPC))
    finally:
        os.statvfs, os.posix_fallocate = real_statvfs, real_fallocate
    assert reserved == [], reserved


@check
def _check_ring_creation_fails_after_the_probe(rank, world):
    """/dev/shm too small for the ring although the probe passed (a tmpfs
    the probe's statvfs cannot see through; simulated: the source's create
    fails with ENOSPC): every rank falls back to the collective for that
    source, with one warning saying why, and the next calls work."""
    fb = _fb()
    ch_cls = fb._C.ShmChannel
    real_create = ch_cls.__dict__["create"]

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    handler = _Warnings()
    logging.getLogger("fastbcast").addHandler(handler)
    ch_cls.create = staticmethod(full)
    try:
        g = _group(range(world))
        b = fb.Broadcaster(g, timeout=30)
        for _ in range(2):
            assert b.broadcast(["big", bytes(50000)] if rank == 1 else None, src=1) == ["big", bytes(50000)]
    finally:
        ch_cls.create = real_create
        logging.getLogger("fastbcast").removeHandler(handler)
    assert b.transport == "shm"
    assert len(handler.messages) == 1, handler.messages
    assert "source global rank 1" in handler.messages[0] and os.strerror(errno.ENOSPC) in handler.messages[0]


@check
def _check_receiver_max_bytes_drains_in_the_ring(rank, world):
    """A receiver with a smaller max_bytes than a 3 MiB frame (several
    slots) raises BroadcastError after draining it in the ring, without a
    buffer for the frame; the source and the others are unaffected, and the
    next call works."""
    fb = _fb()
    g = _group(range(world))
    cap = 100_000 if rank == 1 else None
    b = fb.Broadcaster(g, max_bytes=cap)
    b.broadcast("setup" if rank == 0 else None, src=0)
    big = bytes(range(256)) * (3 << 12)          # 3 MiB, the same on every rank
    pool_before = fb.pool_stats()["bytes"]
    if rank == 1:
        e = _expect(fb.BroadcastError, b.broadcast, None, src=0)[0]
        assert "max_bytes=100000" in str(e), str(e)
        assert fb.pool_stats()["bytes"] - pool_before < 1 << 20, (pool_before, fb.pool_stats())
    else:
        got = b.broadcast(big if rank == 0 else None, src=0)
        assert rank == 0 or got == big
    assert b.broadcast(["next", 1] if rank == 2 else None, src=2) == ["next", 1]


@check
def _check_interrupted_wait_gives_the_group_up(rank, world):
    """Ctrl-C while a rank waits inside a broadcast (the source for a free
    slot of a full ring, a receiver for a frame) gives the group up: that
    rank's next call raises BroadcastError saying it was interrupted, and
    its peer raises BroadcastError instead of pairing frames of different
    calls or reporting success for frames nobody will read."""
    fb = _fb()
    for who in (0, 1):
        # Every rank makes as many groups as the others: new_group names
        # groups by a per-process count, which later checks rely on.
        g = _group([0, 1] if rank < 2 else [2, 3])
        if rank >= 2:
            continue
        b = fb.Broadcaster(g, timeout=30)
        assert b.broadcast("setup" if rank == 0 else None, src=0) == "setup"
        if rank == who:
            threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        if rank == who:
            try:
                if rank == 0:
                    for _ in range(40):   # the 16-slot ring fills while rank 1 sleeps
                        b.broadcast([b"x" * 1000], src=0)
                else:
                    b.broadcast(None, src=0)
                raise AssertionError("no KeyboardInterrupt")
            except KeyboardInterrupt:
                pass
            e = _expect(fb.BroadcastError, b.broadcast, ["next"] if rank == 0 else None, src=0)[0]
            assert "interrupted" in str(e) and "can no longer be used" in str(e), str(e)
        else:
            time.sleep(2.0)
            started = time.monotonic()
            with pytest.raises(fb.BroadcastError):
                for _ in range(40):
                    b.broadcast([b"y"] if rank == 0 else None, src=0)
            assert time.monotonic() - started < 1.0 + SLACK_S
            _expect(fb.BroadcastError, b.broadcast, [b"z"] if rank == 0 else None, src=0)


@check
def _check_10000_calls_flat(rank, world):
    """10,000 calls of the per-step shape: RSS, the pool and /dev/shm stay flat."""
    fb = _fb()
    g = _group(range(world))
    b = fb.Broadcaster(g)
    rss = []
    for i in range(10_000):
        data = [] if i % 3 else [{"rid": f"r{i}", "ids": list(range(i % 300))}]
        got = fb.broadcast_pyobj(data if rank == 0 else None, rank, g, 0)
        assert got == data
        if i in (2_000, 9_999):
            rss.append(int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
            pool = fb.pool_stats()
    b.close()
    assert rss[1] - rss[0] < 8 << 20, rss
    assert pool["busy_blocks"] <= 4, pool
    return sorted(_ours())


@check
def _check_stalled_source_times_out(rank, world):
    """The source does not send (busy elsewhere): receivers with timeout=
    raise BroadcastTimeoutError saying they waited for the writer."""
    fb = _fb()
    g = _group(range(world))
    b = fb.Broadcaster(g, timeout=1.0)
    assert b.broadcast("set up" if rank == 0 else None, src=0) == "set up"
    if rank == 0:
        time.sleep(1.5 + SLACK_S / 4)
        return
    e, took = _expect(fb.BroadcastTimeoutError, b.broadcast, None, src=0)
    assert 0.9 <= took < 1.0 + SLACK_S, took
    assert "timed out" in str(e) and "writer" in str(e), str(e)


class _SlowToEncode:
    """Pickled (allow_pickle) only after longer than the checks' timeout."""

    def __reduce__(self):
        time.sleep(1.5)
        return (_SlowToEncode, ())


@check
def _check_slow_encode_counts_against_the_timeout(rank, world):
    """The source's encode counts against timeout= on the one-slot path: an
    encode that outlasts it publishes nothing, and every rank raises
    BroadcastTimeoutError."""
    fb = _fb()
    b = fb.Broadcaster(_group(range(world), timeout=5), timeout=1.0, allow_pickle=True)
    assert b.broadcast("set up" if rank == 0 else None, src=0) == "set up"
    if rank == 0:
        e, took = _expect(fb.BroadcastTimeoutError, b.broadcast, [_SlowToEncode()], src=0)
        assert took < 1.5 + SLACK_S, took
    else:
        e, took = _expect(fb.BroadcastTimeoutError, b.broadcast, None, src=0)
        assert 0.9 <= took < 1.0 + SLACK_S, took
    assert "timed out" in str(e) or "timeout passed" in str(e), str(e)


@check
def _check_timeout_while_agreeing_gives_the_group_up(rank, world):
    """The source comes late to a group's first call, where the ranks agree
    on the transport: receivers raise BroadcastTimeoutError, and their later
    calls are refused at once instead of agreeing again (which would wait
    again, and pair with the late source's stale collectives)."""
    fb = _fb()
    b = fb.Broadcaster(_group(range(world), timeout=5), timeout=1.0)
    if rank == 0:
        time.sleep(1.5)
        _expect(fb.BroadcastError, b.broadcast, "late", src=0)
        return
    e, took = _expect(fb.BroadcastTimeoutError, b.broadcast, None, src=0)
    assert 0.9 <= took < 1.0 + SLACK_S and "agreeing on the transport" in str(e), (took, str(e))
    for _ in range(2):
        e, took = _expect(fb.BroadcastError, b.broadcast, None, src=0)
        assert took < 0.5 and "can no longer be used" in str(e), (took, str(e))


def _run_checks(rank, world_size, outdir, names):
    run_checks(rank, CHECKS, names, outdir, barrier_each=True)
    return rank


@pytest.fixture(scope="module")
def shm_run(tmp_path_factory):
    before = _ours()
    outdir = str(tmp_path_factory.mktemp("shm4"))
    error = None
    try:
        run_distributed(_run_checks, 4, outdir, list(CHECKS), timeout=300)
    except AssertionError as e:
        error = str(e)
    return outdir, error, before


def _expect_ok(run, name):
    outdir, error, before = run
    expect_check_ok(outdir, 4, name, error)
    assert _ours() <= before, f"left in /dev/shm: {_ours() - before}"


@pytest.mark.parametrize("name", list(CHECKS))
def test_shm_transport(shm_run, name):
    _expect_ok(shm_run, name)


def test_ring_setting_that_is_not_a_number_is_named(monkeypatch):
    """The fallback's warning carries this text: it must say which setting."""
    from fastbcast import transport
    monkeypatch.setenv("FASTBCAST_SHM_BYTES", "lots")
    with pytest.raises(ValueError, match="FASTBCAST_SHM_BYTES='lots' is not an integer"):
        transport.shm_geometry()


def test_probe_refuses_a_ring_larger_than_dev_shm_without_reserving_it(monkeypatch):
    # A huge FASTBCAST_SHM_BYTES: every rank probes at once, so the probe must
    # not reserve the ring (it did, and the OOM killer took a rank).
    tmod = _mod("transport")
    reserved = []
    real_fallocate = os.posix_fallocate
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, off, n: (reserved.append(n), real_fallocate(fd, off, n))[1])
    st = os.statvfs("/dev/shm")
    free = st.f_bavail * st.f_frsize
    assert tmod.shm_probe(free + (1 << 30)) == errno.ENOSPC
    assert tmod.shm_probe(16 << 20) == 0
    assert reserved == [tmod.PROBE_BYTES], reserved
    monkeypatch.setattr(tmod, "_available_memory", lambda: 8 << 20)
    assert tmod.shm_probe(16 << 20) == errno.ENOMEM
    monkeypatch.setattr(os, "statvfs", lambda path: os.statvfs_result((4096, 4096, 256, 16, 16, 0, 0, 0, 0, 255)))
    assert tmod.shm_probe(1 << 20) == errno.ENOSPC
    assert reserved == [tmod.PROBE_BYTES], reserved


# --------------------------------------------------------------------------
# Peers killed with SIGKILL
# --------------------------------------------------------------------------

def _killed_reader(rank, world_size):
    """Global rank 2, a reader, is killed after the ring is set up. The
    source keeps sending until the ring is full, then notices the dead
    reader; rank 1, the live reader, then notices the source gave up."""
    fb = _fb()
    b = fb.Broadcaster(_group(range(world_size)))
    assert b.broadcast("set up" if rank == 0 else None, src=0) == "set up"
    dist.barrier()
    if rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.2)
    out = {}
    started = time.monotonic()
    try:
        for i in range(100):
            b.broadcast([i] if rank == 0 else None, src=0)
        raise AssertionError("100 broadcasts to a dead reader all returned")
    except fb.BroadcastError as e:
        out["error"], out["took"], out["type"] = str(e), time.monotonic() - started, type(e).__name__
    # a new group without the dead rank works
    g01 = _group([0, 1])
    out["after"] = fb.Broadcaster(g01).broadcast("after" if rank == 0 else None, src=0)
    return out


def _killed_writer_mid_stream(rank, world_size):
    """The source dies while a frame three times the ring streams through
    it: the reader that waits for its next slot, and the one that comes
    late, both raise naming it."""
    fb = _fb()
    b = fb.Broadcaster(_group(range(world_size)))
    assert b.broadcast("set up" if rank == 0 else None, src=0) == "set up"
    ring = 16 << 20
    if rank == 0:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGKILL)).start()
        b.broadcast(b"w" * (3 * ring), src=0)
        time.sleep(10)
        raise AssertionError("the source was not killed")
    if rank == 2:
        time.sleep(2.0)
    started = time.monotonic()
    e, _ = _expect(fb.BroadcastError, b.broadcast, None, src=0)
    return {"error": str(e), "took": time.monotonic() - started}


def test_killed_reader_ends_every_survivor():
    before = _ours()
    res = run_distributed_may_die(_killed_reader, 3, timeout=120)
    assert res[2] == ("died", -signal.SIGKILL), res[2]
    for r in (0, 1):
        status, out = res[r]
        assert status == "ok", out
        assert "global rank 2" in out["error"] or r == 1, out
        assert out["took"] < 1.0 + SLACK_S, out
        assert out["after"] == "after", out
    assert "global rank 0" in res[1][1]["error"] or "closed" in res[1][1]["error"], res[1]
    assert _ours() <= before, f"left in /dev/shm: {_ours() - before}"


def test_killed_writer_mid_stream():
    before = _ours()
    res = run_distributed_may_die(_killed_writer_mid_stream, 3, timeout=120)
    assert res[0] == ("died", -signal.SIGKILL), res[0]
    for r in (1, 2):
        status, out = res[r]
        assert status == "ok", out
        assert "global rank 0" in out["error"], out
        assert out["took"] < 1.0 + SLACK_S + (1.0 if r == 1 else 0), out
    assert _ours() <= before, f"left in /dev/shm: {_ours() - before}"


def _wrong_rank_on_one_rank_only(rank, world):
    """Each rank passes rank=0 once: right on the source (global rank 0),
    wrong on rank 1, which raises ValueError while the source sends. That
    refused call still counts: rank 1's next call finds the source's frame
    out of step and raises instead of returning it, and the source learns
    of it at a later call instead of running one message ahead for good."""
    fb = _fb()
    out = {}
    for transport in ("shm", "collective"):
        b = fb.Broadcaster(dist.new_group([0, 1]), transport=transport, timeout=5)
        if rank == 1:
            e = _expect(ValueError, b.broadcast, None, src=0, rank=0)[0]
            assert "not this process" in str(e), str(e)
            e = _expect(fb.BroadcastError, b.broadcast, None, src=0, rank=1)[0]
            assert "out of step" in str(e), str(e)
            out[transport] = "receiver raised"
            continue
        assert b.broadcast(["step0"], src=0, rank=0) == ["step0"]
        try:
            # The ring lets the source run up to 16 messages ahead; rank 1
            # closes its end when it finds the mismatch, and the source's
            # next send after that raises.
            for step in range(1, 200):
                b.broadcast([f"step{step}"], src=0, rank=0)
                time.sleep(0.01)
            out[transport] = "source ran ahead"
        except fb.BroadcastError:
            out[transport] = "source raised"
    return out


def test_wrong_rank_on_one_rank_only_is_not_silent():
    res = run_distributed_may_die(_wrong_rank_on_one_rank_only, 2, timeout=120)
    assert res[1] == ("ok", {"shm": "receiver raised", "collective": "receiver raised"}), res[1]
    assert res[0] == ("ok", {"shm": "source raised", "collective": "source raised"}), res[0]
