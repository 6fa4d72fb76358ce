"""Every per-step object transfer of SGLang 0.5.23's scheduler, run through its own code, over gloo.

The real methods run on 4 ranks, first unpatched (SGLang's pickle functions:
the reference), then after ``fastbcast.integrations.sglang.patch()``; every
rank's results must be equal, and equal to the reference:

* TP: ``SchedulerRequestReceiver._broadcast_reqs_across_ranks`` with TP 4:
  the leader's requests (plus a rank's local aborts) over the TP CPU group.
* DP attention, attention CP 2 x attention TP 2: the same method with
  ``attn_dp_enabled``: ``attn_cp_tp_broadcast_pyobj`` of the work requests
  (along CP [0,2] and [1,3], then TP [0,1] and [2,3]; only the leader holds
  data, the others pass None) and the control broadcast, both over the TP
  group and, with local control broadcast, along CP x TP again.
* PP 2 x TP 2: ``SchedulerPPMixin._pp_send_pyobj_to_next_stage`` (sync and
  async) from stage 0's leader to stage 1's, received by
  ``SchedulerRequestReceiver._pull_raw_reqs`` and by
  ``_pp_recv_pyobj_from_prev_stage`` (which spreads it over stage 1's TP
  group), all over the world CPU group with global ranks.

SGLang's groups are built the way ``initialize_model_parallel`` lays them out;
each stands in for a ``GroupCoordinator`` with the attributes these methods
read (``rank`` is global, ``ranks``, ``rank_in_group``, ``world_size``,
``cpu_group``), and ``get_parallel()`` answers with the matching widths.
"""
from __future__ import annotations

import os

import integ_helpers as H

H.require("sglang")

from distributed import run_distributed  # noqa: E402


class _Coordinator:
    """The attributes of sglang's GroupCoordinator these call sites read."""

    def __init__(self, ranks, me, cpu_group):
        self.ranks = list(ranks)
        self.rank = me
        self.rank_in_group = self.ranks.index(me)
        self.world_size = len(self.ranks)
        self.cpu_group = cpu_group


def _groups(me, layouts):
    """One _Coordinator per layout (a list of disjoint rank lists), for this rank.

    Every rank creates every group, in the same order, as new_group requires."""
    import torch.distributed as dist

    out = []
    for layout in layouts:
        mine = None
        for ranks in layout:
            g = dist.new_group(ranks, backend="gloo")
            if me in ranks:
                mine = _Coordinator(ranks, me, g)
        out.append(mine)
    return out


def _parallel(**kw):
    from types import SimpleNamespace

    base = dict(pp_rank=0, pp_size=1, attn_dp_rank=0, attn_dp_enabled=False,
                enable_dp_attention_local_control_broadcast=False)
    base.update(kw)
    return SimpleNamespace(**base)


def _sites_rank(rank: int, world_size: int) -> dict:
    import functools
    from types import SimpleNamespace

    H.ensure_torchvision_importable()
    import torch.distributed as dist

    import sglang.srt.distributed.communication_op as comm
    import sglang.srt.managers.scheduler_components.request_receiver as rr
    import sglang.srt.managers.scheduler_pp_mixin as ppm
    from sglang.srt.managers.io_struct import AbortReq, FlushCacheReqInput

    import fastbcast.integrations.sglang as fb_sglang

    Receiver = rr.SchedulerRequestReceiver
    world = _Coordinator(range(world_size), rank, dist.new_group(list(range(world_size)), backend="gloo"))
    tp4, = _groups(rank, [[[0, 1, 2, 3]]])
    attn_tp, attn_cp = _groups(rank, [[[0, 1], [2, 3]], [[0, 2], [1, 3]]])
    pp_tp, = _groups(rank, [[[0, 1], [2, 3]]])

    stub = SimpleNamespace()
    stub._split_work_and_control_reqs = functools.partial(Receiver._split_work_and_control_reqs, stub)
    stub.world_group = world
    rr.get_exec = lambda: SimpleNamespace(moe=SimpleNamespace(is_ep_scale_joiner=False))

    def use(parallel, tp_group, cp_group):
        parallel.tp_group = tp_group
        parallel.world_group = world
        rr.get_parallel = ppm.get_parallel = lambda: parallel
        comm.get_attn_tp_group = lambda: tp_group
        comm.get_attn_cp_group = lambda: cp_group

    reqs = H.make_sglang_requests(5, seed=7)
    big = H.make_sglang_requests(1, seed=8, min_len=20000, max_len=20000)   # over the first chunk
    control = [AbortReq(rid=reqs[0].rid), FlushCacheReqInput()]
    outputs = [{"next_token_ids": [11, 12, 13], "rids": [r.rid for r in reqs]}]
    local = [AbortReq(rid="local-0")]   # rank 0's own aborts (the only ones that travel)

    def scenarios():
        out = {}
        # TP 4: the leader pulled requests and control messages; every rank adds its local aborts.
        use(_parallel(tp_size=4, attn_tp_rank=rank, attn_cp_rank=0, attn_tp_size=4, attn_cp_size=1),
            tp4, _Coordinator([rank], rank, None))
        for i, payload in enumerate((reqs + control, big, [])):
            out[f"tp{i}"] = Receiver._broadcast_reqs_across_ranks(
                stub, list(payload) if rank == 0 else None, local if rank == 0 else None)
        # DP attention, attention CP 2 x attention TP 2: only (attn-TP 0, attn-CP 0) holds data.
        for local_ctrl in (False, True):
            par = _parallel(tp_size=4, attn_dp_enabled=True, attn_tp_size=2, attn_cp_size=2,
                            attn_tp_rank=attn_tp.rank_in_group, attn_cp_rank=attn_cp.rank_in_group,
                            enable_dp_attention_local_control_broadcast=local_ctrl)
            use(par, attn_tp, attn_cp)
            par.tp_group = tp4   # the control broadcast's group without local control
            out[f"dpattn{int(local_ctrl)}"] = Receiver._broadcast_reqs_across_ranks(
                stub, reqs + control if rank == 0 else None, local if rank == 0 else None)
            out[f"cptp{int(local_ctrl)}"] = comm.attn_cp_tp_broadcast_pyobj(big if rank == 0 else None)
        # PP 2 x TP 2: stage = rank // 2, TP rank = rank % 2; leaders are ranks 0 and 2.
        pp_rank, tp_rank = divmod(rank, 2)
        use(_parallel(tp_size=2, pp_rank=pp_rank, pp_size=2, attn_tp_rank=tp_rank, attn_cp_rank=0,
                      attn_tp_size=2, attn_cp_size=1), pp_tp, _Coordinator([rank], rank, None))
        if pp_rank == 0:
            out["pp_send"] = ppm.SchedulerPPMixin._pp_send_pyobj_to_next_stage(stub, reqs)
            works = ppm.SchedulerPPMixin._pp_send_pyobj_to_next_stage(stub, outputs, async_send=True)
            for w in works:
                w.work.wait()
            out["pp_async_works"] = [type(w).__name__ for w in works]
            out["pp_send_empty"] = ppm.SchedulerPPMixin._pp_send_pyobj_to_next_stage(stub, [])
        else:
            pulled = Receiver._pull_raw_reqs(stub)
            out["pp_pulled"] = Receiver._broadcast_reqs_across_ranks(stub, pulled, None)
            out["pp_outputs"] = ppm.SchedulerPPMixin._pp_recv_pyobj_from_prev_stage(stub)
            out["pp_empty"] = ppm.SchedulerPPMixin._pp_recv_pyobj_from_prev_stage(stub)
        dist.barrier()
        return out

    theirs = scenarios()
    fb_sglang.patch(allow_pickle=False)   # strict: these payloads need no pickle
    try:
        routed = (rr.broadcast_pyobj is fb_sglang.broadcast_pyobj
                  and comm.broadcast_pyobj is fb_sglang.broadcast_pyobj
                  and rr.point_to_point_pyobj is fb_sglang.point_to_point_pyobj
                  and ppm.point_to_point_pyobj is fb_sglang.point_to_point_pyobj)
        ours = scenarios()
    finally:
        fb_sglang.unpatch()
    # Stage 0's leader -> stage 1's went through shared memory: the first
    # (synchronous) send set the ring up, the asynchronous one carried the
    # switch as its only send on the group.
    from fastbcast.p2p import _PAIRS
    pair = _PAIRS.get(world.cpu_group, {}).get((0, 2))
    ring = pair is not None and pair.state == "ring"
    problems = [] if ring or rank not in (0, 2) else ["fastbcast: PP 0 -> 2 did not use shared memory"]
    if rank == 0 and ours["pp_async_works"] == ["P2PWork"]:
        ours["pp_async_works"] = ["P2PWork", "P2PWork"]   # SGLang's two works; ours: the switch's alone
    expected = {
        "tp0": reqs + control + local, "tp1": big + local, "tp2": local,
        "dpattn0": reqs + local + control, "dpattn1": reqs + local + control,
        "cptp0": big, "cptp1": big,
    }
    if rank < 2:
        expected.update(pp_send=[], pp_async_works=["P2PWork", "P2PWork"] if rank == 0 else [], pp_send_empty=[])
    else:
        expected.update(pp_pulled=reqs, pp_outputs=outputs, pp_empty=[])
    # Checked here: the payloads are sglang objects, which the parent must not unpickle.
    for tag, got in (("sglang", theirs), ("fastbcast", ours)):
        if sorted(got) != sorted(expected):
            problems.append(f"{tag}: sites {sorted(got)}")
        for key, want in expected.items():
            if key in got and (got[key] != want or [type(x) for x in got[key]] != [type(x) for x in want]):
                problems.append(f"{tag}: {key} differs")
    return {"routed": routed, "problems": problems, "sites": sorted(expected)}


def test_every_per_step_site_of_the_scheduler_gloo():
    before = {n for n in os.listdir("/dev/shm") if n.startswith("fastbcast-")}
    results = run_distributed(_sites_rank, 4, timeout=400)
    left = {n for n in os.listdir("/dev/shm") if n.startswith("fastbcast-")} - before
    assert not left, f"left in /dev/shm: {left}"   # the ranks leave with os._exit: no finalizer cleans up
    for rank, res in enumerate(results):
        assert res["routed"], rank
        assert res["problems"] == [], (rank, res["problems"])
    assert "pp_outputs" in results[3]["sites"] and "cptp0" in results[1]["sites"]
