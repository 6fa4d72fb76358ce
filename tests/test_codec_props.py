"""Property tests: hypothesis-generated objects round trip exactly as pickle
does; plain objects agree with the msgpack package byte for byte; seeded
rollout-like payloads (the codec's main job) agree with msgpack in compat mode
and use int blocks otherwise.
"""
import pickle
import random
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastbcast import decode
from codec_types import sender_encode as encode

from codec_types import same

SETTINGS = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

INT_EDGES = [0, 1, 2**7 - 1, 2**7, 2**8 - 1, 2**8, 2**15, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
             2**63 - 1, 2**63, 2**64 - 1, 2**64, -1, -32, -33, -128, -129, -2**15, -2**15 - 1, -2**31,
             -2**31 - 1, -2**63, -2**63 - 1, 2**100, -2**100]

ints_64 = st.integers(-2**63, 2**64 - 1)
ints_any = st.one_of(ints_64, st.sampled_from(INT_EDGES), st.integers(), st.integers(-2**200, 2**200))
EDGES_64 = [v for v in INT_EDGES if -2**63 <= v < 2**64]
small_ints = st.one_of(st.integers(0, 300), st.integers(-40, 40), st.integers(0, 2**33), st.sampled_from(EDGES_64))

hashable_leaves = st.one_of(st.none(), st.booleans(), ints_any, st.floats(allow_nan=False),
                            st.text(max_size=12), st.binary(max_size=12), st.complex_numbers(allow_nan=False))
hashables = st.recursive(
    hashable_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=4).map(tuple), st.frozensets(inner, max_size=4)),
    max_leaves=8)

leaves = st.one_of(st.none(), st.booleans(), ints_any, st.floats(), st.text(max_size=40), st.binary(max_size=40),
                   st.complex_numbers(), st.binary(max_size=10).map(bytearray))


def _containers(inner):
    return st.one_of(
        st.lists(inner, max_size=6),
        st.lists(small_ints, max_size=20),               # int blocks (>= 8 items) and short int lists
        st.lists(st.one_of(small_ints, st.booleans()), min_size=7, max_size=10),  # bools among ints
        st.dictionaries(hashables, inner, max_size=5),
        st.lists(inner, max_size=4).map(tuple),
        st.frozensets(hashables, max_size=4),
        st.sets(hashables, max_size=4),
    )


objects = st.recursive(leaves, _containers, max_leaves=40)


@SETTINGS
@given(objects)
def test_round_trip_matches_pickle(obj):
    expected = pickle.loads(pickle.dumps(obj, protocol=5))
    out = decode(encode(obj))
    same(expected, out)
    same(obj, out)


@SETTINGS
@given(objects)
def test_round_trip_through_every_input_kind(obj):
    buf = encode(obj)
    raw = bytes(buf.numpy())
    for src in (raw, bytearray(raw), memoryview(raw)):
        same(obj, decode(src))


@SETTINGS
@given(st.lists(st.one_of(ints_64, small_ints), max_size=40))
def test_int_lists_use_the_narrowest_block(values):
    raw = bytes(encode(values).numpy())
    out = decode(raw)
    same(values, out)
    v = msgpack.unpackb(raw, raw=False)
    if len(values) < 8:
        assert v == values  # a plain array below the threshold
        return
    lo, hi = min(values), max(values)
    if hi >= 2**63 and lo < 0:
        assert v == values  # no 64-bit width holds both: a plain array
        return
    assert isinstance(v, msgpack.ExtType) and v.code == 6
    if hi >= 2**63:
        assert v.data[0] == 5  # u64: the only width that holds it
        return
    if lo >= 0:
        width = 0 if hi < 2**8 else 1 if hi < 2**16 else 2 if hi < 2**32 else 4
    else:
        width = 3 if lo >= -2**31 and hi < 2**31 else 4
    assert v.data[0] == width
    fmt = {0: "B", 1: "H", 2: "I", 3: "i", 4: "q"}[width]
    assert list(struct.unpack("<%d%s" % (len(values), fmt), v.data[1:])) == values


# ------------------------------------------------------------------ msgpack oracle

def plain(float_width=64):
    """Objects made only of MessagePack's own types (what compat mode writes)."""
    keys = st.one_of(st.none(), st.booleans(), ints_64, st.floats(allow_nan=False, width=float_width),
                     st.text(max_size=12), st.binary(max_size=12))
    leaves = st.one_of(st.none(), st.booleans(), ints_64, st.floats(width=float_width), st.text(max_size=40),
                       st.binary(max_size=40))
    return st.recursive(
        leaves,
        lambda inner: st.one_of(st.lists(inner, max_size=6), st.lists(small_ints, max_size=20),
                                st.dictionaries(keys, inner, max_size=5)),
        max_leaves=40)


plain_objects = plain()


def _has_int_run(obj):
    """True if obj holds a list of >= 8 exact ints (which becomes an int block)."""
    if isinstance(obj, list):
        if len(obj) >= 8 and all(type(x) is int for x in obj):
            return True
        return any(_has_int_run(x) for x in obj)
    if isinstance(obj, dict):
        return any(_has_int_run(k) or _has_int_run(v) for k, v in obj.items())
    return False


@SETTINGS
@given(plain_objects)
def test_plain_objects_agree_with_msgpack(obj):
    expected = msgpack.packb(obj, use_bin_type=True)
    compat = bytes(encode(obj, compat=True).numpy())
    assert compat == expected
    same(obj, msgpack.unpackb(compat, raw=False, strict_map_key=False))
    same(obj, decode(expected))
    same(obj, decode(compat))
    native = bytes(encode(obj).numpy())
    if not _has_int_run(obj):
        assert native == expected
    same(obj, decode(native))


@SETTINGS
@given(plain(float_width=32))
def test_msgpack_single_floats_decode(obj):
    data = msgpack.packb(obj, use_bin_type=True, use_single_float=True)
    same(msgpack.unpackb(data, raw=False, strict_map_key=False), decode(data))


# ------------------------------------------------------------------ rollout payloads

VOCAB = 151_936


def rollout(rng, n_requests, max_len):
    """A batch shaped like an RL rollout: token ids, masks, logprobs, metadata."""
    batch = []
    for i in range(n_requests):
        n_in = rng.choice([0, 1, 7, 8, rng.randrange(max_len + 1)])
        n_out = rng.choice([0, 7, 8, 9, rng.randrange(max_len + 1)])
        batch.append({
            "rid": f"req-{rng.getrandbits(64):016x}",
            "input_ids": [rng.randrange(VOCAB) for _ in range(n_in)],
            "output_ids": [rng.randrange(VOCAB) for _ in range(n_out)],
            "output_token_logprobs": [-rng.expovariate(2.0) for _ in range(n_out)],
            "loss_mask": [rng.randrange(2) for _ in range(n_out)],
            "positions": list(range(n_in + n_out)),
            "draft_ids": [rng.randrange(-1, 2**31) for _ in range(rng.randrange(12))],
            "hashes": [rng.getrandbits(63) for _ in range(rng.randrange(12))],
            "reward": rng.uniform(-1.0, 1.0) if rng.random() < 0.9 else None,
            "finished": rng.random() < 0.5,
            "meta_info": {
                "id": i,
                "finish_reason": {"type": rng.choice(["stop", "length", "abort"]),
                                  "matched": rng.choice([None, 151_643, "</s>"])},
                "prompt_tokens": n_in,
                "completion_tokens": n_out,
                "cached_tokens": rng.randrange(n_in + 1),
                "weight_version": str(rng.randrange(1000)),
                "e2e_latency": rng.random() * 10,
            },
            "image": rng.randbytes(rng.randrange(64)) if rng.random() < 0.2 else None,
            "text": "".join(rng.choice("abc \u00e9\u4e2d\U0001F600") for _ in range(rng.randrange(50))),
        })
    return batch


def _int_lists(obj, path=()):
    """(path, list) for every non-empty list of exact ints; a path is a tuple of keys."""
    if isinstance(obj, list):
        if obj and all(type(x) is int for x in obj):
            yield path, obj
        else:
            for i, x in enumerate(obj):
                yield from _int_lists(x, path + (i,))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _int_lists(v, path + (k,))


def _lookup(node, path):
    for key in path:
        node = node[key]
    return node


@pytest.mark.parametrize("seed", range(16))
def test_rollout_payloads(seed):
    rng = random.Random(seed)
    batch = rollout(rng, n_requests=rng.choice([1, 4, 16]), max_len=rng.choice([16, 300, 2048]))
    expected = msgpack.packb(batch, use_bin_type=True)
    compat = bytes(encode(batch, compat=True).numpy())
    assert compat == expected
    same(batch, msgpack.unpackb(compat, raw=False, strict_map_key=False))
    same(batch, decode(compat))
    same(batch, decode(expected))
    native = bytes(encode(batch).numpy())
    same(batch, decode(native))
    same(batch, decode(encode(batch)))
    view = msgpack.unpackb(native, raw=False, strict_map_key=False)
    for path, ids in _int_lists(batch):
        node = _lookup(view, path)
        if len(ids) >= 8:
            assert isinstance(node, msgpack.ExtType) and node.code == 6, path
        else:
            assert node == ids, path


def test_rollout_large_batch():
    rng = random.Random(1234)
    batch = rollout(rng, n_requests=64, max_len=4096)
    native = encode(batch)
    same(batch, decode(native))
    compat = bytes(encode(batch, compat=True).numpy())
    assert compat == msgpack.packb(batch, use_bin_type=True)
    # Token ids above 2**16 are 5 bytes each as MessagePack uint32, 4 in a u32 block.
    assert native.numel() < len(compat)
