"""Streamed frames: a large top-level list, tuple or dict in segments.

The source encodes the container's items into messages of about
`stream_bytes` each (FORMAT.md section 3.1) and sends every message as soon
as it is written, while it encodes the next; each receiver decodes message k
while message k+1 is in flight. One encoder (decoder) state spans the whole
stream, so classes and shared references work across segments.

* Collective transport: message 0 travels as a frame does; every later
  message moves in a first collective of exactly `segment_bytes` (posted by
  receivers before they decode the message before it) and, for a message
  longer than that, collectives of `chunk` bytes. The source keeps at most
  two messages in flight. gloo moves bytes in its own threads, so encoding
  (decoding) in this thread overlaps them; NCCL stages them through two
  device slots with asynchronous copies.
* Shared memory: each message is one ring message; the ring holds up to
  its slot count of them ahead of the slowest reader.

On shared memory, and on the collective of a CPU group (gloo), the whole
stream is one C++ call on each side (ShmChannel / CollectiveChannel
send_object, and recv_object / recv_stream: csrc/python_api.cpp), the same
protocol without Python between messages. This module's loops below carry
it on NCCL (device staging) and whenever the C++ channel is off
(transport.ONE_CALL).

A frame that is not such a container, or whose encoding fits in one
segment, is an ordinary frame, sent as before. Failures keep their meaning:
a source that fails mid-stream sends an error segment (every receiver raises
BroadcastError), a receiver past its max_bytes or unable to decode a segment
receives the rest of the stream before it raises, so no rank is left
waiting and the next call works. Following needs no message whole: message
0's prologue and each later message's segment header say how long every
message is, so a receiver past its max_bytes (even in message 0) drains
the rest in pieces of at most a chunk.

A receiver holds at most one segment and one chunk beyond the decoded
object (FORMAT.md 3.1): a message longer than a segment, whose one item is,
is the exception; it is held whole while it decodes.
"""
from __future__ import annotations

import collections
import os

import torch

from ._loader import _C
from .mesh import Route
from .transport import (CHANNEL_ERRORS, CollectiveTransport, ShmTransport, TransportError, _host, _left, _to_host,
                        post_bcast, raise_channel_failure, shm_geometry, wait)

__all__ = ["DEFAULT_STREAM_BYTES", "encode", "send_rest", "receive"]

#: Bytes of each message of a streamed frame (FASTBCAST_STREAM_BYTES; 0 turns
#: streaming off). Only a container whose encoding passes it is streamed.
#: 256 KiB: on the GPU machine's CPUs it beat 1 MiB on rollout_64x1k over
#: both transports and matched it on rollout_256x4k (BENCHMARKS.md, 5a).
DEFAULT_STREAM_BYTES = int(os.environ.get("FASTBCAST_STREAM_BYTES") or (256 << 10))


def encode(b, obj, version: int, min_capacity: int) -> tuple:
    """Source: the frame of `obj` for Broadcaster `b`, or message 0 of its
    stream (a list (not of ints), tuple or dict of two items or more whose
    encoding passes the segment size). Returns (block, nbytes, cuda_tensors,
    device_len, encoder): the encoder of the messages still to send, or None
    for an ordinary frame."""
    segment = b._stream_segment
    if segment is None:
        segment = b.stream_bytes
        if isinstance(b._transport, ShmTransport):
            segment = min(segment, shm_geometry()[1])   # a message per slot: readers decode it in place
        b._stream_segment = segment
    return _C.encode_frame_or_stream(obj, segment, b.first_chunk, b.chunk, version, b._state.seq, b.compat,
                                     b.allow_pickle, b.device.type == "cuda", min_capacity, b.trusted)


def send_rest(b, enc, sent: int, route: Route, deadline) -> None:
    """Source, collective transport without a C++ channel (NCCL): every
    message after message 0 (already sent, `sent` bytes counted against
    max_bytes)."""
    pipe = _CollectiveSource(_collective(b._transport), route, deadline, enc.segment_bytes)
    while True:
        made = False
        try:
            block, used, cuda_tensors, device_len, last = enc.next()
            made = True
            sent += used + device_len
            if sent > b.max_bytes:
                del block, cuda_tensors
                raise over_max_bytes(b, sent, last)
        except BaseException as e:
            # A segment made but over max_bytes is not sent: the error
            # segment takes its index, as receivers expect.
            block, used = enc.error_segment(encode_failure(route, e), made)
            pipe.send(block, used)
            pipe.finish()
            b._told_receivers = True   # in step: the group stays usable (Ctrl-C included)
            raise
        pipe.send(block, used)
        if device_len:
            pipe.send_device(_C.pack_device(cuda_tensors, device_len, b.device))
        if last:
            break
    pipe.finish()


def over_max_bytes(b, sent: int, last: bool) -> ValueError:
    """The source's error once its stream's messages pass its max_bytes."""
    return ValueError(f"the object encodes to {'' if last else 'more than '}{sent} bytes, over this Broadcaster's "
                      f"max_bytes={b.max_bytes} (Broadcaster(max_bytes=) / FASTBCAST_MAX_BYTES); the stream was cut "
                      f"off")


def encode_failure(route: Route, e: BaseException) -> str:
    """The text of the error segment that ends a failed source's stream."""
    return f"source (global rank {route.src}) failed to encode: {type(e).__name__}: {e}"


def receive(b, t, frame: torch.Tensor, header: tuple, route: Route, deadline, error: type, chunk: int | None = None):
    """Receiver, collective transport: the object of a frame with FLAG_STREAM (message 0 in
    `frame`, or only its first STREAM_PREFIX_BYTES when it alone is over
    max_bytes). Follows the whole stream whatever happens; then raises the
    first failure: `error` with the source's message for an error segment
    or a stream over max_bytes, the DecodeError of a segment that did not
    decode. Once a failure is known the messages after it are drained, not
    kept: max_bytes is checked against each message's length before its
    bytes are received.

    b None: the stream is refused before it starts (the source's `chunk`
    differs from this rank's); it is only followed to its LAST segment,
    nothing kept or decoded, so the source finishes and the ranks stay in
    step. Returns None then."""
    payload_len = header[3]
    try:
        dec = _C.StreamDecoder(frame, payload_len, b is not None and b.allow_pickle, () if b is None else b.trusted)
    except ValueError as e:
        raise _corrupt(route, e) from e
    ch = _collective(t).inline_channel(route, deadline) if b is not None else None
    if ch is not None:
        try:   # the same loop in C++ (CollectiveChannel.recv_stream)
            return ch.recv_stream(dec, frame, b.max_bytes, chunk or 0, _left(deadline), b, route, deadline)
        except CHANNEL_ERRORS as e:
            raise_channel_failure(e, deadline, "a stream message")
    sink = _CollectiveSink(_collective(t), route, deadline, dec.segment_bytes, frame, chunk)
    failure, over, error_end = None, b is None, False
    limit = b.max_bytes if b is not None else 0
    got = -_C.HEADER_BYTES
    buf, first = frame, True    # message 0 came as a frame: whole, or (over max_bytes) drained
    while True:
        try:
            msg_len, device_len, flags = dec.segment(buf)
        except ValueError as e:
            raise _corrupt(route, e) from e
        following = failure is None and not over
        fits = got + msg_len + device_len <= limit
        if not first and buf.numel() < msg_len:
            buf = sink.rest(buf, msg_len, following and fits)
        device_buffer = sink.device(device_len) if flags & _C.SEG_CUDA else None
        got += msg_len + device_len
        last = flags & _C.SEG_LAST
        if not last:
            sink.post()     # the next message moves while this one is decoded
        error_end = bool(flags & _C.SEG_ERROR)
        if following:
            if error_end:
                failure = failure_of(b, route, "error", dec.error_text(buf), error)
            elif not fits:
                over = True
            else:
                try:
                    dec.decode(buf, device_buffer)
                except Exception as e:  # noqa: BLE001 - raised once the stream is over
                    failure = e
        if last:
            break
        buf, first = sink.take(), False
    if b is None:
        return None
    if over:
        # Followed to its end, the stream's size is known, unless the
        # source cut it off with an error segment.
        failure = failure_of(b, route, "max_bytes", None if error_end else got, error)
    if failure is not None:
        try:
            raise failure
        finally:
            # This frame is in the traceback: a local still naming the
            # exception would make a cycle that keeps the frame's buffers
            # and the Broadcaster (its process group) alive until the
            # cyclic GC runs; left to interpreter exit, after
            # destroy_process_group, gloo then sometimes aborts the process.
            failure = None
    return dec.result()


def failure_of(b, route: Route, kind: str, detail, error: type) -> Exception:
    """What a receiver raises once a stream is over: kind "error" (the
    source's error segment; detail: its text), "max_bytes" (detail: the
    stream's size, or None when the source cut it off with an error segment)
    or "corrupt" (a segment header that makes no sense; detail: why)."""
    if kind == "error":
        return error(detail)
    if kind == "max_bytes":
        size = f"more than {b.max_bytes}" if detail is None else str(detail)
        return error(
            f"the source (global rank {route.src}) sent a stream of {size} bytes, over this rank's (global rank "
            f"{route.rank}) max_bytes={b.max_bytes} (Broadcaster(max_bytes=) / FASTBCAST_MAX_BYTES); it was "
            f"received and dropped. Configure every rank alike.")
    return _corrupt(route, detail)


def _corrupt(route: Route, e) -> TransportError:
    return TransportError(f"global rank {route.rank} received a corrupt stream segment from global rank "
                          f"{route.src}: {e}")


# ---------------------------------------------------------------------------
# Where the messages after message 0 move
# ---------------------------------------------------------------------------

def _collective(t):
    # A ShmTransport here has no ring for this source: its collective
    # carries the stream (on a ring, ShmChannel's C++ calls carry it).
    return t.collective if isinstance(t, ShmTransport) else t


class _CollectiveSource:
    """Source over the group's collective: each message's collectives are
    posted without waiting, at most two messages in flight."""

    def __init__(self, t: CollectiveTransport, route: Route, deadline, segment: int):
        self.t, self.route, self.deadline, self.segment = t, route, deadline, segment
        self.inflight = collections.deque()     # (host block, works, H2D event)
        self.slots = [None, None]               # NCCL: device staging, one per message in flight
        self.n = 0

    def send(self, block: torch.Tensor, nbytes: int) -> None:
        _left(self.deadline)     # past the call's timeout (an encode took it) nothing more is posted
        if len(self.inflight) >= 2:
            self._finish_one()   # the oldest message; its device slot is the one this message takes
        buf, event = block, None
        if self.t.cuda:
            j = self.n % 2
            need = max(nbytes, self.segment)
            if self.slots[j] is None or self.slots[j].numel() < need:
                self.slots[j] = torch.empty(need, dtype=torch.uint8, device=self.t.device)
            buf = self.slots[j]
            buf[:nbytes].copy_(block[:nbytes], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self.n += 1
        # The first collective moves segment_bytes whatever the message's
        # length: receivers post it before they know that length.
        s, c = self.segment, self.t.chunk
        works = [post_bcast(buf[:s], self.route, "a stream message")]
        for off in range(s, nbytes, c):
            _left(self.deadline)     # posting many small chunks takes time too: the timeout bounds it
            works.append(post_bcast(buf[off:min(off + c, nbytes)], self.route, "a stream message"))
        self.inflight.append((block, works, event))

    def send_device(self, buf: torch.Tensor) -> None:
        self.t.send_device(buf, self.route, self.deadline)

    def _finish_one(self) -> None:
        block, works, event = self.inflight.popleft()
        for w in works:
            wait(w, self.deadline, "a stream message")
        if event is not None:
            event.synchronize()     # the host block has been read; it may go back to the pool

    def finish(self) -> None:
        while self.inflight:
            self._finish_one()


class _CollectiveSink:
    """Receiver over the group's collective. The next message's first
    collective (segment_bytes) is posted into the other of two buffers
    before this one is decoded; message 0's buffer (the transport's kept
    receive buffer) is one of the two, so a stream of messages within a
    segment holds one segment buffer more than a plain frame would. With
    chunk < segment that second buffer would pass the bound of one segment
    plus one chunk (FORMAT.md 3.1): then the next message is posted only
    once this one is decoded, into the same buffer."""

    def __init__(self, t: CollectiveTransport, route: Route, deadline, segment: int, first: torch.Tensor,
                 chunk: int | None = None):
        self.t, self.route, self.deadline, self.segment = t, route, deadline, segment
        self.chunk = chunk or t.chunk     # the source's: a message past its segment comes in these
        self.ahead = t.chunk >= segment
        reuse = first if first.numel() >= segment else None
        self.host = [None, reuse]       # message 0 is decoded while message 1 moves into host[0]
        self.dev = [None, None]
        self.n = 0
        self.pending = None

    def _post(self) -> None:
        j = self.n % 2 if self.ahead else 1
        self.n += 1
        if self.host[j] is None:
            self.host[j] = _host(self.segment)
        target = self.host[j]
        if self.t.cuda:
            if self.dev[j] is None:
                self.dev[j] = torch.empty(self.segment, dtype=torch.uint8, device=self.t.device)
            target = self.dev[j]
        self.pending = (j, post_bcast(target[:self.segment], self.route, "a stream message"))

    def post(self) -> None:
        if self.ahead:
            self._post()

    def take(self) -> torch.Tensor:
        if not self.ahead:
            self._post()
        j, work = self.pending
        self.pending = None
        wait(work, self.deadline, "a stream message")
        if self.t.cuda:
            _to_host(self.dev[j], self.host[j], 0, self.segment)
        return self.host[j][:self.segment]     # all a message longer than the segment has in it so far

    def rest(self, buf: torch.Tensor, msg_len: int, keep: bool) -> torch.Tensor:
        """A message longer than a segment (its one item is), given its
        first collective's bytes: whole if `keep`, else followed to its end
        and dropped (the segment header is all that is left)."""
        s = self.segment
        if not keep:
            self.t.receive(None, s, msg_len, 0, self.route, self.deadline, "stream message collective", self.chunk)
            return buf[:s]
        whole = _host(msg_len)
        whole[:s].copy_(buf[:s])
        self.t.receive(whole, s, msg_len, msg_len, self.route, self.deadline, "stream message collective",
                       self.chunk)
        return whole

    def device(self, nbytes: int) -> torch.Tensor:
        return self.t.recv_device(nbytes, self.route, self.deadline)
