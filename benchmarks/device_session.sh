#!/usr/bin/env bash
# One device call's worth (under 600 s) of the open measurements, most urgent first, each under its own time limit so a
# slow step cannot starve the rest. Usage on the device machine (repo root):  bash benchmarks/device_session.sh
# Results go to $OUT (the device tool brings them back); copy the ones you rely on into benchmarks/results/.
set -u
OUT=${OUT:-/tmp/flashfuse_out}
mkdir -p "$OUT"
export FLASHFUSE_CACHE_DIR=/tmp/ffcache
python -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | grep -v WARN | tail -2  # `python -m`: a bare pip may be another Python's
step() {  # step NAME SECONDS COMMAND...: run, keep the log, print its tail
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "rc=$?"; grep -v "DEBUG" "$OUT/$name.log" | tail -6 | cut -c1-300
}
# 1. the attention kernels' GPU tests (fixed first configs): dropout drawn on the wgmma lanes, the saved bits
step pytest_gpu_attention 150 env FLASHFUSE_ATTN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_attention_kernels.py tests/test_attention_zoo.py -k "not inductor" --durations=8
# 2. the dropout cost of the attention kernels at GPT-2's shape and at 4096, with the forward's keep bits saved
#    for the backward (default) and drawn again (A/B; docs/perf-notes.md "Session 6" has the predictions)
step attn_dropout 130 python benchmarks/attention.py --d 64 --n 1024 4096 --causal yes --dropout 0.1 \
    --impls flashfuse sdpa_flash --out "$OUT"
mkdir -p "$OUT/drawn"
step attn_dropout_drawn 70 env FLASHFUSE_DROPOUT_BITS=0 python benchmarks/attention.py --d 64 --n 1024 4096 \
    --causal yes --dropout 0.1 --impls flashfuse --out "$OUT/drawn"
# 3. the GPT-2 table (time and memory) at both shapes
step train_gpt 150 python benchmarks/train_gpt.py --modes "${MODES:-flashfuse}" --configs 8x1024,2x4096 --out "$OUT" \
    --tag "${TAG:-_session6}"
