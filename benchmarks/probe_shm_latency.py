"""Where the time of a small shared-memory broadcast goes, per rank.

Runs `broadcast_pyobj(payload, ...)` in a world of W CPU processes (one gloo
group, every rank on this host) with no collective between samples: before
each sample every receiver writes the sample number into a shared file and
enters the call; the source waits for all of them (plus --gap-us), reads
CLOCK_MONOTONIC and calls; every rank writes the clock when its call returns
into the same file. Prints, per rank, the median and p90 of (its return -
the source's start), and the median of the slowest rank per sample: the
number `python -m fastbcast.bench` reports as a sample, without its
per-sample all_reduce.

    python benchmarks/probe_shm_latency.py --world 8 --payload '[]' --samples 20000
    FASTBCAST_SHM_SPIN_US=1000 python benchmarks/probe_shm_latency.py --world 8

--method pickle runs SGLang's pickle design instead (fastbcast.bench.baselines).
"""
import argparse
import mmap
import os
import socket
import statistics
import tempfile
import time

import torch.distributed as dist
import torch.multiprocessing as mp

LINE = 8  # int64 slots per cache line


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, path, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import fastbcast
    from fastbcast.bench import baselines
    payload = eval(args.payload)
    if args.method == "fastbcast":
        def call(obj):
            return fastbcast.broadcast_pyobj(obj, rank, None, src=0)
    else:
        def call(obj):
            return baselines.pickle_broadcast_pyobj(obj, rank, None, src=0)
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
    v = memoryview(mm).cast("q")
    post = lambda r: (r + 1) * LINE            # sample number rank r has reached
    out = lambda r: (world + 1 + r) * LINE     # rank r's return stamp
    clock = time.perf_counter_ns
    n = args.samples + args.warmup
    starts, ends = [], []
    dist.barrier()
    for i in range(1, n + 1):
        if rank == 0:
            for r in range(1, world):
                while v[post(r)] < i:
                    pass
            if args.gap_us:
                until = clock() + args.gap_us * 1000
                while clock() < until:
                    pass
            t0 = clock()
            v[0] = t0
            call(payload)
            v[out(0)] = clock()
            # the next sample starts once every receiver returned
            for r in range(1, world):
                while v[out(r)] < t0:
                    pass
            if i > args.warmup:
                starts.append(t0)
                ends.append([v[out(r)] for r in range(world)])
        else:
            v[post(rank)] = i
            call(None)
            v[out(rank)] = clock()
    if args.idle_s:
        # One more call after an idle stretch: the CPU each process used
        # (all its threads) while its receivers waited with no message.
        dist.barrier()
        cpu0, wall0 = time.process_time(), time.monotonic()
        if rank == 0:
            time.sleep(args.idle_s)
        call(payload if rank == 0 else None)
        used = (time.process_time() - cpu0) / (time.monotonic() - wall0)
        shares = [None] * world
        dist.all_gather_object(shares, used)
        if rank == 0:
            print(f"idle {args.idle_s:g} s, world {world}: CPU of each rank's process while waiting: "
                  + ", ".join(f"rank {r} {100 * u:.2f} %" for r, u in enumerate(shares)), flush=True)
    if rank == 0:
        lat = [[(e[r] - s) / 1000 for r in range(world)] for s, e in zip(starts, ends)]
        worst = sorted(max(row[1:]) for row in lat)
        q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]
        print(f"{args.method} payload={args.payload} world={world} gap_us={args.gap_us} "
              f"spin_us={os.environ.get('FASTBCAST_SHM_SPIN_US', 'default')} samples={len(lat)}")
        for r in range(world):
            col = sorted(row[r] for row in lat)
            print(f"  rank {r}: p50 {q(col, .5):8.1f} us  p90 {q(col, .9):8.1f} us")
        print(f"  slowest receiver per sample: p50 {q(worst, .5):.1f} us  p90 {q(worst, .9):.1f} us", flush=True)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--payload", default="[]", help="a Python expression (default '[]')")
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--gap-us", type=float, default=0.0, help="source waits this long after every receiver is in")
    p.add_argument("--idle-s", type=float, default=0.0,
                   help="then one call after the source idles this long: each rank's CPU use while it waited")
    p.add_argument("--method", choices=("fastbcast", "pickle"), default="fastbcast")
    args = p.parse_args()
    fd, path = tempfile.mkstemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        os.ftruncate(fd, (2 * args.world + 2) * LINE * 8)
        os.close(fd)
        mp.spawn(_worker, args=(args.world, _free_port(), path, args), nprocs=args.world)
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
