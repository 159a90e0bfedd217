#!/usr/bin/env bash
# Session 13's first device call (results: docs/perf-notes.md, Session 13; the side prefetch is now off by
# default, so part 2's A/B needs FLASHFUSE_ATTN_SIDE_PREFETCH=1 for its second run, as written). Next: per-block
# flags for padding rows, LayerNorm backward at N 1024, dropout backward, d128 n1024 causal.
# Usage on the device (repo root): bash benchmarks/device_next.sh
# (results under $OUT). Each part names what it checks.
set -u; OUT=${OUT:-/tmp/flashfuse_out}; mkdir -p $OUT
python -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | grep -v WARN | tail -2
export FLASHFUSE_CACHE_DIR=/tmp/ffcache
nvidia-smi --query-gpu=name --format=csv,noheader
# 1. GPU tests of the kernels (side loads in the loop, the default; the CPU tests cover both settings)
FLASHFUSE_ATTN_AUTOTUNE=0 timeout 120 python -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_kernels.py \
    > $OUT/pytest_kernels.log 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_kernels.log | tail -6
# 2. A/B on one machine, fixed tiles: every side load in the loop (0, the default) vs hoisted / prefetched (1).
#    Session 13's prediction (padding row 0.297 -> ~0.215 ms, ALiBi ~10 % faster) did not hold.
for p in 0 1; do
  FLASHFUSE_ATTN_SIDE_PREFETCH=$p FLASHFUSE_ATTN_AUTOTUNE=0 timeout 70 python benchmarks/row_stats.py --label prefetch$p \
      --cases causal_-inf causal_padding_row causal_alibi_slope >> $OUT/row_stats.jsonl 2> $OUT/row_stats_$p.err
  echo "row_stats prefetch=$p rc=$?"
done
python benchmarks/row_stats.py --table $OUT/row_stats.jsonl
# 3. hand-written rows through torch.compile (autotuned, default settings)
timeout 110 python benchmarks/attention.py --part handwritten --cases nanogpt_causal alibi hf_padded_causal \
    --out /tmp/hw > $OUT/handwritten.log 2>&1
echo "handwritten rc=$?"; grep -E "^(alibi|nanogpt|hf_)" $OUT/handwritten.log
# 4. LayerNorm / RMSNorm at row length 1024, where the LayerNorm backward trails Inductor's (session 13 ran
#    this with ROWS, several rows per backward step, in the search: no gain, reverted)
timeout 100 python benchmarks/norms.py --ops layer_norm,rms_norm --shapes 16384x1024 --ratio-from-graphs \
    --budget-s 80 --out $OUT/n1024 > $OUT/norms_1024.log 2>&1
echo "norms 1024 rc=$?"; grep -E "cg" $OUT/norms_1024.log | head -20
# 5. residual add + norm with the prefetching backward (MEASURED_RATIO's add_* rows come from session 13)
timeout 120 python benchmarks/norms.py --ops add_layer_norm,add_rms_norm --ratio-from-graphs --budget-s 90 \
    --out $OUT > $OUT/norms_add.log 2>&1
echo "norms rc=$?"; grep -E "cg" $OUT/norms_add.log | head -40
