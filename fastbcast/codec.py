"""The MessagePack codec: Python objects to bytes in a pinned buffer and back.

Plain types are standard MessagePack (readable by ``msgpack.unpackb(...,
raw=False, strict_map_key=False)``); everything else travels as an ext type
whose layout is defined in FORMAT.md. Decoding never runs pickle unless asked
to, and rebuilds classes only if they were registered or sit under a trusted
module prefix.
"""
from __future__ import annotations

import io
import pickle
from typing import Any, Iterable

import torch

from ._loader import _C

DecodeError = _C.DecodeError


class _ReducedOnce(pickle.Pickler):
    # The encoder asked `obj.__reduce_ex__` before deciding it must travel
    # as a pickle; pickle is handed that answer instead of asking again, so
    # the reducer runs once, as with pickle alone.
    def __init__(self, file, obj, reduced):
        super().__init__(file, 5)
        self._obj, self._reduced = obj, reduced

    def reducer_override(self, obj):
        return self._reduced if obj is self._obj else NotImplemented


def _dumps_reduced(obj, reduced) -> bytes:
    """pickle.dumps(obj, 5) with `reduced`, obj's __reduce_ex__ value, as its reduction (called by the encoder)."""
    f = io.BytesIO()
    _ReducedOnce(f, obj, reduced).dump(obj)
    return f.getvalue()


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


def _prefixes(trusted: str | Iterable[str] | None) -> tuple | None:
    """Normalises a `trusted` argument to a tuple of module prefixes, or None.

    Arguments:
        trusted: one prefix (``"myapp"``), an iterable of prefixes, or
            None / empty.

    Returns:
        A tuple of str (``("myapp",)``, never split into characters), or
        None when there are none.

    Raises:
        TypeError: an item that is not a str.
    """
    if trusted is None:
        return None
    out = (trusted,) if isinstance(trusted, str) else tuple(trusted)
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"trusted module prefixes must be str, got {p!r}")
    return out or None


def encode(obj: Any, *, compat: bool = False, allow_pickle: bool = False,
           trusted: str | Iterable[str] | None = None) -> torch.Tensor:
    """Encodes `obj` as MessagePack into a buffer from fastbcast's pinned pool.

    Class instances are written from the state their pickle protocol defines
    (``__reduce_ex__``, ``__getstate__``, ``__dict__``, ``__slots__``; a
    pydantic model's extras, fields set and private attributes), each class
    once per message; an object that appears several times (a tensor,
    array, bytes of 64 bytes or more, an instance) travels once and decodes
    to one object. A class travels natively only if receivers will rebuild
    it: registered, trusted, or one of the standard-library classes the
    codec knows (datetime, UUID, Decimal, OrderedDict, defaultdict, ...).

    Arguments:
        obj: the object to encode: None, bool, int, float, str (lone
            surrogates included), bytes, bytearray, memoryview, list, dict,
            tuple, set, frozenset, complex, CPU torch.Tensor, numpy.ndarray
            (numeric) and numpy scalars, array.array, and instances of
            registered or trusted classes, nested up to 1,024 levels (deeper
            levels travel as a pickle when `allow_pickle`).
        compat: write plain MessagePack only (no ext types): tuples and sets
            become arrays; anything else that compat decoding could not give
            back (other types, tuple map keys) is a TypeError.
        allow_pickle: let objects the codec cannot represent, or whose class
            receivers would not rebuild, travel as a pickle ext instead of
            raising TypeError.
        trusted: module prefixes (a str or an iterable of str) whose classes
            the receivers trust, in addition to the registered ones.

    Returns:
        A 1-D torch.uint8 CPU tensor (pinned when CUDA is available) viewing
        the encoded bytes. The buffer goes back to the pool when the tensor
        (and every view of it) is dropped, so copy it if you keep it long.

    Raises:
        TypeError: an unsupported object, or an instance of a class that is
            neither registered nor trusted (without `allow_pickle`); the
            message gives its path, e.g.
            ``data[0]['messages'][2].content: unsupported type Foo``.
        ValueError: a reference cycle, or nesting deeper than 1,024 levels
            without `allow_pickle`.
        RecursionError: nesting too deep for the calling thread's C stack.
        KeyboardInterrupt, SystemExit: raised by user code while encoding,
            unchanged.
    """
    return _C.encode(obj, compat, allow_pickle, _prefixes(trusted))


def encode_into(obj: Any, out: torch.Tensor, offset: int = 0, *, compat: bool = False,
                allow_pickle: bool = False, trusted: str | Iterable[str] | None = None) -> int:
    """Encodes `obj` into a caller's buffer at `offset`.

    Arguments:
        obj: as for `encode`.
        out: a contiguous 1-D torch.uint8 CPU tensor.
        offset: byte offset in `out` where the encoding starts.
        compat, allow_pickle, trusted: as for `encode`.

    Returns:
        The number of bytes written, starting at `offset`.

    Raises:
        BufferTooSmallError: `out` cannot hold the encoding at `offset`; its
            `needed` attribute is the size required. `out` is left unchanged.
        ValueError: `offset` is outside `out`.
    """
    fits, n = _C.encode_into(obj, out, offset, compat, allow_pickle, _prefixes(trusted))
    if not fits:
        raise BufferTooSmallError(n, offset, out.numel())
    return n


def decode(buf, *, allow_pickle: bool = False, trusted: str | Iterable[str] | None = ()) -> Any:
    """Decodes one MessagePack value.

    Arguments:
        buf: a contiguous CPU torch.uint8 tensor, bytes, bytearray or
            memoryview holding exactly one encoded value.
        allow_pickle: accept pickle exts. Off by default: a pickle can run
            arbitrary code, so only enable it for senders you trust.
        trusted: module prefixes (``"myapp"`` or ``("myapp.schemas",)``)
            whose classes may be rebuilt in addition to those passed to
            `register`. Classes are looked up among already-imported modules
            only.

    Returns:
        The decoded object. Small non-negative ints are shared objects.

    Raises:
        DecodeError: (a ValueError) the bytes are truncated, corrupt, name a
            class that is not trusted, or hold a pickle while `allow_pickle`
            is off. The message names the byte offset.
        KeyboardInterrupt, SystemExit: raised by user code while decoding
            (a __setstate__, a __hash__), unchanged.
    """
    return _C.decode(buf, allow_pickle, _prefixes(trusted))


def register(*classes: type) -> None:
    """Trusts classes for decoding (on every rank that decodes them).

    Arguments:
        classes: classes defined in Python: dataclasses, pydantic v2 models,
            msgspec Structs, enums, and any class whose instances pickle
            through their ``__dict__``/``__slots__`` or a ``__reduce__`` that
            names the class itself. Their wire name is ``"module:QualName"``.

    Raises:
        TypeError: a class that is not defined in Python (a builtin or C
            extension type).
    """
    for cls in classes:
        _C.register(cls)


def trust(*prefixes: str) -> None:
    """Trusts every codec-representable class in modules under `prefixes`,
    and the module-level callables there that a class's ``__reduce__`` names
    (a receiver calls them with the decoded arguments, as pickle would).

    ``trust("myapp")`` covers ``myapp`` and ``myapp.*``; only modules that are
    already imported are searched, never imported.

    Arguments:
        prefixes: module prefixes, each a str.

    Returns:
        None.
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
