#!/usr/bin/env bash
# Makes a venv in which vLLM's MessageQueue imports, for the vllm_mq rows of
# `python -m fastbcast.bench`, without touching the project's own venv:
#
#   bash benchmarks/vllm_venv.sh [VENV] [BASE_PY]     # default .venv-vllm, .venv/bin/python
#   .venv-vllm/bin/python -m fastbcast.bench --methods codec,fastbcast,pickle,vllm_mq
#
# The new venv sees the base venv's packages (torch, the built fastbcast,
# the benchmark's dependencies) through a .pth file, and gets vllm==0.33.0
# with --no-deps plus its import-time needs (requirements-bench-vllm.txt),
# all under the torch pin of constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
BASE_PY=${2:-.venv/bin/python}
VLLM=${VLLM_VERSION:-0.33.0}
base_site=$("$BASE_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
base_home=$("$BASE_PY" -c 'import sys; print(sys.base_prefix)')
"$base_home/bin/python3" -m venv --system-site-packages "$VENV"
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$base_site" > "$site/zz-fastbcast-base-venv.pth"
# The repo itself, so a checkout without `pip install -e .` imports fastbcast.
pwd > "$site/zz-fastbcast-repo.pth"
"$VENV/bin/python" -m pip install -q -c constraints.txt -r requirements-bench-vllm.txt
"$VENV/bin/python" -m pip install -q -c constraints.txt --no-deps "vllm==$VLLM"
VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c \
  'import vllm.distributed.device_communicators.shm_broadcast as m; print("ok:", m.__name__)'
