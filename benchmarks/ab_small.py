"""Small payloads over the collective transport against the pickle design,
interleaved block by block in one run (issue 10: no payload slower than the
pickle design on the same transport, `[]` included).

Three designs: the pickle design, fastbcast's collective transport, and the
same with the one-call path off (`fastbcast.transport.ONE_CALL = False`:
the collective made from Python, as before 2026-12-04). Every rank runs blocks of
`--block` back-to-back calls of one design, then of the next, rotating; a block is timed on rank 0 from a barrier to a
barrier after its last call, so both designs pay the same two barriers and a
load spike hits both alike. Prints, per payload, the median block time per
call of each design and their ratio (pickle design / fastbcast: > 1 means
fastbcast is faster), with the spread over three equal thirds of the run.

    python benchmarks/ab_small.py --world-size 4 --payloads empty,tiny_1req --blocks 200
    python benchmarks/ab_small.py --backend nccl --world-size 2    # one GPU a rank

With `--backend nccl` the designs run on an NCCL group (the pickle design's
tensors on each rank's GPU, fastbcast staging through the device); the
one-call path is for CPU groups only, so its "off" column repeats the
fastbcast one there. The timing barriers use a gloo group in both cases.
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


def _run(rank, world, port, args):
    import fastbcast
    from fastbcast.bench.baselines import pickle_broadcast_pyobj
    from fastbcast.bench.payloads import payload_factory
    from fastbcast import transport

    device = None
    if args.backend == "nccl":
        import torch
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = dist.new_group(list(range(world)))
    bar = dist.new_group(list(range(world)), backend="gloo")
    for name in args.payloads.split(","):
        obj = payload_factory(name)()
        b = fastbcast.Broadcaster(g, transport="collective", allow_pickle=True, device=device)
        designs = {
            "pickle design": lambda: pickle_broadcast_pyobj(obj if rank == 0 else None, rank, g, 0, device),
            "fastbcast-collective": lambda: b.broadcast(obj if rank == 0 else None, src=0),
            "python path": lambda: b.broadcast(obj if rank == 0 else None, src=0),
        }
        times = {k: [] for k in designs}
        order = list(designs.items())
        for i in range(args.blocks + 5):
            for k, f in order[i % 3:] + order[:i % 3]:
                transport.ONE_CALL = k != "python path"
                dist.barrier(group=bar)
                t = time.perf_counter()
                for _ in range(args.block):
                    f()
                dist.barrier(group=bar)
                if i >= 5:
                    times[k].append((time.perf_counter() - t) / args.block * 1e6)
        if rank == 0:
            p, f, o = times["pickle design"], times["fastbcast-collective"], times["python path"]
            n = len(p) // 3
            thirds = [statistics.median(p[j * n:(j + 1) * n]) / statistics.median(f[j * n:(j + 1) * n])
                      for j in range(3)]
            print(f"{name:16s} {args.backend} world {world}: pickle design {statistics.median(p):8.1f} us/call, "
                  f"fastbcast-collective {statistics.median(f):8.1f} us/call, pickle / fastbcast = "
                  f"{statistics.median(p) / statistics.median(f):.2f}x (thirds: "
                  + ", ".join(f"{x:.2f}" for x in thirds) + f"); one-call path off {statistics.median(o):8.1f} us/call "
                  f"({statistics.median(p) / statistics.median(o):.2f}x)", flush=True)
        b.close()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    p.add_argument("--payloads", default="empty,tiny_1req")
    p.add_argument("--blocks", type=int, default=100, help="timed blocks per design")
    p.add_argument("--block", type=int, default=10, help="calls per block")
    args = p.parse_args()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    mp.spawn(_run, args=(args.world_size, port, args), nprocs=args.world_size)


if __name__ == "__main__":
    main()
