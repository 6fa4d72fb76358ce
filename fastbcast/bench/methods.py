"""The methods the broadcast benchmark times, as rows of its table.

A row is a method over a transport: ``pickle@gloo`` is the pickle design over
a gloo group with CPU tensors, ``pickle@nccl`` the same over NCCL with the
rank's CUDA device. On a gloo run every row is ``@gloo``. On an NCCL run the
object methods run over NCCL, and fastbcast, its ``broadcast_pyobj`` drop-in and
the pickle design also run over a gloo group created next to the NCCL one
(SGLang's scheduler broadcasts over its CPU group, ``force_cpu_device=True``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import baselines
from .common import fastbcast_api

# name -> (one-line description, transports it runs over on an NCCL run)
METHODS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "fastbcast": ("fastbcast.broadcast(obj, group=..., src=...)", ("nccl", "gloo")),
    "fastbcast_pyobj": ("fastbcast.broadcast_pyobj([obj], rank, group, src, force_cpu_device)",
                        ("nccl", "gloo")),
    "pickle": ("the pickle design (SGLang broadcast_pyobj): pickle, size + bytes broadcasts",
               ("nccl", "gloo")),
    "object_list": ("torch.distributed.broadcast_object_list", ("nccl",)),
    "msgspec": ("msgspec MessagePack, size + bytes broadcasts, reused (pinned) buffers", ("nccl",)),
    "floor_pinned": ("floor: pinned host -> device -> broadcast -> device -> pinned host, "
                     "pre-allocated", ("nccl",)),
    "floor_device": ("floor: one broadcast of a pre-allocated device buffer", ("nccl",)),
    "floor_cpu": ("floor: one broadcast of a pre-allocated CPU buffer (the gloo floor)", ("gloo",)),
}
FLOORS = ("floor_pinned", "floor_device", "floor_cpu")
FASTBCAST_METHODS = ("fastbcast", "fastbcast_pyobj")
DEFAULT_METHODS = ("fastbcast", "fastbcast_pyobj", "pickle", "object_list", "msgspec",
                   "floor_pinned", "floor_device", "floor_cpu")


@dataclasses.dataclass(frozen=True)
class Row:
    method: str
    transport: str  # "gloo" or "nccl"

    @property
    def key(self) -> str:
        return "%s@%s" % (self.method, self.transport)


def resolve_rows(spec: Optional[str], backend: str) -> List[Row]:
    """Turns ``--methods`` (names, or ``name@transport``) into table rows.

    On gloo runs the device floors collapse into ``floor_cpu`` and every row is
    ``@gloo``. Raises ValueError for an unknown name.
    """
    names = [s.strip() for s in spec.split(",") if s.strip()] if spec else list(DEFAULT_METHODS)
    rows: List[Row] = []
    for item in names:
        name, _, transport = item.partition("@")
        if name not in METHODS:
            raise ValueError("unknown method %r; choose from %s (optionally @gloo / @nccl)"
                             % (name, ", ".join(METHODS)))
        if transport and transport not in ("gloo", "nccl"):
            raise ValueError("unknown transport in %r: use @gloo or @nccl" % item)
        if backend == "gloo":
            if transport == "nccl":
                raise ValueError("%r needs an NCCL run (--backend nccl)" % item)
            if name in ("floor_pinned", "floor_device"):
                name = "floor_cpu"
            wanted = ["gloo"]
        else:
            wanted = [transport] if transport else list(METHODS[name][1])
            if name in FLOORS and transport and transport not in METHODS[name][1]:
                raise ValueError("%r: %s only runs @%s" % (item, name, METHODS[name][1][0]))
        for t in wanted:
            row = Row(name, t)
            if row not in rows:
                rows.append(row)
    return rows


class _Malformed:
    """A result of the wrong shape; never equal to a payload."""

    def __init__(self, value):
        self.value = value


class Unsupported(Exception):
    """This method cannot carry this payload (a cell reported as n/a)."""


@dataclasses.dataclass
class Context:
    """What a rank knows while running cells."""
    rank: int
    world_size: int
    src: int
    backend: str
    main_group: Any  # the default group (NCCL or gloo)
    cpu_group: Any  # a gloo group over the same ranks (the default group on gloo runs)
    device: Any  # torch.device for NCCL transport (cuda:N), cpu otherwise

    def group(self, transport: str):
        return self.main_group if transport == "nccl" else self.cpu_group

    def dev(self, transport: str):
        import torch
        return self.device if transport == "nccl" else torch.device("cpu")


def make_call(row: Row, ctx: Context, payload_name: str, obj: Any, nbytes: int,
              has_cuda: bool) -> Tuple[Callable[[], Any], Callable[[Any], bool]]:
    """(call, check) for one cell; raises Unsupported for an n/a cell.

    ``call()`` runs one broadcast on this rank and returns what it received.
    ``check(result)`` says whether that is a correct copy. Every rank reaches
    the same verdict on support, since each holds an identical payload.
    """
    from .common import same
    from .payloads import MSGSPEC_TYPES

    rank, src = ctx.rank, ctx.src
    group, device = ctx.group(row.transport), ctx.dev(row.transport)
    mine = obj if rank == src else None

    def check_obj(result):
        return same(obj, result)

    if row.method in FLOORS:
        fn = {"floor_cpu": baselines.floor_cpu, "floor_device": baselines.floor_device,
              "floor_pinned": baselines.floor_pinned}[row.method]
        return (lambda: fn(nbytes, rank, group, src, device)), baselines.floor_check

    if has_cuda and row.transport == "gloo" and row.method != "pickle":
        raise Unsupported("CUDA tensors over a gloo group")

    if row.method == "pickle":
        return (lambda: baselines.pickle_broadcast_pyobj(mine, rank, group, src, device)), check_obj
    if row.method == "object_list":
        return (lambda: baselines.object_list_broadcast(mine, rank, group, src, device)), check_obj
    if row.method == "msgspec":
        try:
            import msgspec
        except ImportError:
            raise Unsupported("msgspec is not installed")
        typ = MSGSPEC_TYPES.get(payload_name)
        try:
            msgspec.msgpack.Encoder().encode(obj)
        except Exception as e:
            raise Unsupported("msgspec cannot encode it (%s)" % type(e).__name__)
        return (lambda: baselines.msgspec_broadcast(mine, rank, group, src, device, typ)), check_obj
    if row.method == "fastbcast":
        fb, why = fastbcast_api("broadcast")
        if fb is None:
            raise Unsupported(why)
        return (lambda: fb.broadcast(mine, group=group, src=src)), check_obj
    if row.method == "fastbcast_pyobj":
        fb, why = fastbcast_api("broadcast_pyobj")
        if fb is None:
            raise Unsupported(why)
        force_cpu = row.transport == "gloo"
        data = [obj] if rank == src else None

        def call_pyobj():
            got = fb.broadcast_pyobj(data, rank, dist_group=group, src=src,
                                     force_cpu_device=force_cpu)
            # Anything but a one-element list fails the check (e.g. the `[]`
            # of the rank bug); raising here would leave the other ranks waiting.
            return got[0] if isinstance(got, list) and len(got) == 1 else _Malformed(got)
        return call_pyobj, check_obj
    raise ValueError(row.method)
