#!/usr/bin/env bash
# Device calls. Usage on the device (repo root): bash benchmarks/device_next.sh norms16|gpt16|wave|attention
# (results under $OUT). Each part names what it checks.
#   wave       the norm backward's grid as one wave of resident programs (GPU tests, then LayerNorm / RMSNorm
#              16384x1024 and 16384x4096 against Inductor), and why key counts slow the attention backward
#              (per-kernel times, causal alone against causal & key counts; triton's own sm_90 counts)
#   norms16    issue 5's table: LayerNorm / RMSNorm at the three shapes with the one-wave backward, then the GPU
#              norm tests, then the attention backward's kernels (causal / key counts)
#   norms16s   the same, short: GPU norm tests, then LayerNorm alone at the three shapes
#   gpt16      issue 7: GPT-2 small train step, flashfuse against Inductor on the SDPA rewrite, 8x1024 and 2x4096
#   attention  HF padded causal through torch.compile (key counts on and off), the GPU attention tests
#   s17a       issue 4: the backward's kernels, causal / key counts, with the launch order grouped (now on for
#              both) and not (GROUP_HEADS=0); issue 5: the norm backward's programs per SM at 16384x1024 and
#              the per-kernel profile against Inductor; then the GPU attention tests
#   s17gpt     issue 7: GPT-2 8x1024 warm-up with the autotuners' configs compiled one by one and at once, then
#              2x4096 and 8x1024, flashfuse / SDPA
#   s17n       issue 5: the partial sums' reduction (column_sum_kernel's configs against torch's sum(0)), the
#              per-kernel profile against Inductor at 16384x1024, the GPU norm tests
#   s18a       issue 5: s17m (GPU norm tests, the column sums timed against torch's sum(0)); issue 4: Nsight
#              Compute on the dK/dV kernel, causal against causal & key counts (why counts cost +26 %), and on
#              d128 n1024 causal's backward kernels; issue 7: GPT-2 8x1024 flashfuse / SDPA after the NaN-row skip
#   s18b       issue 4: causal / key counts dK/dV with the autotuner on (the configs real runs get) and with two
#              stages
#   s18c       issue 4: Nsight Compute again on dK/dV causal / key counts (s18a's reports did not come back:
#              8 files at most); the backward's configurations re-tuned (attention_tune.py had timed one
#              plan over and over) at d128 n1024 causal and d64 n1024 causal dropout 0.1 (GPT-2's case); s18b
#   s18d       issue 7: HF padded causal through torch.compile (key counts on / off), GPT-2 8x1024 Inductor
#              warm-up (the target's anchor), 2x4096 flashfuse / SDPA
#   s18e       after re-tuned config lists: GPU attention tests, n1024 causal fwd+bwd against FA2 (d64, d128),
#              GPT-2 8x1024 flashfuse / SDPA; issue 5: norms.py's CUDA-graph ratios at the 1024-wide rows
#   s18f       s18c in ~3 min (the session's last device minutes): ncu pair, dK/dV tuned at d128 causal and
#              d64 causal p 0.1
#   s18g       the ncu pair alone (dK/dV causal / key counts, details page kept; ~1 min)
#   s19a       issue 4: GPU attention tests for the key-counts change; s18b; d128 n1024 causal's backward re-tuned,
#              then timed against FA2 with the lists and with the tune's best; d64 p 0.1 dK/dV tuned; GPT-2 8x1024
#              flashfuse / SDPA, then flashfuse with that best (kept in /tmp/ff_best_*.env)
#   s19b       issue 5: norms.py's CUDA-graph ratios at 16384x1024 (norms and add+norms); issue 7: GPT-2 at batch 1
#              x 65536 (flashfuse, the layers' tril buffers shared as one bool tensor), HF padded causal through compile (key counts on / off)
#   s19c       after the d128 backward lists' re-tune: GPU attention tests, add+norm ratios at 4096 / 8192, dQ tuned (d128 causal, d64 p 0.1),
#              the sweep against FA2 (n 1024-16384), GPT-2 8x1024 with norm_policy auto (s19b's table) / never
#   s19d       s19c's least: GPU attention tests, the sweep against FA2 (n 1024-8192)
#   s19e       GPU tests of d64's new configurations; GPT-2 8x1024 under norm_policy auto / always (~3.5 min)
#   s20a       GPT-2 8x1024 under norm_policy auto (the producer rule) / always / never, the SDPA rewrite; GPU
#              attention tests (d64's new first dQ config)
#   s20b       s19e's GPU tests of d64's new configurations; GPT-2 8x1024 flashfuse (norm_policy auto), Inductor on the
#              hand-written model (the warm-up anchor), the SDPA rewrite, norm_policy always / never; cold caches each
#   s20c       the backward's builds started at the forward: GPU tests, GPT-2 8x1024 warm-up with / without; the
#              forward's list re-tuned (d64 causal n2048, d64 causal n1024 p 0.1); hand-written nanoGPT / HF padded
#   s20d       s20b and s20c's first things in one call: GPU tests (warm-up, attention kernels), GPT-2 8x1024 with /
#              without the backward warm-up, Inductor hand-written, SDPA rewrite; the forward re-tuned at d64 causal n2048
#   s20e       where GPT-2 8x1024's warm-up goes, with / without the backward's builds ahead (flashfuse's log), the
#              fixed GPU warm-up test, hand-written nanoGPT / HF padded through compile
#   s20f       s20e's least (~3.5 min): the GPU warm-up test, GPT-2 8x1024's warm-up with / without builds ahead, logged
#   s21a       GPT-2 8x1024's warm-up with / without the backward's builds ahead at the forward (session 20), order
#              alternated (0 1 1 0), logged (~6 min); compile-time builds ahead off (FLASHFUSE_BUILD_AHEAD=0)
#   s21b       the builds ahead at compile time (session 21): their GPU tests and the autotuning cache's, then GPT-2
#              8x1024's warm-up with all builds ahead (the default) / none, order alternated (on off off on), logged (~7 min)
#   s22a       the builds ahead at compile time (session 21) and the autotuners timed ahead (session 22): GPU tests, then
#              GPT-2 8x1024's warm-up with everything ahead / nothing ahead, and Inductor on the model as written (~8 min)
#   s22gt      the builds-ahead GPU tests alone (~2 min)
#   s22t       the builds-ahead GPU tests, GPT-2 8x1024 with everything ahead, logged (~3.5 min)
#   s22min     s22a's least (~4.5 min): the builds-ahead GPU tests, GPT-2 8x1024 everything ahead / nothing ahead
#   s22b       s22a's A/B order reversed, and builds ahead without the timing ahead (~5 min)
#   s17prof    issue 7: where each GPT-2 8x1024 step's time goes (torch.profiler), flashfuse and the SDPA rewrite
set -u; OUT=${OUT:-/tmp/flashfuse_out}; mkdir -p $OUT; PART=${1:-wave}
# At most 8 files come back from a call (the device README's limits): a top-level call packs everything it
# wrote under $OUT into results.tgz at the end (Nsight Compute's .ncu-rep files stay behind: too big).
# Parts that run other parts set PACK=0 for them.
PACK=${PACK:-1}
pack_out() {
  [ "$PACK" = 1 ] || return 0
  (cd $OUT && find . -type f ! -name '*.ncu-rep' ! -name results.tgz | tar czf /tmp/results.tgz -T - \
      && find . -mindepth 1 -delete && mv /tmp/results.tgz . && ls -la)
}
trap pack_out EXIT
python -m pip install -e . --no-deps --no-build-isolation -q 2>&1 | grep -v WARN | tail -2
export FLASHFUSE_CACHE_DIR=/tmp/ffcache
# every process times its configs (an A/B by an environment switch must not reuse the other arm's timings)
export FLASHFUSE_AUTOTUNE_CACHE=0
nvidia-smi --query-gpu=name --format=csv,noheader
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
ncu_case() {  # $1 label, $2 kernel regex, rest: row_stats arguments
  local label=$1 kern=$2; shift 2
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 120 $NCU --clock-control none --target-processes all -k regex:$kern -c 1 \
      --set full --import-source yes -o $OUT/ncu_$label -f python benchmarks/row_stats.py --once "$@" \
      > $OUT/ncu_$label.log 2>&1
  echo "ncu $label rc=$?"
  $NCU --import $OUT/ncu_$label.ncu-rep --page details > $OUT/ncu_$label.txt 2>&1
  $NCU --import $OUT/ncu_$label.ncu-rep --page source --csv --print-source sass 2> /dev/null | gzip > $OUT/ncu_${label}_sass.csv.gz
  grep -E "^    (Duration|Registers Per|Achieved Occupancy|Executed Ipc A|Issue Slots Busy|No Eligible|Compute \\(SM\\) Th|Memory Throughput|Executed Instructions |SM Active Cycles|Elapsed Cycles|Warp Cycles Per Issued|Avg. Active Threads|Branch Instructions )" $OUT/ncu_$label.txt | head -16
}
ncu_counts_pair() {  # issue 4: dK/dV causal against causal & key counts, and what tells instructions from idle cycles
  ncu_case dkdv_causal attn_bwd_dkdv --cases causal_-inf
  ncu_case dkdv_counts attn_bwd_dkdv --cases causal_key_counts
  grep -E "SM Frequency|Elapsed Cycles|SM Active Cycles|Executed Instructions |L2 Hit|L1/TEX Hit|Grid Size|Dynamic Shared" \
      $OUT/ncu_dkdv_causal.txt $OUT/ncu_dkdv_counts.txt
}
tune() {  # $1 tag, $2 seconds, $3 kernels ("DKDV DQ"), rest: attention_tune.py arguments
  local tag=$1 secs=$2 kernels=$3; shift 3
  timeout $secs python benchmarks/attention_tune.py --kernels $kernels --out $OUT --tag _$tag "$@" \
      > $OUT/tune_$tag.log 2>&1
  echo "tune $tag rc=$?"; grep -E "FWD|DKDV|DQ |best" $OUT/tune_$tag.log | cut -c1-120
}
pytest_d64_configs() {  # GPU tests of d64's session-19 configurations: the lists' first entries (dQ 64x32), then the
  # added dK/dV entry 32x64 w4 s2 forced
  local T="tests/test_attention_kernels.py::test_gpu_realistic tests/test_attention_kernels.py::test_gpu_gqa_dropout_bf16"
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 45 python -m pytest -q -p no:cacheprovider -m gpu $T -k "64" \
      > $OUT/pytest_d64.log 2>&1
  echo "pytest d64 first configs rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_d64.log | tail -4
  FLASHFUSE_ATTN_AUTOTUNE=0 FLASHFUSE_ATTN_CFG_BWD_DKDV=32,64,4,2 timeout 35 python -m pytest -q -p no:cacheprovider -m gpu $T -k "64" \
      > $OUT/pytest_d64_dkdv_s2.log 2>&1
  echo "pytest d64 dK/dV 32x64 s2 rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_d64_dkdv_s2.log | tail -4
}
gpt_2x4096() {  # $1 seconds: GPT-2 2x4096, flashfuse and the SDPA rewrite
  timeout $1 python benchmarks/train_gpt.py --configs 2x4096 --modes flashfuse,sdpa --out $OUT/b2x4096 --tag _2x4096 \
      > $OUT/train_2x4096.log 2>&1
  echo "2x4096 rc=$?"; tail -4 $OUT/train_2x4096.log
}
best_env() {  # $1 tag: the fastest DKDV / DQ configurations of tune $1 as FLASHFUSE_ATTN_CFG_* assignments
  python - "$OUT/attention_tune_$1.json" <<'PY' | tee /tmp/ff_best_$1.env
import json, sys
rows = [r for r in json.load(open(sys.argv[1])) if r.get("ms")]
names = {"DKDV": "FLASHFUSE_ATTN_CFG_BWD_DKDV", "DQ": "FLASHFUSE_ATTN_CFG_BWD_DQ"}
for kind, name in names.items():
    cand = [r for r in rows if r["kernel"] == kind]
    if cand:
        print(f"{name}={','.join(map(str, min(cand, key=lambda r: r['ms'])['cfg']))}", end=" ")
print()
PY
}
if [ "$PART" = wave ] || [ "$PART" = short ]; then
  # most wanted first: a call cut by its time limit still returns what is under $OUT
  timeout 130 python benchmarks/norms.py --ops layer_norm,rms_norm --shapes ${NORM_SHAPES:-16384x1024} \
      --ratio-from-graphs --budget-s 110 --out $OUT/norms_wave > $OUT/norms_wave.log 2>&1
  echo "norms rc=$?"; grep -E "fwd\+bwd cg|ratio" $OUT/norms_wave.log | head -24
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 70 python benchmarks/row_stats.py --label counts --profile \
      --cases causal_-inf causal_key_counts causal_key_counts causal_-inf > $OUT/row_stats_profile.jsonl 2> $OUT/row_stats_profile.err
  echo "row_stats rc=$?"; python benchmarks/row_stats.py --table $OUT/row_stats_profile.jsonl
  [ "$PART" = short ] && exit 0  # short: the two timings alone
  FLASHFUSE_ATTN_AUTOTUNE=0 FLASHFUSE_NORM_AUTOTUNE=0 timeout 100 python -m pytest -q -p no:cacheprovider -m gpu \
      tests/test_norm_kernels.py tests/test_attention_kernels.py::test_key_counts_bound_the_loops \
      tests/test_attention_kernels.py::test_key_blocks_past_the_count_are_never_loaded > $OUT/pytest_wave.log 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_wave.log | tail -6
  for pad in none counts; do
    timeout 30 python benchmarks/sass_counts.py --kernel attn_bwd_dkdv attn_bwd_dq --padding $pad 2>&1 \
        | grep -v "DROPOUT=[13]" | tee -a $OUT/sass_triton36.txt
  done
fi
if [ "$PART" = norms16 ]; then
  timeout 240 python benchmarks/norms.py --ops layer_norm,rms_norm --shapes 16384x1024,16384x4096,4096x8192 \
      --ratio-from-graphs --budget-s 200 --out $OUT/norms16 > $OUT/norms16.log 2>&1
  echo "norms rc=$?"; grep -E "fwd\+bwd cg|ratio|GB/s" $OUT/norms16.log | head -40
  FLASHFUSE_NORM_AUTOTUNE=0 timeout 100 python -m pytest -q -p no:cacheprovider -m gpu tests/test_norm_kernels.py \
      > $OUT/pytest_norms16.log 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_norms16.log | tail -6
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 50 python benchmarks/row_stats.py --label counts --profile \
      --cases causal_-inf causal_key_counts causal_key_counts causal_-inf > $OUT/row_stats_profile.jsonl 2> $OUT/row_stats_profile.err
  echo "row_stats rc=$?"; python benchmarks/row_stats.py --table $OUT/row_stats_profile.jsonl
fi
if [ "$PART" = norms16s ]; then  # the short form (~300 s): the GPU norm tests first, then LayerNorm's three shapes
  FLASHFUSE_NORM_AUTOTUNE=0 timeout 100 python -m pytest -q -p no:cacheprovider -m gpu tests/test_norm_kernels.py \
      > $OUT/pytest_norms16.log 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_norms16.log | tail -6
  timeout 150 python benchmarks/norms.py --ops layer_norm --shapes 16384x1024,16384x4096,4096x8192 \
      --ratio-from-graphs --budget-s 120 --out $OUT/norms16 > $OUT/norms16.log 2>&1
  echo "norms rc=$?"; grep -E "fwd\+bwd cg|ratio|GB/s" $OUT/norms16.log | head -30
fi
if [ "$PART" = gpt16 ]; then
  timeout 520 python benchmarks/train_gpt.py --configs 8x1024,2x4096 --modes flashfuse,sdpa --out $OUT --tag _session16 \
      > $OUT/train_gpt16.log 2>&1
  echo "train rc=$?"; tail -20 $OUT/train_gpt16.log
fi
if [ "$PART" = tiny ]; then
  # LayerNorm 16384x1024 fwd+bwd against Inductor, then the attention backward's kernels (causal / counts)
  timeout 80 python benchmarks/norms.py --ops layer_norm --shapes 16384x1024 --ratio-from-graphs --budget-s 60 \
      --out $OUT/norms_tiny > $OUT/norms_tiny.log 2>&1
  echo "norms rc=$?"; grep -E "fwd\+bwd cg|ratio" $OUT/norms_tiny.log | head -8
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 50 python benchmarks/row_stats.py --label counts --profile \
      --cases causal_-inf causal_key_counts causal_key_counts causal_-inf > $OUT/row_stats_profile.jsonl 2> $OUT/row_stats_profile.err
  echo "row_stats rc=$?"; python benchmarks/row_stats.py --table $OUT/row_stats_profile.jsonl
fi
if [ "$PART" = s17a ]; then
  for g in 16 0; do
    FLASHFUSE_ATTN_GROUP_HEADS=$g FLASHFUSE_ATTN_AUTOTUNE=0 timeout 60 python benchmarks/row_stats.py --label g$g --profile \
        --cases causal_-inf causal_key_counts causal_key_counts causal_-inf >> $OUT/row_stats_groups.jsonl 2>> $OUT/row_stats_groups.err
    echo "row_stats G=$g rc=$?"
  done
  python benchmarks/row_stats.py --table $OUT/row_stats_groups.jsonl
  timeout 150 python benchmarks/norm_bwd_sweep.py --shapes 16384x1024 --kinds rms_norm,layer_norm --prefetch 1 \
      --out $OUT/norm_bwd_sweep.jsonl > $OUT/norm_bwd_sweep.log 2>&1
  echo "sweep rc=$?"; grep -E '"part": "profile"' $OUT/norm_bwd_sweep.log | cut -c1-400
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 200 python -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_kernels.py \
      tests/test_launch.py > $OUT/pytest_attention.log 2>&1
  echo "pytest attention rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_attention.log | tail -6
fi
if [ "$PART" = s17gpt ]; then
  # 8x1024 warm-up with the autotuners' configs compiled one by one, then at once (fresh Triton / Inductor
  # caches each); then the SDPA rewrite at 8x1024, and both at 2x4096
  for pc in 0 1; do
    FLASHFUSE_PARALLEL_COMPILE=$pc TRITON_CACHE_DIR=/tmp/tc$pc TORCHINDUCTOR_CACHE_DIR=/tmp/ic$pc FLASHFUSE_CACHE_DIR=/tmp/fc$pc \
        timeout 110 python benchmarks/train_gpt.py --configs 8x1024 --modes flashfuse --out $OUT/pc$pc --tag _pc$pc \
        > $OUT/train_pc$pc.log 2>&1
    echo "parallel_compile=$pc rc=$?"; tail -3 $OUT/train_pc$pc.log
  done
  timeout 80 python benchmarks/train_gpt.py --configs 8x1024 --modes sdpa --out $OUT/sdpa1024 --tag _sdpa1024 \
      > $OUT/train_sdpa1024.log 2>&1
  echo "sdpa 8x1024 rc=$?"; tail -3 $OUT/train_sdpa1024.log
  gpt_2x4096 200
fi
if [ "$PART" = s17n ]; then  # issue 5: the partial sums' reduction (torch's sum(0) took 15 us of RMSNorm's 76)
  timeout 100 python benchmarks/norm_bwd_sweep.py --parts colsum,profile --shapes 16384x1024 \
      --kinds rms_norm,layer_norm --out $OUT/norm_colsum.jsonl > $OUT/norm_colsum.log 2>&1
  echo "colsum rc=$?"; grep -E '"default"|torch_sum0|"part": "profile"' $OUT/norm_colsum.log | cut -c1-330
  FLASHFUSE_NORM_AUTOTUNE=0 timeout 110 python -m pytest -q -p no:cacheprovider -m gpu tests/test_norm_kernels.py \
      > $OUT/pytest_norms17.log 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_norms17.log | tail -6
fi
if [ "$PART" = s17m ]; then  # the least of s17n (~2.5 min): GPU norm tests, then RMSNorm / LayerNorm 16384x1024
  # per kernel with the new reduction and with torch's sum(0) (FLASHFUSE_NORM_COLSUM=torch), one process each
  FLASHFUSE_NORM_AUTOTUNE=0 timeout 100 python -m pytest -q -p no:cacheprovider -m gpu tests/test_norm_kernels.py \
      > $OUT/pytest_norms17.log 2>&1
  echo "pytest rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_norms17.log | tail -6
  for cs in kernel torch; do
    FLASHFUSE_NORM_COLSUM=$([ $cs = torch ] && echo torch) timeout 40 python benchmarks/norm_bwd_sweep.py --parts profile \
        --shapes 16384x1024 --kinds rms_norm,layer_norm --out $OUT/norm_profile_$cs.jsonl > $OUT/norm_profile_$cs.log 2>&1
    echo "profile colsum=$cs rc=$?"; grep -E '"impl": "flashfuse"' $OUT/norm_profile_$cs.log | cut -c1-300
  done
fi
if [ "$PART" = s18a ]; then
  PACK=0 bash benchmarks/device_next.sh s17m 2>&1 | grep -v "^NVIDIA"
  ncu_counts_pair
  timeout 220 python benchmarks/train_gpt.py --configs 8x1024 --modes flashfuse,sdpa --out $OUT/gpt1024 --tag _s18 \
      > $OUT/train_gpt1024.log 2>&1
  echo "GPT-2 8x1024 rc=$?"; tail -4 $OUT/train_gpt1024.log
  ncu_case d128_dkdv_causal attn_bwd_dkdv --cases causal_-inf --n 1024 --d 128
  ncu_case d128_dq_causal attn_bwd_dq --cases causal_-inf --n 1024 --d 128
fi
if [ "$PART" = s18b ]; then
  timeout 150 python benchmarks/row_stats.py --label tuned --profile \
      --cases causal_-inf causal_key_counts causal_key_counts causal_-inf > $OUT/row_stats_tuned.jsonl 2> $OUT/row_stats_tuned.err
  echo "row_stats tuned rc=$?"; python benchmarks/row_stats.py --table $OUT/row_stats_tuned.jsonl
  grep -o '"configs".*' $OUT/row_stats_tuned.jsonl | tail -1
  FLASHFUSE_ATTN_CFG_BWD_DKDV=32,64,4,2 FLASHFUSE_ATTN_AUTOTUNE=0 timeout 60 python benchmarks/row_stats.py --label stages2 \
      --profile --cases causal_-inf causal_key_counts > $OUT/row_stats_stages2.jsonl 2> $OUT/row_stats_stages2.err
  echo "row_stats stages2 rc=$?"; python benchmarks/row_stats.py --table $OUT/row_stats_stages2.jsonl
fi
if [ "$PART" = s18d ]; then
  for kc in 1 0; do
    FLASHFUSE_ATTN_KEY_COUNTS=$kc timeout 80 python benchmarks/attention.py --part handwritten \
        --cases nanogpt_causal hf_padded_causal --out /tmp/hw$kc > $OUT/handwritten_kc$kc.log 2>&1
    echo "handwritten key_counts=$kc rc=$?"; grep -E "^(nanogpt|hf_)" $OUT/handwritten_kc$kc.log
  done
  timeout 130 python benchmarks/train_gpt.py --configs 8x1024 --modes inductor --out $OUT/ind1024 --tag _ind1024 \
      > $OUT/train_ind1024.log 2>&1
  echo "inductor 8x1024 rc=$?"; tail -3 $OUT/train_ind1024.log
  gpt_2x4096 150
fi
if [ "$PART" = s18c ] || [ "$PART" = s18f ]; then  # s18f: dK/dV alone, in about 3 min
  ncu_counts_pair
  if [ "$PART" = s18c ]; then secs=140 kernels="DKDV DQ"; else secs=75 kernels=DKDV; fi
  tune d128_causal $secs "$kernels" --d 128 --n 1024 --causal yes
  tune d64_causal_p01 $secs "$kernels" --d 64 --n 1024 --causal yes --dropout 0.1
fi
if [ "$PART" = s18c ]; then
  PACK=0 bash benchmarks/device_next.sh s18b 2>&1 | grep -v "^NVIDIA"
fi
if [ "$PART" = s18e ]; then
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 150 python -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_kernels.py \
      > $OUT/pytest_attention.log 2>&1
  echo "pytest attention rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_attention.log | tail -6
  timeout 120 python benchmarks/attention.py --part sweep --d 64 128 --n 1024 --causal yes --modes fwd fwd+bwd \
      --impls flashfuse sdpa_flash --out $OUT/sweep1024 > $OUT/sweep1024.log 2>&1
  echo "sweep n1024 rc=$?"; grep -E "flashfuse|sdpa_flash" $OUT/sweep1024.log | tail -8
  timeout 130 python benchmarks/train_gpt.py --configs 8x1024 --modes flashfuse,sdpa --out $OUT/gpt1024 --tag _s18e \
      > $OUT/train_gpt1024.log 2>&1
  echo "GPT-2 8x1024 rc=$?"; tail -4 $OUT/train_gpt1024.log
  timeout 130 python benchmarks/norms.py --ops layer_norm,rms_norm --shapes 16384x1024 --ratio-from-graphs \
      --budget-s 110 --out $OUT/norms1024 > $OUT/norms1024.log 2>&1
  echo "norms rc=$?"; grep -E "fwd\+bwd cg|ratio|MEASURED|rms_norm|layer_norm" $OUT/norms1024.log | tail -12
fi
if [ "$PART" = s18g ]; then
  ncu_counts_pair
fi
if [ "$PART" = s19a ]; then  # ~7 min: issue 4's kernel change tested and timed, the backward re-tuned, GPT-2
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 150 python -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_kernels.py \
      tests/test_mask_check.py > $OUT/pytest_attention.log 2>&1
  echo "pytest attention rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_attention.log | tail -6
  PACK=0 bash benchmarks/device_next.sh s18b 2>&1 | grep -v "^NVIDIA"
  tune d128_causal 130 "DKDV DQ" --d 128 --n 1024 --causal yes
  best=$(best_env d128_causal)
  for cfg in "" "$best"; do  # the autotuned lists, then the tune's best forced
    env $cfg timeout 60 python benchmarks/attention.py --part sweep --d 128 --n 1024 --causal yes --modes fwd+bwd \
        --impls flashfuse sdpa_flash --out $OUT/sweep_d128${cfg:+_best} > $OUT/sweep_d128${cfg:+_best}.log 2>&1
    echo "sweep d128 [$cfg] rc=$?"; grep -E "flashfuse|sdpa_flash" $OUT/sweep_d128${cfg:+_best}.log | tail -3
  done
  tune d64_causal_p01 80 DKDV --d 64 --n 1024 --causal yes --dropout 0.1
  best=$(best_env d64_causal_p01)
  timeout 110 python benchmarks/train_gpt.py --configs 8x1024 --modes flashfuse,sdpa --out $OUT/gpt1024 --tag _s19 \
      > $OUT/train_gpt1024.log 2>&1
  echo "GPT-2 8x1024 rc=$?"; tail -4 $OUT/train_gpt1024.log
  env $best timeout 70 python benchmarks/train_gpt.py --configs 8x1024 --modes flashfuse --out $OUT/gpt1024_best \
      --tag _s19best > $OUT/train_gpt1024_best.log 2>&1
  echo "GPT-2 8x1024 [$best] rc=$?"; tail -3 $OUT/train_gpt1024_best.log
fi
if [ "$PART" = s19b ]; then  # ~9 min: issue 5's 1024-wide ratios (norms and add+norms); issue 7: the longest
  # sequence GPT-2 trains at batch 1 (target >= 64k, never measured), HF padded through compile (key counts on / off)
  timeout 210 python benchmarks/norms.py --ops layer_norm,rms_norm,add_layer_norm,add_rms_norm --shapes 16384x1024 \
      --ratio-from-graphs --budget-s 190 --out $OUT/norms1024 > $OUT/norms1024.log 2>&1
  echo "norms rc=$?"; sed -n '/# MEASURED_RATIO/,$p' $OUT/norms1024.log | head -12
  timeout 220 python benchmarks/train_gpt.py --modes flashfuse --longest 65536 --shared-mask --out $OUT/longest \
      --tag _s19 > $OUT/train_longest.log 2>&1
  echo "longest rc=$?"; grep -E '^\{' $OUT/train_longest.log | tail -2 | cut -c1-400
  for kc in 1 0; do
    FLASHFUSE_ATTN_KEY_COUNTS=$kc timeout 55 python benchmarks/attention.py --part handwritten \
        --cases nanogpt_causal hf_padded_causal --out /tmp/hw$kc > $OUT/handwritten_kc$kc.log 2>&1
    echo "handwritten key_counts=$kc rc=$?"; grep -E "^(nanogpt|hf_)" $OUT/handwritten_kc$kc.log
  done
fi
if [ "$PART" = s19c ]; then  # ~8 min, after the d128 backward lists were re-tuned: GPU attention tests (the
  # new first configs), dQ tuned at d128 causal and d64 causal p 0.1, the sweep against FA2 at n 1024-16384,
  # GPT-2 8x1024 with d64 p 0.1's best dQ
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 150 python -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_kernels.py \
      > $OUT/pytest_attention.log 2>&1
  echo "pytest attention rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_attention.log | tail -6
  timeout 70 python benchmarks/norms.py --ops add_layer_norm,add_rms_norm --shapes 16384x4096,4096x8192 \
      --ratio-from-graphs --budget-s 55 --out $OUT/norms_add > $OUT/norms_add.log 2>&1
  echo "norms add rc=$?"; sed -n '/# MEASURED_RATIO/,$p' $OUT/norms_add.log | head -8
  tune d128_causal_dq 60 DQ --d 128 --n 1024 --causal yes
  tune d64_causal_p01_dq 60 DQ --d 64 --n 1024 --causal yes --dropout 0.1
  best=$(best_env d64_causal_p01_dq)
  timeout 200 python benchmarks/attention.py --part sweep --d 128 64 --n 1024 2048 4096 8192 16384 --causal both \
      --modes fwd fwd+bwd --impls flashfuse sdpa_flash --out $OUT/sweep --partial $OUT/sweep_partial.json \
      > $OUT/sweep.log 2>&1
  echo "sweep rc=$?"; grep -E "flashfuse|sdpa_flash" $OUT/sweep.log | tr -s ' ' | sed 's/ TFLOP.s//'
  for np in auto never; do  # the 1024-wide norm ratios of s19b flip "auto" to flashfuse's (add+)LayerNorm in GPT-2
    timeout 70 python benchmarks/train_gpt.py --configs 8x1024 --modes flashfuse --norm-policy $np \
        --out $OUT/gpt1024_$np --tag _s19c_$np > $OUT/train_gpt1024_$np.log 2>&1
    echo "GPT-2 8x1024 norm_policy=$np rc=$?"; tail -1 $OUT/train_gpt1024_$np.log
  done
fi
if [ "$PART" = s19d ]; then  # s19c's least (~5 min): GPU attention tests, the sweep against FA2
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 150 python -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_kernels.py \
      > $OUT/pytest_attention.log 2>&1
  echo "pytest attention rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_attention.log | tail -6
  timeout 170 python benchmarks/attention.py --part sweep --d 128 64 --n 1024 2048 4096 8192 --causal both \
      --modes fwd fwd+bwd --impls flashfuse sdpa_flash --out $OUT/sweep --partial $OUT/sweep_partial.json \
      > $OUT/sweep.log 2>&1
  echo "sweep rc=$?"; grep -E "flashfuse|sdpa_flash" $OUT/sweep.log | tr -s ' ' | sed 's/ TFLOP.s//'
fi
if [ "$PART" = s19e ]; then  # ~3.5 min, the session's last device minutes: GPU tests of d64's new configurations
  # (first dQ config 64x32; the added dK/dV entry 32x64 w4 s2 forced), then GPT-2 8x1024 under norm_policy auto
  # (the producer rule: GPT-2's norms stay with Inductor) and always
  pytest_d64_configs
  for np in auto always; do
    TRITON_CACHE_DIR=/tmp/tc_$np timeout 70 python benchmarks/train_gpt.py --configs 8x1024 --modes flashfuse \
        --norm-policy $np --out $OUT/gpt1024_$np --tag _s19e_$np > $OUT/train_gpt1024_$np.log 2>&1
    echo "GPT-2 8x1024 norm_policy=$np rc=$?"; tail -1 $OUT/train_gpt1024_$np.log
  done
fi
if [ "$PART" = s20a ]; then  # ~9 min: issue 7: GPT-2 8x1024 flashfuse with the norm producer rule (default) against
  # norm_policy always / never (each its own process with a fresh Triton cache, limits long enough for the warm-up:
  # s19c's 70 s cut one), the SDPA rewrite on the same host; issue 4: GPU attention tests (d64's new first dQ config)
  for np in auto always never; do
    TRITON_CACHE_DIR=/tmp/tc_$np timeout 130 python benchmarks/train_gpt.py --configs 8x1024 --modes flashfuse \
        --norm-policy $np --out $OUT/gpt1024_$np --tag _s20_$np > $OUT/train_gpt1024_$np.log 2>&1
    echo "GPT-2 8x1024 norm_policy=$np rc=$?"; tail -1 $OUT/train_gpt1024_$np.log
  done
  timeout 80 python benchmarks/train_gpt.py --configs 8x1024 --modes sdpa --out $OUT/sdpa1024 --tag _s20_sdpa \
      > $OUT/train_sdpa1024.log 2>&1
  echo "SDPA 8x1024 rc=$?"; tail -1 $OUT/train_sdpa1024.log
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 150 python -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_kernels.py \
      > $OUT/pytest_attention.log 2>&1
  echo "pytest attention rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_attention.log | tail -6
fi
fresh_gpt() {  # $1 tag, $2 seconds, rest: train_gpt.py arguments; fresh Triton / Inductor / flashfuse caches, so the
  # warm-up is a cold compile whatever ran before
  local tag=$1 secs=$2; shift 2
  TRITON_CACHE_DIR=/tmp/tc_$tag TORCHINDUCTOR_CACHE_DIR=/tmp/ic_$tag FLASHFUSE_CACHE_DIR=/tmp/fc_$tag \
      timeout $secs python benchmarks/train_gpt.py "$@" --out $OUT/gpt_$tag --tag _$tag > $OUT/train_$tag.log 2>&1
  echo "GPT-2 $tag rc=$?"; tail -1 $OUT/train_$tag.log
}
if [ "$PART" = s20b ]; then  # ~6-8 min: s19e's GPU tests of d64's new configurations; issue 7: GPT-2 8x1024 flashfuse
  # under norm_policy auto (the producer rule), Inductor on the hand-written model (the warm-up target's anchor), the
  # SDPA rewrite, then norm_policy always / never; every run with cold caches
  pytest_d64_configs
  fresh_gpt ff_auto 110 --configs 8x1024 --modes flashfuse --norm-policy auto
  fresh_gpt inductor 120 --configs 8x1024 --modes inductor
  fresh_gpt sdpa 90 --configs 8x1024 --modes sdpa
  fresh_gpt ff_always 110 --configs 8x1024 --modes flashfuse --norm-policy always
  fresh_gpt ff_never 100 --configs 8x1024 --modes flashfuse --norm-policy never
fi
if [ "$PART" = s20c ]; then  # ~7.5 min: the backward's builds started at the forward (GPU tests, then GPT-2 8x1024's
  # warm-up with and without, cold caches each); issue 4: the forward's list re-tuned with the fixed script (nanoGPT's
  # d64 causal n2048, GPT-2's d64 causal n1024 p 0.1), hand-written nanoGPT / HF padded through compile
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 170 python -m pytest -q -p no:cacheprovider -m gpu tests/test_builds_ahead.py \
      tests/test_attention_kernels.py > $OUT/pytest_attention.log 2>&1
  echo "pytest attention rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_attention.log | tail -6
  fresh_gpt warm1 100 --configs 8x1024 --modes flashfuse
  export FLASHFUSE_WARM_BACKWARD=0; fresh_gpt warm0 100 --configs 8x1024 --modes flashfuse; unset FLASHFUSE_WARM_BACKWARD
  tune d64_causal_fwd 60 FWD --d 64 --n 2048 --causal yes
  tune d64_causal_p01_fwd 60 FWD --d 64 --n 1024 --causal yes --dropout 0.1
  timeout 60 python benchmarks/attention.py --part handwritten --cases nanogpt_causal hf_padded_causal \
      --out /tmp/hw > $OUT/handwritten.log 2>&1
  echo "handwritten rc=$?"; grep -E "^(nanogpt|hf_)" $OUT/handwritten.log
fi
if [ "$PART" = s20d ]; then  # ~7-9 min, s20b and s20c's first things in one call (starts are scarce): GPU tests of the
  # backward warm-up and the attention kernels; GPT-2 8x1024 with / without the warm-up, Inductor on the hand-written
  # model and the SDPA rewrite (cold caches each); the forward's list re-tuned at nanoGPT's d64 causal n2048
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 150 python -m pytest -q -p no:cacheprovider -m gpu tests/test_builds_ahead.py \
      tests/test_attention_kernels.py > $OUT/pytest_attention.log 2>&1
  echo "pytest attention rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_attention.log | tail -6
  fresh_gpt warm1 90 --configs 8x1024 --modes flashfuse
  fresh_gpt inductor 100 --configs 8x1024 --modes inductor
  export FLASHFUSE_WARM_BACKWARD=0; fresh_gpt warm0 90 --configs 8x1024 --modes flashfuse; unset FLASHFUSE_WARM_BACKWARD
  fresh_gpt sdpa 70 --configs 8x1024 --modes sdpa
  tune d64_causal_fwd 55 FWD --d 64 --n 2048 --causal yes
fi
if [ "$PART" = s20e ]; then  # ~5 min: where GPT-2 8x1024's warm-up goes with the backward's builds ahead and without
  # (flashfuse's log: each attention plan's first call, the background builds; cold caches; off first this time), the
  # fixed GPU warm-up test, hand-written nanoGPT / HF padded through compile (issue 4's <= 0.20 ms)
  timeout 60 python -m pytest -q -p no:cacheprovider -m gpu tests/test_builds_ahead.py > $OUT/pytest_warmup.log 2>&1
  echo "pytest warm-up rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_warmup.log | tail -4
  export FLASHFUSE_LOG=info
  export FLASHFUSE_WARM_BACKWARD=0; fresh_gpt warm0 90 --configs 8x1024 --modes flashfuse; unset FLASHFUSE_WARM_BACKWARD
  grep -E "attention (forward|backward)" $OUT/train_warm0.log | cut -c1-200
  fresh_gpt warm1 90 --configs 8x1024 --modes flashfuse
  grep -E "attention (forward|backward)" $OUT/train_warm1.log | cut -c1-200
  unset FLASHFUSE_LOG
  timeout 70 python benchmarks/attention.py --part handwritten --cases nanogpt_causal hf_padded_causal \
      --out /tmp/hw > $OUT/handwritten.log 2>&1
  echo "handwritten rc=$?"; grep -E "^(nanogpt|hf_)" $OUT/handwritten.log
fi
if [ "$PART" = s20f ]; then  # ~3.5 min, s20e's least: the fixed GPU warm-up test; GPT-2 8x1024's warm-up with / without
  # the backward's builds ahead, flashfuse's log of each attention plan's first call and of the background builds
  timeout 50 python -m pytest -q -p no:cacheprovider -m gpu tests/test_builds_ahead.py > $OUT/pytest_warmup.log 2>&1
  echo "pytest warm-up rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_warmup.log | tail -4
  export FLASHFUSE_LOG=info
  for w in 1 0; do
    export FLASHFUSE_WARM_BACKWARD=$w; fresh_gpt warm$w 80 --configs 8x1024 --modes flashfuse
    grep -E "attention (forward|backward)" $OUT/train_warm$w.log | cut -c1-200
  done
fi
if [ "$PART" = s21a ]; then  # ~6 min: GPT-2 8x1024's warm-up with / without the backward's builds ahead, the order
  # alternated (s20d and s20f ran "with" first both times: the first process of a call pays cold caches), logged
  export FLASHFUSE_LOG=info FLASHFUSE_BUILD_AHEAD=0
  for w in 0 1 1 0; do
    export FLASHFUSE_WARM_BACKWARD=$w; fresh_gpt warm${w}_$RANDOM 80 --configs 8x1024 --modes flashfuse
  done
  grep -E "attention (forward|backward)" $OUT/train_warm*.log | cut -c1-200
fi
if [ "$PART" = s21b ]; then  # ~7 min: the builds ahead at compile time: GPU tests (nothing left for the first calls to
  # build), then GPT-2 8x1024's warm-up with every build ahead (the default) and with none, order alternated, logged
  timeout 120 python -m pytest -q -p no:cacheprovider -m gpu tests/test_builds_ahead.py tests/test_launch.py \
      > $OUT/pytest_ahead.log 2>&1
  echo "pytest builds ahead rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_ahead.log | tail -6
  export FLASHFUSE_LOG=info
  for w in 1 0 0 1; do
    export FLASHFUSE_BUILD_AHEAD=$w FLASHFUSE_WARM_BACKWARD=$w; fresh_gpt ahead${w}_$RANDOM 80 --configs 8x1024 --modes flashfuse
  done
  grep -E "attention (forward|backward)|builds ahead" $OUT/train_ahead*.log | cut -c1-220
fi
if [ "$PART" = s22a ]; then  # ~8 min: the builds ahead at compile time (session 21) and the autotuners timed ahead by the
  # builder (session 22): their GPU tests, then GPT-2 8x1024's warm-up with everything ahead (the default), nothing
  # ahead, and Inductor on the model as written (the target's anchor, same host), cold caches each, logged
  timeout 110 python -m pytest -q -p no:cacheprovider -m gpu tests/test_builds_ahead.py tests/test_launch.py \
      > $OUT/pytest_ahead.log 2>&1
  echo "pytest builds ahead rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_ahead.log | tail -6
  export FLASHFUSE_LOG=info
  FLASHFUSE_BUILD_AHEAD=1 FLASHFUSE_WARM_BACKWARD=1 FLASHFUSE_TUNE_AHEAD=1 fresh_gpt all1_$RANDOM 85 --configs 8x1024 --modes flashfuse
  FLASHFUSE_BUILD_AHEAD=0 FLASHFUSE_WARM_BACKWARD=0 FLASHFUSE_TUNE_AHEAD=0 fresh_gpt none1_$RANDOM 85 --configs 8x1024 --modes flashfuse
  [ $SECONDS -lt 320 ] && fresh_gpt inductor_$RANDOM 100 --configs 8x1024 --modes inductor
  grep -E "attention (forward|backward)|builds ahead" $OUT/train_all*.log $OUT/train_none*.log | cut -c1-220
  grep -o '"warmup_s[^]]*]]' $OUT/train_*.log
fi
if [ "$PART" = s22gt ]; then  # ~2 min: the builds-ahead GPU tests alone
  timeout 100 python -m pytest -q -p no:cacheprovider -m gpu tests/test_builds_ahead.py > $OUT/pytest_ahead.log 2>&1
  echo "pytest builds ahead rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_ahead.log | tail -8
fi
if [ "$PART" = s22t ]; then  # ~3.5 min: the builds-ahead GPU tests, then GPT-2 8x1024's warm-up with everything ahead,
  # logged (where the warm-up goes; no A/B)
  timeout 100 python -m pytest -q -p no:cacheprovider -m gpu tests/test_builds_ahead.py > $OUT/pytest_ahead.log 2>&1
  echo "pytest builds ahead rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_ahead.log | tail -6
  export FLASHFUSE_LOG=info
  fresh_gpt all1_$RANDOM 80 --configs 8x1024 --modes flashfuse
  grep -E "attention (forward|backward)|builds ahead" $OUT/train_*.log | cut -c1-220
  grep -o '"warmup_s[^]]*]]' $OUT/train_*.log
fi
if [ "$PART" = s22min ]; then  # ~4.5 min, s22a's least: the builds-ahead GPU tests, then GPT-2 8x1024's warm-up with
  # everything ahead and with nothing ahead, cold caches each, logged
  timeout 100 python -m pytest -q -p no:cacheprovider -m gpu tests/test_builds_ahead.py > $OUT/pytest_ahead.log 2>&1
  echo "pytest builds ahead rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_ahead.log | tail -6
  export FLASHFUSE_LOG=info
  FLASHFUSE_BUILD_AHEAD=1 FLASHFUSE_WARM_BACKWARD=1 FLASHFUSE_TUNE_AHEAD=1 fresh_gpt all1_$RANDOM 80 --configs 8x1024 --modes flashfuse
  FLASHFUSE_BUILD_AHEAD=0 FLASHFUSE_WARM_BACKWARD=0 FLASHFUSE_TUNE_AHEAD=0 fresh_gpt none1_$RANDOM 80 --configs 8x1024 --modes flashfuse
  grep -E "attention (forward|backward)|builds ahead" $OUT/train_*.log | cut -c1-220
  grep -o '"warmup_s[^]]*]]' $OUT/train_*.log
fi
if [ "$PART" = s22b ]; then  # ~5 min: s22a's A/B again, order reversed, and the builds ahead without the timing ahead
  export FLASHFUSE_LOG=info
  FLASHFUSE_BUILD_AHEAD=0 FLASHFUSE_WARM_BACKWARD=0 FLASHFUSE_TUNE_AHEAD=0 fresh_gpt none2_$RANDOM 85 --configs 8x1024 --modes flashfuse
  FLASHFUSE_BUILD_AHEAD=1 FLASHFUSE_WARM_BACKWARD=1 FLASHFUSE_TUNE_AHEAD=0 fresh_gpt notune_$RANDOM 85 --configs 8x1024 --modes flashfuse
  FLASHFUSE_BUILD_AHEAD=1 FLASHFUSE_WARM_BACKWARD=1 FLASHFUSE_TUNE_AHEAD=1 fresh_gpt all2_$RANDOM 85 --configs 8x1024 --modes flashfuse
  grep -E "attention (forward|backward)|builds ahead" $OUT/train_*.log | cut -c1-220
  grep -o '"warmup_s[^]]*]]' $OUT/train_*.log
fi
if [ "$PART" = s17prof ]; then  # where each GPT-2 8x1024 step's time goes, flashfuse and the SDPA rewrite
  for m in flashfuse sdpa; do
    timeout 100 python benchmarks/profile_step.py --mode $m --b 8 --t 1024 --rows 30 > $OUT/profile_step_$m.txt 2>&1
    echo "profile $m rc=$?"; grep -E "wall|busy" $OUT/profile_step_$m.txt | head -3
  done
fi
if [ "$PART" = attention ]; then
  for kc in 1 0; do
    FLASHFUSE_ATTN_KEY_COUNTS=$kc timeout 100 python benchmarks/attention.py --part handwritten \
        --cases nanogpt_causal hf_padded_causal --out /tmp/hw$kc > $OUT/handwritten_kc$kc.log 2>&1
    echo "handwritten key_counts=$kc rc=$?"; grep -E "^(nanogpt|hf_)" $OUT/handwritten_kc$kc.log
  done
  FLASHFUSE_ATTN_AUTOTUNE=0 timeout 200 python -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_kernels.py \
      tests/test_mask_check.py > $OUT/pytest_attention.log 2>&1
  echo "pytest attention rc=$?"; grep -E "passed|failed|FAILED|Error" $OUT/pytest_attention.log | tail -6
fi
