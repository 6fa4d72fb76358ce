"""Streamed frames (FORMAT.md section 3.1): the codec's segments in one
process, then whole broadcasts over gloo on both transports (collective and
shared memory): segment boundaries, containers of every kind, a source that
fails mid-stream, a receiver with a smaller max_bytes (also smaller than
message 0), a source over its own max_bytes, and what a receiver holds
while it decodes."""
from __future__ import annotations

import dataclasses
import datetime
import gc
import time

import pytest
import torch

import fastbcast
from fastbcast import FORMAT_VERSION
from fastbcast._loader import _C

from distributed import requires_gpus, run_distributed

S = 4096            # stream_bytes of these tests: many segments from small objects
CHUNK = 8192        # collectives after a message's first S bytes


@dataclasses.dataclass
class Point:
    x: int
    y: list


fastbcast.register(Point)


class Unregistered:
    """Receivers would not rebuild it: the source refuses it (TypeError)."""


class SlowToEncode:
    """Its __reduce__ sleeps on the source: a source stalled mid-stream."""

    def __init__(self, delay):
        self.delay = delay

    def __reduce__(self):
        time.sleep(self.delay)
        return (SlowToEncode, (0,))


fastbcast.register(SlowToEncode)


class SourceOnly:
    """Registered on the source only: receivers refuse to decode it."""


class Interrupting:
    """Its __reduce__ raises KeyboardInterrupt: Ctrl-C in the source's encode."""

    def __reduce__(self):
        raise KeyboardInterrupt


fastbcast.register(Interrupting)


def _bin(total: int) -> bytes:
    """A new bytes object whose encoding is `total` bytes (bin 8/16/32
    header), the same on every rank."""
    for header in (2, 3, 5):
        n = total - header
        if (header == 2 and n < 256) or (header == 3 and 256 <= n < 65536) or (header == 5 and n >= 65536):
            return bytes([total % 251]) * n
    raise ValueError(total)


def _messages(obj, segment=S, **kw):
    """The source's messages for obj: (streaming, [bytes of each message])."""
    enc = _C.StreamEncoder(obj, segment, **kw)
    block, used, _, _, streaming = enc.first(4096, CHUNK, FORMAT_VERSION, 1, 0)
    return streaming, _drain(enc, block[:used]) if streaming else [block[:used].clone()]


def _drain(stream, first):
    """A stream's messages: `first`, then what stream.next() gives up to the last."""
    msgs = [first.clone()]
    while True:
        block, used, _, _, last = stream.next()
        msgs.append(block[:used].clone())
        if last:
            return msgs


def _decode(msgs, **kw):
    header = _C.read_header(msgs[0], FORMAT_VERSION)
    if not header[1] & _C.FLAG_STREAM:
        assert len(msgs) == 1
        return _C.decode_frame(msgs[0], header[3], **kw)
    dec = _C.StreamDecoder(msgs[0], header[3], **kw)
    for m in msgs:
        length, _, flags = dec.segment(m)
        assert length == m.numel()
        dec.decode(m)
    assert flags & _C.SEG_LAST
    return dec.result()


# Item sizes that put the later messages at the boundaries of the collective
# transport: a body of 1 and 2 bytes, a message of exactly S (the first
# collective), S + 1, S + CHUNK and S + CHUNK + 1 bytes.
def _boundary_items():
    seg = 32     # a segment header (FORMAT.md 3.1)
    return [None, _bin(S + 1 - seg), 7, _bin(S - seg), "x", _bin(S + CHUNK - seg), _bin(S + CHUNK + 1 - seg),
            [], {}, (), "tail"]


def test_boundary_messages_have_the_intended_lengths_and_round_trip():
    items = _boundary_items()
    streaming, msgs = _messages(items)
    assert streaming
    lengths = [m.numel() for m in msgs]
    assert lengths[1:7] == [S + 1, 33, S, 34, S + CHUNK, S + CHUNK + 1], lengths
    assert _decode(msgs) == items


@pytest.mark.parametrize("kind", [list, tuple, dict])
def test_every_container_kind_round_trips_in_many_segments(kind):
    rows = [{"id": i, "tokens": list(range(i % 50, i % 50 + 40)), "text": f"row {i} " * 5} for i in range(400)]
    obj = {f"k{i}": r for i, r in enumerate(rows)} if kind is dict else kind(rows)
    streaming, msgs = _messages(obj)
    assert streaming and len(msgs) > 5
    out = _decode(msgs)
    assert type(out) is kind and out == obj
    # Segments end between items: only a message with one item is longer than S.
    assert all(m.numel() <= S for m in msgs[:-1])


def test_classes_and_shared_objects_span_segments():
    shared = torch.arange(100)
    blob = bytes(range(250)) * 2
    obj = [Point(i, [shared if i % 7 == 0 else i, blob]) for i in range(2000)]
    streaming, msgs = _messages(obj)
    assert streaming and len(msgs) > 3
    out = _decode(msgs)
    assert [(p.x, p.y[1]) for p in out] == [(p.x, blob) for p in obj]
    # One object per memo slot, across segments, as in one frame.
    assert all(out[i].y[0] is out[0].y[0] for i in range(0, 2000, 7))
    assert all(out[i].y[1] is out[0].y[1] for i in range(2000))
    assert torch.equal(out[0].y[0], shared)


def test_small_containers_are_ordinary_frames_with_the_same_bytes():
    for obj in ([None, 1], ["a"] * 20, (1, "b", 2.5), {"a": 1, "b": [1, 2]}, [{"x": i} for i in range(100)],
                tuple(range(20000))):
        streaming, msgs = _messages(obj, segment=1 << 20)
        assert not streaming
        block, used, _, _ = _C.encode_frame(obj, 4096, CHUNK, FORMAT_VERSION, 1)
        assert bytes(msgs[0]) == bytes(block[:used]), obj
        assert _decode(msgs) == obj


def test_the_broadcast_entry_point_streams_only_large_containers():
    for obj in ([], [1], list(range(100)), "text", {"a": 1}, [{"x": i} for i in range(100)], [1, "a"] * 5000):
        block, used, _, _, stream = _C.encode_frame_or_stream(obj, 1 << 20, 4096, CHUNK, FORMAT_VERSION, 1)
        ref, ref_used, _, _ = _C.encode_frame(obj, 4096, CHUNK, FORMAT_VERSION, 1)
        assert stream is None and bytes(block[:used]) == bytes(ref[:ref_used])
    big = [{"x": i, "s": "y" * 100} for i in range(20000)]
    block, used, _, _, stream = _C.encode_frame_or_stream(big, 1 << 16, 4096, CHUNK, FORMAT_VERSION, 1)
    assert stream is not None and stream.segment_bytes == 1 << 16 and used <= 1 << 16
    assert _decode(_drain(stream, block[:used])) == big


def test_one_item_over_segment_bytes_is_an_ordinary_frame():
    obj = [_bin(3 * S)]
    streaming, msgs = _messages(obj)
    assert not streaming and _decode(msgs) == obj


def test_an_error_segment_ends_the_stream():
    obj = [_bin(S // 2) for _ in range(10)]
    enc = _C.StreamEncoder(obj, S)
    block, used, _, _, streaming = enc.first(4096, CHUNK, FORMAT_VERSION, 1, 0)
    assert streaming
    frame = block[:used].clone()
    dec = _C.StreamDecoder(frame, _C.read_header(frame, FORMAT_VERSION)[3])
    dec.segment(frame)
    dec.decode(frame)
    block, used = enc.error_segment("source failed: boom")
    _, _, flags = dec.segment(block[:used])
    assert flags & _C.SEG_ERROR and flags & _C.SEG_LAST
    assert dec.error_text(block[:used]) == "source failed: boom"
    with pytest.raises(fastbcast.DecodeError):
        dec.result()


def test_a_skipped_or_truncated_segment_is_refused():
    streaming, msgs = _messages([_bin(S // 2) for _ in range(10)])
    header = _C.read_header(msgs[0], FORMAT_VERSION)
    dec = _C.StreamDecoder(msgs[0], header[3])
    dec.segment(msgs[0])
    dec.decode(msgs[0])
    with pytest.raises(fastbcast.DecodeError, match="segment 2 arrived"):
        dec.segment(msgs[2])
    dec = _C.StreamDecoder(msgs[0], header[3])
    dec.segment(msgs[0])
    dec.decode(msgs[0])
    dec.segment(msgs[1])
    with pytest.raises(fastbcast.DecodeError, match="message of"):
        dec.decode(msgs[1][:-1])


def test_encode_errors_name_the_item():
    obj = [_bin(S // 2) for _ in range(10)] + [Unregistered()]
    enc = _C.StreamEncoder(obj, S)
    enc.first(4096, CHUNK, FORMAT_VERSION, 1, 0)
    with pytest.raises(TypeError, match=r"data\[10\]"):
        while not enc.next()[4]:
            pass


# ---------------------------------------------------------------------------
# Broadcasts over gloo, on both transports
# ---------------------------------------------------------------------------

def _rows(n: int, width: int = 200):
    return [{"rid": f"r{i}", "ids": list(range(i, i + width)), "score": i / 7} for i in range(n)]


def _loops(transport: str) -> str:
    """"collective-python": the collective transport with its Python stream
    loops (as on NCCL) instead of the C++ ones a CPU group gets."""
    if transport == "collective-python":
        from fastbcast import transport as tmod
        tmod.ONE_CALL = False
        return "collective"
    return transport


def _stream_run(rank, world, transport, device=None):
    import resource

    import fastbcast
    from fastbcast import Broadcaster, BroadcastError

    transport = _loops(transport)
    out = {}
    b = Broadcaster(transport=transport, stream_bytes=S, chunk=CHUNK, device=device)
    small = world - 1        # the receiver with a smaller max_bytes
    small_max = Broadcaster(transport=transport, stream_bytes=S, chunk=CHUNK, device=device,
                            max_bytes=3 * S if rank == small else None)

    def check(name, obj):
        got = b.broadcast(obj if rank == 0 else None, src=0)
        out[name] = got == obj and type(got) is type(obj)

    check("boundaries", _boundary_items())
    rows = _rows(300)
    check("list", rows)
    check("tuple", tuple(rows))
    check("dict", {r["rid"]: r for r in rows})
    check("empty", [])
    check("empty_dict", {})
    check("pair_of_empties", [[], {}])
    shared = [Point(i, [i]) for i in range(3)]
    got = b.broadcast([shared[i % 3] for i in range(600)] + [_bin(S)] * 3 if rank == 0 else None, src=0)
    out["refs"] = rank == 0 or (got[0] is got[3] and got[600] is got[602] and [p.x for p in got[:600]] ==
                                [i % 3 for i in range(600)])

    # A source that fails in segment 3 of 5: every receiver raises, the next call works.
    bad = [_bin(S // 2 - 64) for _ in range(10)]
    bad[6] = Unregistered()
    if rank == 0:
        try:
            b.broadcast(bad, src=0)
            out["fail_src"] = "no error"
        except TypeError as e:
            out["fail_src"] = "data[6]" in str(e)
    else:
        try:
            b.broadcast(None, src=0)
            out["fail_src"] = "no error"
        except BroadcastError as e:
            out["fail_src"] = "failed to encode" in str(e) and "data[6]" in str(e)
    check("after_failure", rows[:50])

    # A receiver with a smaller max_bytes: it alone raises, after the whole stream.
    big = _rows(100)
    try:
        got = small_max.broadcast(big if rank == 0 else None, src=0)
        out["max_bytes"] = rank != small and got == big
    except BroadcastError as e:
        out["max_bytes"] = rank == small and "max_bytes" in str(e)
    check("after_max_bytes", big)

    if b.device.type == "cuda":
        # CUDA tensors in several segments: each segment's device buffer follows it.
        dev = torch.device("cuda", torch.cuda.current_device())
        tensors = [{"t": torch.full((300 + i,), i, device=dev), "ids": list(range(i, i + 300))} for i in range(40)]
        got = b.broadcast(tensors if rank == 0 else None, src=0)
        out["cuda"] = all(g["t"].device == dev and torch.equal(g["t"], t["t"]) and g["ids"] == t["ids"]
                          for g, t in zip(got, tensors)) and len(got) == 40

    # What a receiver holds: the pool's blocks stay within a few segments
    # while a 7 MB stream is decoded (no buffer for the whole frame).
    large = _rows(8000, 400) if rank == 0 else None
    gc.collect()
    fastbcast.shrink_pool()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    got = b.broadcast(large, src=0)
    out["pool_after_large"] = fastbcast.pool_stats()["bytes"]
    out["large_ok"] = rank == 0 or len(got) == 8000 and got[7999]["ids"][-1] == 7999 + 399
    out["maxrss_growth_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    out["transport"] = b.transport
    ch = getattr(b._transport, "_channel", None)
    out["c_collectives"] = ch.collectives if ch else 0   # the C++ loops' collectives (CollectiveChannel)
    return out


def _check_results(results, transport):
    for rank, res in enumerate(results):
        assert res["transport"] == _loops_name(transport)
        bad = {k: v for k, v in res.items()
               if k not in ("pool_after_large", "maxrss_growth_kb", "transport", "c_collectives") and v is not True}
        assert not bad, (rank, res)
        if transport == "collective":
            # Every rank's streams went through the C++ loops: hundreds of
            # collectives made from C++ (the one-call path alone makes one a call).
            assert res["c_collectives"] > 100, (rank, res["c_collectives"])
        elif transport == "collective-python":
            assert res["c_collectives"] == 0, (rank, res["c_collectives"])
    for rank in range(1, len(results)):
        # Two receive buffers of a segment, message 0's one of them
        # (collective), or none (a ring slot is decoded in place): far below
        # the 7 MB frame. (Pool blocks are at least 64 KiB.)
        assert results[rank]["pool_after_large"] <= 8 * S + (1 << 20), results[rank]


def _loops_name(transport: str) -> str:
    return "collective" if transport == "collective-python" else transport


@pytest.mark.parametrize("transport", ["collective", "collective-python", "shm"])
def test_streams_over_gloo(transport):
    _check_results(run_distributed(_stream_run, 3, transport, timeout=240), transport)


@requires_gpus(2)
@pytest.mark.nccl
def test_streams_over_nccl():
    _check_results(run_distributed(_stream_run, 2, "collective", backend="nccl", timeout=240), "collective")


@requires_gpus(1)
@pytest.mark.parametrize("transport", ["collective", "shm"])
def test_streams_through_device_buffers_over_gloo(transport):
    """CUDA buffers in streams with gloo moving them (two processes can
    share one GPU, which NCCL refuses): on the collective transport the
    device-staging path (two device slots, asynchronous copies, events);
    on shared memory each segment's CUDA tensors beside its ring message."""
    _check_results(run_distributed(_stream_run, 2, transport, "cuda:0", timeout=240), transport)


def _grad_run(rank, world, transport, device):
    """CUDA tensors that require grad (a leaf and not) in a small frame and
    in a stream, gloo moving the device buffers."""
    import torch.distributed as dist

    from fastbcast import Broadcaster

    g = dist.new_group(list(range(world)))
    torch.cuda.set_device(0)
    leaf = torch.arange(4.0, device="cuda", requires_grad=True)
    small = [leaf, leaf * 2, torch.ones(2, device="cuda")]
    big = [small] + [_bin(S // 2) for _ in range(6)]     # a stream: its first item holds the tensors
    out = []
    with Broadcaster(g, transport=transport, stream_bytes=S, chunk=CHUNK, device=device) as b:
        for obj in (small, big):
            got = b.broadcast(obj if rank == 0 else None, src=0)
            ts = got if obj is small else got[0]
            out.append([(t.device.type, t.requires_grad, t.is_leaf, t.detach().cpu().tolist()) for t in ts])
    return out


@requires_gpus(1)
@pytest.mark.parametrize("transport", ["collective", "shm"])
def test_cuda_tensors_that_require_grad_over_gloo(transport):
    """As pickle gives them: on CUDA, requiring grad, each a leaf."""
    res = run_distributed(_grad_run, 2, transport, "cuda:0", timeout=240)
    want = [("cuda", True, True, [0.0, 1.0, 2.0, 3.0]), ("cuda", True, True, [0.0, 2.0, 4.0, 6.0]),
            ("cuda", False, True, [1.0, 1.0])]
    assert res[1] == [want, want], res[1]


def _stalled_mid_stream(rank, world, transport, how):
    import torch.distributed as dist

    from fastbcast import Broadcaster, BroadcastError, BroadcastTimeoutError

    g = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=20))
    timeout = None if how == "source_only" and rank else 1.5
    b = Broadcaster(g, transport=transport, stream_bytes=S, chunk=1 if how == "tiny_chunks" else CHUNK,
                    timeout=timeout)
    b.broadcast([1, 2] if rank == 0 else None, src=0)      # the transport is set up
    obj = [_bin(S // 2 - 64) for _ in range(10)]
    if how == "tiny_chunks":
        # A message of 400 KB posted as one-byte collectives: posting them
        # alone outlasts the timeout, which bounds it too.
        obj[3] = _bin(400_000)
    elif how in ("stalled", "source_only"):
        obj[6] = SlowToEncode(4.0)                         # segment 3 of 5
    else:
        # Every segment a little late (0.35 s), none past the timeout alone:
        # the timeout bounds the whole call, not each wait.
        obj = [x for _ in range(8) for x in (SlowToEncode(0.35), _bin(S))]
    started = time.monotonic()
    try:
        b.broadcast(obj if rank == 0 else None, src=0)
        outcome = "returned"
    except BroadcastTimeoutError:
        outcome = "timeout"
    except BroadcastError as e:
        outcome = f"error: {e}"
    return outcome, time.monotonic() - started


@pytest.mark.parametrize("how", ["stalled", "slow"])
@pytest.mark.parametrize("transport", ["collective", "shm"])
def test_a_source_stalled_mid_stream_ends_receivers_at_their_timeout(transport, how):
    results = run_distributed(_stalled_mid_stream, 3, transport, how, timeout=120)
    for outcome, seconds in results[1:]:
        assert outcome == "timeout" and seconds < 1.5 + 2.0, results
    # The source finds its receivers gone (or its own timeout); it does not hang.
    assert results[0][1] < 4.0 + 1.5 + 5.0, results


def test_a_source_posting_tiny_chunks_keeps_its_timeout():
    """Collective transport, chunk=1: the source's call ends at its timeout
    like its receivers' (it posted every chunk of a message before looking
    at the clock: 20 s past a 5 s timeout)."""
    results = run_distributed(_stalled_mid_stream, 2, "collective", "tiny_chunks", timeout=120)
    for outcome, seconds in results:
        assert outcome == "timeout" and seconds < 1.5 + 1.5, results


def test_a_source_past_its_timeout_mid_stream_publishes_no_more():
    """Shared memory, only the source has timeout=: its encode of segment 3
    takes 4 s. A free slot would take the rest of the stream; instead the
    source raises BroadcastTimeoutError at its next message and gives the
    group up, and its receivers (no timeout) see the ring closed at once."""
    results = run_distributed(_stalled_mid_stream, 3, "shm", "source_only", timeout=120)
    assert results[0][0] == "timeout" and 4.0 <= results[0][1] < 4.0 + 5.0, results
    for outcome, seconds in results[1:]:
        assert outcome.startswith("error:") and "global rank 0" in outcome and seconds < 4.0 + 5.0, results



# ---------------------------------------------------------------------------
# What a receiver holds, and max_bytes in the middle of a stream
# ---------------------------------------------------------------------------

SEG = 256 << 10     # a segment the pool's power-of-two blocks fit exactly


def _big_first():
    """A stream whose message 0 (one 3 MB item) and a later message (one
    2 MB item) are each longer than a segment."""
    return [_bin(3 << 20)] + _rows(600) + [_bin(2 << 20)] + _rows(100)


def _stream_size(obj, transport: str) -> tuple:
    """(message 0's bytes, [bytes of the stream after each message]) as
    max_bytes counts them: every message, less message 0's frame header.
    (Over shared memory a stream starts with a smaller message.)"""
    first = _C.SHM_FIRST_SEGMENT_BYTES if transport == "shm" else 0
    streaming, msgs = _messages(obj, segment=SEG, first_segment=first)
    assert streaming
    sizes, total = [], -_C.HEADER_BYTES
    for m in msgs:
        total += m.numel()
        sizes.append(total)
    return msgs[0].numel() - _C.HEADER_BYTES, sizes


def _receiver_memory_run(rank, world, transport):
    import fastbcast
    from fastbcast import Broadcaster, BroadcastError

    transport = _loops(transport)
    out = {}
    small = world - 1       # the receiver with a smaller max_bytes
    rows = _rows(4000)

    def grown(b, obj, name):
        """Pool growth on this rank over one call of b; the call's outcome."""
        gc.collect()
        fastbcast.shrink_pool()
        before = fastbcast.pool_stats()["bytes"]
        try:
            got = b.broadcast(obj if rank == 0 else None, src=0)
            out[name] = ("ok", got == obj)
        except (BroadcastError, ValueError) as e:
            out[name] = (type(e).__name__, str(e))
        out[name + "_growth"] = fastbcast.pool_stats()["bytes"] - before

    def next_call_works(b, name):
        got = b.broadcast(rows[:300] if rank == 0 else None, src=0)
        got2 = b.broadcast({"a": 1} if rank == 0 else None, src=0)
        out[name] = got == rows[:300] and got2 == {"a": 1}

    # chunk >= segment: two segment buffers, one of them message 0's; chunk
    # < segment: one, each message received after the one before decoded.
    for chunk in (SEG, 64 << 10):
        b = Broadcaster(transport=transport, stream_bytes=SEG, chunk=chunk)
        b.broadcast([1, 2] if rank == 0 else None, src=0)      # the transport is set up
        grown(b, rows, f"rows_{chunk}")

    # max_bytes below message 0 (3 MB) on one receiver: it keeps message 0's
    # prologue only, follows the stream to its end, then raises.
    b = Broadcaster(transport=transport, stream_bytes=SEG, chunk=SEG, max_bytes=(1 << 20) if rank == small else None)
    b.broadcast([1, 2] if rank == 0 else None, src=0)
    grown(b, _big_first(), "below_message_0")
    next_call_works(b, "after_below_message_0")
    # max_bytes passed in a later message.
    grown(b, rows, "later_message")
    next_call_works(b, "after_later_message")
    # A first collective shorter than message 0's prologue (88 bytes): the
    # refusing receiver takes the prologue's rest out of the next collective.
    b = Broadcaster(transport=transport, stream_bytes=SEG, chunk=64 << 10, first_chunk=64,
                    max_bytes=(1 << 20) if rank == small else None)
    grown(b, _big_first(), "first_chunk_64")
    next_call_works(b, "after_first_chunk_64")

    # The source's own max_bytes, passed by message 0 and by a later message.
    b = Broadcaster(transport=transport, stream_bytes=SEG, chunk=SEG, max_bytes=(1 << 20) if rank == 0 else None)
    grown(b, _big_first(), "source_message_0")
    grown(b, rows, "source_later")
    next_call_works(b, "after_source")
    out["transport"] = b.transport
    return out


@pytest.mark.parametrize("transport", ["collective", "collective-python", "shm"])
def test_receiver_memory_and_max_bytes_mid_stream(transport):
    res = run_distributed(_receiver_memory_run, 3, transport, timeout=240)
    small = len(res) - 1
    rows_size = _stream_size(_rows(4000), transport)[1]
    big_msg0, big_sizes = _stream_size(_big_first(), transport)
    for rank, r in enumerate(res):
        assert r["transport"] == _loops_name(transport)
        for name in ("after_below_message_0", "after_later_message", "after_first_chunk_64", "after_source"):
            assert r[name] is True, (rank, name, r)
        for chunk in (SEG, 64 << 10):
            assert r[f"rows_{chunk}"] == ("ok", True), (rank, r)
            if rank:
                # Peak pool growth of a receiver: one segment plus one chunk
                # (the decoded object itself is not in the pool).
                assert r[f"rows_{chunk}_growth"] <= SEG + chunk, (rank, chunk, r)

        # A receiver whose max_bytes is below message 0.
        if rank == small:
            kind, text = r["below_message_0"]
            assert kind == "BroadcastError", r
            assert f"sent a stream of {big_sizes[-1]} bytes, over this rank's (global rank {rank}) " \
                   f"max_bytes={1 << 20}" in text, text
            # Message 0 (3 MB) and the 2 MB message were never held whole.
            assert r["below_message_0_growth"] <= 2 * SEG, r
            kind, text = r["later_message"]
            assert kind == "BroadcastError" and f"sent a stream of {rows_size[-1]} bytes" in text, r
            kind, text = r["first_chunk_64"]
            assert kind == "BroadcastError" and f"sent a stream of {big_sizes[-1]} bytes" in text, r
            assert r["first_chunk_64_growth"] <= SEG + (64 << 10), r
        else:
            for name in ("below_message_0", "later_message", "first_chunk_64"):
                assert r[name] == ("ok", True), (rank, name, r)

        # The source over its own max_bytes: the error says what is known
        # (message 0's bytes, or the bytes sent when the limit was passed).
        first_over = next(s for s in rows_size if s > 1 << 20)
        for name, expect in (("source_message_0", f"the object encodes to more than {big_msg0} bytes, over "
                                                  f"this Broadcaster's max_bytes={1 << 20}"),
                             ("source_later", f"the object encodes to more than {first_over} bytes, over this "
                                              f"Broadcaster's max_bytes={1 << 20}")):
            kind, text = r[name]
            assert kind == ("ValueError" if rank == 0 else "BroadcastError"), (rank, name, r)
            assert expect in text, (rank, name, text)


def _interrupt_and_caps_run(rank, world, transport):
    """Ctrl-C while the source encodes an item after message 0, and
    receivers with a cap below first_chunk or at 2^63 and more."""
    import torch.distributed as dist

    from fastbcast import Broadcaster, BroadcastError

    g = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=30))
    out = {}
    b = Broadcaster(g, transport=transport, stream_bytes=S, chunk=CHUNK, timeout=20)
    obj = [_bin(S // 2) for _ in range(20)]
    obj[12] = Interrupting()                             # a segment after message 0
    try:
        b.broadcast(obj if rank == 0 else None, src=0)
        out["interrupt"] = "returned"
    except KeyboardInterrupt:
        out["interrupt"] = rank == 0 or "not a receiver's"
    except BroadcastError as e:
        out["interrupt"] = rank != 0 and "KeyboardInterrupt" in str(e)
    # The error segment told the receivers: the group stays in step.
    out["after_interrupt"] = b.broadcast(["next"] if rank == 0 else None, src=0) == ["next"]
    small = [1, 2, 3]                                    # 8 bytes, in a 4 KiB first collective
    for cap in (100, 1 << 63, (1 << 64) - 1, 1 << 70):
        c = Broadcaster(g, transport=transport, stream_bytes=S, chunk=CHUNK, timeout=20,
                        max_bytes=cap if rank else None)
        ok = c.broadcast(small if rank == 0 else None, src=0) == small
        rows = [_bin(300) for _ in range(100)]           # a 30 KB stream
        try:
            ok = ok and c.broadcast(rows if rank == 0 else None, src=0) == rows and (rank == 0 or cap > 100)
        except BroadcastError as e:
            ok = ok and cap == 100 and rank != 0 and "over this rank's" in str(e)
        out[f"cap_{cap}"] = ok
        if cap == 100:
            # A source that cannot encode: its reason reaches a receiver
            # whatever that receiver's max_bytes.
            try:
                c.broadcast([1, Unregistered()] if rank == 0 else None, src=0)
                out["reason_under_cap"] = "returned"
            except TypeError:
                out["reason_under_cap"] = rank == 0
            except BroadcastError as e:
                out["reason_under_cap"] = rank != 0 and "failed to encode" in str(e) and "max_bytes" not in str(e)
    out["transport"] = b.transport
    return out


def _refused_stream_frees_at_once_run(rank, world, transport):
    import weakref

    from fastbcast import Broadcaster, BroadcastError

    if rank == 0:
        fastbcast.register(SourceOnly)     # the receiver cannot rebuild the last item
    out = {}
    for name, obj in (("max_bytes", [_bin(3 * S) for _ in range(3)]),
                      ("decode", [_bin(S // 2) for _ in range(10)] + [SourceOnly()])):
        gc.disable()
        try:
            b = Broadcaster(transport=transport, stream_bytes=S, chunk=CHUNK,
                            max_bytes=S if rank == 1 and name == "max_bytes" else None)
            try:
                b.broadcast(obj if rank == 0 else None, src=0)
                out[name] = "no error" if rank == 1 else "ok"
            except (BroadcastError, fastbcast.DecodeError) as e:
                out[name] = type(e).__name__
            ref = weakref.ref(b)
            del b
            out[name + "_freed"] = ref() is None
        finally:
            gc.enable()
    return out


@pytest.mark.parametrize("transport", ["collective", "shm"])
def test_a_refused_stream_leaves_no_reference_cycle(transport):
    """A receiver that raises after following a stream (over its
    max_bytes, or a segment it cannot decode) frees its Broadcaster as soon
    as the caller drops it, without the cyclic GC: a cycle through the
    raised exception's traceback kept the Broadcaster (and its process
    group) alive to interpreter exit, where gloo sometimes aborted the
    process after destroy_process_group."""
    res = run_distributed(_refused_stream_frees_at_once_run, 2, transport, timeout=120)
    assert res[0] == {"max_bytes": "ok", "max_bytes_freed": True, "decode": "ok", "decode_freed": True}, res[0]
    assert res[1] == {"max_bytes": "BroadcastError", "max_bytes_freed": True, "decode": "DecodeError",
                      "decode_freed": True}, res[1]


@pytest.mark.parametrize("transport", ["collective", "shm"])
def test_interrupted_encode_mid_stream_and_receiver_caps(transport):
    for rank, res in enumerate(run_distributed(_interrupt_and_caps_run, 3, transport, timeout=180)):
        assert res.pop("transport") == transport
        assert all(v is True for v in res.values()), (rank, res)


# ---------------------------------------------------------------------------
# Shared memory with small slots: message 0 over several slots, every failure
# ---------------------------------------------------------------------------

SLOT = 4096         # FASTBCAST_SHM_BYTES / FASTBCAST_SHM_SLOTS of this test


def _multi_slot_obj(bad=None):
    """A stream whose message 0 (one 12 KB item) spans three slots; item 30,
    in a later message, is `bad` if given."""
    obj = [_bin(3 * SLOT)] + _rows(100, 50)
    if bad is not None:
        obj[30] = bad
    return obj


def _shm_sizes(obj) -> list:
    """The stream's size after each message, as max_bytes counts it."""
    streaming, msgs = _messages(obj, segment=SLOT, first_segment=_C.SHM_FIRST_SEGMENT_BYTES, allow_pickle=True)
    assert streaming and msgs[0].numel() > 2 * SLOT
    sizes, total = [], -_C.HEADER_BYTES
    for m in msgs:
        total += m.numel()
        sizes.append(total)
    return sizes


def _small_slots_run(rank, world):
    import os

    os.environ["FASTBCAST_SHM_SLOTS"] = "4"
    os.environ["FASTBCAST_SHM_BYTES"] = str(4 * SLOT)
    from fastbcast import Broadcaster

    out = {}
    small = world - 1

    def call(b, name, obj):
        try:
            got = b.broadcast(obj if rank == 0 else None, src=0)
            out[name] = ("ok", got == obj)
        except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt included
            out[name] = (type(e).__name__, str(e))
        nxt = ["next", name]
        out["after_" + name] = b.broadcast(nxt if rank == 0 else None, src=0) == nxt

    b = Broadcaster(transport="shm", stream_bytes=S, timeout=60)
    call(b, "whole", _multi_slot_obj())
    call(b, "error_mid", _multi_slot_obj(Unregistered()))
    call(b, "interrupt_mid", _multi_slot_obj(Interrupting()))
    call(Broadcaster(transport="shm", stream_bytes=S, timeout=60, max_bytes=8000 if rank == small else None),
         "below_message_0", _multi_slot_obj())
    call(Broadcaster(transport="shm", stream_bytes=S, timeout=60, allow_pickle=rank != small),
         "decode_error", _multi_slot_obj(dataclasses.Field))
    call(Broadcaster(transport="shm", stream_bytes=S, timeout=60, max_bytes=16000 if rank == 0 else None),
         "source_max_mid", _multi_slot_obj())
    out["transport"] = b.transport
    out["slot_bytes"] = b._state.rings[0].slot_bytes
    return out


def test_shm_streams_whose_message_0_spans_slots():
    """One C++ call on each side carries the stream (ShmChannel.send_object /
    recv_object), message 0 over several slots included: every rank's
    outcome and error text, and the next call works on every rank."""
    res = run_distributed(_small_slots_run, 3, timeout=240)
    small = len(res) - 1
    sizes = _shm_sizes(_multi_slot_obj())
    over = next(i for i, s in enumerate(sizes) if s > 16000)
    cut = f"the object encodes to {'' if over == len(sizes) - 1 else 'more than '}{sizes[over]} bytes, over " \
          f"this Broadcaster's max_bytes=16000 (Broadcaster(max_bytes=) / FASTBCAST_MAX_BYTES); the stream was cut off"
    src = res[0]
    assert src["error_mid"][0] == "TypeError" and "data[30]" in src["error_mid"][1], src
    assert src["interrupt_mid"][0] == "KeyboardInterrupt", src
    assert src["source_max_mid"] == ("ValueError", cut), src
    for rank, r in enumerate(res):
        assert r.pop("transport") == "shm" and r.pop("slot_bytes") == SLOT, r
        assert all(r[k] is True for k in r if k.startswith("after_")), (rank, r)
        assert r["whole"] == ("ok", True), (rank, r)
        if rank:
            for name, kind in (("error_mid", "TypeError"), ("interrupt_mid", "KeyboardInterrupt"),
                               ("source_max_mid", "ValueError")):
                assert r[name] == ("BroadcastError", f"source (global rank 0) failed to encode: {kind}: "
                                                     f"{src[name][1]}"), (rank, name, r)
        if rank == small:
            assert r["below_message_0"] == (
                "BroadcastError", f"the source (global rank 0) sent a stream of {sizes[-1]} bytes, over this rank's "
                f"(global rank {rank}) max_bytes=8000 (Broadcaster(max_bytes=) / FASTBCAST_MAX_BYTES); it was "
                f"received and dropped. Configure every rank alike."), r
            assert r["decode_error"][0] == "DecodeError" and "pickle" in r["decode_error"][1], r
        else:
            assert r["below_message_0"] == ("ok", True) and r["decode_error"] == ("ok", True), (rank, r)
