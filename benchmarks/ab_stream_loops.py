"""A collective stream's loops in Python (as on NCCL) or in C++ (a CPU
group's), A/B in one set of processes, interleaved rep by rep (issue 12).
Prints the receivers' median whole call per setting (rank 1), the codec
alone on rank 1, and call / max(encode, decode).

    python benchmarks/ab_stream_loops.py --payload rollout_64x1k --reps 30
"""
import argparse
import os
import socket
import statistics
import sys
import time

import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETTINGS = [  # (name, Python loops)
    ("Python loops", True),
    ("C++ loops", False),
]


def run(rank, world, port, payload, reps):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import fastbcast
    from fastbcast import transport
    from fastbcast.bench.payloads import PAYLOADS
    obj = PAYLOADS[payload]()
    b = fastbcast.Broadcaster(transport="collective", stream_bytes=256 << 10)
    b.broadcast([1, 2] if rank == 0 else None, src=0)
    times = {s[0]: [] for s in SETTINGS}
    for rep in range(reps + 3):
        for name, py in SETTINGS:
            transport.ONE_CALL = not py   # off: every collective is made from Python, the stream loops too
            dist.barrier()
            t0 = time.perf_counter()
            got = b.broadcast(obj if rank == 0 else None, src=0)
            dt = time.perf_counter() - t0
            if rank and rep == 0:
                assert got == obj, name
            del got
            if rep >= 3:
                times[name].append(dt * 1e3)
    if rank == 1:
        enc, dec = [], []
        for _ in range(reps):
            t0 = time.perf_counter(); blob = fastbcast.encode(obj); t1 = time.perf_counter()
            o = fastbcast.decode(blob); t2 = time.perf_counter(); del o
            enc.append((t1 - t0) * 1e3); dec.append((t2 - t1) * 1e3)
        e, d = statistics.median(enc), statistics.median(dec)
        print(f"# {payload}, gloo world {world}, {reps} interleaved reps; codec alone: encode {e:.2f} ms, "
              f"decode {d:.2f} ms")
        print(f"{'setting':>20} {'receiver ms':>12} {'ratio':>6}")
        for name, *_ in SETTINGS:
            m = statistics.median(times[name])
            print(f"{name:>20} {m:12.3f} {m / max(e, d):6.2f}", flush=True)
    dist.barrier()
    os._exit(0)   # not destroy_process_group: torch's gloo teardown can hang on a worker needing the GIL


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--payload", default="rollout_64x1k")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--world-size", type=int, default=2)
    a = p.parse_args()
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    mp.spawn(run, args=(a.world_size, port, a.payload, a.reps), nprocs=a.world_size)
