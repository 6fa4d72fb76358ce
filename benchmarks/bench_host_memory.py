"""How fast the CPU reads and writes the pool's pinned memory, against
ordinary memory, and what that does to encode and decode, for each pool
mode (FASTBCAST_PINNED=1: torch's pinned allocator; register: huge-page
memory locked with cudaHostRegister; 0: pageable).

On some virtual machines page-locked host memory is much slower for the CPU
than ordinary memory; fastbcast encodes into and decodes out of its pool, so
this decides whether the pool should be pinned (FASTBCAST_PINNED).

    python benchmarks/bench_host_memory.py [--payloads rollout_64x1k,rollout_256x4k]
"""
import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def best(f, n=7):
    t = []
    for _ in range(n):
        s = time.perf_counter()
        r = f()
        t.append(time.perf_counter() - s)
        del r
    return min(t) * 1e3


def child(payloads):
    import torch

    import fastbcast
    from fastbcast.bench.payloads import PAYLOADS

    stats = fastbcast.pool_stats()
    pinned = stats["mode"]
    n = 64 << 20
    if torch.cuda.is_available():
        a = fastbcast._C.pool_acquire(n)
        b = fastbcast._C.pool_acquire(n + 1)
        a.fill_(1)
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        h2d = best(lambda: (dev.copy_(a, non_blocking=True), torch.cuda.synchronize()))
        print(f"pinned={pinned}: H2D 64 MiB {h2d:.2f} ms ({n / h2d / 1e6:.1f} GB/s)")
        ms = best(lambda: b.copy_(a))
        print(f"pinned={pinned}: host memcpy 64 MiB {ms:.2f} ms ({n / ms / 1e6:.1f} GB/s)")
    for name in payloads:
        obj = PAYLOADS[name]()
        enc = best(lambda: fastbcast.encode(obj))
        buf = fastbcast.encode(obj)
        dec = best(lambda: fastbcast.decode(buf))
        plain = bytes(buf.numpy())
        dec_bytes = best(lambda: fastbcast.decode(plain))
        print(f"pinned={pinned}: {name}: encode {enc:.2f} ms, decode from pool {dec:.2f} ms, "
              f"decode from bytes {dec_bytes:.2f} ms")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--payloads", default="rollout_64x1k,rollout_256x4k")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.payloads.split(","))
        return
    for pinned in ("1", "register", "0"):
        subprocess.run([sys.executable, __file__, "--child", "--payloads", a.payloads], check=True,
                       env={**os.environ, "FASTBCAST_PINNED": pinned})


if __name__ == "__main__":
    main()
