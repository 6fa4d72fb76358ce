"""FASTBCAST_PATCH and the startup hook, in real interpreters that have it installed.

A throwaway virtual environment (no pip, seconds to make) gets what an
installed fastbcast puts at the top of site-packages: the repository's own
``fastbcast-autopatch.pth`` and, through a path entry, ``fastbcast_autopatch``
and the package; plus the SGLang plugin entry point exactly as setup.py
declares it. Every check starts fresh interpreters from it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

import integ_helpers as H

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


def _entry_point_from_setup() -> str:
    with open(os.path.join(REPO, "setup.py")) as f:
        m = re.search(r'entry_points=\{"sglang\.srt\.plugins": \["([^"]+)"\]\}', f.read())
    assert m, "setup.py declares no sglang.srt.plugins entry point"
    return m.group(1)


@pytest.fixture(scope="module")
def hook_python(tmp_path_factory):
    """A python whose site-packages has fastbcast's startup hook, as an install leaves it."""
    root = tmp_path_factory.mktemp("hookvenv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    py = os.path.join(root, "bin", "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # What this interpreter sees (torch, sglang, ...), then the checkout; sorted
    # before the hook's .pth, so the hook finds fastbcast_autopatch.
    here = [p for p in sys.path if p and os.path.isdir(p) and "site-packages" in p]
    with open(os.path.join(site, "00-base.pth"), "w") as f:
        f.write("\n".join(here + [REPO]) + "\n")
    with open(os.path.join(REPO, "fastbcast-autopatch.pth")) as src, \
            open(os.path.join(site, "fastbcast-autopatch.pth"), "w") as dst:
        dst.write(src.read())
    dist = os.path.join(site, "fastbcast-0.0.0.dist-info")
    os.makedirs(dist)
    with open(os.path.join(dist, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: fastbcast\nVersion: 0.0.0\n")
    with open(os.path.join(dist, "entry_points.txt"), "w") as f:
        f.write(f"[sglang.srt.plugins]\n{_entry_point_from_setup()}\n")
    return py


def _run(py, code, env_patch=None, timeout=300, argv=None):
    env = {k: v for k, v in os.environ.items() if k not in ("FASTBCAST_PATCH", "PYTHONPATH")}
    env.update(env_patch or {})
    out = subprocess.run([py] + (argv or ["-c", textwrap.dedent(code)]), env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_without_the_variable_the_hook_imports_nothing(hook_python):
    code = "import sys; print(sorted(m for m in ('fastbcast_autopatch', 'fastbcast', 'torch') if m in sys.modules))"
    assert _run(hook_python, code).stdout.strip() == "[]"
    # With it, only the hook's own module: no fastbcast, torch, sglang or verl until a target is imported.
    code = ("import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastbcast_autopatch', 'fastbcast', 'torch', 'sglang', 'verl')))")
    out = _run(hook_python, code, {"FASTBCAST_PATCH": "sglang,verl"})
    assert out.stdout.strip() == "['fastbcast_autopatch']"


def test_variable_values():
    import fastbcast_autopatch as ap

    assert ap.requested("sglang") == ["sglang"]
    assert ap.requested(" Verl , sglang ") == ["sglang", "verl"]
    assert ap.requested("1") == ap.requested("all") == ["sglang", "verl"]
    assert ap.requested("0") == ap.requested("") == []


def test_unknown_names_are_reported_once_and_ignored(hook_python):
    out = _run(hook_python, "pass", {"FASTBCAST_PATCH": "sglang,vllm"})
    assert out.stderr.count("unknown integration(s) vllm") == 1


def test_triggers_are_the_integrations_defining_modules():
    import fastbcast_autopatch as ap
    import fastbcast.integrations.sglang as fb_sglang
    import fastbcast.integrations.verl as fb_verl

    assert ap.TRIGGERS["sglang"] == (fb_sglang.DEFINING_MODULE, fb_sglang.__name__)
    assert ap.TRIGGERS["verl"] == (fb_verl.DEFINING_MODULE, fb_verl.__name__)


def test_a_failing_patch_never_breaks_the_import(hook_python, tmp_path):
    # A fake "sglang" whose common module lacks the function: the import succeeds, stderr says why.
    pkg = tmp_path / "sglang" / "srt" / "utils"
    pkg.mkdir(parents=True)
    for d in (tmp_path / "sglang", tmp_path / "sglang" / "srt", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "common.py").write_text("X = 1\n")
    code = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import sglang.srt.utils.common as c; print(c.X)"
    out = _run(hook_python, code, {"FASTBCAST_PATCH": "sglang"})
    assert out.stdout.strip() == "1"
    assert "could not patch sglang" in out.stderr and "broadcast_pyobj" in out.stderr


def test_the_variable_reaches_every_scheduler_process(hook_python):
    H.require("sglang")
    out = _run(hook_python, None, {"FASTBCAST_PATCH": "sglang"}, timeout=600,
               argv=[os.path.join(TESTS, "autopatch_probes.py")])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    procs = (res["tp"] + res["pp"] + res["dp_attention"] + res["dp_controller"]["schedulers"]
             + [res["subprocess"], res["ray_actor"]["grandchild"], res["plugin"]])
    assert len({p["pid"] for p in procs} | {res["parent_pid"]}) == len(procs) + 1   # all distinct processes
    for p in procs:
        assert p["patched"], p
        assert p["loader"] == "SourceFileLoader", p
    for p in procs[:-1]:
        assert p["variable"] == "sglang", p
    assert res["plugin"]["variable"] is None   # patched through SGLang's plugin hook alone
    assert [(p["pp_rank"], p["tp_rank"]) for p in res["tp"] + res["pp"]] == [(0, 0), (0, 1), (1, 0)]
    assert "sglang.srt.managers.scheduler_pp_mixin" in res["pp"][0]["modules"]
    assert [p["dp_rank"] for p in res["dp_controller"]["schedulers"]] == [0]
    assert [p["dp_rank"] for p in res["dp_attention"]] == [0]
    assert res["ray_actor"]["actor_variable"] == "sglang"
