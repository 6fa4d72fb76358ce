"""SGLang integration: the scheduler's per-step object transfers go through fastbcast.

Three ways to turn it on, each once per process (in SGLang every scheduler is
its own process, so the first two are the ones that reach them):

* ``FASTBCAST_PATCH=sglang`` in the environment: the startup hook installed
  with fastbcast patches any Python process when it first imports SGLang
  (spawned schedulers, ``--use-ray`` actors, ``python -m sglang.launch_server``).
* SGLang's plugin hook: fastbcast registers ``fastbcast`` in the
  ``sglang.srt.plugins`` entry-point group, which ``run_scheduler_process``
  loads (filter with ``SGLANG_PLUGINS``). It calls :func:`plugin`.
* In code::

      import fastbcast.integrations.sglang as fb_sglang
      fb_sglang.patch()                  # or patch(allow_pickle=False): no pickle on the wire

What :func:`patch` replaces, in ``sglang.srt.utils.common`` and every module
under ``sglang.srt`` (and ``verl.workers.rollout``, whose verl <= 0.4 imported
SGLang's function) that bound them, found by identity:

* ``broadcast_pyobj`` -> :func:`broadcast_pyobj`: the scheduler's per-step
  request broadcast over the TP CPU group, and through it
  ``attn_cp_tp_broadcast_pyobj`` (DP attention: along attention CP, then
  attention TP) and the control broadcast, which call it by name.
* ``point_to_point_pyobj`` -> :func:`point_to_point_pyobj`: pipeline
  parallelism's stage-to-stage transfers over the world CPU group.

While patched, receivers may rebuild the classes under ``sglang.srt``
(``TokenizedGenerateReqInput``, ``SamplingParams``, the msgspec Structs,
enums): the request lists need no pickle. :func:`unpatch` withdraws that.

The pickle policy: objects the codec cannot represent natively travel as
pickles by default, exactly as with SGLang's own functions, so every payload
that worked keeps working. ``patch(allow_pickle=False)`` or
``FASTBCAST_ALLOW_PICKLE=0`` is strict: no pickle on the wire.

Nothing here imports SGLang until :func:`patch` runs; without SGLang,
:func:`patch` raises an ImportError naming the pip package.
"""
from __future__ import annotations

from typing import Any, Callable

from ..broadcast import broadcast_pyobj as _fastbcast_broadcast_pyobj
from ..p2p import point_to_point_pyobj as _fastbcast_point_to_point_pyobj
from ._patch import Integration

__all__ = ["patch", "unpatch", "is_patched", "patched_modules", "original", "plugin", "broadcast_pyobj",
           "point_to_point_pyobj", "DEFINING_MODULE", "MODULE_PREFIXES", "TRUSTED_PREFIXES"]

#: Where SGLang defines the functions this integration replaces.
DEFINING_MODULE = "sglang.srt.utils.common"
#: Modules whose bindings of SGLang's functions are rebound (and their submodules).
MODULE_PREFIXES = ("sglang.srt", "verl.workers.rollout")
#: Module prefixes whose classes receivers may rebuild while patched.
TRUSTED_PREFIXES = ("sglang.srt",)


def broadcast_pyobj(data: Any, rank: int, dist_group=None, src: int = 0, force_cpu_device: bool = True):
    """What SGLang's ``broadcast_pyobj`` becomes: fastbcast's, with SGLang's signature.

    Arguments (as SGLang's):
        data: the list to send, read on the source only (SGLang's receivers
            pass None).
        rank: this process's GLOBAL rank. A group-local rank raises
            ValueError instead of silently returning [].
        dist_group: the process group (SGLang passes its gloo ``cpu_group``).
        src: the source's GLOBAL rank.
        force_cpu_device: True sends through the host (needs a group that
            carries CPU tensors, e.g. gloo); False uses the CUDA device for an
            NCCL group.

    Returns:
        ``data`` on the source, an equal list elsewhere; [] everywhere when
        ``data`` is [].
    """
    return _fastbcast_broadcast_pyobj(data, rank, dist_group, src, force_cpu_device, **INTEGRATION.options())


def point_to_point_pyobj(data: Any, rank: int, group=None, src: int = 0, dst: int = 1, async_send: bool = False):
    """What SGLang's ``point_to_point_pyobj`` becomes: :func:`fastbcast.point_to_point_pyobj`
    with SGLang's signature (GLOBAL ranks, the world's CPU group).

    Returns:
        On ``src``: the ``P2PWork`` list to wait on when ``async_send``, else
        []. On ``dst``: a list equal to ``data``. Elsewhere: [].
    """
    return _fastbcast_point_to_point_pyobj(data, rank, group, src, dst, async_send, **INTEGRATION.options())


INTEGRATION = Integration(
    "sglang",
    {(DEFINING_MODULE, "broadcast_pyobj"): broadcast_pyobj,
     (DEFINING_MODULE, "point_to_point_pyobj"): point_to_point_pyobj},
    MODULE_PREFIXES, TRUSTED_PREFIXES,
    optional=[(DEFINING_MODULE, "point_to_point_pyobj")])


def patch(allow_pickle: bool | None = None) -> tuple[str, ...]:
    """Make SGLang's ``broadcast_pyobj`` and ``point_to_point_pyobj`` fastbcast's,
    everywhere SGLang bound them.

    Arguments:
        allow_pickle: None (default): the drop-in's default, pickle allowed
            for objects the codec cannot represent (FASTBCAST_ALLOW_PICKLE=0
            makes it strict). False: strict. True: pickle allowed. Every rank
            should use the same setting.

    Returns:
        The names of the modules that hold a replacement now.

    Calling it again while patched changes nothing but the pickle policy.
    Raises ImportError (naming the pip package) when SGLang is missing;
    nothing is changed then.
    """
    return INTEGRATION.patch(allow_pickle)


def plugin() -> None:
    """SGLang's plugin entry point (group ``sglang.srt.plugins``): :func:`patch` with the default policy."""
    patch()


def unpatch() -> tuple[str, ...]:
    """Give every binding :func:`patch` changed SGLang's function back and withdraw
    the trust it granted. Returns the names of the modules restored."""
    return INTEGRATION.unpatch()


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return INTEGRATION.is_patched()


def patched_modules() -> tuple[str, ...]:
    """The modules that hold one of fastbcast's functions through :func:`patch` right now."""
    return INTEGRATION.patched_modules()


def original(name: str = "broadcast_pyobj") -> Callable | None:
    """SGLang's own function `name` (None before the first :func:`patch`)."""
    return INTEGRATION.original(name)
