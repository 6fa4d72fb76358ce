"""Where the time of one fastbcast broadcast goes, phase by phase.

Runs the protocol of `fastbcast.Broadcaster` step by step with a device sync
after each step, so every phase is timed on its own: encode (source), H2D
copy (source, NCCL), the first collective, the rest of the collectives, D2H
copy (receivers, NCCL) and decode (receivers). Also times the whole
`Broadcaster.broadcast` call with the cyclic GC on and off, and the cost of
dropping the previous decoded object, which a caller pays too.

Then the designs side by side, interleaved rep by rep so a load spike hits
all alike: the pickle design (SGLang's broadcast_pyobj), fastbcast without
streaming (`stream_bytes=0`, the protocol before streamed frames) and
fastbcast with it; each with its receivers' cost of dropping the result, and
the codecs alone (encode, decode, drop) on rank 0. The last lines per
payload are the streaming target: whole call / max(encode, decode), with
encode and decode from the phase profile above.

    python benchmarks/profile_broadcast.py --world-size 4 --backend nccl --payloads rollout_64x1k

Rank 0 prints the tables: median ms per phase, per rank role.
"""
import argparse
import gc
import os
import pickle
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
        bigger = _C.pool_acquire(total)
        bigger[:f].copy_(host[:f])
        host = bigger
        if not cuda:
            dev = host
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


def _table(title, rows, rank, world):
    """Prints (rank 0) median ms per key: the source's and the receivers' max."""
    med = {k: statistics.median(v) * 1e3 for k, v in rows.items()}
    gathered = [None] * world
    dist.all_gather_object(gathered, med)
    if rank == 0:
        print(f"# {title}")
        keys = list(dict.fromkeys(k for g in gathered for k in g))
        print(f"#  {'phase':<34}{'source':>10}{'receivers (max)':>18}")
        for k in keys:
            s = gathered[0].get(k)
            r = [g[k] for g in gathered[1:] if k in g]
            print(f"   {k:<34}{s if s is None else round(s, 3)!s:>10}{(round(max(r), 3) if r else '-')!s:>18}")
        sys.stdout.flush()
    return gathered


def _designs(obj, rank, reps, cuda, transport, stream_bytes):
    """Whole calls of each design, interleaved, and each receiver's cost of
    dropping what it got; then the codecs alone on every rank."""
    import fastbcast
    from fastbcast._loader import _C
    from fastbcast.bench.baselines import pickle_broadcast_pyobj

    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    off = fastbcast.Broadcaster(transport=transport, stream_bytes=0)
    ons = [fastbcast.Broadcaster(transport=transport, stream_bytes=sb) for sb in stream_bytes]
    designs = {"pickle design": lambda o: pickle_broadcast_pyobj(o, rank, src=0, device=device),
               "fastbcast stream off": lambda o: off.broadcast(o, src=0)}
    for on in ons:
        designs[_on(on.stream_bytes)] = lambda o, b=on: b.broadcast(o, src=0)
    rows: dict = {}
    for rep in range(reps + 2):
        for name, fn in designs.items():
            dist.barrier()
            _sync(cuda)
            t = time.perf_counter()
            r = fn(obj if rank == 0 else None)
            _sync(cuda)
            t1 = time.perf_counter()
            del r
            t2 = time.perf_counter()
            if rep >= 2:   # two warm-up rounds
                rows.setdefault(f"{name}: call", []).append(t1 - t)
                if rank != 0:
                    rows.setdefault(f"{name}: drop result", []).append(t2 - t1)
    f = off.first_chunk
    dist.barrier()
    for _ in range(reps if rank == 0 else 0):
        t = time.perf_counter()
        block, used, _, _ = _C.encode_frame(obj, f, off.chunk, fastbcast.FORMAT_VERSION, min_capacity=used_hint(obj))
        t1 = time.perf_counter()
        r = _C.decode_frame(block, used - _C.HEADER_BYTES, None, False, None)
        t2 = time.perf_counter()
        del r
        t3 = time.perf_counter()
        raw = pickle.dumps(obj)
        t4 = time.perf_counter()
        r = pickle.loads(raw)
        t5 = time.perf_counter()
        del r
        t6 = time.perf_counter()
        del block
        for k, v in (("fastbcast encode alone", t1 - t), ("fastbcast decode alone", t2 - t1),
                     ("fastbcast drop alone", t3 - t2), ("pickle dumps alone", t4 - t3),
                     ("pickle loads alone", t5 - t4), ("pickle drop alone", t6 - t5)):
            rows.setdefault(k, []).append(v)
    dist.barrier()
    for b in [off] + ons:
        b.close()
    return rows


def _on(stream_bytes: int) -> str:
    return f"fastbcast stream on ({stream_bytes >> 10} KiB)"


_USED: dict = {}


def used_hint(obj) -> int:
    """A block as big as obj's last encoding (a Broadcaster keeps that hint)."""
    if id(obj) not in _USED:
        from fastbcast._loader import _C
        _USED[id(obj)] = _C.encode(obj).numel() + _C.HEADER_BYTES
    return _USED[id(obj)]


def worker(rank, world, port, backend, names, reps, transport="collective", stream_bytes=(1 << 20,)):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # as fastbcast.bench does
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    import fastbcast
    from fastbcast.bench.payloads import PAYLOADS

    cuda = backend == "nccl"
    b = fastbcast.Broadcaster(transport=transport)
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
        phases = _table(f"{name} ({backend}, world {world}, transport {b.transport}): median ms per phase", rows,
                        rank, world)
        rows = _designs(obj, rank, reps, cuda, transport, stream_bytes)
        med = _table(f"{name}: the designs, {reps} interleaved reps, median ms (codecs alone: rank 0, the others "
                     f"idle)", rows, rank, world)
        if rank == 0:
            enc = phases[0]["encode"]
            dec = max(m["decode"] for m in phases[1:])
            for d in ["fastbcast stream off"] + [_on(sb) for sb in stream_bytes]:
                call = max(m[f"{d}: call"] for m in med)
                pk = max(m["pickle design: call"] for m in med)
                print(f"   {d}: call / max(encode {enc:.2f}, decode {dec:.2f}) = {call / max(enc, dec):.2f}; "
                      f"pickle design / this = {pk / call:.2f}x")
            sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--payloads", default="tiny_1req,sched_step_8req,rollout_64x1k,rollout_256x4k")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--transport", default="collective", choices=["auto", "shm", "collective"])
    p.add_argument("--stream-bytes", default="1048576",
                   help="comma-separated Broadcaster(stream_bytes=) values, one 'stream on' row each")
    a = p.parse_args()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    mp.spawn(worker, args=(a.world_size, port, a.backend, a.payloads.split(","), a.reps, a.transport,
                           [int(x) for x in a.stream_bytes.split(",")]),
             nprocs=a.world_size)


if __name__ == "__main__":
    main()
