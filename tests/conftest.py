"""pytest configuration shared by the tests.

tests/ has no __init__.py: test modules import the multi-process helper as
``from distributed import run_distributed``, so tests/ goes on sys.path, and
so does the repository root, so ``import fastbcast`` finds the source tree.
(Spawned ranks get both through run_distributed, which ships sys.path and
sets PYTHONPATH for them.)
"""
import os
import sys

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
_REPO_ROOT = os.path.dirname(_TESTS_DIR)

for _p in (_REPO_ROOT, _TESTS_DIR):
    if _p not in sys.path:
        sys.path.insert(0, _p)
