"""`python -m fastbcast.info`, and the torch-mismatch check at import."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(code_or_args, **kw):
    args = [sys.executable] + (["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args)
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, **kw)


def test_info_prints_versions_and_pool():
    out = run(["-m", "fastbcast.info"])
    assert out.returncode == 0, out.stderr
    for key in ("fastbcast", "built_against_torch", "running_torch", "cuda_available", "nccl", "build", "pool",
                "first_chunk"):
        assert key in out.stdout
    import torch
    assert torch.__version__ in out.stdout


def test_import_with_another_torch_says_so():
    code = (
        "import sys, types\n"
        "fake = types.ModuleType('fastbcast._build_info')\n"
        "fake.TORCH_VERSION = '1.0.0+cu999'\n"
        "sys.modules['fastbcast._build_info'] = fake\n"
        "import fastbcast\n"
    )
    out = run(code)
    assert out.returncode != 0
    assert "ImportError: fastbcast was built against torch 1.0.0+cu999, running torch" in out.stderr, out.stderr
