"""Broadcast tests over NCCL: one process per GPU (skipped without 2 GPUs).

Every test is one run_distributed call of its own (backend="nccl", which sets
each rank's current device to cuda:<rank>), independent of the others and of
their order, with a timeout. The world is every visible GPU; the sub-group
and 2x2 mesh tests need 4 and use exactly 4.

What "arrived right" means for a CUDA tensor: a CUDA tensor on the
receiver's own current device, of the same dtype and shape, equal to the
source's values (compared on the device).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

import bcast_types as bt
from distributed import CountBroadcasts, gpu_count, requires_gpus, run_distributed
from test_broadcast import (
    _bmod,
    _bytes_encoding_to,
    _counts_collectives,
    _expected_collectives,
    _fb,
    _header_bytes,
    _pickle_broadcast_pyobj,
    _raises,
)

TIMEOUT_S = 120

pytestmark = [
    requires_gpus(2),
    pytest.mark.nccl,
    pytest.mark.skipif(not (dist.is_available() and dist.is_nccl_available()), reason="torch without NCCL"),
]


# Every test runs on both transports: the group's NCCL collective, and shared
# memory for the host bytes (the ranks share this host) with CUDA tensors
# still device to device over NCCL.
TRANSPORTS = ["collective", "shm"]


def _with_transport(rank, world, fn, transport):
    _bmod().DEFAULT_TRANSPORT = transport
    return fn(rank, world)


def _world() -> int:
    return gpu_count()


def _dev():
    return torch.device("cuda", torch.cuda.current_device())


def _cuda_tensors(seed: int, device) -> dict:
    """CUDA tensors of several kinds, built the same way on every rank."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 4, generator=g)
    return {
        "bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16).to(device),
        "i64": torch.randint(-2**50, 2**50, (33,), generator=g, dtype=torch.int64).to(device),
        "bool": (torch.rand(17, generator=g) > 0.5).to(device),
        "f32": base.to(device),
        "zero_d": torch.tensor(2.75, dtype=torch.float64).to(device),
        "empty": torch.empty(0, 3, dtype=torch.float16, device=device),
        "noncontig": base.to(device).t(),                     # a transposed view
        "offset": torch.arange(100, dtype=torch.int32).to(device)[7:90:3],   # strided, storage offset
        "u8_odd": torch.randint(0, 256, (13,), generator=g, dtype=torch.uint8).to(device),  # odd length
    }


def _assert_cuda_same(got, want, path):
    """got must be a CUDA tensor on this rank's current device equal to want."""
    assert isinstance(got, torch.Tensor), f"{path}: got {type(got).__name__}"
    assert got.device == _dev(), f"{path}: on {got.device}, expected this rank's current device {_dev()}"
    assert got.dtype == want.dtype and got.shape == want.shape, \
        f"{path}: {got.dtype} {tuple(got.shape)} != {want.dtype} {tuple(want.shape)}"
    assert torch.equal(got, want.to(got.device)), f"{path}: values differ"


def _assert_tree(got, want, path="obj"):
    """assert_same, except CUDA tensors are compared as _assert_cuda_same."""
    if isinstance(want, torch.Tensor) and want.is_cuda:
        _assert_cuda_same(got, want, path)
    elif isinstance(want, dict):
        assert type(got) is dict and list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for k in want:
            _assert_tree(got[k], want[k], f"{path}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), f"{path}: {type(got).__name__}/{len(got)}"
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_tree(a, b, f"{path}[{i}]")
    else:
        bt.assert_same(got, want, path)


def _round(send, rank, src, obj):
    got = send(obj if rank == src else None)
    if rank == src:
        assert got is obj, "the source must get its own object back"
    else:
        _assert_tree(got, obj)
    return got


def _small(tag):
    return {"tag": tag, "ids": list(range(40)), "cpu": torch.arange(6).reshape(2, 3), "s": "ünï"}


def _sync_and_barrier():
    torch.cuda.synchronize()
    dist.barrier()


# --------------------------------------------------------------------------
# World of all GPUs
# --------------------------------------------------------------------------

def _world_every_source(rank, world):
    fb = _fb()
    bt.register_all()
    assert torch.cuda.current_device() == rank
    for src in range(world):
        _round(lambda o: fb.broadcast(o, src=src), rank, src, _small(f"w{src}"))
        _round(lambda o: fb.broadcast(o, src_group_rank=src), rank, src, [src, (1, 2)])
    _round(lambda o: fb.broadcast(o), rank, 0, {"default source": 0})
    zoo = bt.type_zoo()
    for src in range(world):
        _round(lambda o: fb.broadcast(o, src=src), rank, src, zoo)
    with fb.Broadcaster() as b:
        assert b.device == _dev(), b.device
        for i in range(4 * world):
            src = (i * 3 + 1) % world
            obj = {"i": i, "batch": bt.requests_batch(3, 2000 * (i % 3), seed=i)} if i % 2 else [i]
            _round(lambda o: b.broadcast(o, src=src), rank, src, obj)
    _sync_and_barrier()
    return "ok"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nccl_world_every_source(transport):
    world = _world()
    assert run_distributed(_with_transport, world, _world_every_source, transport, backend="nccl", timeout=TIMEOUT_S) == ["ok"] * world


# --------------------------------------------------------------------------
# CUDA tensors inside the object
# --------------------------------------------------------------------------

def _cuda_tensors_arrive_on_device(rank, world):
    fb = _fb()
    dev = _dev()
    # what every rank expects, built on its own device
    for src in range(world):
        obj = {"src": src, "t": _cuda_tensors(src, dev)}
        _round(lambda o: fb.broadcast(o, src=src), rank, src, obj)
    # each tensor alone, as the whole object
    for i, (name, t) in enumerate(_cuda_tensors(99, dev).items()):
        src = i % world
        got = fb.broadcast(t if rank == src else None, src=src)
        if rank != src:
            _assert_cuda_same(got, t, name)
    # only empty CUDA tensors: the device part has no bytes at all
    _round(lambda o: fb.broadcast(o, src=world - 1), rank, world - 1,
           [torch.empty(0, device=dev), torch.empty(0, 5, dtype=torch.bfloat16, device=dev)])
    _round(lambda o: fb.broadcast(o, src=0), rank, 0, {"after empty": torch.ones(3, device=dev)})
    # mixed CPU and CUDA tensors (and numpy) in one object; CPU ones stay on the CPU
    for src in range(world):
        mixed = {"cpu": bt.cpu_tensors(src), "cuda": _cuda_tensors(src + 10, dev),
                 "np": bt.numpy_arrays(src), "list": [torch.zeros(2, device=dev), torch.zeros(2)],
                 "tuple": (torch.full((3,), src, device=dev), "x")}
        got = _round(lambda o: fb.broadcast(o, src=src), rank, src, mixed)
        if rank != src:
            assert all(t.device.type == "cpu" for t in got["cpu"].values())
            assert got["list"][1].device.type == "cpu" and got["list"][0].device == dev
    # CUDA tensors with a host part that spans several chunks
    with fb.Broadcaster(first_chunk=4096, chunk=1000) as b:
        for src in (world - 1, 0):
            obj = {"ids": list(range(5000)), "t": _cuda_tensors(src + 20, dev), "cpu": torch.arange(3000)}
            _round(lambda o: b.broadcast(o, src=src), rank, src, obj)
            _round(lambda o: b.broadcast(o, src=src), rank, src, [src])     # small, same Broadcaster
    # received tensors are usable and independent of later broadcasts
    keep = fb.broadcast({"k": torch.full((4,), 7, device=dev)} if rank == 0 else None, src=0)
    fb.broadcast({"k": torch.full((4,), 9, device=dev)} if rank == 0 else None, src=0)
    assert torch.equal(keep["k"], torch.full((4,), 7, device=dev)), "an earlier result was overwritten"
    _sync_and_barrier()
    return "ok"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nccl_cuda_tensors_arrive_on_receiver_device(transport):
    world = _world()
    assert run_distributed(_with_transport, world, _cuda_tensors_arrive_on_device, transport, backend="nccl",
                           timeout=TIMEOUT_S) == ["ok"] * world


# --------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------

def _chunks(rank, world):
    fb = _fb()
    h = _header_bytes()
    default_f, default_chunk = _bmod().DEFAULT_FIRST_CHUNKS["nccl"], _bmod().DEFAULT_CHUNK
    for f in (4096, default_f):
        with fb.Broadcaster(first_chunk=f) as b:
            for delta in (-h - 1, -h, -h + 1, -h):
                payload = _bytes_encoding_to(f + delta)
                for src in (0, world - 1):
                    with CountBroadcasts() as c:
                        got = b.broadcast(payload if rank == src else None, src=src)
                    assert got == payload, (f, delta)
                    want = _expected_collectives(f + delta, f, default_chunk)
                    if _counts_collectives(b):
                        assert c.count == want, (f, delta, c.count, want)
    for f, ch, n_enc in ((4096, 1000, 10_003), (4096, 1024, 4096 + 6 * 1024 - h), (64, 13, 3000)):
        payload = _bytes_encoding_to(n_enc)
        with fb.Broadcaster(first_chunk=f, chunk=ch) as b:
            for src in range(world):
                got = b.broadcast(payload if rank == src else None, src=src)
                assert got == payload, (f, ch, n_enc, src)
    # sizes up and down on one Broadcaster (staging buffers grow, then get reused)
    with fb.Broadcaster(first_chunk=2048, chunk=8192) as b:
        for i, n in enumerate([10, 200_000, 5, 50_000, 0, 1_000_000, 3, 70_000]):
            src = i % world
            obj = {"b": bytes(n), "i": i, "t": torch.full((n % 97,), i, device=_dev())}
            _round(lambda o: b.broadcast(o, src=src), rank, src, obj)
    _sync_and_barrier()
    return "ok"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nccl_first_chunk_boundaries_and_multi_chunk(transport):
    world = _world()
    assert run_distributed(_with_transport, world, _chunks, transport, backend="nccl", timeout=TIMEOUT_S) == ["ok"] * world


BIG_HOST = 150 << 20
BIG_CUDA = 50 << 20


def _big(rank, world):
    fb = _fb()
    obj = None
    if rank == 0:
        blob = np.random.default_rng(7).bytes(BIG_HOST)
        g = torch.Generator().manual_seed(8)
        obj = {"blob": blob, "cuda": torch.randn(BIG_CUDA // 4, generator=g).to(_dev()),
               "cpu": torch.randn(1 << 20, generator=g)}
    started = time.monotonic()
    got = fb.broadcast(obj, src=0)
    torch.cuda.synchronize()
    seconds = time.monotonic() - started
    if rank == 0:
        assert got is obj
    else:
        assert got["cuda"].device == _dev()
    out = {"digest": bt.digest(got), "seconds": seconds}
    del got, obj
    _sync_and_barrier()
    return out


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nccl_large_payload_200mb(transport):
    world = _world()
    results = run_distributed(_with_transport, world, _big, transport, backend="nccl", timeout=TIMEOUT_S)
    for r in range(1, world):
        assert results[r]["digest"] == results[0]["digest"], f"rank {r} received different bytes"


# --------------------------------------------------------------------------
# The drop-in
# --------------------------------------------------------------------------

def _drop_in(rank, world):
    fb = _fb()
    bt.register_all()
    dev = _dev()
    inputs = [[], [1, 2, 3], [bt.requests_batch(4, 100)], [{"nested": [(1, {2}), frozenset({"a"})]}, None],
              [torch.arange(10), np.arange(4)], [bt.Opaque("pickled")]]
    for i, data in enumerate(inputs):
        src = i % world
        ours = fb.broadcast_pyobj(data if rank == src else None, rank, None, src, force_cpu_device=False)
        ref = _pickle_broadcast_pyobj(data if rank == src else None, rank, None, src, force_cpu_device=False)
        if rank == src:
            assert ours is data and ref is data
        else:
            bt.assert_same(ours, ref, f"input {i}")
            bt.assert_same(ours, data, f"input {i}")
    # CUDA tensors through the drop-in land on this rank's device
    data = [torch.arange(5, device=dev)]
    got = fb.broadcast_pyobj(data if rank == 0 else None, rank, None, 0, False)
    if rank != 0:
        _assert_cuda_same(got[0], data[0], "drop-in cuda")
    # force_cpu_device=True on an NCCL group: a ValueError before anything is sent
    e = _raises(ValueError, fb.broadcast_pyobj, [1], rank, None, 0, True)
    assert "nccl" in str(e).lower(), str(e)
    _raises(ValueError, fb.broadcast_pyobj, [1], rank, dist.group.WORLD, 0)   # default is True
    # the same group still works afterwards
    got = fb.broadcast_pyobj([42] if rank == 1 else None, rank, None, 1, False)
    assert got == [42]
    # a gloo group next to the NCCL world carries the CPU path
    gloo = dist.new_group(list(range(world)), backend="gloo")
    for force in (True, False):
        data = [{"via": "gloo", "force": force}, torch.ones(2)]
        got = fb.broadcast_pyobj(data if rank == world - 1 else None, rank, gloo, world - 1, force)
        if rank != world - 1:
            bt.assert_same(got, data)
    # the design brief's bug on a sub-group of global ranks [2, 3]
    if world >= 4:
        g23 = dist.new_group([2, 3])
        if rank in (2, 3):
            msg = str(_raises(ValueError, fb.broadcast_pyobj, ["x"], rank - 2, g23, 2, False))
            assert "group-local" in msg, msg
            got = fb.broadcast_pyobj(["x"] if rank == 2 else None, rank, g23, 2, False)
            assert got == ["x"]
    _sync_and_barrier()
    return "ok"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nccl_drop_in_broadcast_pyobj(transport):
    world = _world()
    assert run_distributed(_with_transport, world, _drop_in, transport, backend="nccl", timeout=TIMEOUT_S) == ["ok"] * world


# --------------------------------------------------------------------------
# Errors: the error frame, version mismatch, bad sources
# --------------------------------------------------------------------------

def _errors(rank, world):
    fb = _fb()
    mod = _bmod()
    dev = _dev()
    bad = {"ok": [1, torch.ones(3, device=dev)], "bad": [0, (1, bt.Opaque("x"))]}
    for kwargs in ({}, {"first_chunk": 64}, {"first_chunk": 4096, "chunk": 100}):
        with fb.Broadcaster(**kwargs) as b:
            for src in (0, world - 1):
                started = time.monotonic()
                if rank == src:
                    e = _raises(TypeError, b.broadcast, bad, src=src)
                    assert "['bad'][1][1]" in str(e) and "Opaque" in str(e), str(e)
                else:
                    e = _raises(fb.BroadcastError, b.broadcast, None, src=src)
                    if b.first_chunk >= 1024:
                        assert "['bad'][1][1]" in str(e) and "Opaque" in str(e), str(e)
                assert time.monotonic() - started < 30
                other = (src + 1) % world
                _round(lambda o: b.broadcast(o, src=other), rank, other, {"after": src, "t": torch.ones(2, device=dev)})
    # with pickle allowed everywhere the same object goes through (its CUDA tensor too)
    got = fb.broadcast(bad if rank == 0 else None, src=0, allow_pickle=True)
    if rank != 0:
        assert got["bad"] == bad["bad"]
        _assert_cuda_same(got["ok"][1], bad["ok"][1], "ok[1]")

    # a version mismatch, with CUDA tensors (so a device collective follows the
    # host chunks): every receiver raises; the group still works afterwards
    obj = {"b": bytes(10_000), "t": torch.arange(1000, device=dev)}
    with fb.Broadcaster(first_chunk=4096, chunk=1000) as b:
        for src in (world - 1, 0):
            if rank == src:
                saved = mod.FORMAT_VERSION
                mod.FORMAT_VERSION = 999
                try:
                    b.broadcast(obj, src=src)
                finally:
                    mod.FORMAT_VERSION = saved
            else:
                e = _raises(fb.BroadcastError, b.broadcast, None, src=src)
                assert "version" in str(e).lower(), str(e)
            _round(lambda o: b.broadcast(o, src=src), rank, src, obj)

    # sources outside the group: ValueError on the calling ranks, nothing sent
    msg = str(_raises(ValueError, fb.broadcast, "x", src=world))
    assert "global rank" in msg and "group rank" in msg, msg
    _raises(ValueError, fb.broadcast, "x", src_group_rank=world)
    if world >= 4:
        g12 = dist.new_group([1, 2])
        if rank in (1, 2):
            msg = str(_raises(ValueError, fb.broadcast, "x", group=g12, src=3))
            assert "global rank" in msg and "group rank" in msg and "[1, 2]" in msg, msg
            _round(lambda o: fb.broadcast(o, group=g12, src=2), rank, 2, {"after": "outside"})

    # CUDA tensors on a gloo group: the source refuses, receivers are told
    gloo = dist.new_group(list(range(world)), backend="gloo")
    if rank == 0:
        e = _raises(TypeError, fb.broadcast, {"t": torch.ones(2, device=dev)}, group=gloo, src=0)
        assert "CUDA" in str(e), str(e)
    else:
        _raises(fb.BroadcastError, fb.broadcast, None, group=gloo, src=0)
    _round(lambda o: fb.broadcast(o, group=gloo, src=0), rank, 0, {"cpu": torch.ones(2)})
    _sync_and_barrier()
    return "ok"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nccl_error_frame_version_mismatch_and_bad_source(transport):
    world = _world()
    assert run_distributed(_with_transport, world, _errors, transport, backend="nccl", timeout=TIMEOUT_S) == ["ok"] * world


# --------------------------------------------------------------------------
# 4 GPUs: sub-groups and a 2x2 mesh
# --------------------------------------------------------------------------

def _subgroups(rank, world):
    fb = _fb()
    dev = _dev()
    g12, g03 = dist.new_group([1, 2]), dist.new_group([0, 3])
    for members, g in (([1, 2], g12), ([0, 3], g03)):
        if rank not in members:
            continue
        with fb.Broadcaster(g) as b:
            assert b.device == dev
            for rnd in range(3):
                for gr, src in enumerate(members):
                    obj = {"g": members, "src": src, "rnd": rnd, "t": _cuda_tensors(src * 10 + rnd, dev),
                           "cpu": torch.full((4,), src)}
                    _round(lambda o: fb.broadcast(o, group=g, src=src), rank, src, obj)
                    _round(lambda o: fb.broadcast(o, group=g, src_group_rank=gr), rank, src, [members, gr])
                    _round(lambda o: b.broadcast(o, src=src), rank, src, obj)
                    _round(lambda o: b.broadcast(o, src_group_rank=gr), rank, src, (members, rnd))
    _sync_and_barrier()
    return "ok"


@requires_gpus(4)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nccl_subgroups_every_source(transport):
    assert run_distributed(_with_transport, 4, _subgroups, transport, backend="nccl", timeout=TIMEOUT_S) == ["ok"] * 4


def _mesh(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    fb = _fb()
    dev = _dev()
    mesh = init_device_mesh("cuda", (2, 2), mesh_dim_names=("dp", "tp"))
    tp = [rank - rank % 2, rank - rank % 2 + 1]
    dp = [rank % 2, rank % 2 + 2]
    for dim, members in (("tp", tp), ("dp", dp)):
        # every group at once; each rank offers its own object, tagged with its rank
        mine = {"dim": dim, "from": rank, "t": torch.full((5,), rank, device=dev, dtype=torch.int64)}
        got = fb.broadcast(mine, mesh=mesh, dim=dim)
        if rank == members[0]:
            assert got is mine
        else:
            assert got["from"] == members[0] and got["dim"] == dim, got
            _assert_cuda_same(got["t"], torch.full((5,), members[0], device=dev, dtype=torch.int64), "t")
        got = fb.broadcast([dim, rank], mesh=mesh, dim=dim, src_group_rank=1)
        assert got == [dim, members[1]], got
        with fb.Broadcaster(mesh=mesh, dim=dim, first_chunk=2048, chunk=4096) as b:
            for i in range(4):
                src = members[i % 2]
                mine = {"i": i, "from": rank, "ids": list(range(3000 * (i % 3))),
                        "t": torch.full((i + 1,), rank, device=dev)}
                got = b.broadcast(mine, src=src)
                assert got["from"] == src and got["i"] == i and got["ids"] == list(range(3000 * (i % 3)))
                _assert_cuda_same(got["t"], torch.full((i + 1,), src, device=dev), "t")
    # the design brief's call shape: local tp rank where a global one is due
    data = [{"from": rank}]
    src = mesh["tp"].mesh[0].item()
    local = mesh.get_local_rank("tp")
    if rank in (2, 3):
        msg = str(_raises(ValueError, fb.broadcast_pyobj, data, local, mesh["tp"].get_group(), src, False))
        assert "group-local" in msg, msg
    got = fb.broadcast_pyobj(data if rank == src else None, rank, mesh["tp"].get_group(), src, False)
    assert got == [{"from": src}], got
    _sync_and_barrier()
    return "ok"


@requires_gpus(4)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nccl_mesh_2x2_dp_tp(transport):
    assert run_distributed(_with_transport, 4, _mesh, transport, backend="nccl", timeout=TIMEOUT_S) == ["ok"] * 4


# --------------------------------------------------------------------------
# A default group with both backends ("cpu:gloo,cuda:nccl", as verl creates)
# --------------------------------------------------------------------------

def _mixed_backend(rank, world):
    fb = _fb()
    torch.cuda.set_device(rank)      # run_distributed sets it only for backend="nccl"
    dev = _dev()
    for src in range(world):
        obj = {"src": src, "t": _cuda_tensors(src, dev), "cpu": torch.arange(4)}
        _round(lambda o: fb.broadcast(o, src=src), rank, src, obj)
    for force in (True, False):
        data = [f"force={force}", torch.arange(3)]
        got = fb.broadcast_pyobj(data if rank == 0 else None, rank, None, 0, force)
        if rank != 0:
            bt.assert_same(got, data)
    _sync_and_barrier()
    return "ok"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nccl_mixed_cpu_gloo_cuda_nccl_default_group(transport):
    world = _world()
    assert run_distributed(_with_transport, world, _mixed_backend, transport, backend="cpu:gloo,cuda:nccl",
                           timeout=TIMEOUT_S) == ["ok"] * world
