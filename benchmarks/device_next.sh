#!/usr/bin/env bash
# Session 14's device calls. Usage on the device (repo root): bash benchmarks/device_next.sh norms|attention|all
# (all: the attention part, then a shorter norms part, within one 10-minute call; min: this session's
# kernel tests on CUDA and the key-counts A/B)
# (results under $OUT). Each part names what it checks.
set -u; OUT=${OUT:-/tmp/flashfuse_out}; mkdir -p $OUT; PART=${1:-norms}
python -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | grep -v WARN | tail -2
export FLASHFUSE_CACHE_DIR=/tmp/ffcache
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "$PART" = min ]; then
  # this session's kernel changes on CUDA (small shapes): key counts, the device padding check, the norm kernels
  FLASHFUSE_ATTN_AUTOTUNE=0 FLASHFUSE_NORM_AUTOTUNE=0 timeout 100 python -m pytest -q -p no:cacheprovider \
      tests/test_attention_kernels.py::test_key_counts_bound_the_loops \
      tests/test_attention_kernels.py::test_key_blocks_past_the_count_are_never_loaded tests/test_mask_check.py \
      tests/test_norm_kernels.py > $OUT/pytest_min.log 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_min.log | tail -6
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 70 python benchmarks/row_stats.py --label counts \
      --cases causal_-inf causal_padding_row causal_key_counts > $OUT/row_stats.jsonl 2> $OUT/row_stats.err
  echo "row_stats rc=$?"; python benchmarks/row_stats.py --table $OUT/row_stats.jsonl
  exit 0
fi
if [ "$PART" = all ]; then
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 70 python benchmarks/row_stats.py --label counts \
      --cases causal_-inf causal_padding_row causal_key_counts > $OUT/row_stats.jsonl 2> $OUT/row_stats.err
  echo "row_stats rc=$?"; python benchmarks/row_stats.py --table $OUT/row_stats.jsonl
  FLASHFUSE_ATTN_AUTOTUNE=0 FLASHFUSE_NORM_AUTOTUNE=0 timeout 150 python -m pytest -q -p no:cacheprovider -m gpu \
      tests/test_attention_kernels.py tests/test_norm_kernels.py > $OUT/pytest_gpu.log 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_gpu.log | tail -6
  # the device mask check (causal, and now key counts of padding masks) on CUDA
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 60 python -m pytest -q -p no:cacheprovider tests/test_mask_check.py \
      > $OUT/pytest_mask_check.log 2>&1
  echo "pytest mask_check rc=$?"; tail -1 $OUT/pytest_mask_check.log
  timeout 90 python benchmarks/norm_bwd_sweep.py --shapes 16384x1024 --prefetch 1 --out $OUT/norm_bwd_sweep.jsonl \
      > $OUT/norm_bwd_sweep.log 2>&1
  echo "sweep rc=$?"; tail -3 $OUT/norm_bwd_sweep.log
  if [ "${HANDWRITTEN:-0}" = 1 ]; then
    timeout 80 python benchmarks/attention.py --part handwritten --cases nanogpt_causal hf_padded_causal \
        --out /tmp/hw1 > $OUT/handwritten_kc1.log 2>&1
    echo "handwritten rc=$?"; grep -E "^(nanogpt|hf_)" $OUT/handwritten_kc1.log
  fi
fi
if [ "$PART" = norms ]; then
  # LayerNorm fwd+bwd at 16384x1024 trails Inductor by 10 %: the backward kernel alone over PAIRED (row sums
  # reduced in pairs) x PREFETCH x warps x programs per SM, then per-kernel profiles of a fwd+bwd step
  timeout 230 python benchmarks/norm_bwd_sweep.py --shapes 16384x1024,16384x4096 --out $OUT/norm_bwd_sweep.jsonl \
      > $OUT/norm_bwd_sweep.log 2>&1
  echo "sweep rc=$?"; tail -3 $OUT/norm_bwd_sweep.log
  # the ops end to end at 1024 (autotuned; PAIRED on, the default)
  timeout 100 python benchmarks/norms.py --ops layer_norm,rms_norm --shapes 16384x1024 --ratio-from-graphs \
      --budget-s 80 --out $OUT/n1024 > $OUT/norms_1024.log 2>&1
  echo "norms 1024 rc=$?"; grep -E "cg" $OUT/norms_1024.log | head -20
  timeout 60 python -m pytest -q -p no:cacheprovider -m gpu tests/test_norm_kernels.py > $OUT/pytest_norms.log 2>&1
  echo "pytest norms rc=$?"; tail -2 $OUT/pytest_norms.log
fi
if [ "$PART" = attention ]; then
  # right padding as key counts (loop bounds) against the key row and causal alone, fixed tiles, one process
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 90 python benchmarks/row_stats.py --label counts \
      --cases causal_-inf causal_padding_row causal_key_counts > $OUT/row_stats.jsonl 2> $OUT/row_stats.err
  echo "row_stats rc=$?"; python benchmarks/row_stats.py --table $OUT/row_stats.jsonl
  # HF padded causal through torch.compile, autotuned: key counts on (the default) and off
  for kc in 1 0; do
    FLASHFUSE_ATTN_KEY_COUNTS=$kc timeout 100 python benchmarks/attention.py --part handwritten \
        --cases nanogpt_causal hf_padded_causal --out /tmp/hw$kc > $OUT/handwritten_kc$kc.log 2>&1
    echo "handwritten key_counts=$kc rc=$?"; grep -E "^(nanogpt|hf_)" $OUT/handwritten_kc$kc.log
  done
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 170 python -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_kernels.py \
      tests/test_real_models.py > $OUT/pytest_attention.log 2>&1
  echo "pytest attention rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_attention.log | tail -6
fi
