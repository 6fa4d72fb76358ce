"""A timeline of one streamed broadcast over the collective transport.

Wraps the stream's Python steps (encode of each message, each collective
posted and waited for, each segment decoded) with timestamps on every rank,
then prints one merged timeline (ms from the source's call start; the ranks
share CLOCK_MONOTONIC on one host) for the last of `--reps` calls, and the
median whole call. What it answers: which message a receiver waits for, and
for how long, while the source encodes.

    python benchmarks/trace_stream.py --payload rollout_64x1k --world-size 2 --stream-bytes 262144
"""
import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EVENTS: list = []


def mark(what):
    EVENTS.append((time.perf_counter(), what))


def timed(fn, what):
    def run(*a, **k):
        mark(f"{what} >")
        try:
            return fn(*a, **k)
        finally:
            mark(f"{what} <")
    return run


class _Decoder:
    def __init__(self, dec):
        self.dec = dec

    def segment(self, buf):
        out = self.dec.segment(buf)
        mark(f"segment header: {out[0]} B")
        return out

    def decode(self, buf, device_buffer):
        return timed(self.dec.decode, "decode")(buf, device_buffer)

    def __getattr__(self, name):
        return getattr(self.dec, name)


class _Encoder:
    def __init__(self, enc):
        self.enc = enc

    def next(self):
        out = timed(self.enc.next, "encode next")()
        mark(f"encoded {out[1]} B{' (last)' if out[4] else ''}")
        return out

    def __getattr__(self, name):
        return getattr(self.enc, name)


class _CProxy:
    def __init__(self, c):
        self.c = c

    def StreamDecoder(self, *a):
        return _Decoder(self.c.StreamDecoder(*a))

    def __getattr__(self, name):
        return getattr(self.c, name)


def instrument():
    import importlib
    from fastbcast import stream, transport
    broadcast = importlib.import_module("fastbcast.broadcast")

    def post(fn):
        def run(tensor, *a, **k):
            mark(f"post {tensor.numel()} B")
            return fn(tensor, *a, **k)
        return run
    for m in (stream, transport):
        m.post_bcast = post(m.post_bcast)
        m.wait = timed(m.wait, "wait")
    stream._C = _CProxy(stream._C)
    send_rest = stream.send_rest
    stream.send_rest = lambda b, enc, *a: send_rest(b, _Encoder(enc), *a)
    broadcast.streaming = stream
    B = broadcast.Broadcaster
    B._send = timed(B._send, "source _send")
    B._recv = timed(B._recv, "receiver _recv")


def worker(rank, world, port, payload, reps, stream_bytes):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    import fastbcast
    from fastbcast.bench.payloads import PAYLOADS
    instrument()
    obj = PAYLOADS[payload]() if rank == 0 else None
    b = fastbcast.Broadcaster(transport="collective", stream_bytes=stream_bytes)
    calls = []
    for _ in range(reps):
        dist.barrier()
        EVENTS.clear()
        t0 = time.perf_counter()
        mark("call")
        r = b.broadcast(obj, src=0)
        mark("returned")
        calls.append(time.perf_counter() - t0)
        del r
    events = [None] * world
    dist.all_gather_object(events, EVENTS)
    med = [None] * world
    dist.all_gather_object(med, statistics.median(calls) * 1e3)
    if rank == 0:
        start = events[0][0][0]
        rows = sorted((t, r, w) for r, ev in enumerate(events) for t, w in ev)
        print(f"# {payload}, world {world}, stream_bytes {stream_bytes}: median call ms per rank "
              f"{[round(m, 3) for m in med]}; timeline of the last call (ms from the source's call)")
        for t, r, w in rows:
            print(f"{(t - start) * 1e3:9.3f}  rank {r}  {'' if r == 0 else ' ' * 40}{w}")
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--payload", default="rollout_64x1k")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--stream-bytes", type=int, default=256 << 10)
    a = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(a.world_size, port, a.payload, a.reps, a.stream_bytes), nprocs=a.world_size)


if __name__ == "__main__":
    main()
