"""fastbcast.integrations.sglang against whichever SGLang release is installed, over gloo.

`make test` runs it with sglang 0.5.23 (.venv) and `make test-releases` with
0.5.12 (.venv-sglang0512, verl 0.9.1's pin), where SGLang's own modules import
as they are (its CUDA kernel package stood in for where the release imports
it at module level). One 2-rank run:

* the scheduler modules of the release are imported; every module under
  ``sglang.srt`` that binds ``broadcast_pyobj`` or ``point_to_point_pyobj``
  is found by identity before ``patch()``, and each holds fastbcast's
  function after it and SGLang's again after ``unpatch()``;
* SGLang's own functions and the patched bindings, called as the scheduler
  calls them (data on the source, None or [] elsewhere; global ranks; the
  TP CPU group; the world CPU group for point-to-point), give equal results,
  under the default pickle policy (what a user gets; strict mode needs
  sglang >= 0.5.2x, whose SamplingParams the codec represents natively).
"""
from __future__ import annotations

import integ_helpers as H

H.require("sglang")

from distributed import run_distributed  # noqa: E402

# The modules that hold the per-step call sites, by release: 0.5.23 moved the
# request receive out of scheduler.py into scheduler_components.
SCHEDULER_MODULES = (
    "sglang.srt.managers.scheduler_components.request_receiver",   # >= 0.5.2x
    "sglang.srt.managers.scheduler",                               # <= 0.5.12 (the receive is here)
    "sglang.srt.managers.scheduler_pp_mixin",
    "sglang.srt.distributed.communication_op",
)


def _bindings(fn) -> set:
    import sys

    return {(name, attr) for name, mod in list(sys.modules.items())
            if isinstance(name, str) and name.startswith("sglang.srt")
            for attr, value in list(getattr(mod, "__dict__", {}).items()) if value is fn}


def _release_rank(rank: int, world_size: int) -> dict:
    import importlib
    import importlib.metadata

    H.ensure_torchvision_importable()
    H.stub_cuda_kernels()
    import torch.distributed as dist

    import sglang.srt.utils.common as common

    import fastbcast.integrations.sglang as fb_sglang

    loaded = []
    for name in SCHEDULER_MODULES:
        if name == "sglang.srt.managers.scheduler" and loaded:
            continue   # the newer layout has its receive in request_receiver: skip the heavy import
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if not name.startswith(e.name or "-"):
                raise   # a dependency is missing, not the module
            continue
        loaded.append(name)
    orig_b, orig_p = common.broadcast_pyobj, common.point_to_point_pyobj
    before_b, before_p = _bindings(orig_b), _bindings(orig_p)
    res = {"version": importlib.metadata.version("sglang"), "loaded": loaded, "errors": []}

    def check(cond, what):
        if not cond:
            res["errors"].append(what)

    world = dist.new_group([0, 1], backend="gloo")   # SGLang's cpu_group: gloo, global ranks
    reqs = H.make_sglang_requests(4, seed=3)
    big = H.make_sglang_requests(1, seed=4, min_len=30000, max_len=30000)
    step = {"next_token_ids": list(range(64)), "rids": [r.rid for r in reqs]}

    def run(bcast, p2p):
        out = []
        for data in (reqs, big, []):
            out.append(bcast(data if rank == 0 else None, rank, world, src=0))
        for data in (reqs, [step], []):
            got = p2p(data if rank == 0 else [], rank, world, 0, 1)
            out.append(got if rank == 1 else data)
        got = p2p([step] if rank == 1 else [], rank, world, 1, 0, async_send=True)
        if rank == 1:   # the source waits on its works, as the PP scheduler does
            for w in got:
                w.work.wait()
            got = [step] if len(got) == 2 else got
        out.append(got)
        return out

    def norm(x):
        """A comparable form: plain classes (0.5.12's SamplingParams) have no __eq__."""
        if isinstance(x, (list, tuple)):
            return (type(x).__name__, [norm(v) for v in x])
        if isinstance(x, dict):
            return ("dict", [(k, norm(v)) for k, v in x.items()])
        fields = getattr(x, "__dict__", None)
        if fields is None and hasattr(type(x), "__slots__"):
            fields = {k: getattr(x, k) for k in type(x).__slots__ if hasattr(x, k)}
        if fields is not None and not isinstance(x, type):
            return (type(x).__qualname__, norm(dict(fields)))
        return (type(x).__name__, x)

    def same(a, b):
        return norm(a) == norm(b)

    theirs = run(orig_b, orig_p)
    # The default policy: sglang <= 0.5.12's SamplingParams is a plain class the
    # codec cannot represent, so it travels as a pickle inside each request.
    fb_sglang.patch()
    try:
        ours = run(fb_sglang.broadcast_pyobj, fb_sglang.point_to_point_pyobj)
        for name, attr in before_b:
            check(vars(importlib.import_module(name))[attr] is fb_sglang.broadcast_pyobj, f"{name}.{attr}")
        for name, attr in before_p:
            check(vars(importlib.import_module(name))[attr] is fb_sglang.point_to_point_pyobj, f"{name}.{attr}")
        check(set(fb_sglang.patched_modules()) >= {n for n, _ in before_b | before_p}, "patched_modules()")
    finally:
        fb_sglang.unpatch()
    check(_bindings(orig_b) >= before_b and _bindings(orig_p) >= before_p, "not restored")
    check(len(theirs) == len(ours), "result counts differ")
    for i, (a, b) in enumerate(zip(theirs, ours)):
        if not same(a, b):
            na, nb = repr(norm(a)), repr(norm(b))
            k = next((j for j in range(min(len(na), len(nb))) if na[j] != nb[j]), 0)
            check(False, f"result {i} differs at: {na[max(0, k - 150):k + 100]!r} vs {nb[max(0, k - 150):k + 100]!r}")
    res["sites"] = sorted({n for n, _ in before_b | before_p})
    dist.barrier()
    return res


def test_sglang_release_gloo():
    results = run_distributed(_release_rank, 2, timeout=600)
    for rank, res in enumerate(results):
        assert res["errors"] == [], (rank, res["version"], res["errors"])
    sites = results[0]["sites"]
    assert "sglang.srt.managers.scheduler_pp_mixin" in sites
    assert ("sglang.srt.managers.scheduler" in sites
            or "sglang.srt.managers.scheduler_components.request_receiver" in sites), sites
