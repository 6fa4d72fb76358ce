"""Tests of fastbcast.mesh.resolve on gloo with CPU processes, and of run_distributed.

Every multi-process check runs inside one of a few run_distributed calls:
spawning 8 ranks that import torch costs seconds on a small CI box, so each
call checks many things, and both 8-rank tests share one run (a module-scoped
fixture). The expected routes are computed here by hand from
the row-major layout of init_device_mesh, not with the code under test.
"""
import dataclasses
import importlib.util
import math
import os
import sys
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from distributed import run_distributed

_MESH_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "fastbcast", "mesh.py")


def _load_standalone(name="_fastbcast_mesh_standalone"):
    """Load fastbcast/mesh.py as a module of its own, without the package."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _MESH_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses looks the module up while building Route
    spec.loader.exec_module(mod)
    return mod


def _load_mesh():
    # fastbcast/__init__.py loads the C++ extension and the other modules;
    # mesh.py itself needs neither, so when the package cannot be imported
    # (extension not built, or another module broken mid-edit), test the file
    # on its own. The package import is covered by the other test modules.
    try:
        from fastbcast import mesh
    except Exception:
        return _load_standalone()
    return mesh


fbmesh = _load_mesh()
resolve = fbmesh.resolve


# --------------------------------------------------------------------------
# Expected values, by hand
# --------------------------------------------------------------------------

def _coords(rank, shape):
    """Row-major coordinates of a global rank in a mesh of this shape."""
    out = []
    for s in reversed(shape):
        out.append(rank % s)
        rank //= s
    return tuple(reversed(out))


def _slice(rank, shape, d):
    """Global ranks of the slice along dim d that contains rank (row-major mesh)."""
    stride = math.prod(shape[d + 1:])
    base = rank - _coords(rank, shape)[d] * stride
    return [base + k * stride for k in range(shape[d])]


def test_expected_slices_helper():
    # The hand-written helper itself, on the design brief's mesh (dp, tp, pp) = (4, 2, 1).
    shape = (4, 2, 1)
    assert [_slice(r, shape, 1) for r in range(8)] == [
        [0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [4, 5], [6, 7], [6, 7]]
    assert _slice(5, shape, 0) == [1, 3, 5, 7]
    assert _slice(5, shape, 2) == [5]
    assert _slice(6, (2, 2, 2), 1) == [4, 6]
    assert _slice(6, (2, 2, 2), 0) == [2, 6]


def _raises(exc, fn, *args, **kwargs):
    """Call fn, assert it raises exc, return the message."""
    try:
        fn(*args, **kwargs)
    except exc as e:
        return str(e)
    raise AssertionError(f"{fn.__name__}(*{args}, **{kwargs}) did not raise {exc.__name__}")


def _check_mesh(rank, shape, names):
    """Check resolve() on every dim of a fresh mesh; return what this rank saw."""
    m = init_device_mesh("cpu", shape, mesh_dim_names=names)
    seen = []
    for d, name in enumerate(names):
        exp = _slice(rank, shape, d)
        r = resolve(mesh=m, dim=name)
        assert r.ranks == tuple(exp), (shape, name, r.ranks, exp)
        assert r.src == exp[0] and r.src_group_rank == 0
        assert r.rank == rank and r.group_rank == exp.index(rank)
        assert r.size == shape[d] and r.is_src == (rank == exp[0])
        assert r.backend == "gloo"
        assert r.group is m.get_group(name)
        assert r == resolve(mesh=m, dim=name), "cached resolution differs"
        assert r == resolve(mesh=m, dim=d), "dim index and dim name differ"
        assert r == resolve(mesh=m, dim=name, rank=rank), "the right rank= was rejected"
        last = resolve(mesh=m, dim=name, src_group_rank=shape[d] - 1)
        assert last.src == exp[-1] and last.src_group_rank == shape[d] - 1
        assert last == resolve(mesh=m, dim=name, src=exp[-1]), "src= and src_group_rank= differ"
        assert last.is_src == (rank == exp[-1])
        # A global rank outside this slice is not a valid source.
        outside = [g for g in range(math.prod(shape)) if g not in exp]
        if outside:
            msg = _raises(ValueError, resolve, mesh=m, dim=name, src=outside[0])
            assert "global rank" in msg and "group rank" in msg, msg
        msg = _raises(ValueError, resolve, mesh=m, dim=name, src_group_rank=shape[d])
        assert "out of range" in msg and "group rank" in msg, msg
        seen.append((name, r.ranks, r.src, r.group_rank))
    if len(names) > 1:
        msg = _raises(ValueError, resolve, mesh=m)
        assert "dim= is required" in msg, msg
    msg = _raises(ValueError, resolve, mesh=m, dim="nope")
    assert "nope" in msg and names[0] in msg, msg
    return seen


def _expected_seen(rank, shape, names):
    return [(name, tuple(_slice(rank, shape, d)), _slice(rank, shape, d)[0],
             _slice(rank, shape, d).index(rank)) for d, name in enumerate(names)]


# --------------------------------------------------------------------------
# 2 ranks: the world group, argument errors, 1-D meshes
# --------------------------------------------------------------------------

def _two_ranks(rank, world_size):
    other = 1 - rank
    # The world group, given as None.
    r = resolve()
    assert r.group is None and r.ranks == (0, 1) and r.src == 0 and r.src_group_rank == 0
    assert r.rank == rank == r.group_rank and r.size == 2 and r.backend == "gloo"
    assert r.is_src == (rank == 0)
    assert resolve(rank=rank) == r
    # ... or as the world group object.
    w = resolve(group=dist.group.WORLD)
    assert w.group is dist.group.WORLD and w.ranks == r.ranks and w.src == 0
    # src= and src_group_rank= name the same rank in the world group.
    assert resolve(src=1) == resolve(src_group_rank=1)
    assert resolve(src=1).is_src == (rank == 1)
    # A one-element integer tensor works where an int does (mesh.mesh[0] is one).
    assert resolve(src=torch.tensor(1)).src == 1

    msg = _raises(ValueError, resolve, src=0, src_group_rank=0)
    assert "not both" in msg and "global rank" in msg and "group rank" in msg
    msg = _raises(ValueError, resolve, src=5)
    assert "src=5 (global rank) is not in the world group" in msg and "group ranks 0..1" in msg
    _raises(ValueError, resolve, src=-1)
    msg = _raises(ValueError, resolve, src_group_rank=2)
    assert "src_group_rank=2 (group rank) is out of range" in msg and "2 members" in msg
    _raises(ValueError, resolve, src_group_rank=-1)
    msg = _raises(ValueError, resolve, rank=other)
    assert f"rank={other} is not this process's global rank" in msg
    assert f"this process is global rank {rank}" in msg
    assert "group-local" not in msg  # in the world group the two spaces coincide
    msg = _raises(ValueError, resolve, rank=9)
    assert "torch.distributed.get_rank()" in msg
    _raises(TypeError, resolve, src="0")
    _raises(TypeError, resolve, src=True)
    _raises(TypeError, resolve, rank=1.0)
    _raises(TypeError, resolve, group="tp")

    # 1-D mesh: dim may be omitted.
    m1 = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    a = resolve(mesh=m1)
    assert a == resolve(mesh=m1, dim="tp") == resolve(mesh=m1, dim=0)
    assert a.ranks == (0, 1) and a.src == 0 and a.group_rank == rank
    assert resolve(mesh=m1, src_group_rank=1).src == 1
    # mesh and group are exclusive; dim needs a mesh; a mesh is not a group.
    msg = _raises(ValueError, resolve, mesh=m1, group=dist.group.WORLD)
    assert "not both" in msg
    import fastbcast   # its one-line broadcast refuses the pair too, rather than dropping group=
    msg = _raises(ValueError, fastbcast.broadcast, ["x"], mesh=m1, dim="tp", group=dist.group.WORLD)
    assert "not both" in msg
    _raises(ValueError, resolve, group=None, dim="tp")
    msg = _raises(TypeError, resolve, group=m1)
    assert "mesh=" in msg
    _raises(TypeError, resolve, mesh=dist.group.WORLD)
    msg = _raises(ValueError, resolve, mesh=m1, dim="dp")
    assert "'dp'" in msg and "tp" in msg
    _raises(ValueError, resolve, mesh=m1, dim=1)

    seen = {shape: _check_mesh(rank, shape, ("dp", "tp")) for shape in [(1, 2), (2, 1)]}
    seen[(1, 1, 2)] = _check_mesh(rank, (1, 1, 2), ("dp", "tp", "pp"))
    return rank * 10, seen


def test_two_ranks_world_group_errors_and_small_meshes():
    results = run_distributed(_two_ranks, 2)
    assert [v for v, _ in results] == [0, 10]  # run_distributed returns per-rank values
    for rank, (_, seen) in enumerate(results):
        for shape, got in seen.items():
            names = ("dp", "tp", "pp")[:len(shape)]
            assert got == _expected_seen(rank, shape, names), (rank, shape)


def test_not_initialized_raises():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialized"):
        resolve()


def test_mesh_py_needs_no_extension():
    mod = _load_standalone()
    assert callable(mod.resolve) and mod.Route.__dataclass_params__.frozen
    r = mod.Route(group=None, ranks=(2, 3), src=2, src_group_rank=0, rank=3, group_rank=1,
                  backend="gloo")
    assert r.size == 2 and not r.is_src
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.src = 3


# --------------------------------------------------------------------------
# 4 ranks: 2-D and 3-D meshes, subgroups, a permuted mesh
# --------------------------------------------------------------------------

def _four_ranks(rank, world_size):
    seen = {}
    for shape in [(2, 2), (4, 1), (1, 4)]:
        seen[shape] = _check_mesh(rank, shape, ("dp", "tp"))
    for shape in [(2, 2, 1), (1, 2, 2), (2, 1, 2)]:
        seen[shape] = _check_mesh(rank, shape, ("dp", "tp", "pp"))

    # Subgroups from new_group: every rank creates every group, in the same order.
    evens, odds = dist.new_group([0, 2]), dist.new_group([1, 3])
    upper = dist.new_group([2, 3])
    mine = evens if rank % 2 == 0 else odds
    members = [0, 2] if rank % 2 == 0 else [1, 3]
    r = resolve(group=mine)
    assert r.group is mine and r.ranks == tuple(members) and r.src == members[0]
    assert r.group_rank == members.index(rank) and r.src_group_rank == 0
    assert resolve(group=mine, src=members[1]) == resolve(group=mine, src_group_rank=1)
    assert resolve(group=mine, src=members[1]).is_src == (rank == members[1])

    if rank in (2, 3):
        r = resolve(group=upper)
        assert r.ranks == (2, 3) and r.src == 2 and r.group_rank == rank - 2
        # A group rank passed as src=: named as such, with the fix.
        msg = _raises(ValueError, resolve, group=upper, src=0)
        assert msg == ("src=0 (global rank) is not in the group [2, 3]; the group's ranks are "
                       "global ranks 2..3 (group ranks 0..1). If 0 is a group-local rank, pass "
                       "src_group_rank=0."), msg
        msg = _raises(ValueError, resolve, group=upper, src_group_rank=3)
        assert "src_group_rank=3 (group rank) is out of range" in msg
        assert "If 3 is a global rank, pass src=3." in msg, msg
        # The rank trap: the group-local rank passed as rank=.
        msg = _raises(ValueError, resolve, group=upper, rank=rank - 2)
        assert msg == (f"rank={rank - 2} is not this process's global rank: this process is "
                       f"global rank {rank} (group rank {rank - 2} in group [2, 3]); "
                       f"rank={rank - 2} looks like a group-local rank. Pass the global rank "
                       f"(torch.distributed.get_rank())."), msg
    else:
        # new_group hands non-members a marker, not a group: a clear error, no hang.
        msg = _raises(ValueError, resolve, group=upper)
        assert f"global rank {rank}) is not a member" in msg, msg

    # A mesh over part of the world: the others are told they are not in it.
    part = DeviceMesh("cpu", torch.tensor([0, 1]), mesh_dim_names=("tp",))
    if rank < 2:
        r = resolve(mesh=part, rank=rank)
        assert r.ranks == (0, 1) and r.src == 0 and r.group_rank == rank
    else:
        msg = _raises(ValueError, resolve, mesh=part)
        assert msg == f"this process (global rank {rank}) is not part of the mesh [0, 1]", msg
    _raises(TypeError, resolve, mesh=part, dim=True)
    _raises(TypeError, resolve, mesh=part, dim=["tp"])

    # A DeviceMesh over a permuted tensor: torch orders each dim's group by
    # global rank, so group ranks follow the group; the default source is
    # still the first rank of this rank's slice of the mesh tensor.
    pm = DeviceMesh("cpu", torch.tensor([[3, 1], [2, 0]]), mesh_dim_names=("a", "b"))
    tensor = [[3, 1], [2, 0]]
    row = next(i for i, rw in enumerate(tensor) if rank in rw)
    col = tensor[row].index(rank)
    for name, sl in (("a", [tensor[0][col], tensor[1][col]]), ("b", tensor[row])):
        r = resolve(mesh=pm, dim=name)
        assert r.ranks == tuple(sorted(sl)), (name, r.ranks, sl)
        assert r.src == sl[0] and r.src_group_rank == sorted(sl).index(sl[0])
        assert r.group_rank == sorted(sl).index(rank) == pm.get_local_rank(name)
        assert r == resolve(mesh=pm, dim=("a", "b").index(name))
    return seen


def test_four_ranks_meshes_and_subgroups():
    results = run_distributed(_four_ranks, 4)
    for rank, seen in enumerate(results):
        for shape, got in seen.items():
            names = ("dp", "tp", "pp")[:len(shape)]
            assert got == _expected_seen(rank, shape, names), (rank, shape)


# --------------------------------------------------------------------------
# 8 ranks: the design brief's case, and more meshes
# --------------------------------------------------------------------------

def _design_brief(rank, world_size):
    # verl's AsyncSGLangRollout: 8 ranks, (dp, tp, pp) = (4, 2, 1).
    mesh = init_device_mesh("cpu", (4, 2, 1), mesh_dim_names=("dp", "tp", "pp"))
    tp_rank = mesh.get_local_rank("tp")       # group-local: 0 or 1
    tp_src = mesh["tp"].mesh[0].item()        # global: 0, 2, 4 or 6
    assert tp_rank == rank % 2 and tp_src == rank - rank % 2

    # The buggy call: a TP-local rank where a global one belongs.
    buggy = None
    try:
        resolve(mesh=mesh, dim="tp", rank=tp_rank, src=tp_src)
    except ValueError as e:
        buggy = str(e)
    if rank in (0, 1):
        assert buggy is None, buggy  # local == global in the first group: the call is right there
    else:
        assert buggy is not None, f"rank {rank}: the local-rank call was accepted"
        assert "group-local" in buggy and f"global rank {rank}" in buggy, buggy
        assert f"rank={tp_rank}" in buggy and f"group {[tp_src, tp_src + 1]}" in buggy, buggy

    # The correct call resolves everywhere, with or without the explicit source.
    route = resolve(mesh=mesh, dim="tp", rank=dist.get_rank(), src=tp_src)
    assert route == resolve(mesh=mesh, dim="tp", rank=rank)
    assert route.ranks == (tp_src, tp_src + 1) and route.src == tp_src
    assert route.src_group_rank == 0 and route.group_rank == tp_rank
    assert route.is_src == (rank == tp_src) and route.backend == "gloo"

    # All four TP groups broadcast different data at once over the Route.
    group_id = rank // 2
    payload = {"tp_group": group_id, "src": route.src,
               "reqs": [f"req-{group_id}-{i}" for i in range(group_id + 1)]}
    objs = [payload if route.is_src else None]
    dist.broadcast_object_list(objs, src=route.src, group=route.group)
    got = objs[0]
    assert got == {"tp_group": group_id, "src": group_id * 2,
                   "reqs": [f"req-{group_id}-{i}" for i in range(group_id + 1)]}, got

    # The same with the source given as a group rank (the last one of each group).
    last = resolve(mesh=mesh, dim="tp", src_group_rank=1)
    objs = [("from", rank) if last.is_src else None]
    dist.broadcast_object_list(objs, src=last.src, group=last.group)
    assert objs[0] == ("from", tp_src + 1), objs

    # DP groups are {0,2,4,6} and {1,3,5,7}; PP groups are single ranks.
    dp = resolve(mesh=mesh, dim="dp")
    assert dp.ranks == tuple(range(rank % 2, 8, 2)) and dp.group_rank == rank // 2
    pp = resolve(mesh=mesh, dim="pp")
    assert pp.ranks == (rank,) and pp.is_src and pp.size == 1
    return {"buggy_rejected": buggy is not None, "received": got, "src": route.src}


def _eight_ranks_all(rank, world_size):
    """Both 8-rank sections in one spawn (8 ranks importing torch cost seconds).

    Each section's failure is returned as its traceback, so each test reports
    its own; a section that fails on some ranks only may leave the others in a
    collective, which run_distributed then reports as hung.
    """
    out = {}
    for name, section in (("design", _design_brief), ("meshes", _eight_ranks)):
        try:
            out[name] = ("ok", section(rank, world_size))
        except Exception:
            out[name] = ("error", f"rank {rank}:\n{traceback.format_exc()}")
    return out


@pytest.fixture(scope="module")
def eight_rank_run():
    return run_distributed(_eight_ranks_all, 8)


def _section(results, name):
    errors = [r[name][1] for r in results if r[name][0] != "ok"]
    if errors:
        pytest.fail(f"section {name!r} failed on {len(errors)} rank(s):\n" + "\n".join(errors))
    return [r[name][1] for r in results]


def test_design_brief_rank_trap_8_ranks(eight_rank_run):
    results = _section(eight_rank_run, "design")
    assert [r["buggy_rejected"] for r in results] == [False, False] + [True] * 6
    assert [r["src"] for r in results] == [0, 0, 2, 2, 4, 4, 6, 6]
    assert [r["received"]["tp_group"] for r in results] == [0, 0, 1, 1, 2, 2, 3, 3]


def _eight_ranks(rank, world_size):
    seen = {}
    for shape in [(2, 4), (4, 2), (8, 1)]:
        seen[shape] = _check_mesh(rank, shape, ("dp", "tp"))
    for shape in [(2, 2, 2), (2, 1, 4), (1, 4, 2)]:
        seen[shape] = _check_mesh(rank, shape, ("dp", "tp", "pp"))

    # Non-contiguous subgroups over the world of 8.
    groups = [[0, 4], [1, 5], [2, 6], [3, 7]]
    pgs = [dist.new_group(g) for g in groups]
    mine = groups[rank % 4]
    pg = pgs[rank % 4]
    r = resolve(group=pg, src=mine[1], rank=rank)
    assert r.ranks == tuple(mine) and r.src_group_rank == 1 and r.group_rank == mine.index(rank)
    assert r == resolve(group=pg, src_group_rank=1)
    msg = _raises(ValueError, resolve, group=pg, src=(rank + 1) % 8)
    assert f"global ranks {mine}" in msg and "group ranks 0..1" in msg, msg
    objs = [rank if r.is_src else None]
    dist.broadcast_object_list(objs, src=r.src, group=r.group)
    assert objs[0] == mine[1]
    return seen


def test_eight_ranks_meshes_and_subgroups(eight_rank_run):
    results = _section(eight_rank_run, "meshes")
    for rank, seen in enumerate(results):
        for shape, got in seen.items():
            names = ("dp", "tp", "pp")[:len(shape)]
            assert got == _expected_seen(rank, shape, names), (rank, shape)


# --------------------------------------------------------------------------
# run_distributed itself
# --------------------------------------------------------------------------

def _raise_on_rank1(rank, world_size):
    if rank == 1:
        raise KeyError("boom from the child on rank 1")
    return "fine"


def test_run_distributed_reports_child_exception():
    with pytest.raises(AssertionError) as info:
        run_distributed(_raise_on_rank1, 2, timeout=60)
    msg = str(info.value)
    assert "ranks [1] failed" in msg and "rank 1 raised" in msg, msg
    assert "Traceback (most recent call last)" in msg and "_raise_on_rank1" in msg, msg
    assert "boom from the child on rank 1" in msg, msg


def _hang_on_rank1(rank, world_size, pid_dir):
    with open(os.path.join(pid_dir, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    if rank == 1:
        while True:
            time.sleep(60)
    return rank


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_run_distributed_kills_hung_rank():
    timeout = 15
    with tempfile.TemporaryDirectory() as pid_dir:
        start = time.monotonic()
        with pytest.raises(AssertionError) as info:
            run_distributed(_hang_on_rank1, 2, pid_dir, timeout=timeout)
        elapsed = time.monotonic() - start
        with open(os.path.join(pid_dir, "rank1.pid")) as f:
            pid = int(f.read())
    msg = str(info.value)
    assert "ranks [1] hung" in msg and "SIGKILL" in msg, msg
    assert "_hang_on_rank1" in msg, msg  # the hung rank's stack, dumped before the kill
    assert elapsed < timeout + 10, elapsed
    assert not _alive(pid), f"the hung rank (pid {pid}) is still running"
