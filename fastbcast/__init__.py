"""fastbcast: broadcast Python objects across a torch.distributed group.

MessagePack in C++ over pinned buffers, NCCL for device groups and gloo for CPU
groups, a mesh layer that resolves global ranks itself, and a drop-in for
SGLang's `broadcast_pyobj` and `point_to_point_pyobj`. The wire format is in FORMAT.md.
"""
from ._version import FORMAT_VERSION, __version__
from ._loader import _C  # noqa: F401  (checks the torch build before loading)
from .broadcast import Broadcaster, BroadcastError, BroadcastTimeoutError, broadcast, broadcast_pyobj, close_all
from .codec import (
    BufferTooSmallError,
    DecodeError,
    decode,
    encode,
    encode_into,
    pool_stats,
    register,
    set_pool_limit,
    shrink_pool,
    trust,
)
from .mesh import Route, resolve
from .p2p import point_to_point_pyobj

__all__ = [
    "__version__", "FORMAT_VERSION",
    "encode", "encode_into", "decode", "register", "trust", "DecodeError",
    "BufferTooSmallError", "pool_stats", "set_pool_limit", "shrink_pool",
    "broadcast", "broadcast_pyobj", "point_to_point_pyobj", "Broadcaster", "BroadcastError", "BroadcastTimeoutError", "resolve", "Route",
    "close_all",
]
