#!/usr/bin/env bash
# The GPU runs behind BENCHMARKS.md, in the order they were made: build in
# place, the NCCL tests, the phase profile, and the benchmark tables.
#
#   OUT=gpu-results bash benchmarks/gpu_session.sh tests     # NCCL tests + profile + 2-GPU table
#   OUT=gpu-results bash benchmarks/gpu_session.sh bench     # the 4-GPU table
#   OUT=gpu-results bash benchmarks/gpu_session.sh stream    # issue 12 on 2 GPUs (below)
#   OUT=gpu-results bash benchmarks/gpu_session.sh small     # issue 10: [] and tiny_1req on NCCL vs the pickle design
#
# stream: the streaming tests (codec + NCCL), then for rollout_64x1k and
# rollout_256x4k the phase profile and the designs side by side in one run
# each (pickle design, fastbcast without streaming, with streaming per
# segment size in STREAM_BYTES, default 256 KiB and 1 MiB; interleaved reps).
# Under 4 minutes with the build. Read in $OUT/profile_stream.log, per
# payload, "fastbcast stream on (N KiB): call / max(encode, decode) = R;
# pickle design / this = Mx" (targets: R <= 1.2; M >= 10 for rollout_256x4k)
# and the "fastbcast stream on (N KiB): call" rows (<= 3 ms for rollout_64x1k).
#
# Needs torch with CUDA, nccl, pybind11, ninja; msgspec/ormsgpack/tqdm for
# the baselines (on a machine without network, carry them as wheels and put
# them on PYTHONPATH first).
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
MAX_JOBS=${MAX_JOBS:-32} FASTBCAST_NO_INTEGRATIONS=1 python3 setup.py -q build_ext --inplace 2>&1 | grep -iE "error" || true
nvidia-smi -L | tee "$OUT/gpus.txt"
python3 -m fastbcast.info > "$OUT/info.txt"
case "${1:-tests}" in
  tests)
    timeout 330 python3 -m pytest tests/test_broadcast_nccl.py tests/test_integration_nccl.py -q -rs 2>&1 \
      | tee "$OUT/nccl_tests.log" | tail -15
    timeout 100 python3 benchmarks/profile_broadcast.py --world-size 4 --backend nccl --reps 10 \
      --payloads tiny_1req,sched_step_8req,rollout_64x1k,rollout_256x4k 2>&1 | grep -v Warn | tee "$OUT/profile4.log"
    CUDA_VISIBLE_DEVICES=0,1 timeout 150 python3 -m fastbcast.bench --backend nccl --world-size 2 --no-plot --seconds 0.5 \
      --out "$OUT" 2>&1 | tee "$OUT/bench2.log" | grep "^# summary"
    ;;
  bench)
    timeout 420 python3 -m fastbcast.bench --backend nccl --world-size 4 --out "$OUT" 2>&1 \
      | tee "$OUT/bench4.log" | grep "^# summary"
    ;;
  stream)
    timeout 100 python3 -m pytest tests/test_stream.py -q -rs -k "nccl or not gloo" 2>&1 \
      | tee "$OUT/stream_tests.log" | tail -5
    for p in rollout_64x1k rollout_256x4k; do
      CUDA_VISIBLE_DEVICES=0,1 timeout 60 python3 benchmarks/profile_broadcast.py --world-size 2 --backend nccl \
        --reps 10 --payloads "$p" --stream-bytes "${STREAM_BYTES:-262144,1048576}" 2>&1 | grep -v Warn \
        | tee -a "$OUT/profile_stream.log"
    done
    ;;
  small)
    # The collective transport on an NCCL group against the pickle design,
    # interleaved (issue 10: no payload slower than the pickle design on the
    # same transport); first_chunk 64 KiB (the NCCL default) and 4 KiB.
    for fc in 65536 4096; do
      FASTBCAST_FIRST_CHUNK=$fc CUDA_VISIBLE_DEVICES=0,1 timeout 200 python3 benchmarks/ab_small.py --backend nccl \
        --world-size 2 --blocks 100 2>&1 | grep -v Warn | sed "s/^/first_chunk $fc: /" | tee -a "$OUT/ab_small_nccl.log"
    done
    ;;
esac
