"""Classes and helpers shared by the codec tests.

The classes live at module level here so that their wire name
("codec_types:QualName") is stable. Nothing in this module is registered or
trusted on import: each test decides how a class becomes decodable (with
`fastbcast.register` on the few classes named REGISTERED below, or with
``decode(..., trusted=TRUSTED)``), so the tests that check the refusal of
untrusted classes keep working whatever order the tests run in. Never call
``fastbcast.trust("codec_types")`` from a test: it is global and permanent.
"""
from __future__ import annotations

import array
import copyreg
import dataclasses
import enum
import math
import struct
from typing import Any, Optional

import numpy as np
import torch

try:  # optional: where one is missing its classes are None, and the tests that need them skip
    import pydantic
except ImportError:
    pydantic = None
try:
    import msgspec
except ImportError:
    msgspec = None

# Pass as decode(..., trusted=TRUSTED) to rebuild the classes of this module.
TRUSTED = ("codec_types",)

# A module-level constant that is not a class: naming it on the wire must fail.
NOT_A_CLASS = 42


def not_a_class_either():
    return "a function"


# ---------------------------------------------------------------- enums

class Color(enum.Enum):
    RED = 1
    GREEN = "green"
    BLUE = (0, 0, 255)


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Mode(str, enum.Enum):
    FAST = "fast"
    SLOW = "slow"


class Perm(enum.IntFlag):
    R = 4
    W = 2
    X = 1


class Fruit(enum.Enum):
    """Registered with fastbcast.register (see REGISTERED)."""
    APPLE = "apple"
    PEAR = "pear"


# ---------------------------------------------------------------- dataclasses

@dataclasses.dataclass
class Point:
    x: int
    y: float


@dataclasses.dataclass(frozen=True)
class FrozenPoint:
    x: int
    y: int


@dataclasses.dataclass(slots=True)
class SlotPoint:
    x: int
    y: int


@dataclasses.dataclass(frozen=True, slots=True)
class FrozenSlotPoint:
    x: int
    y: int


@dataclasses.dataclass
class WithDefaults:
    name: str
    count: int = 3
    tags: list = dataclasses.field(default_factory=list)
    extra: Optional[dict] = None
    computed: int = dataclasses.field(default=-1, init=False)


@dataclasses.dataclass
class Message:
    role: str
    content: Any


@dataclasses.dataclass
class Conversation:
    id: int
    messages: list
    meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Nested:
    point: Point
    frozen: FrozenPoint
    pair: tuple


@dataclasses.dataclass
class Node:
    """A linked chain, for depth and cycle tests."""
    child: Any = None


@dataclasses.dataclass
class Untrusted:
    """Never registered, and tests never trust this module globally."""
    secret: int = 0


@dataclasses.dataclass
class Registered:
    """Registered with fastbcast.register (see REGISTERED)."""
    value: Any = None


INIT_CALLS = []


@dataclasses.dataclass
class NoInitOnDecode:
    """Records every __post_init__ call: decoding must not run it."""
    value: int

    def __post_init__(self):
        INIT_CALLS.append(self.value)


@dataclasses.dataclass
class Base:
    a: int


@dataclasses.dataclass
class Derived(Base):
    b: str = "b"


# ---------------------------------------------------------------- pydantic

if pydantic is not None:
    class User(pydantic.BaseModel):
        name: str
        age: int = 0
        tags: list[str] = []

    class Team(pydantic.BaseModel):
        name: str
        members: list[User]
        lead: Optional[User] = None
        scores: dict[str, float] = {}

    class Loose(pydantic.BaseModel):
        """extra="allow" (as verl's tool schemas) and a private attribute."""
        model_config = pydantic.ConfigDict(extra="allow")
        name: str
        n: int = 0
        _secret: int = pydantic.PrivateAttr(default=7)
else:
    User = Team = Loose = None


# ---------------------------------------------------------------- msgspec

if msgspec is not None:
    class SPoint(msgspec.Struct):
        x: int
        y: int = 0

    class SLine(msgspec.Struct):
        a: SPoint
        b: SPoint
        label: str = ""
else:
    SPoint = SLine = None


# ---------------------------------------------------------------- pickle protocol zoo

@dataclasses.dataclass
class PostInit:
    """__post_init__ sets an attribute that is not a declared field."""
    a: int

    def __post_init__(self):
        self.derived = self.a * 2
        INIT_CALLS.append(("PostInit", self.a))


class CustomState:
    """Its own __getstate__/__setstate__: only `keep` travels."""

    def __init__(self, keep, drop=None):
        self.keep = keep
        self.drop = drop

    def __getstate__(self):
        return {"keep": self.keep}

    def __setstate__(self, state):
        self.keep = state["keep"]
        self.drop = "restored"


class SlotsAndDict:
    __slots__ = ("a", "b", "__dict__")

    def __init__(self):
        self.a = 1  # b stays unset
        self.c = 3


class ReduceToClass:
    """__reduce__ names the class itself: rebuilt by calling it."""

    def __init__(self, x, y=0):
        self.x, self.y = x, y

    def __reduce__(self):
        return ReduceToClass, (self.x, self.y)


class TagList(list):
    """A list subclass with an attribute: pickled with its items and state."""


def _make_made(n):
    return Made(n)


class Made:
    """Pickles through a factory function of this module, not through its
    class: native only where codec_types is trusted (the callable is then
    trusted too), pickled or refused elsewhere."""

    def __init__(self, n=0):
        self.n = n

    def __reduce__(self):
        return _make_made, (self.n,)

    def __eq__(self, other):
        return type(other) is Made and other.n == self.n


class TaggedTensor(torch.Tensor):
    """A plain tensor subclass: keeps torch.Tensor's pickle protocol, so it
    travels natively (values, requires_grad, __dict__) where trusted."""


# ---------------------------------------------------------------- unsupported

class Foo:
    """Pickles through a callable outside this module (copyreg's, as
    protocols 0 and 1 do), not through its class: the codec cannot rebuild it
    natively, even where codec_types is trusted; pickle can."""

    def __init__(self, n=0):
        self.n = n

    def __reduce__(self):
        return copyreg._reconstructor, (Foo, object, None), {"n": self.n}

    def __eq__(self, other):
        return type(other) is Foo and other.n == self.n

    def __hash__(self):
        return hash(("Foo", self.n))

    def __repr__(self):
        return f"Foo({self.n})"


class MarkerWriter:
    """Unpickling this opens (and so creates) a file: a harmless stand-in for
    a pickle that runs os.system. Only ever pickled, never instantiated on
    the decoding side by a correct decoder."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


REGISTERED = (Fruit, Registered)


# ---------------------------------------------------------------- helpers

def same(a, b, path="x"):
    """Asserts that `b` equals `a` with the exact same type at every level.

    Floats compare bit for bit in sign (so -0.0 is not 0.0) and nan equals
    nan; dicts must keep their order; tensors and arrays compare dtype, shape
    and raw bytes (so nan and float8 payloads compare too).
    """
    assert type(a) is type(b), f"{path}: type {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, float):
        if math.isnan(a):
            assert math.isnan(b), f"{path}: {a!r} != {b!r}"
        else:
            assert a == b and math.copysign(1.0, a) == math.copysign(1.0, b), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, complex):
        same(a.real, b.real, path + ".real")
        same(a.imag, b.imag, path + ".imag")
    elif isinstance(a, (list, tuple)) and not isinstance(a, enum.Enum):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, dict):
        assert len(a) == len(b), f"{path}: {len(a)} keys != {len(b)}"
        for i, ((ka, va), (kb, vb)) in enumerate(zip(a.items(), b.items())):
            same(ka, kb, f"{path}<key {i}>")
            same(va, vb, f"{path}[{ka!r}]")
    elif isinstance(a, (set, frozenset)):
        assert len(a) == len(b), f"{path}: {len(a)} items != {len(b)}"
        # Match every element to an equal one of the same type.
        rest = list(b)
        for x in a:
            for j, y in enumerate(rest):
                if type(x) is type(y) and x == y:
                    same(x, y, path + "{}")
                    del rest[j]
                    break
            else:
                raise AssertionError(f"{path}: {x!r} ({type(x).__name__}) missing from {b!r}")
    elif isinstance(a, memoryview):
        assert a.tobytes() == b.tobytes(), f"{path}: {a.tobytes()!r} != {b.tobytes()!r}"
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert torch.equal(tensor_bytes(a), tensor_bytes(b)), f"{path}: tensor bytes differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} != {b.shape}"
        assert a.tobytes() == b.tobytes(), f"{path}: array bytes differ"
    elif isinstance(a, array.array):
        assert a.typecode == b.typecode and a.tobytes() == b.tobytes(), f"{path}: {a!r} != {b!r}"
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif pydantic is not None and isinstance(a, pydantic.BaseModel):
        for name in type(a).model_fields:
            same(getattr(a, name), getattr(b, name), f"{path}.{name}")
    elif msgspec is not None and isinstance(a, msgspec.Struct):
        for name in a.__struct_fields__:
            same(getattr(a, name), getattr(b, name), f"{path}.{name}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def tensor_bytes(t):
    """The raw bytes of a tensor in C order, as a 1-D uint8 tensor."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def ext(code, payload):
    """A hand-built MessagePack ext value in its smallest form."""
    n = len(payload)
    c = code & 0xFF
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if n in fixed:
        return bytes([fixed[n], c]) + payload
    if n <= 0xFF:
        return bytes([0xC7, n, c]) + payload
    if n <= 0xFFFF:
        return b"\xc8" + struct.pack(">H", n) + bytes([c]) + payload
    return b"\xc9" + struct.pack(">I", n) + bytes([c]) + payload


def ext32(code, payload):
    """The same ext, always in the ext 32 form (as the encoder writes nested exts)."""
    return b"\xc9" + struct.pack(">I", len(payload)) + bytes([code & 0xFF]) + payload


def tensor_ext(dtype_code, shape, data=b""):
    header = bytes([dtype_code, len(shape)]) + b"".join(struct.pack("<q", s) for s in shape)
    return ext(7, header + data)


def ndarray_ext(dtype_str, shape, data=b""):
    header = (bytes([len(dtype_str)]) + dtype_str + bytes([len(shape)])
              + b"".join(struct.pack("<q", s) for s in shape))
    return ext(9, header + data)


def sender_encode(obj, **kw):
    """fastbcast.encode as a sender that trusts this module: the source decides
    whether a class travels natively, so tests of the receiver's checks (and of
    round trips) encode as a rank whose registry trusts codec_types."""
    import fastbcast
    kw.setdefault("trusted", TRUSTED)
    return fastbcast.encode(obj, **kw)


FATAL = {"kbd": KeyboardInterrupt, "exit": SystemExit}


class Interrupts:
    """Raises KeyboardInterrupt or SystemExit from its pickle protocol: on
    encode (__getstate__) or on decode (__setstate__)."""

    def __init__(self, where, exc):
        self.where, self.exc = where, exc

    def __getstate__(self):
        if self.where == "encode":
            raise FATAL[self.exc]("from __getstate__")
        return {"where": self.where, "exc": self.exc}

    def __setstate__(self, state):
        if state["where"] == "decode":
            raise FATAL[state["exc"]]("from __setstate__")
        self.__dict__.update(state)
