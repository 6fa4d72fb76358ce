"""The methods the broadcast benchmark times, as rows of its table.

A row is a method over a transport: ``pickle@gloo`` is the pickle design over
a gloo group with CPU tensors, ``pickle@nccl`` the same over NCCL with the
rank's CUDA device. On a gloo run every row is ``@gloo``. On an NCCL run the
object methods run over NCCL, and fastbcast, its ``broadcast_pyobj`` drop-in and
the pickle design also run over a gloo group created next to the NCCL one
(SGLang's scheduler broadcasts over its CPU group, ``force_cpu_device=True``).

``fastbcast-shm`` and ``fastbcast-collective`` are a ``fastbcast.Broadcaster``
created with ``transport="shm"`` / ``"collective"``; ``fastbcast`` is the
default (``"auto"``, or FASTBCAST_TRANSPORT). A build whose Broadcaster has no
``transport`` argument reports those two rows as n/a with the reason.
``vllm_mq`` is vLLM's shared-memory MessageQueue (an optional baseline).
``codec`` is no broadcast: the source alone runs ``fastbcast.encode`` then
``fastbcast.decode`` of the same payload, the yardstick of issue 10's targets.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import baselines
from .common import fastbcast_api

# name -> (one-line description, transports it runs over on an NCCL run)
METHODS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "fastbcast": ("fastbcast.broadcast(obj, group=..., src=...)", ("nccl", "gloo")),
    "fastbcast-shm": ("fastbcast.Broadcaster(group, transport='shm').broadcast(obj, src=...)",
                      ("nccl", "gloo")),
    "fastbcast-collective": ("fastbcast.Broadcaster(group, transport='collective')"
                             ".broadcast(obj, src=...)", ("nccl", "gloo")),
    "fastbcast_pyobj": ("fastbcast.broadcast_pyobj(obj, rank, group, src, force_cpu_device)",
                        ("nccl", "gloo")),
    "pickle": ("the pickle design (SGLang broadcast_pyobj): pickle, size + bytes broadcasts",
               ("nccl", "gloo")),
    "vllm_mq": ("vLLM's shared-memory MessageQueue (6 x 4 MiB ring, as vLLM's TP group), "
                "broadcast_object", ("gloo",)),
    "object_list": ("torch.distributed.broadcast_object_list", ("nccl",)),
    "msgspec": ("msgspec MessagePack, size + bytes broadcasts, reused (pinned) buffers", ("nccl",)),
    "floor_pinned": ("floor: pinned host -> device -> broadcast -> device -> pinned host, "
                     "pre-allocated", ("nccl",)),
    "floor_device": ("floor: one broadcast of a pre-allocated device buffer", ("nccl",)),
    "floor_cpu": ("floor: one broadcast of a pre-allocated CPU buffer (the gloo floor)", ("gloo",)),
    "codec": ("no broadcast: fastbcast.encode + fastbcast.decode on the source alone", ("local",)),
}
FLOORS = ("floor_pinned", "floor_device", "floor_cpu")
FASTBCAST_METHODS = ("fastbcast", "fastbcast_pyobj")
#: Broadcaster rows that pick a transport: method -> the transport= value.
TRANSPORT_METHODS = {"fastbcast-shm": "shm", "fastbcast-collective": "collective"}
DEFAULT_METHODS = ("codec", "fastbcast", "fastbcast-shm", "fastbcast-collective", "fastbcast_pyobj",
                   "pickle", "vllm_mq", "object_list", "msgspec", "floor_pinned", "floor_device",
                   "floor_cpu")


@dataclasses.dataclass(frozen=True)
class Row:
    method: str
    transport: str  # "gloo" or "nccl"; "local" for the codec row

    @property
    def key(self) -> str:
        return self.method if self.transport == "local" else "%s@%s" % (self.method, self.transport)


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
        if name == "codec":
            wanted = ["local"]
        elif backend == "gloo":
            if transport == "nccl":
                raise ValueError("%r needs an NCCL run (--backend nccl)" % item)
            if name in ("floor_pinned", "floor_device"):
                name = "floor_cpu"
            wanted = ["gloo"]
        else:
            wanted = [transport] if transport else list(METHODS[name][1])
            if (name in FLOORS or name == "vllm_mq") and transport and transport not in METHODS[name][1]:
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
    # Objects kept for the whole run (Broadcasters, message queues), closed at its end.
    kept: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def group(self, transport: str):
        return self.main_group if transport == "nccl" else self.cpu_group

    def dev(self, transport: str):
        import torch
        return self.device if transport == "nccl" else torch.device("cpu")

    def close_kept(self) -> None:
        for obj in self.kept.values():
            obj.close()
        self.kept.clear()


def transport_support(fb: Any) -> Optional[str]:
    """None if this fastbcast's Broadcaster takes ``transport=``; else why not."""
    import inspect

    try:
        params = inspect.signature(fb.Broadcaster).parameters
    except (TypeError, ValueError) as e:
        return "cannot inspect fastbcast.Broadcaster: %s" % e
    if "transport" not in params:
        return "this fastbcast's Broadcaster has no transport= argument (not in this build yet)"
    return None


class _Lazy:
    """Builds its object on the first call (a collective on some methods, so it
    must happen after every rank agreed the cell runs), then calls it."""

    def __init__(self, build: Callable[[], Any]):
        self.build = build
        self.obj = None

    def get(self):
        if self.obj is None:
            self.obj = self.build()
        return self.obj

    def close(self) -> None:
        obj, self.obj = self.obj, None
        if obj is not None:
            obj.close()


def make_call(row: Row, ctx: Context, payload_name: str, obj: Any, nbytes: int,
              has_cuda: bool) -> Tuple[Callable[[], Any], Callable[[Any], bool]]:
    """(call, check) for one cell; raises Unsupported for an n/a cell.

    ``call()`` runs one broadcast on this rank and returns what it received.
    ``check(result)`` says whether that is a correct copy. Every rank reaches
    the same verdict on support, since each holds an identical payload (the
    runner still agrees on it with one collective before the first call).
    """
    from .common import same
    from .payloads import CLASS_PAYLOADS, MSGSPEC_TYPES

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
        if baselines.numpy_missing():
            raise Unsupported("numpy is not installed")
        if payload_name in CLASS_PAYLOADS:
            raise Unsupported("msgspec cannot carry these classes: it encodes neither array.array (sglang's "
                              "token ids) nor pydantic models (verl's requests)")
        typ = MSGSPEC_TYPES.get(payload_name)
        try:
            msgspec.msgpack.Encoder().encode(obj)
        except Exception as e:
            raise Unsupported("msgspec cannot encode it (%s)" % type(e).__name__)
        return (lambda: baselines.msgspec_broadcast(mine, rank, group, src, device, typ)), check_obj
    if row.method == "vllm_mq":
        why = baselines.vllm_unavailable()
        if why:
            raise Unsupported(why)
        mq = ctx.kept.setdefault(row.key, baselines.VllmMessageQueue(group, src))
        return (lambda: mq(mine)), check_obj
    if row.method == "fastbcast" or row.method in TRANSPORT_METHODS:
        fb, why = fastbcast_api("broadcast")
        if fb is None:
            raise Unsupported(why)
        if row.method == "fastbcast":
            return (lambda: fb.broadcast(mine, group=group, src=src)), check_obj
        why = transport_support(fb)
        if why:
            raise Unsupported(why)
        kind = TRANSPORT_METHODS[row.method]
        b = ctx.kept.setdefault(row.key, _Lazy(
            lambda: fb.Broadcaster(group, device=device, transport=kind)))
        return (lambda: b.get().broadcast(mine, src=src)), check_obj
    if row.method == "fastbcast_pyobj":
        fb, why = fastbcast_api("broadcast_pyobj")
        if fb is None:
            raise Unsupported(why)
        force_cpu = row.transport == "gloo"
        # SGLang passes its request list itself (`[]` on an idle step); any
        # other object goes in a one-element list.
        wrap = type(obj) is not list
        data = ([obj] if wrap else obj) if rank == src else None

        def call_pyobj():
            got = fb.broadcast_pyobj(data, rank, dist_group=group, src=src,
                                     force_cpu_device=force_cpu)
            if not wrap:
                return got
            # Anything but a one-element list fails the check (e.g. the `[]`
            # of the rank bug); raising here would leave the other ranks waiting.
            return got[0] if isinstance(got, list) and len(got) == 1 else _Malformed(got)
        return call_pyobj, check_obj
    raise ValueError(row.method)
