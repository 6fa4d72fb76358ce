"""fastbcast.point_to_point_pyobj over shared memory, on gloo groups of CPU processes on this host.

Two ranks talk in both directions; each direction sets its ring up with its
own few messages (no call on the rest of the group). Covered: results equal
to pickle's for sizes from empty to longer than the ring, synchronous and
asynchronous; the fallback when one end cannot map shared memory (one
warning) or asks for the collective; a long run with RSS flat; a peer killed
with SIGKILL (the other end raises within a second); /dev/shm left clean.
SGLang's own PP call sites over the same path: test_integration_sglang_sites.py.
"""
from __future__ import annotations

import errno
import logging
import os
import pickle
import signal
import time
from types import SimpleNamespace

import pytest

from distributed import run_distributed, run_distributed_may_die

SLACK_S = 4.0          # scheduling slack on a loaded 2-core box


def _ours() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("fastbcast-")}


def _pair(group, src, dst):
    from fastbcast.p2p import _PAIRS
    p = _PAIRS[group][(src, dst)]
    return p.state, p.unlinked


def _payloads():
    return [
        [],
        [{"rid": "a", "ids": list(range(300)), "p": 0.5}, ("tuple", 1), None],
        [b"x" * (3 << 20)],               # several slots
        [bytes(range(256)) * (80 << 10)],  # 20 MiB: longer than the whole ring
        [{1, 2}, frozenset({"a"}), 2**70],
    ]


def _both_ways(rank, world):
    import torch.distributed as dist

    import fastbcast
    p2p = fastbcast.point_to_point_pyobj
    g = dist.new_group([0, 1], backend="gloo")
    out = {"got": [], "works": []}
    for async_send in (False, True):
        for src, dst in ((0, 1), (1, 0)):
            for data in _payloads():
                got = p2p(data if rank == src else [], rank, g, src, dst, async_send=async_send)
                if rank == src:
                    out["works"].append(len(got))
                    for w in got:
                        w.work.wait()
                else:
                    out["got"].append(pickle.dumps(got))
    out["states"] = {k: _pair(g, *k) for k in ((0, 1), (1, 0))}
    # The long run: a request list one way, an output the other, as PP stages do.
    rss = []
    for i in range(3000):
        reqs = [{"rid": f"r{i}", "ids": list(range(i % 200))}] if i % 3 else []
        got = p2p(reqs if rank == 0 else [], rank, g, 0, 1, async_send=True)
        if rank == 0:
            for w in got:
                w.work.wait()
        else:
            assert got == reqs, (i, got)
        outp = [{"next": i}]
        got = p2p(outp if rank == 1 else [], rank, g, 1, 0)
        assert rank == 1 or got == outp, (i, got)
        if i in (500, 2999):
            rss.append(int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    out["rss"] = rss
    out["pool"] = fastbcast.pool_stats()["busy_blocks"]
    out["shm"] = sorted(_ours())
    dist.barrier()
    return out


def test_p2p_shared_memory_both_ways():
    before = _ours()
    res = run_distributed(_both_ways, 2, timeout=300)
    want = [pickle.dumps(pickle.loads(pickle.dumps(d))) for d in _payloads()]
    for rank in (0, 1):
        out = res[rank]
        # rank 1 receives 0 -> 1 (sync, async); rank 0 receives 1 -> 0 (sync, async)
        assert [pickle.loads(g) for g in out["got"]] == [pickle.loads(w) for w in want] * 2, rank
        # The first message of a direction goes over the group (the offer rides
        # with it), the second carries SWITCH, then nothing more: the
        # synchronous sends return nothing, the asynchronous ones only the
        # payload longer than the ring.
        assert out["works"] == [0] * 5 + [0, 0, 0, 1, 0], (rank, out["works"])
        # Each end holds the same view of both directions: a ring, its name gone.
        assert out["states"] == {(0, 1): ("ring", rank == 0), (1, 0): ("ring", rank == 1)}, out["states"]
        assert out["rss"][1] - out["rss"][0] < 8 << 20, out["rss"]
        assert out["pool"] <= 4, out["pool"]
        assert not (set(out["shm"]) - before), out["shm"]
    assert _ours() <= before, f"left in /dev/shm: {_ours() - before}"


def _three_each_way(rank, group) -> dict:
    """Three messages each way; the state each direction ends in."""
    import fastbcast
    for i in range(3):
        for src, dst in ((0, 1), (1, 0)):
            got = fastbcast.point_to_point_pyobj([i, src] if rank == src else [], rank, group, src, dst)
            assert rank == src or got == [i, src], got
    return {k: _pair(group, *k)[0] for k in ((0, 1), (1, 0))}


def _fallbacks(rank, world):
    import torch.distributed as dist

    import sys

    import fastbcast
    import fastbcast.p2p as p2p_mod
    fbb = sys.modules["fastbcast.broadcast"]   # (the package's `broadcast` is the function)
    p2p = fastbcast.point_to_point_pyobj
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda r: warnings.append(r.getMessage())
    logging.getLogger("fastbcast").addHandler(handler)
    out = {}
    # Rank 1 cannot map shared memory (simulated: its probe fails with
    # ENOSPC): 0 -> 1 stays on send/recv, with one warning on each end;
    # 1 -> 0 needs only rank 1 to create (it can) and rank 0 to map (it
    # can), so it uses a ring.
    probe = p2p_mod.shm_probe
    if rank == 1:
        p2p_mod.shm_probe = lambda nbytes: errno.ENOSPC
    g = dist.new_group([0, 1], backend="gloo")
    out["unmappable"] = _three_each_way(rank, g)
    p2p_mod.shm_probe = probe
    # Rank 0 asks for the collective: no ring in either direction, and no warning.
    n_warned = len(warnings)
    if rank == 0:
        fbb.DEFAULT_TRANSPORT = "collective"
    g2 = dist.new_group([0, 1], backend="gloo")
    out["collective"] = _three_each_way(rank, g2)
    fbb.DEFAULT_TRANSPORT = "auto"
    # Rank 0 cannot make a ring (simulated: create fails with ENOSPC): it
    # never sends SWITCH, so 0 -> 1 stays on send/recv; one warning, on rank 0.
    real = p2p_mod._C
    if rank == 0:
        def full(*args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        p2p_mod._C = SimpleNamespace(ShmChannel=SimpleNamespace(create=full))
    g3 = dist.new_group([0, 1], backend="gloo")
    for i in range(3):
        got = p2p([i] if rank == 0 else [], rank, g3, 0, 1, async_send=True)
        if rank == 0:
            for w in got:
                w.work.wait()
        else:
            assert got == [i], got
    p2p_mod._C = real
    out["no_create"] = _pair(g3, 0, 1)[0]
    out["warnings"] = warnings[:n_warned]
    out["warnings_after"] = warnings[n_warned:]
    dist.barrier()
    return out


def test_p2p_fallbacks():
    before = _ours()
    res = run_distributed(_fallbacks, 2, timeout=120)
    for rank in (0, 1):
        assert res[rank]["unmappable"] == {(0, 1): "group", (1, 0): "ring"}, res[rank]
        assert res[rank]["collective"] == {(0, 1): "group", (1, 0): "group"}, res[rank]
        assert res[rank]["no_create"] == "group", res[rank]
    assert res[1]["warnings_after"] == [], res[1]
    warned = res[0]["warnings_after"]
    assert len(warned) == 1 and "global rank 0 cannot make the ring" in warned[0], warned
    for rank in (0, 1):   # one warning on each end, as the broadcast's fallback logs on every rank
        warned = res[rank]["warnings"]
        assert len(warned) == 1 and "0 -> 1" in warned[0] and os.strerror(errno.ENOSPC) in warned[0], warned
        assert "global rank 1" in warned[0], warned
    assert _ours() <= before, f"left in /dev/shm: {_ours() - before}"


def _killed(rank, world, victim):
    """Both directions on rings; then `victim` dies (SIGKILL). The survivor,
    sending to it or waiting for it, raises within a second."""
    import torch.distributed as dist

    import fastbcast
    p2p = fastbcast.point_to_point_pyobj
    for i in range(3):
        for src, dst in ((0, 1), (1, 0)):
            got = p2p([i] if rank == src else [], rank, None, src, dst)
            assert rank == src or got == [i], got
    assert _pair(dist.group.WORLD, 0, 1)[0] == "ring"
    dist.barrier()
    if rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.2)
    started = time.monotonic()
    try:
        if rank == 0:   # the source keeps sending to the dead receiver
            for i in range(100):
                p2p([i], rank, None, 0, 1, async_send=True)
        else:           # the receiver waits for the dead source
            p2p([], rank, None, 0, 1)
        raise AssertionError("the survivor did not notice")
    except fastbcast.BroadcastError as e:
        return {"error": str(e), "took": time.monotonic() - started}


@pytest.mark.parametrize("victim", [1, 0], ids=["receiver", "source"])
def test_p2p_killed_peer(victim):
    before = _ours()
    survivor = 1 - victim
    res = run_distributed_may_die(_killed, 2, victim, timeout=120)
    assert res[victim] == ("died", -signal.SIGKILL), res[victim]
    status, out = res[survivor]
    assert status == "ok", out
    assert f"global rank {victim}" in out["error"] and out["took"] < 1.0 + SLACK_S, out
    assert _ours() <= before, f"left in /dev/shm: {_ours() - before}"
