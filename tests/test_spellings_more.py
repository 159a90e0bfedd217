"""Issue #5, the "hidden set": more spellings of every fusion, written independently of the ones in
test_norms.py and test_pointwise_fusions.py (function vs method forms, positive vs negative dims,
keepdim passed positionally, torch.var_mean, `**2` / pow / x*x / torch.square, rsqrt / 1/sqrt /
reciprocal, weight before or after, casts back with type_as / to, F.linear / addmm / x @ W.T + b before
a GELU, clamp forms of PReLU, .T / .mT / permute feeding matmul / bmm / mm, sum / N pooling, ...).

Each positive asserts the exact number of fused ops (flashfuse.testing.assert_fused, every default
pass on) and outputs + gradients equal to eager (assert_close_to_eager, fp32 rtol 1e-4). Each negative
asserts that the fusion did NOT happen (a different function, or shapes the kernel cannot take) and
that the program still computes eager's numbers. Runs under the eager remainder (no C++ compile) so
the file stays fast on CPU; a few cases also under Inductor with norm_policy="always".
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flashfuse.explain import explain
from flashfuse.testing import assert_close_to_eager, assert_fused

EAGER = {"remainder": "eager"}
INDUCTOR = {"remainder": "inductor", "norm_policy": "always"}
N = 24   # normalized row length
EPS = 1e-5


def rand(*shape, seed=0, zeros=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).float()
    if zeros:
        x.view(-1)[:zeros] = 0.0  # exact zeros: where PReLU spellings' gradients differ
    return x


def param(*shape, seed=0, base=0.0):
    return nn.Parameter(base + rand(*shape, seed=seed))


def check(model, *inputs, options=EAGER, **counts):
    """Exactly `counts` fusions, and outputs + gradients equal to eager's."""
    report = assert_fused(model, *inputs, options=options, **counts)
    assert not any("passes skipped" in note for g in report.graphs for note in g.notes), str(report)
    assert_close_to_eager(model, *inputs, options=options)
    return report


def check_not_fused(model, *inputs, fusion, reason=None, options=EAGER, grads=True, **others):
    """`fusion` left alone (the near-miss reason contains `reason` when given); eager's numbers."""
    report = assert_fused(model, *inputs, options=options, **{fusion: 0}, **others)
    if reason is not None:
        reasons = [n.reason for n in report.near_misses if n.fusion == fusion]
        assert any(reason in r for r in reasons), str(report)
    assert_close_to_eager(model, *inputs, options=options, grads=grads)
    return report


class Fn(nn.Module):
    """A module around a function of (self, *inputs), with parameters given by name."""

    def __init__(self, fn, **params):
        super().__init__()
        self.fn = fn
        for name, p in params.items():
            setattr(self, name, p)

    def forward(self, *xs):
        return self.fn(self, *xs)


# ================================================================================================ LayerNorm
def _ln_affine(fn):
    return lambda: Fn(fn, w=param(N, seed=1, base=1.0), b=param(N, seed=2))


LN_POSITIVE = {
    # torch.var_mean with correction=0, method-form sub/div
    "var_mean_correction_sub_div": _ln_affine(lambda m, x: (
        lambda vm: x.sub(vm[1]).div(torch.sqrt(vm[0] + EPS)) * m.w + m.b)(
        torch.var_mean(x, dim=-1, correction=0, keepdim=True))),
    # positive dim on a 3-D input, keepdim positional, torch.square, weight first
    "dim2_keepdim_positional_square": _ln_affine(lambda m, x: (
        lambda mu: m.w * ((x - mu) * torch.rsqrt(torch.square(x - mu).mean(2, True) + EPS)) + m.b)(
        x.mean(2, True))),
    # centered value reused: d * d, `(var + eps).sqrt()` method, bias first
    "diff_times_diff_sqrt_method": _ln_affine(lambda m, x: (
        lambda d: m.b + d / ((d * d).mean(dim=-1, keepdim=True) + EPS).sqrt() * m.w)(
        x - torch.mean(x, dim=-1, keepdim=True))),
    # `** 2` and `** -0.5`, eps on the left of the add
    "pow_operator_minus_half": _ln_affine(lambda m, x: (
        lambda mu: (x - mu) * (EPS + ((x - mu) ** 2).mean(-1, keepdim=True)) ** -0.5 * m.w + m.b)(
        x.mean(-1, keepdim=True))),
    # torch.var(unbiased=False) positionally-ish, reciprocal() of sqrt, method mul/add
    "var_unbiased_false_reciprocal": _ln_affine(lambda m, x: (
        x.sub(x.mean(-1, keepdim=True)).mul(torch.sqrt(torch.var(x, -1, keepdim=True, unbiased=False) + EPS)
                                            .reciprocal()).mul(m.w).add(m.b))),
    # 1 / torch.sqrt(...) as the scale
    "one_over_sqrt": _ln_affine(lambda m, x: (
        lambda mu, var: (x - mu) * (1.0 / torch.sqrt(var + EPS)) * m.w + m.b)(
        x.mean(-1, keepdim=True), x.var(dim=-1, keepdim=True, correction=0))),
    # no affine at all, torch.var_mean(unbiased=False) unpacked, dims as a tuple
    "var_mean_tuple_dims_no_affine": lambda: Fn(lambda m, x: (
        lambda var, mean: (x - mean) * torch.rsqrt(var + EPS))(
        *torch.var_mean(x, dim=(-1,), unbiased=False, keepdim=True))),
    # upcast and cast back (no-ops on fp32): `.float()` ... `.type_as(x)`
    "float_upcast_type_as": _ln_affine(lambda m, x: (
        lambda xf: ((xf - xf.mean(-1, keepdim=True))
                    / torch.sqrt(xf.var(-1, unbiased=False, keepdim=True) + EPS)).type_as(x) * m.w + m.b)(
        x.float())),
    # F.layer_norm with the shape taken from x, weight and bias positional, eps positional
    "F_layer_norm_positional": _ln_affine(lambda m, x: F.layer_norm(x, x.shape[-1:], m.w, m.b, 1e-6)),
    # F.layer_norm without affine, the affine written after it
    "F_layer_norm_affine_after": _ln_affine(lambda m, x: F.layer_norm(x, (N,)) * m.w + m.b),
    # the statistics reduced without keepdim and the dim put back: unsqueeze / [..., None]
    "no_keepdim_unsqueeze": _ln_affine(lambda m, x: (
        lambda mu: (x - mu) / torch.sqrt(x.var(-1, unbiased=False)[..., None] + EPS) * m.w + m.b)(
        x.mean(-1).unsqueeze(-1))),
    # nn.LayerNorm without bias, on a 2-D input
    "nn_LayerNorm_no_bias": lambda: nn.LayerNorm(N, bias=False),
}


@pytest.mark.parametrize("name", list(LN_POSITIVE))
def test_layer_norm_spellings(name):
    x = rand(2, 3, N, seed=3) if name != "nn_LayerNorm_no_bias" else rand(5, N, seed=3)
    check(LN_POSITIVE[name](), x, layer_norm=1)


def test_layer_norm_under_inductor():
    check(LN_POSITIVE["var_mean_correction_sub_div"](), rand(2, 3, N, seed=3), options=INDUCTOR, layer_norm=1)


LN_NEGATIVE = {
    # torch.var defaults to the unbiased variance: not layer norm
    "unbiased_default": (lambda x: (x - x.mean(-1, keepdim=True)) / torch.sqrt(torch.var(x, -1, keepdim=True) + EPS),
                         "unbiased variance"),
    # eps added to the std, outside the root
    "eps_outside_std": (lambda x: (x - x.mean(-1, keepdim=True))
                        / (x.std(-1, keepdim=True, unbiased=False) + EPS), "outside the square root"),
    "eps_outside_sqrt": (lambda x: (x - x.mean(-1, keepdim=True))
                         / (x.var(-1, keepdim=True, unbiased=False).sqrt() + EPS), "outside the square root"),
    # statistics over dim 1 (of 3): a different axis
    "other_axis": (lambda x: (x - x.mean(1, keepdim=True)) * torch.rsqrt(x.var(1, keepdim=True, correction=0) + EPS),
                   "statistics over dim 1"),
    # mean over the last dim, variance over dim -2
    "mixed_axes": (lambda x: (x - x.mean(-1, keepdim=True))
                   / torch.sqrt(torch.var(x, -2, keepdim=True, unbiased=False) + EPS), "different axes"),
}


@pytest.mark.parametrize("name", list(LN_NEGATIVE))
def test_layer_norm_negatives(name):
    fn, reason = LN_NEGATIVE[name]
    check_not_fused(fn, rand(2, 5, N, seed=4), fusion="layer_norm", reason=reason, rms_norm=0)


# ================================================================================================ RMSNorm
def _rms_w(fn):
    return lambda: Fn(fn, w=param(N, seed=5, base=1.0))


def _llama_like(m, x):
    """LLaMA with .to(dtype) spelled as type_as and torch.square."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(torch.square(h).mean(dim=-1, keepdim=True) + 1e-6)
    return m.w * h.type_as(x)


RMS_POSITIVE = {
    "llama_square_type_as": _rms_w(_llama_like),
    # no upcast, rsqrt of method-form add, normalized * weight
    "rsqrt_method_add": _rms_w(lambda m, x: x * x.pow(2).mean(-1, keepdim=True).add(EPS).rsqrt() * m.w),
    # x / sqrt(mean(x**2)) with keepdim positional and a positive dim
    "div_sqrt_pow_operator_dim2": _rms_w(lambda m, x: m.w * (x / torch.sqrt((x ** 2).mean(2, True) + EPS))),
    # torch.mean(x * x, ...) with 1/sqrt as the scale
    "one_over_sqrt_x_times_x": _rms_w(lambda m, x: x * (1 / torch.sqrt(torch.mean(x * x, -1, keepdim=True) + EPS)) * m.w),
    # reciprocal() of the root
    "reciprocal_sqrt": _rms_w(lambda m, x: x * torch.reciprocal(torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS)) * m.w),
    # (.)**-0.5 and the cast back as .to(x.dtype) after the weight
    "pow_minus_half_to_dtype": _rms_w(lambda m, x: (
        m.w * (x.float() * (x.float().pow(2).mean(-1, keepdim=True) + EPS) ** -0.5)).to(x.dtype)),
    # weight first: Python evaluates `w * x * rsqrt(..)` as `(w * x) * rsqrt(..)`
    "weight_first": _rms_w(lambda m, x: m.w * x * torch.rsqrt(torch.mean(x.pow(2), dim=-1, keepdim=True) + EPS)),
    # the mean of squares without keepdim, unsqueezed back
    "no_keepdim_unsqueeze": _rms_w(lambda m, x: m.w * x * torch.rsqrt(x.pow(2).mean(-1).unsqueeze(-1) + EPS)),
    # F.rms_norm, shape from x, keyword eps
    "F_rms_norm": _rms_w(lambda m, x: F.rms_norm(x, x.shape[-1:], m.w, eps=1e-6)),
    # nn.RMSNorm without eps (dtype's machine epsilon) and without weight
    "nn_RMSNorm_default_eps_no_weight": lambda: nn.RMSNorm(N, elementwise_affine=False),
}


@pytest.mark.parametrize("name", list(RMS_POSITIVE))
def test_rms_norm_spellings(name):
    check(RMS_POSITIVE[name](), rand(3, 4, N, seed=6), rms_norm=1, layer_norm=0)


def test_rms_norm_under_inductor():
    check(RMS_POSITIVE["llama_square_type_as"](), rand(3, 4, N, seed=6), options=INDUCTOR, rms_norm=1)


RMS_NEGATIVE = {
    "eps_outside_sqrt": (lambda x: x / (x.pow(2).mean(-1, keepdim=True).sqrt() + EPS), "outside the square root"),
    "other_axis": (lambda x: x * torch.rsqrt((x * x).mean(1, keepdim=True) + EPS), "statistics over dim 1"),
    # the norm-2 over sqrt(N), then + eps outside: lucidrains' RMSNorm is a different function
    "norm_over_sqrt_n": (lambda x: x / (x.norm(2, dim=-1, keepdim=True) * N ** -0.5 + EPS), None),
}


@pytest.mark.parametrize("name", list(RMS_NEGATIVE))
def test_rms_norm_negatives(name):
    fn, reason = RMS_NEGATIVE[name]
    check_not_fused(fn, rand(2, 5, N, seed=7), fusion="rms_norm", reason=reason, layer_norm=0)


# ================================================================================================ residual + norm
class ResidualBlock(nn.Module):
    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.w, self.b = param(N, seed=8, base=1.0), param(N, seed=9)
        self.proj = nn.Linear(N, N)

    def forward(self, x, y):
        s = self.spelling
        if s == "torch.add+F.layer_norm":
            h = torch.add(x, y)
            return F.layer_norm(h, (N,), self.w, self.b), h
        if s == "method_add+llama":
            h = x.add(y)
            hf = h.float()
            out = self.w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype)
            return h + out
        if s == "proj_residual+var_mean":  # h = x + f(x), the residual stream continues after the norm
            h = x + self.proj(x)
            var, mean = torch.var_mean(h, -1, keepdim=True, correction=0)
            return h * 0.5 + (h - mean) * torch.rsqrt(var + EPS) * self.w
        if s == "reversed+rms_norm":
            h = y + x
            return F.rms_norm(h, (N,), self.w, 1e-6) * h
        if s == "broadcast":  # y of shape (N,): the kernel adds two same-shaped tensors
            h = x + y
            return F.layer_norm(h, (N,), self.w, self.b), h
        if s == "alpha":  # x + 2 * y is not the residual add the kernel computes
            h = torch.add(x, y, alpha=2)
            return F.layer_norm(h, (N,), self.w, self.b), h
        raise ValueError(s)


@pytest.mark.parametrize("spelling,norm", [("torch.add+F.layer_norm", "layer_norm"), ("method_add+llama", "rms_norm"),
                                           ("proj_residual+var_mean", "layer_norm"),
                                           ("reversed+rms_norm", "rms_norm")])
def test_residual_norm_spellings(spelling, norm):
    x, y = rand(2, 3, N, seed=10), rand(2, 3, N, seed=11)
    # the norm is counted by its own pass before the residual pass folds the add into it
    check(ResidualBlock(spelling), x, y, residual_norm=1, **{norm: 1})


def test_residual_norm_under_inductor():
    check(ResidualBlock("torch.add+F.layer_norm"), rand(2, 3, N, seed=10), rand(2, 3, N, seed=11),
          options=INDUCTOR, residual_norm=1, layer_norm=1)


def test_residual_norm_negatives():
    check_not_fused(ResidualBlock("broadcast"), rand(2, 3, N, seed=10), rand(N, seed=11), fusion="residual_norm",
                    reason="broadcasts", layer_norm=1)
    check_not_fused(ResidualBlock("alpha"), rand(2, 3, N, seed=10), rand(2, 3, N, seed=11), fusion="residual_norm",
                    layer_norm=1)


# ================================================================================================ bias + GELU
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class GeluNet(nn.Module):
    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.fc = nn.Linear(12, 9)
        self.act = nn.GELU(approximate="tanh")
        self.W = param(9, 12, seed=12)   # (out, in) like nn.Linear
        self.b = param(9, seed=13)

    def forward(self, x):
        s, W, b = self.spelling, self.W, self.b
        if s == "F.linear+gelu":
            return F.gelu(F.linear(x, W, b))
        if s == "nn.Linear+nn.GELU(tanh)":
            return self.act(self.fc(x))
        if s == "x@W.T+b+gelu(none)":
            return torch.nn.functional.gelu(x @ W.T + b, approximate="none")
        if s == "b+matmul+gelu(tanh)":
            return F.gelu(b + torch.matmul(x, W.t()), approximate="tanh")
        if s == "addmm+gelu":
            return F.gelu(torch.addmm(b, x, W.t()))
        if s == "hand-erf-sqrt2":
            h = x @ W.T + b
            return h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
        if s == "hand-erf-method":
            h = F.linear(x, W, b)
            return h.mul(0.5).mul(h.mul(1 / math.sqrt(2)).erf().add(1.0))
        if s == "hand-special-erf":
            h = torch.add(x @ W.T, b)
            return 0.5 * h * (1 + torch.special.erf(h * 0.7071067811865476))
        if s == "hand-tanh-pow3":
            h = self.fc(x)
            return 0.5 * h * (1.0 + torch.tanh(SQRT_2_OVER_PI * (h + 0.044715 * h.pow(3))))
        if s == "hand-tanh-cube-operator":
            h = x @ W.T + b
            return h * (1 + torch.tanh(SQRT_2_OVER_PI * (h + 0.044715 * h ** 3))) * 0.5
        if s == "quick-gelu":  # x * sigmoid(1.702 x): a different function
            h = self.fc(x)
            return h * torch.sigmoid(1.702 * h)
        if s == "wrong-cubic":
            h = self.fc(x)
            return 0.5 * h * (1.0 + torch.tanh(SQRT_2_OVER_PI * (h + 0.05 * h ** 3)))
        raise ValueError(s)


GELU_POSITIVE = ["F.linear+gelu", "nn.Linear+nn.GELU(tanh)", "x@W.T+b+gelu(none)", "b+matmul+gelu(tanh)",
                 "addmm+gelu", "hand-erf-sqrt2", "hand-erf-method", "hand-special-erf", "hand-tanh-pow3", "hand-tanh-cube-operator"]


@pytest.mark.parametrize("spelling", GELU_POSITIVE)
def test_bias_gelu_spellings(spelling):
    torch.manual_seed(14)
    x = rand(2, 5, 12, seed=15) if spelling != "addmm+gelu" else rand(7, 12, seed=15)
    report = check(GeluNet(spelling), x, bias_gelu=1)
    match = next(m for m in report.matches if m.fusion == "bias_gelu")
    assert match.details["bias"] is True, str(report)  # the preceding bias add is in the kernel
    assert match.details["approximate"] == ("tanh" if "tanh" in spelling else "none")


def test_bias_gelu_under_inductor():
    torch.manual_seed(14)
    check(GeluNet("x@W.T+b+gelu(none)"), rand(2, 5, 12, seed=15), options=INDUCTOR, bias_gelu=1)


@pytest.mark.parametrize("spelling,reason", [("quick-gelu", None), ("wrong-cubic", "not 0.044715")])
def test_bias_gelu_negatives(spelling, reason):
    torch.manual_seed(14)
    check_not_fused(GeluNet(spelling), rand(2, 5, 12, seed=15), fusion="bias_gelu", reason=reason)


def test_gelu_bias_along_another_dim_is_not_folded():
    b = rand(5, 1, seed=16)  # one bias per row, not per feature

    def f(x):
        return F.gelu(x + b)

    report = check(f, rand(2, 5, 9, seed=17), bias_gelu=1)
    assert report.matches[0].details["bias"] is False


# ================================================================================================ PReLU
class PreluSpellings(nn.Module):
    def __init__(self, spelling, channels=4):
        super().__init__()
        self.spelling = spelling
        self.a = nn.Parameter(0.3 * torch.rand(1, generator=torch.Generator().manual_seed(18)))
        self.a_c = nn.Parameter(torch.rand(1, channels, 1, 1, generator=torch.Generator().manual_seed(19)))
        self.a_vec = nn.Parameter(torch.rand(channels, generator=torch.Generator().manual_seed(20)))
        self.single = nn.PReLU()
        self.per_channel = nn.PReLU(channels, init=0.1)

    def forward(self, x):
        s, a = self.spelling, self.a
        if s == "F.prelu-per-channel":
            return F.prelu(x, self.a_vec)
        if s == "nn.PReLU()":
            return self.single(x)
        if s == "nn.PReLU(C, init)":
            return self.per_channel(x)
        if s == "where-x*a":
            return torch.where(x > 0, x, x * self.a_c)
        if s == "where-lt":
            return torch.where(x < 0, a * x, x)
        if s == "where-zero-on-left":
            return torch.where(0 < x, x, self.a_c * x)
        if s == "relu-methods":
            return x.relu() - a * (-x).relu()
        if s == "relu-neg":
            return torch.relu(x) - self.a_c * torch.relu(torch.neg(x))
        if s == "clamp":
            return x.clamp(min=0) + a * x.clamp(max=0)
        if s == "clamp_min-max":
            return torch.clamp_min(x, 0) + self.a_c * torch.clamp_max(x, 0)
        if s == "relu+clamp_max":      # relu'(0) = 0, clamp_max passes at 0: dx = a*g there
            return F.relu(x) + a * x.clamp(max=0)
        if s == "clamp-relu(-x)":       # clamp passes at 0, relu(-x) not: dx = g there
            return x.clamp(min=0.0) - self.a_c * F.relu(-x)
        if s == "slope-first-add":
            return self.a_c * torch.clamp(x, max=0.0) + torch.clamp(x, min=0.0)
        if s == "leaky-relu":
            return F.leaky_relu(x, 0.2)
        if s == "threshold-not-zero":
            return torch.where(x > 0.5, x, a * x)
        raise ValueError(s)


PRELU_POSITIVE = ["F.prelu-per-channel", "nn.PReLU()", "nn.PReLU(C, init)", "where-x*a", "where-lt",
                  "where-zero-on-left", "relu-methods", "relu-neg", "clamp", "clamp_min-max", "relu+clamp_max",
                  "clamp-relu(-x)", "slope-first-add"]


@pytest.mark.parametrize("spelling", PRELU_POSITIVE)
def test_prelu_spellings(spelling):
    check(PreluSpellings(spelling), rand(2, 4, 3, 5, seed=21, zeros=7), prelu=1)


def test_prelu_under_inductor():
    check(PreluSpellings("clamp"), rand(2, 4, 3, 5, seed=21, zeros=7), options=INDUCTOR, prelu=1)


@pytest.mark.parametrize("spelling", ["leaky-relu", "threshold-not-zero"])
def test_prelu_negatives(spelling):
    check_not_fused(PreluSpellings(spelling), rand(2, 4, 3, 5, seed=21), fusion="prelu")


def test_prelu_clamp_convention_double_backward():
    """The clamp spelling's gradient at x == 0 is (1 + a) * g (both clamps pass it): the kernel's own
    convention, first and second order, against eager's clamps."""
    from flashfuse.kernels.prelu import ZERO_GRAD_ONE_PLUS_SLOPE, prelu

    x = rand(2, 4, 3, 5, seed=40, zeros=9).requires_grad_()
    a = (0.3 * torch.rand(4, generator=torch.Generator().manual_seed(41))).requires_grad_()
    v = rand(2, 4, 3, 5, seed=42)
    a4 = a.view(1, 4, 1, 1)
    outs = []
    for y in (prelu(x, a, 1, ZERO_GRAD_ONE_PLUS_SLOPE), x.clamp(min=0) + a4 * x.clamp(max=0)):
        gx, ga = torch.autograd.grad((y * v).sum(), [x, a], create_graph=True)
        outs.append([y, gx, ga, *torch.autograd.grad((gx * v).sum() + ga.sum(), [x, a])])
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_prelu_number_slope_is_a_leaky_relu():
    check_not_fused(lambda x: x.clamp(min=0) + 0.1 * x.clamp(max=0), rand(3, 5, seed=22), fusion="prelu",
                    reason="leaky ReLU")


# ================================================================================================ matmul + transpose
class TransposeSpellings(nn.Module):
    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.W = param(6, 8, seed=23)   # (out, in)

    def forward(self, x, y):
        s = self.spelling
        if s == "W.T.contiguous":           # x (.., 8), W.T (8, 6)
            return x @ self.W.T.contiguous()
        if s == "matmul-mT-contiguous":     # x, y (B, M, K): x @ y^T
            return torch.matmul(x, y.mT.contiguous())
        if s == "bmm-transpose12":
            return torch.bmm(x.transpose(1, 2).contiguous(), y)
        if s == "permute021-first":
            return x.permute(0, 2, 1).contiguous() @ y
        if s == "mm-t-first":
            return torch.mm(x[0].t().contiguous(), y[0])
        if s == "swapaxes-method-matmul":
            return x.matmul(y.swapaxes(-1, -2).contiguous())
        if s == "transpose-positive-clone":
            return x @ y.transpose(2, 1).clone()
        if s == "T-first-2d":
            return torch.matmul(x[0].T.contiguous(), y[0])
        if s == "copy-used-twice":
            t = y.transpose(1, 2).contiguous()
            return x @ t, t.sum()
        if s == "permute-batch-not-matrix":   # the stride-1 dim moves into the batch
            return torch.matmul(x.permute(2, 0, 1).contiguous(), y.permute(2, 1, 0).contiguous())
        raise ValueError(s)


MM_POSITIVE = ["W.T.contiguous", "matmul-mT-contiguous", "bmm-transpose12", "permute021-first", "mm-t-first",
               "swapaxes-method-matmul", "transpose-positive-clone", "T-first-2d"]


def _mm_inputs(spelling):
    if spelling == "W.T.contiguous":
        return rand(2, 5, 8, seed=24), rand(1, seed=25)
    if spelling in ("bmm-transpose12", "permute021-first", "mm-t-first", "T-first-2d"):
        return rand(3, 5, 7, seed=24), rand(3, 5, 4, seed=25)
    return rand(3, 5, 7, seed=24), rand(3, 6, 7, seed=25)


@pytest.mark.parametrize("spelling", MM_POSITIVE)
def test_matmul_transpose_spellings(spelling):
    model = TransposeSpellings(spelling)
    x, y = _mm_inputs(spelling)
    if spelling == "W.T.contiguous":
        report = check(lambda x, m=model: m(x, None), x, matmul_transpose=1)
    else:
        report = check(model, x, y, matmul_transpose=1)
    code = report.graphs[0].code_after
    assert "contiguous" not in code and "clone" not in code, code


def test_matmul_transpose_under_inductor():
    check(TransposeSpellings("bmm-transpose12"), *_mm_inputs("bmm-transpose12"), options=INDUCTOR, matmul_transpose=1)


def test_matmul_transpose_negatives():
    check_not_fused(TransposeSpellings("copy-used-twice"), rand(3, 5, 7, seed=24), rand(3, 6, 7, seed=25),
                    fusion="matmul_transpose", reason="also used")
    check_not_fused(TransposeSpellings("permute-batch-not-matrix"), rand(3, 5, 7, seed=24), rand(4, 5, 7, seed=25),
                    fusion="matmul_transpose", reason="stride")


# ================================================================================================ global pooling
POOL_POSITIVE = {
    "torch.mean-nested": (lambda x: torch.mean(torch.mean(x, dim=3), dim=2), "mean"),
    "H-then-W": (lambda x: x.mean(dim=-2).mean(dim=-1), "mean"),
    "keepdim-positional": (lambda x: x.mean(2, True).mean(3, True), "mean"),
    "sum-size-product": (lambda x: x.sum(3).sum(2) / (x.size(2) * x.size(3)), "mean"),
    "sum-div-method": (lambda x: torch.sum(x, dim=-1).sum(dim=-1).div(x.shape[-1] * x.shape[-2]), "mean"),
    "list-dims": (lambda x: x.mean([3]).mean([2]), "mean"),
    "sum-keepdim": (lambda x: x.sum(-1, keepdim=True).sum(-2, keepdim=True), "sum"),
}


@pytest.mark.parametrize("name", list(POOL_POSITIVE))
def test_global_pool_spellings(name):
    fn, kind = POOL_POSITIVE[name]
    report = check(fn, rand(2, 3, 5, 6, seed=26), global_pool=1)
    match = next(m for m in report.matches if m.fusion == "global_pool")
    assert match.details["kind"] == kind and match.details["dims"] == (2, 3), str(report)


def test_global_pool_under_inductor():
    check(POOL_POSITIVE["sum-size-product"][0], rand(2, 3, 5, 6, seed=26), options=INDUCTOR, global_pool=1)


def test_global_pool_negatives():
    # dims 1 and 3: not one block of dims
    check_not_fused(lambda x: x.mean(-1).mean(1), rand(2, 3, 5, 6, seed=27), fusion="global_pool",
                    reason="not adjacent")
    # a mean of sums is not one reduction kind
    check_not_fused(lambda x: x.sum(-1).mean(-1), rand(2, 3, 5, 6, seed=27), fusion="global_pool")


def test_sum_divided_by_one_dim_stays_a_sum():
    report = check(lambda x: x.sum(-1).sum(-1) / x.shape[-1], rand(2, 3, 5, 6, seed=28), global_pool=1)
    assert report.matches[0].details["kind"] == "sum"


# ================================================================================================ eltwise chains
def _inplace_accumulate(x1, b1, x2, b2, x3, b3):
    y = x1 * b1
    y += x2 * b2
    y -= x3 * b3
    return y


ELT_POSITIVE = {
    "torch-functions": lambda x1, b1, x2, b2, x3, b3: torch.sub(torch.add(torch.mul(x1, b1), torch.mul(x2, b2)),
                                                                 torch.mul(x3, b3)),
    "methods": lambda x1, b1, x2, b2, x3, b3: x1.mul(b1).add(x2.mul(b2)).sub(x3.mul(b3)),
    "negated-first": lambda x1, b1, x2, b2, x3, b3: -x1 * b1 + x2 * b2 - x3 * b3,
    "numpy-aliases": lambda x1, b1, x2, b2, x3, b3: torch.subtract(torch.multiply(x1, b1) + torch.multiply(x2, b2),
                                                                  torch.true_divide(x3, b3.abs() + 1)),
    "in-place-accumulate": _inplace_accumulate,
    "difference-of-squares": lambda x1, b1, x2, b2, x3, b3: (x1 - b1) * (x1 + b1) / (b3 * b3 + 1.0) + x2 * b2,
    "scalars-and-alpha": lambda x1, b1, x2, b2, x3, b3: torch.add(2.0 * x1, b1, alpha=0.5).mul(x2) - x3 / 3,
}


@pytest.mark.parametrize("name", list(ELT_POSITIVE))
def test_eltwise_chain_spellings(name):
    xs = [rand(4, 6, seed=30 + i) for i in range(6)]
    check(ELT_POSITIVE[name], *xs, eltwise_chain=1)


def test_eltwise_chain_under_inductor():
    xs = [rand(4, 6, seed=30 + i) for i in range(6)]
    check(ELT_POSITIVE["methods"], *xs, options=INDUCTOR, eltwise_chain=1)


def test_eltwise_chain_negatives():
    # two ops are not a chain
    check_not_fused(lambda a, b, c: a * b - c, rand(3, 4), rand(3, 4, seed=1), rand(3, 4, seed=2),
                    fusion="eltwise_chain")
    # a float64 tensor in the middle: the chain computes in float64, which the kernel does not take
    d64 = rand(3, 4, seed=3).double()
    check_not_fused(lambda a, b: a * d64 + b - a, rand(3, 4), rand(3, 4, seed=1), fusion="eltwise_chain")


def test_eltwise_chain_int_tensor_is_promoted_as_in_eager():
    """An int tensor in the middle: eager's mul promotes it to the float dtype; the fused op reads it through
    the same cast (session 9; it used to be a near-miss)."""
    idx = torch.arange(12).reshape(3, 4)
    check(lambda a, b: a * idx + b - a, rand(3, 4), rand(3, 4, seed=1), eltwise_chain=1)


# ---- statistics spelled as sums (session 2): sum / n is the mean when n is the number of summed elements
class _LayerNormBySums(nn.Module):
    def __init__(self, n=32):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(n)), nn.Parameter(torch.randn(n))

    def forward(self, x):
        n = x.shape[-1]
        mu = x.sum(-1, keepdim=True) / n
        d = x - mu
        var = (d * d).sum(dim=-1, keepdim=True) / n
        return d / torch.sqrt(var + 1e-5) * self.w + self.b


class _RMSNormBySum(nn.Module):
    def __init__(self, n=32):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n))

    def forward(self, x):
        ms = torch.sum(x.pow(2), -1, True) * (1.0 / x.shape[-1])
        return self.w * (x * torch.rsqrt(ms + 1e-6))


class _LayerNormWrongCount(nn.Module):
    def forward(self, x):  # divides by n - 1: not the mean, not a layer norm
        mu = x.sum(-1, keepdim=True) / (x.shape[-1] - 1)
        d = x - x.mean(-1, keepdim=True)
        return (d - mu) / torch.sqrt(d.pow(2).mean(-1, keepdim=True) + 1e-5)


def test_statistics_spelled_as_sums():
    x = torch.randn(3, 5, 32)
    assert_fused(_LayerNormBySums(), x, layer_norm=1)
    assert_close_to_eager(_LayerNormBySums(), x)
    assert_fused(_RMSNormBySum(), x, rms_norm=1)
    assert_close_to_eager(_RMSNormBySum(), x)
    assert_fused(_LayerNormWrongCount(), x, layer_norm=0)
    assert_close_to_eager(_LayerNormWrongCount(), x)
