"""`python -m fastbcast.info`: what this fastbcast was built with and runs on."""
from __future__ import annotations

import platform
import sys


def collect() -> dict:
    import torch

    from . import _build_info, codec
    from ._loader import _C
    from ._version import FORMAT_VERSION, __version__
    from .broadcast import DEFAULT_CHUNK, DEFAULT_FIRST_CHUNK, DEFAULT_FIRST_CHUNKS, DEFAULT_TRANSPORT, DROP_IN_ALLOW_PICKLE

    cuda = torch.cuda.is_available()
    nccl = None
    if cuda and torch.distributed.is_nccl_available():
        try:
            nccl = ".".join(str(x) for x in torch.cuda.nccl.version())
        except Exception:  # noqa: BLE001 - informational only
            nccl = "available"
    build = _C.build_info()
    return {
        "fastbcast": __version__,
        "format_version": FORMAT_VERSION,
        "python": platform.python_version(),
        "built_against_torch": _build_info.TORCH_VERSION,
        "built_against_cuda": _build_info.TORCH_CUDA,
        "running_torch": torch.__version__,
        "build": "CUDAExtension" if build["with_cuda"] else "CppExtension",
        "sanitize": build["sanitize"],
        "cuda_available": cuda,
        "cuda_devices": torch.cuda.device_count() if cuda else 0,
        "nccl": nccl,
        "gloo": torch.distributed.is_gloo_available(),
        "first_chunk": DEFAULT_FIRST_CHUNK or DEFAULT_FIRST_CHUNKS,
        "transport": DEFAULT_TRANSPORT,
        "chunk": DEFAULT_CHUNK,
        "drop_in_allow_pickle": DROP_IN_ALLOW_PICKLE,
        "pool": codec.pool_stats(),
        "max_depth": build["max_depth"],
        "int_block_min": build["int_block_min"],
    }


def main() -> int:
    info = collect()
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
