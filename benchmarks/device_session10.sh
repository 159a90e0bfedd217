#!/usr/bin/env bash
# Session 10's second device call: GPU tests of the row-stats change (row max and log2(l) saved apart) and
# its cost, timed against the previous version (.baseline/, a `git archive` of the commit before, carried).
# Usage on the device (repo root): bash benchmarks/device_session10.sh   (results under $OUT)
set -u; OUT=${OUT:-/tmp/flashfuse_out}
python -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | grep -v WARN | tail -2
export FLASHFUSE_CACHE_DIR=/tmp/ffcache
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 170 python -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_kernels.py tests/test_attention_zoo.py \
    tests/test_attention_post_fill.py "tests/test_norms.py::test_gpu_norm_over_trailing_dims_bf16" > $OUT/pytest.log 2>&1
echo pytest rc=$?; grep -E "passed|failed|FAILED|Error" $OUT/pytest.log | tail -8
if [ -d .baseline ]; then
  (cd .baseline && python -m pip install . --no-deps --no-build-isolation -q --target /tmp/base 2>&1 | grep -v WARN | tail -2)
  for n in 2048; do
    PYTHONPATH=/tmp/base FLASHFUSE_CACHE_DIR=/tmp/ffcache_base timeout 80 python benchmarks/row_stats.py --label before --n $n >> $OUT/row_stats.jsonl 2> $OUT/row_stats_before.err
    echo "before n=$n rc=$?"
  done
fi
for n in 2048; do
  timeout 80 python benchmarks/row_stats.py --label after --n $n >> $OUT/row_stats.jsonl 2> $OUT/row_stats_after.err
  echo "after n=$n rc=$?"
done
cat $OUT/row_stats.jsonl | cut -c1-220
