"""Resolve who broadcasts to whom, in both rank spaces, before any collective runs.

Two rank spaces appear throughout this module and every docstring says which
one a rank lives in:

* **global rank**: the rank of a process in the default (world) process
  group, what ``torch.distributed.get_rank()`` returns. ``torch.distributed``
  collectives take their ``src=`` as a global rank, whatever group they run on.
* **group rank**: the index of a process inside one process group, ``0 ..
  size - 1``, what ``torch.distributed.get_rank(group)`` returns. A mesh
  dimension's local rank (``mesh.get_local_rank("tp")``) is a group rank.

Mixing the two is the "rank trap" this project exists for:
verl passed a TP-local rank where SGLang's ``broadcast_pyobj`` expected a
global one, so in every TP group but the first no rank believed it was the
source and every receiver silently got ``[]``. :func:`resolve` derives both
ranks itself from what the caller already holds (a ``DeviceMesh`` and a dim
name, or a ``ProcessGroup``), so the mistake cannot be expressed, and it
rejects a rank the caller passes that is not this process's global rank with
a ``ValueError`` naming both spaces.

Everything here is local: no function in this module runs a collective, so a
bad call fails on the rank that made it instead of hanging its peers.

This module is pure Python and depends only on ``torch.distributed``; it does
not load fastbcast's C++ extension.
"""
from __future__ import annotations

import dataclasses
import operator
import weakref
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

if TYPE_CHECKING:  # pragma: no cover
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["Route", "resolve", "clear_cache"]


@dataclasses.dataclass(frozen=True)
class Route:
    """Everything a broadcast needs to know about its group, resolved and checked.

    Built by :func:`resolve`; do not build one by hand unless every field is
    consistent (nothing here re-checks them).

    Arguments (each is also the attribute of that name):
        group: the process group to run the collectives on. ``None`` means the
            default (world) group, and only appears when the caller passed
            ``group=None``.
        ranks: the GLOBAL ranks of the group's members, in group-rank order:
            ``ranks[i]`` is the global rank of group rank ``i``.
        src: the source, as a GLOBAL rank (what ``torch.distributed``
            collectives take as ``src=``).
        src_group_rank: the source, as a GROUP rank (``ranks[src_group_rank]
            == src``).
        rank: this process, as a GLOBAL rank.
        group_rank: this process, as a GROUP rank (``ranks[group_rank] ==
            rank``).
        backend: the group's backend as ``torch.distributed.get_backend(group)``
            reports it, as a plain ``str`` (``"nccl"``, ``"gloo"``, ...).
    """

    group: "ProcessGroup | None"
    ranks: tuple[int, ...]
    src: int
    src_group_rank: int
    rank: int
    group_rank: int
    backend: str

    @property
    def is_src(self) -> bool:
        """Whether this process is the source.

        Returns:
            ``True`` when this process's global rank equals the source's global
            rank (equivalently, its group rank equals the source's group rank).
        """
        return self.rank == self.src

    @property
    def size(self) -> int:
        """The number of processes in the group.

        Returns:
            ``len(ranks)``; group ranks run from 0 to ``size - 1``.
        """
        return len(self.ranks)


# --------------------------------------------------------------------------
# Caches
#
# resolve() runs on every broadcast, so the per-group facts that never change
# for the life of a process group (its members' global ranks, this process's
# global and group rank, its backend) are computed once per group object and
# kept in _GROUP_CACHE. For a DeviceMesh, slicing the mesh to find this rank's
# slice costs tens of microseconds, so the (mesh, dim) -> group resolution,
# including the check that the slice agrees with the group, is kept in
# _MESH_CACHE.
#
# Both caches are keyed by id() of the object and hold only a weak reference
# to it: an entry is dropped when its group or mesh is garbage collected, and a
# lookup whose weak reference no longer points at the object passed (a reused
# id) misses. A group destroyed with destroy_process_group() but still
# referenced keeps its entry; using it for a collective fails in torch anyway.
# The world group is looked up as the current default group object, so a
# re-initialised world gets a fresh entry. clear_cache() empties both.
# --------------------------------------------------------------------------


class _GroupInfo:
    """Per-group facts that never change for the life of a process group."""

    __slots__ = ("ranks", "index", "rank", "group_rank", "backend")

    def __init__(self, ranks: tuple[int, ...], rank: int, backend: str):
        self.ranks = ranks                                  # global ranks, group-rank order
        self.index = {r: i for i, r in enumerate(ranks)}    # global rank -> group rank
        self.rank = rank                                    # this process, global rank
        self.group_rank = self.index.get(rank, -1)          # this process, group rank (-1: none)
        self.backend = backend


_GROUP_CACHE: dict[int, tuple[weakref.ref, _GroupInfo]] = {}
# (id(mesh), dim) -> (weakref to mesh, group, its _GroupInfo, default source as a GLOBAL rank)
_MESH_CACHE: dict[tuple[int, Any], tuple[weakref.ref, Any, _GroupInfo, int]] = {}


def clear_cache() -> None:
    """Forget every cached group and mesh resolution.

    Only needed if a process group object is reused after the world was torn
    down and rebuilt in the same process, which torch does not do; tests call
    it to start clean.

    Returns:
        None.
    """
    _GROUP_CACHE.clear()
    _MESH_CACHE.clear()


def _drop(cache: dict, key: Any):
    """A weakref callback that removes ``cache[key]`` if it still holds that weakref."""
    def callback(_ref: weakref.ref) -> None:
        entry = cache.get(key)
        if entry is not None and entry[0] is _ref:
            del cache[key]
    return callback


def _fmt_ranks(ranks: tuple[int, ...] | list[int], limit: int = 16) -> str:
    """Format a list of ranks for an error message, eliding long ones."""
    ranks = list(ranks)
    if len(ranks) <= limit:
        return str(ranks)
    head = ", ".join(str(r) for r in ranks[: limit // 2])
    tail = ", ".join(str(r) for r in ranks[-2:])
    return f"[{head}, ... ({len(ranks)} ranks) ..., {tail}]"


def _describe_global(ranks: tuple[int, ...]) -> str:
    """'global ranks 2..3' when contiguous and increasing, else the list."""
    if len(ranks) > 1 and list(ranks) == list(range(ranks[0], ranks[0] + len(ranks))):
        return f"global ranks {ranks[0]}..{ranks[-1]}"
    if len(ranks) == 1:
        return f"global rank {ranks[0]}"
    return f"global ranks {_fmt_ranks(ranks)}"


def _describe_group(size: int) -> str:
    """'group ranks 0..size-1' for a group of this many members."""
    return "group rank 0" if size == 1 else f"group ranks 0..{size - 1}"


def _as_int(value: Any, name: str) -> int:
    """Accept an int (or anything with __index__, such as a one-element integer
    tensor or a numpy integer) but not a bool, a float or a string."""
    if isinstance(value, bool):
        raise TypeError(f"{name}= must be an int rank, got the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name}= must be an int rank, got {type(value).__name__} {value!r}") from None


def _require_initialized() -> None:
    """Raise RuntimeError unless torch.distributed has a default group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call "
            "torch.distributed.init_process_group() (or init_device_mesh()) before resolving "
            "a group")


def _group_info(pg: "ProcessGroup") -> _GroupInfo:
    """The cached facts about a live process group object.

    Arguments:
        pg: a ProcessGroup object (not None: the caller maps None to the
            current default group first).

    Returns:
        Its _GroupInfo: member global ranks in group-rank order, this process's
        global rank and group rank (-1 if this process is not a member), and
        its backend.
    """
    key = id(pg)
    entry = _GROUP_CACHE.get(key)
    if entry is not None and entry[0]() is pg:
        return entry[1]
    try:
        ranks = tuple(dist.get_process_group_ranks(pg))
    except KeyError:
        raise ValueError(
            f"{pg!r} is not a live process group of this world (was it destroyed, or created "
            "before the world was re-initialised?)") from None
    me = dist.get_rank()
    backend = str(dist.get_backend(pg)) if me in ranks else ""
    info = _GroupInfo(ranks, me, backend)
    try:
        ref = weakref.ref(pg, _drop(_GROUP_CACHE, key))
    except TypeError:  # pragma: no cover - ProcessGroup is weak-referenceable in torch >= 2.0
        return info
    _GROUP_CACHE[key] = (ref, info)
    return info


def _check_group_object(group: Any) -> None:
    """Reject what is not a ProcessGroup this process belongs to.

    Arguments:
        group: what the caller passed as ``group=`` (not None), or what a
            mesh returned for a dim.

    Returns:
        None; raises ValueError for the marker torch.distributed.new_group()
        hands to a global rank outside the group, TypeError for anything else
        that is not a ProcessGroup.
    """
    if isinstance(group, int) and not isinstance(group, bool) and \
            group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the group: "
            "torch.distributed.new_group() returned GroupMember.NON_GROUP_MEMBER here because "
            "this global rank was not in its ranks list. Only members of a group may take part "
            "in a broadcast on it.")
    if not isinstance(group, dist.ProcessGroup):
        hint = ""
        if type(group).__name__ == "DeviceMesh":
            hint = " (for a DeviceMesh pass mesh=... and dim=... instead)"
        raise TypeError(f"group= must be a torch.distributed.ProcessGroup or None, got "
                        f"{type(group).__name__}{hint}")


def _mesh_group(mesh: "DeviceMesh", dim: Any) -> tuple["ProcessGroup", _GroupInfo, int]:
    """Resolve (mesh, dim) to the dim's process group for this rank's slice.

    Arguments:
        mesh: a DeviceMesh this process belongs to.
        dim: a mesh dim name (str), a mesh dim index (int), or None for a
            1-D mesh.

    Returns:
        (group, info, first): the ProcessGroup of the mesh dim that contains
        this process, its _GroupInfo, and the GLOBAL rank that comes first in
        this rank's slice of the mesh tensor along ``dim`` (the default
        source), after checking that the slice and the group hold the same
        GLOBAL ranks. (They hold them in the same order for meshes built by
        init_device_mesh; for a DeviceMesh built from a permuted tensor torch
        orders the group by global rank, and the group's order is the one
        group ranks refer to.)
    """
    # Type first: the cache key must be hashable, and True must not hit dim 1's entry.
    if isinstance(dim, bool) or not (dim is None or isinstance(dim, (str, int))):
        raise TypeError(f"dim= must be a mesh dim name (str), an index (int) or None, got {dim!r}")
    key = (id(mesh), dim)
    entry = _MESH_CACHE.get(key)
    if entry is not None and entry[0]() is mesh:
        return entry[1], entry[2], entry[3]

    ndim = mesh.ndim
    dims = list(mesh.mesh_dim_names or range(ndim))
    if dim is None and ndim != 1:
        raise ValueError(f"dim= is required for a {ndim}-D mesh; its dims are {dims}")
    if isinstance(dim, int) and not -ndim <= dim < ndim:
        raise ValueError(f"dim={dim} is out of range for a {ndim}-D mesh")

    coord = mesh.get_coordinate()
    if coord is None:
        try:
            members = " " + _fmt_ranks(mesh.mesh.flatten().tolist())
        except RuntimeError:  # torch cannot give a non-member the tensor of a multi-dim mesh
            members = ""
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not part of the mesh{members}")

    try:
        group = mesh.get_group(dim)
    except (KeyError, ValueError, RuntimeError, IndexError) as e:
        raise ValueError(f"mesh has no dim {dim!r}; its dims are {dims} "
                         f"({type(e).__name__}: {e})") from None

    # This rank's slice of the mesh along dim, in GLOBAL ranks, straight from
    # the mesh tensor.
    if dim is None:
        expected = mesh.mesh.tolist()
    elif isinstance(dim, str):
        expected = mesh[dim].mesh.tolist()
    else:
        full = mesh.mesh
        d = dim % ndim
        idx = tuple(slice(None) if i == d else c for i, c in enumerate(coord))
        expected = full[idx].tolist()

    _check_group_object(group)
    info = _group_info(group)
    if not isinstance(expected, list) or sorted(expected) != sorted(info.ranks):
        raise RuntimeError(
            f"mesh dim {dim!r}: the mesh tensor gives this process (global rank "
            f"{info.rank}) the slice {_fmt_ranks(expected)} but the dim's process group has "
            f"global ranks {_fmt_ranks(info.ranks)}; the DeviceMesh is inconsistent")
    first = expected[0]
    ref = weakref.ref(mesh, _drop(_MESH_CACHE, key))
    _MESH_CACHE[key] = (ref, group, info, first)
    return group, info, first


def resolve(*, mesh: "DeviceMesh | None" = None, dim: "str | int | None" = None,
            group: "ProcessGroup | None" = None, src: "int | None" = None,
            src_group_rank: "int | None" = None, rank: "int | None" = None) -> Route:
    """Resolve and check the group, the source and this process, in both rank spaces.

    Call it on every rank of the group with the same arguments (``rank=``
    aside). It runs no collective: every check is local, so a bad call raises
    on the rank that made it and never leaves another rank waiting.

    The group comes either from a mesh or from a process group, never both:

    * ``mesh=`` (a ``torch.distributed.device_mesh.DeviceMesh``) with
      ``dim=``: the group is ``mesh.get_group(dim)``, the process group of the
      slice of the mesh along ``dim`` that contains this process. Its GLOBAL
      ranks are read from the mesh tensor (``mesh[dim].mesh``) and checked
      against the group. The default source is the slice's first rank.
    * ``group=`` (a ``ProcessGroup``, or ``None`` for the default world
      group). The default source is group rank 0.

    Arguments:
        mesh: a DeviceMesh this process is part of. Mutually exclusive with
            ``group``.
        dim: the mesh dim to broadcast along: a dim name such as ``"tp"`` (or
            a flattened dim's name), or a dim index. May be omitted for a 1-D
            mesh. Only with ``mesh``.
        group: the ProcessGroup to broadcast on; ``None`` (the default) means
            the default world group. Mutually exclusive with ``mesh``.
        src: the source as a GLOBAL rank (a rank of the default world group),
            as ``torch.distributed.broadcast(src=...)`` takes it. Must be a
            member of the group. Mutually exclusive with ``src_group_rank``.
        src_group_rank: the source as a GROUP rank (its index in the group,
            ``0 .. size - 1``; for a mesh, what ``mesh.get_local_rank(dim)``
            returns on the source). Mutually exclusive with ``src``. If
            neither is given, the source is group rank 0 for a group, and the
            first rank of this process's slice (``mesh[dim].mesh[0]``) for a
            mesh; the two agree for meshes built by ``init_device_mesh``.
        rank: optional; the caller's claim of this process's GLOBAL rank (what
            SGLang's ``broadcast_pyobj(rank=...)`` takes). Only checked: if it
            is not ``torch.distributed.get_rank()``, a ``ValueError`` says so,
            and says when the value looks like a group rank (the rank trap).

    Returns:
        A :class:`Route` with the group, its members' GLOBAL ranks in
        group-rank order, the source as a GLOBAL and a GROUP rank, this process
        as a GLOBAL and a GROUP rank, and the group's backend.

    Raises:
        ValueError: both ``mesh`` and ``group``; ``dim`` without ``mesh``; an
            unknown ``dim``; both ``src`` and ``src_group_rank``; a source not
            in the group (``src``) or out of range (``src_group_rank``);
            ``rank`` not this process's global rank; this process not a
            member of the group or mesh; a destroyed group. Every message
            names the rank space of each rank it quotes.
        TypeError: a ``group`` that is not a ProcessGroup, or a rank that is
            not an int.
        RuntimeError: ``torch.distributed`` is not initialized, or a mesh
            whose tensor disagrees with its process groups.
    """
    _require_initialized()
    if mesh is not None and group is not None:
        raise ValueError("pass either mesh= (with dim=) or group=, not both: the mesh dim "
                         "already determines the process group")
    if src is not None and src_group_rank is not None:
        raise ValueError(
            f"pass either src= (a global rank) or src_group_rank= (a group rank), not both "
            f"(got src={src!r}, src_group_rank={src_group_rank!r})")

    # --- the group ---------------------------------------------------------
    if mesh is not None:
        if not hasattr(mesh, "get_group") or not hasattr(mesh, "get_coordinate"):
            raise TypeError(f"mesh= must be a torch.distributed.device_mesh.DeviceMesh, got "
                            f"{type(mesh).__name__}")
        pg, info, first = _mesh_group(mesh, dim)
        where = f"mesh dim {dim!r}" if dim is not None else "the mesh"
    else:
        if dim is not None:
            raise ValueError(f"dim={dim!r} needs mesh=; with group= the group itself is the dim")
        if group is None:
            pg = dist.group.WORLD
        else:
            _check_group_object(group)
            pg = group
        info = _group_info(pg)
        first = info.ranks[0]
        where = "the world group" if group is None else "the group"
    ranks = info.ranks
    size = len(ranks)

    # --- this process ------------------------------------------------------
    me = info.rank
    group_rank = info.group_rank
    if group_rank < 0:
        raise ValueError(
            f"this process (global rank {me}) is not a member of {where}, whose members are "
            f"{_describe_global(ranks)}")
    if rank is not None:
        claimed = _as_int(rank, "rank")
        if claimed != me:
            msg = (f"rank={claimed} is not this process's global rank: this process is global "
                   f"rank {me} (group rank {group_rank} in group {_fmt_ranks(ranks)})")
            if claimed == group_rank:
                msg += f"; rank={claimed} looks like a group-local rank"
            msg += ". Pass the global rank (torch.distributed.get_rank())."
            raise ValueError(msg)

    # --- the source --------------------------------------------------------
    if src is not None:
        src_g = _as_int(src, "src")
        src_gr = info.index.get(src_g, -1)
        if src_gr < 0:
            msg = (f"src={src_g} (global rank) is not in {where} {_fmt_ranks(ranks)}; "
                   f"the group's ranks are {_describe_global(ranks)} ({_describe_group(size)}).")
            if 0 <= src_g < size:
                msg += f" If {src_g} is a group-local rank, pass src_group_rank={src_g}."
            raise ValueError(msg)
    elif src_group_rank is None:
        src_g = first
        src_gr = info.index[first]
    else:
        src_gr = _as_int(src_group_rank, "src_group_rank")
        if not 0 <= src_gr < size:
            msg = (f"src_group_rank={src_gr} (group rank) is out of range for {where} "
                   f"{_fmt_ranks(ranks)}, which has {size} member{'s' if size != 1 else ''} "
                   f"({_describe_group(size)}, {_describe_global(ranks)}).")
            if src_gr in info.index:
                msg += f" If {src_gr} is a global rank, pass src={src_gr}."
            raise ValueError(msg)
        src_g = ranks[src_gr]

    return Route(group=pg if group is not None or mesh is not None else None,
                 ranks=ranks, src=src_g, src_group_rank=src_gr, rank=me,
                 group_rank=group_rank, backend=info.backend)
