#!/usr/bin/env bash
# Session 12's device calls. Usage on the device (repo root): bash benchmarks/device_next.sh order|train
# (results under $OUT; at most 8 files). Each part names what it checks.
set -u; OUT=${OUT:-/tmp/flashfuse_out}
python -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | grep -v WARN | tail -2
export FLASHFUSE_CACHE_DIR=/tmp/ffcache
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${1:-order}" = order ]; then
  # 1. GPU tests of the kernels (causal now in the grouped launch order) and the nanoGPT train steps
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 200 python -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_kernels.py \
      "tests/test_attention_zoo.py::test_gpu_nanogpt_bf16_autocast_train" > $OUT/pytest.log 2>&1
  echo pytest rc=$?; grep -E "passed|failed|FAILED|Error" $OUT/pytest.log | tail -8
  # 2. launch order for causal triangles: grid order (0) vs groups of 16 heads (the default now), with FA2
  for g in 0 16; do
    impls="flashfuse"; [ $g = 16 ] && impls="flashfuse sdpa_flash"
    FLASHFUSE_ATTN_GROUP_HEADS=$g timeout 130 python benchmarks/attention.py --d 64 128 --n 1024 2048 --causal yes \
        --modes fwd+bwd --impls $impls --out /tmp/ca$g --partial $OUT/order_causal_g$g.json > /tmp/ca$g.log 2>&1
    echo "group_heads=$g rc=$?"; grep -E "^d=" /tmp/ca$g.log | cut -c1-110
  done
else
  # 3. ALiBi written with a `pos = arange(n)` tensor: its positions now become the indices at run time
  #    (mask_recognition._index_side), so the mask is causal by index; session 12's first call: 0.645 ms
  timeout 110 python benchmarks/attention.py --part handwritten --cases nanogpt_causal alibi --out /tmp/hw > $OUT/alibi.log 2>&1
  echo "alibi rc=$?"; grep -E "^(alibi|nanogpt)" $OUT/alibi.log
  # 4. HF LLaMA-style training steps: the causal mask's finfo.min fill now runs as -inf (skipped blocks), and
  #    right padding splits into causal & a key side; Inductor on the SDPA model is the bar
  for m in llama_pad llama; do
    timeout 225 python benchmarks/train_gpt.py --model $m --configs 8x512 --modes flashfuse,sdpa --out $OUT \
        --tag _session12 > $OUT/train_$m.log 2>&1
    echo "train $m rc=$?"; tail -4 $OUT/train_$m.log
  done
fi
