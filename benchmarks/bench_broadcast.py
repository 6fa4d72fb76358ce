"""Broadcast benchmark: the same suite as ``python -m fastbcast.bench``.

    python benchmarks/bench_broadcast.py --quick
    python benchmarks/bench_broadcast.py --payloads rollout_256x4k --methods fastbcast,pickle
    torchrun --nproc-per-node 4 benchmarks/bench_broadcast.py

Every option is the suite's (``--help`` lists them): it spawns local ranks
(gloo, or NCCL with 2+ GPUs), or joins a torchrun launch, and prints one
nccl-tests-style table per payload comparing fastbcast with the pickle design
over gloo and NCCL, broadcast_object_list, msgspec with two broadcasts, and
the raw floors.
"""
import os
import sys

try:
    import fastbcast.bench  # noqa: F401  (installed, or on PYTHONPATH)
except ModuleNotFoundError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastbcast.bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="benchmarks/bench_broadcast.py"))
