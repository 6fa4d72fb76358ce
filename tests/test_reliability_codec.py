"""Codec reliability in one process: what tests/test_codec_hostile.py does not
already check (see RELIABILITY.md for the whole list).

* Hostile bytes: for random bytes, mutated valid encodings and structured
  junk (hypothesis), every decode returns or raises DecodeError AND stays
  within a memory bound proportional to its input (tracemalloc peak) and a
  time bound (no hang). test_codec_hostile.py checks the outcome for the
  same kinds of input, and the memory bound only for hand-picked headers.
* Decoding constructs nothing outside the trust rules: a malicious pickle is
  refused wherever it sits in the value (test_codec.py checks it at the top
  level and next to a plain value: test_malicious_pickle_is_refused_and_never_runs).
* No reference leaks: 1,000 decodes, encodes and failed decodes/encodes
  leave the gc object count, traced memory and the reference counts of
  shared objects flat.
* Pool buffers handed to Python by the broadcast path are reused once
  dropped (a regression test for a pool that grew by one block per call).
* Hash flooding: map keys / set items crafted to share one hash (which would
  make a decode quadratic) are refused quickly.
"""
import gc
import os
import struct
import sys
import time
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastbcast
from fastbcast import DecodeError, decode
from codec_types import sender_encode as encode
from fastbcast._loader import _C

import codec_types as ct
from codec_types import TRUSTED, ext, ext32

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")

# A decode may allocate a small multiple of its input: a list of n one-byte
# items holds n pointers (8x), n empty lists or dicts in one-byte items cost
# about 60-80 bytes each. Anything growing with a length the input does not
# back breaks this at once.
BYTES_PER_INPUT_BYTE = 128
FIXED_ALLOWANCE = 64 << 10
# ASan + UBSan (`make sanitize`) make the decoder several times slower.
SLOWDOWN = 5.0 if _C.build_info().get("sanitize") else 1.0
TIME_LIMIT_S = 1.0 * SLOWDOWN


def _seeds():
    out = []
    for name in sorted(os.listdir(CORPUS)):
        if name.startswith("seed-") and "pickle" not in name:
            with open(os.path.join(CORPUS, name), "rb") as f:
                out.append(f.read())
    return out


SEEDS = _seeds()


@pytest.fixture(scope="module", autouse=True)
def _warm():
    fastbcast.register(*ct.REGISTERED)
    # First use builds caches (the shared ints, numpy's dtype parser, the
    # class registry): do it before anything is measured.
    for data in SEEDS:
        try:
            decode(data, trusted=TRUSTED)
        except DecodeError:
            pass
    gc.collect()


@pytest.fixture
def traced():
    """tracemalloc on for the whole test (starting it per example is slow)."""
    tracemalloc.start()
    yield
    tracemalloc.stop()


def _bounded_decode(data):
    """Decodes data (tracemalloc must be on); asserts the outcome, memory and time bounds."""
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    started = time.perf_counter()
    try:
        out = decode(data, trusted=TRUSTED)
    except DecodeError as e:
        out = e
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] - before
    del out
    # linear in the input (tracemalloc makes every allocation slow): a hang
    # or a quadratic loop blows through it
    assert elapsed < TIME_LIMIT_S + 2e-6 * SLOWDOWN * len(data), f"decode of {len(data)} bytes took {elapsed:.2f} s"
    limit = BYTES_PER_INPUT_BYTE * len(data) + FIXED_ALLOWANCE
    assert peak <= limit, f"decode of {len(data)} bytes allocated {peak} bytes at peak (limit {limit})"


def _mutate(data, ops):
    b = bytearray(data)
    for kind, pos, value in ops:
        if kind == 0 and b:
            b[pos % len(b)] = value
        elif kind == 1:
            b.insert(pos % (len(b) + 1), value)
        elif kind == 2 and b:
            del b[pos % len(b)]
        elif kind == 3 and b:
            # overwrite 4 bytes with a big-endian length: the lying-header case
            p = pos % len(b)
            b[p:p + 4] = struct.pack(">I", (value * 0x01010101) & 0xFFFFFFFF)
        elif kind == 4:
            del b[pos % (len(b) + 1):]
    return bytes(b)


# Type bytes with a length after them, followed by a claim.
_HEADS = [b"\xdc", b"\xdd", b"\xde", b"\xdf", b"\xda", b"\xdb", b"\xc5", b"\xc6", b"\xc8", b"\xc9"]
_CLAIMS = [b"\xff\xff", b"\x7f\xff\xff\xff", b"\xff\xff\xff\xff", b"\x00\x10\x00\x00", b"\x00\x00\x10\x00"]

_PROPS = settings(max_examples=200, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@_PROPS
@given(st.binary(max_size=512))
def test_random_bytes_bounded_memory_and_time(traced, data):
    _bounded_decode(data)


@_PROPS
@given(st.sampled_from(SEEDS),
       st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=8))
def test_mutated_seeds_bounded_memory_and_time(traced, seed, ops):
    _bounded_decode(_mutate(seed, ops))


@_PROPS
@given(st.lists(st.one_of(st.tuples(st.sampled_from(_HEADS), st.sampled_from(_CLAIMS)).map(b"".join),
                          st.sampled_from([b"\x91", b"\x81\xc0", b"\x90", b"\x80", b"\xc0", b"\xd4\x01"]),
                          st.binary(min_size=1, max_size=16)),
                max_size=32).map(b"".join))
def test_nested_lying_headers_bounded_memory_and_time(traced, data):
    _bounded_decode(data)
    _bounded_decode(b"\xdd" + struct.pack(">I", 1 << 20) + data)


@pytest.mark.parametrize("n", [1 << 12, 1 << 18])
def test_amplifying_valid_inputs_stay_within_the_bound(traced, n):
    # The most memory per input byte valid input can ask for: one-byte
    # containers (each a new list / dict) and one-byte ints in a list.
    for item in (b"\x90", b"\x80", b"\x00", b"\xc0"):
        _bounded_decode(b"\xdd" + struct.pack(">I", n) + item * n)


# =========================================================================
# trust rules: no pickle, wherever it hides
# =========================================================================

def _places(payload):
    """The same pickle ext inside every kind of container."""
    p = ext(15, payload) if len(payload) < 256 else ext32(15, payload)
    return {
        "top": p,
        "list": b"\x92\x01" + p,
        "map-value": b"\x81\xa1k" + p,
        "map-key": b"\x81" + p + b"\xc0",
        "tuple": ext32(1, b"\x91" + p),
        "set": ext32(2, b"\x91" + p),
        "deep": b"\x91" * 100 + p,
        "dataclass-field": ext32(17, b"\x93\xb1codec_types:Point\x03\x92\xa1x\xa1y" + p + b"\x01\x80\xc0"),
        "enum-value": ext32(17, b"\x93\xb1codec_types:Color\x04\x90\x00\x91" + p + b"\xc0\xc0\xc0"),
    }


def test_malicious_pickle_is_refused_in_every_position(tmp_path):
    marker = tmp_path / "pwned"
    import pickle
    payload = pickle.dumps(ct.MarkerWriter(marker), protocol=5)
    for where, data in _places(payload).items():
        # Untrusted, the class around it is refused first; trusted, the pickle.
        with pytest.raises(DecodeError, match="pickle" if where not in ("dataclass-field", "enum-value") else None):
            decode(data)
        with pytest.raises(DecodeError, match="pickle"):
            decode(data, trusted=TRUSTED)
        assert not marker.exists(), f"the pickle ran ({where})"


# =========================================================================
# reference leaks
# =========================================================================

class _Leak:
    """Runs fn n times to warm up, then in windows of n calls until one
    window leaves the gc object count, the traced memory and the reference
    counts of `watched` objects flat (at most `windows` windows).

    A leak grows by the same amount in every window: one object per call is
    n objects and 16 bytes or more per call. Caches that fill while the code
    runs (CPython's per-type caches, numpy's dimension cache) also grow, but
    less in each window, so a later window is flat."""

    def __init__(self, fn, n=1000, watched=(), windows=4):
        self.fn, self.n, self.watched, self.windows = fn, n, watched, windows

    def _window(self):
        gc.collect()
        refs0 = [sys.getrefcount(o) for o in self.watched]
        objects0 = len(gc.get_objects())
        mem0 = tracemalloc.get_traced_memory()[0]
        for _ in range(self.n):
            self.fn()
        gc.collect()
        mem1 = tracemalloc.get_traced_memory()[0]
        objects1 = len(gc.get_objects())
        refs1 = [sys.getrefcount(o) for o in self.watched]
        return objects1 - objects0, mem1 - mem0, [b - a for a, b in zip(refs0, refs1)]

    def check(self, objects=25, bytes_per_call=8):
        tracemalloc.start()
        try:
            for _ in range(self.n):
                self.fn()
            seen = []
            for _ in range(self.windows):
                d_objects, d_mem, d_refs = self._window()
                seen.append((d_objects, d_mem, d_refs))
                if d_objects <= objects and d_mem <= bytes_per_call * self.n and not any(d_refs):
                    return
        finally:
            tracemalloc.stop()
        raise AssertionError(f"every window of {self.n} calls grew (gc objects, traced bytes, refcounts): {seen}")


def _payload():
    return {
        "ids": list(range(300, 600)), "wide": [5000, 70000, 300] * 4, "neg": [-5, 3] * 5, "big": [2**64 - 1] * 8,
        "s": "h\u00e9llo", "b": b"bytes", "ba": bytearray(b"x"), "mv": memoryview(b"y"), "f": 1.5, "c": 1j,
        "t": (1, "a", None), "set": {1, 2}, "fs": frozenset({"q"}), "bigint": 2**80, "nested": [[{"k": [1.0]}]],
        "tensor": torch.arange(6, dtype=torch.int16), "nd": np.arange(4.0), "enum": ct.Color.RED,
        "dc": ct.Point(300, 2.5), "pyd": ct.User(name="u", tags=["t"]), "st": ct.SPoint(1, 2),
        "conv": ct.Conversation(1, [ct.Message("user", "hi")]),
    }


WIRE = bytes(encode(_payload()).numpy())
_CACHED = (300, 5000, 70000)       # fastbcast's shared ints (above CPython's own small ints)


def _cached_objects():
    got = decode(encode(list(_CACHED) * 3))
    return [got[0], got[1], got[2], ct.Color.RED]


def test_decode_and_discard_1000_payloads_leaks_nothing():
    watched = _cached_objects()
    assert decode(encode([300]))[0] is watched[0], "300 is not a shared int: the refcount check would miss leaks"
    _Leak(lambda: decode(WIRE, trusted=TRUSTED), watched=watched).check()


def test_decode_through_the_frame_path_leaks_nothing():
    h = _C.HEADER_BYTES
    frame = torch.zeros(h + len(WIRE), dtype=torch.uint8)
    frame[h:] = torch.frombuffer(bytearray(WIRE), dtype=torch.uint8)
    _Leak(lambda: _C.decode_frame(frame, len(WIRE), None, False, TRUSTED), watched=_cached_objects()).check()


def test_encode_and_discard_1000_payloads_leaks_nothing():
    obj = _payload()
    watched = [obj["ids"][0], obj["s"], obj["enum"], obj["tensor"], obj["dc"]]
    _Leak(lambda: encode(obj), watched=watched).check()
    _Leak(lambda: _C.encode_frame(obj, 65536, 1 << 20, 1, trusted=TRUSTED), watched=watched).check()


def _failing_decodes():
    bad = [WIRE[:len(WIRE) // 2], WIRE + b"\x00", b"\xc1", ext(17, b"\x93\xa9nope:Nope\x03\x90\x80\xc0"),
           ext32(17, b"\x93\xb2codec_types:SPoint\x01\x91\xa1z\x01"), b"\x91" * 1100 + b"\x00", ext(15, b"\x80\x05N."),
           ext32(2, b"\x91\x90"), b"\xa2\xc3\x28"]

    def run():
        for data in bad:
            try:
                decode(data, trusted=TRUSTED)
            except DecodeError:
                pass
            else:
                raise AssertionError(f"{data[:20]!r} decoded")
    return run


def test_failed_decodes_leak_nothing():
    # DecodeError carries the original exception as __cause__; nothing of the
    # half-built value may survive.
    _Leak(_failing_decodes(), watched=_cached_objects()).check()


def test_failed_encodes_leak_nothing():
    cyc = [1, 2]
    cyc.append(cyc)
    bad = [{"ok": [300, 5000], "bad": [(1, ct.Foo(1))]}, cyc, "\ud800", [[[[0]]]] * 2 + [ct.Untrusted()]]
    watched = [bad[0]["ok"], bad[0]["bad"][0][1], cyc]

    def run():
        for obj in bad:
            try:
                encode(obj)
            except (TypeError, ValueError):
                pass
    _Leak(run, watched=watched).check()


# =========================================================================
# pool blocks handed to Python come back
# =========================================================================

def test_pool_blocks_from_the_broadcast_path_are_reused():
    # _C.pool_acquire (receivers), _C.encode_frame (sources) and
    # _C.error_frame return whole pool blocks. Once dropped they must be idle
    # again: a block that stays busy makes the pool grow by one block per
    # broadcast until it hits its cap.
    gc.collect()
    fastbcast.shrink_pool()
    base = fastbcast.pool_stats()
    for i in range(200):
        h = _C.pool_acquire(1000)
        f = _C.encode_frame({"i": i}, 65536, 1 << 20, 1)
        e = _C.error_frame("boom", 65536, 1 << 20, 1)
        del h, f, e
    gc.collect()
    s = fastbcast.pool_stats()
    assert s["busy_blocks"] == base["busy_blocks"], s
    assert s["allocations"] - base["allocations"] <= 3, (base, s)


# =========================================================================
# hash flooding
# =========================================================================

def test_colliding_hash_keys_are_refused_quickly():
    # Ints, floats, complex numbers and tuples of them hash the same in every
    # process, so a sender can make every key of a map (or item of a set)
    # collide, which would make the decode quadratic (minutes for a few MB).
    # More than 64 keys sharing one hash in one map/set is a DecodeError.
    p = 2**61 - 1                       # hash(int) is the value mod 2^61-1
    n = 6000
    colliding = [2**64 + i * p for i in range(n)]
    assert len({hash(k) for k in colliding}) == 1
    for obj in (set(colliding), {k: 0 for k in colliding}):
        buf = bytes(encode(obj).numpy())
        t0 = time.perf_counter()
        with pytest.raises(DecodeError, match="share one hash"):
            decode(buf)
        assert time.perf_counter() - t0 < 0.5
    # Real data: distinct keys, and a handful of equal hashes, decode.
    normal = {2**64 + i for i in range(n)}
    assert decode(encode(normal)) == normal
    few = {k: 1 for k in colliding[:64]}
    assert decode(encode(few)) == few


@pytest.mark.skipif(not torch.cuda.is_available() or not _C.build_info()["with_cuda"],
                    reason="registered (cudaHostRegister) pool memory needs a CUDA build and a GPU")
def test_register_mode_counts_what_it_pins():
    # FASTBCAST_PINNED=register pins whole 2 MiB huge pages: a 64 KiB request
    # must count 2 MiB against the pool's limit, not 64 KiB.
    import subprocess
    code = ("import fastbcast, fastbcast._C as C; b = C.pool_acquire(65536); s = fastbcast.pool_stats(); "
            "assert s['mode'] == 'registered', s; assert s['bytes'] == 2 << 20 == b.numel(), s; print('ok')")
    env = dict(os.environ, FASTBCAST_PINNED="register")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_blocked_module_in_sys_modules_is_not_a_module():
    # `sys.modules["numpy"] = None` (how tests and sandboxes block an import)
    # leaves None where the codec looks for loaded modules: it must be taken
    # as "not loaded", not dereferenced (it crashed register() and encode).
    import subprocess
    code = ("import sys; sys.modules['numpy'] = None; sys.modules['pydantic'] = None\n"
            "import dataclasses, msgspec, fastbcast\n"
            "class S(msgspec.Struct):\n    a: int\n"
            "@dataclasses.dataclass\nclass D:\n    b: int\n"
            "fastbcast.register(S, D)\n"
            "out = fastbcast.decode(fastbcast.encode([S(1), D(2), 3.5]))\n"
            "assert out == [S(1), D(2), 3.5], out\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0 and "ok" in out.stdout, (out.returncode, out.stderr[-2000:])
