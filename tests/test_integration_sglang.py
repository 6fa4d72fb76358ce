"""fastbcast.integrations.sglang against the real sglang package (0.5.23), over gloo.

Skipped when sglang is not installed (the skip reason says how to install the
integration extras). Every rank imports sglang once (seconds and hundreds of
MB per process), so all checks share one 2-rank run: SGLang's own
broadcast_pyobj and the patched one on the same payloads, identity of the
bindings in every module that holds the function (modules imported before and
after patch()), unpatch(), patch() twice, the INFO line, and the strict pickle
policy.
"""
from __future__ import annotations

import integ_helpers as H

H.require("sglang")

from distributed import run_distributed  # noqa: E402

# Every module of sglang 0.5.23 that binds sglang.srt.utils.common.broadcast_pyobj.
LOADED_BEFORE = (
    "sglang.srt.utils.common",
    "sglang.srt.utils",
    "sglang.srt.distributed",
    "sglang.srt.distributed.communication_op",
    "sglang.srt.managers.scheduler_components.request_receiver",
)
# Not imported by the modules above: imported after patch(), through tp_worker.
LOADED_AFTER = (
    "sglang.srt.managers.tp_worker",
    "sglang.srt.managers.scheduler_components.dynamic_chunk_sizer",
    "sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller",
)
# Stands in for verl <= 0.4's rollout module, which bound SGLang's function.
LEGACY_VERL = "verl.workers.rollout.sglang_rollout.fastbcast_test_legacy"


def _payloads(src: int) -> list:
    """The lists the scheduler and its helpers broadcast; built alike on every rank."""
    from fractions import Fraction

    from sglang.srt.managers.io_struct import AbortReq, BatchTokenizedGenerateReqInput, FlushCacheReqInput

    reqs = H.make_sglang_requests(6, seed=src)
    return [
        reqs,                                                     # a step's new requests
        H.make_sglang_requests(1, seed=50 + src, min_len=12000, max_len=12000),  # > the 64 KiB first chunk
        [],                                                       # an idle step
        [AbortReq(rid=reqs[0].rid), reqs[1], FlushCacheReqInput()],  # work and control requests
        [BatchTokenizedGenerateReqInput(batch=reqs[2:5])],
        [1234 + src],                                             # tp_worker's random seed
        [([512, 1024], [0.5, 0.75])],                             # dynamic_chunk_sizer's samples
        [None],                                                   # its failure value
        [Fraction(1, 3 + src)],                                   # no native encoding: needs pickle
    ]


def _same_reqs(a, b) -> bool:
    from array import array

    def ids_typecodes(x):
        return [(type(r.input_ids), r.input_ids.typecode)
                for r in x if isinstance(getattr(r, "input_ids", None), array)]
    return a == b and [type(x) for x in a] == [type(x) for x in b] and ids_typecodes(a) == ids_typecodes(b)


def _sglang_rank(rank: int, world_size: int) -> dict:
    import logging
    import sys
    import types

    H.ensure_torchvision_importable()
    import torch.distributed as dist

    import sglang.srt.managers.io_struct  # noqa: F401  (the scheduler has it loaded)
    import sglang.srt.managers.scheduler_components.request_receiver as receiver
    import sglang.srt.utils.common as common

    import fastbcast
    import fastbcast.integrations.sglang as fb_sglang

    original = common.broadcast_pyobj
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    fb_logger = logging.getLogger("fastbcast")
    fb_logger.addHandler(handler)
    fb_logger.setLevel(logging.INFO)
    legacy = types.ModuleType(LEGACY_VERL)
    legacy.broadcast_pyobj = original
    sys.modules[LEGACY_VERL] = legacy

    group = dist.new_group([0, 1], backend="gloo")  # what SGLang's tp_group.cpu_group is
    res = {"errors": []}

    def check(cond, what):
        if not cond:
            res["errors"].append(what)

    def run_all(fn, tag):
        """Each payload from each source, called as SGLang calls it: data on the source, None elsewhere."""
        out = []
        for src in (0, 1):
            for i, data in enumerate(_payloads(src)):
                got = fn(data if rank == src else None, rank, group, src=src)
                check(_same_reqs(got, data), f"{tag}: payload {i} from {src} differs on rank {rank}")
                if rank == src:
                    check(got is data, f"{tag}: the source did not get its own list back")
                out.append(got)
        return out

    # SGLang's own function first.
    check(fb_sglang.original() is None and not fb_sglang.is_patched(), "patched before patch()")
    theirs = run_all(original, "sglang")

    # patch(), twice: the second call changes nothing and logs nothing.
    names = fb_sglang.patch()
    check(fb_sglang.patch() == names, "second patch() returned other modules")
    check(fb_sglang.is_patched() and fb_sglang.original() is original, "is_patched()/original()")
    info = [r.getMessage() for r in records if r.levelno == logging.INFO and r.getMessage().startswith("patched ")]
    check(len(info) == 2 and "point_to_point_pyobj" in info[1], f"expected one INFO line per function, got {info}")
    res["info"] = info
    for m in LOADED_BEFORE + (LEGACY_VERL,):
        check(sys.modules[m].broadcast_pyobj is fb_sglang.broadcast_pyobj, f"{m} not patched")
        check(m in names, f"{m} not reported")
    import sglang.srt.managers.tp_worker  # noqa: F401  (brings in the other two)
    for m in LOADED_AFTER:
        check(sys.modules[m].broadcast_pyobj is fb_sglang.broadcast_pyobj, f"{m} (imported later) not patched")
        check(m in fb_sglang.patched_modules(), f"{m} not in patched_modules()")
    if rank == 0:  # a different function of the same name, outside sglang.srt: left alone
        import sglang.multimodal_gen.runtime.distributed.utils as mg
        check(mg.broadcast_pyobj is not fb_sglang.broadcast_pyobj, "multimodal_gen's broadcast_pyobj replaced")

    # The patched function, reached as the scheduler reaches it, gives SGLang's results.
    ours = run_all(receiver.broadcast_pyobj, "patched")
    check(len(ours) == len(theirs) and all(_same_reqs(a, b) for a, b in zip(ours, theirs)),
          "patched results differ from SGLang's")

    # Strict: the request lists need no pickle; an object that does is refused on every rank.
    fb_sglang.patch(allow_pickle=False)
    for src in (0, 1):
        data = _payloads(src)
        for i in (0, 1, 3, 4):
            got = receiver.broadcast_pyobj(data[i] if rank == src else None, rank, group, src=src)
            check(_same_reqs(got, data[i]), f"strict: payload {i} from {src} differs")
    try:
        receiver.broadcast_pyobj(data[-1] if rank == 1 else None, rank, group, src=1)
        check(False, "strict: a Fraction went through")
    except (TypeError, fastbcast.BroadcastError) as e:
        res["strict_error"] = (type(e).__name__, str(e))
    # The rank trap through the patched binding: a group rank that is not this process's global one.
    sub = dist.new_group([1], backend="gloo")
    if rank == 1:
        try:
            receiver.broadcast_pyobj([1], 0, sub, src=1)
            check(False, "wrong rank accepted")
        except ValueError as e:
            res["trap"] = str(e)

    # unpatch(): SGLang's function everywhere again, the later-imported modules included.
    restored = fb_sglang.unpatch()
    check(not fb_sglang.is_patched(), "still patched")
    for m in LOADED_BEFORE + LOADED_AFTER + (LEGACY_VERL,):
        check(sys.modules[m].broadcast_pyobj is original, f"{m} not restored")
        check(m in restored, f"{m} not reported as restored")
    check(fb_sglang.unpatch() == (), "second unpatch() did something")
    dist.barrier()
    return res


def test_sglang_integration_gloo():
    results = run_distributed(_sglang_rank, 2, timeout=300)
    for rank, res in enumerate(results):
        assert res["errors"] == [], (rank, res["errors"])
        assert "sglang.srt.managers.scheduler_components.request_receiver" in res["info"][0]
    # The strict refusal: the source names the unsupported object, the receiver learns why.
    assert results[1]["strict_error"][0] == "TypeError" and "Fraction" in results[1]["strict_error"][1]
    assert results[0]["strict_error"][0] == "BroadcastError" and "Fraction" in results[0]["strict_error"][1]
    assert "rank=0 is not this process's global rank" in results[1]["trap"]
