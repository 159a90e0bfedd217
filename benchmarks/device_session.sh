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
# 1. every GPU test (fixed first configs), CUDA-graph training included (device mask check on by default)
step pytest_gpu 260 env FLASHFUSE_ATTN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -m gpu tests
# 2. host vs GPU time of the GPT-2 step, both modes on this one host (with the Python gauge: docs/perf-notes.md,
#    "Session 4", compares hosts by it)
step step_timing 150 python benchmarks/step_timing.py --out "$OUT" --modes sdpa,flashfuse
# 3. the dropout cost of the attention kernels at GPT-2's shape and at 4096 (the 2 x 4096 gap)
step attn_dropout 150 python benchmarks/attention.py --d 64 --n 1024 4096 --causal yes --dropout 0.1 \
    --impls flashfuse sdpa_flash --out "$OUT"
