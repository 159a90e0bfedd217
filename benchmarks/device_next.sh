#!/usr/bin/env bash
# The next device call (written in session 11, when the device time ran out). Each part names what it checks.
# Usage on the device (repo root): bash benchmarks/device_next.sh   (results under $OUT; at most 8 files)
set -u; OUT=${OUT:-/tmp/flashfuse_out}
python -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | grep -v WARN | tail -2
export FLASHFUSE_CACHE_DIR=/tmp/ffcache
nvidia-smi --query-gpu=name --format=csv,noheader
# 1. huge fills as masks (codegen.fills_as_masks): the finfo.min causal case should take the -inf case's time;
#    the bool-mask-side case is the unfolded path that keeps the row max and log2(l) apart
FLASHFUSE_ATTN_AUTOTUNE=0 timeout 75 python benchmarks/row_stats.py --label next_fixed --n 2048 > $OUT/row_stats.jsonl 2> $OUT/row_stats.err
echo "row_stats rc=$?"; python benchmarks/row_stats.py --table $OUT/row_stats.jsonl
# 2. GPU tests of the attention kernels (session 11's new bf16 padding-rows test among them)
FLASHFUSE_ATTN_AUTOTUNE=0 timeout 110 python -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_kernels.py \
    "tests/test_attention_zoo.py::test_gpu_nanogpt_bf16_autocast_train" > $OUT/pytest.log 2>&1
echo pytest rc=$?; grep -E "passed|failed|FAILED|Error" $OUT/pytest.log | tail -8
# 3. hand-written variants through torch.compile, the HF additive causal mask among them
timeout 150 python benchmarks/attention.py --part handwritten --out /tmp/hw > $OUT/handwritten.log 2>&1
echo "handwritten rc=$?"; tail -5 $OUT/handwritten.log
# 4. launch order at long sequences: groups of 16 heads gained 1-4 % at n 1024-2048 (H200); default only if
#    n 8192 does not lose
for g in 0 16; do
  FLASHFUSE_ATTN_GROUP_HEADS=$g timeout 100 python benchmarks/attention.py --d 64 128 --n 8192 --causal both \
      --modes fwd+bwd --impls flashfuse --out /tmp/sw$g --partial $OUT/order_g$g.json > /tmp/sw$g.log 2>&1
  echo "group_heads=$g rc=$?"; grep -E "^d=" /tmp/sw$g.log | cut -c1-110
done
