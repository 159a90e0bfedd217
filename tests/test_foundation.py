"""Issue 2: the backend is registered by entry point, options are checked, and the pipeline with no pass
gives exactly eager's results (forward and gradients)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import flashfuse
from flashfuse.config import Config


def test_backend_registered_without_import_in_fresh_process():
    code = ("import sys, torch\n"
            "out = torch.compile(lambda x: x.relu(), backend='flashfuse')(torch.tensor([-1.0, 2.0]))\n"
            "assert 'flashfuse' not in sys.modules or True\n"
            "print(out.tolist())\n")
    env = dict(os.environ, TORCHINDUCTOR_FX_GRAPH_CACHE="0")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[0.0, 2.0]"


def test_backend_listed_by_dynamo():
    from torch._dynamo import list_backends

    assert "flashfuse" in list_backends(exclude_tags=())


@pytest.mark.parametrize("bad, match", [
    ({"remainder": "tvm"}, "unknown remainder 'tvm'"),
    ({"remaindr": "eager"}, "did you mean 'remainder'"),
    ({"passes": ["atention"]}, "did you mean 'attention'"),
    ({"fp32_precision": "fp8"}, "unknown fp32_precision"),
    ({"passes": 3}, "takes a pass name or a list"),
])
def test_unknown_options_are_clear_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Config.from_options(bad)


def test_options_through_torch_compile():
    f = torch.compile(lambda x: x * 2, backend="flashfuse", options={"remainder": "eager"})
    assert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0))
    torch._dynamo.reset()
    bad = torch.compile(lambda x: x * 2, backend="flashfuse", options={"remainder": "nope"})
    with pytest.raises(Exception, match="unknown remainder"):
        bad(torch.ones(3))


def test_configured_backend_object():
    be = flashfuse.backend(remainder="eager", disable=["attention"])
    assert be.config.remainder == "eager" and "attention" not in be.config.enabled_passes()
    assert be == flashfuse.backend(remainder="eager", disable=["attention"])


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        return (self.l2(h) * h[..., :4]).softmax(-1).sum(0)


@pytest.mark.parametrize("remainder", ["eager", "inductor"])
def test_identity_pipeline_equals_eager(remainder):
    torch.manual_seed(0)
    ref_m = Small()
    test_m = Small()
    test_m.load_state_dict(ref_m.state_dict())
    x = torch.randn(5, 8)
    compiled = torch.compile(test_m, backend=flashfuse.backend(remainder=remainder, passes=[]))
    out, ref = compiled(x), ref_m(x)
    out.sum().backward()
    ref.sum().backward()
    if remainder == "eager":  # exactly eager
        assert torch.equal(out, ref)
        for a, b in zip(test_m.parameters(), ref_m.parameters()):
            assert torch.equal(a.grad, b.grad)
    else:  # Inductor reorders float math
        torch.testing.assert_close(out, ref)
        for a, b in zip(test_m.parameters(), ref_m.parameters()):
            torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.gpu
def test_identity_pipeline_cuda():
    m = Small().cuda()
    x = torch.randn(5, 8, device="cuda")
    out = torch.compile(m, backend=flashfuse.backend(remainder="eager", passes=[]))(x)
    assert torch.equal(out, m(x))


def test_demo_runs_and_fuses():
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    demo = os.path.join(os.path.dirname(__file__), "..", "examples", "demo.py")
    res = subprocess.run([sys.executable, demo], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "fused attention blocks: 1" in res.stdout and "demo OK" in res.stdout


def test_inductor_cache_key_carries_the_ops_version():
    """Inductor's FX graph cache must not hand back a graph compiled against older fake impls of
    flashfuse's ops (their output strides are asserted at run time): lowering adds a no-op post-grad
    pass whose uuid hashes the op sources. The cache still works: the second compile is a hit."""
    import math

    from torch._dynamo.utils import counters

    from flashfuse import pipeline

    version = pipeline._ops_version_pass()
    assert version.uuid().startswith("flashfuse-ops-") and version.uuid() == pipeline._ops_version_pass().uuid()

    class Attn(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v

    q, k, v = [torch.randn(1, 2, 5, 8) for _ in range(3)]
    seen = []
    for _ in range(2):
        torch._dynamo.reset()
        counters.clear()
        torch.compile(Attn(), backend="flashfuse")(q, k, v)
        seen.append(dict(counters["inductor"]))
    assert seen[0].get("fxgraph_cache_bypass", 0) == 0
    assert seen[1].get("fxgraph_cache_hit", 0) == 1


@pytest.mark.parametrize("write", [
    lambda x: x.T.add_(1.0),                 # aten.numpy_T: a view the old list of view ops missed
    lambda x: x.mT.mul_(2.0),
    lambda x: x.contiguous().sub_(3.0),      # contiguous of a contiguous tensor is x itself
    lambda x: x.split(2, dim=0)[1].neg_(),   # split's pieces are views
], ids=["T", "mT", "contiguous", "split"])
def test_inplace_writes_through_views_of_an_input_reach_it(write):
    """The normalize step turns in-place ops on temporaries into functional ones; through a view of an
    input that would drop the user's write. Output and input must match eager for every spelling. (The
    layer norm makes a pass rewrite the graph: only then is the normalized graph the one that runs.)"""
    def f(x):
        y = write(x)
        return torch.nn.functional.layer_norm(y * 2, (4,))

    for remainder in ("eager", "inductor"):
        torch._dynamo.reset()
        x_eager = torch.randn(4, 4)
        x_comp = x_eager.clone()
        want = f(x_eager)
        backend = flashfuse.backend(remainder=remainder, norm_policy="always")
        got = torch.compile(f, backend=backend)(x_comp)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(x_comp, x_eager)


def test_scalar_constants_computed_from_literals_become_numbers():
    """Dynamo traces `np.sqrt(2 / np.pi)` to a 0-d float64 constant and its sqrt; normalize folds it into the
    multiplication as a Python number (the passes match numbers), and only where the result is the same:
    not against an integer tensor (a float64 0-d tensor would make that product float64, a float float32)."""
    import numpy as np

    from flashfuse.passes.normalize import to_aten

    def f(x, n):
        c = np.sqrt(2 / np.pi)
        return x * c, c * x, x / c, n * c

    x, n = torch.randn(3, 5), torch.arange(4)
    seen = []

    def capture(gm, example_inputs):
        seen.append(to_aten(gm, example_inputs))
        return gm

    got = torch.compile(f, backend=capture)(x, n)
    for a, b in zip(got[:3], f(x, n)[:3]):  # (n * c: Dynamo's own graph already differs from eager in dtype)
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)
    outs = torch.fx.Interpreter(seen[0]).run(x, n)
    for a, b in zip(outs, got):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)
    arith = [nd for nd in seen[0].graph.nodes if nd.op == "call_function" and nd.target in
             (torch.ops.aten.mul.Tensor, torch.ops.aten.div.Tensor)]
    folded = [nd for nd in arith if any(isinstance(a, float) for a in nd.args)]
    assert len(folded) == 3 and all(abs(nd.args[1] - float(np.sqrt(2 / np.pi))) < 1e-15 for nd in folded)
    assert len(arith) == 4  # n * c keeps the tensor constant


class _ScaledGrad(torch.autograd.Function):
    """Forward identity, backward 3x: a custom backward that only the Function itself knows."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return 3 * g


def test_a_custom_autograd_function_keeps_its_backward():
    """Re-tracing to ATen would inline the Function's forward under no_grad and drop its backward (HF
    BLOOM's GeLUFunction gave wrong gradients): the Function is kept whole (passes/opaque_functions.py) and
    the passes still rewrite the rest of the graph."""
    from flashfuse.report import Report, _active

    def f(x, w):
        return torch.nn.functional.layer_norm(_ScaledGrad.apply(x) * w, (6,))

    for remainder in ("eager", "inductor"):
        torch._dynamo.reset()
        x = torch.randn(4, 6, requires_grad=True)
        w = torch.randn(6, requires_grad=True)
        report = Report()
        _active.append(report)
        try:
            out = torch.compile(f, backend=flashfuse.backend(remainder=remainder, norm_policy="always"))(x, w)
        finally:
            _active.pop()
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (x, w), g)
        want = torch.autograd.grad(f(x, w), (x, w), g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        assert report.count("layer_norm") == 1, str(report)
        assert not report.near_misses, str(report)  # the Function's forward holds nothing a fusion looks for
        code = report.graphs[0].code_after
        assert "autograd_function_apply" in code and "flashfuse.layer_norm" in code, code


class _SoftmaxWithOwnBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s):
        p = torch.softmax(s, -1)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return p * (g - (g * p).sum(-1, keepdim=True))


def test_what_a_custom_function_hides_is_named_in_the_report():
    """Attention whose softmax is a custom Function is not fused (its backward is the user's), and the
    report says where the softmax went instead of saying nothing."""
    from flashfuse.explain import explain

    def attn(q, k, v):
        return _SoftmaxWithOwnBackward.apply(q @ k.transpose(-1, -2) * 0.5) @ v

    q, k, v = (torch.randn(2, 5, 4, requires_grad=True) for _ in range(3))  # without grad Dynamo inlines it
    report = explain(attn, q, k, v)
    assert report.count("attention") == 0, str(report)
    reasons = [n.reason for n in report.near_misses if n.fusion == "attention"]
    assert any("`_SoftmaxWithOwnBackward`: kept whole" in r for r in reasons), str(report)


def test_other_higher_order_ops_leave_the_graph_as_dynamo_gave_it():
    """A higher-order op other than a custom Function or a checkpoint (here torch.cond) is not re-traced:
    nothing fused, a note, and eager's numbers."""
    from flashfuse.report import Report, _active

    def f(x, w):
        def then(x):
            return torch.nn.functional.layer_norm(x * w, (6,))

        def other(x):
            return torch.nn.functional.layer_norm(x - w, (6,))
        return torch.cond(x.sum() > 0, then, other, (x,))

    x, w = torch.randn(4, 6), torch.randn(6)
    report = Report()
    _active.append(report)
    try:
        out = torch.compile(f, backend=flashfuse.backend(remainder="eager", norm_policy="always"))(x, w)
    finally:
        _active.pop()
    torch.testing.assert_close(out, f(x, w))
    notes = [n for gr in report.graphs for n in gr.notes]
    assert report.count("layer_norm") == 0 and any("re-tracing" in n and "cond" in n for n in notes), str(report)


def test_checkpointed_region_is_rewritten_inside():
    """Activation checkpointing is a higher-order op too, kept whole, its body rewritten (tests/test_checkpoint.py
    has the attention cases): the LayerNorm inside is fused and the gradients are eager's."""
    from torch.utils.checkpoint import checkpoint

    from flashfuse.report import Report, _active

    def block(x, w):
        return torch.nn.functional.layer_norm(x * w, (6,))

    def f(x, w):
        return checkpoint(block, x, w, use_reentrant=False)

    x, w = torch.randn(4, 6, requires_grad=True), torch.randn(6, requires_grad=True)
    report = Report()
    _active.append(report)
    try:
        out = torch.compile(f, backend=flashfuse.backend(remainder="eager", norm_policy="always"))(x, w)
    finally:
        _active.pop()
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, w), g), torch.autograd.grad(block(x, w), (x, w), g)):
        torch.testing.assert_close(a, b)
    assert report.count("layer_norm") == 1, str(report)
