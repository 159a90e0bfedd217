"""The norm passes end to end: LayerNorm, RMSNorm and residual add + norm, each in several spellings,
compiled with flashfuse (eager and Inductor remainders) and compared with eager PyTorch, outputs and
gradients (input, weight, bias); negatives are left alone with the reason recorded."""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flashfuse
from flashfuse.explain import explain as ff_explain  # (the attribute flashfuse.explain can be shadowed by
from flashfuse.report import Report, _active           # the submodule of the same name once imported)

NORM_PASSES = ["layer_norm", "rms_norm", "residual_norm"]
N = 33  # odd row length: masked lanes in the kernel


@contextlib.contextmanager
def capture_report():
    rep = Report()
    _active.append(rep)
    try:
        yield rep
    finally:
        _active.remove(rep)


def explain(model, *inputs, **options):
    return ff_explain(model, *inputs, options={"passes": NORM_PASSES, "remainder": "eager", **options})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_against_eager(model: nn.Module, inputs, remainder: str, tol: float = 1e-4, **options) -> Report:
    """Compile a copy of `model`, run forward + backward on the same random inputs and output grads as
    eager, and compare every output and every gradient (inputs and parameters)."""
    ref_model = model
    ff_model = copy.deepcopy(model)
    ref_in = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    ff_in = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    compiled = torch.compile(ff_model, backend=flashfuse.backend(remainder=remainder, passes=NORM_PASSES,
                                                                   norm_policy="always", **options))
    with capture_report() as rep:
        out = compiled(*ff_in)
    ref = ref_model(*ref_in)
    out = out if isinstance(out, tuple) else (out,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(r.shape, generator=gen).to(device=r.device, dtype=r.dtype) for r in ref]
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert rel_err(o, r) < tol, (rel_err(o, r), "output")
    torch.autograd.backward(ref, grads)
    torch.autograd.backward(out, grads)
    for a, b in zip(ff_in, ref_in):
        if b.grad is not None:
            assert rel_err(a.grad, b.grad) < tol, (rel_err(a.grad, b.grad), "input grad")
    for (name, p), (_, q) in zip(ff_model.named_parameters(), ref_model.named_parameters()):
        assert q.grad is not None
        assert rel_err(p.grad, q.grad) < tol, (rel_err(p.grad, q.grad), name)
    return rep


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------------------- LayerNorm
class ModuleLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(N)
        with torch.no_grad():  # not the 1/0 init: a wrong weight/bias would go unnoticed
            self.ln.weight.copy_(rand(N, seed=5))
            self.ln.bias.copy_(rand(N, seed=6))

    def forward(self, x):
        return self.ln(x)


class Affine(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(rand(N, seed=3))
        self.bias = nn.Parameter(rand(N, seed=4))


class VarSqrtLN(Affine):
    """x.var(unbiased=False), divide by sqrt, affine."""

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class PowMeanRsqrtLN(Affine):
    """(x - mu).pow(2).mean, multiply by rsqrt, bias first then weight order of operands, positive dim."""

    def forward(self, x):
        mu = x.mean(dim=2, keepdim=True)
        var = (x - mu).pow(2).mean(dim=2, keepdim=True)
        return self.bias + self.weight * ((x - mu) * torch.rsqrt(var + 1e-6))


class CorrectionNoAffineLN(nn.Module):
    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = torch.var(x, dim=-1, correction=0, keepdim=True)
        return (x - mu) * (var + 1e-5).rsqrt()


class VarMeanLN(nn.Module):
    def forward(self, x):
        var, mean = torch.var_mean(x, -1, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + 1e-5)


class WeightFirstLN(Affine):
    """`w * (x - mu) / sqrt(var + eps) + b`: Python applies the weight before the division."""

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return self.weight * (x - mu) / torch.sqrt(var + 1e-6) + self.bias


class UnbiasedLN(Affine):
    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True)  # unbiased: not layer norm
        return (x - mu) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class EpsOutsideLN(Affine):
    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        std = x.var(-1, unbiased=False, keepdim=True).sqrt()
        return (x - mu) / (std + 1e-5) * self.weight + self.bias


class AnnotatedTransformerLN(Affine):
    """The Annotated Transformer's LayerNorm: unbiased std, eps outside the root."""

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        return self.weight * (x - mean) / (std + 1e-6) + self.bias


class OtherAxisLN(nn.Module):
    def forward(self, x):
        mu = x.mean(1, keepdim=True)
        var = x.var(1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5)


class MixedAxesLN(nn.Module):
    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = x.var(1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5)


class RowScaleLN(nn.Module):
    """Normalized, then scaled per row: not a per-feature weight, so the multiply stays outside."""

    def forward(self, x, s):
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * s


LN_SPELLINGS = [ModuleLN, VarSqrtLN, PowMeanRsqrtLN, CorrectionNoAffineLN, VarMeanLN, WeightFirstLN]


@pytest.mark.parametrize("cls", LN_SPELLINGS, ids=lambda c: c.__name__)
def test_layer_norm_spellings_eager_remainder(cls):
    x = rand(2, 3, N)
    rep = explain(cls(), x)
    assert rep.count("layer_norm") == 1, str(rep)
    code = rep.graphs[0].code_after
    assert "flashfuse.layer_norm" in code
    # nothing of the hand-written arithmetic is left (the affine included)
    assert not any(op in code for op in ("aten.mean", "aten.var", "aten.sqrt", "aten.rsqrt", "aten.mul",
                                         "aten.add", "aten.div")), code
    rep = check_against_eager(cls(), [x], "eager")
    assert rep.count("layer_norm") == 1


@pytest.mark.parametrize("cls", [ModuleLN, VarSqrtLN], ids=lambda c: c.__name__)
def test_layer_norm_inductor_remainder_always(cls):
    rep = check_against_eager(cls(), [rand(2, 3, N)], "inductor")
    assert rep.count("layer_norm") == 1, str(rep)
    assert "norm_policy='always'" in rep.matches[0].details["policy"]
    assert "norm_policy='always'" in str(rep)  # the report says why flashfuse's kernel, not Inductor's


def test_functional_layer_norm_with_weight_after_and_cast():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(rand(N, seed=9))

        def forward(self, x):
            return F.layer_norm(x.float(), (N,), eps=1e-6).to(x.dtype) * self.w

    x = rand(4, N)
    rep = explain(M(), x)
    assert rep.count("layer_norm") == 1
    assert rep.matches[0].details["weight"]  # the multiply after the op went into the kernel
    check_against_eager(M(), [x], "eager")


@pytest.mark.parametrize("cls, reason", [
    (UnbiasedLN, "unbiased variance"),
    (EpsOutsideLN, "outside the square root"),
    (AnnotatedTransformerLN, "outside the square root"),
    (OtherAxisLN, "statistics over dim 1"),
    (MixedAxesLN, "different axes"),
], ids=["unbiased", "eps_outside", "annotated_transformer", "other_axis", "mixed_axes"])
def test_layer_norm_negatives(cls, reason):
    x = rand(2, 5, N)
    model = cls()
    rep = explain(model, x)
    assert rep.count("layer_norm") == 0 and rep.count() == 0, str(rep)
    assert any(reason in nm.reason for nm in rep.near_misses), str(rep)
    # still the user's numbers
    compiled = torch.compile(model, backend=flashfuse.backend(remainder="eager", passes=NORM_PASSES))
    torch.testing.assert_close(compiled(x), model(x))


def test_layer_norm_row_scale_stays_outside():
    x, s = rand(2, 5, N), rand(2, 5, 1, seed=2)
    rep = explain(RowScaleLN(), x, s)
    assert rep.count("layer_norm") == 1
    assert not rep.matches[0].details["weight"]
    assert any("not one weight per normalized element" in nm.reason for nm in rep.near_misses), str(rep)
    assert "aten.mul.Tensor" in rep.graphs[0].code_after
    check_against_eager(RowScaleLN(), [x, s], "eager")


# ---------------------------------------------------------------------------------------------- RMSNorm
class LlamaRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm, verbatim."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        with torch.no_grad():
            self.weight.copy_(rand(hidden_size, seed=7))

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class DivSqrtRMS(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(rand(N, seed=8))

    def forward(self, x):
        return x / torch.sqrt(torch.mean(x * x, dim=-1, keepdim=True) + 1e-5) * self.g


class ModuleRMS(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.RMSNorm(N, eps=1e-5)
        with torch.no_grad():
            self.norm.weight.copy_(rand(N, seed=10))

    def forward(self, x):
        return self.norm(x)


class T5LayerNorm(nn.Module):
    """transformers' T5LayerNorm: the mean of squares of x.float(), the multiply by x itself."""

    def __init__(self, hidden_size=N, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(rand(hidden_size, seed=11))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class GemmaRMSNorm(nn.Module):
    """Gemma: weight as (1 + w), the result cast back with type_as."""

    def __init__(self, dim=N, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(0.1 * rand(dim, seed=12))

    def forward(self, x):
        output = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class EpsOutsideRMS(nn.Module):
    def forward(self, x):
        return x / (torch.sqrt(x.pow(2).mean(-1, keepdim=True)) + 1e-6)


class OtherAxisRMS(nn.Module):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)


class SquaredVectorNormRMS(nn.Module):
    """The mean of squares as the squared L2 norm over d (normalize.squared_norm_to_sum_of_squares)."""

    def forward(self, x):
        return x * torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True) ** 2 / x.shape[-1] + 1e-6)


class NormOverSqrtNRMS(nn.Module):
    """x / (||x|| * n**-0.5) * g: the 2-norm over sqrt(n) is the root mean square (eps = 0)."""

    def __init__(self, dim=N):
        super().__init__()
        self.g = nn.Parameter(rand(dim, seed=13))

    def forward(self, x):
        return x / (x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** -0.5) * self.g


class NormDividedRMS(nn.Module):
    def forward(self, x):
        return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) / math.sqrt(x.shape[-1]))


class NormPlusEpsOutside(nn.Module):
    def forward(self, x):
        return x / (x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** -0.5 + 1e-6)


RMS_SPELLINGS = [lambda: LlamaRMSNorm(N), DivSqrtRMS, ModuleRMS, T5LayerNorm, GemmaRMSNorm, SquaredVectorNormRMS,
                 NormOverSqrtNRMS, NormDividedRMS]
RMS_IDS = ["llama", "div_sqrt", "nn_RMSNorm", "t5", "gemma", "vector_norm_squared", "norm_times_rsqrt_n",
           "norm_over_sqrt_n"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scaled_norm_not_fused_keeps_the_users_graph(dtype):
    """eps outside the root is another function: the tentative sqrt(mean(x * x)) is taken back, so the graph
    is the user's (in fp16 with |x| ~ 300, x * x would overflow where the norm does not). A LayerNorm beside
    it makes the rewritten ATen graph the one that runs."""
    class WithLayerNorm(nn.Module):
        def forward(self, x):
            return NormPlusEpsOutside()(x), F.layer_norm(x, (N,))

    x = (rand(2, 5, N) * 300).to(dtype)
    rep = explain(WithLayerNorm(), x)
    assert rep.count() == 1 and rep.count("layer_norm") == 1, str(rep)
    assert any("outside the square root" in nm.reason for nm in rep.near_misses), str(rep)
    code = rep.graphs[0].code_after
    assert "linalg_vector_norm" in code and "aten.mean" not in code, code
    compiled = torch.compile(WithLayerNorm(), backend=flashfuse.backend(remainder="eager", passes=NORM_PASSES))
    out, ref = compiled(x)[0], WithLayerNorm()(x)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_norm_scaled_by_another_number_is_not_rms():
    class Scaled(nn.Module):
        def forward(self, x):
            return x / (x.norm(2, dim=-1, keepdim=True) * 0.1)

    rep = explain(Scaled(), rand(2, 5, N))
    assert rep.count("rms_norm") == 0, str(rep)


def test_squared_vector_norm_with_another_use_stays_a_norm():
    """The norm is also returned: rewriting it to a sum of squares would drop that use, so the graph keeps
    it (no RMSNorm is fused, the numbers are eager's)."""
    class NormAlsoUsed(nn.Module):
        def forward(self, x):
            n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            return x * torch.rsqrt(n ** 2 / x.shape[-1] + 1e-6), n

    rep = check_against_eager(NormAlsoUsed(), [rand(3, 4, N)], "eager")
    assert rep.count("rms_norm") == 0, str(rep)


@pytest.mark.parametrize("make", RMS_SPELLINGS, ids=RMS_IDS)
def test_rms_norm_spellings_eager_remainder(make):
    x = rand(3, 4, N)
    rep = explain(make(), x)
    assert rep.count("rms_norm") == 1, str(rep)
    rep = check_against_eager(make(), [x], "eager")
    assert rep.count("rms_norm") == 1


@pytest.mark.parametrize("make", RMS_SPELLINGS[:2], ids=RMS_IDS[:2])
def test_rms_norm_inductor_remainder_always(make):
    rep = check_against_eager(make(), [rand(3, 4, N)], "inductor")
    assert rep.count("rms_norm") == 1, str(rep)


def test_llama_rms_norm_fp16_keeps_the_rounding_before_the_weight():
    x = rand(4, 100, dtype=torch.float16)
    model = LlamaRMSNorm(100).half()
    rep = explain(model, x)
    assert rep.count("rms_norm") == 1
    assert "rounded to float16 before the weight" in rep.matches[0].description
    assert "aten.to" not in rep.graphs[0].code_after  # the upcast and the cast back are in the kernel
    compiled = torch.compile(model, backend=flashfuse.backend(remainder="eager", passes=NORM_PASSES))
    out, ref = compiled(x), model(x)
    assert out.dtype == torch.float16
    # eager rounds the product w * round(xhat) once more; the kernel does the same in fp32 then rounds
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("make", [T5LayerNorm, GemmaRMSNorm], ids=["t5", "gemma"])
def test_rms_norm_fp16_models_fuse_the_casts(make):
    model = make().half()
    x = rand(3, N, dtype=torch.float16)
    rep = explain(model, x)
    assert rep.count("rms_norm") == 1, str(rep)
    code = rep.graphs[0].code_after
    assert "aten.mul" not in code and "type_as" not in code and "aten.to" not in code.split("rms_norm")[1], code
    compiled = torch.compile(model, backend=flashfuse.backend(remainder="eager", passes=NORM_PASSES))
    torch.testing.assert_close(compiled(x), model(x), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("cls, reason", [
    (EpsOutsideRMS, "outside the square root"),
    (OtherAxisRMS, "statistics over dim 1"),
], ids=["eps_outside", "other_axis"])
def test_rms_norm_negatives(cls, reason):
    x = rand(2, 5, N)
    rep = explain(cls(), x)
    assert rep.count() == 0, str(rep)
    assert any(reason in nm.reason for nm in rep.near_misses), str(rep)


# ---------------------------------------------------------------------------------------------- residual
class ResidualLN(nn.Module):
    """Pre-norm block: h = x + y feeds the norm and the residual stream."""

    def __init__(self):
        super().__init__()
        self.ln = ModuleLN()

    def forward(self, x, y):
        h = x + y
        return self.ln(h) * 2.0, h * 3.0


class ResidualLlama(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = LlamaRMSNorm(N)

    def forward(self, x, y):
        h = y + x
        return h + self.norm(h).sin()


class ResidualHandLN(Affine):
    def forward(self, x, y):
        h = x + y
        mu = h.mean(-1, keepdim=True)
        var = ((h - mu) ** 2).mean(-1, keepdim=True)
        return ((h - mu) * torch.rsqrt(var + 1e-5)) * self.weight + self.bias


class BroadcastResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = ModuleLN()

    def forward(self, x, y):
        h = x + y  # y: (N,) broadcast over rows
        return self.ln(h), h


RESIDUALS = [ResidualLN, ResidualLlama, ResidualHandLN]


@pytest.mark.parametrize("cls", RESIDUALS, ids=lambda c: c.__name__)
def test_residual_norm_eager_remainder(cls):
    x, y = rand(2, 3, N, seed=1), rand(2, 3, N, seed=2)
    rep = explain(cls(), x, y)
    assert rep.count("residual_norm") == 1, str(rep)
    assert "add_" in rep.graphs[0].code_after and "aten.add.Tensor(arg" not in rep.graphs[0].code_after.split(
        "add_")[0]
    rep = check_against_eager(cls(), [x, y], "eager")
    assert rep.count("residual_norm") == 1


@pytest.mark.parametrize("cls", [ResidualLN, ResidualLlama], ids=lambda c: c.__name__)
def test_residual_norm_inductor_remainder_always(cls):
    rep = check_against_eager(cls(), [rand(2, 3, N, seed=1), rand(2, 3, N, seed=2)], "inductor")
    assert rep.count("residual_norm") == 1, str(rep)


def test_residual_norm_broadcast_add_is_a_near_miss():
    x, y = rand(2, 3, N, seed=1), rand(N, seed=2)
    rep = explain(BroadcastResidual(), x, y)
    assert rep.count("layer_norm") == 1 and rep.count("residual_norm") == 0, str(rep)
    assert any("broadcasts" in nm.reason for nm in rep.near_misses), str(rep)
    check_against_eager(BroadcastResidual(), [x, y], "eager")


# ---------------------------------------------------------------------------------------------- policy
def test_policy_auto_on_cpu_under_inductor_keeps_inductor():
    rep = ff_explain(ModuleLN(), rand(2, N), options={"passes": NORM_PASSES})
    assert rep.count() == 0
    assert any("norm_policy='auto' on a CPU graph" in nm.reason for nm in rep.near_misses), str(rep)


def test_policy_never():
    rep = ff_explain(ResidualLN(), rand(2, N), rand(2, N),
                            options={"passes": NORM_PASSES, "norm_policy": "never"})
    assert rep.count() == 0
    assert any("norm_policy='never'" in nm.reason for nm in rep.near_misses), str(rep)


def test_policy_auto_on_gpu_follows_the_measured_table(monkeypatch):
    from flashfuse.config import Config
    from flashfuse.passes import norm_match

    monkeypatch.setattr(norm_match, "MEASURED_RATIO", {("layer_norm", 1024): (0.8, 1.3),
                                                       ("layer_norm", 8192): (1.2, 0.9),
                                                       ("rms_norm", 4096): (0.97, 0.97)})

    class Ctx:
        config = Config(norm_policy="auto")
        is_cuda = True

    assert norm_match.choose(Ctx, "layer_norm", 1000, training=False)[0]
    assert not norm_match.choose(Ctx, "layer_norm", 1000, training=True)[0]
    assert not norm_match.choose(Ctx, "layer_norm", 6000, training=False)[0]
    ok, why = norm_match.choose(Ctx, "layer_norm", 6000, training=True)
    assert ok and "row length 8192" in why
    assert not norm_match.choose(Ctx, "rms_norm", 4096, training=False)[0]  # within the margin
    assert not norm_match.choose(Ctx, "add_rms_norm", 1024, training=False)[0]  # nothing measured
    # the shipped table: LayerNorm at ~4096 measured >5% faster forward and forward+backward (session 16); at
    # ~1024 faster in training (0.83 since the column sums, session 19), not in inference (equal forwards); the
    # residual add + RMSNorm at 1024 within the margin in training (0.956)
    monkeypatch.undo()
    assert norm_match.choose(Ctx, "layer_norm", 4096, training=False)[0]
    assert norm_match.choose(Ctx, "layer_norm", 4096, training=True)[0]
    assert norm_match.choose(Ctx, "layer_norm", 1024, training=True)[0]
    assert not norm_match.choose(Ctx, "layer_norm", 1024, training=False)[0]
    assert not norm_match.choose(Ctx, "add_rms_norm", 1024, training=True)[0]


def test_policy_auto_leaves_a_norm_whose_input_inductor_fuses(monkeypatch):
    """MEASURED_RATIO times norms that read their input from memory. Where the input (or a term of the residual
    add) comes from a dropout or pointwise op used only there, Inductor fuses that op into its own norm kernel
    (GPT-2's dropout + add + LayerNorm), so "auto" does not claim the measured gain: Inductor keeps the norm."""
    import torch.fx as fx

    from flashfuse.config import Config
    from flashfuse.passes import norm_match

    aten = torch.ops.aten
    g = fx.Graph()
    x, r, w = g.placeholder("x"), g.placeholder("r"), g.placeholder("w")
    lin = g.call_function(aten.linear.default, (x, w))
    drop = g.call_function(aten.dropout.default, (lin, 0.1, True))
    h_drop = g.call_function(aten.add.Tensor, (r, drop))  # GPT-2: x + dropout(c_proj(y))
    h_lin = g.call_function(aten.add.Tensor, (r, lin))  # LLaMA: x + o_proj(y)
    act = g.call_function(aten.gelu.default, (lin,))
    g.output((h_drop, h_drop, h_lin, h_lin, act))  # the sums have other users, as a residual stream does

    assert "dropout" in norm_match.producer_inductor_fuses(h_drop)
    assert norm_match.producer_inductor_fuses(h_lin) is None  # a matmul's output: read from memory either way
    assert norm_match.producer_inductor_fuses(x) is None
    assert "gelu" in norm_match.producer_inductor_fuses(act)
    assert "dropout" in norm_match.producer_inductor_fuses(drop)

    class Ctx:
        config = Config(norm_policy="auto")
        is_cuda = True

    monkeypatch.setattr(norm_match, "MEASURED_RATIO", {("layer_norm", 1024): (1.0, 0.8)})
    ok, why = norm_match.choose(Ctx, "layer_norm", 1024, True, norm_match.producer_inductor_fuses(h_drop))
    assert not ok and "Inductor fuses" in why and "dropout" in why
    assert norm_match.choose(Ctx, "layer_norm", 1024, True, norm_match.producer_inductor_fuses(h_lin))[0]
    # the producer does not matter where flashfuse's kernel is not measured faster, nor under the eager remainder
    assert "not faster" in norm_match.choose(Ctx, "layer_norm", 1024, False, "x")[1]
    Ctx.config = Config(norm_policy="auto", remainder="eager")
    assert norm_match.choose(Ctx, "layer_norm", 1024, True, "x")[0]


# ---------------------------------------------------------------------------------------------- GPU
class GpuBlock(nn.Module):
    """A pre-norm block in bf16: residual add + hand-written LayerNorm, then a LLaMA RMSNorm."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(n))
        self.bias = nn.Parameter(0.1 * torch.randn(n))
        self.rms = LlamaRMSNorm(n)

    def forward(self, x, y):
        h = x + y
        mu = h.mean(-1, keepdim=True)
        var = h.var(-1, unbiased=False, keepdim=True)
        a = (h - mu) / torch.sqrt(var + 1e-5) * self.weight + self.bias
        return self.rms(a) + h


@pytest.mark.gpu
@pytest.mark.parametrize("remainder", ["eager", "inductor"])
def test_gpu_block_bf16(remainder):
    n = 1000
    model = GpuBlock(n).cuda().to(torch.bfloat16)
    x = torch.randn(4, 37, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(4, 37, n, device="cuda", dtype=torch.bfloat16)
    rep = check_against_eager(model, [x, y], remainder, tol=1.5e-2)
    assert rep.count("layer_norm") == 1 and rep.count("rms_norm") == 1 and rep.count("residual_norm") == 1, str(rep)


def test_dynamic_shapes():
    """Symbolic row counts: still one kernel, right numbers for two batch sizes. A float attribute that
    dynamic=True turns into a graph input (LLaMA's eps) is read at run time under the eager remainder and a
    near-miss under Inductor (where the op's eps must be a constant)."""
    model = VarSqrtLN()
    compiled = torch.compile(model, backend=flashfuse.backend(remainder="eager", passes=NORM_PASSES), dynamic=True)
    with capture_report() as rep:
        for b in (2, 5):
            x = rand(b, 3, N, seed=b)
            assert rel_err(compiled(x), model(x)) < 1e-5
    assert rep.count("layer_norm") >= 1, str(rep)
    torch._dynamo.reset()
    block = ResidualLlama()
    compiled = torch.compile(block, backend=flashfuse.backend(remainder="eager", passes=NORM_PASSES), dynamic=True)
    with capture_report() as rep:
        for b in (2, 5):
            x, y = rand(b, 3, N, seed=b), rand(b, 3, N, seed=b + 1)
            assert rel_err(compiled(x, y), block(x, y)) < 1e-5
    assert rep.count("rms_norm") >= 1 and rep.count("residual_norm") >= 1, str(rep)
    assert "eps read at run time" in str(rep)
    # under Inductor: run the pass itself on the dynamic graph (no C++ compile needed to see the decision)
    from flashfuse.config import Config
    from flashfuse.passes import PassContext, get_pass
    from flashfuse.passes.normalize import to_aten

    graph_report = Report().new_graph()

    def run_pass(gm, example_inputs):
        aten_gm = to_aten(gm, example_inputs)
        ctx = PassContext(Config(norm_policy="always"), graph_report, example_inputs, False)
        assert get_pass("rms_norm")(aten_gm, ctx) == 0
        return gm.forward

    torch._dynamo.reset()
    torch.compile(LlamaRMSNorm(N), backend=run_pass, dynamic=True)(rand(2, 3, N))
    assert any("run-time scalar" in nm.reason for nm in graph_report.near_misses), graph_report.near_misses


def test_transformers_llama_rms_norm_as_shipped():
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    model = modeling_llama.LlamaRMSNorm(100, eps=1e-6).half()
    with torch.no_grad():
        model.weight.copy_(rand(100, seed=3))
    x = rand(2, 7, 100, dtype=torch.float16)
    rep = explain(model, x)
    assert rep.count("rms_norm") == 1, str(rep)
    assert "rounded to float16 before the weight" in rep.matches[0].description
    compiled = torch.compile(model, backend=flashfuse.backend(remainder="eager", passes=NORM_PASSES))
    torch.testing.assert_close(compiled(x), model(x), atol=2e-3, rtol=2e-3)


def test_inference_under_no_grad_both_remainders():
    for remainder in ("eager", "inductor"):
        torch._dynamo.reset()
        model = ResidualLlama()
        compiled = torch.compile(model, backend=flashfuse.backend(remainder=remainder, passes=NORM_PASSES,
                                                                    norm_policy="always"))
        x, y = rand(3, N, seed=1), rand(3, N, seed=2)
        with torch.no_grad(), capture_report() as rep:
            out = compiled(x, y)
        assert rep.count("residual_norm") == 1, str(rep)
        assert not out.requires_grad
        assert rel_err(out, model(x, y)) < 1e-5


def test_residual_norm_mixed_dtypes_is_a_near_miss():
    x, y = rand(2, 3, N, dtype=torch.float16, seed=1), rand(2, 3, N, seed=2)  # fp16 + fp32 -> fp32 h
    model = ResidualLN()
    rep = explain(model, x, y)
    assert rep.count("layer_norm") == 1 and rep.count("residual_norm") == 0, str(rep)
    assert any("mixes dtypes" in nm.reason for nm in rep.near_misses), str(rep)
    compiled = torch.compile(model, backend=flashfuse.backend(remainder="eager", passes=NORM_PASSES))
    for o, r in zip(compiled(x, y), model(x, y)):
        assert rel_err(o, r) < 1e-5


class _EpsBufferNorm(torch.nn.Module):
    """eps registered as a 0-d buffer: a tensor the kernels cannot take as their constant."""

    def __init__(self, rms: bool):
        super().__init__()
        self.rms = rms
        self.register_buffer("eps", torch.tensor(1e-5))

    def forward(self, x):
        if self.rms:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        mu = x.mean(-1, keepdim=True)
        return (x - mu) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + self.eps)


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_an_eps_buffer_is_a_named_near_miss(rms):
    from flashfuse.testing import assert_close_to_eager, assert_fused

    model, x = _EpsBufferNorm(rms), torch.randn(2, 3, 24)
    fusion = "rms_norm" if rms else "layer_norm"
    report = assert_fused(model, x, options={"remainder": "eager"}, **{fusion: 0})
    reasons = [n.reason for n in report.near_misses if n.fusion == fusion]
    assert any("eps is a 0-d tensor" in r for r in reasons), str(report)
    assert_close_to_eager(model, x, options={"remainder": "eager"})


class _ResidualGemmaNorm(torch.nn.Module):
    """Gemma: the weight's `1 + w.float()` is computed right after the residual add (h.next)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(0.1 * torch.randn(24))

    def forward(self, x, y):
        h = x + y
        w = 1.0 + self.weight.float()
        out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        return out, h


def test_residual_norm_with_the_weight_computed_right_after_the_add():
    """The fused op's inputs are hoisted above the add (hoisting them before h.next, when h.next is one of
    them, broke the graph's order and every pass was skipped for it)."""
    from flashfuse.testing import assert_close_to_eager, assert_fused

    model, x, y = _ResidualGemmaNorm(), torch.randn(2, 3, 24), torch.randn(2, 3, 24)
    report = assert_fused(model, x, y, options={"remainder": "eager"}, residual_norm=1)
    assert not any("passes skipped" in n for g in report.graphs for n in g.notes), str(report)
    assert_close_to_eager(model, x, y, options={"remainder": "eager"})


class _StdSquaredNorm(torch.nn.Module):
    """LayerNorm divided by sqrt(std**2 + eps): the variance, if the std is the biased one."""

    def __init__(self, unbiased):
        super().__init__()
        self.unbiased = unbiased

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(x.std(-1, unbiased=self.unbiased, keepdim=True) ** 2 + 1e-5)


@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_std_squared_is_the_variance_only_when_biased(unbiased):
    from flashfuse.testing import assert_close_to_eager, assert_fused

    model, x = _StdSquaredNorm(unbiased), torch.randn(2, 3, 24)
    report = assert_fused(model, x, options={"remainder": "eager"}, layer_norm=0 if unbiased else 1)
    if unbiased:
        reasons = [n.reason for n in report.near_misses if n.fusion == "layer_norm"]
        assert any("unbiased variance" in r for r in reasons), str(report)
    assert_close_to_eager(model, x, options={"remainder": "eager"}, grads=True)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_over_two_trailing_dims_is_flattened(affine):
    """nn.LayerNorm([3, 8]): the same statistics as one LayerNorm over 24 elements, viewed back."""
    from flashfuse.testing import assert_close_to_eager, assert_fused

    torch.manual_seed(0)
    m = torch.nn.LayerNorm([3, 8], elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            m.weight.normal_()
            m.bias.normal_()
    x = torch.randn(2, 5, 3, 8)
    opts = {"remainder": "eager", "norm_policy": "always"}
    report = assert_fused(m, x, options=opts, layer_norm=1)
    assert "(24)" in report.matches[0].description
    assert_close_to_eager(m, x, options=opts)


class _OnePassVarianceNorm(nn.Module):
    """LayerNorm with one-pass statistics, var = E[x^2] - E[x]^2, in several spellings; `not_var` divides by
    sqrt(E[x^2]) (no mean subtracted: not a variance) and `other_mean` subtracts the square of another mean."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.w, self.b = nn.Parameter(torch.rand(24) + 0.5), nn.Parameter(torch.randn(24))

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        s = self.spelling
        if s == "rsqrt-mul":
            var = (x * x).mean(-1, keepdim=True) - mu * mu
            return (x - mu) * torch.rsqrt(var + 1e-5) * self.w + self.b
        if s == "pow-sqrt-div":
            var = x.pow(2).mean(dim=-1, keepdim=True) - mu.pow(2)
            return self.w * (x - mu) / torch.sqrt(var + 1e-5) + self.b
        if s == "not_var":
            return (x - mu) * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * self.w + self.b
        other = x.mean((-2, -1), keepdim=True)  # another mean (its square stays below E[x^2] here)
        return (x - mu) * torch.rsqrt((x * x).mean(-1, keepdim=True) - other * other + 1e-5) * self.w + self.b


@pytest.mark.parametrize("spelling", ["rsqrt-mul", "pow-sqrt-div", "not_var", "other_mean"])
def test_one_pass_variance_is_the_variance(spelling):
    """E[x^2] - E[x]^2 with the same mean is the biased variance (the kernel computes it about the mean, which
    does not cancel); without the mean's square, or with another mean's, it is another function."""
    from flashfuse.testing import assert_close_to_eager, assert_fused

    model, x = _OnePassVarianceNorm(spelling), torch.randn(2, 3, 24) + 0.5
    fused = spelling in ("rsqrt-mul", "pow-sqrt-div")
    report = assert_fused(model, x, options={"remainder": "eager"}, layer_norm=1 if fused else 0)
    if not fused:
        reasons = [n.reason for n in report.near_misses if n.fusion == "layer_norm"]
        assert any("not built from the variance" in r for r in reasons), str(report)
    assert_close_to_eager(model, x, options={"remainder": "eager"}, grads=True)


# ---------------------------------------------------------------------------------------------- trailing dims
class ChannelsLayerNorm(nn.Module):
    """LayerNorm over (C, H, W) of NCHW written by hand (GroupNorm(1)-like) with a per-channel affine: the
    statistics are over the trailing dims, the weight broadcasts inside the normalized block."""

    def __init__(self, c=3):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(c, 1, 1)), nn.Parameter(torch.randn(c, 1, 1))

    def forward(self, x):
        mu = x.mean((1, 2, 3), keepdim=True)
        var = (x - mu).pow(2).mean((1, 2, 3), keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * self.w + self.b


class TwoDimRMS(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.randn(*shape))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean((-2, -1), keepdim=True) + 1e-6) * self.w


@pytest.mark.parametrize("model, kind", [
    (ChannelsLayerNorm(), "layer_norm"),
    (TwoDimRMS((5, N)), "rms_norm"),        # one weight per element of the block
    (TwoDimRMS((N,)), "rms_norm"),          # a weight over the last dim only, broadcast over dim -2
    (nn.RMSNorm([5, N], eps=1e-6), "rms_norm"),
], ids=["layer_norm_chw", "rms_two_dims", "rms_two_dims_row_weight", "nn_rmsnorm_two_dims"])
def test_norm_over_trailing_dims_is_flattened(model, kind):
    x = rand(2, 3, 5, N) if kind == "layer_norm" else rand(2, 5, N)
    rep = explain(model, x)
    assert rep.count(kind) == 1 and rep.count() == 1, str(rep)
    m = rep.matches[0]
    assert "flattened" in m.description and m.details["weight"], str(rep)
    check_against_eager(model, [x], "eager")


def test_statistics_over_inner_dims_are_not_trailing():
    """Over (1, 2) of a 4-d tensor: not the trailing dims; left alone with the axis named."""
    def f(x):
        return x * torch.rsqrt(x.pow(2).mean((1, 2), keepdim=True) + 1e-6)

    x = rand(2, 3, 5, N)
    rep = explain(f, x)
    assert rep.count() == 0 and any("statistics over dim 1,2" in nm.reason for nm in rep.near_misses), str(rep)


@pytest.mark.gpu
@pytest.mark.parametrize("model, kind", [(TwoDimRMS((16, 64)), "rms_norm"), (ChannelsLayerNorm(8), "layer_norm")],
                         ids=["rms_two_dims", "layer_norm_chw"])
def test_gpu_norm_over_trailing_dims_bf16(model, kind):
    """Session 9: norms over several trailing dims run the kernel on one flattened row (8 * 16 * 64 = 8192
    elements: rows over 16384 stay a near-miss, the kernel keeps a row in registers)."""
    model = model.cuda().to(torch.bfloat16)
    x = torch.randn(4, 8, 16, 64, device="cuda", dtype=torch.bfloat16)
    if kind == "rms_norm":
        x = x[0]
    rep = check_against_eager(model, [x], "inductor", tol=1.5e-2)
    assert rep.count(kind) == 1, str(rep)


def test_norms_under_cpu_autocast_are_left_alone_with_eagers_dtype():
    """The CPU runs layer_norm / rms_norm under autocast in the input's dtype (here the autocast Linear's bf16),
    which the fake values (float32) do not show: flashfuse must not bake float32 in. Left as is, with the
    reason; an autocast region with enabled=False is off (OLMo writes its statistics so) and still fuses."""
    class Block(nn.Module):
        def __init__(self, norm):
            super().__init__()
            self.fc, self.norm = nn.Linear(16, 16), norm

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.norm(self.fc(x))

    x = torch.randn(3, 16)
    for norm, name in ((nn.LayerNorm(16), "layer_norm"), (nn.RMSNorm(16, eps=1e-6), "rms_norm")):
        model = Block(norm)
        out = torch.compile(copy.deepcopy(model), backend=flashfuse.backend(remainder="eager"))(x)
        assert out.dtype == model(x).dtype == torch.bfloat16
        report = ff_explain(model, x, options={"remainder": "eager"})
        assert report.count(name) == 0
        assert any("autocast" in m.reason for m in report.near_misses if m.fusion == name)

    def off(x):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            return F.layer_norm(x, (16,))
    assert ff_explain(off, x, options={"remainder": "eager"}).count("layer_norm") == 1


def test_residual_add_before_a_norm_over_two_dims():
    """nn.LayerNorm([S, D])(x + y) runs on h flattened to S * D: the add joins it, x and y flattened the same
    way, and h's later users (the residual stream, returned here) read it in its own shape."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm([5, 12])

        def forward(self, x, y):
            h = x + y
            return self.norm(h) * 2, h.transpose(1, 2)

    torch.manual_seed(3)
    model = Block()
    with torch.no_grad():
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    x, y = torch.randn(3, 5, 12, requires_grad=True), torch.randn(3, 5, 12, requires_grad=True)
    report = ff_explain(model, x, y, options={"remainder": "eager"})
    assert report.count("residual_norm") == 1 and report.count("layer_norm") == 1
    compiled = torch.compile(copy.deepcopy(model), backend=flashfuse.backend(remainder="eager"))
    outs, refs = compiled(x, y), model(x, y)
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and torch.allclose(o, r, atol=1e-5)
    g = [torch.randn_like(r) for r in refs]
    got = torch.autograd.grad(outs, [x, y], g)
    want = torch.autograd.grad(refs, [x, y], g)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)
