"""End-to-end tests of the pointwise/graph fusions of issue 5: bias_gelu, prelu, matmul_transpose,
global_pool, eltwise_chain. For each: several spellings fused (count from the report) with outputs and
gradients equal to eager, under the eager remainder and under Inductor with norm_policy="always";
negatives left alone with a recorded near-miss reason; the norm_policy rules."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flashfuse
from flashfuse.explain import explain
from flashfuse.testing import assert_close_to_eager

FUSIONS = ("bias_gelu", "prelu", "matmul_transpose", "global_pool", "eltwise_chain")
# Only these passes (in the default order), so that these tests see these fusions alone; the last test
# runs the full default pass list.
MINE = {"passes": list(FUSIONS)}
EAGER = {"remainder": "eager", **MINE}
INDUCTOR_ALWAYS = {"remainder": "inductor", "norm_policy": "always", **MINE}
CONFIGS = [pytest.param(EAGER, id="eager"), pytest.param(INDUCTOR_ALWAYS, id="inductor-always")]


def counts(report) -> dict[str, int]:
    return {name: report.count(name) for name in FUSIONS}


def expect(model, *inputs, options=EAGER, **expected):
    """Check the exact number of rewrites per fusion (unnamed ones must be 0) and return the report."""
    report = explain(model, *inputs, options=options)
    want = {name: expected.get(name, 0) for name in FUSIONS}
    assert counts(report) == want, str(report)
    assert not any("passes skipped" in note for g in report.graphs for note in g.notes), str(report)
    return report


def near_miss(report, fusion: str) -> str:
    reasons = [n.reason for n in report.near_misses if n.fusion == fusion]
    assert reasons, f"no near-miss recorded for {fusion}:\n{report}"
    return " | ".join(reasons)


def check(model, *inputs, options=EAGER, **expected):
    report = expect(model, *inputs, options=options, **expected)
    assert_close_to_eager(model, *inputs, options=options, rtol=1e-4, atol=1e-5)
    return report


def rand(*shape, zeros: int = 0):
    x = torch.randn(*shape, dtype=torch.float64).float()
    if zeros:
        x.view(-1)[:zeros] = 0.0  # exact zeros: where the PReLU spellings' gradients differ
    return x


# ------------------------------------------------------------------------------------------------
# bias + GELU
# ------------------------------------------------------------------------------------------------
class LinearGelu(nn.Module):
    def __init__(self, approximate="none"):
        super().__init__()
        self.lin, self.approximate = nn.Linear(12, 9), approximate

    def forward(self, x):
        return F.gelu(self.lin(x), approximate=self.approximate)


class MatmulBiasGelu(nn.Module):
    """`x @ W + b`, then one of the GELU spellings."""

    def __init__(self, spelling):
        super().__init__()
        self.W = nn.Parameter(torch.randn(12, 9) / 4)
        self.b = nn.Parameter(torch.randn(9))
        self.spelling = spelling

    def forward(self, x):
        h = x @ self.W + self.b
        s = self.spelling
        if s == "F.gelu":
            return F.gelu(h)
        if s == "erf":
            return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        if s == "erf-div2":
            return h * (1.0 + torch.erf(h * 0.7071067811865476)) / 2
        if s == "tanh-pow":
            return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * torch.pow(h, 3))))
        if s == "tanh-cube":
            return h * 0.5 * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * h * h * h)))
        if s == "tanh-fast":  # HF FastGELU
            return 0.5 * h * (1.0 + torch.tanh(h * 0.7978845608 * (1.0 + 0.044715 * h * h)))
        if s == "wrong-constant":
            return 0.5 * h * (1 + torch.tanh(0.8 * (h + 0.044715 * h * h * h)))
        if s == "wrong-erf":
            return 0.5 * h * (1 + torch.erf(h / 1.5))
        raise ValueError(s)


@pytest.mark.parametrize("options", CONFIGS)
@pytest.mark.parametrize("spelling", ["F.gelu", "erf", "tanh-pow"])
def test_bias_gelu_spellings(spelling, options):
    torch.manual_seed(0)
    report = check(MatmulBiasGelu(spelling), rand(3, 5, 12), options=options, bias_gelu=1)
    assert report.matches[0].details["bias"] is True  # the `+ b` of the matmul is in the kernel
    assert report.matches[0].details["approximate"] == ("tanh" if "tanh" in spelling else "none")


@pytest.mark.parametrize("spelling", ["erf-div2", "tanh-cube", "tanh-fast"])
def test_bias_gelu_more_spellings_eager(spelling):
    torch.manual_seed(1)
    check(MatmulBiasGelu(spelling), rand(7, 12), bias_gelu=1)


@pytest.mark.parametrize("options", CONFIGS)
def test_linear_gelu_tanh_folds_linear_bias(options):
    torch.manual_seed(2)
    report = check(LinearGelu("tanh"), rand(2, 3, 12), options=options, bias_gelu=1)
    assert "linear's bias" in report.matches[0].description
    code = report.graphs[0].code_after
    assert "flashfuse.bias_gelu" in code and "aten.gelu" not in code


class AddmmViewGelu(nn.Module):
    """GPT-2's Conv1D: `addmm(b, x.view(-1, nx), W).view(..)`, then GELU; `split` views the output so that
    its last dim is no longer the bias's (the bias must then stay in the addmm)."""

    def __init__(self, split=False, keep=False):
        super().__init__()
        self.W = nn.Parameter(torch.randn(12, 8) / 4)
        self.b = nn.Parameter(torch.randn(8))
        self.split, self.keep = split, keep

    def forward(self, x):
        h = torch.addmm(self.b, x.view(-1, x.size(-1)), self.W)
        out = h.view(*x.shape[:-1], 2, 4) if self.split else h.view(*x.shape[:-1], 8)
        g = F.gelu(out, approximate="tanh")
        return (g, h) if self.keep else g


@pytest.mark.parametrize("options", CONFIGS)
def test_addmm_bias_folds_through_the_view_after_it(options):
    torch.manual_seed(3)
    report = check(AddmmViewGelu(), rand(2, 3, 12), options=options, bias_gelu=1)
    assert report.matches[0].details["bias"] is True, str(report)
    assert "through the view" in report.matches[0].description
    assert "aten.addmm" not in report.graphs[0].code_after


@pytest.mark.parametrize("split,keep", [(True, False), (False, True)], ids=["last-dim-reshaped", "addmm-also-returned"])
def test_addmm_bias_stays_when_the_view_moves_its_last_dim_or_the_addmm_is_shared(split, keep):
    torch.manual_seed(4)
    report = check(AddmmViewGelu(split=split, keep=keep), rand(2, 3, 12), bias_gelu=1)
    assert report.matches[0].details["bias"] is False, str(report)
    assert "aten.addmm" in report.graphs[0].code_after


def _megatron_gelu(x):
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def _megatron_gelu_back(g, x, half=0.5):
    t = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
    return (half * x * ((1 - t * t) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + t)) * g


class MegatronBiasGelu(torch.autograd.Function):
    """Megatron's bias_gelu_impl: GELU(input + bias), tanh form, with its derivative written by hand."""

    @staticmethod
    def forward(ctx, inp, bias):
        ctx.save_for_backward(inp, bias)
        return _megatron_gelu(bias + inp)

    @staticmethod
    def backward(ctx, g):
        inp, bias = ctx.saved_tensors
        tmp = _megatron_gelu_back(g, bias + inp)
        return tmp, tmp


class OffBackwardGelu(MegatronBiasGelu):
    """The same forward with a backward that is not its gradient (0.6 for 0.5): the user's, kept."""

    @staticmethod
    def backward(ctx, g):
        inp, bias = ctx.saved_tensors
        tmp = _megatron_gelu_back(g, bias + inp, half=0.6)
        return tmp, tmp


class ErfGeluFunction(torch.autograd.Function):
    """HF BLOOM-like, one input, erf form with the exact derivative (exp)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
        return g * (cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi))


class ClampedGeluFunction(ErfGeluFunction):
    """GELU's forward, but a backward that clamps: not elementwise-analytic, so not provable."""

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.clamp(0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))), 0.0, 1.0)


class FunctionMLP(nn.Module):
    """linear, then the Function, called by its class name as models do (`bias_gelu_impl = F.apply`)."""

    def __init__(self, fn):
        super().__init__()
        self.with_bias = fn in ("megatron", "off")
        self.fc = nn.Linear(12, 8, bias=not self.with_bias)
        self.b = nn.Parameter(torch.randn(8))
        self.fn = fn

    def forward(self, x):
        h = self.fc(x)
        if self.fn == "megatron":
            return MegatronBiasGelu.apply(h, self.b)
        if self.fn == "off":
            return OffBackwardGelu.apply(h, self.b)
        if self.fn == "erf":
            return ErfGeluFunction.apply(h)
        return ClampedGeluFunction.apply(h)


@pytest.mark.parametrize("options", CONFIGS)
@pytest.mark.parametrize("fn,kind,bias", [("megatron", "tanh", True), ("erf", "none", False)],
                         ids=["megatron-bias-tanh", "one-input-erf"])
def test_gelu_autograd_function_with_a_proven_backward_fuses(fn, kind, bias, options):
    torch.manual_seed(5)
    x = rand(2, 3, 12).requires_grad_(True)  # without grad, Dynamo inlines the Function's forward
    report = check(FunctionMLP(fn), x, options=options, bias_gelu=1)
    m = report.matches[0]
    assert (m.details["spelling"], m.details["approximate"], m.details["bias"]) == ("autograd.Function", kind, bias)
    assert "autograd_function_apply" not in report.graphs[0].code_after


@pytest.mark.parametrize("fn,reason", [("off", "its backward is not GELU's derivative"),
                                       ("clamp", "the backward is not provably elementwise")],
                         ids=["backward-off", "backward-clamps"])
def test_gelu_autograd_function_keeps_a_backward_it_cannot_prove(fn, reason):
    """The user's backward runs (gradients equal eager's, which are not GELU's for backward-off)."""
    torch.manual_seed(6)
    x = rand(2, 3, 12).requires_grad_(True)
    report = check(FunctionMLP(fn), x)
    assert reason in near_miss(report, "bias_gelu")
    assert "autograd_function_apply" in report.graphs[0].code_after


def test_gelu_inside_a_larger_expression():
    def f(x, r):
        return 3.0 * (0.5 * x * (1 + torch.erf(x / math.sqrt(2)))) + r * 2.0

    # the GELU is found inside `3 * gelu + r * 2`, and the rest becomes one chain around it
    report = check(f, rand(4, 9), rand(4, 9), bias_gelu=1, eltwise_chain=1)
    assert not [n for n in report.near_misses if n.fusion == "bias_gelu"]


def _tanh_gelu(h):
    return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))


@pytest.mark.parametrize("inner", ["scaled", "gated", "shifted", "erf-negated"])
def test_gelu_of_a_computed_input_fuses_with_that_input(inner):
    """GELU whose input is itself computed (`gelu(0.5 * y)`, `gelu(a * b)`, `gelu(y + 1)`): the region also
    takes in those ops, so it is not GELU of its leaves; the input node is found inside it."""
    def f(a, b):
        if inner == "scaled":
            return _tanh_gelu(a * 0.5)
        if inner == "gated":
            return _tanh_gelu(a * b)
        if inner == "shifted":
            return _tanh_gelu(a + 1.0)
        h = -a
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    check(f, rand(4, 9), rand(4, 9), bias_gelu=1)


@pytest.mark.parametrize("spelling", ["wrong-constant", "wrong-erf"])
def test_gelu_with_a_wrong_constant_is_a_different_function(spelling):
    torch.manual_seed(3)
    model = MatmulBiasGelu(spelling)
    report = explain(model, rand(4, 12), options=EAGER)
    assert report.count("bias_gelu") == 0
    assert "a different function" in near_miss(report, "bias_gelu")
    assert_close_to_eager(model, rand(4, 12), options=EAGER, rtol=1e-4, atol=1e-5)


def test_gelu_with_a_shared_intermediate_is_left_alone():
    def f(x):
        cube = x * x * x
        return 0.5 * x * (1 + torch.tanh(0.7978845608 * (x + 0.044715 * cube))), cube

    x = rand(5, 7)
    report = explain(f, x, options=EAGER)
    assert report.count("bias_gelu") == 0
    assert "also used" in near_miss(report, "bias_gelu")
    assert_close_to_eager(f, x, options=EAGER)


def test_bias_with_other_users_is_not_folded():
    W, b = torch.randn(12, 9), torch.randn(9)

    def f(x):
        h = x @ W + b
        return F.gelu(h), h

    report = expect(f, rand(4, 12), bias_gelu=1)
    assert report.matches[0].details["bias"] is False
    assert_close_to_eager(f, rand(4, 12), options=EAGER)


# ------------------------------------------------------------------------------------------------
# PReLU
# ------------------------------------------------------------------------------------------------
class PreluNet(nn.Module):
    def __init__(self, spelling, channels=5):
        super().__init__()
        self.spelling = spelling
        self.prelu = nn.PReLU(channels)
        self.a = nn.Parameter(torch.rand(1) * 0.5)
        self.a_channel = nn.Parameter(torch.rand(channels, 1, 1))
        self.a_last = nn.Parameter(torch.rand(7))
        self.a_2d = nn.Parameter(torch.rand(channels, 1, 7))

    def forward(self, x):
        s = self.spelling
        if s == "nn.PReLU":
            return self.prelu(x)
        if s == "F.prelu-scalar":
            return F.prelu(x, self.a)
        if s == "where-channel":
            return torch.where(x > 0, x, self.a_channel * x)
        if s == "where-le-last-dim":
            return torch.where(x <= 0, x * self.a_last, x)
        if s == "where-ge":
            return torch.where(x >= 0, x, self.a * x)
        if s == "relu-diff":
            return F.relu(x) - self.a * F.relu(-x)
        if s == "relu-diff-channel":
            return F.relu(x) - self.a_channel * F.relu(-x)
        if s == "relu-plus-slope-times-x-minus-relu":  # the negative part as x - relu(x): gradient a at 0
            return F.relu(x) + self.a_channel * (x - F.relu(x))
        if s == "clamp-plus-slope-times-x-minus-clamp":  # x - clamp(x, min=0): gradient 1 (clamp) + 0 at 0
            return x.clamp(min=0) + self.a * (x - x.clamp(min=0))
        if s == "leaky-number":
            return torch.where(x > 0, x, 0.1 * x)
        if s == "slope-2d":
            return torch.where(x > 0, x, self.a_2d * x)
        if s == "slope-enlarges-x":
            return torch.where(x > 0, x, self.a_channel[:, :, :, None, None] * x)  # (5,1,1,1,1) * (2,5,3,7)
        raise ValueError(s)


@pytest.mark.parametrize("options", CONFIGS)
@pytest.mark.parametrize("spelling", ["nn.PReLU", "where-channel", "relu-diff"])
def test_prelu_spellings(spelling, options):
    torch.manual_seed(4)
    check(PreluNet(spelling), rand(2, 5, 3, 7, zeros=6), options=options, prelu=1)


@pytest.mark.parametrize("spelling", ["F.prelu-scalar", "where-le-last-dim", "where-ge", "relu-diff-channel",
                                      "relu-plus-slope-times-x-minus-relu", "clamp-plus-slope-times-x-minus-clamp"])
def test_prelu_more_spellings_eager(spelling):
    torch.manual_seed(5)
    report = check(PreluNet(spelling), rand(2, 5, 3, 7, zeros=6), prelu=1)
    if spelling == "where-le-last-dim":
        assert report.matches[0].details["channel_dim"] == 3


@pytest.mark.parametrize("spelling,reason", [("leaky-number", "leaky ReLU"), ("slope-2d", "varies along 2 dims"),
                                             ("slope-enlarges-x", "broadcasts x")])
def test_prelu_negatives(spelling, reason):
    model = PreluNet(spelling)
    report = expect(model, rand(2, 5, 3, 7))
    assert reason in near_miss(report, "prelu")


def test_prelu_with_shared_product_is_left_alone():
    a = torch.rand(1)

    def f(x):
        m = a * x
        return torch.where(x > 0, x, m), m

    report = expect(f, rand(3, 4))
    assert "also used" in near_miss(report, "prelu")


# ------------------------------------------------------------------------------------------------
# matmul + transpose folding
# ------------------------------------------------------------------------------------------------
class TransposeMatmul(nn.Module):
    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.W = nn.Parameter(torch.randn(6, 7))

    def forward(self, x):
        s = self.spelling
        if s == "transpose-contiguous":
            return x @ x.transpose(-2, -1).contiguous()
        if s == "permute-contiguous":
            return torch.matmul(x.permute(0, 1, 3, 2).contiguous(), x)
        if s == "weight-t":
            return x @ self.W.t().contiguous()
        if s == "bmm-mT-clone":
            y = x.flatten(0, 1)
            return torch.bmm(y, y.mT.clone())
        if s == "batch-not-collapsible":
            return x.permute(0, 2, 1, 3).contiguous() @ x.transpose(-2, -1)
        if s == "copy-used-elsewhere":
            t = x.transpose(-2, -1).contiguous()
            return x @ t, t * 2
        raise ValueError(s)


@pytest.mark.parametrize("options", CONFIGS)
@pytest.mark.parametrize("spelling", ["transpose-contiguous", "permute-contiguous", "weight-t"])
def test_matmul_transpose_spellings(spelling, options):
    torch.manual_seed(6)
    report = check(TransposeMatmul(spelling), rand(2, 3, 5, 7), options=options, matmul_transpose=1)
    code = report.graphs[0].code_after
    assert "contiguous" not in code and "clone" not in code  # no copy kernel left


def test_matmul_transpose_bmm_clone_eager():
    report = check(TransposeMatmul("bmm-mT-clone"), rand(2, 3, 5, 7), matmul_transpose=1)
    assert "clone" not in report.graphs[0].code_after


@pytest.mark.parametrize("spelling,reason", [("batch-not-collapsible", "do not collapse"),
                                             ("copy-used-elsewhere", "also used")])
def test_matmul_transpose_negatives(spelling, reason):
    model = TransposeMatmul(spelling)
    x = rand(2, 5, 5, 7) if spelling == "batch-not-collapsible" else rand(2, 3, 5, 7)
    report = expect(model, x)
    assert reason in near_miss(report, "matmul_transpose")
    assert "contiguous" in report.graphs[0].code_after


# ------------------------------------------------------------------------------------------------
# reduction -> global pooling
# ------------------------------------------------------------------------------------------------
POOLS = {
    "mean-mean": lambda x: x.mean(-1).mean(-1),
    "mean3-mean2": lambda x: x.mean(3).mean(2),
    "sum-sum-div": lambda x: x.sum(-1).sum(-1) / (x.shape[-1] * x.shape[-2]),
    "keepdim": lambda x: x.mean(-1, keepdim=True).mean(-2, keepdim=True),
    "three-steps": lambda x: x.mean(-1).mean(-1).mean(-1),
    "sum-sum": lambda x: x.sum(-1).sum(-1),
    "keep-then-drop": lambda x: x.mean(-1, keepdim=True).mean(-2),  # (B, C, 1): one mean and a view
    "sum-drop-keep-div": lambda x: x.sum(-1).sum(-1, keepdim=True) / (x.shape[-1] * x.shape[-2]),
    "sum-sum-div-h-div-w": lambda x: x.sum(-1).sum(-1) / x.shape[2] / x.shape[3],  # / H first: a sum and a mean
    "sum-sum-div-w-div-h": lambda x: x.sum(-1).sum(-1) / x.shape[3] / x.shape[2],
    "sum-sum-times-reciprocal": lambda x: x.sum(-1).sum(-1) * (1.0 / (x.shape[-1] * x.shape[-2])),
}


@pytest.mark.parametrize("options", CONFIGS)
@pytest.mark.parametrize("spelling", ["mean-mean", "sum-sum-div"])
def test_global_pool_spellings(spelling, options):
    report = check(POOLS[spelling], rand(2, 3, 5, 7), options=options, global_pool=1)
    assert report.matches[0].details["kind"] == "mean"
    assert report.matches[0].details["dims"] == (2, 3)
    assert report.graphs[0].code_after.count("aten.mean") == 1


@pytest.mark.parametrize("spelling", ["mean3-mean2", "keepdim", "three-steps", "sum-sum", "keep-then-drop",
                                      "sum-drop-keep-div", "sum-sum-div-h-div-w", "sum-sum-div-w-div-h",
                                      "sum-sum-times-reciprocal"])
def test_global_pool_more_spellings_eager(spelling):
    report = check(POOLS[spelling], rand(2, 3, 5, 7), global_pool=1)
    assert report.matches[0].details["steps"] == (3 if spelling == "three-steps" else 2)
    if spelling.startswith("sum-sum-") and spelling != "sum-sum":  # the divisions complete the count: a mean
        assert report.matches[0].details["kind"] == "mean"
        assert "aten.div" not in report.graphs[0].code_after and "aten.mul" not in report.graphs[0].code_after


def test_global_pool_sum_divided_by_part_of_the_count_stays_a_sum():
    report = check(lambda x: x.sum(-1).sum(-1) / x.shape[3], rand(2, 3, 5, 7), global_pool=1)
    assert report.matches[0].details["kind"] == "sum"


def test_global_pool_negatives():
    report = expect(lambda x: x.mean(1).mean(-1), rand(2, 3, 5, 7))
    assert "not adjacent" in near_miss(report, "global_pool")

    def shared(x):
        m = x.mean(-1)
        return m.mean(-1), m

    report = expect(shared, rand(2, 3, 5, 7))
    assert "also used" in near_miss(report, "global_pool")


def test_sum_divided_by_another_number_stays_a_sum():
    f = lambda x: x.sum(-1).sum(-1) / 10  # noqa: E731
    report = check(f, rand(2, 3, 5, 7), global_pool=1)
    assert report.matches[0].details["kind"] == "sum"


# ------------------------------------------------------------------------------------------------
# binary eltwise folding
# ------------------------------------------------------------------------------------------------
def chain_products(a, b, c, d, e, f):
    return a * b + c * d - e * f


def chain_scalars(a, b, c):
    return a * 2.0 + b * 3.0 - c / 4 + 1


def chain_rsub_div(a, b, c):
    return (1 - a) * b / c + torch.add(a, b, alpha=2) - c.pow(2)


@pytest.mark.parametrize("options", CONFIGS)
@pytest.mark.parametrize("fn,n,ops", [(chain_products, 6, 5), (chain_scalars, 3, 6)])
def test_eltwise_chain_spellings(fn, n, ops, options):
    xs = [rand(3, 7) for _ in range(n)]
    report = check(fn, *xs, options=options, eltwise_chain=1)
    assert report.matches[0].details["ops"] == ops
    assert report.matches[0].details["inputs"] == n


@pytest.mark.parametrize("options", CONFIGS)
def test_eltwise_chain_returns_a_shared_intermediate_too(options):
    def shared(a, b, c):
        t = a * b
        return t + c - a, t * 3   # t is read after the chain: the fused kernel writes it as well

    report = check(shared, rand(3, 4), rand(3, 4), rand(3, 4), options=options, eltwise_chain=1)
    assert report.matches[0].details["outputs"] == 2
    assert "also returns 1 intermediate" in report.matches[0].description


def test_eltwise_chain_rsub_div_alpha_pow_eager():
    xs = [rand(5, 9), rand(5, 9), rand(5, 9).abs() + 0.5]
    check(chain_rsub_div, *xs, eltwise_chain=1)


def chain_addcmul_addcdiv(a, b, c, d):
    # Adam's second-moment spelling, then an addcdiv: both ops stay whole in the re-traced graph
    v = torch.addcmul(a * 0.999, b, b, value=1 - 0.999)
    return torch.addcdiv(c, d, v + 1e-8, value=-0.01)


@pytest.mark.parametrize("options", CONFIGS)
def test_eltwise_chain_reads_addcmul_and_addcdiv(options):
    xs = [rand(3, 7), rand(3, 7), rand(3, 7), rand(3, 7)]
    xs[0] = xs[0].abs()
    report = check(chain_addcmul_addcdiv, *xs, options=options, eltwise_chain=1)
    assert report.matches[0].details["inputs"] == 4


def test_eltwise_chain_keeps_the_order_of_operations():
    # sympy would simplify (x + 1e8) - 1e8 to x; the kernel must compute what eager computes
    f = lambda x, y: ((x + 1e8) - 1e8) * y  # noqa: E731
    x, y = rand(4, 5), rand(4, 5)
    expect(f, x, y, eltwise_chain=1)
    compiled = torch.compile(f, backend=__import__("flashfuse").backend(**EAGER))
    assert torch.equal(compiled(x, y), f(x, y))


class AffineChain(nn.Module):
    """Per-channel parameters broadcast against (N, C, H, W), and a 0-dim tensor."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(5, 1, 1)), nn.Parameter(torch.randn(5, 1, 1))
        self.b = nn.Parameter(torch.randn(7))
        self.s = nn.Parameter(torch.tensor(0.7))

    def forward(self, x, y):
        return x * self.w1 + y * self.w2 - self.b * self.s + x * y


@pytest.mark.parametrize("options", CONFIGS)
def test_eltwise_chain_with_broadcast_parameters(options):
    torch.manual_seed(9)
    report = check(AffineChain(), rand(2, 5, 3, 7), rand(2, 5, 3, 7), options=options, eltwise_chain=1)
    assert report.matches[0].details["inputs"] == 6


def test_eltwise_chain_negatives():
    # mixed dtypes (type promotion between fp16 and fp32 tensors): the chain stops at the promotion
    x16 = rand(4, 9).half()
    report = expect(lambda x, y, z: x * x16 + y - z, rand(4, 9), rand(4, 9), rand(4, 9))
    assert "mixes dtypes" in near_miss(report, "eltwise_chain")

    # an intermediate read by an op that the chain itself needs (a cycle if fused) splits the chain
    def used_before(a, b, c):
        t = a * b
        u = t.sum()
        return (t + c) - u

    report = expect(used_before, rand(3, 4), rand(3, 4), rand(3, 4))
    assert "also used" in near_miss(report, "eltwise_chain")

    # two ops are not a chain
    report = expect(lambda a, b, c: a * b + c, rand(3, 4), rand(3, 4), rand(3, 4))
    assert not report.near_misses


# ------------------------------------------------------------------------------------------------
# norm_policy
# ------------------------------------------------------------------------------------------------
def test_inductor_auto_leaves_pointwise_kernels_to_inductor_but_simplifies_graphs():
    W, b = torch.randn(12, 9), torch.randn(9)
    a = torch.rand(1)

    def f(x, y, z):
        g = F.gelu(x @ W + b)
        p = torch.where(y > 0, y, a * y)
        c = g * 2.0 + p * 3.0 - z
        return c, x.mean(-1).mean(-1), x @ x.transpose(-2, -1).contiguous()

    args = (rand(2, 9, 12), rand(2, 9, 9), rand(2, 9, 9))
    auto = expect(f, *args, options={"remainder": "inductor", **MINE}, matmul_transpose=1, global_pool=1)
    for fusion in ("bias_gelu", "prelu", "eltwise_chain"):
        assert "left to Inductor" in near_miss(auto, fusion)
    expect(f, *args, options=INDUCTOR_ALWAYS, bias_gelu=1, prelu=1, eltwise_chain=1, matmul_transpose=1,
           global_pool=1)
    expect(f, *args, options={"remainder": "inductor", "norm_policy": "never", **MINE}, matmul_transpose=1,
           global_pool=1)
    # the eager remainder always applies, whatever the policy
    expect(f, *args, options={"remainder": "eager", "norm_policy": "never", **MINE}, bias_gelu=1, prelu=1,
           eltwise_chain=1, matmul_transpose=1, global_pool=1)


def test_all_fusions_together_match_eager_under_inductor():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(12, 9)
            self.prelu = nn.PReLU(9)

        def forward(self, x, y, z):
            h = self.prelu(F.gelu(self.lin(x)).transpose(1, 2)).transpose(1, 2)
            return h * y + z * y - h / 3, h.mean(-1).mean(-1)

    torch.manual_seed(7)
    args = (rand(2, 5, 12), rand(2, 5, 9), rand(2, 5, 9))
    # every default pass (attention, norms, ...) runs here: the pointwise fusions must coexist with them
    check(Block(), *args, options={"remainder": "inductor", "norm_policy": "always"}, bias_gelu=1, prelu=1,
          eltwise_chain=1, global_pool=1)


# ------------------------------------------------------------------------------------------------
# in-place writes between the fused ops: fusing would read after the write
# ------------------------------------------------------------------------------------------------
def test_inplace_write_inside_a_region_blocks_fusion():
    def chain(a, b, c):
        t = a * b
        a.add_(1.0)
        return t + c * a - b

    def pool(x):
        m = x.mean(-1)
        x.mul_(2.0)
        return m.mean(-1)

    for fn, args, fusion in ((chain, (rand(3, 4), rand(3, 4), rand(3, 4)), "eltwise_chain"),
                             (pool, (rand(2, 3, 5),), "global_pool")):
        report = explain(fn, *[a.clone() for a in args], options=EAGER)
        assert report.count(fusion) == 0, str(report)
        assert "writes in place" in near_miss(report, fusion)
        want_args, got_args = [a.clone() for a in args], [a.clone() for a in args]
        want = fn(*want_args)
        got = torch.compile(fn, backend=__import__("flashfuse").backend(**EAGER))(*got_args)
        torch.testing.assert_close(got, want)
        for a, b in zip(got_args, want_args):
            torch.testing.assert_close(a, b)


def test_autocast_regions_are_left_alone():
    W, b = torch.randn(12, 9), torch.randn(9)

    def inside(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = F.gelu(x @ W + b)
            return h * 2.0 + h * h - b

    def outside(x, y):
        return F.gelu(x @ W + b) * 2.0 + y * y - y

    x, y = rand(4, 12), rand(4, 9)
    report = expect(inside, x)
    assert "autocast" in near_miss(report, "bias_gelu") and "autocast" in near_miss(report, "eltwise_chain")
    compiled = torch.compile(inside, backend=__import__("flashfuse").backend(**EAGER))
    torch.testing.assert_close(compiled(x), inside(x))
    # autocast around the compiled call (guarded by Dynamo): nothing fused either
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = expect(outside, x, y)
        assert "autocast" in near_miss(report, "bias_gelu")
        compiled = torch.compile(outside, backend=__import__("flashfuse").backend(**EAGER))
        torch.testing.assert_close(compiled(x, y), outside(x, y))


# ------------------------------------------------------------------------------------------------
# property test: random arithmetic chains, fused, equal eager (values and gradients)
# ------------------------------------------------------------------------------------------------
def _random_chain(draw_ops, n_leaves: int):
    """A function of n_leaves tensors built from a list of (op, operand choice) draws, and its op count.
    Divisors are leaves (kept in [0.5, 2.5)) so that the comparison is well conditioned."""
    import operator

    def fn(*xs):
        vals = list(xs)
        acc = xs[0]
        for op, i, c in draw_ops:
            leaf = vals[i % n_leaves]
            if op == "add":
                acc = acc + leaf
            elif op == "sub":
                acc = acc - leaf * c
            elif op == "mul":
                acc = acc * leaf
            elif op == "div":
                acc = acc / leaf
            elif op == "rsub":
                acc = c - acc
            elif op == "neg":
                acc = -acc
            elif op == "square":
                acc = acc * 0.5 if c > 1 else operator.pow(acc, 2)
            elif op == "scale":
                acc = acc * c + leaf
        return acc

    return fn


def test_random_chains_match_eager():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    ops_strategy = st.lists(st.tuples(st.sampled_from(["add", "sub", "mul", "div", "rsub", "neg", "square", "scale"]),
                                      st.integers(0, 3), st.sampled_from([0.5, 1.5, 2.0, 3.0])),
                            min_size=3, max_size=7)

    @hypothesis.settings(max_examples=20, deadline=None, derandomize=True)
    @hypothesis.given(ops_strategy)
    def run(draw_ops):
        torch._dynamo.reset()
        fn = _random_chain(draw_ops, 4)
        xs = [torch.rand(3, 5, dtype=torch.float64).float() * 2 + 0.5 for _ in range(4)]
        report = explain(fn, *xs, options=EAGER)
        assert report.count("eltwise_chain") >= 1, str(report)
        assert_close_to_eager(fn, *xs, options=EAGER, rtol=1e-4, atol=1e-5)

    run()


@pytest.mark.parametrize("name", ["gelu", "gelu_new", "gelu_fast", "gelu_python", "gelu_accurate"])
def test_hugging_face_gelu_activations(name):
    activations = pytest.importorskip("transformers.activations")
    act = activations.ACT2FN[name]
    check(act, rand(3, 11), bias_gelu=1)


def test_hugging_face_quick_gelu_is_not_gelu():
    activations = pytest.importorskip("transformers.activations")
    expect(activations.ACT2FN["quick_gelu"], rand(3, 11))  # x * sigmoid(1.702 x): a different function


SQRT_2_PI = math.sqrt(2.0 / math.pi)


@pytest.mark.parametrize("gelu", [
    lambda x: x * torch.special.ndtr(x),                                          # x * Phi(x)
    lambda x: 0.5 * x * torch.erfc(-x / math.sqrt(2.0)),                          # erfc form
    lambda x: x * torch.sigmoid(2 * SQRT_2_PI * (x + 0.044715 * x ** 3)),         # tanh GELU as a sigmoid
    lambda x: x * torch.special.expit(1.5957691216057308 * (x + 0.044715 * x * x * x)),
], ids=["ndtr", "erfc", "sigmoid_tanh", "expit_tanh"])
def test_gelu_through_erfc_ndtr_and_sigmoid(gelu):
    """erfc, ndtr and sigmoid are erf / tanh up to an affine map: the same GELU, fused with its bias."""
    lin = nn.Linear(8, 12)
    f = lambda x: gelu(lin(x))  # noqa: E731
    report = expect(f, rand(3, 8), bias_gelu=1)
    (m,) = report.matches
    assert m.details["bias"] is True, str(report)
    assert_close_to_eager(f, rand(3, 8), options=EAGER)


def test_silu_and_a_sigmoid_gate_are_not_gelu():
    """Reading sigmoid as tanh must not turn SiLU (x*sigmoid(x)) or a gate into GELU, nor report a near-miss."""
    g = rand(3, 11)
    for f in (lambda x: x * torch.sigmoid(x), lambda x: x * torch.sigmoid(g), F.silu):
        report = expect(f, rand(3, 11))
        assert not [n for n in report.near_misses if n.fusion == "bias_gelu"], str(report)


class Lerp0d(nn.Module):
    """A scalar fp32 parameter mixing half tensors (EMA / lerp gates): type promotion keeps the half dtype."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.3, dtype=dtype))

    def forward(self, a, b, c):
        return a * self.w + b * (1 - self.w) - c


def test_chain_takes_a_0d_parameter_of_another_float_dtype():
    a, b, c = (rand(4, 6).half() for _ in range(3))
    report = expect(Lerp0d(), a, b, c, eltwise_chain=1)
    assert report.matches[0].details["inputs"] == 5, str(report)  # a, b, c, w and (1 - w), cast to fp16
    assert_close_to_eager(Lerp0d(), a, b, c, options=EAGER)
    model = Lerp0d()
    torch.compile(model, backend=flashfuse.backend(remainder="eager"))(a, b, c).float().sum().backward()
    assert model.w.grad.dtype == torch.float32 and model.w.grad.shape == ()


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool])
def test_chain_takes_an_integer_or_bool_mask(mask_dtype):
    """`a * m + b * (1 - m) - c` with an integer mask: eager promotes m to float in each op; so does the cast
    the pass puts before the fused op."""
    m = (rand(4, 6) > 0).to(mask_dtype)
    f = (lambda a, b, c, m: a * m + b * (1 - m.long()) - c) if mask_dtype == torch.bool else \
        (lambda a, b, c, m: a * m + b * (1 - m) - c)
    a, b, c = rand(4, 6), rand(4, 6), rand(4, 6)
    expect(f, a, b, c, m, eltwise_chain=1)
    assert_close_to_eager(f, a, b, c, m, options=EAGER)


def test_chain_through_reshapes_between_steps():
    """`(a * b).view(-1) + c.view(-1)`, viewed back: elementwise ops commute with renumbering the elements of
    contiguous tensors, so the reshapes move out and the four ops are one chain."""
    def f(a, b, c, d):
        t = (a * b).view(-1) + c.view(-1)
        return t.view(3, 7) * d - a

    xs = [rand(3, 7) for _ in range(4)]
    report = expect(f, *xs, eltwise_chain=1)
    assert report.matches[0].details["ops"] == 4, str(report)
    assert_close_to_eager(f, *xs, options=EAGER)


def test_chain_keeps_a_reshape_of_a_transposed_tensor():
    """A reshape of a non-contiguous tensor copies and reorders the elements: it stays where it is."""
    def f(a, b, c):
        return (a.t().reshape(-1) * b.reshape(-1)).view(7, 3) + c - b.view(7, 3)

    xs = [rand(3, 7), rand(3, 7), rand(7, 3)]
    expect(f, *xs)
    assert_close_to_eager(f, *xs, options=EAGER)


def test_chain_leaves_a_float64_0d_parameter_alone():
    a, b, c = (rand(4, 6) for _ in range(3))
    report = expect(Lerp0d(torch.float64), a, b, c)
    assert "mixes dtypes" in near_miss(report, "eltwise_chain")


def test_a_bug_in_one_candidate_does_not_cost_the_other_fusions(monkeypatch):
    from flashfuse.passes import prelu as prelu_pass

    def broken(node):
        raise RuntimeError("boom")

    monkeypatch.setattr(prelu_pass, "channel_dim_of", lambda *a: broken(None))
    a = torch.rand(5, 1, 1)

    def f(x):
        return torch.where(x > 0, x, a * x) * 2.0 + x * x - x, x.mean(-1).mean(-1)

    report = expect(f, rand(2, 5, 3, 7), eltwise_chain=1, global_pool=1)
    assert "internal error" in near_miss(report, "prelu")
    assert_close_to_eager(f, rand(2, 5, 3, 7), options=EAGER)


def test_dynamic_shapes():
    import flashfuse
    from flashfuse.report import last_reports

    lin = nn.Linear(8, 6)
    a = torch.rand(6)

    def f(x, y):
        h = F.gelu(lin(x))
        p = torch.where(h > 0, h, a * h)
        pooled = x.sum(-1).sum(-1) / (x.shape[-1] * x.shape[-2])   # a symbolic divisor
        return p * y + y * 2.0 - p, pooled, x @ x.transpose(-2, -1).contiguous()

    compiled = torch.compile(f, backend=flashfuse.backend(**EAGER), dynamic=True)
    for t in (5, 7):
        x, y = rand(2, t, 8), rand(2, t, 6)
        for got, want in zip(compiled(x, y), f(x, y)):
            torch.testing.assert_close(got, want)
    report = last_reports[-1]
    assert counts(report) == {"bias_gelu": 1, "prelu": 1, "matmul_transpose": 1, "global_pool": 1,
                              "eltwise_chain": 1}, str(report)


def test_bias_with_leading_ones_is_folded():
    W, b = torch.randn(12, 9), torch.randn(1, 1, 9, requires_grad=True)

    def f(x):
        return F.gelu(x @ W + b, approximate="tanh")

    report = check(f, rand(2, 4, 12), bias_gelu=1)
    assert report.matches[0].details["bias"] is True
    x = rand(2, 4, 12)
    compiled = torch.compile(f, backend=__import__("flashfuse").backend(**EAGER))
    (got,) = torch.autograd.grad((compiled(x) * x[..., :9]).sum(), [b])
    (want,) = torch.autograd.grad((f(x) * x[..., :9]).sum(), [b])
    assert got.shape == b.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spelling", ["maximum-minimum", "relu-abs-times-half", "relu-abs-over-2", "abs-scaled-wrong"])
def test_prelu_spellings_that_split_the_gradient_at_zero(spelling):
    """`maximum(x, 0) + a * minimum(x, 0)` (a tie passes half to each side: (1 + a)/2 at 0) and
    `relu(x) + a * (x - |x|) / 2` (abs'(0) = 0: a/2 at 0) fuse with those conventions; gradients equal eager's
    at exact zeros. `a * (x - |x|)` without the half is 2a * min(x, 0), another function: a near-miss."""
    from flashfuse.testing import assert_close_to_eager, assert_fused

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(4) * 0.5)

        def forward(self, x):
            w = self.weight.view(1, -1, 1, 1)
            if spelling == "maximum-minimum":
                z = torch.zeros_like(x)
                return torch.maximum(x, z) + w * torch.minimum(x, z)
            if spelling == "relu-abs-times-half":
                return F.relu(x) + w * (x - torch.abs(x)) * 0.5
            if spelling == "relu-abs-over-2":
                return F.relu(x) + (x - x.abs()) / 2 * w
            return F.relu(x) + w * (x - torch.abs(x))

    x = torch.randn(2, 4, 3, 5)
    x.view(-1)[:7] = 0.0  # exact zeros, where the conventions differ
    if spelling == "abs-scaled-wrong":
        report = assert_fused(M(), x, options={"remainder": "eager"}, prelu=0)
        assert any("scaled by 2" in n.reason for n in report.near_misses if n.fusion == "prelu"), str(report)
    else:
        assert_fused(M(), x, options={"remainder": "eager"}, prelu=1)
    assert_close_to_eager(M(), x, options={"remainder": "eager"}, rtol=1e-5, atol=1e-6)
