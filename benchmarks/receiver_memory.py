"""What a receiver holds for one large broadcast (BENCHMARKS.md section 5).

Each row is a fresh pair of processes (so the peak RSS belongs to that one
call): a warm-up call of a small object, then one broadcast of the payload.
On the receiver: the pool's capacity after the call (`fastbcast.pool_stats()`,
which includes the transport's kept receive buffer), the RSS it kept while
it still holds the object (/proc/self/statm) and its peak RSS growth
(`ru_maxrss`), both from just before the call.

    python benchmarks/receiver_memory.py --payload rollout_256x4k \
        --rows collective:0,collective:1048576,collective:1048576:262144,shm:0,shm:1048576

A row is transport:stream_bytes[:chunk].
"""
import argparse
import gc
import os
import resource
import socket

import torch.distributed as dist
import torch.multiprocessing as mp

MIB = 1 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(rank, port, payload, transport, stream_bytes, chunk, q):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    import fastbcast
    from fastbcast.bench.payloads import PAYLOADS

    obj = PAYLOADS[payload]() if rank == 0 else None
    b = fastbcast.Broadcaster(transport=transport, stream_bytes=stream_bytes, chunk=chunk)
    b.broadcast([1, 2] if rank == 0 else None, src=0)
    gc.collect()
    fastbcast.shrink_pool()
    pool0, rss0 = fastbcast.pool_stats()["bytes"], _rss()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    got = b.broadcast(obj, src=0)
    if rank == 1:
        q.put((fastbcast.pool_stats()["bytes"], fastbcast.pool_stats()["bytes"] - pool0, _rss() - rss0,
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - max(peak0, rss0), len(got)))
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--payload", default="rollout_256x4k")
    p.add_argument("--rows", default="collective:0,collective:1048576,shm:0,shm:1048576")
    a = p.parse_args()
    print("| transport | stream_bytes | chunk | pool after (growth) | RSS kept | peak RSS growth |")
    print("|---|---|---|---|---|---|")
    ctx = mp.get_context("spawn")
    for row in a.rows.split(","):
        parts = row.split(":")
        transport, stream_bytes = parts[0], int(parts[1])
        chunk = int(parts[2]) if len(parts) > 2 else None
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        q = ctx.SimpleQueue()
        mp.start_processes(worker, args=(port, a.payload, transport, stream_bytes, chunk, q), nprocs=2,
                           start_method="spawn")
        pool, grown, kept, peak, _ = q.get()
        print(f"| {transport} | {stream_bytes} | {chunk or 'default'} | {pool / MIB:.2f} MiB ({grown / MIB:.2f}) "
              f"| {kept / MIB:.0f} MiB | {peak / MIB:.0f} MiB |")


if __name__ == "__main__":
    main()
