"""fastbcast.integrations.verl against the real verl package (0.5.0).

Skipped when verl is not installed (the reason says how to install the
integration extras). The mesh checks run in ONE 8-rank gloo run (each rank
imports verl's schemas, seconds per process): mesh dp=4, tp=2 built as verl's
rollout builds it, real AsyncRolloutRequest objects with tensor token ids
(verl 0.5) and list token ids (verl <= 0.4):

(a) verl's vendored broadcast_pyobj with rank=tp_rank (the rank trap):
    the ranks of TP groups 1-3 get [];
(b) fastbcast's drop-in with the same wrong rank: ValueError on ranks 2-7,
    success on ranks 0 and 1 (their TP-local rank equals their global rank,
    so their call is correct), nothing hangs;
(c) the global rank, and broadcast_rollout(): every rank of every TP group
    holds its own group's requests, field by field, exact enum types, with
    allow_pickle=False; then the same through the patched vendored binding,
    called exactly as verl's three call sites call it.

Patching of the real rollout module (loaded before and after patch()) is
checked in a subprocess, which needs sglang as well.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import integ_helpers as H

H.require("verl")

from distributed import run_distributed  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def test_verl_rollout_mesh_dp4_tp2_gloo():
    results = run_distributed(H.verl_mesh_checks, 8, 4, 2, "cpu", False, timeout=400)
    H.assert_verl_mesh_checks(results, dp=4, tp=2)


_ROLLOUT_SCRIPT = textwrap.dedent("""
    import logging, sys
    import integ_helpers as H
    H.ensure_torchvision_importable()
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logging.getLogger("fastbcast").addHandler(handler)
    logging.getLogger("fastbcast").setLevel(logging.INFO)

    # verl 0.5.0's rollout module imports names that sglang moved after 0.4.x:
    # put them back where it looks for them.
    import sglang.srt.managers.io_struct as io
    import sglang.srt.managers.tokenizer_manager as tm
    import sglang.srt.utils as su
    import sglang.srt.utils.network as net
    for n in ("ReleaseMemoryOccupationReqInput", "ResumeMemoryOccupationReqInput",
              "UpdateWeightsFromTensorReqInput"):
        setattr(tm, n, getattr(io, n))
    su.get_ip = lambda: "127.0.0.1"
    su.get_open_port = net.get_open_port
    su.maybe_set_triton_cache_manager = lambda: None

    import fastbcast.integrations.verl as fb
    ROLLOUT = "verl.workers.rollout.sglang_rollout.sglang_rollout"
    UTILS = "verl.workers.rollout.sglang_rollout.utils"

    # Later: only the vendored module is loaded when patch() runs.
    utils = H.import_verl_rollout_utils()
    original = utils.broadcast_pyobj
    assert ROLLOUT not in sys.modules
    names = fb.patch()
    assert names == (UTILS,), names
    assert fb.patch(allow_pickle=False) == names            # twice: harmless
    import verl.workers.rollout.sglang_rollout.sglang_rollout as rollout
    assert rollout.broadcast_pyobj is fb.broadcast_pyobj    # rebound as it loaded
    assert hasattr(rollout, "SGLangRollout")
    assert fb.patched_modules() == (ROLLOUT, UTILS), fb.patched_modules()
    assert set(fb.unpatch()) == {ROLLOUT, UTILS}
    assert rollout.broadcast_pyobj is original and utils.broadcast_pyobj is original

    # Now: both loaded when patch() runs.
    assert fb.patch() == (ROLLOUT, UTILS)
    assert rollout.broadcast_pyobj is fb.broadcast_pyobj and utils.broadcast_pyobj is fb.broadcast_pyobj
    fb.unpatch()
    assert rollout.broadcast_pyobj is original and not fb.is_patched()

    info = [r.getMessage() for r in records if r.levelno == logging.INFO and r.getMessage().startswith("patched ")]
    assert len(info) == 2 and UTILS in info[0] and ROLLOUT in info[1], info
    print("OK")
""")


def test_patch_real_rollout_module_before_and_after_import():
    if not H.installed("sglang"):
        pytest.skip(f"verl's rollout module needs sglang; {H.INSTALL_HINT}")
    path = [p for p in (REPO_ROOT, TESTS_DIR, os.environ.get("PYTHONPATH")) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    p = subprocess.run([sys.executable, "-c", _ROLLOUT_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("OK"), p.stdout[-3000:] + p.stderr[-6000:]
