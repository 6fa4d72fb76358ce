"""Broadcast failure modes on gloo: every one ends in a clear exception on each
affected rank, within a bounded time, with no hang and no silent wrong result.
RELIABILITY.md has the table of faults this file injects.

Covered elsewhere (referenced, not repeated):
  * the source raises while encoding -> receivers get BroadcastError through
    the error frame: tests/test_broadcast.py::test_error_frame_for_unsupported_type
    (here only once more through the timeout= code path);
  * ranks on different format versions (header override):
    tests/test_broadcast.py::test_version_mismatch_on_source;
  * ranks with different chunk sizes:
    tests/test_broadcast.py::test_chunk_size_mismatch_leaves_no_rank_waiting.

Two ranks share one run for every check that leaves both processes alive
(starting a rank costs seconds on a small CI box). Each check writes its
outcome to a file, so one failing check fails only its own test. Checks that
leave a collective unfinished inside torch.distributed run on a group of
their own whose process-group timeout (GROUP_TIMEOUT_S) is short, so that
collective is gone by the time the processes shut down. A peer killed with
SIGKILL needs processes that may die, so it has a run of its own.

Every check here runs on the collective transport (it counts collectives or
dies on the n-th one); tests/test_shm_transport.py covers the same faults on
shared memory.
"""
from __future__ import annotations

import datetime
import gc
import os
import signal
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from distributed import (CountBroadcasts, expect_check_ok, hook_broadcasts, run_checks, run_distributed,
                         run_distributed_may_die)

WORLD = 2
TIMEOUT_S = 1.5          # fastbcast's timeout= in the checks that expect it to fire
GROUP_TIMEOUT_S = 5      # process-group timeout of the per-check groups
SLACK_S = 4.0            # scheduling slack on a loaded 2-core box
ENV_MAX_BYTES = 5 << 20  # FASTBCAST_MAX_BYTES for the shared run


def _fb():
    import fastbcast
    return fastbcast


def _bmod():
    _fb()
    return sys.modules["fastbcast.broadcast"]


def _group(timeout=GROUP_TIMEOUT_S):
    """A fresh group of both ranks (every rank must call it, in order)."""
    return dist.new_group(list(range(WORLD)), timeout=datetime.timedelta(seconds=timeout))


def _expect(exc, fn, *args, **kwargs):
    """Runs fn; returns (exception, seconds). It must raise exc (or a subclass)."""
    started = time.monotonic()
    try:
        fn(*args, **kwargs)
    except exc as e:
        return e, time.monotonic() - started
    except BaseException as e:
        raise AssertionError(f"expected {exc.__name__}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"expected {exc.__name__}, nothing was raised")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


CHECKS = {}


def check(fn):
    CHECKS[fn.__name__.removeprefix("_check_")] = fn
    return fn


# --------------------------------------------------------------------------
# the checks (run on both ranks, in this order)
# --------------------------------------------------------------------------

@check
def _check_two_ranks_both_believe_they_are_the_source(rank, world):
    """rank 0 passes src=0, rank 1 passes src=1. On gloo a broadcast's root
    sends and waits for its receivers to take the bytes; here nobody
    receives, so both sends wait. timeout= ends both calls."""
    fb = _fb()
    b = fb.Broadcaster(_group(), timeout=TIMEOUT_S)
    e, took = _expect(fb.BroadcastTimeoutError, b.broadcast, {"from": rank}, src=rank)
    assert TIMEOUT_S * 0.9 <= took < TIMEOUT_S + SLACK_S, took
    assert "timed out" in str(e) and f"global rank {rank}" in str(e) and "src" in str(e), str(e)
    # The group may still hold the unfinished collective: refused from now on.
    e, took = _expect(fb.BroadcastError, b.broadcast, 1, src=0)
    assert "can no longer be used" in str(e) and took < 0.5, str(e)


@check
def _check_no_rank_believes_it_is_the_source(rank, world):
    """rank 0 passes src=1 and rank 1 passes src=0: both wait to receive."""
    fb = _fb()
    g = _group()
    other = 1 - rank
    e, took = _expect(fb.BroadcastTimeoutError, fb.broadcast, None, group=g, src=other, timeout=TIMEOUT_S)
    assert TIMEOUT_S * 0.9 <= took < TIMEOUT_S + SLACK_S, took
    assert f"receiver of global rank {other}" in str(e), str(e)


@check
def _check_stalled_peer(rank, world):
    """The receiver never joins (it is busy elsewhere): the source's call ends
    after timeout=, the receiver is not affected."""
    fb = _fb()
    g = _group()
    if rank == 0:
        b = fb.Broadcaster(g, timeout=TIMEOUT_S, first_chunk=4096, chunk=4096)
        e, took = _expect(fb.BroadcastTimeoutError, b.broadcast, b"x" * 20000, src=0)
        assert TIMEOUT_S * 0.9 <= took < TIMEOUT_S + SLACK_S, took
        assert "source" in str(e) and "collective 1 of 5" in str(e), str(e)
    else:
        time.sleep(TIMEOUT_S + 0.5)


class _SlowToEncode:
    """Pickled (allow_pickle) only after longer than TIMEOUT_S."""

    def __reduce__(self):
        time.sleep(TIMEOUT_S + 0.5)
        return (_SlowToEncode, ())


@check
def _check_slow_encode_counts_against_the_timeout(rank, world):
    """On the source the encode counts against timeout= (the one-call path
    too): an encode that outlasts it sends nothing, and every rank raises
    BroadcastTimeoutError instead of the source returning late."""
    fb = _fb()
    # One item: the one-call path. Two: a container that could stream comes
    # back unsent from C++ and goes through the Python path's collectives.
    for obj in ([_SlowToEncode()], [_SlowToEncode(), 1]):
        b = fb.Broadcaster(_group(), timeout=TIMEOUT_S, allow_pickle=True)
        if rank == 0:
            e, took = _expect(fb.BroadcastTimeoutError, b.broadcast, obj, src=0)
            assert took < TIMEOUT_S + 0.5 + SLACK_S, took
        else:
            # Late by 1 s: still waiting when the source's encode ends, so a
            # broadcast posted then would be received.
            time.sleep(1.0)
            e, took = _expect(fb.BroadcastTimeoutError, b.broadcast, None, src=0)
            assert TIMEOUT_S * 0.9 <= took < TIMEOUT_S + SLACK_S, took
        assert "timed out" in str(e), str(e)


@check
def _check_corrupt_frame_header(rank, world):
    """A first chunk that is not a fastbcast frame (another protocol on the
    same group, or corruption): the receiver says so and will not guess
    where the sender is; its Broadcaster refuses further use."""
    fb = _fb()
    g = _group()
    if rank == 0:
        dist.broadcast(torch.full((4096,), 7, dtype=torch.uint8), src=0, group=g)
        return
    b = fb.Broadcaster(g, first_chunk=4096, timeout=30)
    e, took = _expect(fb.BroadcastError, b.broadcast, None, src=0)
    assert "corrupt frame header" in str(e) and "07 07 07 07" in str(e) and took < SLACK_S, str(e)
    e, _ = _expect(fb.BroadcastError, b.broadcast, None, src=0)
    assert "can no longer be used" in str(e), str(e)


@check
def _check_source_fails_to_encode_under_timeout(rank, world):
    """The error frame also goes out through the timeout= (async) path."""
    fb = _fb()
    b = fb.Broadcaster(_group(), timeout=30)
    bad = {"ok": 1, "bad": threading.Lock()}
    started = time.monotonic()
    if rank == 0:
        e, _ = _expect(TypeError, b.broadcast, bad, src=0)
    else:
        e, _ = _expect(fb.BroadcastError, b.broadcast, None, src=0)
    assert "['bad']" in str(e) and "lock" in str(e), str(e)
    assert time.monotonic() - started < SLACK_S
    got = b.broadcast({"after": "error"} if rank == 1 else None, src=1)
    assert got == {"after": "error"}, got


@check
def _check_payload_over_max_bytes(rank, world):
    """The source refuses a payload over max_bytes before sending anything
    but the one first-chunk error frame; every receiver gets the reason."""
    fb = _fb()
    g = _group()
    big = b"z" * 50_000
    b = fb.Broadcaster(g, max_bytes=10_000, first_chunk=4096, chunk=4096, timeout=30)
    started = time.monotonic()
    if rank == 0:
        with CountBroadcasts() as c:
            e, _ = _expect(ValueError, b.broadcast, big, src=0)
        assert c.n == 1, f"{c.n} collectives for a refused payload (only the error frame may go)"
    else:
        e, _ = _expect(fb.BroadcastError, b.broadcast, None, src=0)
    assert "max_bytes=10000" in str(e) and "50003" in str(e), str(e)
    assert time.monotonic() - started < SLACK_S
    # Not a protocol failure: the same Broadcaster goes on.
    small = [rank, "fits"]
    assert b.broadcast(small if rank == 1 else None, src=1) == [1, "fits"]
    # A CUDA-free frame exactly at the cap is fine.
    exact = b"q" * (10_000 - 3)   # bin16 header: 3 bytes
    assert len(fb.encode(exact)) == 10_000
    assert b.broadcast(exact if rank == 0 else None, src=0) == exact

    # A receiver with a smaller cap than the source drains the frame in
    # chunk-sized pieces, raises, and leaves the protocol in step.
    cap = 10_000 if rank == 1 else 1 << 20
    b2 = fb.Broadcaster(g, max_bytes=cap, first_chunk=4096, chunk=4096, timeout=30)
    if rank == 0:
        assert b2.broadcast(big, src=0) is big
    else:
        gc.collect()
        e, took = _expect(fb.BroadcastError, b2.broadcast, None, src=0)
        assert "over this rank's (global rank 1) max_bytes=10000" in str(e), str(e)
    assert b2.broadcast([2] if rank == 0 else None, src=0) == [2]

    # FASTBCAST_MAX_BYTES (set for this run) is the default, also for the
    # one-line functions and the drop-in.
    assert fb.Broadcaster(g).max_bytes == ENV_MAX_BYTES
    huge = b"h" * (ENV_MAX_BYTES + 1)
    for call in (lambda o: fb.broadcast(o, group=g, src=0),
                 lambda o: fb.broadcast_pyobj([o] if o is not None else None, rank, g, 0)):
        if rank == 0:
            e, _ = _expect(ValueError, call, huge)
        else:
            e, _ = _expect(fb.BroadcastError, call, None)
        assert f"max_bytes={ENV_MAX_BYTES}" in str(e), str(e)


@check
def _check_pool_exhausted(rank, world):
    """A pool at its cap: on the source the encode fails with MemoryError and
    the error frame, which cannot come from the pool either, is built in
    ordinary memory; on a receiver the frame lands in ordinary memory."""
    fb = _fb()
    b = fb.Broadcaster(_group(), timeout=30)
    payload = {"blob": b"p" * 300_000}
    old = fb.pool_stats()["limit"]
    for src in (0, 1):
        gc.collect()
        fb.shrink_pool()
        held = None
        try:
            if rank == src:
                held = fb.encode(b"h")                    # one busy block ...
                fb.set_pool_limit(fb.pool_stats()["bytes"])  # ... and no room for another
                e, _ = _expect(MemoryError, b.broadcast, payload, src=src)
                assert "pool" in str(e), str(e)
            else:
                e, _ = _expect(fb.BroadcastError, b.broadcast, None, src=src)
                assert "MemoryError" in str(e) and "pool" in str(e), str(e)
        finally:
            held = None
            fb.set_pool_limit(old)
        # The receiving side of a full pool.
        gc.collect()
        fb.shrink_pool()
        try:
            if rank != src:
                held = fb.encode(b"h")
                fb.set_pool_limit(fb.pool_stats()["bytes"])
            got = b.broadcast(payload if rank == src else None, src=src)
            assert got == payload
        finally:
            held = None
            fb.set_pool_limit(old)


@check
def _check_two_threads_one_broadcaster(rank, world):
    """One thread waits inside broadcast for a late source; a second thread
    calling the same Broadcaster (or the one-line function on the same
    group, which shares its cached Broadcaster) is refused at once."""
    fb = _fb()
    g = _group()
    b = fb.Broadcaster(g, timeout=60)
    # The ranks meet on the world group: a collective on g from a second
    # thread would interleave with the one waiting there.
    if rank == 0:
        dist.barrier()
        time.sleep(2.0)              # rank 1's first thread is waiting meanwhile
        assert b.broadcast({"late": True}, src=0) == {"late": True}
        fb.broadcast("one-line", group=g, src=0)
        dist.barrier()
        time.sleep(2.0)
        fb.broadcast("one-line again", group=g, src=0)
        return
    out = {}

    def waiter(fn):
        try:
            out["got"] = fn()
        except BaseException as e:  # reported below
            out["got"] = e

    t = threading.Thread(target=waiter, args=(lambda: b.broadcast(None, src=0),))
    t.start()
    dist.barrier()
    time.sleep(0.3)
    assert t.is_alive()
    e, took = _expect(RuntimeError, b.broadcast, None, src=0)
    assert "another thread" in str(e) and took < 0.1, (str(e), took)
    t.join(30)
    assert out["got"] == {"late": True}, out
    assert fb.broadcast(None, group=g, src=0) == "one-line"
    # the same through the one-line function from two threads
    t = threading.Thread(target=waiter, args=(lambda: fb.broadcast(None, group=g, src=0),))
    t.start()
    dist.barrier()
    time.sleep(0.3)
    e, took = _expect(RuntimeError, fb.broadcast, None, group=g, src=0)
    assert "another thread" in str(e) and took < 0.1, (str(e), took)
    t.join(30)
    assert out["got"] == "one-line again", out


def _mixed(i: int):
    """The i-th payload of the steady-state run: mostly small, some large."""
    if i % 500 == 499:
        return {"blob": bytes(3 << 20), "i": i}                           # 3 MiB: 2 collectives
    if i % 50 == 49:
        return {"ids": list(range(20_000)), "i": i}                       # ~40 KB int block
    if i % 10 == 9:
        return [{"rid": f"r{i}", "ids": list(range(i % 700)), "t": 0.5}] * 4
    return {"i": i, "s": "x" * (i % 97)}


STEADY_N = 10_000
STEADY_WARMUP = 5_000      # the first half: every size class, in many orders


@check
def _check_steady_state_10000_broadcasts(rank, world):
    """10,000 broadcasts of mixed sizes: after a warm-up that has seen every
    size class, the pool neither grows nor allocates and RSS stays flat. (The
    pool keeps a few blocks per size class: which idle block a request takes
    depends on the order of sizes, so the warm-up is long.)"""
    fb = _fb()
    g = _group(timeout=60)
    b = fb.Broadcaster(g)
    stats = {}
    started = time.monotonic()
    for i in range(STEADY_N):
        src = i % 2
        got = b.broadcast(_mixed(i) if rank == src else None, src=src)
        if rank != src:
            assert got["i"] == i if isinstance(got, dict) else got[0]["rid"] == f"r{i}"
        del got
        if i + 1 == STEADY_WARMUP:
            gc.collect()
            stats["warm"] = (fb.pool_stats(), _rss())
    gc.collect()
    stats["end"] = (fb.pool_stats(), _rss())
    (p0, rss0), (p1, rss1) = stats["warm"], stats["end"]
    # A leak shows as one block per call (5,000 here). A handful is not one:
    # gloo's worker thread may still hold the previous collective's tensor for
    # a moment after the call returned, so a block can look busy to the next
    # call now and then, and the pool adds one more of that size class.
    assert p1["allocations"] - p0["allocations"] <= 3, (p0, p1)
    assert p1["bytes"] <= p0["bytes"] + (8 << 20) and p1["bytes"] <= 32 << 20, (p0, p1)
    # Each Broadcaster keeps one receive buffer (those of earlier checks too).
    assert p1["busy_blocks"] <= p0["busy_blocks"] and p1["busy_bytes"] <= p0["busy_bytes"], (p0, p1)
    b.close()
    gc.collect()
    assert fb.pool_stats()["busy_blocks"] < p1["busy_blocks"] or p1["busy_blocks"] == 0, fb.pool_stats()
    assert rss1 - rss0 < 24 << 20, f"RSS grew by {(rss1 - rss0) >> 20} MiB over {STEADY_N - STEADY_WARMUP} calls"
    # shrink_pool frees every idle block.
    busy = fb.pool_stats()["busy_bytes"]
    freed = fb.shrink_pool()
    after = fb.pool_stats()
    assert freed == p1["bytes"] - busy and after["bytes"] == busy, (freed, after)
    return {"seconds": time.monotonic() - started, "rss_growth": rss1 - rss0, "pool": p1["bytes"]}


@check
def _check_destroyed_group(rank, world):
    """A group destroyed between two calls: RuntimeError saying so, on every
    rank, before anything is sent (not torch's later ValueError, not a crash)."""
    fb = _fb()
    g = _group()
    b = fb.Broadcaster(g)
    assert b.broadcast("before" if rank == 0 else None, src=0) == "before"
    assert fb.broadcast("before" if rank == 0 else None, group=g, src=0) == "before"
    dist.destroy_process_group(g)
    for call in (lambda: b.broadcast("after" if rank == 0 else None, src=0),
                 lambda: fb.broadcast("after" if rank == 0 else None, group=g, src=0),
                 lambda: fb.broadcast_pyobj(["after"] if rank == 0 else None, rank, g, 0),
                 lambda: fb.Broadcaster(g)):
        e, took = _expect(RuntimeError, call)
        assert "destroyed" in str(e) and took < 0.5, str(e)


@check
def _check_destroyed_world(rank, world):
    """The default group destroyed: the same, for a world Broadcaster and the
    one-line functions. (Runs last: it ends this run's process groups.)"""
    fb = _fb()
    b = fb.Broadcaster()
    assert b.broadcast("w" if rank == 1 else None, src=1) == "w"
    dist.barrier()
    dist.destroy_process_group()
    for call in (lambda: b.broadcast("after" if rank == 0 else None, src=0),
                 lambda: fb.broadcast("after" if rank == 0 else None, src=0),
                 lambda: fb.broadcast_pyobj(["after"], rank)):
        e, took = _expect(RuntimeError, call)
        assert "destroyed" in str(e) and took < 0.5, str(e)


def _collective_only():
    _bmod().DEFAULT_TRANSPORT = "collective"


def _run_checks(rank, world_size, outdir, names):
    _collective_only()
    return run_checks(rank, CHECKS, names, outdir)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("reliability"))
    saved = os.environ.get("FASTBCAST_MAX_BYTES")
    os.environ["FASTBCAST_MAX_BYTES"] = str(ENV_MAX_BYTES)   # the ranks inherit it
    error, results = None, None
    try:
        results = run_distributed(_run_checks, WORLD, outdir, list(CHECKS), timeout=240)
    except AssertionError as e:
        error = str(e)
    finally:
        if saved is None:
            os.environ.pop("FASTBCAST_MAX_BYTES", None)
        else:
            os.environ["FASTBCAST_MAX_BYTES"] = saved
    return outdir, error, results


def _expect_ok(run, name):
    outdir, error, _ = run
    expect_check_ok(outdir, WORLD, name, error)


def test_src_disagreement_two_sources_times_out(two_rank_run):
    _expect_ok(two_rank_run, "two_ranks_both_believe_they_are_the_source")


def test_src_disagreement_no_source_times_out(two_rank_run):
    _expect_ok(two_rank_run, "no_rank_believes_it_is_the_source")


def test_stalled_peer_times_out(two_rank_run):
    _expect_ok(two_rank_run, "stalled_peer")


def test_slow_encode_counts_against_the_timeout(two_rank_run):
    _expect_ok(two_rank_run, "slow_encode_counts_against_the_timeout")


def test_corrupt_frame_header_is_refused(two_rank_run):
    _expect_ok(two_rank_run, "corrupt_frame_header")


def test_encode_error_frame_with_timeout(two_rank_run):
    _expect_ok(two_rank_run, "source_fails_to_encode_under_timeout")


def test_payload_over_max_bytes_refused_on_every_rank(two_rank_run):
    _expect_ok(two_rank_run, "payload_over_max_bytes")


def test_pool_exhausted_on_source_or_receiver(two_rank_run):
    _expect_ok(two_rank_run, "pool_exhausted")


def test_two_threads_one_broadcaster_refused(two_rank_run):
    _expect_ok(two_rank_run, "two_threads_one_broadcaster")


def test_10000_mixed_broadcasts_keep_pool_and_rss_flat(two_rank_run):
    _expect_ok(two_rank_run, "steady_state_10000_broadcasts")


def test_destroyed_group_is_a_clear_error(two_rank_run):
    _expect_ok(two_rank_run, "destroyed_group")


def test_destroyed_world_is_a_clear_error(two_rank_run):
    _expect_ok(two_rank_run, "destroyed_world")


def test_every_check_has_a_test():
    import inspect

    text = "".join(inspect.getsource(f) for n, f in globals().items() if n.startswith("test_"))
    missing = [n for n in CHECKS if f'_expect_ok(two_rank_run, "{n}")' not in text]
    assert not missing, missing


# --------------------------------------------------------------------------
# A peer killed with SIGKILL mid-broadcast (processes that may die)
# --------------------------------------------------------------------------

KILL_WORLD = 4
KILL_TIMEOUT_S = 5.0


def _die_on_collective(n: int):
    """From now on, SIGKILL this process as it starts its n-th collective."""
    calls = [0]

    def dying():
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    hook_broadcasts(dying)


def _killed_peer(rank, world_size):
    """Global rank 1 is a source that dies after its first chunk; global rank
    2 is a receiver that dies after the first chunk; global rank 3 is a
    source that dies before it sends a small frame, which rank 0 waits for
    inside the one-call path (C++). Rank 0 survives all three: as a
    receiver without timeout= (gloo notices the closed connection, or the
    group's timeout fires), then as the source with timeout=."""
    fb = _fb()
    _collective_only()
    g01 = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=KILL_TIMEOUT_S))
    g02 = dist.new_group([0, 2], timeout=datetime.timedelta(seconds=KILL_TIMEOUT_S))
    g03 = dist.new_group([0, 3], timeout=datetime.timedelta(seconds=KILL_TIMEOUT_S))
    if rank == 3:
        time.sleep(0.5)   # rank 0 is waiting in the collective by now
        os.kill(os.getpid(), signal.SIGKILL)
    payload = b"k" * 50_000            # 13 collectives of 4 KiB
    out = {}
    if rank == 1:
        b = fb.Broadcaster(g01, first_chunk=4096, chunk=4096)
        _die_on_collective(2)
        b.broadcast(payload, src=1)
        raise AssertionError("rank 1 should have died")
    if rank == 2:
        b = fb.Broadcaster(g02, first_chunk=4096, chunk=4096)
        _die_on_collective(2)
        b.broadcast(None, src=0)
        raise AssertionError("rank 2 should have died")
    b = fb.Broadcaster(g01, first_chunk=4096, chunk=4096)
    e, took = _expect(fb.BroadcastError, b.broadcast, None, src=1)
    out["dead_source"] = (type(e).__name__, str(e), took)
    b = fb.Broadcaster(g02, first_chunk=4096, chunk=4096, timeout=KILL_TIMEOUT_S)
    e, took = _expect(fb.BroadcastError, b.broadcast, payload, src=0)
    out["dead_receiver"] = (type(e).__name__, str(e), took)
    e, _ = _expect(fb.BroadcastError, b.broadcast, payload, src=0)
    out["after"] = str(e)
    b = fb.Broadcaster(g03)
    e, took = _expect(fb.BroadcastError, b.broadcast, None, src=3)
    out["dead_small_source"] = (type(e).__name__, str(e), took, b._transport._channel is not None)
    return out


def test_peer_killed_mid_broadcast():
    started = time.monotonic()
    res = run_distributed_may_die(_killed_peer, KILL_WORLD, timeout=120)
    assert res[1] == ("died", -signal.SIGKILL), res[1]
    assert res[2] == ("died", -signal.SIGKILL), res[2]
    status, out = res[0]
    assert status == "ok", out
    kind, msg, took = out["dead_source"]
    # gloo sees the closed connection at once; the group's timeout would end it otherwise
    assert took < KILL_TIMEOUT_S + SLACK_S, out
    assert "global rank 0" in msg and "receiver of global rank 1" in msg and "collective 2 of 13" in msg, msg
    kind, msg, took = out["dead_receiver"]
    assert took < KILL_TIMEOUT_S + SLACK_S, out
    assert "source" in msg, msg
    assert "can no longer be used" in out["after"], out["after"]
    kind, msg, took, one_call = out["dead_small_source"]
    assert res[3] == ("died", -signal.SIGKILL), res[3]
    assert one_call and took < KILL_TIMEOUT_S + SLACK_S, out
    assert "receiver of global rank 3" in msg and "collective 1 (the first chunk)" in msg, msg
    assert time.monotonic() - started < 100
