"""Multi-process test helper: run one function on N spawned torch.distributed ranks.

Usage (from a test module; tests/conftest.py puts tests/ on sys.path)::

    from distributed import run_distributed

    def _check(rank, world_size, payload):      # module level: it is pickled
        ...
        return something_picklable

    def test_it():
        results = run_distributed(_check, 4, "payload")   # one entry per rank

Each rank is a fresh interpreter started with the "spawn" context, so the test
module is imported again in every child: keep module-level work cheap and put
nothing there that needs a process group.
"""
from __future__ import annotations

import contextlib
import datetime
import faulthandler
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
import traceback

import torch

__all__ = ["run_distributed", "run_distributed_may_die", "free_port", "gpu_count", "requires_gpus", "run_checks",
           "expect_check_ok"]

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# After one rank fails, how long the others get to finish on their own before
# they are killed: a rank blocked in a collective with a dead peer may never
# return, and a failed run should not sit out the whole timeout.
_GRACE_AFTER_FAILURE_S = 10.0
# How long a hung rank gets to write its stacks (SIGUSR1 -> faulthandler)
# before SIGKILL.
_STACK_DUMP_WAIT_S = 1.0


def gpu_count() -> int:
    """The number of CUDA devices this process can see (0 on a CPU-only torch)."""
    try:
        return torch.cuda.device_count()
    except Exception:  # pragma: no cover - a broken driver counts as no GPU
        return 0


def requires_gpus(n: int):
    """A pytest mark that skips a test unless at least ``n`` CUDA devices are visible."""
    import pytest  # here, not at the top: every spawned rank imports this module

    found = gpu_count()
    return pytest.mark.skipif(found < n, reason=f"needs {n} CUDA devices, found {found}")


def hook_broadcasts(before) -> "callable":
    """Calls `before()` as fastbcast starts each broadcast collective: every
    one goes through `fastbcast.transport.post_bcast` once the one-call path
    (collectives made from C++) is off, as it is while hooked. Returns the
    function that removes the hook."""
    from fastbcast import stream, transport

    orig, one_call = transport.post_bcast, transport.ONE_CALL
    transport.ONE_CALL = False

    def hooked(*args, **kwargs):
        before()
        return orig(*args, **kwargs)

    for m in (transport, stream):
        m.post_bcast = hooked

    def restore():
        for m in (transport, stream):
            m.post_bcast = orig
        transport.ONE_CALL = one_call

    return restore


class CountBroadcasts:
    """Counts the broadcast collectives fastbcast starts while active; `n`
    (also `count`) is the count."""

    def __enter__(self):
        self.n = 0

        def count():
            self.n += 1

        self._restore = hook_broadcasts(count)
        return self

    def __exit__(self, *exc):
        self._restore()

    @property
    def count(self):
        return self.n


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now.

    The kernel picks it (bind to port 0), so concurrent test runs on one
    machine do not collide the way a fixed port would. The port is released
    before rank 0's store binds it, so another process could in principle take
    it in between; the window is a few hundred milliseconds.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def _child(rank: int, world_size: int, port: int, backend: str, timeout: float,
           payload: bytes, workdir: str, sys_path: list[str]) -> None:
    """Entry point of one spawned rank. Module level so that spawn can pickle it."""
    for p in reversed(sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    result_path = os.path.join(workdir, f"rank{rank}.result")
    # A run started in the background (`cmd &` from a script) hands its
    # children SIGINT ignored; the Ctrl-C checks need Python's handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # On SIGUSR1 (sent by the parent when this rank hangs) write every
    # thread's Python stack to a file the parent puts in its failure message.
    stacks = open(os.path.join(workdir, f"rank{rank}.stacks"), "w")
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # many ranks share few cores in CI

    import torch.distributed as dist

    status, value = "ok", None
    try:
        fn, args, kwargs = pickle.loads(payload)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size,
                                timeout=datetime.timedelta(seconds=max(timeout, 1)))
        _write_atomic(result_path, ("ok", fn(rank, world_size, *args, **kwargs)))
    except BaseException:
        status, value = "error", traceback.format_exc()
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except BaseException:
            if status == "ok":
                status, value = "error", traceback.format_exc()
    if status != "ok":
        _write_atomic(result_path, (status, value))
        sys.stderr.write(f"[run_distributed] rank {rank} failed:\n{value}")
    # Skip interpreter teardown: with torch loaded it takes seconds when many
    # ranks share a few cores, and the result is already on disk. (atexit
    # handlers do not run in the ranks.)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(0 if status == "ok" else 1)


@contextlib.contextmanager
def _child_env():
    """Put the repo root and tests/ on PYTHONPATH while children start.

    spawn already ships the parent's sys.path to the child, but anything the
    child itself launches (or a child started by a plain interpreter) only sees
    PYTHONPATH.
    """
    old = os.environ.get("PYTHONPATH")
    parts = [_REPO_ROOT, _TESTS_DIR] + ([old] if old else [])
    os.environ["PYTHONPATH"] = os.pathsep.join(parts)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run_distributed(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 120,
                    **kwargs) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned ranks.

    Every rank is a fresh "spawn" process that joins a new default process group
    (``init_process_group(backend, init_method="tcp://127.0.0.1:PORT", ...)``
    on a free port; for ``"nccl"`` it first calls ``torch.cuda.set_device(rank)``),
    runs ``fn``, and destroys the group.

    Arguments:
        fn: a module-level (picklable) function taking ``(rank, world_size,
            *args, **kwargs)``; ``rank`` is the GLOBAL rank of the child.
        world_size: the number of ranks to start.
        *args, **kwargs: passed on to ``fn``; must be picklable.
        backend: the torch.distributed backend of the default group.
        timeout: seconds of wall time for the whole run, start-up included.
            Ranks still running then are killed with SIGKILL (after being
            asked to dump their Python stacks) and the test fails naming them.
            It is also the process group's collective timeout.

    Returns:
        The list of ``fn``'s return values, indexed by rank (each must be
        picklable; they travel through files in a temporary directory).

    A rank leaves with ``os._exit`` once its result is written and its group
    destroyed: interpreter teardown with torch loaded costs seconds when many
    ranks share a few cores. So atexit handlers do not run in the ranks. After
    one rank fails the others get 10 s to finish before they are killed.

    Raises:
        AssertionError: a rank raised (the message has each failing rank and
            its full traceback), exited with a non-zero code, or hung.
        TypeError: ``fn`` or the arguments cannot be pickled.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    try:
        payload = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        raise TypeError(f"run_distributed needs a module-level fn and picklable arguments: "
                        f"{type(e).__name__}: {e}") from e

    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fastbcast-dist-") as workdir:
        procs = []
        with _child_env():
            for rank in range(world_size):
                p = ctx.Process(target=_child, name=f"rank{rank}", daemon=True,
                                args=(rank, world_size, port, backend, timeout, payload, workdir,
                                      list(sys.path)))
                p.start()
                procs.append(p)

        start = time.monotonic()
        deadline = start + timeout
        first_failure = None
        hung: list[int] = []
        try:
            while True:
                alive = [p for p in procs if p.exitcode is None]
                if not alive:
                    break
                if first_failure is None and any(p.exitcode not in (None, 0) for p in procs):
                    first_failure = time.monotonic()
                    deadline = min(deadline, first_failure + _GRACE_AFTER_FAILURE_S)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    hung = [procs.index(p) for p in alive]
                    break
                multiprocessing.connection.wait([p.sentinel for p in alive],
                                                timeout=min(remaining, 1.0))
        finally:
            still = [p for p in procs if p.exitcode is None]
            for p in still:
                with contextlib.suppress(ProcessLookupError, OSError):
                    os.kill(p.pid, signal.SIGUSR1)
            if still:
                time.sleep(_STACK_DUMP_WAIT_S)
            for p in still:
                p.kill()
            for p in procs:
                p.join(5)
        elapsed = time.monotonic() - start

        results = {}
        for rank in range(world_size):
            path = os.path.join(workdir, f"rank{rank}.result")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    results[rank] = pickle.load(f)

        problems = []
        for rank, p in enumerate(procs):
            status, value = results.get(rank, (None, None))
            if status == "error":
                problems.append(f"--- rank {rank} raised ({_describe_exit(p.exitcode)}):\n{value}")
        if hung:
            lines = []
            for rank in hung:
                stack_path = os.path.join(workdir, f"rank{rank}.stacks")
                with contextlib.suppress(OSError), open(stack_path) as f:
                    stacks = f.read().strip()
                lines.append(f"--- rank {rank} stacks when killed:\n{stacks or '(none written)'}")
            why = (f"after another rank failed ({_GRACE_AFTER_FAILURE_S:.0f} s grace)"
                   if first_failure is not None else f"past the {timeout} s timeout")
            problems.insert(0, f"ranks {hung} hung: still running {why}, killed with SIGKILL "
                               f"after {elapsed:.1f} s\n" + "\n".join(lines))
        for rank, p in enumerate(procs):
            if rank in hung or results.get(rank, (None,))[0] == "error":
                continue
            if p.exitcode != 0:
                problems.append(f"--- rank {rank} {_describe_exit(p.exitcode)} without "
                                f"reporting a Python exception")
            elif rank not in results:
                problems.append(f"--- rank {rank} exited 0 but wrote no result")
        if problems:
            failed = sorted({r for r in range(world_size)
                             if r in hung or results.get(r, (None,))[0] != "ok"})
            raise AssertionError(
                f"run_distributed({getattr(fn, '__qualname__', fn)}, world_size={world_size}, "
                f"backend={backend!r}): ranks {failed} failed\n" + "\n".join(problems))
        return [results[rank][1] for rank in range(world_size)]


def run_distributed_may_die(fn, world: int, *args, timeout: float = 120) -> dict:
    """Like run_distributed, but a rank may die (fault tests): returns {rank:
    ("ok", value) | ("error", traceback) | ("died", exitcode) | ("hung", None)}."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    payload = pickle.dumps((fn, args, {}))
    with tempfile.TemporaryDirectory(prefix="fastbcast-kill-") as workdir, _child_env():
        procs = [ctx.Process(target=_child, daemon=True,
                             args=(r, world, port, "gloo", timeout, payload, workdir, list(sys.path)))
                 for r in range(world)]
        for p in procs:
            p.start()
        # Wait until every rank has written a result or died; a survivor may
        # then spend a while in destroy_process_group with dead peers.
        deadline = time.monotonic() + timeout
        done_at = None
        while time.monotonic() < deadline and any(p.exitcode is None for p in procs):
            settled = all(p.exitcode is not None or os.path.exists(os.path.join(workdir, f"rank{r}.result"))
                          for r, p in enumerate(procs))
            if settled and done_at is None:
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at > 3:
                break
            time.sleep(0.1)
        out = {}
        for r, p in enumerate(procs):
            path = os.path.join(workdir, f"rank{r}.result")
            if p.exitcode is None:
                p.kill()
                p.join(5)
                if not os.path.exists(path):
                    out[r] = ("hung", None)
                    continue
            if os.path.exists(path):
                with open(path, "rb") as f:
                    out[r] = pickle.load(f)
            else:
                out[r] = ("died", p.exitcode)
        return out


# ---------------------------------------------------------------------------
# Many checks in one spawned world
# ---------------------------------------------------------------------------
# Spawning a world costs seconds, so a test module runs all its checks in one
# world (a module-scoped fixture calls run_distributed(fn, ...) where fn calls
# run_checks), and each test function reports one check with expect_check_ok.

def run_checks(rank: int, checks: dict, names, outdir: str, barrier_each: bool = False) -> dict:
    """On one rank: runs checks[name](rank, world_size) for each name in
    order, writing '<outdir>/<name>.rank<r>' with 'ok <seconds>' (then the
    value's repr, if any) or the traceback. Returns {name: value}. A failing
    check does not stop the others. barrier_each: a barrier after each check
    (when checks must not overlap across ranks)."""
    import torch.distributed as dist

    world_size = dist.get_world_size()
    results = {}
    for name in names:
        started = time.monotonic()
        try:
            value = checks[name](rank, world_size)
            status = f"ok {time.monotonic() - started:.2f}" + ("" if value is None else f"\n{value!r}")
        except BaseException:
            value, status = None, traceback.format_exc() + f"\n(after {time.monotonic() - started:.1f} s)"
        results[name] = value
        path = os.path.join(outdir, f"{name}.rank{rank}")
        with open(path + ".tmp", "w") as f:
            f.write(status)
        os.replace(path + ".tmp", path)
        if barrier_each:
            dist.barrier()
    return results


def expect_check_ok(outdir: str, world_size: int, name: str, run_error: str | None = None) -> None:
    """Fails the calling test unless every rank wrote 'ok' for check `name`;
    the message holds each failing rank's traceback, and the run's own error
    (from run_distributed) if it failed."""
    import pytest

    problems = []
    for r in range(world_size):
        path = os.path.join(outdir, f"{name}.rank{r}")
        if not os.path.exists(path):
            problems.append(f"--- rank {r}: no result (the run ended before this check)")
            continue
        with open(path) as f:
            text = f.read()
        if not text.startswith("ok "):
            problems.append(f"--- rank {r}:\n{text}")
    if problems:
        detail = "\n".join(problems) + (f"\n=== the run itself failed:\n{run_error[:6000]}" if run_error else "")
        pytest.fail(f"check {name!r} failed:\n{detail}", pytrace=False)
