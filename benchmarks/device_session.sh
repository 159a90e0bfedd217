#!/usr/bin/env bash
# One device call's worth (under 600 s) of the open measurements, most urgent first, each under its own time limit so a
# slow step cannot starve the rest. Usage on the device machine (repo root):  bash benchmarks/device_session.sh
# Results go to $OUT (the device tool brings them back); copy the ones you rely on into benchmarks/results/.
set -u
OUT=${OUT:-/tmp/flashfuse_out}
mkdir -p "$OUT"
export FLASHFUSE_CACHE_DIR=/tmp/ffcache
python -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | tail -2
step() {  # step NAME SECONDS COMMAND...: run, keep the log, print its tail
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "rc=$?"; grep -v "DEBUG" "$OUT/$name.log" | tail -6 | cut -c1-300
}
# 1. CUDA graphs over training steps (issue 7): flashfuse against plain Inductor as the control
step cudagraph_training 120 env FLASHFUSE_ATTN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -rx -m gpu \
    tests/test_attention_zoo.py -k cuda_graph_training
# 2. every GPU test (fixed first configs: compile time, not tuning)
step pytest_gpu 170 env FLASHFUSE_ATTN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -m gpu tests
# 3. the GPT-2 step and where its time goes
step train_gpt2 100 python benchmarks/train_gpt.py --out "$OUT" --configs 8x1024 --modes flashfuse
step profile_gpt2 80 python benchmarks/profile_step.py --mode flashfuse --b 8 --t 1024 --rows 30
# 4. norms: forward+backward replayed from CUDA graphs, RMSNorm included (MEASURED_RATIO)
step norms 100 python benchmarks/norms.py --out "$OUT" --ratio-from-graphs --budget-s 80
