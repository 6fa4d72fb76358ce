"""Loads fastbcast._C after checking it was built against the running torch.

The extension links against torch's C++ ABI, which changes between releases;
loading it into another torch fails deep in the dynamic loader with an
undefined symbol. Checking the version recorded at build time first turns that
into a sentence.
"""
import torch

try:
    from . import _build_info
except ImportError as e:  # pragma: no cover - only in a source tree never built
    raise ImportError(
        "fastbcast's C++ extension has not been built: run `make build` "
        "(or `pip install --no-build-isolation -e .`) first") from e


def _same_build(a, b):
    return a.split("+")[0].split(".")[:2] == b.split("+")[0].split(".")[:2] and \
        ("+" in a) == ("+" in b) and a.partition("+")[2] == b.partition("+")[2]


if not _same_build(_build_info.TORCH_VERSION, torch.__version__):
    raise ImportError(
        f"fastbcast was built against torch {_build_info.TORCH_VERSION}, running torch "
        f"{torch.__version__}; rebuild it with `pip install --no-build-isolation --force-reinstall .`")

from . import _C  # noqa: E402

__all__ = ["_C"]
