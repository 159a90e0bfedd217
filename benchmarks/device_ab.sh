#!/usr/bin/env bash
# Session 13's second call: hand-written ALiBi and HF padded causal with side loads in the loop (0) or
# hoisted / prefetched (1), same machine, autotuned; then the GPU kernel tests with room to compile.
set -u; OUT=${OUT:-/tmp/flashfuse_out}; mkdir -p $OUT
python -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | grep -v WARN | tail -2
nvidia-smi --query-gpu=name --format=csv,noheader
for p in 0 1 0 1; do
  FLASHFUSE_CACHE_DIR=/tmp/ffcache$p FLASHFUSE_ATTN_SIDE_PREFETCH=$p timeout 90 python benchmarks/attention.py --part handwritten \
      --cases alibi hf_padded_causal nanogpt_causal --out /tmp/hw$p > $OUT/handwritten_prefetch$p.log 2>&1
  echo "prefetch=$p rc=$?"; grep -E "^(alibi|nanogpt|hf_)" $OUT/handwritten_prefetch$p.log | cut -c1-60
done
FLASHFUSE_ATTN_AUTOTUNE=0 timeout 200 python -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_kernels.py \
    > $OUT/pytest_kernels.log 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_kernels.log | tail -6
