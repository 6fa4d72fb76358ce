"""fastbcast.point_to_point_pyobj: SGLang's signature and results, the codec on the wire.

A 3-rank gloo run per transport (rank 1 is neither end, as the other ranks
of SGLang's pipeline group are); the oracle is what pickle gives back, which is what
SGLang's own function returns. SGLang's own function next to this one, called
from its scheduler, is in test_integration_sglang_sites.py.
"""
from __future__ import annotations

import os
import pickle

import pytest

from distributed import run_distributed


def _ours() -> set:
    return {n for n in os.listdir("/dev/shm") if n.startswith("fastbcast-")}


def _payloads():
    import torch

    return [
        [{"rid": "a", "ids": list(range(300)), "p": 0.5}, ("tuple", 1), None],
        [b"x" * 200_000],                                   # bigger than any first chunk
        [torch.arange(10, dtype=torch.int64), {"k": (1, 2.5, "s")}],
        [{1, 2, 3}, frozenset({"a"}), 2**70],
        ("a tuple", "stays a tuple"),
    ]


def _p2p_rank(rank: int, world_size: int, transport: str) -> dict:
    import fractions
    import sys

    import torch
    import torch.distributed as dist

    import fastbcast
    from fastbcast.p2p import _PAIRS, P2PWork

    sys.modules["fastbcast.broadcast"].DEFAULT_TRANSPORT = transport   # as FASTBCAST_TRANSPORT does
    group = dist.new_group([0, 1, 2], backend="gloo")
    res = {"got": [], "errors": {}}
    p2p = fastbcast.point_to_point_pyobj
    for data in _payloads():
        got = p2p(data if rank == 0 else [], rank, group, src=0, dst=2)
        res["got"].append(pickle.dumps(got))
    # async: the works are waited on by the caller, as SGLang's scheduler does
    works = p2p([{"async": True}], rank, group, src=2, dst=0, async_send=True) if rank != 0 else None
    if rank == 0:
        res["async_got"] = p2p([], rank, group, src=2, dst=0)
    else:
        for w in works:
            w.work.wait()
        res["async_works"] = [(type(w) is P2PWork, isinstance(w.payload, torch.Tensor)) for w in works]
    res["empty"] = p2p([], rank, group, src=0, dst=2)
    res["sync_return"] = p2p([1], rank, group, src=0, dst=2) if rank != 2 else p2p([], rank, group, 0, 2)
    # strict: the source raises, the receiver learns why instead of waiting forever
    try:
        p2p([fractions.Fraction(1, 3)] if rank == 0 else [], rank, group, src=0, dst=2, allow_pickle=False)
        res["errors"]["strict"] = None
    except Exception as e:  # noqa: BLE001
        res["errors"]["strict"] = (type(e).__name__, str(e))
    # lenient (the default): the same object travels as a pickle
    res["lenient"] = p2p([fractions.Fraction(1, 3)] if rank == 0 else [], rank, group, src=0, dst=2)
    # the rank trap: a rank that is not this process's
    try:
        p2p([1], 0, group, src=0, dst=2) if rank == 1 else None
    except ValueError as e:
        res["errors"]["trap"] = str(e)
    res["states"] = {k: p.state for k, p in _PAIRS.get(group, {}).items()}
    dist.barrier()
    return res


@pytest.mark.parametrize("transport", ["auto", "collective"])
def test_point_to_point_pyobj_gloo(transport):
    import fractions

    before = _ours()
    results = run_distributed(_p2p_rank, 3, transport, timeout=120)
    assert _ours() <= before, f"left in /dev/shm: {_ours() - before}"   # 2 -> 0 never made its ring
    # On one host a direction moves to shared memory from its second message
    # on (test_p2p_shm.py covers that path): 0 -> 2 did, 2 -> 0 sent one
    # message only. "collective" keeps send/recv.
    ring = "ring" if transport == "auto" else "group"
    assert results[0]["states"] == {(0, 2): ring, (2, 0): "group"}, results[0]["states"]
    assert results[1]["states"] == {}, results[1]["states"]
    want = [pickle.loads(pickle.dumps(d)) for d in _payloads()]
    dst = results[2]
    for data, got in zip(want, dst["got"]):
        got = pickle.loads(got)
        assert type(got) is type(data)
        if isinstance(data[0], __import__("torch").Tensor):
            assert got[0].equal(data[0]) and got[1] == data[1]
        else:
            assert got == data
    for rank in (0, 1):   # the source gets [] (no works when synchronous); others do nothing
        assert [pickle.loads(g) for g in results[rank]["got"]] == [[]] * len(want)
    assert results[0]["async_got"] == [{"async": True}]
    assert results[2]["async_works"] == [(True, True), (True, True)]
    assert results[1]["async_works"] == []
    assert all(r["empty"] == [] for r in results)
    assert [r["sync_return"] for r in results] == [[], [], [1]]
    kind, msg = results[0]["errors"]["strict"]
    assert kind == "TypeError" and "Fraction" in msg
    kind, msg = results[2]["errors"]["strict"]
    assert kind == "BroadcastError" and "Fraction" in msg and "rank 0" in msg
    assert results[1]["errors"]["strict"] is None
    assert results[2]["lenient"] == [fractions.Fraction(1, 3)]
    assert "rank=0 is not this process's global rank" in results[1]["errors"]["trap"]
