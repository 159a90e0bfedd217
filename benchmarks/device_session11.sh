#!/usr/bin/env bash
# Session 11's second device call. Session 10's row-stats change (row max and log2(l) saved apart) measured
# +5 % forward+backward on the common folded causal path (1.029 -> 1.082 ms, d64 n2048, autotuned). This run:
# the GPU attention tests of the working tree (folded kernels save the joined log-sum-exp again: "v2"), then
# before (.baseline = 4e8030d) / v1 (.v1 = eda7b6f) / v2 (working tree) with fixed tiles, twice interleaved,
# then the causal n1024/2048 rows against FA2 with v2, and again with the programs started in groups of heads,
# heaviest causal blocks first (FLASHFUSE_ATTN_GROUP_HEADS: 100000 = one group, longest-first; 16).
# Usage on the device (repo root): bash benchmarks/device_session11.sh   (results under $OUT)
set -u; OUT=${OUT:-/tmp/flashfuse_out}
python -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | grep -v WARN | tail -2
export FLASHFUSE_CACHE_DIR=/tmp/ffcache
nvidia-smi --query-gpu=name --format=csv,noheader
for v in base v1; do
  src=.baseline; [ $v = v1 ] && src=.v1
  (cd $src && python -m pip install . --no-deps --no-build-isolation -q --target /tmp/$v 2>&1 | grep -v WARN | tail -2)
done
for rep in 1; do
  for v in base v1 v2; do
    pp=/tmp/$v; [ $v = v2 ] && pp=
    PYTHONPATH=$pp FLASHFUSE_ATTN_AUTOTUNE=0 FLASHFUSE_CACHE_DIR=/tmp/ffcache_$v timeout 60 \
        python benchmarks/row_stats.py --label "${v}_fixed_$rep" --n 2048 >> $OUT/row_stats.jsonl 2>> $OUT/row_stats.err
    echo "$v rep $rep rc=$?"
  done
done
python benchmarks/row_stats.py --table $OUT/row_stats.jsonl
FLASHFUSE_ATTN_AUTOTUNE=0 timeout 180 python -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_kernels.py \
    "tests/test_attention_zoo.py::test_gpu_nanogpt_bf16_autocast_train" > $OUT/pytest.log 2>&1
echo pytest rc=$?; grep -E "passed|failed|FAILED|Error" $OUT/pytest.log | tail -8
# (at most 8 files come back: the sweeps' JSON are copied out, their logs appended to one)
timeout 100 python benchmarks/attention.py --d 64 128 --n 1024 2048 --causal yes --impls flashfuse sdpa_flash \
    --out /tmp/sweep_g0 > /tmp/sweep_g0.log 2>&1
echo "sweep rc=$?"; grep -E "^d=" /tmp/sweep_g0.log | cut -c1-110
cp /tmp/sweep_g0/*.json $OUT/sweep_g0.json; cp /tmp/sweep_g0.log $OUT/sweeps.log
for g in 100000 16; do
  FLASHFUSE_ATTN_GROUP_HEADS=$g timeout 80 python benchmarks/attention.py --d 64 128 --n 1024 2048 --causal yes \
      --impls flashfuse --out /tmp/sweep_g$g > /tmp/sweep_g$g.log 2>&1
  echo "group_heads=$g rc=$?"; grep -E "^d=" /tmp/sweep_g$g.log | cut -c1-110
  cp /tmp/sweep_g$g/*.json $OUT/sweep_g$g.json; cat /tmp/sweep_g$g.log >> $OUT/sweeps.log
done
