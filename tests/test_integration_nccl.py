"""The verl rollout mesh checks over NCCL: mesh dp=2, tp=2 on 4 GPUs, force_cpu_device=False.

verl's own mesh is a CPU mesh (its TP group is gloo); here the mesh is built
with init_device_mesh("cuda", (2, 2, 1), ("dp", "tp", "pp")) so the TP group
is NCCL and the bytes go through the devices. Two variants:

* without verl (dict payloads shaped like rollout requests, with CUDA
  tensors): the rank trap, fastbcast.broadcast_pyobj with the global rank,
  fastbcast.integrations.verl.broadcast_rollout; runs wherever 4 GPUs are;
* with verl (real AsyncRolloutRequest objects, verl's vendored
  broadcast_pyobj for the bug, the patched binding): skipped unless verl is
  installed.
"""
from __future__ import annotations

import pytest

import integ_helpers as H
from distributed import requires_gpus, run_distributed

pytestmark = requires_gpus(4)


def test_rollout_mesh_checks_without_verl_nccl():
    results = run_distributed(H.mesh_checks_plain, 4, 2, 2, "cuda", False, backend="nccl", timeout=300)
    H.assert_mesh_checks_plain(results, dp=2, tp=2)


@pytest.mark.skipif(not H.installed("verl"), reason=f"verl not installed; {H.INSTALL_HINT}")
def test_verl_rollout_mesh_dp2_tp2_nccl():
    results = run_distributed(H.verl_mesh_checks, 4, 2, 2, "cuda", False, backend="nccl", timeout=300)
    H.assert_verl_mesh_checks(results, dp=2, tp=2)
