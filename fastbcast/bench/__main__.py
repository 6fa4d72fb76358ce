"""python -m fastbcast.bench: broadcast benchmark payloads with fastbcast and every baseline.

Spawns --world-size local processes (or joins a torchrun launch), broadcasts
each payload from one rank with each method, and prints one nccl-tests-style
table per payload from rank 0: bytes, method, transport, p50, p90 and min
time, algbw and busbw (GB/s, on the size of fastbcast's encoding; busbw =
algbw for a broadcast), the speedup against the pickle design over the same
transport, and the time as a multiple of fastbcast's encode + decode of the
same payload (the codec row, measured in the same run). A summary line and
the target checks of the shared-memory issue follow each table; both are
repeated at the end, the targets as one table.

Time of one sample: from the source's start until the slowest rank holds the
decoded object, read on the host's one CLOCK_MONOTONIC by every rank, with
receivers already waiting (see "timing" below). Each cell first checks, on
every rank, that the received object equals the source object, so a broken
method cannot report a time.

Writes OUT/<timestamp>.json (machine, torch version, backend, world size,
every sample) and OUT/<timestamp>.png (median time per payload and method on
a log scale, floors as reference lines).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from typing import List, Optional

from .methods import DEFAULT_METHODS, FASTBCAST_METHODS, METHODS, resolve_rows
from .payloads import CLASS_PAYLOADS, PAYLOAD_NOTES, PAYLOADS, default_payload_names

_METHOD_HELP = "\n".join("  %-16s %s" % (k, v[0]) for k, v in METHODS.items())
_PAYLOAD_HELP = "\n".join("  %-22s %s" % (k, PAYLOAD_NOTES.get(k, "")) for k in [*PAYLOADS, *CLASS_PAYLOADS])

EPILOG = """\
methods (--methods, comma-separated; 'name@gloo' / 'name@nccl' picks one transport):
%s
  On a gloo run every method runs over gloo with CPU tensors, and floor_pinned /
  floor_device both mean floor_cpu. On an NCCL run, fastbcast, fastbcast_pyobj
  and pickle run both over NCCL and over a gloo group created alongside
  (force_cpu_device-style); object_list, msgspec and the device floors run over
  NCCL. Speedups compare with the pickle design over the same transport.

payloads (--payloads, comma-separated; cuda_tensors exists only with CUDA):
%s
  sglang_req_* and verl_req_* are the real request classes: built when sglang /
  verl import (else skipped, saying why), after every rank called
  fastbcast.trust("sglang") / trust("verl"), so they travel natively.

timing (--timing):
  stamps (default when every rank is on this host): before each sample every
  receiver marks, in a small shared file, that it is entering the call; the
  source waits for all marks (plus --gap-us), reads the clock and calls. Each
  rank reads the clock again when it holds the object and drops it, and the
  ranks exchange their stamps through the same file (--exchange board: no
  collective between samples, back-to-back calls like SGLang's idle steps)
  or with one gloo all_reduce (--exchange allreduce: every sample follows a
  collective). Sample = max over ranks of the end stamp - the source's start
  stamp. No collective and no barrier skew inside the timed region, so
  microsecond payloads are measured as they are.
  barrier: gloo barrier, each rank times its call, MAX over ranks. Used when
  the ranks span hosts (no shared clock); its barrier exit skew (tens of us)
  is inside every sample.

cells:
  A cell is one payload x method. Each cell: one call whose result every rank
  checks against its own copy of the payload (a mismatch prints WRONG and no
  time), --warmup - 1 more untimed calls (none when the first call took more
  than a quarter of --seconds), then timed samples until they add up to
  --seconds with at least --min-reps of them, or --max-reps. Cells a method
  cannot carry (e.g. msgspec and tensors) print n/a with the reason.

output:
  Rank 0 prints the table of each payload as it completes, then the summary
  lines again. Columns: payload, bytes (fastbcast's encoding of the payload;
  pickle's size if fastbcast cannot encode), method, via (transport; local
  for the codec row), reps (timed samples), p50 / p90 / min us (source start
  -> slowest rank holds the decoded object), algbw GB/s = bytes / p50 (10^9
  B/s), busbw GB/s (= algbw for a broadcast), vs pickle (pickle design's p50
  over the same transport / this p50), x codec (this p50 / the codec row's
  p50), check. Then "# target" lines: each target of issue 10 that applies to
  the payload, for each fastbcast row, with its value, limit and ok/MISSED. It writes OUT/<timestamp>.json (machine: hostname,
  CPUs, GPU name and count, torch version; backend, world size, options, and
  every sample of every cell) and OUT/<timestamp>.png (needs matplotlib). The
  progress bar needs tqdm; without matplotlib or tqdm the run goes on with a
  one-line note, and so does numpy (the pickle design then reads its bytes
  through the tensor's storage; msgspec is skipped). vllm_mq needs vLLM
  (requirements-bench-vllm.txt); without it its rows print n/a with the reason.

examples:
  python -m fastbcast.bench                        # default suite, this machine
  python -m fastbcast.bench --quick                # under a minute
  python -m fastbcast.bench --payloads rollout_256x4k --methods fastbcast,pickle
  python -m fastbcast.bench --world-size 2 --payloads empty,tiny_1req \
      --methods codec,fastbcast-shm,fastbcast-collective,pickle,vllm_mq
  torchrun --nproc-per-node 4 -m fastbcast.bench   # ranks from torchrun
""" % (_METHOD_HELP, _PAYLOAD_HELP)


def parse_args(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog or "python -m fastbcast.bench", description=__doc__.split("\n\n")[0],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=None,
                   help="number of local processes (default: the GPU count on an NCCL run, "
                        "else 4); ignored under torchrun")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                   help="auto: nccl when 2 or more GPUs are visible, else gloo (default auto)")
    p.add_argument("--payloads", default=None,
                   help="comma-separated payload names (default: all available; with --quick, "
                        "all but the 256x4k ones)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: %s)" % ",".join(DEFAULT_METHODS))
    p.add_argument("--src", type=int, default=0, help="global rank that broadcasts (default 0)")
    p.add_argument("--seconds", type=float, default=None,
                   help="time budget for the timed samples of one cell (default 1.0; "
                        "--quick: 0.1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="calls before timing, the checked one included (default 3; --quick: 1)")
    p.add_argument("--min-reps", type=int, default=None,
                   help="fewest timed samples per cell, even past --seconds (default 3; "
                        "--quick: 2)")
    p.add_argument("--max-reps", type=int, default=None,
                   help="most timed samples per cell (default 1000; --quick: 100)")
    p.add_argument("--out", default="bench-results",
                   help="directory for <timestamp>.json and .png (default bench-results)")
    p.add_argument("--quick", action="store_true",
                   help="a run under a minute: smaller budget, no 256x4k payloads unless named")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bar on stderr (tqdm): auto shows it when stderr is a "
                        "terminal (default auto)")
    p.add_argument("--timing", choices=("auto", "stamps", "barrier"), default="auto",
                   help="the clock of a sample (see timing below; default auto: stamps when "
                        "every rank is on this host, else barrier)")
    p.add_argument("--exchange", choices=("board", "allreduce"), default="board",
                   help="with stamps, how the ranks exchange their stamps after each sample: through the "
                        "shared file (default: no collective between samples) or one gloo all_reduce")
    p.add_argument("--gap-us", type=float, default=0.0,
                   help="with stamps, how long the source waits after every receiver is "
                        "inside the call (default 0)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds a collective may wait before it fails; the whole run is "
                        "stopped after 4x this (default 900)")
    return p.parse_args(argv)


def _gpu_count() -> int:
    import torch
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def build_config(args: argparse.Namespace, argv: List[str]):
    from .runner import Config

    gpus = _gpu_count()
    backend = args.backend
    if backend == "auto":
        backend = "nccl" if gpus >= 2 else "gloo"
    if backend == "nccl" and gpus < 1:
        raise SystemExit("error: --backend nccl needs CUDA GPUs; none are visible")
    if _under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
    elif args.world_size is not None:
        world = args.world_size
    else:
        world = gpus if backend == "nccl" else 4
    if world < 2:
        raise SystemExit("error: a broadcast needs --world-size 2 or more")
    if backend == "nccl" and not _under_torchrun() and world > gpus:
        raise SystemExit("error: --world-size %d but only %d GPUs for NCCL" % (world, gpus))
    if not 0 <= args.src < world:
        raise SystemExit("error: --src %d is not a rank of a world of %d" % (args.src, world))

    if args.payloads:
        names = [n.strip() for n in args.payloads.split(",") if n.strip()]
        unknown = [n for n in names if n not in PAYLOADS and n not in CLASS_PAYLOADS]
        if unknown:
            extra = " (cuda_tensors needs CUDA)" if "cuda_tensors" in unknown else ""
            raise SystemExit("error: unknown payload(s) %s%s; choose from %s"
                             % (", ".join(unknown), extra, ", ".join([*PAYLOADS, *CLASS_PAYLOADS])))
    else:
        names = default_payload_names(quick=args.quick)
        if backend != "nccl":
            names = [n for n in names if n != "cuda_tensors"]
    if "cuda_tensors" in names and backend != "nccl":
        raise SystemExit("error: cuda_tensors needs an NCCL run (--backend nccl)")
    try:
        rows = resolve_rows(args.methods, backend)
    except ValueError as e:
        raise SystemExit("error: %s" % e)

    # fastbcast methods: a clear failure when asked for by name, a note by default.
    from .common import fastbcast_api
    for method in FASTBCAST_METHODS:
        want = [r for r in rows if r.method == method]
        if not want:
            continue
        fb, why = fastbcast_api({"fastbcast": "broadcast",
                                 "fastbcast_pyobj": "broadcast_pyobj"}[method])
        if fb is None:
            if args.methods:
                raise SystemExit("error: method %s is unavailable: %s" % (method, why))
            sys.stderr.write("note: skipping %s: %s\n" % (method, why))
            rows = [r for r in rows if r.method != method]
    if not rows:
        raise SystemExit("error: no method to run")
    from .baselines import numpy_missing
    note = numpy_missing()
    if note:
        sys.stderr.write("note: %s\n" % note)

    q = args.quick
    pick = lambda v, full, quick: v if v is not None else (quick if q else full)  # noqa: E731
    return Config(
        backend=backend, world_size=world, src=args.src, payloads=names, rows=rows,
        seconds=pick(args.seconds, 1.0, 0.1), warmup=max(1, pick(args.warmup, 3, 1)),
        min_reps=max(1, pick(args.min_reps, 3, 2)), max_reps=max(1, pick(args.max_reps, 1000, 100)),
        out=args.out, quick=q, plot=not args.no_plot, progress=args.progress,
        timeout_s=args.timeout, argv=argv, timing=args.timing, gap_us=max(0.0, args.gap_us),
        exchange=args.exchange)


def _spawn(cfg) -> int:
    import torch.distributed as dist

    from .runner import worker

    # The parent hosts the rendezvous store on a port the OS picks: no fixed
    # port, and no window between finding a free port and binding it.
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(r, r, cfg, store.port), name="bench-rank%d" % r)
             for r in range(cfg.world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + cfg.timeout_s * 4
    failed = None
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=0.2)
                if p.exitcode not in (None, 0):
                    failed = p
                    break
            if failed is not None:
                break
            if time.monotonic() > deadline:
                sys.stderr.write("error: the benchmark ran past %.0f s; stopping it\n"
                                 % (cfg.timeout_s * 4))
                failed = procs[0]
                break
    except KeyboardInterrupt:
        failed = procs[0]
    if failed is not None:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        sys.stderr.write("error: %s exited with code %s; the run was stopped\n"
                         % (failed.name, failed.exitcode))
        return 1
    return max(p.exitcode or 0 for p in procs)


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, prog)
    cfg = build_config(args, argv)
    if _under_torchrun():
        from .runner import worker
        worker(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), cfg, None)
        return 0
    return _spawn(cfg)


if __name__ == "__main__":
    sys.exit(main())
