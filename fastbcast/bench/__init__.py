"""fastbcast's benchmark suite.

- ``python -m fastbcast.bench``: the broadcast benchmark (``--help`` for options):
  fastbcast against the pickle design, ``broadcast_object_list``, msgspec with
  two broadcasts, and the transport floors, on local gloo or NCCL processes.
- ``fastbcast.bench.payloads``: the payloads (``PAYLOADS``: name -> factory).
- ``fastbcast.bench.baselines``: the baseline broadcast methods.
- ``benchmarks/bench_codec.py`` (in the source tree): the codec benchmark.

Nothing here is imported by ``import fastbcast``.
"""
