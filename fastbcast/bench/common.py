"""Helpers shared by the benchmarks: strict equality, machine facts, fastbcast lookup."""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import socket
import sys
from typing import Any, Optional, Tuple

_SCALARS = (int, float, str, bytes, bool, type(None))


def same(a: Any, b: Any) -> bool:
    """True if ``b`` is an exact copy of ``a``: same types all the way down.

    Stricter than ``==``: a tuple is not a list, 1 is not 1.0 or True, and a
    tensor must match in dtype, shape, values and device type (the device
    index may differ: receivers get tensors on their own GPU). Lists of
    scalars are compared with one ``==`` after checking the types of their
    first and last elements, which keeps multi-million-element token lists
    cheap to check.
    """
    ta = type(a)
    if ta is not type(b):
        return False
    if ta is list or ta is tuple:
        if len(a) != len(b):
            return False
        if not a:
            return True
        t0, t1 = type(a[0]), type(a[-1])
        if t0 in _SCALARS and t1 in _SCALARS and t0 is not float and t1 is not float:
            return type(b[0]) is t0 and type(b[-1]) is t1 and a == b
        return all(same(x, y) for x, y in zip(a, b))
    if ta is dict:
        if len(a) != len(b) or list(a) != list(b):
            return False
        return all(same(v, b[k]) for k, v in a.items())
    if ta is float:
        return a == b or (math.isnan(a) and math.isnan(b))
    if ta in (set, frozenset):
        return a == b
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    mod = ta.__module__
    if mod.startswith("torch"):
        import torch
        if isinstance(a, torch.Tensor):
            if a.dtype != b.dtype or a.shape != b.shape or a.device.type != b.device.type:
                return False
            return bool(torch.equal(a.cpu(), b.cpu()))
    if mod == "numpy":
        import numpy as np
        if isinstance(a, np.ndarray):
            return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    return bool(a == b)


def to_cpu(obj: Any) -> Any:
    """A copy of ``obj`` with every CUDA tensor moved to the host (containers rebuilt)."""
    t = type(obj)
    if t is list:
        return [to_cpu(x) for x in obj]
    if t is tuple:
        return tuple(to_cpu(x) for x in obj)
    if t is dict:
        return {k: to_cpu(v) for k, v in obj.items()}
    if t.__module__.startswith("torch"):
        import torch
        if isinstance(obj, torch.Tensor) and obj.device.type != "cpu":
            return obj.cpu()
    return obj


def has_cuda_tensors(obj: Any) -> bool:
    t = type(obj)
    if t is list or t is tuple:
        return any(has_cuda_tensors(x) for x in obj)
    if t is dict:
        return any(has_cuda_tensors(v) for v in obj.values())
    if t.__module__.startswith("torch"):
        import torch
        return isinstance(obj, torch.Tensor) and obj.device.type != "cpu"
    return False


def fastbcast_api(*names: str) -> Tuple[Optional[Any], Optional[str]]:
    """(the fastbcast module, None) if it imports and has ``names``; else (None, why)."""
    try:
        import fastbcast
    except Exception as e:  # the extension is not built, or was built for another torch
        return None, "import fastbcast failed: %s: %s" % (type(e).__name__, e)
    missing = [n for n in names if not callable(getattr(fastbcast, n, None))]
    if missing:
        return None, "fastbcast has no %s (not implemented in this build yet)" % ", ".join(missing)
    return fastbcast, None


def register_structs(fb: Any) -> None:
    """Registers the sched_structs classes with fastbcast so it may rebuild them."""
    from .payloads import STRUCT_CLASSES

    reg = getattr(fb, "register", None)
    if reg is None:
        return
    for cls in STRUCT_CLASSES:
        try:
            reg(cls)
        except Exception:  # already registered, or the enum is handled by its members' class
            pass


def machine_info() -> dict:
    """Facts about this machine for the JSON record."""
    import torch

    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu_count": 0,
        "gpu_name": None,
    }
    try:
        if torch.cuda.is_available():
            info["gpu_count"] = torch.cuda.device_count()
            info["gpu_name"] = torch.cuda.get_device_name(0)
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:
        pass
    fb, _ = fastbcast_api()
    if fb is not None:
        info["fastbcast"] = getattr(fb, "__version__", None)
    for mod in ("msgspec", "ormsgpack", "msgpack"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", None) or ".".join(map(str, getattr(m, "version", ())))
        except Exception:
            info[mod] = None
    return info


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def fmt_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if x < 1024 or unit == "GiB":
            return ("%d %s" % (x, unit)) if unit == "B" else ("%.1f %s" % (x, unit))
        x /= 1024
    return str(n)
