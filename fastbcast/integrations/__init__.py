"""Drop-in integrations: put fastbcast's ``broadcast_pyobj`` into other projects.

Each integration is a :class:`Patcher` for one function of one package. The
packages themselves are imported only when ``patch()`` runs, so importing
``fastbcast.integrations`` (or fastbcast) never needs them; ``patch()`` raises
an ImportError naming the pip package when it is missing.

Generic use::

    from fastbcast.integrations import Patcher

    p = Patcher("pkg.utils", "broadcast_pyobj", my_broadcast, ("pkg",))
    p.patch()              # every module of pkg that bound the original now holds my_broadcast
    p.patched_modules()    # which ones, e.g. ('pkg.utils', 'pkg.worker')
    p.unpatch()            # back to the original, exactly

What it did is logged once at INFO on the ``fastbcast`` logger (modules
imported later are logged at DEBUG).
"""
from ._patch import Patcher

__all__ = ["Patcher"]
