"""SGLang integration: the scheduler's per-step request broadcast goes through fastbcast.

Enable it once per process, before or after SGLang is imported (every TP rank
runs it; in SGLang each scheduler is its own process)::

    import fastbcast.integrations.sglang as fb_sglang
    fb_sglang.patch()                      # or patch(allow_pickle=False): no pickle on the wire

What :func:`patch` does:

* Rebinds ``sglang.srt.utils.common.broadcast_pyobj`` to :func:`broadcast_pyobj`
  (a wrapper of :func:`fastbcast.broadcast_pyobj` with SGLang's exact
  signature) in every module under ``sglang.srt`` that bound it by name
  (``sglang.srt.utils``, ``sglang.srt.distributed``,
  ``...distributed.communication_op``, ``...managers.tp_worker``,
  ``...managers.scheduler_components.request_receiver``,
  ``...scheduler_components.dynamic_chunk_sizer``,
  ``...mem_cache.hybrid_cache.hybrid_cache_controller`` in sglang 0.5.23),
  found by identity, so modules are not hard-coded and a different function
  that happens to share the name (``sglang.multimodal_gen``'s) is left
  alone. Modules imported later are rebound as they load. It also covers
  ``verl.workers.rollout``: verl <= 0.4 imported SGLang's function there.
* Trusts the classes under ``sglang.srt`` for decoding
  (``fastbcast.trust("sglang.srt")``): ``TokenizedGenerateReqInput``,
  ``SamplingParams`` and the other msgspec Structs are rebuilt field by
  field, enums by value, ``array('q')`` token ids travel as raw items. The
  scheduler's request lists therefore need no pickle.
* Logs one INFO line on the ``fastbcast`` logger naming the modules it
  rebound.

The pickle policy: objects the codec cannot represent natively travel as
pickles by default, exactly as with SGLang's own function, so every payload
that worked keeps working (natively representable ones never use pickle).
``patch(allow_pickle=False)``, or ``FASTBCAST_ALLOW_PICKLE=0`` in the
environment, is the strict setting: no pickle on the wire, an unsupported
object is a TypeError on the source (BroadcastError on the receivers) naming
its path.

Nothing here imports SGLang until :func:`patch` runs; without SGLang,
:func:`patch` raises an ImportError naming the pip package.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from .. import codec
from ..broadcast import broadcast_pyobj as _fastbcast_broadcast_pyobj
from ._patch import Patcher, check_pickle_policy

__all__ = ["patch", "unpatch", "is_patched", "patched_modules", "original", "broadcast_pyobj",
           "DEFINING_MODULE", "MODULE_PREFIXES", "TRUSTED_PREFIXES"]

logger = logging.getLogger("fastbcast")

#: Where SGLang defines the function this integration replaces.
DEFINING_MODULE = "sglang.srt.utils.common"
#: Modules whose bindings of SGLang's function are rebound (and their submodules).
MODULE_PREFIXES = ("sglang.srt", "verl.workers.rollout")
#: Module prefixes whose classes receivers may rebuild once patched.
TRUSTED_PREFIXES = ("sglang.srt",)

# The pickle policy of the replacement: None = the drop-in's default
# (fastbcast.broadcast.DROP_IN_ALLOW_PICKLE, i.e. FASTBCAST_ALLOW_PICKLE).
_allow_pickle: bool | None = None


def broadcast_pyobj(data: Any, rank: int, dist_group=None, src: int = 0, force_cpu_device: bool = True):
    """What SGLang's ``broadcast_pyobj`` becomes: fastbcast's, with SGLang's signature.

    Arguments (as SGLang's):
        data: the list to send, read on the source only (SGLang's receivers
            pass None or anything else).
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
    return _fastbcast_broadcast_pyobj(data, rank, dist_group, src, force_cpu_device, allow_pickle=_allow_pickle)


_patcher = Patcher(DEFINING_MODULE, "broadcast_pyobj", broadcast_pyobj, MODULE_PREFIXES, pip_name="sglang")


def patch(allow_pickle: bool | None = None) -> tuple[str, ...]:
    """Make SGLang's ``broadcast_pyobj`` fastbcast's, everywhere SGLang bound it.

    Arguments:
        allow_pickle: None (default): the drop-in's default, pickle allowed
            for objects the codec cannot represent (FASTBCAST_ALLOW_PICKLE=0
            makes it strict). False: strict, no pickle on the wire. True:
            pickle allowed. Every rank should use the same setting (a strict
            receiver refuses a pickle from a lenient source).

    Returns:
        The names of the modules rebound so far.

    Calling it again while patched changes nothing but the pickle policy.
    Raises ImportError (naming the pip package) when SGLang is missing;
    nothing is changed then.
    """
    global _allow_pickle
    check_pickle_policy(allow_pickle)
    names = _patcher.patch()
    if allow_pickle != _allow_pickle:
        logger.debug("SGLang broadcast_pyobj: allow_pickle=%s (was %s)", allow_pickle, _allow_pickle)
    _allow_pickle = allow_pickle
    codec.trust(*TRUSTED_PREFIXES)
    return names


def unpatch() -> tuple[str, ...]:
    """Give every binding :func:`patch` changed SGLang's function back.

    Returns the names of the modules restored. The trusted prefix stays
    trusted (fastbcast has no way to withdraw trust); it only matters for
    fastbcast's own decoding.
    """
    global _allow_pickle
    names = _patcher.unpatch()
    _allow_pickle = None
    return names


def is_patched() -> bool:
    """Whether :func:`patch` is in effect."""
    return _patcher.is_patched


def patched_modules() -> tuple[str, ...]:
    """The modules that hold fastbcast's function through :func:`patch` right now."""
    return _patcher.patched_modules()


def original() -> Callable | None:
    """SGLang's own ``broadcast_pyobj`` (None before the first :func:`patch`)."""
    return _patcher.original
