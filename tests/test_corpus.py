"""Replays the fuzzing corpus (tests/corpus/) through fastbcast.decode.

Every file must decode to an object or raise fastbcast.DecodeError: any other
exception, a crash (a sanitizer report under `make sanitize`), or a hang is
a regression. The corpus holds:

  seed-*.bin   valid encodings of every type, written by
               tests/fuzz/make_seeds.py (they must also decode);
  cov-*.bin    inputs the fuzzer (tests/fuzz/fuzz_decode.py) found that
               reach decoder branches no seed reaches: the smallest set that
               covers them all (libFuzzer -set_cover_merge=1 -use_counters=0
               over the fuzzing corpus, with the seeds as the base), named by
               their SHA-1;
  crash-*.bin  inputs the fuzzer found to break the decoder, minimised; each
               one stays here for good (none so far).

Each file is decoded as fuzz_decode.py decodes it: with the classes of
tests/codec_types.py trusted, pickles refused, and once more through the
broadcast receive path with a small CPU "device buffer" (CUDA_REF values).
"""
import os
import sys
import time

import pytest
import torch

import fastbcast
from fastbcast import DecodeError
from fastbcast._loader import _C

import codec_types as ct

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
FILES = sorted(os.listdir(CORPUS)) if os.path.isdir(CORPUS) else []
TRUSTED = ("codec_types",)


@pytest.fixture(scope="module", autouse=True)
def _register():
    fastbcast.register(*ct.REGISTERED)


def _read(name):
    with open(os.path.join(CORPUS, name), "rb") as f:
        return f.read()


def _decode_both_ways(data):
    """(plain decode result or DecodeError, decode_frame result or DecodeError)."""
    out = []
    try:
        out.append(fastbcast.decode(data, trusted=TRUSTED))
    except DecodeError as e:
        out.append(e)
    frame = torch.zeros(_C.HEADER_BYTES + len(data), dtype=torch.uint8)
    if data:
        frame[_C.HEADER_BYTES:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    device_buffer = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    try:
        out.append(_C.decode_frame(frame, len(data), device_buffer, False, TRUSTED))
    except DecodeError as e:
        out.append(e)
    return out


def test_corpus_is_there():
    seeds = [n for n in FILES if n.startswith("seed-")]
    assert len(seeds) >= 100, f"{len(seeds)} seeds in {CORPUS}; run tests/fuzz/make_seeds.py"
    unknown = [n for n in FILES if not n.startswith(("seed-", "cov-", "crash-"))]
    assert not unknown, f"unexpected files in tests/corpus (fuzzer output?): {unknown[:5]}"


@pytest.mark.parametrize("name", FILES)
def test_corpus_file_decodes_or_raises_decode_error(name):
    data = _read(name)
    started = time.perf_counter()
    plain, framed = _decode_both_ways(data)   # anything but DecodeError propagates and fails
    assert time.perf_counter() - started < 2.0, "decoding a corpus file took too long"
    if name.startswith("seed-"):
        # Seeds are valid encodings; only the pickle seed is refused (pickles
        # are off) and the CUDA_REF seeds need a device buffer.
        if "pickle" in name:
            assert isinstance(plain, DecodeError) and "pickle" in str(plain)
        elif "cuda-ref" in name:
            assert isinstance(plain, DecodeError) and not isinstance(framed, DecodeError), (plain, framed)
        else:
            assert not isinstance(plain, DecodeError), f"seed {name} no longer decodes: {plain}"


def test_seeds_round_trip_through_the_encoder():
    # Re-encoding what a seed decodes to gives an encoding that decodes to an
    # equal value (the seeds exercise the same paths in both directions).
    # ct.same recurses once per level: deep-1024 needs more than the default limit.
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old_limit, 5000))
    try:
        for name in FILES:
            if not name.startswith("seed-") or "pickle" in name or "cuda-ref" in name or "cycle" in name:
                continue
            value = fastbcast.decode(_read(name), trusted=TRUSTED)
            again = fastbcast.decode(fastbcast.encode(value, trusted=TRUSTED), trusted=TRUSTED)
            ct.same(value, again, name)
    finally:
        sys.setrecursionlimit(old_limit)
