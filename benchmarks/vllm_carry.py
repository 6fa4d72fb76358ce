"""Packs what vLLM's MessageQueue baseline needs into a folder that can travel
to a machine with no network and no vLLM (the GPU machine of BENCHMARKS.md).

The vllm wheel is far larger than such a folder may be, but the baseline
imports only a few dozen of its pure-Python modules. This script finds out
which: it runs the baseline itself (a MessageQueue over a gloo group of 2
processes, created as vLLM creates it, carrying a small object and one larger
than its 4 MiB chunks) and records every vllm module file either process
loaded. It copies those files and vllm's dist-info to DEST/site, and
downloads the pyzmq wheel for the target Python to DEST/whl.

Run it with a Python where vllm imports (see requirements-bench-vllm.txt):

    /work/venv-vllm/bin/python benchmarks/vllm_carry.py .bench-carry

On the target, with DEST carried:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site DEST/whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/DEST/site

Then `python -m fastbcast.bench --methods vllm_mq,...` runs the baseline. It
prints the other third-party modules the baseline loaded, which the target
must already have (the GPU machine's image has them all: torch and its
dependencies, numpy, psutil, regex, urllib3, certifi, tqdm).
"""
import argparse
import datetime
import os
import shutil
import subprocess
import sys
import sysconfig

import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _loaded_files(prefix):
    files = set()
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and f.startswith(prefix):
            files.add(f)
    return files


def _rank(rank, port, queue):
    from fastbcast.bench.baselines import VllmMessageQueue, vllm_unavailable

    store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    why = vllm_unavailable()
    if why:
        queue.put((rank, why, [], []))
        return
    import vllm

    root = os.path.dirname(os.path.dirname(os.path.abspath(vllm.__file__))) + os.sep
    mq = VllmMessageQueue(dist.group.WORLD, 0)
    for obj in ([], {"a": [1] * 100}, b"x" * (6 << 20)):
        got = mq(obj if rank == 0 else None)
        assert got == obj, "MessageQueue returned a different object"
    dist.barrier()  # closing drops messages still queued on its socket
    mq.close()
    others = sorted({n.split(".")[0] for n, m in list(sys.modules.items())
                     if "site-packages" in (getattr(m, "__file__", None) or "")
                     and not n.startswith("vllm")})
    queue.put((rank, None, sorted(_loaded_files(root + "vllm" + os.sep)), others))
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dest", help="folder to (re)create, e.g. .bench-carry")
    p.add_argument("--python-version", default="3.12", help="the target's Python (default 3.12)")
    p.add_argument("--no-wheels", action="store_true", help="skip downloading pyzmq")
    args = p.parse_args()

    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for pr in procs:
        pr.start()
    results = [queue.get(timeout=300) for _ in procs]
    for pr in procs:
        pr.join(60)
    for _, why, _, _ in results:
        if why:
            sys.exit("error: %s" % why)

    import vllm
    root = os.path.dirname(os.path.dirname(os.path.abspath(vllm.__file__)))
    files = sorted({f for _, _, fs, _ in results for f in fs})
    others = sorted({m for _, _, _, ms in results for m in ms})
    site = os.path.join(args.dest, "site")
    shutil.rmtree(args.dest, ignore_errors=True)
    for f in files:
        rel = os.path.relpath(f, root)
        os.makedirs(os.path.join(site, os.path.dirname(rel)), exist_ok=True)
        shutil.copy2(f, os.path.join(site, rel))
    for entry in os.listdir(root):
        if entry.startswith("vllm-") and entry.endswith(".dist-info"):
            shutil.copytree(os.path.join(root, entry), os.path.join(site, entry))
    if not args.no_wheels:
        import zmq
        whl = os.path.join(args.dest, "whl")
        plats = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                 "manylinux2014_x86_64", "manylinux1_x86_64"]
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", args.python_version, "--implementation", "cp", "-d", whl,
               "pyzmq==%s" % zmq.__version__]
        for plat in plats:
            cmd += ["--platform", plat]
        subprocess.run(cmd, check=True)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.dest) for f in fs)
    print("%d vllm files (of %s) and %s in %s: %.1f MiB" % (
        len(files), vllm.__version__, "no wheels" if args.no_wheels else "the pyzmq wheel",
        args.dest, total / 2**20))
    print("other third-party modules the baseline loaded (the target must have them): %s"
          % ", ".join(m for m in others if m not in ("_distutils_hack",)))
    print("python: %s" % sysconfig.get_python_version())


if __name__ == "__main__":
    main()
