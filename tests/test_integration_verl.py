"""fastbcast.integrations.verl against a real verl release and the sglang it shipped with.

Run by `make test-releases` in .venv-verl061 (verl 0.6.1, sglang 0.5.5),
where verl's own modules import as they are: the real SGLangRollout module,
whose three call sites (``[ip, port]``, ``[output]``, the request list) are
called with their own arguments through its own binding. Skipped where verl
is not installed. The mesh checks run in ONE 4-rank gloo run (each rank
imports verl's rollout and SGLang's engine, many seconds per process): mesh
dp=2, tp=2 built as verl's rollout builds it, real AsyncRolloutRequest
objects with tensor token ids (verl 0.5+) and list token ids (verl <= 0.4):

(a) verl's vendored broadcast_pyobj with rank=tp_rank (the rank trap of
    verl <= 0.4): the ranks of TP group 1 get [];
(b) fastbcast's drop-in with the same wrong rank: ValueError on ranks 2-3,
    success on ranks 0 and 1 (their TP-local rank equals their global rank,
    so their call is correct), nothing hangs;
(c) the global rank, and broadcast_rollout(): every rank of every TP group
    holds its own group's requests, field by field, exact enum types, with
    allow_pickle=False; then the same through the patched vendored binding,
    called exactly as verl's three call sites call it.

Patching of the real rollout module (loaded before and after patch()) is
checked in a subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import integ_helpers as H

H.require("verl", "sglang")
H.require_shipped_sglang("verl")

from distributed import run_distributed  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def test_verl_rollout_mesh_dp2_tp2_gloo():
    results = run_distributed(H.verl_mesh_checks, 4, 2, 2, "cpu", False, timeout=600)
    H.assert_verl_mesh_checks(results, dp=2, tp=2)


_ROLLOUT_SCRIPT = textwrap.dedent("""
    import logging, sys
    import integ_helpers as H
    H.ensure_torchvision_importable()
    H.stub_cuda_kernels()
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logging.getLogger("fastbcast").addHandler(handler)
    logging.getLogger("fastbcast").setLevel(logging.INFO)

    import fastbcast.integrations.verl as fb
    ROLLOUT = "verl.workers.rollout.sglang_rollout.sglang_rollout"
    UTILS = "verl.workers.rollout.sglang_rollout.utils"

    # Later: patch() imports the vendored module (and its package) itself.
    assert UTILS not in sys.modules
    names = fb.patch()
    assert UTILS in names, names
    assert fb.patch(allow_pickle=False) == names            # twice: harmless
    import verl.workers.rollout.sglang_rollout.sglang_rollout as rollout
    utils = sys.modules[UTILS]
    original = fb.original()
    assert rollout.broadcast_pyobj is fb.broadcast_pyobj    # copied the rebound name as it loaded
    assert {ROLLOUT, UTILS} <= set(fb.patched_modules()), fb.patched_modules()
    assert fb.INTEGRATION.options()["trusted"] == fb.SCHEMA_MODULES
    assert {ROLLOUT, UTILS} <= set(fb.unpatch())
    assert rollout.broadcast_pyobj is original and utils.broadcast_pyobj is original
    assert fb.INTEGRATION.options()["trusted"] == ()         # trust withdrawn

    # Now: both loaded when patch() runs.
    assert {ROLLOUT, UTILS} <= set(fb.patch())
    assert rollout.broadcast_pyobj is fb.broadcast_pyobj and utils.broadcast_pyobj is fb.broadcast_pyobj
    fb.unpatch()
    assert rollout.broadcast_pyobj is original and not fb.is_patched()

    info = [r.getMessage() for r in records if r.levelno == logging.INFO and r.getMessage().startswith("patched ")]
    assert len(info) == 2 and UTILS in info[0] and ROLLOUT in info[1], info
    import importlib.metadata as md
    print("OK", md.version("verl"), md.version("sglang"))
""")


def test_patch_real_rollout_module_before_and_after_import():
    path = [p for p in (REPO_ROOT, TESTS_DIR, os.environ.get("PYTHONPATH")) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    p = subprocess.run([sys.executable, "-c", _ROLLOUT_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout[-3000:] + p.stderr[-6000:]
