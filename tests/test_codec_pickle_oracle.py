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
import pytest
import torch

import fastbcast
from fastbcast import decode, encode

import codec_types as ct
from integ_helpers import installed

try:  # optional: only the checks that no pickle is in the bytes read them with it
    import msgpack
except ImportError:
    msgpack = None

TRUSTED = ("codec_types",)
# pydantic and msgspec are optional too (codec_types): where one is missing,
# its payloads are left out of the zoo and the tests that need it skip.
OPTIONAL = ("pydantic", "msgspec")
needs_msgpack = pytest.mark.skipif(msgpack is None, reason="msgpack not installed")
needs_pydantic = pytest.mark.skipif(ct.pydantic is None, reason="pydantic not installed")

try:  # the sanitizer build's frames are several times larger: fewer levels fit a thread's stack
    from fastbcast._build_info import SANITIZE
except ImportError:
    SANITIZE = False


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
        assert a.requires_grad == b.requires_grad and a.is_leaf == b.is_leaf, path
        like_pickle(dict(a.__dict__), dict(b.__dict__), path + ".__dict__", pairs)
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
    tagged = ct.TagList([1, 2, 3])
    tagged.tag = "t"
    node = ct.Node()
    node.child = [node]
    tagged_t = torch.arange(6.0).reshape(2, 3).as_subclass(ct.TaggedTensor)
    tagged_t.note = {"k": [1, 2]}
    param = torch.nn.Parameter(torch.zeros(3))
    grad_t = torch.arange(6.0, requires_grad=True)
    attr_t = torch.arange(4)
    attr_t.tag, attr_t.meta = "image", {"hw": [2, 2]}
    grad_attr_t = torch.ones(2, requires_grad=True)
    grad_attr_t.note = 1
    zoo = {
        "dataclass": ct.Point(1, 2.5),
        "dataclass-undeclared-attr": with_extra,
        "dataclass-post-init-attr": post,
        "dataclass-frozen-slots": ct.FrozenSlotPoint(1, 2),
        "dataclass-slots": ct.SlotPoint(3, 4),
        "custom-state": ct.CustomState([1], drop="gone"),
        "slots-and-dict": ct.SlotsAndDict(),
        "reduce-to-class": ct.ReduceToClass(1, "y"),
        "reduce-to-trusted-factory": [ct.Made(5), ct.Made(6)],
        "reduce-to-untrusted-callable": ct.Foo(5),
        "list-subclass": tagged,
        "enums": [ct.Color.RED, ct.Priority.HIGH, ct.Perm.R | ct.Perm.W, ct.Mode.SLOW],
        "instance-cycle": node,
        "unregistered-dataclass": [NotRegistered(1)],
        "parameter": torch.nn.Parameter(torch.ones(2, 2)),
        "parameter-no-grad": [torch.nn.Parameter(torch.arange(4), requires_grad=False)],
        "tensor-requires-grad": [grad_t, {"again": grad_t}, torch.zeros(2), torch.ones(3).requires_grad_()],
        "tensor-requires-grad-not-a-leaf": [grad_t * 2, {"sum": grad_t.sum()}],
        "tensor-attributes": [attr_t, {"again": attr_t}, grad_attr_t, torch.zeros(1)],
        "tensor-subclass": tagged_t,
        "shared-parameter": [param, {"again": param}],
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
    if ct.pydantic is not None:
        loose = ct.Loose(name="x", extra_key=[1, 2])
        loose._secret = 42
        zoo.update({
            "pydantic-extra-private": loose,
            "pydantic-fields-set": ct.User(name="a", tags=["t"]),
            "pydantic-nested": ct.Team(name="t", members=[ct.User(name="m")], lead=ct.User(name="l")),
        })
    if ct.msgspec is not None:
        zoo["struct"] = ct.SLine(ct.SPoint(1), ct.SPoint(2, 3), "l")
    return zoo


ZOO = _zoo()
# One skipped case per missing package, so that a run says what it did not check.
ZOO_CASES = list(ZOO) + [pytest.param(m, marks=pytest.mark.skip(reason=f"{m} not installed: its payloads are left out"))
                         for m in OPTIONAL if getattr(ct, m) is None]


@pytest.fixture(scope="module", autouse=True)
def _register():
    fastbcast.register(*ct.REGISTERED)


def fb_roundtrip(x, allow_pickle=True):
    return decode(encode(x, allow_pickle=allow_pickle, trusted=TRUSTED), allow_pickle=allow_pickle, trusted=TRUSTED)


@pytest.mark.parametrize("name", ZOO_CASES)
def test_matches_pickle(name):
    x = ZOO[name]
    like_pickle(fb_roundtrip(x), pickle.loads(pickle.dumps(x)))


@pytest.mark.parametrize("name", ZOO_CASES)
def test_strict_mode_gives_the_same_or_refuses_on_the_source(name):
    x = ZOO[name]
    try:
        b = encode(x, trusted=TRUSTED)
    except TypeError as e:
        assert str(e).startswith("data"), str(e)
        assert name in ("reduce-to-untrusted-callable", "unregistered-dataclass"), f"{name} refused: {e}"
        return
    like_pickle(decode(b, trusted=TRUSTED), pickle.loads(pickle.dumps(x)))


@needs_pydantic
def test_no_init_validator_or_post_init_runs():
    x = [ct.PostInit(5), ct.Loose(name="v")]
    calls = list(ct.INIT_CALLS)
    out = fb_roundtrip(x)
    assert ct.INIT_CALLS == calls and out[0].derived == 10 and out[1]._secret == 7


@needs_pydantic
def test_pydantic_extra_and_private_are_kept():
    out = fb_roundtrip(ZOO["pydantic-extra-private"])
    assert out.model_extra == {"extra_key": [1, 2]} and out._secret == 42
    assert out.model_fields_set == {"name", "extra_key"}


@needs_msgpack
@pytest.mark.parametrize("allow_pickle", [True, False], ids=["drop-in", "strict"])
def test_parameter_keeps_its_class_natively(allow_pickle):
    # nn.Parameter needs no trust: it is rebuilt as torch's own
    # _rebuild_parameter does, without a pickle (none is in the bytes).
    x = [torch.nn.Parameter(torch.tensor([1.5, -2.0])), torch.nn.Parameter(torch.ones(2, 2), requires_grad=False)]
    b = encode(x, allow_pickle=allow_pickle)
    assert 15 not in ext_codes(msgpack.unpackb(b.numpy().tobytes(), raw=False, strict_map_key=False))
    out = decode(b)
    assert [type(p) for p in out] == [torch.nn.Parameter] * 2
    assert [p.requires_grad for p in out] == [True, False] and [p.is_leaf for p in out] == [True, True]
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], x[1])
    like_pickle(out, pickle.loads(pickle.dumps(x)))


def test_tensor_subclass_needs_trust_like_any_class():
    t = torch.arange(3).as_subclass(ct.TaggedTensor)
    t.note = "n"
    with pytest.raises(TypeError, match=r"data\[0\]: instance of codec_types:TaggedTensor is not registered"):
        encode([t])
    out = decode(encode([t], trusted=TRUSTED), trusted=TRUSTED)
    assert type(out[0]) is ct.TaggedTensor and out[0].note == "n" and torch.equal(out[0], t)
    with pytest.raises(fastbcast.DecodeError, match="not trusted"):
        decode(encode([t], trusted=TRUSTED))


@needs_msgpack
def test_reduce_to_a_trusted_callable_travels_natively():
    # ct.Made pickles through codec_types._make_made: under the trusted
    # prefix, so it is called on the receiver; no pickle travels.
    b = encode([ct.Made(1), ct.Made(2)], trusted=TRUSTED)
    assert 15 not in ext_codes(msgpack.unpackb(b.numpy().tobytes(), raw=False, strict_map_key=False))
    assert decode(b, trusted=TRUSTED) == [ct.Made(1), ct.Made(2)]
    with pytest.raises(fastbcast.DecodeError, match="callable codec_types:_make_made is not trusted"):
        decode(b)


@needs_msgpack
def test_reduce_to_an_untrusted_callable_is_pickled_or_refused_on_the_source():
    # ct.Foo pickles through copyreg._reconstructor, outside every trusted prefix.
    x = [{"k": ct.Foo(3)}]
    b = encode(x, allow_pickle=True, trusted=TRUSTED)
    assert 15 in ext_codes(msgpack.unpackb(b.numpy().tobytes(), raw=False, strict_map_key=False))
    assert decode(b, allow_pickle=True) == x
    with pytest.raises(TypeError, match=r"data\[0\]\['k'\]: unsupported type Foo .*copyreg\._reconstructor") as info:
        encode(x, trusted=TRUSTED)
    assert "register" not in str(info.value)  # register() would not help


class _CountsReduce:
    """Pickles through an untrusted module-level factory, counting its reducer's calls."""
    calls = 0

    def __init__(self, n):
        self.n = n

    def __reduce__(self):
        _CountsReduce.calls += 1
        return _counted, (self.n,)


def _counted(n):
    return _CountsReduce(n)


def test_an_object_that_travels_as_a_pickle_is_reduced_once():
    # The encoder asks __reduce_ex__ to see whether the object travels
    # natively; pickle is given that answer, so a reducer with side effects
    # (or a slow one, against timeout=) runs once, as with pickle.
    x = [_CountsReduce(1), {"again": _CountsReduce(2)}]
    _CountsReduce.calls = 0
    pickle.dumps(x)
    assert _CountsReduce.calls == 2
    _CountsReduce.calls = 0
    out = decode(encode(x, allow_pickle=True), allow_pickle=True)
    assert _CountsReduce.calls == 2 and [out[0].n, out[1]["again"].n] == [1, 2]


def test_reduce_to_a_callable_no_receiver_can_find_is_refused_without_a_trust_hint():
    def make(n):  # a local function: no module-level name finds it
        return n

    class LocalReduce:
        def __reduce__(self):
            return make, (1,)

    with pytest.raises(TypeError, match="could not find by its name") as info:
        encode([LocalReduce()], trusted=TRUSTED + ("test_codec_pickle_oracle",))
    assert "fastbcast.trust" not in str(info.value) and "allow_pickle" in str(info.value)


def ext_codes(value):
    """Every ext code in a msgpack-read value, inside tuples and instances too."""
    if isinstance(value, msgpack.ExtType):
        inner = []
        if value.code in (1, 2, 3, 17, 18):
            try:
                unp = msgpack.Unpacker(raw=False, strict_map_key=False)
                unp.feed(value.data)
                for item in unp:
                    inner += ext_codes(item)
            except Exception:
                pass
        return [value.code] + inner
    if isinstance(value, (list, tuple)):
        return [c for v in value for c in ext_codes(v)]
    if isinstance(value, dict):
        return [c for kv in value.items() for v in kv for c in ext_codes(v)]
    return []


def test_a_tensor_shared_by_16_requests_travels_once():
    image = torch.zeros(3 * 1024 * 1024, dtype=torch.uint8)
    reqs = [{"rid": i, "image": image} for i in range(16)]
    b = encode(reqs)
    assert b.numel() < image.numel() + 4096
    out = decode(b)
    assert all(r["image"] is out[0]["image"] for r in out)


def _deep_dict(n):
    x = 0
    for _ in range(n):
        x = {"k": x}
    return x


def _deep_node(n):
    x = None
    for _ in range(n):
        x = ct.Node(x)
    return x


def _same_chain(a, b):
    """Compares two deep chains level by level (== would recurse as deep)."""
    depth = 0
    while True:
        assert type(a) is type(b), depth
        if isinstance(b, list):
            assert len(a) == len(b) == 1, depth
            a, b = a[0], b[0]
        elif isinstance(b, dict):
            assert list(a) == list(b) == ["k"], depth
            a, b = a["k"], b["k"]
        elif isinstance(b, ct.Node):
            a, b = a.child, b.child
        else:
            assert a == b, depth
            return depth
        depth += 1


@pytest.mark.parametrize("make", [_deep, _deep_dict, _deep_node], ids=["lists", "dicts", "instances"])
@pytest.mark.parametrize("n", [300, 480, 1000])
def test_deep_nesting_goes_as_deep_as_pickle(n, make):
    # Where pickle round-trips, the drop-in does too. Where pickle raises (C
    # pickle on CPython 3.11 stops near 500 nested lists and 330 instances),
    # fastbcast carries the object itself (1,024 levels natively) or raises a
    # clean error on the source, never a crash or a receiver-side failure.
    x = make(n)
    try:
        want = pickle.loads(pickle.dumps(x))
    except RecursionError:
        want = None
    try:
        b = encode(x, allow_pickle=True, trusted=TRUSTED)
    except (RecursionError, ValueError) as e:
        assert want is None, f"pickle carries {n} levels, fastbcast raised {e!r}"
        return
    try:
        out = decode(b, allow_pickle=True, trusted=TRUSTED)
    except fastbcast.DecodeError as e:
        # Only where pickle fails too, and only in the sanitizer build (about
        # 6 KiB of stack per decoded instance there, against 250 bytes).
        assert SANITIZE and want is None and "C stack" in str(e), e
        return
    assert _same_chain(out, x) == n
    if want is not None:
        assert _same_chain(out, want) == n


def test_deep_nesting_is_native_up_to_1024_levels():
    for make in (_deep, _deep_dict, _deep_node):
        b = encode(make(1024), trusted=TRUSTED)  # no pickle allowed: all native
        if SANITIZE and make is _deep_node:
            try:
                decode(b, trusted=TRUSTED)
            except fastbcast.DecodeError as e:  # see test_deep_nesting_goes_as_deep_as_pickle
                assert "C stack" in str(e)
            continue
        assert _same_chain(decode(b, trusted=TRUSTED), make(1024)) == 1024
    with pytest.raises(ValueError, match="nesting deeper than 1024 levels"):
        encode(_deep(1025))


def _cycles():
    """Values holding reference cycles through containers, by name."""
    selfref = [1, "x"]
    selfref.append(selfref)
    d1, d2 = {"n": 1}, {"n": 2}
    d1["other"], d2["other"] = d2, d1
    via_tuple = []
    via_tuple.append((via_tuple, "t"))
    t = torch.arange(4.0)
    with_leaves = [t, {"t": t, "p": ct.Point(1, 2.5)}]
    with_leaves.append(with_leaves)
    in_instance = {"k": []}
    in_instance["k"].append(in_instance)
    deep = _deep(300)
    deep[0][0].append(deep)
    return {
        "self-referencing-list": selfref,
        "dicts-pointing-at-each-other": [d1, d2],
        "cycle-through-a-tuple": via_tuple,
        "cycle-with-shared-tensor-and-instance": with_leaves,
        "cycle-inside-an-instance": ct.Point(in_instance, 0.5),
        "cycle-300-levels-down": {"deep": deep},
    }


def same_graph(a, b, seen=None, path="x"):
    """like_pickle for values with cycles: every container of b maps to one
    container of a, so a cycle or a shared container in b is the same object
    at the same places in a."""
    seen = {} if seen is None else seen
    if type(b) in (list, dict, tuple):
        if id(b) in seen:
            assert seen[id(b)] is a, f"{path}: pickle gives one object here, fastbcast another"
            return
        seen[id(b)] = a
        assert type(a) is type(b) and len(a) == len(b), path
        if type(b) is dict:
            assert list(a) == list(b), path
            for k in b:
                same_graph(a[k], b[k], seen, f"{path}[{k!r}]")
        else:
            for i, (x, y) in enumerate(zip(a, b)):
                same_graph(x, y, seen, f"{path}[{i}]")
    elif hasattr(b, "__dict__") and not isinstance(b, torch.Tensor):
        assert type(a) is type(b), path
        same_graph(vars(a), vars(b), seen, path + ".__dict__")
    else:
        like_pickle(a, b, path, seen)


CYCLES = _cycles()


@pytest.mark.parametrize("name", list(CYCLES))
def test_reference_cycles_travel_as_pickle_gives_them(name):
    # With pickles allowed (the drop-in's default) a value holding a cycle
    # travels as one pickle: receivers get pickle's result, cycles included.
    x = CYCLES[name]
    got = fb_roundtrip(x)
    same_graph(got, pickle.loads(pickle.dumps(x)))
    if name == "self-referencing-list":
        assert got[2] is got
    if name == "dicts-pointing-at-each-other":
        assert got[0]["other"] is got[1] and got[1]["other"] is got[0]
    # Strict: still a clear error on the source, naming where (the walk
    # stops at 1,024 levels; a branch off the cycle may be what it meets there).
    with pytest.raises(ValueError, match=r"^data.*(reference cycle|nesting deeper than 1024)"):
        encode(x, trusted=TRUSTED)


def test_cycle_fallback_leaves_no_state_behind():
    # The walk that found the cycle wrote class table entries and memo slots
    # before giving up; the next encodes must not see them.
    pt = ct.Point(1, 2.5)
    x = [pt, pt]
    x.append(x)
    got = fb_roundtrip(x)
    assert got[2] is got and got[0] is got[1] and got[0] == pt
    for _ in range(2):
        y = fb_roundtrip([pt, ct.Point(3, 4.5), pt], allow_pickle=False)
        assert y == [pt, ct.Point(3, 4.5), pt] and y[0] is y[2]
    assert b"pickle" not in bytes(encode([pt], trusted=TRUSTED).numpy())


@pytest.mark.parametrize("stack_kib", [64, 256])
def test_deep_nesting_on_a_small_thread_stack_is_a_clean_error(stack_kib):
    # The depth limit bounds levels, not bytes: a thread with a small C stack
    # stops early with an error on both sides instead of overflowing.
    import threading
    results = {}

    def body():
        try:
            encode(_deep_node(1024), trusted=TRUSTED)
            results["encode"] = "ok"
        except RecursionError as e:
            results["encode"] = str(e)
        try:
            decode(b"\x91" * 1023 + b"\x00")
            results["decode"] = "ok"
        except fastbcast.DecodeError as e:
            results["decode"] = str(e)

    old = threading.stack_size(stack_kib * 1024)
    try:
        t = threading.Thread(target=body)
        t.start()
        t.join()
    finally:
        threading.stack_size(old)
    assert results["encode"] == "ok" or "C stack" in results["encode"], results
    assert results["decode"] == "ok" or "C stack" in results["decode"], results
    if stack_kib == 64:
        assert results["encode"] != "ok" and results["decode"] != "ok", results


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
