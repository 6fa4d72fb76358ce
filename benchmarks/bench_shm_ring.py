"""Shared-memory channel benchmark: one-slot latency and 100 MB throughput.

    python benchmarks/bench_shm_ring.py                       # everything below
    python benchmarks/bench_shm_ring.py --latency-only --spins 0,50,100,200
    python benchmarks/bench_shm_ring.py --throughput-only --readers 1,3,7

Latency: two processes ping-pong a one-slot message over two channels (A->B,
B->A); one-way latency = round trip / 2, median and p90 over --rounds. Run
once per FASTBCAST_SHM_SPIN_US value (a fresh pair of processes each, the knob
is read once per process). With spin 0 every wait sleeps in the futex, so
that row is the cost of a wake-up.

Throughput: the writer sends one --mb message through the ring to N readers,
each copying it out into a pool block; time from the start of send() to the
last reader's return, median over --reps. One row per ring geometry and
reader count, all in this run.

Each role runs in its own spawned interpreter; ranks and pids are passed in
directly (no torch.distributed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CTX = mp.get_context("spawn")
GEOMETRIES = [(4, (4 << 20) - 4096), (8, (2 << 20) - 4096), (16, (1 << 20) - 4096), (64, (256 << 10) - 4096)]


def _ping(conn, rounds, nbytes, first):
    import torch
    from fastbcast import _C

    cfg = conn.recv()
    me, peer = os.getpid(), cfg["peer"]
    ranks = [0, 1] if first else [1, 0]
    out = _C.ShmChannel.create(cfg["out"], ranks, [me, peer], 8, 1 << 16)
    inp = _C.ShmChannel.attach(cfg["in"], 0, ranks[::-1], [peer, me], 60)
    out.wait_attached(60)
    out.unlink()
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    times = []
    for i in range(rounds + 100):
        t0 = time.perf_counter()
        if first:
            out.send(buf, nbytes)
            inp.recv()
        else:
            inp.recv()
            out.send(buf, nbytes)
        times.append(time.perf_counter() - t0)
    inp.release()
    conn.send(times[100:])
    conn.recv()
    out.close()
    inp.close()


def latency(rounds, nbytes, spin_us):
    os.environ["FASTBCAST_SHM_SPIN_US"] = str(spin_us)
    pipes, procs = [], []
    for first in (True, False):
        a, b = CTX.Pipe()
        p = CTX.Process(target=_ping, args=(b, rounds, nbytes, first), daemon=True)
        p.start()
        pipes.append(a)
        procs.append(p)
    tag = f"fbbench-{os.getpid()}-{spin_us}-{nbytes}"
    pipes[0].send(dict(out=tag + "-ab", peer=procs[1].pid, **{"in": tag + "-ba"}))
    pipes[1].send(dict(out=tag + "-ba", peer=procs[0].pid, **{"in": tag + "-ab"}))
    rt = sorted(pipes[0].recv())
    pipes[1].recv()
    for c in pipes:
        c.send("done")
    for p in procs:
        p.join(30)
    one_way = [t / 2 * 1e6 for t in rt]
    return statistics.median(one_way), one_way[int(len(one_way) * 0.9)]


def _reader(conn, reps):
    from fastbcast import _C

    cfg = conn.recv()
    ch = _C.ShmChannel.attach(cfg["name"], cfg["reader"], cfg["ranks"], cfg["pids"], 60)
    for _ in range(reps):
        t = ch.recv()
        conn.send(time.monotonic())
        del t
    ch.close()


def throughput(n_readers, n_slots, slot_bytes, mb, reps):
    import torch
    from fastbcast import _C

    os.environ.pop("FASTBCAST_SHM_SPIN_US", None)
    pipes, procs = [], []
    for _ in range(n_readers):
        a, b = CTX.Pipe()
        p = CTX.Process(target=_reader, args=(b, reps + 1), daemon=True)
        p.start()
        pipes.append(a)
        procs.append(p)
    name = f"fbbench-{os.getpid()}-{n_readers}-{n_slots}"
    ranks = list(range(n_readers + 1))
    pids = [os.getpid()] + [p.pid for p in procs]
    w = _C.ShmChannel.create(name, ranks, pids, n_slots, slot_bytes)
    for i, c in enumerate(pipes):
        c.send(dict(name=name, reader=i, ranks=ranks, pids=pids))
    w.wait_attached(60)
    w.unlink()
    nbytes = mb * 1000 * 1000
    buf = torch.ones(nbytes, dtype=torch.uint8)
    secs = []
    for rep in range(reps + 1):
        t0 = time.monotonic()
        w.send(buf, nbytes)
        done = max(c.recv() for c in pipes)
        if rep:  # the first warms the readers' pool blocks
            secs.append(done - t0)
        time.sleep(0.05)
    for p in procs:
        p.join(30)
    w.close()
    return nbytes / statistics.median(secs) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20000)
    ap.add_argument("--spins", default="0,50,100,200")
    ap.add_argument("--sizes", default="64,2300")
    ap.add_argument("--readers", default="1,3,7")
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--latency-only", action="store_true")
    ap.add_argument("--throughput-only", action="store_true")
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {os.cpu_count()} CPUs  python {sys.version.split()[0]}")
    if not args.throughput_only:
        print("\n| message bytes | FASTBCAST_SHM_SPIN_US | one-way p50 (us) | p90 (us) |\n|---|---|---|---|")
        for size in (int(s) for s in args.sizes.split(",")):
            for spin in (int(s) for s in args.spins.split(",")):
                p50, p90 = latency(args.rounds, size, spin)
                print(f"| {size} | {spin} | {p50:.2f} | {p90:.2f} |", flush=True)
    if not args.latency_only:
        print(f"\n| ring | readers | {args.mb} MB throughput (GB/s, median of {args.reps}) |\n|---|---|---|")
        for n in (int(r) for r in args.readers.split(",")):
            for ns, sb in GEOMETRIES:
                gbs = throughput(n, ns, sb, args.mb, args.reps)
                print(f"| {ns} x {sb >> 10} KiB | {n} | {gbs:.2f} |", flush=True)


if __name__ == "__main__":
    main()
