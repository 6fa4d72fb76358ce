"""Rank 0's output: nccl-tests-style tables, summary lines, the JSON record, the plot."""
from __future__ import annotations

import datetime
import json
import os
import sys
from typing import Any, Dict, List, Optional

from .common import machine_info
from .methods import FLOORS, METHODS
from .payloads import PAYLOAD_NOTES

_ROW = "   %-22s %12s  %-16s %-4s %5s %11s %11s %11s %11s %10s  %s"
_COLS = "#" + _ROW[1:] % ("payload", "bytes", "method", "via", "reps", "median ms", "min ms",
                          "algbw GB/s", "busbw GB/s", "vs pickle", "check")


def progress(total: int, mode: str = "auto"):
    """A tqdm bar on stderr, or None.

    mode "auto" shows it only when stderr is a terminal (a bar in a log file is
    noise), "on" always, "off" never. Without tqdm: None and a one-line note.
    """
    if mode == "off" or (mode == "auto" and not sys.stderr.isatty()):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        sys.stderr.write("note: tqdm is not installed, so there is no progress bar "
                         "(pip install tqdm)\n")
        return None
    return tqdm(total=total, file=sys.stderr, unit="cell", dynamic_ncols=True, leave=False)


def emit(text: str, bar=None) -> None:
    if bar is not None:
        bar.write(text, file=sys.stdout)
    else:
        print(text, flush=True)
    sys.stdout.flush()


def new_record(cfg, ctx) -> Dict[str, Any]:
    now = datetime.datetime.now()
    return {
        "tool": "python -m fastbcast.bench",
        "timestamp": now.isoformat(timespec="seconds"),
        "stamp": now.strftime("%Y%m%d-%H%M%S"),
        "machine": machine_info(),
        "backend": cfg.backend,
        "world_size": ctx.world_size,
        "src": cfg.src,
        "config": {"seconds": cfg.seconds, "warmup": cfg.warmup, "min_reps": cfg.min_reps,
                   "max_reps": cfg.max_reps, "quick": cfg.quick, "argv": cfg.argv,
                   "rows": [r.key for r in cfg.rows], "payloads": cfg.payloads},
        "timing": "barrier on a gloo group -> each rank runs the method (and synchronizes "
                  "CUDA) -> max over ranks via all_reduce(MAX); median and min over samples",
        "bytes": "size of fastbcast's encoding of the payload (pickle's size when fastbcast "
                 "is unavailable: see bytes_source); algbw = bytes / time, busbw = algbw",
        "payloads": {},
    }


def run_header(cfg, ctx, record) -> str:
    m = record["machine"]
    gpu = ("%d x %s" % (m["gpu_count"], m["gpu_name"])) if m.get("gpu_count") else "none"
    lines = [
        "# fastbcast.bench: broadcast of a Python object from global rank %d to %d ranks"
        % (cfg.src, ctx.world_size),
        "#  backend %s | host %s | %s CPUs (%s) | GPUs: %s | torch %s | fastbcast %s"
        % (cfg.backend, m["hostname"], m["cpu_count"], m.get("cpu_model") or "?", gpu,
           m["torch"], m.get("fastbcast") or "unavailable"),
        "#  time: from a common barrier until the slowest rank holds the decoded object "
        "(max over ranks); median and min of 'reps' samples, after warm-up",
        "#  bytes: size of fastbcast's encoding of the payload; algbw = bytes / median time; "
        "busbw = algbw for a broadcast",
        "#  vs pickle: the pickle design's median over the same transport / this median "
        "(>1 is faster)",
        "#  methods:",
    ]
    for row in cfg.rows:
        lines.append("#    %-22s %s" % (row.key, METHODS[row.method][0]))
    return "\n".join(lines)


def _pickle_ref(cells: List[dict], transport: str) -> Optional[float]:
    for c in cells:
        if c["method"] == "pickle" and c["transport"] == transport and c["status"] == "ok":
            return c["median_ms"]
    return None


def payload_table(name: str, sizes: Dict[str, Any], cells: List[dict]) -> str:
    nbytes = sizes["bytes"]
    note = PAYLOAD_NOTES.get(name, "")
    head = "#\n# %s: %s; %s bytes encoded by %s, %s pickled" % (
        name, note, "{:,}".format(nbytes), sizes["bytes_source"],
        "{:,}".format(sizes["pickled_bytes"]))
    if sizes.get("bytes_note"):
        head += "\n#  (fastbcast unavailable: %s)" % sizes["bytes_note"]
    lines = [head, _COLS]
    for c in cells:
        if c["status"] != "ok":
            lines.append(_ROW % (
                name, nbytes, c["method"], c["transport"], "-", "n/a", "n/a", "n/a", "n/a",
                "-", "%s (%s)" % (c["status"], c.get("reason", ""))))
            continue
        med = c["median_ms"]
        algbw = nbytes / (med * 1e-3) / 1e9
        ref = _pickle_ref(cells, c["transport"])
        speed = ("%.2fx" % (ref / med)) if ref else "-"
        c["algbw_GBps"] = algbw
        c["speedup_vs_pickle"] = (ref / med) if ref else None
        lines.append(_ROW % (
            name, nbytes, c["method"], c["transport"], len(c["samples_ms"]), "%.3f" % med,
            "%.3f" % c["min_ms"], "%.3f" % algbw, "%.3f" % algbw, speed, "ok"))
    lines.append(summary_line(name, cells))
    return "\n".join(lines)


def _rel(t: float, other: float, what: str) -> str:
    """'3.2x faster than X (9.6 ms)' or '1.4x slower than X (2.1 ms)' for time t."""
    ratio = other / t if t <= other else t / other
    return "%s %s than %s (%.3f ms)" % (("%.2fx" if ratio < 10 else "%.1fx") % ratio,
                                        "faster" if t <= other else "slower", what, other)


def summary_line(name: str, cells: List[dict]) -> str:
    """fastbcast against pickle, the best other baseline and the floor, per transport."""
    ok = [c for c in cells if c["status"] == "ok"]
    fast = [c for c in ok if c["method"] == "fastbcast"] or \
        [c for c in ok if c["method"] == "fastbcast_pyobj"]
    if not fast:
        base = [c for c in ok if c["method"] not in FLOORS]
        if not base:
            return "# summary %s: no method produced a timing" % name
        best = min(base, key=lambda c: c["median_ms"])
        return "# summary %s: fastbcast not measured; fastest baseline %s %.3f ms" % (
            name, best["key"], best["median_ms"])
    parts = []
    for f in sorted(fast, key=lambda c: c["transport"] != "nccl"):
        t = f["median_ms"]
        bits = ["%s %.3f ms" % (f["key"], t)]
        ref = _pickle_ref(cells, f["transport"])
        if ref:
            bits.append(_rel(t, ref, "pickle@" + f["transport"]))
        others = [c for c in ok if c["transport"] == f["transport"] and c["method"] not in FLOORS
                  and not c["method"].startswith("fastbcast") and c["method"] != "pickle"]
        if others:
            b = min(others, key=lambda c: c["median_ms"])
            bits.append(_rel(t, b["median_ms"], "the best other baseline " + b["key"]))
        floors = [c for c in ok if c["method"] in FLOORS and c["transport"] == f["transport"]]
        if floors:
            fl = max(floors, key=lambda c: c["median_ms"])  # the host-to-host floor
            bits.append("%.2fx the %s floor (%.3f ms)" % (t / fl["median_ms"], fl["key"],
                                                          fl["median_ms"]))
        parts.append(", ".join(bits))
    return "# summary %s: %s" % (name, "; ".join(parts))


def finish(cfg, record: Dict[str, Any]) -> None:
    os.makedirs(cfg.out, exist_ok=True)
    stem = os.path.join(cfg.out, record["stamp"])
    lines = ["#", "# summary (%s, world size %d, %.0f s)" % (record["backend"],
                                                            record["world_size"],
                                                            record["wall_s"])]
    for name, p in record["payloads"].items():
        lines.append(summary_line(name, p["cells"]))
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    lines.append("# wrote %s.json" % stem)
    if cfg.plot:
        note = plot(record, stem + ".png")
        lines.append("# " + note)
    emit("\n".join(lines))


def plot(record: Dict[str, Any], path: str) -> str:
    """Bars of median time per payload and method (log scale), floors as lines."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed, so no plot (pip install matplotlib)"
    payloads = list(record["payloads"])
    keys = []
    floor_keys = []
    for p in payloads:
        for c in record["payloads"][p]["cells"]:
            bucket = floor_keys if c["method"] in FLOORS else keys
            if c["key"] not in bucket:
                bucket.append(c["key"])
    if not payloads or not (keys or floor_keys):
        return "nothing to plot"
    fig, ax = plt.subplots(figsize=(11, 5.2), dpi=100)
    width = 0.8 / max(1, len(keys))
    cmap = plt.get_cmap("tab10")
    for j, key in enumerate(keys):
        xs, ys = [], []
        for i, p in enumerate(payloads):
            for c in record["payloads"][p]["cells"]:
                if c["key"] == key and c["status"] == "ok":
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(c["median_ms"])
        ax.bar(xs, ys, width=width * 0.95, label=key, color=cmap(j % 10),
               edgecolor="black" if key.startswith("fastbcast@") else None, linewidth=0.6)
    styles = ["--", ":", "-."]
    for j, key in enumerate(floor_keys):
        first = True
        for i, p in enumerate(payloads):
            for c in record["payloads"][p]["cells"]:
                if c["key"] == key and c["status"] == "ok":
                    ax.hlines(c["median_ms"], i - 0.45, i + 0.45, colors="black",
                              linestyles=styles[j % len(styles)], linewidth=1.2,
                              label=key if first else None)
                    first = False
    ax.set_yscale("log")
    ax.set_xticks(range(len(payloads)))
    ax.set_xticklabels(["%s\n%s" % (p, _short(record["payloads"][p]["bytes"])) for p in payloads],
                       fontsize=8)
    ax.set_ylabel("median time, barrier to slowest rank done (ms, log)")
    m = record["machine"]
    where = ("%d x %s" % (m["gpu_count"], m["gpu_name"])) if m.get("gpu_count") and \
        record["backend"] == "nccl" else "%s CPUs" % m["cpu_count"]
    ax.set_title("fastbcast.bench: %s, %d ranks, %s, %s" % (
        record["backend"], record["world_size"], where, record["timestamp"][:10]), fontsize=10)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return "wrote %s" % path


def _short(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return "%.1f %s" % (n / div, unit)
    return "%d B" % n
