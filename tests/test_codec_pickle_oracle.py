"""A drop-in must give back what pickle gives back: for a zoo of payloads
(classes with every kind of pickle protocol, SGLang's and verl's real request
classes, stdlib and numpy leaves, shared references, deep nesting), the
result of encode/decode matches ``pickle.loads(pickle.dumps(x))`` in type,
value, the state pickle keeps, and which objects are shared. Strict mode (no
pickle) either gives the same or refuses on the source with a TypeError that
names the path.
"""
import array
import collections
import dataclasses
import datetime
import decimal
import enum
import math
import pickle
import uuid

import numpy as np
import pydantic
import pytest
import torch

import fastbcast
from fastbcast import decode, encode

import codec_types as ct
from integ_helpers import installed

TRUSTED = ("codec_types",)


@dataclasses.dataclass
class NotRegistered:
    """A class of this test module: neither registered nor trusted."""
    v: int


def _state(x):
    """What pickle keeps of an instance: its reduce value, less the callable."""
    rv = x.__reduce_ex__(4)
    if isinstance(rv, str):
        return rv
    rv = list(rv) + [None] * (5 - len(rv))
    args = rv[1]
    if args and args[0] is type(x):  # copyreg.__newobj__(cls, ...) and msgspec's rebuild(cls, kwargs)
        args = args[1:]
    return [args, rv[2], list(rv[3]) if rv[3] is not None else None, list(rv[4]) if rv[4] is not None else None]


def _shareable(x):
    return (isinstance(x, (torch.Tensor, np.ndarray)) or (type(x) is bytes and len(x) >= 64)
            or not isinstance(x, (int, float, complex, str, bytes, bool, type(None), list, dict, tuple, set,
                                  frozenset, bytearray, memoryview, array.array, np.generic, enum.Enum, type)))


def like_pickle(a, b, path="x", pairs=None):
    """Asserts that `a` (ours) matches `b` (pickle's) in type, value, kept state
    and sharing: an object shared in b is shared in a at the same places."""
    pairs = {} if pairs is None else pairs
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if _shareable(b):
        if id(b) in pairs:
            assert pairs[id(b)] is a, f"{path}: pickle shares this object, fastbcast does not"
            return
        pairs[id(b)] = a
    if isinstance(b, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), path
    elif isinstance(b, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
        assert a.requires_grad == b.requires_grad, path
    elif isinstance(b, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(b, (list, tuple)) and type(b) in (list, tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            like_pickle(x, y, f"{path}[{i}]", pairs)
    elif type(b) is dict:
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in b:
            like_pickle(a[k], b[k], f"{path}[{k!r}]", pairs)
    elif isinstance(b, (int, str, bytes, bool, type(None), complex, set, frozenset, bytearray, array.array,
                        np.generic, enum.Enum, type, range, datetime.date, datetime.time, datetime.timedelta,
                        uuid.UUID, decimal.Decimal)):
        assert a == b, f"{path}: {a!r} != {b!r}"
        if isinstance(b, array.array):
            assert a.typecode == b.typecode, path
    else:
        like_pickle(_state(a), _state(b), path + ".<state>", pairs)


def _deep(n):
    x = 0
    for _ in range(n):
        x = [x]
    return x


def _zoo():
    shared_t = torch.arange(12.0).reshape(3, 4)
    shared_pt = ct.Point(1, 2.5)
    post = ct.PostInit(3)
    with_extra = ct.WithDefaults("n")
    with_extra.undeclared = {"k": 1}
    loose = ct.Loose(name="x", extra_key=[1, 2])
    loose._secret = 42
    tagged = ct.TagList([1, 2, 3])
    tagged.tag = "t"
    node = ct.Node()
    node.child = [node]
    zoo = {
        "dataclass": ct.Point(1, 2.5),
        "dataclass-undeclared-attr": with_extra,
        "dataclass-post-init-attr": post,
        "dataclass-frozen-slots": ct.FrozenSlotPoint(1, 2),
        "dataclass-slots": ct.SlotPoint(3, 4),
        "pydantic-extra-private": loose,
        "pydantic-fields-set": ct.User(name="a", tags=["t"]),
        "pydantic-nested": ct.Team(name="t", members=[ct.User(name="m")], lead=ct.User(name="l")),
        "struct": ct.SLine(ct.SPoint(1), ct.SPoint(2, 3), "l"),
        "custom-state": ct.CustomState([1], drop="gone"),
        "slots-and-dict": ct.SlotsAndDict(),
        "reduce-to-class": ct.ReduceToClass(1, "y"),
        "reduce-to-factory": ct.Foo(5),
        "list-subclass": tagged,
        "enums": [ct.Color.RED, ct.Priority.HIGH, ct.Perm.R | ct.Perm.W, ct.Mode.SLOW],
        "instance-cycle": node,
        "unregistered-dataclass": [NotRegistered(1)],
        "parameter": torch.nn.Parameter(torch.ones(2, 2)),
        "lone-surrogate": ["hi \ud83d there", {"\udc80": "\ud800"}],
        "numpy-scalars": [np.float64(0.25), np.int64(-7), np.float32(1.5), np.bool_(False), np.uint16(9)],
        "datetime": [datetime.datetime(2025, 5, 6, 7, 8, 9, 10), datetime.date(2020, 2, 29), datetime.time(23, 59),
                     datetime.timedelta(days=-1, microseconds=5),
                     datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=5)))],
        "uuid-decimal": [uuid.UUID(int=2**100 + 5), decimal.Decimal("3.14159"), decimal.Decimal("-Infinity")],
        "ordered-default": [collections.OrderedDict([("b", 1), ("a", 2)]),
                            collections.defaultdict(list, {"k": [1]}), collections.deque([1, 2], maxlen=5)],
        "range": [range(0, 10, 3)],
        "pyarray": [array.array("q", [151935, 0, 12]), array.array("b", [-1]), array.array("d", [0.5])],
        "shared-tensor": [{"image": shared_t} for _ in range(4)],
        "shared-instance": [shared_pt, {"again": shared_pt}],
        "shared-bytes": [b"z" * 100] * 3,
        "shared-ndarray": [np.arange(5)] * 2,
        "deep-400": _deep(400),
        "tuple-keys": {(1, 2): 0, frozenset({3}): 1},
    }
    return zoo


ZOO = _zoo()


@pytest.fixture(scope="module", autouse=True)
def _register():
    fastbcast.register(*ct.REGISTERED)


def fb_roundtrip(x, allow_pickle=True):
    return decode(encode(x, allow_pickle=allow_pickle, trusted=TRUSTED), allow_pickle=allow_pickle, trusted=TRUSTED)


@pytest.mark.parametrize("name", list(ZOO))
def test_matches_pickle(name):
    x = ZOO[name]
    like_pickle(fb_roundtrip(x), pickle.loads(pickle.dumps(x)))


@pytest.mark.parametrize("name", list(ZOO))
def test_strict_mode_gives_the_same_or_refuses_on_the_source(name):
    x = ZOO[name]
    try:
        b = encode(x, trusted=TRUSTED)
    except TypeError as e:
        assert str(e).startswith("data"), str(e)
        assert name in ("reduce-to-factory", "unregistered-dataclass", "parameter"), f"{name} refused: {e}"
        return
    except ValueError as e:
        assert name == "deep-400" and "nesting deeper" in str(e)
        return
    like_pickle(decode(b, trusted=TRUSTED), pickle.loads(pickle.dumps(x)))


def test_no_init_validator_or_post_init_runs():
    x = [ct.PostInit(5), ct.Loose(name="v")]
    calls = list(ct.INIT_CALLS)
    out = fb_roundtrip(x)
    assert ct.INIT_CALLS == calls and out[0].derived == 10 and out[1]._secret == 7


def test_pydantic_extra_and_private_are_kept():
    out = fb_roundtrip(ZOO["pydantic-extra-private"])
    assert out.model_extra == {"extra_key": [1, 2]} and out._secret == 42
    assert out.model_fields_set == {"name", "extra_key"}


def test_parameter_keeps_its_class():
    out = fb_roundtrip([torch.nn.Parameter(torch.ones(3))])
    assert type(out[0]) is torch.nn.Parameter and out[0].requires_grad


def test_a_tensor_shared_by_16_requests_travels_once():
    image = torch.zeros(3 * 1024 * 1024, dtype=torch.uint8)
    reqs = [{"rid": i, "image": image} for i in range(16)]
    b = encode(reqs)
    assert b.numel() < image.numel() + 4096
    out = decode(b)
    assert all(r["image"] is out[0]["image"] for r in out)


def test_deep_nesting_with_pickle_goes_as_deep_as_pickle():
    # C pickle on this Python stops near 500 nested lists; fastbcast writes
    # 256 levels itself and the rest as a pickle, so it goes at least as deep,
    # and fails the same way (RecursionError on the source) where pickle does.
    for n in (300, 480):
        assert fb_roundtrip(_deep(n)) == _deep(n)
    with pytest.raises(RecursionError):
        pickle.dumps(_deep(1000))
    with pytest.raises(RecursionError):
        encode(_deep(1000), allow_pickle=True)


def test_unregistered_class_is_refused_on_the_source_with_a_working_hint():
    with pytest.raises(TypeError, match=r"data\[0\]\.v|data\[0\]: instance of .*NotRegistered.*register"):
        encode([NotRegistered(1)])
    # numpy scalars, datetime, UUID need no registration at all.
    for leaf in (np.float64(1.0), datetime.datetime(2020, 1, 1), uuid.UUID(int=1), collections.OrderedDict()):
        assert type(decode(encode(leaf))) is type(leaf)
    with pytest.raises(TypeError, match="allow_pickle") as info:
        encode(ct.Foo(1))  # a factory __reduce__: register() would not help, so it is not suggested
    assert "register" not in str(info.value)


def test_compat_refuses_what_its_decode_cannot_read():
    for bad in ({(1, 2): 0}, {frozenset({1}): 0}, ["\ud800"], [np.float64(1)], [datetime.date(2020, 1, 1)]):
        with pytest.raises(TypeError):
            encode(bad, compat=True)
    assert decode(encode({1: (1, 2), "s": {3}}, compat=True)) == {1: [1, 2], "s": [3]}


def test_trusted_accepts_a_single_str():
    from fastbcast.codec import _prefixes
    assert _prefixes("myapp") == ("myapp",)
    assert _prefixes(["a", "b"]) == ("a", "b") and _prefixes(()) is None and _prefixes(None) is None
    with pytest.raises(TypeError):
        _prefixes([1])
    b = encode(ct.Point(1, 2.0), trusted="codec_types")
    assert decode(b, trusted="codec_types") == ct.Point(1, 2.0)
    with pytest.raises(fastbcast.DecodeError):
        decode(b, trusted="c")  # a one-letter prefix, as "codec_types" split into characters would give


# ---------------------------------------------------------------- real request classes

def _sglang_requests(n):
    from integ_helpers import ensure_torchvision_importable, make_sglang_requests
    ensure_torchvision_importable()
    return make_sglang_requests(n)


def _verl_requests(n, tensors):
    from integ_helpers import ensure_torchvision_importable, make_verl_requests
    ensure_torchvision_importable()
    return make_verl_requests(n, tensors=tensors)


@pytest.mark.skipif(not installed("sglang"), reason="sglang not installed")
def test_sglang_requests_match_pickle():
    reqs = _sglang_requests(8)
    out = decode(encode(reqs, trusted="sglang"), trusted="sglang")
    like_pickle(out, pickle.loads(pickle.dumps(reqs)))
    assert type(out[0].input_ids) is array.array and out[0].input_ids.typecode == "q"


@pytest.mark.skipif(not installed("sglang"), reason="sglang not installed")
def test_sglang_requests_are_smaller_than_pickle():
    reqs = _sglang_requests(8)
    assert encode(reqs, trusted="sglang").numel() <= len(pickle.dumps(reqs))


@pytest.mark.skipif(not installed("verl"), reason="verl not installed")
@pytest.mark.parametrize("tensors", [False, True], ids=["list-ids", "tensor-ids"])
def test_verl_requests_match_pickle(tensors):
    reqs = _verl_requests(6, tensors)
    out = decode(encode(reqs, trusted="verl"), trusted="verl")
    like_pickle(out, pickle.loads(pickle.dumps(reqs)))


@pytest.mark.skipif(not installed("verl"), reason="verl not installed")
def test_verl_requests_need_trust_on_the_receiver():
    b = encode(_verl_requests(1, False), trusted="verl")
    with pytest.raises(fastbcast.DecodeError, match="not trusted"):
        decode(b)
