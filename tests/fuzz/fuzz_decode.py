#!/usr/bin/env python3
"""Coverage-guided fuzz target for fastbcast.decode (atheris / libFuzzer).

The contract under test (FORMAT.md section 2, issue 6): for ANY bytes, decode
returns an object or raises fastbcast.DecodeError. Any other exception is a
finding (atheris reports an uncaught Python exception as a crash), and so is
a crash, a sanitizer report, a hang (-timeout) or a large allocation
(-malloc_limit_mb / -rss_limit_mb).

Each input is decoded twice:
  1. fastbcast.decode(data, trusted=("codec_types",)), pickles refused;
  2. through the broadcast receive path (_C.decode_frame) with a 256-byte CPU
     "device buffer", so CUDA_REF values resolve against a real buffer and
     their bounds checks run too.
Pickles are never allowed here: with allow_pickle=True a fuzzer could build a
pickle that runs code on this machine.

Run it with tests/fuzz/run_fuzz.sh, which builds the clang ASan + UBSan +
libFuzzer-coverage extension it should run against (build/fuzz) and passes:

    python tests/fuzz/fuzz_decode.py WORK_DIR tests/corpus -max_len=4096 -timeout=10 \
        -rss_limit_mb=6144 -malloc_limit_mb=256 -max_total_time=1800

(WORK_DIR first: libFuzzer writes the inputs it finds into the first
directory, and tests/corpus must only hold seeds and crash reproducers.)

A crashing input is written to ./crash-<sha1> (or -artifact_prefix=...);
minimise it with `-minimize_crash=1 -runs=20000 <crash file>`, then copy it to
tests/corpus/crash-<what>.bin so tests/test_corpus.py replays it forever.
"""
import os
import sys

import atheris

_HERE = os.path.dirname(os.path.abspath(__file__))
_TESTS = os.path.dirname(_HERE)
# FASTBCAST_FUZZ_ROOT: the tree whose fastbcast to load (a sanitizer build in
# build/fuzz); default: the repository this file is in.
_ROOT = os.environ.get("FASTBCAST_FUZZ_ROOT") or os.path.dirname(_TESTS)
for _p in (_TESTS, _ROOT):
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)

import torch  # noqa: E402

import fastbcast  # noqa: E402
from fastbcast._loader import _C  # noqa: E402
import codec_types as ct  # noqa: E402

TRUSTED = ("codec_types",)
HEADER = _C.HEADER_BYTES
DecodeError = fastbcast.DecodeError

fastbcast.register(*ct.REGISTERED)
_DEVICE_BUFFER = torch.arange(256, dtype=torch.int64).to(torch.uint8)


def TestOneInput(data: bytes) -> None:
    try:
        fastbcast.decode(data, trusted=TRUSTED)
    except DecodeError:
        pass
    frame = torch.zeros(HEADER + len(data), dtype=torch.uint8)
    if data:
        frame[HEADER:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        _C.decode_frame(frame, len(data), _DEVICE_BUFFER, False, TRUSTED)
    except DecodeError:
        pass


def main() -> None:
    print(f"fuzzing fastbcast from {os.path.dirname(fastbcast.__file__)} "
          f"(build_info: {_C.build_info()})", flush=True)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
