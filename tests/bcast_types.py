"""Classes, sample objects and comparison helpers for the broadcast tests.

Spawned ranks import this module by name (tests/ is on their sys.path), so the
classes below have the same wire name, ``"bcast_types:QualName"``, on every
rank. Nothing is registered on import: a rank calls :func:`register_all` when
it wants to decode them, so the tests that expect a refusal keep their
meaning.

Keep this module cheap to import: every rank of every run_distributed call
imports it.
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import math

import numpy as np
import torch

try:  # optional codec types: used when installed
    import pydantic
except ImportError:  # pragma: no cover
    pydantic = None
try:
    import msgspec
except ImportError:  # pragma: no cover
    msgspec = None


class Stage(enum.Enum):
    PREFILL = "prefill"
    DECODE = 2


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 7


@dataclasses.dataclass
class Request:
    rid: str
    input_ids: list
    sampling: dict
    stage: Stage = Stage.PREFILL


@dataclasses.dataclass(frozen=True)
class Span:
    start: int
    stop: int


if pydantic is not None:
    class Params(pydantic.BaseModel):
        temperature: float
        stop: list[str]
else:  # pragma: no cover
    Params = None

if msgspec is not None:
    class Token(msgspec.Struct):
        id: int
        text: str
else:  # pragma: no cover
    Token = None


class Opaque:
    """A plain class the codec has no native form for: it travels only as a
    pickle. Module level so that pickle can find it on every rank."""

    def __init__(self, tag):
        self.tag = tag

    def __eq__(self, other):
        return type(other) is Opaque and other.tag == self.tag

    def __hash__(self):
        return hash(("Opaque", self.tag))

    def __repr__(self):
        return f"Opaque({self.tag!r})"


def register_all() -> None:
    """Registers this module's codec-representable classes with fastbcast."""
    import fastbcast

    classes = [Stage, Level, Request, Span]
    classes += [c for c in (Params, Token) if c is not None]
    fastbcast.register(*classes)


# --------------------------------------------------------------------------
# Sample objects (deterministic: every rank can rebuild what the source sent)
# --------------------------------------------------------------------------

def cpu_tensors(seed: int = 0) -> dict:
    """CPU tensors of many dtypes and layouts, keyed by a description."""
    g = torch.Generator().manual_seed(seed)
    f32 = torch.randn(3, 5, generator=g)
    return {
        "f32": f32,
        "f64": torch.randn(4, generator=g, dtype=torch.float64),
        "f16": torch.randn(2, 3, generator=g).half(),
        "bf16": torch.randn(6, 2, generator=g).to(torch.bfloat16),
        "i64": torch.randint(-2**40, 2**40, (7,), generator=g, dtype=torch.int64),
        "i32": torch.randint(-1000, 1000, (2, 2, 2), generator=g, dtype=torch.int32),
        "i8": torch.randint(-128, 128, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 256, (10,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(11, generator=g) > 0.5,
        "c64": torch.randn(3, generator=g, dtype=torch.complex64),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4, dtype=torch.int16),
        "noncontig": f32.t(),
        "sliced": torch.arange(20, dtype=torch.int64)[3:17:2],
    }


def numpy_arrays(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f64": rng.standard_normal(5),
        "i16": rng.integers(-300, 300, size=(2, 3), dtype=np.int16),
        "u32": rng.integers(0, 2**32, size=4, dtype=np.uint32),
        "bool": rng.random(6) > 0.5,
        "c128": rng.standard_normal(3) + 1j * rng.standard_normal(3),
        "empty": np.zeros((0, 3), dtype=np.float64),
        "fortran": np.asfortranarray(rng.standard_normal((3, 2))),
    }


def zero_dim_arrays() -> list:
    """0-d numpy arrays (kept out of numpy_arrays(): see test_broadcast.py)."""
    return [np.array(7, dtype=np.int64), np.array(2.5, dtype=np.float32), np.array(True)]


def type_zoo() -> dict:
    """One object that holds every type the codec represents natively."""
    zoo = {
        "none": None, "true": True, "false": False,
        "ints": [0, 1, -1, 127, 128, 255, 256, -32, -33, 2**31, -2**31 - 1, 2**63 - 1, -2**63, 2**64 - 1],
        "bigints": [2**64, -2**63 - 1, 2**200 + 12345, -(3**150)],
        "token_ids": list(range(1000, 1100)),          # an int block
        "wide_ids": [2**40 + i for i in range(16)],
        "mixed_list": [1, "two", 3.0, None, True],
        "floats": [0.0, -0.0, 1.5, -2.25, 1e300, -1e-300, math.inf, -math.inf, math.pi],
        "complex": [1 + 2j, -0.5j, complex(3, 0)],
        "str": ["", "ascii", "ünïcödé", "日本語テキスト", "emoji 🚀🎉", "a" * 300, "b" * 70000],
        "bytes": [b"", b"\x00\xff" * 3, bytes(range(256)), b"x" * 70000],
        "bytearray": bytearray(b"mutable\x00bytes"),
        "tuple": (1, (2, (3, ())), "t"),
        "set": {1, 2, 3, "x"},
        "frozenset": frozenset({(1, 2), "y"}),
        "empty": [[], {}, (), set(), frozenset(), "", b""],
        "nested": {"a": [{"b": ({"c": [1, [2, [3, {"d": (4,)}]]]},)}]},
        1: "int key", -5: "negative key", (1, "k"): "tuple key", 2.5: "float key", None: "none key",
        "tensors": cpu_tensors(1),
        "arrays": numpy_arrays(1),
        "enums": [Stage.PREFILL, Stage.DECODE, Level.HIGH],
        "dataclass": Request("r-1", [1, 2, 3], {"temperature": 0.7, "stop": ("</s>",)}, Stage.DECODE),
        "frozen": Span(3, 9),
    }
    if Params is not None:
        zoo["pydantic"] = Params(temperature=0.5, stop=["a", "b"])
    if Token is not None:
        zoo["msgspec"] = Token(id=5, text="hi")
    return zoo


def requests_batch(n: int, tokens: int, seed: int = 0) -> list:
    """A list shaped like a rollout batch: dataclass requests with token ids."""
    out = []
    for i in range(n):
        ids = [(seed * 7919 + i * 31 + j * 17) % 150000 for j in range(tokens)]
        out.append(Request(f"req-{seed}-{i}", ids, {"max_new_tokens": 128 + i, "top_p": 0.9}))
    return out


# --------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------

def assert_same(got, want, path: str = "obj") -> None:
    """Strict deep equality: same types all the way down (a tuple is not a
    list), floats compared bit for bit (so -0.0 != 0.0), tensors by dtype,
    shape, device and values, numpy arrays by dtype, shape and values.
    Raises AssertionError naming the first differing path."""
    tg, tw = type(got), type(want)
    assert tg is tw, f"{path}: type {tg.__name__} != expected {tw.__name__}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype, f"{path}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{path}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert got.device == want.device, f"{path}: device {got.device} != {want.device}"
        assert torch.equal(got, want), f"{path}: tensor values differ"
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype, f"{path}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{path}: shape {got.shape} != {want.shape}"
        assert np.array_equal(got, want), f"{path}: array values differ"
    elif isinstance(want, float):
        assert math.copysign(1.0, got) == math.copysign(1.0, want) and (got == want), \
            f"{path}: {got!r} != {want!r}"
    elif isinstance(want, complex):
        assert got == want, f"{path}: {got!r} != {want!r}"
    elif isinstance(want, dict):
        assert list(got.keys()) == list(want.keys()), f"{path}: keys {list(got)!r} != {list(want)!r}"
        for k in want:
            assert_same(got[k], want[k], f"{path}[{k!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, memoryview):
        assert bytes(got) == bytes(want), f"{path}: memoryview contents differ"
    elif dataclasses.is_dataclass(want):
        for f in dataclasses.fields(want):
            assert_same(getattr(got, f.name), getattr(want, f.name), f"{path}.{f.name}")
    elif pydantic is not None and isinstance(want, pydantic.BaseModel):
        assert_same(want.model_dump(), got.model_dump(), f"{path}<model>")
    elif msgspec is not None and isinstance(want, msgspec.Struct):
        assert_same(msgspec.structs.asdict(got), msgspec.structs.asdict(want), f"{path}<struct>")
    else:
        # sets, frozensets, str, bytes, bytearray, int, bool, None, enums, Opaque
        assert got == want, f"{path}: {got!r:.200} != {want!r:.200}"


def digest(obj) -> tuple:
    """A cheap fingerprint of a large payload: (structure, sizes, blake2b hex).

    Handles bytes, tensors (CPU or CUDA, hashed on the host) and lists/tuples/
    dicts of those; anything else is hashed through its repr."""
    h = hashlib.blake2b(digest_size=16)
    shape = []

    def walk(x):
        if isinstance(x, (bytes, bytearray)):
            shape.append((type(x).__name__, len(x)))
            h.update(x)
        elif isinstance(x, torch.Tensor):
            shape.append(("tensor", str(x.dtype), tuple(x.shape), x.device.type))
            host = x.detach().cpu().contiguous()
            if host.numel():
                h.update(host.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(x, dict):
            shape.append(("dict", len(x)))
            for k, v in x.items():
                h.update(repr(k).encode())
                walk(v)
        elif isinstance(x, (list, tuple)):
            shape.append((type(x).__name__, len(x)))
            for v in x:
                walk(v)
        else:
            shape.append(type(x).__name__)
            h.update(repr(x).encode())

    walk(obj)
    return tuple(shape), h.hexdigest()
