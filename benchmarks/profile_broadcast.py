"""Where the time of one fastbcast broadcast goes, phase by phase.

Runs the protocol of `fastbcast.Broadcaster` step by step with a device sync
after each step, so every phase is timed on its own: encode (source), H2D
copy (source, NCCL), the first collective, the rest of the collectives, D2H
copy (receivers, NCCL) and decode (receivers). Also times the whole
`Broadcaster.broadcast` call with the cyclic GC on and off, and the cost of
dropping the previous decoded object, which a caller pays too.

    python benchmarks/profile_broadcast.py --world-size 4 --backend nccl --payloads rollout_64x1k

Rank 0 prints one table per payload: median ms per phase, per rank role.
"""
import argparse
import gc
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sync(cuda):
    if cuda:
        torch.cuda.synchronize()


def _phases(b, obj, src, rank, cuda):
    """One broadcast, step by step; returns {phase: seconds} for this rank."""
    import fastbcast
    from fastbcast._loader import _C

    f, c = b.first_chunk, b.chunk
    out, t = {}, time.perf_counter()

    def mark(name):
        nonlocal t
        _sync(cuda)
        now = time.perf_counter()
        out[name] = now - t
        t = now

    if rank == src:
        block, used, _, _ = _C.encode_frame(obj, f, c, fastbcast.FORMAT_VERSION, collect_cuda=cuda, min_capacity=f)
        mark("encode")
        total = max(used, f)
        buf = block
        if cuda:
            buf = _stage(b, total)
            buf[:used].copy_(block[:used], non_blocking=True)
            mark("h2d")
        dist.broadcast(buf[:f], src=src)
        mark("first collective")
        for off in range(f, total, c):
            dist.broadcast(buf[off:min(off + c, total)], src=src)
        mark("rest collectives")
        return out
    host = _C.pool_acquire(max(_HINT.get(id(b), f), f))
    dev = _stage(b, max(_HINT.get(id(b), f), f)) if cuda else host
    dist.broadcast(dev[:f], src=src)
    mark("first collective")
    if cuda:
        host[:f].copy_(dev[:f], non_blocking=True)
        mark("d2h first")
    _, _, frame_len, payload_len, _, _, _, _ = _C.read_header(host, fastbcast.FORMAT_VERSION)
    total = max(frame_len, f)
    _HINT[id(b)] = total
    if host.numel() < total:
        host = _C.pool_acquire(total)
    if cuda and dev.numel() < total:
        dev = _stage(b, total)
    for off in range(f, total, c):
        dist.broadcast(dev[off:min(off + c, total)], src=src)
    mark("rest collectives")
    if cuda and total > f:
        host[f:total].copy_(dev[f:total], non_blocking=True)
        mark("d2h rest")
    result = _C.decode_frame(host, payload_len, None, False, None)
    mark("decode")
    t = time.perf_counter()
    del result
    out["drop result"] = time.perf_counter() - t
    return out


_HINT: dict = {}      # the last frame size each receiver saw
_STAGING: dict = {}   # a device buffer per Broadcaster, grown as needed (as the collective transport does)


def _stage(b, nbytes):
    buf = _STAGING.get(id(b))
    if buf is None or buf.numel() < nbytes:
        buf = _STAGING[id(b)] = torch.empty(1 << max(nbytes - 1, 1).bit_length(), dtype=torch.uint8, device=b.device)
    return buf


def worker(rank, world, port, backend, names, reps):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # as fastbcast.bench does
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    import fastbcast
    from fastbcast.bench.payloads import PAYLOADS

    cuda = backend == "nccl"
    b = fastbcast.Broadcaster()
    for name in names:
        obj = PAYLOADS[name]()
        for _ in range(3):
            b.broadcast(obj if rank == 0 else None, src=0)
        rows = {}
        for _ in range(reps):
            dist.barrier()
            for k, v in _phases(b, obj, 0, rank, cuda).items():
                rows.setdefault(k, []).append(v)
        for gc_on in (True, False):
            if not gc_on:
                gc.disable()
            samples = []
            for _ in range(reps):
                dist.barrier()
                _sync(cuda)
                t = time.perf_counter()
                r = b.broadcast(obj if rank == 0 else None, src=0)
                samples.append(time.perf_counter() - t)
                del r
            gc.enable()
            rows["whole call, gc " + ("on" if gc_on else "off")] = samples
        med = {k: statistics.median(v) * 1e3 for k, v in rows.items()}
        gathered = [None] * world
        dist.all_gather_object(gathered, med)
        if rank == 0:
            print(f"# {name} ({backend}, world {world}): median ms per phase")
            keys = list(dict.fromkeys(k for g in gathered for k in g))
            print(f"#  {'phase':<24}{'source':>10}{'receivers (max)':>18}")
            for k in keys:
                s = gathered[0].get(k)
                r = [g[k] for g in gathered[1:] if k in g]
                print(f"   {k:<24}{s if s is None else round(s, 3)!s:>10}{(round(max(r), 3) if r else '-')!s:>18}")
            sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--payloads", default="tiny_1req,sched_step_8req,rollout_64x1k,rollout_256x4k")
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    mp.spawn(worker, args=(a.world_size, port, a.backend, a.payloads.split(","), a.reps), nprocs=a.world_size)


if __name__ == "__main__":
    main()
