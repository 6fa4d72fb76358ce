"""verl integration: the SGLang rollout's broadcasts go through fastbcast.

verl's SGLang rollout (``AsyncSGLangRollout``, later ``SGLangRollout``; verl
0.4-0.6) builds a CPU device mesh ``("dp", "tp", "pp")`` and sends, from the
first rank of each TP slice to the rest of it, ``[ip, port]``, the engine's
``[output]`` and the ``[sorted_output_req_list]`` of ``AsyncRolloutRequest``
objects with ``broadcast_pyobj``. From verl 0.5 that is a copy vendored in
``verl.workers.rollout.sglang_rollout.utils``.

Enable it in every rollout process: ``FASTBCAST_PATCH=verl`` in the
environment (on Ray, in the job's ``runtime_env={"env_vars": ...}``) patches a
process when it first imports the vendored module; or in code::

    import fastbcast.integrations.verl as fb_verl
    fb_verl.patch()                        # or patch(allow_pickle=False): no pickle on the wire

verl 0.7 and later no longer call ``broadcast_pyobj``: rollout runs on SGLang
servers, so ``FASTBCAST_PATCH=sglang`` (fastbcast.integrations.sglang) is the
one that applies there.

What :func:`patch` does:

* Rebinds the vendored ``broadcast_pyobj`` to :func:`broadcast_pyobj`
  (fastbcast's, with the vendored signature: ``force_cpu_device`` defaults
  to False) in that module and in every module under
  ``verl.workers.rollout`` that bound it, loaded now or later (found by
  identity). A call with a TP-local ``rank=`` (the rank trap) now raises a
  ValueError on the ranks where it is wrong instead of handing every rank of
  TP groups 1.. an empty list.
* While patched, trusts verl's rollout schema classes (``verl.workers.rollout.schemas``,
  ``verl.tools.schemas``: ``AsyncRolloutRequest``, ``Message``, the state,
  finish-reason and sanity-check enums, the OpenAI tool-call models), so
  batches of requests travel without pickle, with list token ids
  (verl <= 0.4) or tensors (later). :func:`unpatch` withdraws that.
* Logs one INFO line on the ``fastbcast`` logger naming the modules rebound.

verl <= 0.4 imported SGLang's own ``broadcast_pyobj`` in its rollout module;
:func:`fastbcast.integrations.sglang.patch` covers that.

The pickle policy is the drop-in's: pickle allowed for objects the codec
cannot represent (today's behaviour keeps working); ``patch(allow_pickle=False)``
or ``FASTBCAST_ALLOW_PICKLE=0`` is strict.

:func:`broadcast_rollout` is the call to write instead of ``broadcast_pyobj``
in new code: it takes the mesh, so there is no rank to get wrong.

Nothing here imports verl (not at import, and not in
:func:`broadcast_rollout`); :func:`patch` raises an ImportError naming the pip
package when verl is missing.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from ..broadcast import broadcast as _fastbcast_broadcast
from ..broadcast import broadcast_pyobj as _fastbcast_broadcast_pyobj
from . import _patch
from ._patch import Integration

__all__ = ["patch", "unpatch", "is_patched", "patched_modules", "original", "broadcast_pyobj",
           "broadcast_rollout", "DEFINING_MODULE", "MODULE_PREFIXES", "SCHEMA_MODULES"]

#: Where verl (>= 0.5) defines its vendored copy of SGLang's broadcast_pyobj.
DEFINING_MODULE = "verl.workers.rollout.sglang_rollout.utils"
#: Modules whose bindings of the vendored function are rebound (and their submodules).
MODULE_PREFIXES = ("verl.workers.rollout",)
#: verl's modules of rollout payload classes, trusted for decoding.
SCHEMA_MODULES = ("verl.workers.rollout.schemas", "verl.tools.schemas")


def broadcast_pyobj(data: Any, rank: int, dist_group=None, src: int = 0, force_cpu_device: bool = False):
    """What verl's vendored ``broadcast_pyobj`` becomes: fastbcast's, with verl's signature.

    Arguments (as verl's):
        data: the list to send, read on the source only.
        rank: this process's GLOBAL rank (``self._rank``). A TP-local rank
            (``self._tp_rank``, the bug of verl <= 0.4) raises ValueError.
        dist_group: the TP group (verl passes the CPU mesh's, a gloo group).
        src: the source's GLOBAL rank (``mesh["tp"].mesh[0].item()``).
        force_cpu_device: as verl's, default False: a gloo group carries host
            buffers either way; an NCCL group uses the current CUDA device.

    Returns:
        ``data`` on the source, an equal list elsewhere; [] everywhere when
        ``data`` is [].
    """
    return _fastbcast_broadcast_pyobj(data, rank, dist_group, src, force_cpu_device, **INTEGRATION.options())


def broadcast_rollout(obj: Any, device_mesh, dim: str = "tp", **kw) -> Any:
    """Sends ``obj`` from the first rank of this rank's ``dim`` slice to the rest of the slice.

    The mesh-layer call for verl's rollout: ``self._device_mesh_cpu`` (or any
    DeviceMesh) and the dim name are all it needs; the group, the source's
    global rank and this rank's global rank all come from the mesh, so the
    rank trap cannot be written. Every rank of the slice calls it; ``obj`` is
    read on the source only (pass None elsewhere)::

        reqs = broadcast_rollout(reqs if self._tp_rank == 0 else None, self._device_mesh_cpu)

    Arguments:
        obj: the object, on the source.
        device_mesh: a ``torch.distributed.device_mesh.DeviceMesh``.
        dim: the mesh dim to broadcast along (default "tp").
        **kw: passed on to :func:`fastbcast.broadcast`: ``src=`` (GLOBAL
            rank) or ``src_group_rank=`` to pick another source, ``device=``,
            ``allow_pickle=`` (default False: no pickle), ``trusted=``
            (added to verl's schema modules, which are always trusted here),
            and the rest of its options (see its docstring).

    Returns:
        ``obj`` on the source; an equal object on every other rank of the slice.
    """
    extra = kw.pop("trusted", ())
    if isinstance(extra, str):
        extra = (extra,)
    trusted: Iterable[str] = SCHEMA_MODULES + tuple(p for p in extra if p not in SCHEMA_MODULES)
    return _fastbcast_broadcast(obj, mesh=device_mesh, dim=dim, trusted=trusted, **kw)


INTEGRATION = Integration("verl", {(DEFINING_MODULE, "broadcast_pyobj"): broadcast_pyobj},
                          MODULE_PREFIXES, SCHEMA_MODULES)


def patch(allow_pickle: bool | None = None) -> tuple[str, ...]:
    """Make verl's vendored ``broadcast_pyobj`` fastbcast's, in every rollout module.

    Arguments:
        allow_pickle: None (default): the drop-in's default, pickle allowed
            for objects the codec cannot represent (FASTBCAST_ALLOW_PICKLE=0
            makes it strict). False: strict. True: pickle allowed. Use the
            same setting on every rank.

    Returns:
        The names of the modules rebound so far.

    Calling it again while patched changes nothing but the pickle policy.
    Raises ImportError (naming the pip package) when verl is missing or has
    no vendored copy (verl < 0.5: use fastbcast.integrations.sglang.patch());
    nothing is changed then.
    """
    try:
        return INTEGRATION.patch(allow_pickle)
    except ImportError as e:
        # A verl without the vendored module (the package itself missing is
        # e.name == "verl", and the Patcher's message already says so).
        if e.name and e.name != "verl" and _patch._under(DEFINING_MODULE, e.name):
            raise ImportError(
                f"{e} (verl before 0.5 has no vendored broadcast_pyobj: its rollout imports SGLang's, "
                "which fastbcast.integrations.sglang.patch() replaces)", name=e.name) from e
        raise


def unpatch() -> tuple[str, ...]:
    """Give every binding :func:`patch` changed verl's function back and withdraw
    the trust it granted. Returns the names of the modules restored."""
    return INTEGRATION.unpatch()


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return INTEGRATION.is_patched()


def patched_modules() -> tuple[str, ...]:
    """The modules that hold fastbcast's function through :func:`patch` right now."""
    return INTEGRATION.patched_modules()


def original() -> Callable | None:
    """verl's vendored ``broadcast_pyobj`` (None before the first :func:`patch`)."""
    return INTEGRATION.original("broadcast_pyobj")
