#!/usr/bin/env bash
# Session 11's last device call, cut to what ~3 minutes hold: row_stats.py on this version alone (the finfo.min
# causal case against the -inf one in the same process: the huge-fill rewrite), then the GPU attention tests.
set -u; OUT=${OUT:-/tmp/flashfuse_out}
python -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | grep -v WARN | tail -2
export FLASHFUSE_CACHE_DIR=/tmp/ffcache
nvidia-smi --query-gpu=name --format=csv,noheader
FLASHFUSE_ATTN_AUTOTUNE=0 timeout 70 python benchmarks/row_stats.py --label now_fixed --n 2048 > $OUT/row_stats.jsonl 2> $OUT/row_stats.err
echo "row_stats rc=$?"; cut -c1-200 $OUT/row_stats.jsonl
FLASHFUSE_ATTN_AUTOTUNE=0 timeout 80 python -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_kernels.py > $OUT/pytest.log 2>&1
echo pytest rc=$?; grep -E "passed|failed|FAILED|Error" $OUT/pytest.log | tail -8
