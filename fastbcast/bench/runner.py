"""What each rank of ``python -m fastbcast.bench`` runs.

Every rank builds every payload itself (the factories are deterministic), so
each receiver can check what it got against its own copy.

What a sample measures: the time from the moment the source starts the call,
object in hand, until the slowest rank holds the decoded object (on CUDA,
after a device synchronize). Two clocks can do that:

``stamps`` (the default when every rank runs on this host): no collective
inside the timed region. CLOCK_MONOTONIC (``time.perf_counter_ns`` on Linux)
is one clock for every process of a host, so each rank reads it when it
starts and when it finishes, and sample = max over ranks of finish - the
source's start. Before each sample every receiver writes the sample's number
into its own cache line of a small shared file, then enters the call; the
source waits until all have written it (plus ``--gap-us``), then starts. So
receivers are already waiting when the source begins, as in a step loop
where every rank reaches the broadcast together, and no rank's lateness or
a barrier's exit skew is counted. ``--gap-us`` makes receivers wait longer
(e.g. long enough to fall asleep) before the source starts. After the call
each rank drops its result and writes its stamps into the same file, and
reads everyone's once all are there (``--exchange board``, the default), so
consecutive samples are back-to-back calls with no collective between them,
like SGLang's idle steps. ``--exchange allreduce`` exchanges the stamps with
one gloo all_reduce instead (outside the timed region, but every sample then
follows a gloo collective; that costs small payloads tens of microseconds at
worlds 4 and 8, see BENCHMARKS.md).

``barrier`` (ranks on several hosts, or ``--timing barrier``): all ranks
leave a gloo barrier, each times its own call, and a MAX all_reduce gives the
sample. A barrier's exit skew (tens of microseconds on gloo) is inside such a
sample, so it is only good for payloads that take milliseconds.

A cell (payload x method) runs: a support probe (agreed by all ranks), one
checked call (received == source on every rank, else the cell is WRONG and has
no timings), up to ``warmup - 1`` more untimed calls, then samples until their
sum reaches ``seconds`` with at least ``min_reps`` samples, or ``max_reps``
samples. The stop rule reads only all-reduced numbers, so every rank takes the
same decision without extra messages.

The ``codec`` cell is run by the source alone: ``fastbcast.encode`` then
``fastbcast.decode`` of the bytes, timed separately, samples = their sum;
other ranks wait in a barrier. Its numbers travel to rank 0 for the table.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import mmap
import os
import pickle
import secrets
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from . import baselines
from .common import fastbcast_api, has_cuda_tensors, register_structs, to_cpu
from .methods import Context, Row, Unsupported, make_call
from .payloads import CLASS_PAYLOAD_TRUSTED, CLASS_PAYLOADS, class_payload_unavailable, payload_factory


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
    timing: str = "auto"  # "auto", "stamps" or "barrier"
    gap_us: float = 0.0
    exchange: str = "board"  # stamps clock: how the stamps travel ("board" or "allreduce")


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
    """The barrier clock (see the module docstring); also the cells' agreement helper."""

    name = "barrier"

    def __init__(self, ctx: Context, cuda: bool):
        self.ctx = ctx
        self.cuda = cuda
        self.buf = torch.zeros(1, dtype=torch.float64)

    def once(self, call, keep: bool = False):
        """One call; returns (result if keep else None, seconds)."""
        dist.barrier(group=self.ctx.cpu_group)
        t0 = time.perf_counter()
        result = call()
        if self.cuda:
            torch.cuda.synchronize()
        self.buf[0] = time.perf_counter() - t0
        if not keep:
            result = None
        dist.all_reduce(self.buf, op=dist.ReduceOp.MAX, group=self.ctx.cpu_group)
        return result, float(self.buf[0])

    def agree(self, flag: bool) -> bool:
        """True only if every rank says True."""
        self.buf[0] = 1.0 if flag else 0.0
        dist.all_reduce(self.buf, op=dist.ReduceOp.MIN, group=self.ctx.cpu_group)
        return bool(self.buf[0] > 0.5)


_LINE = 64  # one cache line per rank in the shared file


class _StampTimer(_Timer):
    """The stamps clock (see the module docstring)."""

    name = "stamps"

    def __init__(self, ctx: Context, cuda: bool, board: "_Board", gap_us: float, timeout_s: float,
                 exchange: str = "board"):
        super().__init__(ctx, cuda)
        self.board = board
        self.exchange = exchange
        if exchange != "board":
            self.name = "stamps-allreduce"
        self.gap_ns = int(gap_us * 1000)
        self.timeout_ns = int(timeout_s * 1e9)
        self.stamps = torch.zeros(2 * ctx.world_size, dtype=torch.int64)

    def once(self, call, keep: bool = False):
        ctx, board = self.ctx, self.board
        board.seq += 1
        seq = board.seq
        clock = time.perf_counter_ns
        if ctx.rank == ctx.src:
            board.wait_all(seq, ctx.src, self.timeout_ns)
            if self.gap_ns:
                until = clock() + self.gap_ns
                if self.gap_ns > 500_000:  # sleep through most of a long gap, spin the rest
                    time.sleep((self.gap_ns - 200_000) / 1e9)
                while clock() < until:
                    pass
        else:
            board.post(ctx.rank, seq)
        t_in = clock()
        result = call()
        if self.cuda:
            torch.cuda.synchronize()
        t_out = clock()
        if not keep:
            result = None
        if self.exchange == "board":
            ins, outs = board.exchange(ctx.rank, seq, t_in, t_out, self.timeout_ns)
            return result, (max(outs) - ins[ctx.src]) / 1e9
        st = self.stamps
        st.zero_()
        st[2 * ctx.rank] = t_in
        st[2 * ctx.rank + 1] = t_out
        dist.all_reduce(st, op=dist.ReduceOp.SUM, group=ctx.cpu_group)
        start = int(st[2 * ctx.src])
        return result, (int(st[1::2].max()) - start) / 1e9


class _Board:
    """A small file shared by the ranks of one host: each rank's latest sample
    number, in its own cache line. Created by rank 0 (O_EXCL, mode 0600) in
    /dev/shm when it exists, unlinked once every rank mapped it."""

    def __init__(self, mm: mmap.mmap, world: int):
        self.mm = mm
        self.view = memoryview(mm).cast("q")  # int64 slots
        self.stride = _LINE // 8
        self.world = world
        self.seq = 0

    def post(self, rank: int, seq: int) -> None:
        self.view[(rank + 1) * self.stride] = seq

    def exchange(self, rank: int, seq: int, t_in: int, t_out: int, timeout_ns: int):
        """Every rank's (start, end) stamps of sample `seq`: each rank writes
        its own (the sample number last; x86 keeps stores in order), then
        reads the others' once all are written. Returns (starts, ends)."""
        view, stride, base = self.view, self.stride, (self.world + 1) * self.stride
        mine = base + rank * stride
        view[mine + 1] = t_in
        view[mine + 2] = t_out
        view[mine] = seq
        deadline = time.perf_counter_ns() + timeout_ns
        for r in range(self.world):
            while view[base + r * stride] < seq:
                os.sched_yield()
                if time.perf_counter_ns() > deadline:
                    raise TimeoutError("rank %d did not finish sample %d" % (r, seq))
        lines = [base + r * stride for r in range(self.world)]
        return [view[i + 1] for i in lines], [view[i + 2] for i in lines]

    def wait_all(self, seq: int, src: int, timeout_ns: int) -> None:
        view, stride = self.view, self.stride
        others = [(r + 1) * stride for r in range(self.world) if r != src]
        deadline = time.perf_counter_ns() + timeout_ns
        for i in others:
            while view[i] < seq:
                # On a machine with fewer cores than ranks a pure spin would
                # starve the very receivers it waits for.
                os.sched_yield()
                if time.perf_counter_ns() > deadline:
                    raise TimeoutError("a receiver did not reach sample %d" % seq)

    @staticmethod
    def open(ctx: Context) -> Optional["_Board"]:
        """A board every rank mapped, or None (on every rank) if some rank could not:
        ranks on other hosts, or no shared /dev/shm or temp dir between them."""
        size = _LINE * (2 * ctx.world_size + 1)  # sample numbers, then each rank's stamps
        token = secrets.randbits(62)
        path = None
        if ctx.rank == 0:
            folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
            path = os.path.join(folder, "fastbcast-bench-%d-%x" % (os.getpid(), token))
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                os.ftruncate(fd, size)
                os.pwrite(fd, token.to_bytes(8, "little") + _boot_id().encode()[:48], 0)
                os.close(fd)
            except OSError:
                path = None
        box = [(path, token, _boot_id())]
        dist.broadcast_object_list(box, src=0, group=ctx.cpu_group)
        path, token, boot = box[0]
        mm = None
        if path is not None:
            try:
                fd = os.open(path, os.O_RDWR)
                try:
                    mm = mmap.mmap(fd, size)
                finally:
                    os.close(fd)
                # The same file (token), and the same boot (one CLOCK_MONOTONIC).
                if int.from_bytes(mm[:8], "little") != token or boot != _boot_id():
                    mm.close()
                    mm = None
            except OSError:
                mm = None
        ok = torch.tensor([1 if mm is not None else 0], dtype=torch.int64)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=ctx.cpu_group)
        if ctx.rank == 0 and path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass
        if not int(ok[0]):
            if mm is not None:
                mm.close()
            return None
        return _Board(mm, ctx.world_size)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _quantile(samples: List[float], q: float) -> float:
    """The q-quantile (0..1) of samples, linear between order statistics."""
    xs = sorted(samples)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _summarize(cell: Dict[str, Any], samples: List[float]) -> None:
    cell["samples_ms"] = samples
    cell["median_ms"] = statistics.median(samples)
    cell["p90_ms"] = _quantile(samples, 0.9)
    cell["min_ms"] = min(samples)


def _repeat(cfg: Config, sample) -> List[float]:
    """Samples (ms) from ``sample()`` (seconds) until the budget is used."""
    samples: List[float] = []
    total = 0.0
    while True:
        t = sample()
        samples.append(t * 1e3)
        total += t
        if len(samples) >= cfg.max_reps or (total >= cfg.seconds and len(samples) >= cfg.min_reps):
            return samples


def run_codec_cell(cfg: Config, ctx: Context, timer: _Timer, name: str, obj: Any,
                   has_cuda: bool) -> Dict[str, Any]:
    """fastbcast.encode + decode of the payload, timed on the source alone
    (the reference), then on every rank at once (the source's median, as
    busy_ms)."""
    cell: Dict[str, Any] = {"payload": name, "method": "codec", "transport": "local",
                            "key": "codec", "status": "ok", "samples_ms": []}
    fb, why = fastbcast_api("encode", "decode")
    if fb is not None and has_cuda:
        why = "the codec row measures host objects; this payload holds CUDA tensors"
    if not timer.agree(why is None):
        cell.update(status="n/a", reason=why or "not supported on another rank")
        return cell
    out: Dict[str, Any] = {}
    if ctx.rank == ctx.src:
        out = _time_codec(cfg, fb, obj)
    dist.barrier(group=ctx.cpu_group)
    # The same again with every rank running it at once, as every rank
    # decodes at once in a broadcast: the cores then share the chip's power
    # and memory, so this says how much of a broadcast's excess over the
    # codec row is that and not the transport. Reported, not a reference.
    busy = _time_codec(cfg, fb, obj) if not out.get("error") else {}
    if ctx.rank == ctx.src and busy.get("total"):
        out["busy_ms"] = statistics.median(busy["total"])
    dist.barrier(group=ctx.cpu_group)
    box = [out]
    dist.broadcast_object_list(box, src=ctx.src, group=ctx.cpu_group)
    out = box[0]
    if out.get("error"):
        cell.update(status="WRONG", reason=out["error"])
        return cell
    _summarize(cell, out["total"])
    cell["encode_ms"] = statistics.median(out["encode"])
    cell["decode_ms"] = statistics.median(out["decode"])
    cell["encode_samples_ms"] = out["encode"]
    cell["decode_samples_ms"] = out["decode"]
    cell["busy_ms"] = out.get("busy_ms")
    return cell


def _time_codec(cfg: Config, fb: Any, obj: Any) -> Dict[str, Any]:
    from .common import same

    clock = time.perf_counter_ns
    try:
        if not same(obj, fb.decode(fb.encode(obj))):
            return {"error": "fastbcast.decode(fastbcast.encode(obj)) differs from obj"}
    except Exception as e:
        return {"error": "%s: %s" % (type(e).__name__, e)}
    enc: List[float] = []
    dec: List[float] = []
    warm = cfg.warmup - 1

    def sample():
        t0 = clock()
        buf = fb.encode(obj)
        t1 = clock()
        got = fb.decode(buf)
        t2 = clock()
        del got, buf  # dropping the result is outside the clock, as in the broadcast cells
        enc.append((t1 - t0) / 1e6)
        dec.append((t2 - t1) / 1e6)
        return (t2 - t0) / 1e9

    for _ in range(warm):
        sample()
    del enc[:], dec[:]
    total = _repeat(cfg, sample)
    return {"encode": enc, "decode": dec, "total": total}


def run_cell(cfg: Config, ctx: Context, timer: _Timer, row: Row, name: str, obj: Any, nbytes: int,
             has_cuda: bool) -> Dict[str, Any]:
    if row.method == "codec":
        return run_codec_cell(cfg, ctx, timer, name, obj, has_cuda)
    cell: Dict[str, Any] = {"payload": name, "method": row.method, "transport": row.transport,
                            "key": row.key, "status": "ok", "samples_ms": []}
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

    result, first = timer.once(call, keep=True)
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
        timer.once(call)
    _summarize(cell, _repeat(cfg, lambda: timer.once(call)[1]))
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


def _build(name: str, fb: Any):
    """(payload, None), or (None, why) for a class payload that cannot be built
    here. Its package prefix is trusted first (fastbcast.trust), as every rank
    of an application that broadcasts these classes must do."""
    if name not in CLASS_PAYLOADS:
        return payload_factory(name)(), None
    why = class_payload_unavailable(name)
    if why:
        return None, why
    try:
        if fb is not None:
            fb.trust(*CLASS_PAYLOAD_TRUSTED[name])
        return payload_factory(name)(), None
    except Exception as e:
        return None, "building it failed: %s: %s" % (type(e).__name__, e)


def _make_timer(cfg: Config, ctx: Context) -> _Timer:
    cuda = ctx.backend == "nccl"
    board = _Board.open(ctx) if cfg.timing != "barrier" else None
    if board is None:
        if cfg.timing == "stamps":
            raise RuntimeError("--timing stamps needs every rank on one host with a shared "
                               "/dev/shm (or temp dir); use --timing barrier")
        if cfg.timing == "auto" and ctx.rank == 0:
            sys.stderr.write("note: ranks do not share a host clock and folder; timing with "
                             "the barrier clock (coarser: see --help)\n")
        return _Timer(ctx, cuda)
    return _StampTimer(ctx, cuda, board, cfg.gap_us, cfg.timeout_s, cfg.exchange)


def _run(cfg: Config, ctx: Context) -> None:
    from . import report

    lead = ctx.rank == 0
    fb, _ = fastbcast_api()
    if fb is not None:
        register_structs(fb)
    timer = _make_timer(cfg, ctx)
    bar = report.progress(len(cfg.payloads) * len(cfg.rows), cfg.progress) if lead else None
    record = report.new_record(cfg, ctx, timer.name) if lead else None
    if lead:
        report.emit(report.run_header(cfg, ctx, record), bar)
    started = time.perf_counter()
    for name in cfg.payloads:
        if bar is not None:
            bar.set_description("%s: building" % name)
        obj, why = _build(name, fb)
        if not timer.agree(why is None):
            # Skipped on every rank, so the ranks stay in step.
            why = why or "not available on another rank"
            if lead:
                record.setdefault("skipped", {})[name] = why
                report.emit("#\n# %s: skipped (%s)" % (name, why), bar)
                if bar is not None:
                    bar.update(len(cfg.rows))
            continue
        sizes = payload_bytes(obj)
        has_cuda = has_cuda_tensors(obj)
        cells = []
        for row in cfg.rows:
            if bar is not None:
                bar.set_description("%s %s" % (name, row.key))
            cell = run_cell(cfg, ctx, timer, row, name, obj, sizes["bytes"], has_cuda)
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
            report.emit(report.payload_table(name, sizes, cells, ctx.world_size), bar)
    ctx.close_kept()
    dist.barrier(group=ctx.cpu_group)
    if lead:
        if bar is not None:
            bar.close()
        record["wall_s"] = time.perf_counter() - started
        report.finish(cfg, record)
