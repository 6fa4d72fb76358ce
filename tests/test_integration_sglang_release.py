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

    import sys

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

    norm = _norm

    def same(a, b):
        return norm(a) == norm(b)

    sched = sys.modules.get("sglang.srt.managers.scheduler")
    recv = getattr(getattr(sched, "Scheduler", None), "recv_requests", None)
    if recv is not None and "broadcast_pyobj" in recv.__code__.co_names:
        res["scheduler_sites"] = _scheduler_sites(rank, world, sched)   # the release's own per-step code
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


def _scheduler_sites(rank: int, world, sched) -> dict:
    """Where the release's scheduler does its per-step receive in
    ``Scheduler.recv_requests`` (0.5.12 and before): that method itself, on
    a stand-in ``self`` with the attributes it reads and a real zmq socket
    from the "tokenizer", over the real gloo group, unpatched then patched:

    * TP 2: rank 0 pulls the requests and a control message, then
      ``broadcast_pyobj`` over the TP CPU group;
    * DP attention (attention TP 2): the work/control split, the work
      broadcast over the attention TP group and the control one over TP;
    * PP 2 x TP 1: ``SchedulerPPMixin._pp_send_pyobj_to_next_stage`` (sync,
      then async) on stage 0; stage 1 receives with ``recv_requests``
      (``point_to_point_pyobj`` over the world group) and
      ``_pp_recv_pyobj_from_prev_stage``.

    Returns the problems found (empty: every result equals the expected
    one, unpatched and patched)."""
    import functools
    import secrets
    from types import SimpleNamespace

    import zmq

    import sglang.srt.managers.mm_utils as mm_utils
    import sglang.srt.managers.scheduler_pp_mixin as ppm
    from sglang.srt.managers.io_struct import AbortReq

    import fastbcast.integrations.sglang as fb_sglang

    S = sched.Scheduler
    # The one server setting the receive path reads through a global: the
    # default tensor transport (no shared-memory multimodal features).
    mm_utils._is_default_tensor_transport = True
    ctx = zmq.Context.instance()
    keep = []

    def tokenizer(items):
        """A real PULL socket holding `items`, as the tokenizer's pushes leave it."""
        name = f"inproc://fastbcast-{secrets.token_hex(6)}"
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.bind(name)
        push.connect(name)
        for x in items:
            push.send_pyobj(x)
        assert not items or pull.poll(5000)
        keep.extend((pull, push))
        return pull

    def stub(items=(), **kw):
        s = SimpleNamespace(
            recv_skipper=None, input_blocker=None, pp_rank=0, pp_size=1, attn_tp_rank=rank, attn_cp_rank=0,
            attn_dp_rank=0, attn_tp_size=2, attn_cp_size=1, tp_size=2, max_recv_per_poll=-1,
            server_args=SimpleNamespace(enable_dp_attention=False, language_only=False,
                                        enable_dp_attention_local_control_broadcast=False),
            model_config=SimpleNamespace(is_multimodal=False),
            tp_group=SimpleNamespace(rank=rank, ranks=[0, 1]), tp_cpu_group=world,
            attn_tp_group=SimpleNamespace(rank=rank, ranks=[0, 1]), attn_tp_cpu_group=world,
            world_group=SimpleNamespace(cpu_group=world))
        vars(s).update(kw)
        if rank == 0:
            s.recv_from_tokenizer, s.recv_from_rpc = tokenizer(list(items)), tokenizer([])
        s.recv_limit_reached = functools.partial(S.recv_limit_reached, s)
        s._split_work_and_control_reqs = functools.partial(S._split_work_and_control_reqs, s)
        return s

    reqs = H.make_sglang_requests(3, seed=5)
    abort = AbortReq(rid=reqs[0].rid)
    outputs = [{"next_token_ids": [7, 8], "rids": [r.rid for r in reqs]}]

    def scenarios():
        out = {"tp": S.recv_requests(stub(reqs + [abort]))}
        dp = stub(reqs + [abort], server_args=SimpleNamespace(
            enable_dp_attention=True, language_only=False, enable_dp_attention_local_control_broadcast=False))
        out["dp_attention"] = S.recv_requests(dp)
        pp = stub(pp_rank=rank, pp_size=2, tp_size=1, attn_tp_rank=0, attn_tp_size=1)
        if rank == 0:
            ppm.SchedulerPPMixin._pp_send_pyobj_to_next_stage(pp, reqs)
            for w in ppm.SchedulerPPMixin._pp_send_pyobj_to_next_stage(pp, outputs, async_send=True):
                w.work.wait()
        else:
            out["pp_recv"] = S.recv_requests(pp)
            out["pp_outputs"] = ppm.SchedulerPPMixin._pp_recv_pyobj_from_prev_stage(pp)
        return out

    expected = {"tp": reqs + [abort], "dp_attention": reqs + [abort]}
    if rank == 1:
        expected.update(pp_recv=reqs, pp_outputs=outputs)
    problems = []
    for tag in ("sglang", "fastbcast"):
        if tag == "fastbcast":
            fb_sglang.patch()
        try:
            got = scenarios()
        finally:
            fb_sglang.unpatch()
        for key, want in expected.items():
            if repr(_norm(got.get(key))) != repr(_norm(want)):
                problems.append(f"{tag}: {key} differs: {_norm(got.get(key))!r:.300}")
    for sock in keep:
        sock.close(0)
    return {"checked": sorted(expected), "problems": problems}


def _norm(x):
    """A comparable form: plain classes (0.5.12's SamplingParams) have no __eq__."""
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [_norm(v) for v in x])
    if isinstance(x, dict):
        return ("dict", [(k, _norm(v)) for k, v in x.items()])
    fields = getattr(x, "__dict__", None)
    if fields is None and hasattr(type(x), "__slots__"):
        fields = {k: getattr(x, k) for k in type(x).__slots__ if hasattr(x, k)}
    if fields is not None and not isinstance(x, type):
        return (type(x).__qualname__, _norm(dict(fields)))
    return (type(x).__name__, x)


def test_sglang_release_gloo():
    results = run_distributed(_release_rank, 2, timeout=600)
    for rank, res in enumerate(results):
        assert res["errors"] == [], (rank, res["version"], res["errors"])
    if results[0]["version"] == "0.5.12":   # its per-step receive, called directly
        for rank, res in enumerate(results):
            assert res["scheduler_sites"]["problems"] == [], (rank, res["scheduler_sites"])
        assert results[1]["scheduler_sites"]["checked"] == ["dp_attention", "pp_outputs", "pp_recv", "tp"]
    sites = results[0]["sites"]
    assert "sglang.srt.managers.scheduler_pp_mixin" in sites
    assert ("sglang.srt.managers.scheduler" in sites
            or "sglang.srt.managers.scheduler_components.request_receiver" in sites), sites
