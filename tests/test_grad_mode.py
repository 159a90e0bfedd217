"""Fusions never pull ops across a torch.no_grad() / enable_grad() switch inside the compiled code
(passes/grad_mode.py), and a graph that enters torch.inference_mode() is not re-traced at all."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flashfuse
from flashfuse.passes import grad_mode
from flashfuse.passes.normalize import to_aten
from flashfuse.testing import assert_close_to_eager, assert_fused


def attention(q, k, v):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v


class TeacherStudent(nn.Module):
    """DINO / distillation: a teacher attention run under no_grad, a student attention trained against it."""

    def __init__(self, d=8):
        super().__init__()
        self.teacher, self.student = nn.Linear(d, 3 * d), nn.Linear(d, 3 * d)

    def forward(self, x):
        with torch.no_grad():
            t = attention(*self.teacher(x).unflatten(-1, (3, -1)).unbind(-2))
        s = attention(*self.student(x).unflatten(-1, (3, -1)).unbind(-2))
        return (s - t).square().mean(-1)


class FrozenAttentionMap(nn.Module):
    """Attention probabilities computed under no_grad (a stop-gradient map), values trained."""

    def __init__(self, d=8):
        super().__init__()
        self.qk, self.v = nn.Linear(d, 2 * d), nn.Linear(d, d)

    def forward(self, x):
        with torch.no_grad():
            q, k = self.qk(x).chunk(2, -1)
            p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return p @ self.v(x)


class NormUnderNoGradThenTrained(nn.Module):
    """A whole LayerNorm inside no_grad (fused there), an RMSNorm after it with grad (fused too)."""

    def __init__(self, d=8):
        super().__init__()
        self.ln, self.w = nn.LayerNorm(d), nn.Parameter(torch.randn(d))

    def forward(self, x):
        with torch.no_grad():
            h = self.ln(x)
        y = h + x
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w


def test_attention_inside_no_grad_is_fused_and_trains_nothing():
    x = torch.randn(2, 5, 8)
    report = assert_fused(TeacherStudent(), x, attention=2)
    assert any("torch.no_grad()" in n for n in report.notes), report.notes
    assert_close_to_eager(TeacherStudent(), x)


def test_no_grad_boundaries_are_gone_before_inductor():
    """The boundaries are plain Python calls; Inductor must never see one (it lowers the rewritten graph)."""
    x = torch.randn(3, 4, 8)
    report = assert_fused(NormUnderNoGradThenTrained(), x, layer_norm=1, rms_norm=1,
                          options={"remainder": "inductor", "norm_policy": "always"})
    assert "grad_mode_boundary" not in report.graphs[0].code_after
    assert_close_to_eager(NormUnderNoGradThenTrained(), x.requires_grad_(),
                          options={"remainder": "inductor", "norm_policy": "always"})


def test_attention_map_under_no_grad_is_not_fused():
    """Fused, the map's gradient would reach q and k, where eager gives them none."""
    x = torch.randn(2, 5, 8)
    assert_fused(FrozenAttentionMap(), x, attention=0)
    torch.manual_seed(0)
    model = FrozenAttentionMap()
    assert_close_to_eager(model, x.requires_grad_())
    xc = x.detach().clone().requires_grad_()
    torch._dynamo.reset()
    torch.compile(model, backend=flashfuse.backend(remainder="eager"))(xc).sum().backward()
    assert model.qk.weight.grad is None and model.v.weight.grad is not None


def test_norms_on_each_side_of_a_switch_are_fused_separately():
    x = torch.randn(3, 4, 8)
    assert_fused(NormUnderNoGradThenTrained(), x, layer_norm=1, rms_norm=1, residual_norm=1)
    assert_close_to_eager(NormUnderNoGradThenTrained(), x.requires_grad_())


def _aten(f, *inputs):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(to_aten(gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(f, backend=backend)(*inputs)
    return graphs[0]


def _pow_mean_rsqrt(x):
    with torch.no_grad():
        ms = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(ms + 1e-6)


def test_boundaries_sit_on_crossing_edges_only():
    gm = _aten(_pow_mean_rsqrt, torch.randn(3, 8, requires_grad=True))
    added = grad_mode.insert(gm)
    # mean (no grad) -> add (grad): one boundary; the input x is no op and needs none
    assert len(added) == 1 and added[0][1] is True
    (boundary,) = [n for n in gm.graph.nodes if grad_mode.is_boundary(n)]
    assert boundary.args[0].target is torch.ops.aten.mean.dim
    assert [u.target for u in boundary.users] == [torch.ops.aten.add.Tensor]
    grad_mode.remove(gm)
    assert not any(grad_mode.is_boundary(n) for n in gm.graph.nodes)
    x = torch.randn(3, 8)
    torch.testing.assert_close(gm(x)[0], _pow_mean_rsqrt(x))


def test_an_op_moved_across_a_switch_is_refused():
    gm = _aten(_pow_mean_rsqrt, torch.randn(3, 8, requires_grad=True))
    grad_mode.insert(gm)
    mean = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.mean.dim)
    switch_on = [n for n in gm.graph.nodes if n.target is torch._C._set_grad_enabled][-1]
    switch_on.append(mean)  # now runs with grad: a pass doing this would change the gradient
    with pytest.raises(grad_mode.GradModeMoved, match="moved across"):
        grad_mode.remove(gm)


def test_a_graph_without_switches_gets_no_boundaries():
    gm = _aten(lambda x: F.layer_norm(x, (8,)) * 2, torch.randn(3, 8, requires_grad=True))
    assert grad_mode.insert(gm) == []


def _inference_mode_inside(x, w, b):
    with torch.inference_mode():
        y = x.sum(-1, keepdim=True) * 2
    return F.layer_norm(x + 1, (8,), w, b) + y


def test_inference_mode_inside_the_graph_is_not_retraced():
    """make_fx keeps no trace of inference_mode: re-traced, `y` got a gradient (x's grad was wrong).
    The graph is compiled as Dynamo gave it, with the reason in the report."""
    x, w, b = torch.randn(4, 8), torch.randn(8), torch.randn(8)
    report = assert_fused(_inference_mode_inside, x, w, b, layer_norm=0)
    assert any("inference_mode" in n for n in report.notes), report.notes
    assert_close_to_eager(_inference_mode_inside, x.requires_grad_(), w.requires_grad_(), b.requires_grad_())


def _mixed(x, w):
    y = x * 2                       # x needs no grad: neither does y
    h = y * w                       # w does
    d = h.detach() + 1              # detached
    with torch.no_grad():
        n = h * 3                   # under no_grad
    i = h.argmax(-1)                # integer
    o = torch.ones_like(h)          # a factory
    return y, h, d, n, i, o


def test_requires_grad_is_marked_on_the_retraced_graph():
    """make_fx's fake values all say requires_grad=False; the passes read the real flag (a training graph's
    norm policy, amax chains exact only without a gradient)."""
    from flashfuse.passes.normalize import requires_grad

    gm = _aten(_mixed, torch.randn(3, 8), torch.randn(8, requires_grad=True))
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    got = [requires_grad(n) for n in out.args[0]]
    assert got == [False, True, False, False, False, False]
    x, w = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert not requires_grad(x) and requires_grad(w)


def test_amax_chain_is_fused_only_without_a_gradient():
    """amax(amax(x, -1), -1) splits the gradient among tied maxima per step; one amax splits it evenly."""
    f = lambda x: x.amax(-1).amax(-1)  # noqa: E731
    x = torch.randn(2, 3, 4, 5)
    report = assert_fused(f, x, global_pool=1)
    assert report.matches[0].details["kind"] == "amax"
    x = x.requires_grad_()
    report = assert_fused(f, x, global_pool=0)
    assert any("tied" in n.reason for n in report.near_misses), str(report)
    # the tie case that differs, run through the compiled function: still eager's gradient
    t = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]]], requires_grad=True)
    torch._dynamo.reset()
    torch.compile(f, backend=flashfuse.backend(remainder="eager"))(t).sum().backward()
    torch.testing.assert_close(t.grad, torch.tensor([[[[0.25, 0.25], [0.0, 0.5]]]]))


def test_the_report_names_a_value_that_crosses_the_switch():
    x = torch.randn(3, 8, requires_grad=True)
    report = assert_fused(_pow_mean_rsqrt, x, rms_norm=0)
    (note,) = [n for n in report.notes if "torch.no_grad()" in n]
    assert "`mean`" in note and "grad disabled" in note and "used with grad enabled by `add`" in note, note
