"""fastbcast.integrations.sglang / .verl without the target packages.

These run everywhere (CI without the integration extras, GPU boxes without
network): nothing of sglang or verl is imported at import time, patch()
without the package is a clear ImportError that changes nothing, the
replacements have the exact signatures of the functions they replace, and
the verl-free mesh checks (dict payloads shaped like rollout requests, the
rank trap, broadcast_rollout) pass over gloo with mesh dp=2, tp=2.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap

import pytest

import integ_helpers as H
from distributed import run_distributed

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)


def _run(code: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    path = [p for p in (extra_path, REPO_ROOT, TESTS_DIR, os.environ.get("PYTHONPATH")) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_importing_the_integrations_imports_neither_package():
    p = _run("""
        import sys
        import fastbcast, fastbcast.integrations
        import fastbcast.integrations.sglang, fastbcast.integrations.verl
        from fastbcast.integrations.verl import broadcast_rollout
        loaded = [m for m in sys.modules if m.split(".")[0] in ("sglang", "verl", "torchvision", "transformers")]
        assert not loaded, loaded
        print("OK")
    """)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr


def test_patch_without_the_package_is_a_clear_importerror():
    # A finder that answers "no such module" for both makes them missing whether or not they are installed.
    p = _run("""
        import sys

        class Missing:
            def find_spec(self, name, path=None, target=None):
                if name in ("sglang", "verl"):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, Missing())
        import fastbcast.integrations.sglang as s
        import fastbcast.integrations.verl as v
        for mod, pip in ((s, "sglang"), (v, "verl")):
            try:
                mod.patch()
            except ImportError as e:
                assert f"pip install {pip}" in str(e), e
            else:
                raise AssertionError("patch() without the package did not raise")
            assert not mod.is_patched() and mod.patched_modules() == () and mod.original() is None
            assert mod.unpatch() == ()
        print("OK")
    """)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr


def test_verl_without_vendored_copy_points_to_the_sglang_integration(tmp_path):
    # A verl whose rollout has no sglang_rollout.utils (as before 0.5).
    d = tmp_path / "verl" / "workers" / "rollout"
    d.mkdir(parents=True)
    for pkg in (tmp_path / "verl", tmp_path / "verl" / "workers", d):
        (pkg / "__init__.py").write_text("")
    p = _run("""
        import fastbcast.integrations.verl as v
        try:
            v.patch()
        except ImportError as e:
            assert "fastbcast.integrations.sglang.patch()" in str(e), e
        else:
            raise AssertionError("no ImportError")
        assert not v.is_patched()
        print("OK")
    """, extra_path=str(tmp_path))
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr


def test_replacements_have_the_replaced_signatures():
    import fastbcast.integrations.sglang as s
    import fastbcast.integrations.verl as v
    for fn, cpu_default in ((s.broadcast_pyobj, True), (v.broadcast_pyobj, False)):
        params = inspect.signature(fn).parameters
        assert list(params) == ["data", "rank", "dist_group", "src", "force_cpu_device"]
        assert [p.default for p in params.values()][2:] == [None, 0, cpu_default]
        assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params.values())
    assert list(inspect.signature(v.broadcast_rollout).parameters)[:3] == ["obj", "device_mesh", "dim"]
    assert inspect.signature(v.broadcast_rollout).parameters["dim"].default == "tp"


@pytest.mark.parametrize("mod", ["sglang", "verl"])
def test_patch_rejects_a_bad_policy_before_importing(mod):
    import importlib
    m = importlib.import_module(f"fastbcast.integrations.{mod}")
    with pytest.raises(TypeError, match="allow_pickle"):
        m.patch(allow_pickle="no")
    assert not m.is_patched()


def test_rollout_mesh_checks_without_verl_gloo():
    results = run_distributed(H.mesh_checks_plain, 4, 2, 2, "cpu", False, timeout=180)
    H.assert_mesh_checks_plain(results, dp=2, tp=2)
