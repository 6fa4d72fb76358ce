"""What each rank of ``python -m fastbcast.bench`` runs.

Every rank builds every payload itself (the factories are deterministic), so
each receiver can check what it got against its own copy.

Timing of one sample: all ranks leave a barrier on the gloo group, start a
clock, run the method, and (on CUDA) synchronize the device; each rank's
elapsed time is all-reduced with MAX over the gloo group, so a sample is the
time from the common barrier until the slowest rank holds the decoded object.
Freeing the received object happens after the clock stops.

A cell (payload x method) runs: a support probe (agreed by all ranks), one
checked call (received == source on every rank, else the cell is WRONG and has
no timings), up to ``warmup - 1`` more untimed calls, then samples until their
sum reaches ``seconds`` with at least ``min_reps`` samples, or ``max_reps``
samples. The stop rule reads only all-reduced numbers, so every rank takes the
same decision without extra messages.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import pickle
import statistics
import sys
import time
import traceback
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from . import baselines
from .common import fastbcast_api, has_cuda_tensors, register_structs, to_cpu
from .methods import Context, Row, Unsupported, make_call
from .payloads import PAYLOADS


@dataclasses.dataclass
class Config:
    backend: str
    world_size: int
    src: int
    payloads: List[str]
    rows: List[Row]
    seconds: float
    warmup: int
    min_reps: int
    max_reps: int
    out: str
    quick: bool
    plot: bool
    progress: str
    timeout_s: float
    argv: List[str]


def payload_bytes(obj: Any) -> Dict[str, Any]:
    """The payload's byte counts: fastbcast's encoding (the table's 'bytes') and pickle's."""
    host = to_cpu(obj) if has_cuda_tensors(obj) else obj
    pickled = len(pickle.dumps(host))
    fb, why = fastbcast_api("encode")
    if fb is not None:
        try:
            return {"bytes": int(fb.encode(host).numel()), "bytes_source": "fastbcast",
                    "pickled_bytes": pickled}
        except Exception as e:
            why = "fastbcast.encode failed: %s: %s" % (type(e).__name__, e)
    return {"bytes": pickled, "bytes_source": "pickle", "pickled_bytes": pickled,
            "bytes_note": why}


class _Timer:
    def __init__(self, ctx: Context, cuda: bool):
        self.ctx = ctx
        self.cuda = cuda
        self.buf = torch.zeros(1, dtype=torch.float64)

    def once(self, call):
        """One barrier-to-done call; returns (result, max seconds over ranks)."""
        dist.barrier(group=self.ctx.cpu_group)
        t0 = time.perf_counter()
        result = call()
        if self.cuda:
            torch.cuda.synchronize()
        self.buf[0] = time.perf_counter() - t0
        dist.all_reduce(self.buf, op=dist.ReduceOp.MAX, group=self.ctx.cpu_group)
        return result, float(self.buf[0])

    def agree(self, flag: bool) -> bool:
        """True only if every rank says True."""
        self.buf[0] = 1.0 if flag else 0.0
        dist.all_reduce(self.buf, op=dist.ReduceOp.MIN, group=self.ctx.cpu_group)
        return bool(self.buf[0] > 0.5)


def run_cell(cfg: Config, ctx: Context, row: Row, name: str, obj: Any, nbytes: int,
             has_cuda: bool) -> Dict[str, Any]:
    cell: Dict[str, Any] = {"payload": name, "method": row.method, "transport": row.transport,
                            "key": row.key, "status": "ok", "samples_ms": []}
    timer = _Timer(ctx, cuda=ctx.backend == "nccl")
    reason = ""
    try:
        call, check = make_call(row, ctx, name, obj, nbytes, has_cuda)
        supported = True
    except Unsupported as e:
        supported, reason = False, str(e)
    if not timer.agree(supported):
        cell["status"] = "n/a"
        cell["reason"] = reason or "not supported on another rank"
        return cell

    result, first = timer.once(call)
    ok = check(result)
    result = None
    cell["first_ms"] = first * 1e3
    if not timer.agree(ok):
        cell["status"] = "WRONG"
        cell["reason"] = "a receiver's object differs from the source's" if ok else \
            "rank %d received a different object" % ctx.rank
        return cell

    # Slow cells (first call over a quarter of the budget) skip further warm-up.
    for _ in range(cfg.warmup - 1 if first < cfg.seconds / 4 else 0):
        result, _t = timer.once(call)
        result = None
    samples: List[float] = []
    total = 0.0
    while True:
        result, t = timer.once(call)
        result = None
        samples.append(t * 1e3)
        total += t
        if len(samples) >= cfg.max_reps or (total >= cfg.seconds and len(samples) >= cfg.min_reps):
            break
    cell["samples_ms"] = samples
    cell["median_ms"] = statistics.median(samples)
    cell["min_ms"] = min(samples)
    return cell


def _setup(cfg: Config, rank: int, local_rank: int, store: Optional[Any]) -> Context:
    threads = max(1, (os.cpu_count() or 1) // max(1, cfg.world_size))
    torch.set_num_threads(threads)
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    kwargs = {"timeout": timeout}
    if store is not None:
        kwargs.update(store=store, rank=rank, world_size=cfg.world_size)
    else:
        kwargs["init_method"] = "env://"
    if cfg.backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device, **kwargs)
        cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", **kwargs)
        cpu_group = dist.group.WORLD
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(), src=cfg.src,
                   backend=cfg.backend, main_group=dist.group.WORLD, cpu_group=cpu_group,
                   device=device)


def worker(rank: int, local_rank: int, cfg: Config, store_port: Optional[int]) -> None:
    """Entry point of one rank. Rank 0 prints and writes the results."""
    try:
        store = None
        if store_port is not None:
            store = dist.TCPStore("127.0.0.1", store_port, None, False,
                                  timeout=datetime.timedelta(seconds=cfg.timeout_s))
        ctx = _setup(cfg, rank, local_rank, store)
        _run(cfg, ctx)
        dist.destroy_process_group()
    except BaseException:
        sys.stderr.write("[rank %d] failed:\n%s" % (rank, traceback.format_exc()))
        sys.stderr.flush()
        os._exit(1)  # don't let the peers wait on a collective we will never join


def _run(cfg: Config, ctx: Context) -> None:
    from . import report

    lead = ctx.rank == 0
    fb, _ = fastbcast_api()
    if fb is not None:
        register_structs(fb)
    bar = report.progress(len(cfg.payloads) * len(cfg.rows), cfg.progress) if lead else None
    record = report.new_record(cfg, ctx) if lead else None
    if lead:
        report.emit(report.run_header(cfg, ctx, record), bar)
    started = time.perf_counter()
    for name in cfg.payloads:
        if bar is not None:
            bar.set_description("%s: building" % name)
        obj = PAYLOADS[name]()
        sizes = payload_bytes(obj)
        has_cuda = has_cuda_tensors(obj)
        cells = []
        for row in cfg.rows:
            if bar is not None:
                bar.set_description("%s %s" % (name, row.key))
            cell = run_cell(cfg, ctx, row, name, obj, sizes["bytes"], has_cuda)
            cell.update(sizes)
            cells.append(cell)
            gc.collect()
            if bar is not None:
                bar.update(1)
        obj = None
        baselines.release_buffers()
        gc.collect()
        if ctx.backend == "nccl":
            torch.cuda.empty_cache()
        if lead:
            record["payloads"][name] = {**sizes, "cells": cells}
            report.emit(report.payload_table(name, sizes, cells), bar)
    if lead:
        if bar is not None:
            bar.close()
        record["wall_s"] = time.perf_counter() - started
        report.finish(cfg, record)
