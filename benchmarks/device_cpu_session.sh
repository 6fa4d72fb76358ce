#!/usr/bin/env bash
# The shared-memory issue's CPU benchmark on the GPU machine's cores (no GPU
# is used): worlds of 2, 4 and 8 processes on one gloo group, the payloads of
# its targets, fastbcast per transport beside the pickle design and vLLM's
# MessageQueue, and fastbcast's codec time of each payload from the same run.
#
#   OUT=cpu-results bash benchmarks/device_cpu_session.sh
#
# The vllm_mq rows need vLLM's MessageQueue: carry the folder that
# benchmarks/vllm_carry.py makes (.bench-carry: the few vllm modules it
# imports, and the pyzmq wheel for the target's Python); this script installs
# the wheel to /tmp/site and puts both on PYTHONPATH. Without the folder those
# rows print n/a with the reason. Takes about 4 minutes on 32 cores, after the
# build (each run is capped: 3 x 110 s + 40 s at most). Every log and JSON lands
# in $OUT. WORLDS, PAYLOADS, METHODS and SECONDS_PER_CELL override the defaults.
#
# On the GPU machine through the device tool (kind nvidia-h200-x2: 32 cores),
# with .bench-carry named in carry:
#   pip install --no-build-isolation --no-deps -e . && OUT=$OUT bash benchmarks/device_cpu_session.sh
set -uo pipefail
OUT=${OUT:-cpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_TARGET_DEVICE=cpu
CARRY=${CARRY:-.bench-carry}
if [ -d "$CARRY/whl" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$CARRY"/whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site:$PWD/$CARRY/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c 'import fastbcast' 2>/dev/null || \
  MAX_JOBS=${MAX_JOBS:-32} FASTBCAST_NO_INTEGRATIONS=1 python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -3
{ nproc; lscpu | grep -E "Model name|Socket|NUMA node\(s\)"; python3 -m fastbcast.info; } > "$OUT/machine.txt" 2>&1
python3 -c 'import vllm.distributed.device_communicators.shm_broadcast as m, vllm; print("vllm", vllm.__version__, "MessageQueue imports")' \
  2>&1 | tail -1 | tee "$OUT/vllm.txt"

PAYLOADS=${PAYLOADS:-empty,tiny_1req,sched_step_8req,rollout_64x1k}
METHODS=${METHODS:-codec,fastbcast,fastbcast-shm,fastbcast-collective,fastbcast_pyobj,pickle,vllm_mq,floor_cpu}
SECONDS_PER_CELL=${SECONDS_PER_CELL:-0.5}
for W in ${WORLDS:-2 4 8}; do
  timeout 110 python3 -m fastbcast.bench --backend gloo --world-size "$W" --payloads "$PAYLOADS" \
    --methods "$METHODS" --seconds "$SECONDS_PER_CELL" --max-reps 1000 --no-plot --progress off \
    --out "$OUT/w$W" > "$OUT/bench_w$W.log" 2>&1
  echo "world $W: exit $?"
  sed -n "/^# the project's own targets/,/^# wrote/p" "$OUT/bench_w$W.log"
done
# Idle steps as they happen when requests are rare: receivers inside the call
# for 2 ms before the source sends (long enough to leave any spin phase).
timeout 40 python3 -m fastbcast.bench --backend gloo --world-size 4 --payloads empty,tiny_1req \
  --methods fastbcast,fastbcast-shm,pickle,vllm_mq --gap-us 2000 --seconds 0.3 --max-reps 300 \
  --no-plot --progress off --out "$OUT/w4-gap2ms" > "$OUT/bench_w4_gap2ms.log" 2>&1
echo "world 4, gap 2 ms: exit $?"
grep -E "^# summary (empty|tiny_1req):" "$OUT/bench_w4_gap2ms.log" | head -2
