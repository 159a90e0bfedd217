#!/usr/bin/env bash
# One device call: GPT-2 flashfuse (default backward) next to the SDPA rewrite on the same host, then every
# GPU test. Usage on the device (repo root): TAG=_session8 bash benchmarks/device_gpt2_and_gpu_tests.sh
set -u; OUT=${OUT:-/tmp/flashfuse_out}; TAG=${TAG:-}
python -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | grep -v WARN | tail -2
export FLASHFUSE_CACHE_DIR=/tmp/ffcache
nvidia-smi --query-gpu=name --format=csv,noheader
timeout ${GPT_LIMIT:-240} python benchmarks/train_gpt.py --modes flashfuse,sdpa --configs 8x1024,2x4096 --out $OUT --tag "$TAG" > $OUT/train.log 2>&1
echo train rc=$?; grep "^|" $OUT/train.log
timeout ${TEST_LIMIT:-300} python -m pytest -q -p no:cacheprovider -m gpu --durations=5 tests/ > $OUT/pytest.log 2>&1
echo pytest rc=$?; tail -8 $OUT/pytest.log
