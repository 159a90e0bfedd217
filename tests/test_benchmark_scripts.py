"""The training benchmark's step runs on CPU with tiny models (so the GPU script does not rot)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


@pytest.mark.parametrize("model_name", ["gpt2", "bert", "llama"])
def test_train_step_runs_fused_and_learns(model_name):
    if model_name != "gpt2":
        pytest.importorskip("transformers")
    import flashfuse
    from flashfuse.report import Report, _active
    from train_gpt import make_step

    report = Report()
    _active.append(report)
    try:
        step = make_step("flashfuse-eager", 2, 16, device="cpu", model_name=model_name, tiny=True)
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
