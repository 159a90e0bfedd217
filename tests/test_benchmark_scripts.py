"""The benchmark scripts run on CPU (so the GPU scripts do not rot): the training step with tiny models, and the
sm_90 build of the attention kernels."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


@pytest.mark.parametrize("model_name", ["gpt2", "gpt2_shared_mask", "bert", "llama", "llama_pad"])
def test_train_step_runs_fused_and_learns(model_name):
    shared = model_name == "gpt2_shared_mask"
    model_name = "gpt2" if shared else model_name
    if model_name != "gpt2":
        pytest.importorskip("transformers")
    import flashfuse
    from flashfuse.report import Report, _active
    from train_gpt import make_step

    report = Report()
    _active.append(report)
    try:
        step = make_step("flashfuse-eager", 2, 16, device="cpu", model_name=model_name, tiny=True, shared_mask=shared)
        losses = [float(step()) for _ in range(3)]
        marks = []
        step(marks)  # step_timing.py's host clock after the forward and after the backward
        assert len(marks) == 2 and marks[0] <= marks[1]
    finally:
        _active.pop()
    assert report.count("attention") == 2, str(report)  # both layers of the tiny model
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert isinstance(flashfuse.__version__, str)


def test_shared_mask_is_one_bool_buffer_for_all_layers():
    """--shared-mask (the longest-sequence runs): one bool tril buffer, the same tensor in every layer."""
    from train_gpt import GPT

    model = GPT(block_size=8, n_layer=3, n_head=2, n_embd=16, shared_mask=True)
    bufs = [blk.attn.bias for blk in model.h]
    assert all(b is bufs[0] for b in bufs) and bufs[0].dtype == torch.bool
    assert torch.equal(bufs[0][0, 0], torch.tril(torch.ones(8, 8, dtype=torch.bool)))
    plain = GPT(block_size=8, n_layer=3, n_head=2, n_embd=16)
    assert plain.h[0].attn.bias is not plain.h[1].attn.bias and plain.h[0].attn.bias.dtype == torch.float32


def test_step_timing_wraps_and_restores_functions():
    """step_timing.py's per-call timer counts calls and puts the original function back."""
    import types

    import step_timing

    owner = types.SimpleNamespace(f=lambda x: x + 1)
    original = owner.f
    timer = step_timing._Timed(owner, "f", "f")
    assert owner.f(1) == 2 and owner.f(2) == 3
    assert timer.calls == 2 and timer.total > 0
    timer.restore()
    assert owner.f is original


def test_attention_kernels_build_for_sm90_without_a_gpu(tmp_path):
    """benchmarks/sass_counts.py compiles every kernel and dropout mode for sm_90 with the wheel's ptxas: the
    GPU build of the kernels (wgmma tiles, the saved dropout bits) is checked on machines without a GPU,
    where the tests otherwise only run the interpreter."""
    import re
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FLASHFUSE_CACHE_DIR=str(tmp_path / "ff"), TRITON_CACHE_DIR=str(tmp_path / "triton"))
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "sass_counts.py")
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [ln for ln in run.stdout.splitlines() if "instructions" in ln]
    assert len(rows) == 12, run.stdout  # 4 kernels (fwd, dK/dV, dQ, fused) x 3 dropout modes
    for row in rows:
        assert int(re.search(r"(\d+) instructions", row).group(1)) > 1000, row
        assert int(re.search(r"HGMMA (\d+)", row).group(1)) > 0, row  # Hopper's wgmma, not a fallback
        # the fused backward adds dQ with reductions to global memory; no other kernel has any
        assert (int(re.search(r"RED (\d+)", row).group(1)) > 0) == row.startswith("attn_bwd_fused"), row
