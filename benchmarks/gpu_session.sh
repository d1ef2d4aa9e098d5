#!/usr/bin/env bash
# What a session lent a GPU runs for issue 8's GPU item (one run's day at full NYC), as one call of the device tool.
#
#   bash benchmarks/gpu_session.sh prepare   # here, once per checkout: the wheels the device image lacks, into .whl/
#   device tool: run(command="bash benchmarks/gpu_session.sh run", carry=[".whl"], timeout_s=560)
#
# `run` installs the wheels (polars, its runtime, tomli-w: ~53 MB, within the 64 MiB a call carries), checks that
# torch sees a GPU and that agenttensor imports, then runs, each step under its own time limit, with its output and
# JSON under $OUT (which come back):
#   1. tests/test_cuda.py (CUDA against the CPU; sync-free days, CUDA graphs and compiled kernels against plain CUDA);
#   2. benchmarks/device_path_day.py --device cuda --nyc with AGENTTENSOR_COMPILE=1: standard, sync-free and
#      CUDA-graph days side by side at 2,000 agents, 1M and full NYC (the NYC population built there first, ~1 min).
# The machine's python3 (3.12, torch 2.11+cu130 at the last look) has the rest (numpy, networkx, pytest, tqdm).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(polars==2.2.0 polars-runtime-32==2.2.0 tomli-w==1.2.0)

case "${1:-}" in
prepare)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}" && ls -la .whl
    ;;
run)
    OUT=${OUT:-/tmp/gpu_session_out}
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "no wheels: run 'bash benchmarks/gpu_session.sh prepare' here and carry .whl"; exit 2; }
    export PYTHONPATH="/tmp/site:$PWD"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import torch, agenttensor, polars; assert torch.cuda.is_available(), 'torch sees no GPU'; \
print('torch', torch.__version__, torch.cuda.get_device_name(), 'polars', polars.__version__)" | tee -a "$OUT/gpu.txt" \
        || exit 3
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
    AGENTTENSOR_COMPILE=1 timeout 300 python3 benchmarks/device_path_day.py --device cuda --nyc --pairs 3 \
        --out "$OUT/device_path_day_cuda.json" 2>&1 | tee "$OUT/device_path_day_cuda.log"
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh prepare|run"; exit 2
    ;;
esac
