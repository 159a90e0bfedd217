#!/usr/bin/env bash
# Session 11's last device call: GPU tests of the huge-fill rewrite (codegen.fills_as_masks: a finfo.min /
# -1e9 fill that leaves no row empty runs as -inf), row_stats.py before (.prev = b423318) / after, then the
# launch order (FLASHFUSE_ATTN_GROUP_HEADS 0 vs 16) on short and long sequences, both causal modes.
# Usage on the device (repo root): bash benchmarks/device_session11b.sh   (results under $OUT)
set -u; OUT=${OUT:-/tmp/flashfuse_out}
python -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | grep -v WARN | tail -2
export FLASHFUSE_CACHE_DIR=/tmp/ffcache
nvidia-smi --query-gpu=name --format=csv,noheader
(cd .prev && python -m pip install . --no-deps --no-build-isolation -q --target /tmp/prev 2>&1 | grep -v WARN | tail -2)
for v in prev now; do
  pp=/tmp/$v; [ $v = now ] && pp=
  PYTHONPATH=$pp FLASHFUSE_ATTN_AUTOTUNE=0 FLASHFUSE_CACHE_DIR=/tmp/ffcache_$v timeout 75 \
      python benchmarks/row_stats.py --label "${v}_fixed" --n 2048 >> $OUT/row_stats.jsonl 2>> $OUT/row_stats.err
  echo "$v rc=$?"
done
python benchmarks/row_stats.py --table $OUT/row_stats.jsonl
FLASHFUSE_ATTN_AUTOTUNE=0 timeout 110 python -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_kernels.py \
    "tests/test_attention_zoo.py::test_gpu_nanogpt_bf16_autocast_train" > $OUT/pytest.log 2>&1
echo pytest rc=$?; grep -E "passed|failed|FAILED|Error" $OUT/pytest.log | tail -8
for g in 0 16; do
  FLASHFUSE_ATTN_GROUP_HEADS=$g timeout 45 python benchmarks/attention.py --d 128 --n 8192 --causal both \
      --modes fwd+bwd --impls flashfuse --out /tmp/sw$g --partial $OUT/order_g$g.json > /tmp/sw$g.log 2>&1
  echo "group_heads=$g rc=$?"; grep -E "^d=" /tmp/sw$g.log | cut -c1-110; cat /tmp/sw$g.log >> $OUT/sweeps.log
done
