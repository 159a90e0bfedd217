#!/usr/bin/env bash
# The next device call (written in session 8, when the device time ran out): the GPU tests that session 8
# changed or did not rerun (bits-saving comparison, PReLU's new gradient conventions, custom-Function GELU),
# the causal n 1024 / 2048 rows against FA2, then BERT-large-style and LLaMA-style training steps, flashfuse next to the SDPA rewrite on one host.
# Usage on the device (repo root): bash benchmarks/device_next.sh   (results under $OUT)
set -u; OUT=${OUT:-/tmp/flashfuse_out}
python -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | grep -v WARN | tail -2
export FLASHFUSE_CACHE_DIR=/tmp/ffcache
nvidia-smi --query-gpu=name --format=csv,noheader
# session 9 added GPU tests for its GPU-facing changes (half Q, K upcast for the scores; norms over trailing dims)
timeout 180 python -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_kernels.py::test_gpu_gqa_dropout_bf16 \
    tests/test_pointwise_kernels.py tests/test_pointwise_fusions.py tests/test_norms.py \
    tests/test_attention_zoo.py::test_gpu_half_q_k_upcast_for_the_scores > $OUT/pytest.log 2>&1
echo pytest rc=$?; tail -3 $OUT/pytest.log
# the README's open rows: causal n 1024 (and 2048) fwd / fwd+bwd against FA2, not re-measured since session 2
mkdir -p $OUT/sweep1024
timeout 110 python benchmarks/attention.py --d 64 128 --n 1024 2048 --causal yes --impls flashfuse sdpa_flash \
    --out $OUT/sweep1024 > $OUT/sweep1024.log 2>&1
echo "sweep rc=$?"; grep -E "^d=" $OUT/sweep1024.log | cut -c1-110
for model in bert llama; do
  timeout 145 python benchmarks/train_gpt.py --model $model --modes flashfuse,sdpa --configs 8x512,4x1024 \
      --out $OUT --tag _next > $OUT/train_$model.log 2>&1
  echo "$model rc=$?"; grep "^|" $OUT/train_$model.log
done
