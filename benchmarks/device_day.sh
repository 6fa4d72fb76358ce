#!/usr/bin/env bash
# One device call on the GPU machine's CPUs (no GPU used unless PART has
# "cudagloo"): build in place, then the parts named in PARTS (default
# "bench stream"):
#   bench:    benchmarks/device_cpu_session.sh (issue 10's per-step table, worlds 2/4/8)
#   stream:   issue 12's phase profile and designs side by side on gloo, both
#             transports, world 2 (and STREAM_WORLDS), rollout_64x1k and rollout_256x4k
#   ab:       benchmarks/ab_small.py at worlds 2, 4 and 8 (collective vs pickle design, small payloads)
#   cudagloo: the streaming tests' device-buffer paths with
#             CUDA buffers moved by gloo (two processes on one GPU)
# Logs land in $OUT.
#   OUT=$OUT PARTS="bench stream" bash benchmarks/device_day.sh
set -uo pipefail
OUT=${OUT:-day-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
T0=$(date +%s)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
MAX_JOBS=32 FASTBCAST_NO_INTEGRATIONS=1 python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1
echo "build: exit $? at $(( $(date +%s) - T0 )) s"; grep -iE "error" "$OUT/build.log" | head -5
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
for part in ${PARTS:-bench stream}; do
  case $part in
    bench)
      OUT=$OUT/bench bash benchmarks/device_cpu_session.sh > "$OUT/bench.log" 2>&1
      echo "bench: done at $(( $(date +%s) - T0 )) s"; cat "$OUT/bench.log" | grep -vE "^\s*$" | head -80
      ;;
    stream)
      for W in ${STREAM_WORLDS:-2}; do
        for tr in collective shm; do
          timeout 120 python3 benchmarks/profile_broadcast.py --world-size "$W" --backend gloo --reps 10 \
            --payloads rollout_64x1k,rollout_256x4k --transport "$tr" --stream-bytes "${STREAM_BYTES:-262144,1048576}" \
            2>&1 | grep -v Warn > "$OUT/stream_${tr}_w$W.log"
          echo "stream $tr w$W: exit $? at $(( $(date +%s) - T0 )) s"
          grep -E "call / max" "$OUT/stream_${tr}_w$W.log"
        done
      done
      ;;
    ab)
      for W in 2 4 8; do
        timeout 100 python3 benchmarks/ab_small.py --world-size "$W" --blocks "${AB_BLOCKS:-150}" 2>&1 \
          | grep -v Warn | tee -a "$OUT/ab_small.log"
      done
      echo "ab: done at $(( $(date +%s) - T0 )) s"
      ;;
    cudagloo)
      timeout 200 python3 -m pytest -q -rs -p no:cacheprovider tests/test_stream.py \
        -k "device_buffers_over_gloo" > "$OUT/cudagloo.log" 2>&1
      echo "cudagloo: exit $? at $(( $(date +%s) - T0 )) s"; tail -15 "$OUT/cudagloo.log"
      ;;
  esac
done
