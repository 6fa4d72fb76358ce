"""point_to_point_pyobj between two ranks of a gloo group: shared memory
against the group's send/recv, side by side in one run.

Two processes on this host ping-pong a per-step message (a request list one
way, an output dict back), as SGLang's pipeline stages do, on two groups of
the same two ranks: one where the pair moved to its shared-memory rings and
one with FASTBCAST_TRANSPORT=collective behaviour (send/recv). The rounds
alternate between the two groups so that machine noise hits both alike.

    python benchmarks/bench_p2p.py [--rounds 2000] [--reqs 4]

Prints the median round trip per transport and their ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def _rank(rank, world, rounds, n_reqs):
    import torch.distributed as dist

    import fastbcast
    fbb = sys.modules["fastbcast.broadcast"]
    p2p = fastbcast.point_to_point_pyobj
    shm = dist.new_group([0, 1], backend="gloo")
    fbb.DEFAULT_TRANSPORT = "collective"
    plain = dist.new_group([0, 1], backend="gloo")
    reqs = [{"rid": f"r{i}", "input_ids": list(range(300)), "sampling": {"temperature": 0.7}} for i in range(n_reqs)]
    out = {"next_token_ids": list(range(n_reqs)), "finished": [False] * n_reqs}

    def round_trip(g, transport):
        fbb.DEFAULT_TRANSPORT = transport
        t0 = time.perf_counter()
        got = p2p(reqs if rank == 0 else [], rank, g, 0, 1)
        got = p2p([out] if rank == 1 else [], rank, g, 1, 0)
        return time.perf_counter() - t0, got

    for g, tr in ((shm, "auto"), (plain, "collective")):
        for _ in range(50):   # set-up and warm-up
            round_trip(g, tr)
    times = {"shm": [], "send/recv": []}
    for _ in range(rounds):
        times["shm"].append(round_trip(shm, "auto")[0])
        times["send/recv"].append(round_trip(plain, "collective")[0])
    from fastbcast.p2p import _PAIRS
    states = {k: p.state for k, p in _PAIRS[shm].items()}
    return {k: statistics.median(v) for k, v in times.items()} | {"states": states}


def main():
    from distributed import run_distributed

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--reqs", type=int, default=4)
    a = ap.parse_args()
    res = run_distributed(_rank, 2, a.rounds, a.reqs, timeout=900)[0]
    assert set(res["states"].values()) == {"ring"}, res["states"]
    shm, plain = res["shm"], res["send/recv"]
    print(f"round trip, {a.reqs} requests one way and an output back, median of {a.rounds}:")
    print(f"  shared memory {shm * 1e6:8.1f} us")
    print(f"  send/recv     {plain * 1e6:8.1f} us")
    print(f"  ratio         {plain / shm:8.2f}x")


if __name__ == "__main__":
    main()
