"""`trusted="bcast_types"` (one str) reaches both ends of a broadcast as one
module prefix, never split into characters: the source writes the trusted
class natively and the receivers rebuild it, with pickle off.

Needs fastbcast/broadcast.py to pass its `trusted` through
`fastbcast.codec._prefixes` and on to `_C.encode_frame(..., trusted=...)` (the
source decides whether a class travels natively); without that the source
refuses the class and this test fails.
"""
import sys

import bcast_types as bt
from distributed import run_distributed


def _trusted_str(rank, world):
    import torch.distributed as dist

    import fastbcast as fb
    reqs = [bt.Request("r0", list(range(20)), {"t": 0.5}), bt.Request("r1", [1], {}, bt.Stage.DECODE)]
    got = fb.broadcast(reqs if rank == 0 else None, src=0, trusted="bcast_types", allow_pickle=False)
    if rank == 0:
        assert got is reqs
    else:
        assert got == reqs and type(got[0]) is bt.Request
    b = fb.Broadcaster(dist.group.WORLD, trusted="bcast_types", allow_pickle=False)
    assert tuple(b.trusted) == ("bcast_types",), b.trusted
    got = b.broadcast(reqs if rank == 1 else None, src=1)
    assert got == reqs and type(got[1].stage) is bt.Stage
    return True


def test_trusted_as_one_str_reaches_source_and_receivers():
    assert run_distributed(_trusted_str, 2) == [True, True]
