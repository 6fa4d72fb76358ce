"""Broadcast tests on gloo with CPU processes (run in CI).

Spawning ranks is the expensive part on a small CI box (each rank imports
torch), so all the 4-rank checks share ONE run_distributed call (a
module-scoped fixture), and each test function below reports one check of
that run. Checks run in a fixed order on every rank. Each rank writes the
outcome of every check to a file as soon as it finishes, so one failing
check fails only its own test, and the others still report.

To keep one broken check from stalling the rest, most checks run on process
groups of their own made with a short collective timeout
(CHECK_TIMEOUT_S): a rank left waiting by a peer that failed mid-protocol
gets a timeout error after that long, and the ranks meet again at the next
check's new_group. (That a check finished within that timeout is part of
what the error checks assert: nothing hung.)

The whole run happens twice, once per transport (`FASTBCAST_TRANSPORT`):
"collective" (gloo) and "shm" (shared-memory rings; the ranks all sit on this
host). Checks that count collectives count them only on the collective
transport; on shared memory the same sizes cross slot boundaries instead.

The large payload runs on 2 ranks in a run of its own.
"""
from __future__ import annotations

import datetime
import math
import os
import pickle
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

import bcast_types as bt
from distributed import CountBroadcasts, expect_check_ok, run_checks, run_distributed

WORLD = 4
CHECK_TIMEOUT_S = 30          # collective timeout of the per-check groups
RUN_TIMEOUT_S = 300           # the whole 4-rank run, start-up included


# --------------------------------------------------------------------------
# Helpers used inside the ranks
# --------------------------------------------------------------------------

def _fb():
    import fastbcast
    return fastbcast


def _bmod():
    # fastbcast.broadcast is the function (the package re-exports it over the
    # submodule's name); the module is in sys.modules.
    _fb()
    return sys.modules["fastbcast.broadcast"]


def _group(ranks, timeout=CHECK_TIMEOUT_S):
    """dist.new_group with the per-check timeout. EVERY rank must call it, in
    the same order, members or not."""
    return dist.new_group(sorted(ranks), timeout=datetime.timedelta(seconds=timeout))


def _raises(exc, fn, *args, **kwargs):
    """Calls fn, asserts it raises exc (exactly that class or a subclass), returns the exception."""
    try:
        fn(*args, **kwargs)
    except exc as e:
        return e
    except BaseException as e:  # pragma: no cover - reported as the failure
        raise AssertionError(f"expected {exc.__name__}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"expected {exc.__name__}, nothing was raised")


def _bytes_encoding_to(n_encoded: int) -> bytes:
    """A bytes object whose fastbcast encoding is exactly n_encoded bytes
    (bin8/16/32 headers are 2/3/5 bytes: found by asking the encoder)."""
    fb = _fb()
    for header in (2, 3, 5):
        n = n_encoded - header
        if n < 0:
            continue
        payload = (bytes(range(251)) * (n // 251 + 1))[:n]   # 251: prime, so chunks don't repeat
        if len(fb.encode(payload)) == n_encoded:
            return payload
    raise AssertionError(f"no bytes object encodes to {n_encoded} bytes")


def _header_bytes():
    return _fb()._C.HEADER_BYTES


def _counts_collectives(b) -> bool:
    """Whether b moves its frames with collectives (so they can be counted)."""
    return b.transport == "collective"


def _expected_collectives(encoded_len, first_chunk, chunk):
    total = _header_bytes() + encoded_len
    if total <= first_chunk:
        return 1
    return 1 + math.ceil((total - first_chunk) / chunk)


def _check_round(send, rank, src, obj, want=None):
    """One broadcast: `send(obj_or_None)` on every member; checks the result."""
    got = send(obj if rank == src else None)
    if rank == src:
        assert got is obj, "the source must get its own object back"
    else:
        bt.assert_same(got, obj if want is None else want)
    return got


def _pickle_broadcast_pyobj(data, rank, dist_group=None, src=0, force_cpu_device=True):
    """The pickle design fastbcast replaces (SGLang's broadcast_pyobj), written out here as the
    reference: pickle, send the size, then the bytes; receivers read the
    size with .item(), receive, unpickle. `rank` and `src` are global ranks."""
    device = torch.device("cpu") if force_cpu_device else torch.device("cuda", torch.cuda.current_device())
    if rank == src:
        if len(data) == 0:
            dist.broadcast(torch.zeros(1, dtype=torch.long, device=device), src=src, group=dist_group)
            return data
        raw = pickle.dumps(data)
        size = torch.tensor([len(raw)], dtype=torch.long, device=device)
        body = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)
        dist.broadcast(size, src=src, group=dist_group)
        dist.broadcast(body, src=src, group=dist_group)
        return data
    size = torch.zeros(1, dtype=torch.long, device=device)
    dist.broadcast(size, src=src, group=dist_group)
    n = int(size.item())
    if n == 0:
        return []
    body = torch.empty(n, dtype=torch.uint8, device=device)
    dist.broadcast(body, src=src, group=dist_group)
    return pickle.loads(body.cpu().numpy().tobytes())


def _small_obj(tag):
    return {"tag": tag, "ids": list(range(20)), "t": torch.arange(6, dtype=torch.int32).reshape(2, 3),
            "s": "ünïcödé", "tup": (1, 2.5, None)}


def _chunky_obj(tag, kb=40):
    """An object of about kb KiB encoded: several chunks at first_chunk=4096."""
    return {"tag": tag, "batch": bt.requests_batch(4, kb * 32, seed=len(tag)),
            "t": torch.arange(kb * 64, dtype=torch.float32)}


# --------------------------------------------------------------------------
# The checks (each runs on every rank of the 4-rank world)
# --------------------------------------------------------------------------

CHECKS: dict = {}


def check(fn):
    CHECKS[fn.__name__[len("_check_"):]] = fn
    return fn


@check
def _check_world_every_source(rank, world):
    fb = _fb()
    # fastbcast.broadcast over the world group (group=None), every source in
    # turn, spelled as src= (global) and src_group_rank= (the same here).
    for src in range(world):
        _check_round(lambda o: fb.broadcast(o, src=src), rank, src, _small_obj(f"w{src}"))
        _check_round(lambda o: fb.broadcast(o, src_group_rank=src), rank, src, _small_obj(f"wg{src}"))
        _check_round(lambda o: fb.broadcast(o, group=dist.group.WORLD, src=src), rank, src, [src, "world"])
    # The default source is the group's first rank.
    _check_round(lambda o: fb.broadcast(o), rank, 0, {"default": True})
    # One Broadcaster reused for many calls, sources and sizes mixed.
    with fb.Broadcaster(first_chunk=4096, chunk=5000) as b:
        for i in range(3 * world):
            src = (i * 3) % world
            obj = _chunky_obj(f"b{i}", kb=12) if i % 2 else _small_obj(f"b{i}")
            _check_round(lambda o: b.broadcast(o, src=src), rank, src, obj)
    # closed: refused on every rank before anything is sent
    e = _raises(RuntimeError, b.broadcast, [1], src=0)
    assert "closed" in str(e), str(e)


@check
def _check_subgroups_every_source(rank, world):
    fb = _fb()
    g12, g03, g013, g2 = _group([1, 2]), _group([0, 3]), _group([0, 1, 3]), _group([2])
    if rank == 2:
        # a group of one: the object comes straight back, nothing is sent
        obj = {"alone": True}
        assert fb.broadcast(obj, group=g2) is obj
        assert fb.broadcast(obj, group=g2, src=2) is obj
        data = [1]
        assert fb.broadcast_pyobj(data, 2, g2, 2) is data
    for members, g in (([1, 2], g12), ([0, 3], g03)):
        if rank not in members:
            continue
        assert dist.get_process_group_ranks(g) == members
        bc = fb.Broadcaster(g)
        for gr, src in enumerate(members):
            # Both subgroups broadcast at the same time; the payload names its group.
            tag = f"{members}-{src}"
            _check_round(lambda o: fb.broadcast(o, group=g, src=src), rank, src, _small_obj(tag))
            _check_round(lambda o: fb.broadcast(o, group=g, src_group_rank=gr), rank, src, _small_obj(tag + "g"))
            for i in range(4):
                _check_round(lambda o: bc.broadcast(o, src=src), rank, src, [tag, i])
                _check_round(lambda o: bc.broadcast(o, src_group_rank=gr), rank, src, (tag, i))
        # default source: the group's first member
        _check_round(lambda o: fb.broadcast(o, group=g), rank, members[0], {"first": members})
        _check_round(lambda o: bc.broadcast(o), rank, members[0], {"first": members, "bc": 1})
        bc.close()
    # rank 2 sits this one out.
    if rank in (0, 1, 3):
        members = [0, 1, 3]
        with fb.Broadcaster(g013, first_chunk=1024, chunk=3000) as bc:
            for rnd in range(2):
                for gr, src in enumerate(members):
                    obj = _chunky_obj(f"013-{src}-{rnd}", kb=8) if rnd else _small_obj(f"013-{src}")
                    _check_round(lambda o: bc.broadcast(o, src=src), rank, src, obj)
                    _check_round(lambda o: fb.broadcast(o, group=g013, src_group_rank=gr), rank, src,
                                 {"gr": gr, "rnd": rnd})


@check
def _check_mesh_slices(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    fb = _fb()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    # row-major: tp groups {0,1} {2,3}; dp groups {0,2} {1,3}
    tp = [rank - rank % 2, rank - rank % 2 + 1]
    dp = [rank % 2, rank % 2 + 2]
    for dim, members in (("tp", tp), ("dp", dp)):
        # Every group sends at once; every rank puts its own rank in its object,
        # so a receiver that got another rank's object would notice.
        mine = {"dim": dim, "from": rank, "data": _small_obj(f"{dim}{rank}")}
        got = fb.broadcast(mine, mesh=mesh, dim=dim)
        if rank == members[0]:
            assert got is mine
        else:
            bt.assert_same(got, {"dim": dim, "from": members[0], "data": _small_obj(f"{dim}{members[0]}")})
        # the second member as the source, by group rank and by global rank
        for kw in ({"src_group_rank": 1}, {"src": members[1]}):
            mine = [dim, rank, kw]
            got = fb.broadcast(mine, mesh=mesh, dim=dim, **kw)
            if rank == members[1]:
                assert got is mine
            else:
                assert got == [dim, members[1], kw], (dim, kw, got)
        # a Broadcaster on a mesh dim, reused; multi-chunk payloads too
        with fb.Broadcaster(mesh=mesh, dim=dim, first_chunk=2048, chunk=4096) as b:
            for i in range(4):
                src_gr = i % 2
                mine = _chunky_obj(f"{dim}-{rank}-{i}", kb=6) if i >= 2 else (dim, rank, i)
                got = b.broadcast(mine, src_group_rank=src_gr)
                src = members[src_gr]
                want = _chunky_obj(f"{dim}-{src}-{i}", kb=6) if i >= 2 else (dim, src, i)
                if rank == src:
                    assert got is mine
                else:
                    bt.assert_same(got, want)


@check
def _check_mesh_permuted_default_source(rank, world):
    """A DeviceMesh over a permuted rank tensor: torch orders each dim's group
    by global rank, but the documented default source is still the first rank
    of this rank's slice of the mesh tensor (`mesh[dim].mesh[0]`), as
    fastbcast.resolve(mesh=, dim=) reports it. The one-line function and the
    Broadcaster must both send from there."""
    from torch.distributed.device_mesh import DeviceMesh

    fb = _fb()
    tensor = [[3, 1], [2, 0]]
    pm = DeviceMesh("cpu", torch.tensor(tensor), mesh_dim_names=("a", "b"))
    row = next(i for i, r in enumerate(tensor) if rank in r)
    col = tensor[row].index(rank)
    failures = []
    for dim, sl in (("a", [tensor[0][col], tensor[1][col]]), ("b", tensor[row])):
        assert fb.resolve(mesh=pm, dim=dim).src == sl[0]
        for how in ("broadcast", "Broadcaster"):
            mine = {"dim": dim, "from": rank, "how": how}
            if how == "broadcast":
                got = fb.broadcast(mine, mesh=pm, dim=dim)
            else:
                with fb.Broadcaster(mesh=pm, dim=dim) as b:
                    got = b.broadcast(mine)
            sender = got["from"]
            if sender != sl[0]:
                failures.append(f"{how}(mesh=pm, dim={dim!r}) on global rank {rank}: the object came from "
                                f"global rank {sender}, expected the slice's first rank {sl[0]} (slice {sl})")
            elif rank == sl[0]:
                assert got is mine
    assert not failures, "\n".join(failures)


@check
def _check_type_zoo(rank, world):
    fb = _fb()
    g = _group(range(world))
    zoo = bt.type_zoo()
    small = {k: v for k, v in zoo.items() if k not in ("str", "bytes")}   # fits a 4 KiB first chunk
    assert len(fb.encode(small)) <= 4096 - _header_bytes()
    for src in range(world):
        _check_round(lambda o: fb.broadcast(o, group=g, src=src), rank, src, zoo)
        _check_round(lambda o: fb.broadcast(o, group=g, src=src), rank, src, small)
    # The same through chunks of odd sizes, so tensor and array bytes straddle
    # collective boundaries.
    with fb.Broadcaster(g, first_chunk=100, chunk=777) as b:
        for src in (3, 0):
            _check_round(lambda o: b.broadcast(o, src=src), rank, src, zoo)
    # Top-level values of each kind, one broadcast each.
    for i, value in enumerate(list(zoo.values()) + [zoo, 0, -1, 2**100, 1.5, "", b"", (), None]):
        src = i % world
        _check_round(lambda o: fb.broadcast(o, group=g, src=src), rank, src, value)
    # compat=True writes plain MessagePack: a tuple arrives as a list.
    got = fb.broadcast((1, (2, 3)) if rank == 1 else None, group=g, src=1, compat=True)
    assert got == ((1, (2, 3)) if rank == 1 else [1, [2, 3]]), got


@check
def _check_zero_dim_numpy_array(rank, world):
    fb = _fb()
    g = _group(range(world))
    # Every broadcast runs even if one fails (a receiver that stopped early
    # would leave the next source waiting); the failures are raised at the end.
    failures = []
    for i, arr in enumerate(bt.zero_dim_arrays()):
        src = i % world
        try:
            _check_round(lambda o: fb.broadcast(o, group=g, src=src), rank, src, {"a": arr})
        except Exception as e:
            failures.append(f"{arr!r} from rank {src}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)


@check
def _check_empty_list(rank, world):
    fb = _fb()
    g12 = _group([1, 2])
    for src in range(world):
        data = []
        # Receivers pass None, [] or some other list: only the source's is read.
        mine = data if rank == src else [None, [], ["ignored"]][rank % 3]
        got = fb.broadcast_pyobj(mine, rank, None, src)
        if rank == src:
            assert got is data, "the source must get its own `data` back"
        else:
            assert got == [] and type(got) is list, got
        got = fb.broadcast([] if rank == src else None, src=src)
        assert got == [] and type(got) is list, got
    if rank in (1, 2):
        data = []
        got = fb.broadcast_pyobj(data if rank == 2 else None, rank, g12, 2)
        assert (got is data) if rank == 2 else (got == [] and type(got) is list), got
        # non-empty right after, on the same group: nothing left over
        data = [1, "x"]
        got = fb.broadcast_pyobj(data if rank == 1 else None, rank, g12, 1)
        assert (got is data) if rank == 1 else got == [1, "x"], got


@check
def _check_first_chunk_boundaries(rank, world):
    fb = _fb()
    h = _header_bytes()
    g = _group(range(world))
    default_chunk = _bmod().DEFAULT_CHUNK
    default_b = fb.Broadcaster(g)
    default_f = default_b.first_chunk
    assert default_f == _bmod().DEFAULT_FIRST_CHUNKS["gloo"]
    for f in (1024, default_f):
        b = fb.Broadcaster(g, first_chunk=f) if f != default_f else default_b
        assert b.first_chunk == f
        for delta in (-h - 1, -h, -h + 1, -h - 1, -h + 1, -h):     # also back and forth on one Broadcaster
            n_enc = f + delta
            payload = _bytes_encoding_to(n_enc)
            assert len(fb.encode(payload)) == n_enc
            for src in (0, 3):
                with CountBroadcasts() as c:
                    got = b.broadcast(payload if rank == src else None, src=src)
                assert got == payload and type(got) is bytes, (f, delta, len(got))
                want = _expected_collectives(n_enc, f, default_chunk)
                assert want == (1 if delta <= -h else 2)
                if _counts_collectives(b):
                    assert c.count == want, f"first_chunk={f}, encoded {n_enc} B: {c.count} collectives, want {want}"
        b.close()
    # The one-line function uses the default first chunk.
    for delta in (-h, -h + 1):
        payload = _bytes_encoding_to(default_f + delta)
        with CountBroadcasts() as c:
            got = fb.broadcast(payload if rank == 1 else None, group=g, src=1)
        assert got == payload
        if _counts_collectives(default_b):
            assert c.count == (1 if delta == -h else 2), (delta, c.count)


@check
def _check_multi_chunk(rank, world):
    fb = _fb()
    g = _group(range(world))
    HB = _header_bytes()
    cases = [
        # (first_chunk, chunk, encoded length)
        (4096, 1000, 10_003),                 # 10 kB: the last chunk is partial
        (4096, 1024, 4096 + 6 * 1024 - HB),       # chunks divide the rest exactly
        (4096, 1024, 4096 + 6 * 1024 - HB + 1),   # one byte into one more chunk
        (4096, 1024, 4096 + 6 * 1024 - HB - 1),   # one byte short of the exact fit
        (4096, 1024, 4096 - HB + 1),              # just over the first chunk: one 1-byte chunk
        (64, 13, 5000),                           # many tiny chunks
        (HB, 1000, 2),                            # first_chunk = the header alone: b"" in one 2-byte chunk
        (HB, 1000, 5000),
    ]
    for f, c, n_enc in cases:
        payload = _bytes_encoding_to(n_enc)
        want_n = _expected_collectives(n_enc, f, c)
        with fb.Broadcaster(g, first_chunk=f, chunk=c) as b:
            for src in range(world):
                with CountBroadcasts() as cc:
                    got = b.broadcast(payload if rank == src else None, src=src)
                assert got == payload, (f, c, n_enc, src)
                if _counts_collectives(b):
                    assert cc.count == want_n, (f, c, n_enc, cc.count, want_n)
    # A structured object over chunks, both directions on one Broadcaster.
    with fb.Broadcaster(g, first_chunk=4096, chunk=1000) as b:
        for src in (2, 1, 2):
            _check_round(lambda o: b.broadcast(o, src=src), rank, src, _chunky_obj(f"mc{src}", kb=10))
            _check_round(lambda o: b.broadcast(o, src=src), rank, src, _small_obj("after"))


@check
def _check_broadcaster_reuse(rank, world):
    """Many calls on one Broadcaster: sizes go up and down (the receive buffer
    hint), sources change, tiny and empty objects between large ones."""
    fb = _fb()
    g = _group(range(world))
    sizes = [0, 1, 50, 3, 0, 80, 2, 20, 1, 0]
    with fb.Broadcaster(g, first_chunk=2048, chunk=8192) as b:
        for i, kb in enumerate(sizes * 2):
            src = (i * 7) % world
            obj = _chunky_obj(f"r{i}", kb=kb) if kb else [i]
            _check_round(lambda o: b.broadcast(o, src=src), rank, src, obj)


@check
def _check_pickle_parity(rank, world):
    fb = _fb()
    g12 = _group([1, 2])
    zoo = bt.type_zoo()
    inputs = [
        [],
        [1, 2, 3],
        [zoo],
        [bt.requests_batch(8, 300)],
        [{"nested": [(1, {2, 3}), frozenset({"a"}), {"k": [b"v", bytearray(b"w")]}]}, None, 3.25],
        [torch.arange(10).reshape(2, 5), np.arange(6, dtype=np.float32)],
        [[[[[]]]], {}, ""],
        [bt.Opaque("pickled by both")],      # not native: the drop-in's default pickles it
    ]
    for group, members in ((None, list(range(world))), (g12, [1, 2])):
        if rank not in members:
            continue
        for i, data in enumerate(inputs):
            src = members[i % len(members)]
            ours = fb.broadcast_pyobj(data if rank == src else None, rank, group, src)
            ref = _pickle_broadcast_pyobj(data if rank == src else None, rank, group, src)
            if rank == src:
                assert ours is data and ref is data
            else:
                bt.assert_same(ours, ref, f"input {i}")
                bt.assert_same(ours, data, f"input {i}")


@check
def _check_force_cpu_device(rank, world):
    fb = _fb()
    g03 = _group([0, 3])
    for force in (True, False):
        for src in (0, 2):
            data = [{"force": force, "src": src}, torch.ones(3)]
            got = fb.broadcast_pyobj(data if rank == src else None, rank, force_cpu_device=force, src=src)
            if rank == src:
                assert got is data
            else:
                bt.assert_same(got, data)
        if rank in (0, 3):
            data = [force, "sub"]
            got = fb.broadcast_pyobj(data if rank == 3 else None, rank, g03, 3, force)
            assert (got is data) if rank == 3 else got == data


@check
def _check_error_source_outside_group(rank, world):
    fb = _fb()
    g12 = _group([1, 2])
    started = time.monotonic()
    if rank in (1, 2):
        b = fb.Broadcaster(g12)
        for call in (lambda: fb.broadcast({"x": 1}, group=g12, src=3),
                     lambda: b.broadcast({"x": 1}, src=3),
                     lambda: fb.broadcast_pyobj([1], rank, g12, 3)):
            msg = str(_raises(ValueError, call))
            assert "src=3" in msg and "[1, 2]" in msg, msg
            assert "global rank" in msg and "group rank" in msg, msg
        # 0 is a global rank outside the group, and also a valid group rank:
        # the message should say which to pass.
        msg = str(_raises(ValueError, fb.broadcast, {"x": 1}, group=g12, src=0))
        assert "global rank" in msg and "group rank" in msg and "src_group_rank=0" in msg, msg
        # a group rank out of range
        msg = str(_raises(ValueError, fb.broadcast, {"x": 1}, group=g12, src_group_rank=2))
        assert "group rank" in msg and "out of range" in msg, msg
        # Nothing was sent: the group still works, in both directions.
        for src in (1, 2):
            _check_round(lambda o: b.broadcast(o, src=src), rank, src, {"after": src})
            _check_round(lambda o: fb.broadcast(o, group=g12, src=src), rank, src, [src])
        b.close()
    # Over the world: a source past the end, on every rank.
    msg = str(_raises(ValueError, fb.broadcast, "x", src=world))
    assert f"src={world}" in msg and "global rank" in msg and "group rank" in msg, msg
    _raises(ValueError, fb.broadcast_pyobj, ["x"], rank, None, world)
    _raises(ValueError, fb.broadcast_pyobj, ["x"], rank, None, -1)
    assert time.monotonic() - started < CHECK_TIMEOUT_S / 2, "the error path took suspiciously long"


@check
def _check_error_wrong_rank(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    fb = _fb()
    g23 = _group([2, 3])
    if rank in (2, 3):
        local = rank - 2
        # The design brief's bug: the group-local rank where a global one is due.
        msg = str(_raises(ValueError, fb.broadcast_pyobj, [f"from {rank}"], local, g23, 2))
        assert "group-local" in msg, msg
        assert f"rank={local}" in msg and str(rank) in msg, msg
        msg = str(_raises(ValueError, fb.broadcast, [1], group=g23, src=2, rank=local))
        assert "group-local" in msg, msg
        with fb.Broadcaster(g23) as b:
            _raises(ValueError, b.broadcast, [1], src=2, rank=local)
            # and with the right rank the same calls work
            data = [f"from 2", {"k": 1}]
            got = fb.broadcast_pyobj(data if rank == 2 else None, rank, g23, 2)
            assert (got is data) if rank == 2 else got == data, got
            _check_round(lambda o: b.broadcast(o, src=3, rank=rank), rank, 3, ("ok", 3))
    # The brief's exact call shape on a (dp, tp) mesh: tp groups {0,1} {2,3}.
    # In {0,1} local and global ranks coincide and the call works (which is how
    # the bug hid); in {2,3} every rank must raise rather than return [].
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    tp_group = mesh["tp"].get_group()
    tp_src = mesh["tp"].mesh[0].item()
    tp_rank = mesh.get_local_rank("tp")
    data = [{"reqs": list(range(5)), "from": rank}]
    if rank in (0, 1):
        got = fb.broadcast_pyobj(data if rank == tp_src else None, tp_rank, tp_group, tp_src)
        assert (got is data) if rank == 0 else got == [{"reqs": list(range(5)), "from": 0}], got
    else:
        msg = str(_raises(ValueError, fb.broadcast_pyobj, data, tp_rank, tp_group, tp_src))
        assert "group-local" in msg, msg
        got = fb.broadcast_pyobj(data if rank == tp_src else None, rank, tp_group, tp_src)
        assert (got is data) if rank == 2 else got == [{"reqs": list(range(5)), "from": 2}], got
    # src straight from the mesh tensor (a 0-d tensor, no .item()) works too
    got = fb.broadcast_pyobj(data if rank == tp_src else None, rank, tp_group, mesh["tp"].mesh[0])
    assert got == [{"reqs": list(range(5)), "from": tp_src}], got


def _bad_obj():
    return {"ok": [1, 2], "bad": [0, (1, bt.Opaque("x"))]}


@check
def _check_error_unsupported_type(rank, world):
    fb = _fb()
    g = _group(range(world))
    # What the codec says about it locally: the path and the type name.
    local_msg = str(_raises(TypeError, fb.encode, _bad_obj()))
    assert "['bad'][1][1]" in local_msg and "Opaque" in local_msg, local_msg
    for kwargs in ({}, {"first_chunk": 64}, {"first_chunk": 4096, "chunk": 100}):
        with fb.Broadcaster(g, **kwargs) as b:
            for src in (0, 3):
                # valid data ahead of the bad item, large enough to span chunks
                obj = {"big": bytes(20000), **_bad_obj()} if "chunk" in kwargs else _bad_obj()
                started = time.monotonic()
                if rank == src:
                    e = _raises(TypeError, b.broadcast, obj, src=src)
                    assert "['bad'][1][1]" in str(e) and "Opaque" in str(e), str(e)
                else:
                    e = _raises(fb.BroadcastError, b.broadcast, None, src=src)
                    if b.first_chunk - _header_bytes() >= 400:     # the whole message fits the error frame
                        assert local_msg in str(e), f"receiver's error {str(e)!r} lacks {local_msg!r}"
                    assert str(e), "empty BroadcastError"
                assert time.monotonic() - started < CHECK_TIMEOUT_S / 2
                # the group is usable right after, from another source
                other = (src + 1) % world
                _check_round(lambda o: b.broadcast(o, src=other), rank, other, {"after error": src})
    # The one-line function, then the same object with allow_pickle on every rank.
    if rank == 1:
        _raises(TypeError, fb.broadcast, _bad_obj(), group=g, src=1)
    else:
        _raises(fb.BroadcastError, fb.broadcast, None, group=g, src=1)
    _check_round(lambda o: fb.broadcast(o, group=g, src=2, allow_pickle=True), rank, 2, _bad_obj())
    with fb.Broadcaster(g, allow_pickle=True, first_chunk=128, chunk=64) as b:
        _check_round(lambda o: b.broadcast(o, src=3), rank, 3, _bad_obj())


@check
def _check_drop_in_pickle_policy(rank, world):
    fb = _fb()
    g = _group(range(world))
    data = [bt.Opaque("plain class"), {"n": 1}]
    if os.environ.get("FASTBCAST_ALLOW_PICKLE", "1") != "0":
        # default: allow_pickle=True, so an unregistered class round trips
        got = fb.broadcast_pyobj(data if rank == 0 else None, rank, g, 0)
        assert (got is data) if rank == 0 else got == data, got
    got = fb.broadcast_pyobj(data if rank == 1 else None, rank, g, 1, allow_pickle=True)
    assert (got is data) if rank == 1 else got == data, got
    if rank == 2:
        e = _raises(TypeError, fb.broadcast_pyobj, data, rank, g, 2, allow_pickle=False)
        assert "Opaque" in str(e), str(e)
    else:
        e = _raises(fb.BroadcastError, fb.broadcast_pyobj, None, rank, g, 2, allow_pickle=False)
        assert "Opaque" in str(e), str(e)
    # The source may pickle, but receivers that do not accept pickles refuse
    # them (a DecodeError after the whole frame arrived: no rank waits).
    if rank == 0:
        got = fb.broadcast(data, group=g, src=0, allow_pickle=True)
        assert got is data
    else:
        e = _raises(fb.DecodeError, fb.broadcast, None, group=g, src=0)
        assert "pickle" in str(e).lower(), str(e)
    _check_round(lambda o: fb.broadcast(o, group=g, src=0), rank, 0, [1, "after refused pickle"])
    # strict mode still carries native objects
    got = fb.broadcast_pyobj([1, (2,)] if rank == 3 else None, rank, g, 3, allow_pickle=False)
    assert got == [1, (2,)], got


@check
def _check_version_mismatch(rank, world):
    fb = _fb()
    mod = _bmod()
    g = _group(range(world))
    payload = _bytes_encoding_to(10_003)   # with first_chunk=4096, chunk=1000: 7 collectives

    def mismatched(send, src, obj):
        """send(obj_or_None, src) with the source speaking format version 999."""
        started = time.monotonic()
        if rank == src:
            saved = mod.FORMAT_VERSION
            mod.FORMAT_VERSION = 999
            try:
                send(obj, src)   # the source cannot know; it just sends
            finally:
                mod.FORMAT_VERSION = saved
        else:
            e = _raises(fb.BroadcastError, send, None, src)
            assert "version" in str(e).lower() and "999" in str(e), str(e)
        assert time.monotonic() - started < CHECK_TIMEOUT_S / 2

    with fb.Broadcaster(g, first_chunk=4096, chunk=1000) as b:
        send = lambda o, s: b.broadcast(o, src=s)  # noqa: E731
        for src in (1, 3):
            mismatched(send, src, payload)
            # A normal broadcast on the same group and Broadcaster works next:
            # no rank was left mid-protocol.
            for nxt in (src, (src + 2) % world):
                _check_round(lambda o: b.broadcast(o, src=nxt), rank, nxt, payload)
                _check_round(lambda o: b.broadcast(o, src=nxt), rank, nxt, [nxt, "small"])
        mismatched(send, 0, [1, 2])          # single-chunk frame too
        _check_round(lambda o: b.broadcast(o, src=2), rank, 2, {"ok": True})
    # the one-line function (default sizes)
    mismatched(lambda o, s: fb.broadcast(o, group=g, src=s), 2, payload)
    _check_round(lambda o: fb.broadcast(o, group=g, src=2), rank, 2, payload)


@check
def _check_chunk_size_mismatch(rank, world):
    """Ranks configured with different `chunk`: every receiver gets a
    BroadcastError naming the sizes, and no rank is left waiting (the header
    carries the source's sizes, so receivers can still take the rest)."""
    fb = _fb()
    g = _group(range(world), timeout=10)   # a hang here costs 10 s, not CHECK_TIMEOUT_S
    payload = _bytes_encoding_to(10_003)
    chunk = 2000 if rank == 0 else 1000
    with fb.Broadcaster(g, first_chunk=4096, chunk=chunk, transport="collective") as b:
        started = time.monotonic()
        if rank == 0:
            try:
                b.broadcast(payload, src=0)
            except RuntimeError as e:
                raise AssertionError(
                    f"the source (chunk=2000) was left waiting: its chunk collectives after the first failed "
                    f"after {time.monotonic() - started:.1f} s ({str(e)[:200]}): the receivers (chunk=1000) "
                    f"raised without receiving the rest of the frame") from e
        else:
            e = _raises(fb.BroadcastError, b.broadcast, None, src=0)
            assert "chunk" in str(e), str(e)
        assert time.monotonic() - started < 5
    with fb.Broadcaster(g, first_chunk=4096, chunk=1000, transport="collective") as b:
        try:
            _check_round(lambda o: b.broadcast(o, src=0), rank, 0, payload)
        except fb.DecodeError as e:
            raise AssertionError(
                "a normal broadcast on the same group right after the chunk-size mismatch failed: it read "
                f"what was left of the rejected frame as a new frame ({e})") from e
    # A stream (64 KiB segments; one item longer than a segment): receivers
    # follow it to its end with the source's sizes, then raise; a different
    # chunk, or a larger first_chunk on the receivers (the first collective
    # still fits). Before, they drained message 0 only, and the next call's
    # collectives met the rest of the stream (gloo aborted the process).
    items = [bytes([i % 251]) * 1000 for i in range(200)] + [b"x" * 100_000] + [b"y" * 10] * 5
    for sizes in ((4096, 1000), (8192, 2000)):
        first_chunk, chunk = (4096, 2000) if rank == 0 else sizes
        with fb.Broadcaster(g, first_chunk=first_chunk, chunk=chunk, stream_bytes=65536,
                            transport="collective") as b:
            if rank == 0:
                assert b.broadcast(items, src=0) is items
            else:
                e = _raises(fb.BroadcastError, b.broadcast, None, src=0)
                assert "chunk sizes differ" in str(e), str(e)
        with fb.Broadcaster(g, first_chunk=4096, chunk=1000, transport="collective") as b:
            _check_round(lambda o: b.broadcast(o, src=0), rank, 0, payload)


@check
def _check_one_call_path(rank, world):
    """On a CPU group a frame within the first collective is encoded,
    broadcast and decoded by one call into C++ on each rank
    (`_C.CollectiveChannel`): one collective per call, every source. What
    that call does not decode goes on through the Python path and must end
    exactly as it does with the one-call path off: same result, or same
    exception and text, on every rank."""
    fb = _fb()
    from fastbcast import transport as tmod
    h = _header_bytes()
    g = _group(range(world), timeout=10)
    with fb.Broadcaster(g, transport="collective") as b:
        f = b.first_chunk
        b.broadcast([] if rank == 0 else None, src=0)
        ch = b._transport._channel
        assert ch is not None and ch.collectives == 1, ch
        for src in range(world):
            for obj in ([], [_small_obj(f"oc{src}")], _bytes_encoding_to(f - h)):
                n = ch.collectives
                _check_round(lambda o: b.broadcast(o, src=src), rank, src, obj)
                assert ch.collectives == n + 1, (src, ch.collectives - n)
            # One byte over: the source's frame comes back unsent and goes
            # through Python; receivers took its first collective in C++.
            n = ch.collectives
            _check_round(lambda o: b.broadcast(o, src=src), rank, src, _bytes_encoding_to(f - h + 1))
            assert ch.collectives == n + (rank != src), (src, ch.collectives - n)

    def outcome(fn):
        try:
            got = fn()
        except Exception as e:  # noqa: BLE001 - compared below
            return type(e).__name__, str(e)
        return "ok", repr(got)

    def scenarios():
        out = []
        with fb.Broadcaster(g, transport="collective", max_bytes=64 if rank == 2 else None,
                            chunk=999 if rank == 3 else None) as b:
            # unencodable (error frame), over rank 2's max_bytes, rank 3's
            # chunk differs (the header says so), a frame over first_chunk
            for src, obj in ((1, _bad_obj()), (0, bytes(200)), (2, [1, "x"]), (0, bytes(5000))):
                out.append(outcome(lambda: b.broadcast(obj if rank == src else None, src=src)))
        return out

    on = scenarios()
    tmod.ONE_CALL = False
    try:
        off = scenarios()
    finally:
        tmod.ONE_CALL = True
    assert on == off, (rank, on, off)
    assert on[0][0] == ("TypeError" if rank == 1 else "BroadcastError"), on[0]
    assert on[1][0] == ("BroadcastError" if rank in (2, 3) else "ok"), on[1]
    assert on[2][0] == ("BroadcastError" if rank == 3 else "ok") and (rank != 3 or "chunk" in on[2][1]), on[2]


def _failed_call(rank, src, exc, call, obj, says):
    """One call in which the source (passing obj) raises exc and every
    receiver (passing None) BroadcastError, each saying `says`. Returns the error."""
    e = _raises(exc, call, obj) if rank == src else _raises(_fb().BroadcastError, call, None)
    assert says in str(e), str(e)
    return e


def _same_as_pickle(got, data):
    """got has pickle's round trip of data, cycles and shared containers
    included (pickle's bytes spell out which objects are one)."""
    assert pickle.dumps(got) == pickle.dumps(pickle.loads(pickle.dumps(data))), (got, data)


@check
def _check_drop_in_reference_cycles(rank, world):
    fb = _fb()
    g = _group(range(world))
    selfref = [1, "x"]
    selfref.append(selfref)
    d1, d2 = {"n": 1}, {"n": 2}
    d1["other"], d2["other"] = d2, d1
    for data in (selfref, [d1, d2], [{"big": bytes(300000)}, d1]):   # the last one streams
        got = fb.broadcast_pyobj(data if rank == 0 else None, rank, g, 0)
        assert got is data if rank == 0 else True
        _same_as_pickle(got, data)
    got = fb.broadcast_pyobj(selfref if rank == 1 else None, rank, g, 1)
    assert got[2] is got

    def requests(cycle_at, through_container=False):
        data = [{"i": i, "pad": "p" * 200} for i in range(40)]   # about 9 KB: a stream of 1 KiB messages
        inner = [data[cycle_at]]
        inner.append(inner)
        data[cycle_at]["c"] = data if through_container else inner
        return data

    with fb.Broadcaster(g, allow_pickle=True, stream_bytes=1024) as b:
        # In message 0 (nothing sent yet): the whole value as one pickle.
        data = requests(0)
        _same_as_pickle(b.broadcast(data if rank == 2 else None, src=2), data)
        # Past message 0: the item holding the cycle as its own pickle.
        data = requests(30)
        got = b.broadcast(data if rank == 2 else None, src=2)
        assert got == data if rank == 2 else got[:30] == data[:30] and got[31:] == data[31:], got
        assert got[30]["c"][1] is got[30]["c"] and got[30]["c"][0] is got[30]
        # Through the streamed container itself, past message 0: refused on
        # the source, BroadcastError on every receiver, and the next call works.
        e = _failed_call(rank, 2, ValueError, lambda o: b.broadcast(o, src=2), requests(30, True), "reference cycle")
        assert rank != 2 or "through the top-level container" in str(e), str(e)
        assert b.broadcast(["after"] if rank == 3 else None, src=3) == ["after"]
    # Strict: the clear error on the source, BroadcastError on the receivers.
    _failed_call(rank, 0, ValueError, lambda o: fb.broadcast_pyobj(o, rank, g, 0, allow_pickle=False), selfref,
                 "reference cycle")
    assert fb.broadcast_pyobj(["next"] if rank == 0 else None, rank, g, 0) == ["next"]


@check
def _check_requires_grad_survives(rank, world):
    fb = _fb()
    g = _group(range(world))
    t = torch.arange(4.0, requires_grad=True)
    data = [t, {"again": t}, torch.ones(2), torch.nn.Parameter(torch.zeros(3)), t * 2]   # t * 2: not a leaf
    for allow in (True, False):
        got = fb.broadcast_pyobj(data if rank == 0 else None, rank, g, 0, allow_pickle=allow)
        want = pickle.loads(pickle.dumps(data))
        assert [x.requires_grad for x in (got[0], got[1]["again"], got[2], got[3], got[4])] == \
            [True, True, False, True, True]
        assert all(x.is_leaf for x in (got[0], got[2], got[3])) and got[1]["again"] is got[0]
        # The source returns its own list; receivers get t * 2 as pickle gives it: a leaf.
        assert got[4].is_leaf == (rank != 0) and want[4].is_leaf
        assert torch.equal(got[4].detach(), want[4].detach())
        assert type(got[3]) is type(want[3]) and torch.equal(got[0], want[0])


@check
def _check_timeout_arguments(rank, world):
    fb = _fb()
    g = _group(range(world))
    inf = float("inf")
    b = fb.Broadcaster(g, timeout=inf)
    assert b.timeout is None
    assert b.broadcast("inf" if rank == 0 else None, src=0) == "inf"
    assert fb.broadcast(1 if rank == 1 else None, group=g, src=1, timeout=inf) == 1
    assert fb.broadcast_pyobj([2] if rank == 2 else None, rank, g, 2, timeout=inf) == [2]
    assert fb.Broadcaster(g, timeout=datetime.timedelta(days=10 ** 6)).timeout is None
    for bad in ("3", True, [3], None.__class__):
        e = _raises(TypeError, fb.Broadcaster, g, timeout=bad)
        assert "timeout must be a number of seconds" in str(e), str(e)
        _raises(TypeError, fb.broadcast, 1, group=g, timeout=bad)
        _raises(TypeError, fb.broadcast_pyobj, [1], rank, g, 0, timeout=bad)
    for bad in (0, -1, float("nan")):
        _raises(ValueError, fb.Broadcaster, g, timeout=bad)
    # Nothing was sent: the group works.
    assert fb.broadcast_pyobj([3] if rank == 3 else None, rank, g, 3, timeout=5) == [3]


@check
def _check_bad_src_before_a_broken_group(rank, world):
    fb = _fb()
    g = _group(range(world))
    b = fb.Broadcaster(g)
    assert b.broadcast("x" if rank == 1 else None, src=1) == "x"
    for bad in (1.0, True):   # equal to 1, which this Broadcaster has a route for
        e = _raises(TypeError, b.broadcast, "y", src=bad)
        assert "src= must be an int rank" in str(e), str(e)
        _raises(TypeError, fb.broadcast_pyobj, ["y"], rank, g, bad)
    assert b.broadcast("z" if rank == 1 else None, src=1) == "z"
    sys.modules["fastbcast.transport"].GroupState.of(g).give_up("given up by the test")
    e = _raises(TypeError, b.broadcast, "y", src=1.0)
    assert "src= must be an int rank" in str(e), str(e)
    _raises(TypeError, fb.broadcast_pyobj, ["y"], rank, g, 1.0)
    e = _raises(fb.BroadcastError, b.broadcast, "y", src=1)
    assert "given up by the test" in str(e), str(e)


@check
def _check_call_from_a_non_member(rank, world):
    fb = _fb()
    g01 = _group([0, 1])
    if rank in (2, 3):
        for call in (lambda: fb.broadcast_pyobj([1], rank, g01, 0), lambda: fb.broadcast([1], group=g01, src=0),
                     lambda: fb.Broadcaster(g01)):
            e = _raises(ValueError, call)
            assert f"global rank {rank}) is not a member of the group" in str(e), str(e)
    else:
        assert fb.broadcast_pyobj(["members"] if rank == 0 else None, rank, g01, 0) == ["members"]


@check
def _check_drop_in_data_without_len(rank, world):
    fb = _fb()
    g = _group(range(world))
    for src, data in ((0, 5), (3, 5), (1, None)):
        try:
            len(data)
        except TypeError as e:
            sglang_says = str(e)
        started = time.monotonic()
        e = _failed_call(rank, src, TypeError, lambda o: fb.broadcast_pyobj(o, rank, g, src), data, sglang_says)
        assert rank != src or str(e) == sglang_says, str(e)
        assert time.monotonic() - started < CHECK_TIMEOUT_S / 2
        # the next call works on every rank; receivers ignore their data, as SGLang's do
        assert fb.broadcast_pyobj(["next", src] if rank == src else 7, rank, g, src) == ["next", src]
    # A group of one rank: the same TypeError, not the refused object handed back.
    alone = [dist.new_group([r]) for r in range(world)][rank]
    e = _raises(TypeError, fb.broadcast_pyobj, None, rank, alone, rank)
    assert str(e) == "object of type 'NoneType' has no len()", str(e)
    assert fb.broadcast_pyobj([1], rank, alone, rank) == [1]


def _run_checks(rank, world_size, outdir, names, transport):
    """The checks, with `transport` as every Broadcaster's default."""
    _bmod().DEFAULT_TRANSPORT = transport
    bt.register_all()
    run_checks(rank, CHECKS, names, outdir)
    dist.barrier()
    return rank


# --------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["collective", "shm"])
def four_rank_run(tmp_path_factory, request):
    outdir = str(tmp_path_factory.mktemp(f"bcast4-{request.param}"))
    error = None
    started = time.monotonic()
    try:
        run_distributed(_run_checks, WORLD, outdir, list(CHECKS), request.param, timeout=RUN_TIMEOUT_S)
    except AssertionError as e:
        error = str(e)
    return outdir, error, time.monotonic() - started


def _expect_ok(run, name):
    outdir, error, _ = run
    expect_check_ok(outdir, WORLD, name, error)


def test_world_every_source_function_and_broadcaster(four_rank_run):
    _expect_ok(four_rank_run, "world_every_source")


def test_subgroups_every_source_src_and_src_group_rank(four_rank_run):
    _expect_ok(four_rank_run, "subgroups_every_source")


def test_mesh_slices_tp_and_dp(four_rank_run):
    _expect_ok(four_rank_run, "mesh_slices")


def test_mesh_permuted_tensor_default_source(four_rank_run):
    _expect_ok(four_rank_run, "mesh_permuted_default_source")


def test_type_zoo_round_trips(four_rank_run):
    _expect_ok(four_rank_run, "type_zoo")


def test_zero_dim_numpy_array_round_trips(four_rank_run):
    # np.array(7) and other 0-d arrays: a receiver's decode fails with
    # "cannot reshape numpy array (TypeError: reshape() takes exactly 1
    # argument (0 given))" (fastbcast.decode(fastbcast.encode(np.array(7)))
    # fails the same way without any broadcast).
    _expect_ok(four_rank_run, "zero_dim_numpy_array")


def test_empty_list_drop_in(four_rank_run):
    _expect_ok(four_rank_run, "empty_list")


def test_first_chunk_boundaries(four_rank_run):
    _expect_ok(four_rank_run, "first_chunk_boundaries")


def test_multi_chunk_partial_and_exact(four_rank_run):
    _expect_ok(four_rank_run, "multi_chunk")


def test_broadcaster_reuse_sizes_up_and_down(four_rank_run):
    _expect_ok(four_rank_run, "broadcaster_reuse")


def test_parity_with_pickle_broadcast_pyobj(four_rank_run):
    _expect_ok(four_rank_run, "pickle_parity")


def test_drop_in_force_cpu_device(four_rank_run):
    _expect_ok(four_rank_run, "force_cpu_device")


def test_error_source_outside_group(four_rank_run):
    _expect_ok(four_rank_run, "error_source_outside_group")


def test_error_group_local_rank_in_drop_in(four_rank_run):
    _expect_ok(four_rank_run, "error_wrong_rank")


def test_error_frame_for_unsupported_type(four_rank_run):
    _expect_ok(four_rank_run, "error_unsupported_type")


def test_drop_in_pickle_default_and_strict(four_rank_run):
    _expect_ok(four_rank_run, "drop_in_pickle_policy")


def test_version_mismatch_on_source(four_rank_run):
    _expect_ok(four_rank_run, "version_mismatch")


def test_chunk_size_mismatch_leaves_no_rank_waiting(four_rank_run):
    _expect_ok(four_rank_run, "chunk_size_mismatch")


def test_one_call_path_and_its_fallbacks(four_rank_run):
    _expect_ok(four_rank_run, "one_call_path")


def test_drop_in_reference_cycles(four_rank_run):
    _expect_ok(four_rank_run, "drop_in_reference_cycles")


def test_requires_grad_survives(four_rank_run):
    _expect_ok(four_rank_run, "requires_grad_survives")


def test_timeout_arguments(four_rank_run):
    _expect_ok(four_rank_run, "timeout_arguments")


def test_bad_src_before_a_broken_group(four_rank_run):
    _expect_ok(four_rank_run, "bad_src_before_a_broken_group")


def test_call_from_a_non_member(four_rank_run):
    _expect_ok(four_rank_run, "call_from_a_non_member")


def test_drop_in_data_without_len(four_rank_run):
    _expect_ok(four_rank_run, "drop_in_data_without_len")


def test_every_check_has_a_test():
    import inspect

    sources = "".join(inspect.getsource(f) for n, f in globals().items() if n.startswith("test_"))
    untested = [n for n in CHECKS if f'_expect_ok(four_rank_run, "{n}")' not in sources]
    assert not untested, f"checks that run but no test reports: {untested}"


# --------------------------------------------------------------------------
# Several hundred MB on 2 ranks
# --------------------------------------------------------------------------

BIG_BLOB = 200 << 20          # bytes
BIG_TENSORS = 4               # x 25 MiB float32 tensors


def _big_payload():
    rng = np.random.default_rng(1234)
    blob = rng.bytes(BIG_BLOB)
    g = torch.Generator().manual_seed(5678)
    tensors = [torch.randn(25 << 18, generator=g) for _ in range(BIG_TENSORS)]   # 25 MiB each
    return {"blob": blob, "tensors": tensors, "meta": {"n": BIG_TENSORS}}


def _big_run(rank, world_size):
    fb = _fb()
    out = {}
    obj = _big_payload() if rank == 0 else None
    started = time.monotonic()
    got = fb.broadcast(obj, src=0)
    out["seconds"] = time.monotonic() - started
    if rank == 0:
        assert got is obj
    out["digest"] = bt.digest(got)
    del got, obj
    dist.barrier()
    return out


@pytest.mark.slow
def test_several_hundred_mb_payload():
    results = run_distributed(_big_run, 2, timeout=240)
    sent, received = results[0]["digest"], results[1]["digest"]
    total = BIG_BLOB + BIG_TENSORS * (25 << 20)
    assert total >= 300 << 20
    assert sent[0] == received[0], (sent[0], received[0])       # structure and sizes
    assert sent[1] == received[1], "the received bytes differ from the sent ones"
