"""The broadcast methods fastbcast is measured against.

Every function here is called on every rank of ``group`` with the same
arguments except ``obj`` (only the source's is read) and returns the object the
source sent. ``rank`` and ``src`` are global ranks. ``device`` is where the
bytes travel: ``torch.device("cpu")`` for gloo, the rank's CUDA device for NCCL.

- ``pickle_broadcast_pyobj``: the design fastbcast replaces (SGLang's
  ``broadcast_pyobj``): pickle, a size broadcast, a byte broadcast, a blocking
  ``.item()`` on receivers, a pageable ``.cpu()``, the bytes through numpy.
- ``object_list_broadcast``: ``torch.distributed.broadcast_object_list``.
- ``msgspec_broadcast``: msgspec MessagePack with two broadcasts (size, then
  bytes) over reused buffers, pinned with non-blocking copies on CUDA: the best
  one can do in pure Python.
- ``VllmMessageQueue``: vLLM's shared-memory ``MessageQueue``
  (``vllm.distributed.device_communicators.shm_broadcast``), created the way
  vLLM creates it for a TP group: ``create_from_process_group(cpu_group,
  1 << 22, 6)``, a ring of 6 chunks of 4 MiB, over a gloo group. Optional:
  ``vllm_unavailable()`` says why it cannot run.
- ``floor_device`` / ``floor_pinned`` / ``floor_cpu``: the transport alone. They
  take a byte count instead of an object and move that many bytes in buffers
  allocated on first use and reused afterwards (``release_buffers()`` frees
  them). On gloo only ``floor_cpu`` applies.
"""
from __future__ import annotations

import pickle
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = [
    "pickle_broadcast_pyobj", "object_list_broadcast", "msgspec_broadcast",
    "VllmMessageQueue", "vllm_unavailable", "numpy_missing",
    "floor_device", "floor_pinned", "floor_cpu", "floor_check", "release_buffers",
]


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


# ------------------------------------------------------------------- pickle design

def pickle_broadcast_pyobj(obj: Any, rank: int, group=None, src: int = 0, device=None) -> Any:
    """Pickle -> uint8 tensor -> broadcast(size) -> broadcast(bytes) -> unpickle.

    An empty list goes out as size 0 and comes back as ``[]`` on receivers.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if rank == src:
        if isinstance(obj, list) and not obj:
            dist.broadcast(torch.zeros(1, dtype=torch.long, device=device), src=src, group=group)
            return obj
        raw = pickle.dumps(obj)
        payload = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)
        size = torch.tensor([len(raw)], dtype=torch.long, device=device)
        dist.broadcast(size, src=src, group=group)
        dist.broadcast(payload, src=src, group=group)
        return obj
    size = torch.zeros(1, dtype=torch.long, device=device)
    dist.broadcast(size, src=src, group=group)
    n = int(size.item())
    if n == 0:
        return []
    payload = torch.empty(n, dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=src, group=group)
    return pickle.loads(_host_bytes(payload.cpu()))


def numpy_missing() -> Optional[str]:
    """None when numpy works with torch; else a one-line note saying what changes without it."""
    global _NUMPY_NOTE
    if _NUMPY_NOTE is None:
        try:
            torch.zeros(1, dtype=torch.uint8).numpy()
            _NUMPY_NOTE = ""
        except Exception as e:  # torch raises RuntimeError("Numpy is not available")
            _NUMPY_NOTE = ("numpy is unavailable (%s): the pickle design reads its bytes through "
                           "the tensor's storage instead of numpy, and msgspec is skipped "
                           "(pip install numpy)" % str(e).strip())
    return _NUMPY_NOTE or None


_NUMPY_NOTE: Optional[str] = None


def _host_bytes(t: torch.Tensor) -> bytes:
    # SGLang's receivers go through numpy; without numpy the storage gives
    # the same bytes (a fresh tensor owns exactly its storage).
    if numpy_missing():
        return bytes(t.untyped_storage())
    return t.numpy().tobytes()


# ----------------------------------------------------------- broadcast_object_list

def object_list_broadcast(obj: Any, rank: int, group=None, src: int = 0, device=None) -> Any:
    """``torch.distributed.broadcast_object_list`` on a one-element list."""
    box = [obj if rank == src else None]
    dist.broadcast_object_list(box, src=src, group=group,
                               device=torch.device(device) if _is_cuda(device) else None)
    return box[0]


# ------------------------------------------------------------------------ msgspec

class _MsgspecState:
    """Per-device codec objects and buffers reused across calls."""

    def __init__(self, device: torch.device):
        import msgspec

        self.msgspec = msgspec
        self.device = device
        self.cuda = device.type == "cuda"
        self.encoder = msgspec.msgpack.Encoder()
        self.decoders: Dict[Any, Any] = {}
        self.out = bytearray()  # the source encodes into this
        self.host = torch.empty(0, dtype=torch.uint8)  # receive / staging buffer
        self.dev = torch.empty(0, dtype=torch.uint8, device=device)
        self.size_host = torch.zeros(1, dtype=torch.long, pin_memory=self.cuda)
        self.size_dev = torch.zeros(1, dtype=torch.long, device=device)

    def decoder(self, typ):
        dec = self.decoders.get(typ)
        if dec is None:
            dec = self.decoders[typ] = (self.msgspec.msgpack.Decoder(typ) if typ is not None
                                        else self.msgspec.msgpack.Decoder())
        return dec

    def host_buffer(self, n: int) -> torch.Tensor:
        if self.host.numel() < n:
            self.host = torch.empty(max(n, 2 * self.host.numel()), dtype=torch.uint8,
                                    pin_memory=self.cuda)
        return self.host[:n]

    def dev_buffer(self, n: int) -> torch.Tensor:
        if self.dev.numel() < n:
            self.dev = torch.empty(max(n, 2 * self.dev.numel()), dtype=torch.uint8, device=self.device)
        return self.dev[:n]


_MSGSPEC: Dict[str, _MsgspecState] = {}


def msgspec_broadcast(obj: Any, rank: int, group=None, src: int = 0, device=None,
                      msgspec_type: Optional[type] = None) -> Any:
    """msgspec MessagePack, size broadcast then byte broadcast, reused buffers.

    On CUDA the bytes go pinned host -> device with non-blocking copies, and
    back device -> pinned host before decoding. ``msgspec_type`` is the type to
    decode into (plain types when None).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    st = _MSGSPEC.get(str(device))
    if st is None:
        st = _MSGSPEC[str(device)] = _MsgspecState(device)
    if rank == src:
        st.encoder.encode_into(obj, st.out)
        n = len(st.out)
        raw = torch.frombuffer(st.out, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
        if st.cuda:
            st.size_host[0] = n
            st.size_dev.copy_(st.size_host, non_blocking=True)
            staging = st.host_buffer(n)
            staging.copy_(raw)
            dev = st.dev_buffer(n)
            dev.copy_(staging, non_blocking=True)
            dist.broadcast(st.size_dev, src=src, group=group)
            dist.broadcast(dev, src=src, group=group)
            # The pinned staging buffer is reused next call: don't let it be
            # overwritten while the H2D copy may still be reading it.
            torch.cuda.current_stream(device).synchronize()
        else:
            st.size_host[0] = n
            dist.broadcast(st.size_host, src=src, group=group)
            dist.broadcast(raw, src=src, group=group)
        return obj
    if st.cuda:
        dist.broadcast(st.size_dev, src=src, group=group)
        st.size_host.copy_(st.size_dev, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()
        n = int(st.size_host[0])
        dev = st.dev_buffer(n)
        dist.broadcast(dev, src=src, group=group)
        host = st.host_buffer(n)
        host.copy_(dev, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()
    else:
        dist.broadcast(st.size_host, src=src, group=group)
        n = int(st.size_host[0])
        host = st.host_buffer(n)
        dist.broadcast(host, src=src, group=group)
    return st.decoder(msgspec_type).decode(memoryview(host.numpy()))


# ------------------------------------------------------------- vLLM MessageQueue

_VLLM_MODULE = "vllm.distributed.device_communicators.shm_broadcast"


def vllm_unavailable() -> Optional[str]:
    """None if vLLM's MessageQueue imports here; else why not, in one line.

    vLLM picks a platform when the module is imported; the benchmark moves
    host bytes only, so the CPU platform is selected (VLLM_TARGET_DEVICE=cpu)
    unless the caller set that variable, which also keeps vLLM's CUDA
    extensions from loading on a GPU machine.
    """
    import importlib
    import os

    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    try:
        importlib.import_module(_VLLM_MODULE)
    except Exception as e:
        return "%s does not import (%s: %s); see requirements-bench-vllm.txt" % (
            _VLLM_MODULE, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    return None


class VllmMessageQueue:
    """vLLM's shared-memory MessageQueue over ``group``, one writer: ``src``.

    Created on the first call (a collective of the whole group), the way
    vLLM's GroupCoordinator creates its ``mq_broadcaster``: a ring of 6 chunks
    of 4 MiB; larger objects go over its zmq socket, as in vLLM. Every call is
    ``MessageQueue.broadcast_object``.
    """

    def __init__(self, group, src: int):
        self.group = group
        self.src = src
        self.mq = None

    def __call__(self, obj: Any) -> Any:
        if self.mq is None:
            mod = __import__(_VLLM_MODULE, fromlist=["MessageQueue"])
            writer = dist.get_process_group_ranks(self.group).index(self.src)
            self.mq = mod.MessageQueue.create_from_process_group(
                self.group, 1 << 22, 6, writer_rank=writer)
        return self.mq.broadcast_object(obj)

    def close(self) -> None:
        mq, self.mq = self.mq, None
        if mq is not None:
            mq.shutdown()


# ------------------------------------------------------------------------- floors

_FLOOR: Dict[Tuple, Dict[str, torch.Tensor]] = {}


def _pattern(n: int) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.int64) % 251).to(torch.uint8)


def _floor_buffers(kind: str, nbytes: int, rank: int, src: int, device) -> Dict[str, torch.Tensor]:
    key = (kind, nbytes, str(device))
    bufs = _FLOOR.get(key)
    if bufs is not None:
        return bufs
    is_src = rank == src
    if kind == "cpu":
        bufs = {"out": _pattern(nbytes) if is_src else torch.zeros(nbytes, dtype=torch.uint8)}
    elif kind == "device":
        bufs = {"out": (_pattern(nbytes).to(device) if is_src
                        else torch.zeros(nbytes, dtype=torch.uint8, device=device))}
    else:  # pinned
        bufs = {"dev": torch.empty(nbytes, dtype=torch.uint8, device=device),
                "out": torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True)}
        if is_src:
            bufs["out"].copy_(_pattern(nbytes))
    _FLOOR[key] = bufs
    return bufs


def floor_cpu(nbytes: int, rank: int, group=None, src: int = 0, device=None) -> torch.Tensor:
    """One broadcast of a pre-allocated CPU buffer of ``nbytes`` (the gloo floor)."""
    buf = _floor_buffers("cpu", nbytes, rank, src, "cpu")["out"]
    dist.broadcast(buf, src=src, group=group)
    return buf


def floor_device(nbytes: int, rank: int, group=None, src: int = 0, device=None) -> torch.Tensor:
    """One NCCL broadcast of a pre-allocated device buffer of ``nbytes``, device to device.

    Returns once the broadcast is enqueued; the caller synchronizes the device.
    """
    buf = _floor_buffers("device", nbytes, rank, src, device)["out"]
    dist.broadcast(buf, src=src, group=group)
    return buf


def floor_pinned(nbytes: int, rank: int, group=None, src: int = 0, device=None) -> torch.Tensor:
    """Pinned host -> device -> NCCL broadcast -> device -> pinned host, pre-allocated.

    Returns after the device-to-host copy has completed.
    """
    bufs = _floor_buffers("pinned", nbytes, rank, src, device)
    dev, host = bufs["dev"], bufs["out"]
    if rank == src:
        dev.copy_(host, non_blocking=True)
        dist.broadcast(dev, src=src, group=group)
    else:
        dist.broadcast(dev, src=src, group=group)
        host.copy_(dev, non_blocking=True)
    torch.cuda.current_stream(dev.device).synchronize()
    return host


def floor_check(result: torch.Tensor) -> bool:
    """True if a floor's received buffer holds the source's byte pattern."""
    return bool(torch.equal(result.cpu(), _pattern(result.numel())))


def release_buffers() -> None:
    """Drops the floors' and msgspec's cached buffers."""
    _FLOOR.clear()
    _MSGSPEC.clear()
