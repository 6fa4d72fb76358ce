"""Drop-in integrations: put fastbcast's functions into other projects.

``fastbcast.integrations.sglang`` and ``fastbcast.integrations.verl`` each
declare an :class:`Integration` (the functions to replace, the modules to
scan, the classes receivers may rebuild while patched); the engine in
``_patch`` does the work. The packages themselves are imported only when
``patch()`` runs, so importing ``fastbcast.integrations`` (or fastbcast) never
needs them; ``patch()`` raises an ImportError naming the pip package when it
is missing. ``FASTBCAST_PATCH=sglang,verl`` in the environment applies them in
every process (see fastbcast_autopatch).

Generic use, one function::

    from fastbcast.integrations import Patcher

    p = Patcher("pkg.utils", "broadcast_pyobj", my_broadcast, ("pkg",))
    p.patch()              # every module of pkg that bound the original now holds my_broadcast
    p.patched_modules()    # which ones, e.g. ('pkg.utils', 'pkg.worker')
    p.unpatch()            # back to the original

What it did is logged once at INFO on the ``fastbcast`` logger.
"""
from ._patch import Integration, Patcher

__all__ = ["Integration", "Patcher"]
