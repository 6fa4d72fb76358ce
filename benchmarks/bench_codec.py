"""Codec benchmark: fastbcast's encoder/decoder against msgspec, ormsgpack, msgpack and pickle.

    python benchmarks/bench_codec.py                 # every payload, ~1 s per measurement
    python benchmarks/bench_codec.py --quick         # a smaller budget
    python benchmarks/bench_codec.py --payloads rollout_256x4k --json out.json

One table, measured in one run on one machine, with a row per payload and
codec: encoded size, encode and decode time (median of the samples), MB/s on
the encoded size, and the ratio against msgspec. Payloads come from
``fastbcast.bench.payloads`` (same shapes and sizes as the reference ones).

Codecs:
  fastbcast         fastbcast.encode(obj) -> pooled uint8 tensor; fastbcast.decode(tensor)
  fastbcast-compat  the same with compat=True (plain MessagePack only)
  msgspec           msgspec.msgpack.Encoder().encode / Decoder().decode (typed Decoder for
                    sched_structs, so it rebuilds the dataclasses)
  ormsgpack         ormsgpack.packb / unpackb
  msgpack           msgpack.packb(use_bin_type=True) / unpackb(raw=False, strict_map_key=False)
  pickle            pickle.dumps(protocol=5) / pickle.loads

Every cell first round-trips the payload once and compares the result with the
original, exactly (types included). A codec that cannot encode a payload, or
does not give back an equal object (ormsgpack turns dataclasses into dicts,
msgpack tensors into errors, compat mode rejects tuples...), shows "n/a" and
the reason instead of a time.

Timing: each sample times a batch of calls sized so that the batch takes about
a millisecond or more (one call for large payloads) and divides by the batch
size; samples are taken until they add up to ``--seconds`` (with at least
``--min-reps``). Encoded outputs are dropped inside the timed loop (for
fastbcast that returns the buffer to its pool, as a caller would); decoded
objects are freed outside it. The garbage collector stays on (as in a real
process) unless ``--no-gc``.

Peak memory during encode (issue 2's third target): measured in a fresh
subprocess per codec, because tracemalloc does not see the C++ allocations.
The subprocess runs with MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_
fixed at 128 KiB, so glibc returns large freed blocks to the OS instead of
keeping them for reuse where RSS would not show them. It builds the payload,
then for each of two encodes: calls malloc_trim(0), resets the peak RSS
(writing 5 to /proc/self/clear_refs), reads VmRSS, encodes, and reads VmHWM.
Peak extra = VmHWM - VmRSS before. The first ("cold") encode includes the
buffer pool growing to fit; the second ("warm") runs with the pool holding
that buffer, so its peak extra is the memory beyond the pool: the target is
warm peak extra <= 1.2 x the encoded size. (If /proc/self/clear_refs cannot
be written, the probe reports the measure as unavailable.)
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import gc
import json
import os
import pickle
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
try:
    import fastbcast.bench.payloads  # noqa: F401  (installed, or on PYTHONPATH)
except ModuleNotFoundError:  # run from a source checkout without installing
    sys.path.insert(0, ROOT)

from fastbcast.bench.common import fastbcast_api, machine_info, register_structs, same  # noqa: E402
from fastbcast.bench.payloads import (CLASS_PAYLOAD_TRUSTED, CLASS_PAYLOADS, MSGSPEC_TYPES, PAYLOADS,  # noqa: E402
                                      class_payload_unavailable)

ALL_PAYLOADS = {**PAYLOADS, **CLASS_PAYLOADS}

CODEC_NAMES = ("fastbcast", "fastbcast-compat", "msgspec", "ormsgpack", "msgpack", "pickle")
TARGET_PAYLOAD = "rollout_256x4k"
TARGET_ENCODE = 1.5  # fastbcast encode at least this many times as fast as msgspec
TARGET_DECODE = 3.0  # and decode
TARGET_MEMORY = 1.2  # peak extra memory during encode / encoded size, pool excluded


class NotAvailable(Exception):
    pass


def make_codec(name: str, payload: str) -> Tuple[Callable[[Any], Any], Callable[[Any], Any],
                                                 Callable[[Any], Any], Callable[[Any], int]]:
    """(encode, to_input, decode, size): to_input turns encode's output into a
    stable decode input (a private copy, for fastbcast's pooled buffers)."""
    ident = lambda b: b  # noqa: E731
    if name in ("fastbcast", "fastbcast-compat"):
        fb, why = fastbcast_api("encode", "decode")
        if fb is None:
            raise NotAvailable(why)
        register_structs(fb)
        # The real request classes travel natively where receivers trust their package.
        trusted = CLASS_PAYLOAD_TRUSTED.get(payload)
        if name == "fastbcast":
            enc = functools.partial(fb.encode, trusted=trusted) if trusted else fb.encode
        else:
            enc = lambda o: fb.encode(o, compat=True)  # noqa: E731
        dec = functools.partial(fb.decode, trusted=trusted) if trusted else fb.decode
        return enc, lambda t: t.clone(), dec, lambda t: int(t.numel())
    if name == "msgspec":
        try:
            import msgspec
        except ImportError:
            raise NotAvailable("msgspec is not installed")
        typ = MSGSPEC_TYPES.get(payload)
        encoder = msgspec.msgpack.Encoder()
        decoder = msgspec.msgpack.Decoder(typ) if typ is not None else msgspec.msgpack.Decoder()
        return encoder.encode, ident, decoder.decode, len
    if name == "ormsgpack":
        try:
            import ormsgpack
        except ImportError:
            raise NotAvailable("ormsgpack is not installed")
        return ormsgpack.packb, ident, ormsgpack.unpackb, len
    if name == "msgpack":
        try:
            import msgpack
        except ImportError:
            raise NotAvailable("msgpack is not installed")
        return ((lambda o: msgpack.packb(o, use_bin_type=True)), ident,
                (lambda b: msgpack.unpackb(b, raw=False, strict_map_key=False)), len)
    if name == "pickle":
        return (lambda o: pickle.dumps(o, protocol=5)), ident, pickle.loads, len
    raise ValueError(name)


def sample(fn: Callable[[], Any], seconds: float, min_reps: int, max_reps: int,
           keep: bool) -> List[float]:
    """Per-call seconds: one sample per batch of calls, batch sized to >= ~1 ms.

    ``keep`` holds the results until the sample's clock has stopped (so freeing
    them is not timed); otherwise each result is dropped as the next arrives.
    """
    t0 = time.perf_counter()
    first = fn()
    once = time.perf_counter() - t0
    del first
    batch = max(1, min(1000, int(1e-3 / max(once, 1e-9))))
    samples: List[float] = []
    spent = 0.0
    held: List[Any] = [None] * batch
    while True:
        if keep:
            t0 = time.perf_counter()
            for i in range(batch):
                held[i] = fn()
            dt = time.perf_counter() - t0
            for i in range(batch):
                held[i] = None
        else:
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            dt = time.perf_counter() - t0
        samples.append(dt / batch)
        spent += dt
        if len(samples) >= max_reps or (spent >= seconds and len(samples) >= min_reps):
            return samples


def run_cell(codec: str, payload: str, obj: Any, args) -> Dict[str, Any]:
    cell: Dict[str, Any] = {"payload": payload, "codec": codec, "status": "ok"}
    try:
        enc, to_input, dec, size = make_codec(codec, payload)
    except NotAvailable as e:
        cell.update(status="n/a", reason=str(e))
        return cell
    try:
        encoded = to_input(enc(obj))
    except Exception as e:
        cell.update(status="n/a", reason="encode: %s: %s" % (type(e).__name__, str(e)[:80]))
        return cell
    try:
        back = dec(encoded)
    except Exception as e:
        cell.update(status="n/a", reason="decode: %s: %s" % (type(e).__name__, str(e)[:80]))
        return cell
    if not same(obj, back):
        cell.update(status="n/a", reason="round trip gives a different object")
        return cell
    del back
    cell["size"] = size(encoded)
    gc.collect()
    enc_s = sample(lambda: enc(obj), args.seconds, args.min_reps, args.max_reps, keep=False)
    gc.collect()
    dec_s = sample(lambda: dec(encoded), args.seconds, args.min_reps, args.max_reps, keep=True)
    cell["encode_samples_ms"] = [s * 1e3 for s in enc_s]
    cell["decode_samples_ms"] = [s * 1e3 for s in dec_s]
    cell["encode_ms"] = statistics.median(enc_s) * 1e3
    cell["decode_ms"] = statistics.median(dec_s) * 1e3
    cell["encode_MBps"] = cell["size"] / (cell["encode_ms"] * 1e-3) / 1e6
    cell["decode_MBps"] = cell["size"] / (cell["decode_ms"] * 1e-3) / 1e6
    return cell


# ------------------------------------------------------------------ memory probe

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _memory_probe(codec: str, payload: str) -> Dict[str, Any]:
    """Runs inside the fresh subprocess: peak extra RSS of a cold and a warm encode."""
    libc = ctypes.CDLL("libc.so.6")
    enc, _to_input, _dec, size = make_codec(codec, payload)
    obj = ALL_PAYLOADS[payload]()
    gc.collect()
    gc.disable()
    out: Dict[str, Any] = {"codec": codec, "payload": payload}
    for phase in ("cold", "warm"):
        libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError as e:
            return {**out, "error": "cannot reset the peak RSS: %s" % e}
        before = _status_kb("VmRSS")
        result = enc(obj)
        peak = _status_kb("VmHWM")
        n = size(result)
        del result
        out[phase + "_extra_bytes"] = (peak - before) * 1024
        out["encoded_bytes"] = n
    fb, _ = fastbcast_api("pool_stats")
    if codec.startswith("fastbcast") and fb is not None:
        try:
            out["pool_stats"] = {k: v for k, v in dict(fb.pool_stats()).items()}
        except Exception:
            pass
    for phase in ("cold", "warm"):
        out[phase + "_ratio"] = out[phase + "_extra_bytes"] / out["encoded_bytes"]
    return out


def measure_memory(codec: str, payload: str) -> Dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_memory-probe",
                           codec, payload], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        return {"codec": codec, "payload": payload,
                "error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------ report

def _fmt(v: Optional[float], spec: str) -> str:
    return "n/a" if v is None else spec % v


def print_table(cells: List[Dict[str, Any]], machine: Dict[str, Any], args) -> None:
    print("# fastbcast codec benchmark, %s | host %s | %s CPUs (%s) | torch %s | fastbcast %s"
          % (datetime.date.today().isoformat(), machine["hostname"], machine["cpu_count"],
             machine.get("cpu_model") or "?", machine["torch"], machine.get("fastbcast") or "n/a"))
    print("#  median of samples, %.2g s budget per measurement; MB/s = encoded size / time "
          "(10^6 B); speedup = msgspec's time / this time (>1 is faster); gc %s"
          % (args.seconds, "off" if args.no_gc else "on"))
    row = "   %-22s %-17s %12s %10s %10s %9s %9s %11s %11s %9s %9s  %s"
    print("#" + row[1:] % ("payload", "codec", "size B", "encode ms", "decode ms", "enc MB/s",
                           "dec MB/s", "enc speedup", "dec speedup", "enc x pk", "dec x pk", ""))
    print("#  (enc/dec x pk: pickle's time / this time, the drop-in's baseline)")
    by_payload: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for c in cells:
        by_payload.setdefault(c["payload"], {})[c["codec"]] = c
    for payload, row_cells in by_payload.items():
        ref = row_cells.get("msgspec")
        ref_ok = ref is not None and ref["status"] == "ok"
        pk = row_cells.get("pickle")
        pk_ok = pk is not None and pk["status"] == "ok"
        for codec, c in row_cells.items():
            if c["status"] != "ok":
                print(row % (payload, codec, "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a",
                             c.get("reason", "")))
                continue
            ex = (ref["encode_ms"] / c["encode_ms"]) if ref_ok else None
            dx = (ref["decode_ms"] / c["decode_ms"]) if ref_ok else None
            px = (pk["encode_ms"] / c["encode_ms"]) if pk_ok else None
            pdx = (pk["decode_ms"] / c["decode_ms"]) if pk_ok else None
            c["encode_vs_msgspec"], c["decode_vs_msgspec"] = ex, dx
            c["encode_vs_pickle"], c["decode_vs_pickle"] = px, pdx
            print(row % (payload, codec, "{:,}".format(c["size"]), "%.4g" % c["encode_ms"],
                         "%.4g" % c["decode_ms"], "%.0f" % c["encode_MBps"],
                         "%.0f" % c["decode_MBps"], _fmt(ex, "%.2fx"), _fmt(dx, "%.2fx"),
                         _fmt(px, "%.2fx"), _fmt(pdx, "%.2fx"), ""))


def targets(cells: List[Dict[str, Any]], memory: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    find = {(c["payload"], c["codec"]): c for c in cells}
    fb = find.get((TARGET_PAYLOAD, "fastbcast"))
    ms = find.get((TARGET_PAYLOAD, "msgspec"))
    out = []
    both = fb and ms and fb["status"] == "ok" and ms["status"] == "ok"
    for what, key, goal in (("encode", "encode_ms", TARGET_ENCODE),
                            ("decode", "decode_ms", TARGET_DECODE)):
        ratio = (ms[key] / fb[key]) if both else None
        out.append({"target": "%s >= %.1fx msgspec on %s" % (what, goal, TARGET_PAYLOAD),
                    "measured": ratio, "goal": goal,
                    "pass": None if ratio is None else ratio >= goal,
                    "detail": ("fastbcast %.1f ms, msgspec %.1f ms" % (fb[key], ms[key]))
                    if both else "not measured"})
    mem = next((m for m in memory if m["codec"] == "fastbcast" and "warm_ratio" in m), None)
    out.append({"target": "peak extra memory during encode <= %.1fx the encoded size "
                          "(pool excluded) on %s" % (TARGET_MEMORY, TARGET_PAYLOAD),
                "measured": mem["warm_ratio"] if mem else None, "goal": TARGET_MEMORY,
                "pass": None if mem is None else mem["warm_ratio"] <= TARGET_MEMORY,
                "detail": ("warm %.1f MB, cold (pool growing) %.1f MB, encoded %.1f MB"
                           % (mem["warm_extra_bytes"] / 1e6, mem["cold_extra_bytes"] / 1e6,
                              mem["encoded_bytes"] / 1e6)) if mem else "not measured"})
    return out


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split(
        "\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--payloads", default=None,
                   help="comma-separated payload names (default: all host payloads)")
    p.add_argument("--codecs", default=",".join(CODEC_NAMES),
                   help="comma-separated codecs (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=None,
                   help="time budget of each encode and each decode measurement "
                        "(default 1.0; --quick: 0.15)")
    p.add_argument("--min-reps", type=int, default=None, help="fewest samples (default 5; --quick 2)")
    p.add_argument("--max-reps", type=int, default=2000, help="most samples (default 2000)")
    p.add_argument("--quick", action="store_true", help="a smaller time budget")
    p.add_argument("--no-gc", action="store_true", help="disable the garbage collector while timing")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probe")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    p.add_argument("--_memory-probe", nargs=2, metavar=("CODEC", "PAYLOAD"), default=None,
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._memory_probe:
        print(json.dumps(_memory_probe(*args._memory_probe)))
        return 0
    if args.seconds is None:
        args.seconds = 0.15 if args.quick else 1.0
    if args.min_reps is None:
        args.min_reps = 2 if args.quick else 5
    names = [n for n in ALL_PAYLOADS if n != "cuda_tensors"]
    if args.payloads:
        names = [n.strip() for n in args.payloads.split(",") if n.strip()]
        bad = [n for n in names if n not in ALL_PAYLOADS or n == "cuda_tensors"]
        if bad:
            p.error("unknown or device-only payload(s): %s" % ", ".join(bad))
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    bad = [c for c in codecs if c not in CODEC_NAMES]
    if bad:
        p.error("unknown codec(s): %s; choose from %s" % (", ".join(bad), ", ".join(CODEC_NAMES)))
    fb, why = fastbcast_api("encode", "decode")
    if fb is None:
        print("# note: fastbcast rows are n/a: %s" % why, file=sys.stderr)

    machine = machine_info()
    cells: List[Dict[str, Any]] = []
    started = time.perf_counter()
    if args.no_gc:
        gc.disable()
    for name in names:
        why = class_payload_unavailable(name) if name in CLASS_PAYLOADS else None
        if why:
            print("# %s skipped: %s" % (name, why), file=sys.stderr)
            cells += [{"payload": name, "codec": c, "status": "n/a", "reason": "skipped: " + why} for c in codecs]
            continue
        obj = ALL_PAYLOADS[name]()
        for codec in codecs:
            print("# %s / %s ..." % (name, codec), file=sys.stderr, flush=True)
            cells.append(run_cell(codec, name, obj, args))
        del obj
        gc.collect()
    gc.enable()

    memory: List[Dict[str, Any]] = []
    if not args.no_memory and TARGET_PAYLOAD in names:
        for codec in ("fastbcast", "msgspec"):
            if codec in codecs:
                print("# memory probe: %s / %s ..." % (TARGET_PAYLOAD, codec), file=sys.stderr,
                      flush=True)
                memory.append(measure_memory(codec, TARGET_PAYLOAD))

    print_table(cells, machine, args)
    if memory:
        print("#\n# peak extra RSS during one encode of %s (fresh subprocess; see the docstring)"
              % TARGET_PAYLOAD)
        for m in memory:
            if "error" in m:
                print("#  %-10s unavailable: %s" % (m["codec"], m["error"]))
            else:
                print("#  %-10s encoded %12s B | cold %7.1f MB = %.2fx | warm %7.1f MB = %.2fx"
                      % (m["codec"], "{:,}".format(m["encoded_bytes"]),
                         m["cold_extra_bytes"] / 1e6, m["cold_ratio"],
                         m["warm_extra_bytes"] / 1e6, m["warm_ratio"]))
    goals = targets(cells, memory) if TARGET_PAYLOAD in names else []
    if goals:
        print("#\n# targets (issue 2), %s:" % TARGET_PAYLOAD)
        for g in goals:
            verdict = "n/a " if g["pass"] is None else ("PASS" if g["pass"] else "FAIL")
            measured = "-" if g["measured"] is None else "%.2fx" % g["measured"]
            print("#  [%s] %-78s measured %7s  (%s)" % (verdict, g["target"], measured, g["detail"]))
    print("# total %.0f s" % (time.perf_counter() - started))
    if args.json:
        record = {"tool": "benchmarks/bench_codec.py",
                  "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
                  "machine": machine, "argv": sys.argv[1:] if argv is None else argv,
                  "seconds": args.seconds, "gc": not args.no_gc, "cells": cells,
                  "memory": memory, "targets": goals}
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print("# wrote %s" % args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
