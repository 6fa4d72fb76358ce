"""Writes the fuzzing seeds: one valid encoding per type the codec knows.

    python tests/fuzz/make_seeds.py            # (re)writes tests/corpus/seed-*.bin

Every seed is a complete, valid fastbcast encoding (FORMAT.md section 1), so
the fuzzer starts from inputs that reach deep into each decoder path instead
of stopping at the first type byte. The seeds are checked in: the corpus
replay test (tests/test_corpus.py) decodes each of them on every test run,
next to the crash reproducers the fuzzer found (crash-*.bin).

Seeds are small (a few hundred bytes at most) so that the replay stays fast
and the fuzzer's mutations hit headers rather than payload bytes. The classes
come from tests/codec_types.py; the fuzz target trusts that module, so OBJECT
and ENUM seeds decode there.

Regenerating is deterministic: running this twice writes the same bytes.
"""
from __future__ import annotations

import array
import collections
import datetime
import decimal
import uuid
import math
import os
import struct
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_TESTS = os.path.dirname(_HERE)
for _p in (os.path.dirname(_TESTS), _TESTS):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import fastbcast  # noqa: E402
import codec_types as ct  # noqa: E402
from codec_types import ext, ext32  # noqa: E402

CORPUS = os.path.join(_TESTS, "corpus")

# The tensor dtypes of FORMAT.md, by wire code.
_TENSOR_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                  torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
                  torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
                  torch.uint16, torch.uint32, torch.uint64]


def _tensor(dtype):
    base = torch.tensor([[0, 1, 0], [1, 1, 0]], dtype=torch.int64)
    if dtype == torch.bool:
        return base.bool()
    if dtype.is_floating_point and dtype.itemsize == 1:
        return base.float().to(dtype)
    return base.to(dtype)


def _tagged_tensor():
    t = torch.arange(3.0).as_subclass(ct.TaggedTensor)
    t.note = "n"
    return t


def _objects() -> dict:
    """name -> object encoded with the default options."""
    shared_point, shared_tensor, shared_bytes = ct.Point(1, 2.0), torch.arange(3), bytes(range(70))
    node_cycle = ct.Node()
    node_cycle.child = [node_cycle]
    objs = {
        # plain MessagePack
        "nil": None, "true": True, "false": False,
        "posfixint": 7, "negfixint": -3, "uint8": 200, "uint16": 60000, "uint32": 2**31, "uint64": 2**63,
        "int8": -100, "int16": -30000, "int32": -2**31, "int64": -2**62,
        "float64": -1.5, "float-nan": math.nan, "float-inf": -math.inf,
        "fixstr": "h\u00e9llo \U0001F600", "str8": "s" * 40, "str16": "t" * 300,
        "bin8": b"\x00\x01\xff", "bin16": bytes(range(256)) + b"x",
        "fixarray": [1, "a", None], "array16": [None] * 20, "empty-list": [],
        "fixmap": {"a": 1, 2: "b", None: [1.0]}, "map16": {i: -i for i in range(17)}, "empty-map": {},
        # exts
        "tuple": (1, (2, "x")), "empty-tuple": (), "set": {1, "a"}, "frozenset": frozenset({(1, 2), 3}),
        "bigint": 2**100, "bigint-neg": -2**70 - 5, "complex": 1.5 - 2j,
        "intblock-u8": list(range(10)), "intblock-u16": [300] * 8, "intblock-u32": [2**20] * 9,
        "intblock-i32": [-1, 5] * 5, "intblock-i64": [2**40, -2**40] * 4, "intblock-u64": [2**64 - 1] * 8,
        "tensor-0d": torch.tensor(3.5), "tensor-empty": torch.zeros(0, 4), "tensor-3d": torch.arange(8).reshape(2, 2, 2),
        "ndarray-i2": np.arange(6, dtype=np.int16).reshape(2, 3), "ndarray-bool": np.array([True, False]),
        "ndarray-c8": np.array([1 + 1j], dtype=np.complex64), "ndarray-0d": np.array(7.0),
        "ndarray-be": np.arange(3, dtype=">u4"), "ndarray-empty": np.zeros((0, 2), dtype=np.float32),
        "bytearray": bytearray(b"abc"), "memoryview": memoryview(b"xyz"),
        "enum": ct.Color.BLUE, "intenum": ct.Priority.HIGH, "strenum": ct.Mode.FAST, "intflag": ct.Perm.R | ct.Perm.W,
        "enum-registered": ct.Fruit.PEAR,
        "dataclass": ct.Point(1, 2.5), "dataclass-frozen": ct.FrozenPoint(1, 2), "dataclass-slots": ct.SlotPoint(3, 4),
        "dataclass-frozen-slots": ct.FrozenSlotPoint(5, 6), "dataclass-defaults": ct.WithDefaults("n", tags=["t"]),
        "dataclass-nested": ct.Nested(ct.Point(1, 0.5), ct.FrozenPoint(2, 3), (4, "p")),
        "dataclass-inherited": ct.Derived(1, "z"), "dataclass-registered": ct.Registered({"v": [1, 2]}),
        "dataclass-chain": ct.Node(ct.Node(ct.Node(None))),
        "conversation": ct.Conversation(7, [ct.Message("user", "hi"), ct.Message("assistant", ["x", 1])], {"k": 1}),
        "pydantic": ct.User(name="u", age=3, tags=["a"]),
        "pydantic-nested": ct.Team(name="t", members=[ct.User(name="m")], lead=ct.User(name="l"), scores={"a": 1.0}),
        "struct": ct.SPoint(1, 2), "struct-nested": ct.SLine(ct.SPoint(1), ct.SPoint(2, 3), "l"),
        # format 2: class table reuse, shared references, cycles through instances, native leaves
        "struct-list": [ct.SPoint(i, -i) for i in range(3)],
        "shared-refs": [shared_point, shared_point, shared_tensor, {"t": shared_tensor}, shared_bytes, shared_bytes],
        "instance-cycle": node_cycle,
        "pydantic-extra": ct.Team.model_construct(name="x", members=[], extra_key=[1]),
        "surrogate-str": ["hi \ud83d there", {"\udc80": 1}],
        "numpy-scalars": [np.float64(0.5), np.int64(-3), np.bool_(True), np.uint8(7), np.complex64(1j)],
        "stdlib-leaves": [datetime.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc),
                          datetime.date(2024, 1, 2), datetime.time(1, 2), datetime.timedelta(days=1, seconds=2),
                          uuid.UUID(int=12345), decimal.Decimal("-1.25"), collections.OrderedDict(a=1),
                          collections.defaultdict(list, {"k": [1]}), range(1, 9, 2)],
        "pyarray-narrow": [array.array("q", [1, 151935, 2]), array.array("l", [-1, 7]), array.array("Q", [300])],
        "reduce-trusted-callable": [ct.Made(1), ct.Made(2)],
        "parameter": [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.arange(2), requires_grad=False)],
        "tensor-subclass": _tagged_tensor(),
        # a little of everything, as a rollout batch looks
        "batch": [{"rid": "r0", "input_ids": list(range(40)), "sampling": {"temperature": 0.7, "n": 2},
                   "mask": [1] * 12, "meta": (1, None), "score": 2**65}],
        "deep-256": None,
    }
    deep = 0
    for _ in range(256):
        deep = [deep]
    objs["deep-256"] = deep
    for _ in range(1024 - 256):
        deep = [deep]
    objs["deep-1024"] = deep
    for i, dt in enumerate(_TENSOR_DTYPES):
        objs[f"tensor-{i:02d}-{str(dt).split('.')[-1]}"] = _tensor(dt)
    for tc in "bBuhHiIlLqQfd":
        objs[f"pyarray-{tc}"] = array.array(tc, "ab" if tc == "u" else [1, 2])
    return objs


def _handmade() -> dict:
    """name -> bytes the encoder never writes but the decoder accepts (or
    refuses in an interesting place)."""
    return {
        "float32": b"\xca" + struct.pack(">f", 1.25),
        "str32": b"\xdb" + struct.pack(">I", 3) + b"abc",
        "bin32": b"\xc6" + struct.pack(">I", 2) + b"\x01\x02",
        "array32": b"\xdd" + struct.pack(">I", 2) + b"\x01\x02",
        "map32": b"\xdf" + struct.pack(">I", 1) + b"\xa1k\xc0",
        "ext8-tuple": b"\xc7\x02\x01\x91\x05",
        "ext16-set": b"\xc8\x00\x02\x02\x91\x05",
        "fixext1-tuple": b"\xd4\x01\x90",
        "intblock-empty": ext(6, b"\x00"),
        # A CUDA_REF: the fuzz target also decodes through decode_frame with a
        # small CPU "device buffer", where these resolve.
        "cuda-ref": ext(8, bytes([8, 1]) + struct.pack("<q", 4) + struct.pack("<Q", 16)),
        "cuda-ref-2d": b"\x92" + ext(8, bytes([1, 2]) + struct.pack("<qq", 2, 3) + struct.pack("<Q", 0)) + b"\xc0",
        # A pickle ext: refused (the fuzz target never allows pickles).
        "pickle": fastbcast_bytes([ct.Foo(1)], allow_pickle=True),
        # compat mode (plain MessagePack only)
        "compat": fastbcast_bytes({"t": (1, 2), "s": {3}, "b": bytearray(b"q"), "ids": list(range(9))}, compat=True),
        # a Struct whose class table lists its fields in another order than the class
        "object-reordered": ext32(17, msgpack.packb(["codec_types:SPoint", 1, ["y", "x"]]) + b"\x02\x01"),
    }


def fastbcast_bytes(obj, **kw) -> bytes:
    kw.setdefault("trusted", ct.TRUSTED)  # as a sender whose registry trusts the test classes
    return bytes(fastbcast.encode(obj, **kw).numpy())


def seeds() -> dict:
    """name -> bytes of every seed."""
    out = {name: fastbcast_bytes(obj) for name, obj in _objects().items()}
    out.update(_handmade())
    return out


def main() -> int:
    os.makedirs(CORPUS, exist_ok=True)
    fastbcast.register(*ct.REGISTERED)
    written = 0
    for name, data in sorted(seeds().items()):
        with open(os.path.join(CORPUS, f"seed-{name}.bin"), "wb") as f:
            f.write(data)
        written += 1
    print(f"wrote {written} seeds to {CORPUS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
