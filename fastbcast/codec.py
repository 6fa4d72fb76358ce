"""The MessagePack codec: Python objects to bytes in a pinned buffer and back.

Plain types are standard MessagePack (readable by ``msgpack.unpackb(...,
raw=False, strict_map_key=False)``); everything else travels as an ext type
whose layout is defined in FORMAT.md. Decoding never runs pickle unless asked
to, and rebuilds classes only if they were registered or sit under a trusted
module prefix.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from ._loader import _C

DecodeError = _C.DecodeError


class BufferTooSmallError(ValueError):
    """`encode_into` was given a buffer too small for the encoding.

    Attributes:
        needed: the number of bytes the encoding takes (write it at `offset`,
            so the buffer needs `offset + needed` bytes).
    """

    def __init__(self, needed: int, offset: int, size: int):
        super().__init__(
            f"buffer too small: the encoding needs {needed} bytes at offset {offset}, "
            f"but the buffer has {size - offset} bytes there ({size} in all); "
            f"the buffer was left unchanged")
        self.needed = needed


def encode(obj: Any, *, compat: bool = False, allow_pickle: bool = False) -> torch.Tensor:
    """Encodes `obj` as MessagePack into a buffer from fastbcast's pinned pool.

    Arguments:
        obj: the object to encode: None, bool, int, float, str, bytes,
            bytearray, memoryview, list, dict, tuple, set, frozenset, complex,
            CPU torch.Tensor, numpy.ndarray (numeric), array.array, enum
            members, dataclasses, pydantic v2 models and msgspec Structs,
            nested up to 256 levels.
        compat: write plain MessagePack only (no ext types): tuples and sets
            become arrays, other non-plain types are a TypeError.
        allow_pickle: let objects the codec cannot represent travel as a
            pickle ext instead of raising TypeError.

    Returns:
        A 1-D torch.uint8 CPU tensor (pinned when CUDA is available) viewing
        the encoded bytes. The buffer goes back to the pool when the tensor
        (and every view of it) is dropped, so copy it if you keep it long.

    Raises:
        TypeError: an unsupported object; the message gives its path, e.g.
            ``data[0]['messages'][2].content: unsupported type Foo``.
        ValueError: a reference cycle, nesting deeper than 256 levels, or a
            str with a lone surrogate.
    """
    return _C.encode(obj, compat, allow_pickle)


def encode_into(obj: Any, out: torch.Tensor, offset: int = 0, *, compat: bool = False,
                allow_pickle: bool = False) -> int:
    """Encodes `obj` into a caller's buffer at `offset`.

    Arguments:
        obj: as for `encode`.
        out: a contiguous 1-D torch.uint8 CPU tensor.
        offset: byte offset in `out` where the encoding starts.
        compat, allow_pickle: as for `encode`.

    Returns:
        The number of bytes written, starting at `offset`.

    Raises:
        BufferTooSmallError: `out` cannot hold the encoding at `offset`; its
            `needed` attribute is the size required. `out` is left unchanged.
        ValueError: `offset` is outside `out`.
    """
    fits, n = _C.encode_into(obj, out, offset, compat, allow_pickle)
    if not fits:
        raise BufferTooSmallError(n, offset, out.numel())
    return n


def decode(buf, *, allow_pickle: bool = False, trusted: Iterable[str] = ()) -> Any:
    """Decodes one MessagePack value.

    Arguments:
        buf: a contiguous CPU torch.uint8 tensor, bytes, bytearray or
            memoryview holding exactly one encoded value.
        allow_pickle: accept pickle exts. Off by default: a pickle can run
            arbitrary code, so only enable it for senders you trust.
        trusted: module prefixes (e.g. ``("myapp.schemas",)``) whose classes
            may be rebuilt in addition to those passed to `register`. Classes
            are looked up among already-imported modules only.

    Returns:
        The decoded object. Small non-negative ints are shared objects.

    Raises:
        DecodeError: (a ValueError) the bytes are truncated, corrupt, name a
            class that is not trusted, or hold a pickle while `allow_pickle`
            is off. The message names the byte offset.
    """
    if isinstance(trusted, str):
        trusted = (trusted,)
    return _C.decode(buf, allow_pickle, tuple(trusted) if trusted else None)


def register(*classes: type) -> None:
    """Trusts classes for decoding (on every rank that decodes them).

    Arguments:
        classes: enum.Enum subclasses, dataclasses, pydantic v2 models or
            msgspec Structs. Their wire name is ``"module:QualName"``.

    Raises:
        TypeError: a class the codec cannot represent.
    """
    for cls in classes:
        _C.register(cls)


def trust(*prefixes: str) -> None:
    """Trusts every codec-representable class in modules under `prefixes`.

    ``trust("myapp")`` covers ``myapp`` and ``myapp.*``; only modules that are
    already imported are searched, never imported.
    """
    for p in prefixes:
        _C.trust(p)


def pool_stats() -> dict:
    """The pinned pool's state: blocks, bytes, busy_blocks, busy_bytes,
    limit (bytes), allocations (ever made), pinned (bool), min_block."""
    return _C.pool_stats()


def shrink_pool() -> int:
    """Frees every idle pool buffer; returns the bytes freed."""
    return _C.shrink_pool()


def set_pool_limit(nbytes: int) -> None:
    """Caps the pool at `nbytes` (default 8 GiB, or FASTBCAST_POOL_LIMIT_MB).
    Idle buffers over the cap are freed now; an encode that would need more
    than the cap while the rest is in use raises MemoryError."""
    _C.set_pool_limit(int(nbytes))
