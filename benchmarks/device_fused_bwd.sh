#!/usr/bin/env bash
# Session 7 (run in session 8): the fused backward (dQ by atomics in the dK/dV kernel) against the split one, same call, on the device.
# Usage on the device (repo root): bash benchmarks/device_fused_bwd.sh   (results under $OUT)
set -u; OUT=${OUT:-/tmp/flashfuse_out}
python -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | grep -v WARN | tail -2
export FLASHFUSE_CACHE_DIR=/tmp/ffcache
nvidia-smi --query-gpu=name --format=csv,noheader
run() { local name=$1 lim=$2; shift 2; mkdir -p $OUT/$name; echo "=== $name"; timeout $lim "$@" --out $OUT/$name > $OUT/$name.log 2>&1; echo rc=$?; grep -E "^d=" $OUT/$name.log | cut -c1-120 | tail -12; }
B="python benchmarks/attention.py --tokens 16384"
timeout 110 env FLASHFUSE_ATTN_BWD=fused FLASHFUSE_ATTN_AUTOTUNE=0 python -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_kernels.py -k "realistic or gqa_dropout" > $OUT/pytest.log 2>&1; echo pytest rc=$?; tail -3 $OUT/pytest.log
run drop_fused 100 env FLASHFUSE_ATTN_BWD=fused $B --d 64 --n 1024 4096 --causal yes --dropout 0.1 --modes fwd+bwd --impls flashfuse sdpa_flash
run drop_split 60 env FLASHFUSE_ATTN_BWD=split $B --d 64 --n 1024 4096 --causal yes --dropout 0.1 --modes fwd+bwd --impls flashfuse
run nodrop_fused 100 env FLASHFUSE_ATTN_BWD=fused $B --d 64 128 --n 4096 --causal yes --modes fwd+bwd --impls flashfuse sdpa_flash
run nodrop_split 70 env FLASHFUSE_ATTN_BWD=split $B --d 64 128 --n 4096 --causal yes --modes fwd+bwd --impls flashfuse
echo "=== train_gpt (fused backward)"
timeout 170 env FLASHFUSE_ATTN_BWD=fused python benchmarks/train_gpt.py --modes flashfuse --configs 2x4096,8x1024 --out $OUT --tag _session8_fused > $OUT/train.log 2>&1
echo rc=$?; grep "^|" $OUT/train.log
