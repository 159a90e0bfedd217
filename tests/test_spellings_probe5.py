"""Hidden set #5: spellings of the norm / pointwise fusions as they appear in real code bases, written
without looking at the passes: transformers' own norm classes instantiated directly (T5, LLaMA, Gemma,
Cohere, OLMo, OLMo2, Qwen2, Mistral, ConvNext channels_first), timm's LayerNorm2d / channels-first
fallbacks, HF decoder / BERT blocks (residual + norm), Megatron's jit-scripted bias_gelu, GPT-2's
Conv1D + gelu_new MLP, GELU of scaled / gated Linear outputs, PReLU per channel, global average
pooling spellings, numeric stress (offset 1e3 rows, row length 37).

Each case compiles a copy of the model with flashfuse.backend(remainder="eager", norm_policy="always"),
asserts the exact fusion counts named by the case, and compares outputs and every input / parameter
gradient with eager (relative L2 < 1e-4, an absolute floor where a gradient is ~0). Negatives assert
the fusion did NOT happen (and the near-miss reason when one is given) and eager's numbers.
Cases flashfuse gets wrong today are marked xfail(strict=True) with what was measured.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flashfuse
from flashfuse.report import Report, _active

tf_act = pytest.importorskip("transformers.activations")
from transformers import BertConfig, GPT2Config, LlamaConfig  # noqa: E402
from transformers.models.bert.modeling_bert import BertIntermediate, BertSelfOutput  # noqa: E402
from transformers.models.cohere.modeling_cohere import CohereLayerNorm  # noqa: E402
from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm  # noqa: E402
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding  # noqa: E402
from transformers.models.mistral.modeling_mistral import MistralRMSNorm  # noqa: E402
from transformers.models.olmo.modeling_olmo import OlmoLayerNorm  # noqa: E402
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm  # noqa: E402
from transformers.models.t5.modeling_t5 import T5LayerNorm  # noqa: E402

FUSIONS = ("layer_norm", "rms_norm", "residual_norm", "bias_gelu", "prelu", "global_pool", "eltwise_chain")
D = 24      # hidden size
C = 6       # channels
EPS = 1e-6
TOL = 1e-4


# ================================================================================================ harness
def rand(*shape, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).float()


def perturb(model, seed=1234, amount=0.1):
    """Every parameter moved off its init (ones / zeros / 0.25): a dropped weight or bias shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount * torch.randn(p.shape, generator=g, dtype=torch.float64).float())
    return model


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def rel(a, b, floor=1e-6):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / max(b.norm().item(), floor)).item()


def run_case(make, inputs, seed=0):
    """(report, list of (what, relative error)) for a compiled copy against eager."""
    torch.manual_seed(seed)
    model = make()
    if isinstance(model, nn.Module):
        perturb(model, seed + 1).eval()
    ref_model, ff_model = model, copy.deepcopy(model)
    ref_in = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    ff_in = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    compiled = torch.compile(ff_model, backend=flashfuse.backend(remainder="eager", norm_policy="always"))
    report = Report()
    _active.append(report)
    try:
        out = compiled(*ff_in)
    finally:
        _active.pop()
    ref = ref_model(*ref_in)
    outs, refs = _flat(out), _flat(ref)
    assert len(outs) == len(refs)
    g = torch.Generator().manual_seed(seed + 7)
    cot = [torch.randn(r.shape, generator=g, dtype=torch.float64).to(r.dtype) for r in refs]
    errs = [(f"output {i}", rel(o, r)) for i, (o, r) in enumerate(zip(outs, refs))]
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and o.dtype == r.dtype, (o.shape, r.shape, o.dtype, r.dtype)
    pairs = [(o, r, c) for o, r, c in zip(outs, refs, cot) if r.requires_grad]
    if pairs:
        torch.autograd.backward([r for _, r, _ in pairs], [c for _, _, c in pairs])
        torch.autograd.backward([o for o, _, _ in pairs], [c for _, _, c in pairs])
        for i, (a, b) in enumerate(zip(ff_in, ref_in)):
            if b.grad is not None:
                errs.append((f"grad input {i}", rel(a.grad, b.grad)))
        if isinstance(model, nn.Module):
            for (name, p), (_, q) in zip(ff_model.named_parameters(), ref_model.named_parameters()):
                if q.grad is not None:
                    assert p.grad is not None, f"no gradient for {name} under flashfuse"
                    errs.append((f"grad {name}", rel(p.grad, q.grad)))
    return report, errs


def check(make, inputs, counts, negative=None, reason=None, details=None, seed=0):
    report, errs = run_case(make, inputs, seed)
    got = {k: report.count(k) for k in counts}
    assert got == counts, f"expected {counts}, got {got}\n{report}"
    if negative is not None and reason is not None:
        reasons = [n.reason for n in report.near_misses if n.fusion == negative]
        assert any(reason in r for r in reasons), f"no near-miss containing {reason!r}\n{report}"
    for fusion, want in (details or {}).items():
        m = next(m for m in report.matches if m.fusion == fusion)
        for k, v in want.items():
            assert m.details.get(k) == v, f"{fusion}.{k}: {m.details.get(k)!r} != {v!r}\n{report}"
    bad = [(w, e) for w, e in errs if not e < TOL]
    assert not bad, f"differs from eager: {bad}\n{report}"
    return report


def case(name, make, inputs, counts, reason=None, details=None, xfail=None):
    """One row: pytest id, a model factory, its inputs, the exact counts; `reason` = near-miss text
    expected for a negative (the fusion whose count is 0 and named first)."""
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(make, inputs, counts, reason, details, id=name, marks=marks)


class Fn(nn.Module):
    """A module around fn(self, *inputs) with named parameters."""

    def __init__(self, fn, **params):
        super().__init__()
        self.fn = fn
        for k, v in params.items():
            setattr(self, k, v)

    def forward(self, *xs):
        return self.fn(self, *xs)


def P(*shape, base=0.0, seed=0):
    return nn.Parameter(base + 0.3 * rand(*shape, seed=seed))


# ================================================================================================ models
class TimmLayerNorm2d(nn.LayerNorm):
    """timm.layers.norm.LayerNorm2d (channels-first input, normalised over C via permute)."""

    def __init__(self, num_channels, eps=1e-6, affine=True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class TimmLayerNorm2dCF(nn.LayerNorm):
    """timm's older LayerNorm2d fallback `_layer_norm_cf`: var_mean over dim 1 (statistics over C of NCHW)."""

    def __init__(self, num_channels, eps=1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x):
        s, u = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        x = (x - u) * torch.rsqrt(s + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class TimmRmsNorm2dFallback(nn.Module):
    """timm RmsNorm2d's pure-torch path: mean of squares over dim 1 of NCHW."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(channels))

    def forward(self, x):
        v = x.pow(2).mean(dim=1, keepdim=True)
        return x * torch.rsqrt(v + self.eps) * self.weight.view(1, -1, 1, 1)


class LucidrainsRMSNorm(nn.Module):
    """x / clamp(||x|| / sqrt(d), min=eps) * g: a clamp, not `+ eps` under the root."""

    def __init__(self, dim, eps=1e-8):
        super().__init__()
        self.scale, self.eps, self.g = dim ** -0.5, eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        norm = torch.norm(x, dim=-1, keepdim=True) * self.scale
        return x / norm.clamp(min=self.eps) * self.g


class HandLNAddcmul(nn.Module):
    """LayerNorm whose affine is torch.addcmul(bias, x_hat, weight)."""

    def __init__(self, d):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        return torch.addcmul(self.bias, (x - mu) * torch.rsqrt(var + EPS), self.weight)


class HandLNInplace(nn.Module):
    """LayerNorm written with in-place ops on a working copy (inference-style scripts)."""

    def __init__(self, d):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        h = x - x.mean(dim=-1, keepdim=True)
        var = h.pow(2).mean(dim=-1, keepdim=True)
        h = h / (var + EPS) ** 0.5
        h = h * self.weight
        h += self.bias
        return h


class HandLNPowHalf(nn.Module):
    """(x - mu) / (var + eps) ** 0.5 with the variance from torch.mean(torch.pow(x - mu, 2))."""

    def forward(self, x):
        mu = torch.mean(x, dim=-1, keepdim=True)
        var = torch.mean(torch.pow(x - mu, 2), dim=-1, keepdim=True)
        return (x - mu) / (var + 1e-5) ** 0.5


class MovedimLN(nn.Module):
    """channels-first LayerNorm via movedim instead of permute."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c, eps=1e-6)

    def forward(self, x):
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class HFLlamaDecoder(nn.Module):
    """transformers' LlamaDecoderLayer with its rotary embedding (eager attention, no mask)."""

    def __init__(self):
        super().__init__()
        cfg = LlamaConfig(hidden_size=D, intermediate_size=2 * D, num_attention_heads=2, num_key_value_heads=2,
                          head_dim=D // 2, rms_norm_eps=1e-6, vocab_size=16, max_position_embeddings=32)
        cfg._attn_implementation = "eager"
        self.rope = LlamaRotaryEmbedding(cfg)
        self.layer = LlamaDecoderLayer(cfg, layer_idx=0)

    def forward(self, x):
        pos = torch.arange(x.shape[1]).unsqueeze(0)
        out = self.layer(x, attention_mask=None, position_ids=pos, position_embeddings=self.rope(x, pos))
        return out[0] if isinstance(out, tuple) else out


class LlamaStyleDecoder(nn.Module):
    """Hand-written LLaMA block with HF LlamaRMSNorm modules: both residual adds feed a norm / output."""

    def __init__(self):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = LlamaRMSNorm(D), LlamaRMSNorm(D)
        self.mix = nn.Linear(D, D, bias=False)
        self.gate, self.up, self.down = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False), \
            nn.Linear(2 * D, D, bias=False)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.mix(hidden_states)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.down(F.silu(self.gate(hidden_states)) * self.up(hidden_states))
        return residual + hidden_states


class ResidualNormReused(nn.Module):
    """h = x + y (y from a projection, dropout in eval), norm(h) and h both returned."""

    def __init__(self, norm):
        super().__init__()
        self.proj, self.drop, self.norm = nn.Linear(D, D), nn.Dropout(0.1), norm

    def forward(self, x, y):
        h = x + self.drop(self.proj(y))
        return self.norm(h), h


class BroadcastCondResidual(nn.Module):
    """x + c[:, None, :] (a conditioning vector per sample) then LayerNorm: the add broadcasts."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)

    def forward(self, x, c):
        h = x + c.unsqueeze(1)
        return self.norm(h), h


def bert_config(**kw):
    return BertConfig(hidden_size=D, intermediate_size=2 * D, num_attention_heads=2, hidden_dropout_prob=0.0,
                      layer_norm_eps=1e-12, **kw)


@torch.jit.script
def megatron_bias_gelu(bias, y):
    x = bias + y
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def megatron_erf_gelu(x):
    return x * 0.5 * (torch.erf(x / 1.41421).to(dtype=x.dtype) + torch.ones_like(x).to(dtype=x.dtype))


class MegatronMLP(nn.Module):
    """Megatron ParallelMLP: dense_h_to_4h with skip_bias_add, then the jit-scripted bias_gelu(bias, y)."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(2 * D, D) / 5), nn.Parameter(torch.zeros(2 * D))

    def forward(self, x):
        y = F.linear(x, self.weight)
        return megatron_bias_gelu(self.bias, y)


@torch.jit.script
def megatron_bias_gelu_back(g, bias, y):
    x = bias + y
    tanh_out = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
    ff = 0.5 * x * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + tanh_out)
    return ff * g


class MegatronGeLUFunction(torch.autograd.Function):
    """Megatron's bias_gelu_impl: the scripted forward with its hand-written backward."""

    @staticmethod
    def forward(ctx, input, bias):
        ctx.save_for_backward(input, bias)
        return megatron_bias_gelu(bias, input)

    @staticmethod
    def backward(ctx, grad_output):
        input, bias = ctx.saved_tensors
        tmp = megatron_bias_gelu_back(grad_output, bias, input)
        return tmp, tmp


class MegatronMLPImpl(MegatronMLP):
    def forward(self, x):
        return MegatronGeLUFunction.apply(F.linear(x, self.weight), self.bias)


class LinearAct(nn.Module):
    def __init__(self, act, fn=None):
        super().__init__()
        self.fc, self.fc2, self.act, self.fn = nn.Linear(D, 2 * D), nn.Linear(D, 2 * D), act, fn

    def forward(self, x):
        return self.fn(self, x) if self.fn else self.act(self.fc(x))


class PreluConvBlock(nn.Module):
    """conv -> BN (eval) -> nn.PReLU(C) (ESPNet / face-recognition nets)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), nn.PReLU(C)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class TiedLayerNorms(nn.Module):
    """One LayerNorm module applied to two inputs (shared weight: the gradients add up)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)

    def forward(self, a, b):
        return self.norm(a) * self.norm(b)


class QKVSplitRMS(nn.Module):
    """OLMo2-style qk-norm after a fused qkv projection: q and k are strided slices of one tensor."""

    def __init__(self):
        super().__init__()
        self.qkv, self.q_norm, self.k_norm = nn.Linear(D, 3 * D, bias=False), LlamaRMSNorm(D), LlamaRMSNorm(D)

    def forward(self, x):
        q, k, v = self.qkv(x).split(D, dim=-1)
        return self.q_norm(q), self.k_norm(k), v


class DiTModulate(nn.Module):
    """DiT: modulate(norm(x), shift, scale) = norm(x) * (1 + scale[:, None]) + shift[:, None] (per-sample affine)."""

    def __init__(self, rms=False):
        super().__init__()
        self.norm = LlamaRMSNorm(D) if rms else nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(D, 2 * D)

    def forward(self, x, c):
        shift, scale = self.ada(F.silu(c)).chunk(2, dim=1)
        return self.norm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ================================================================================================ LayerNorm
X4 = rand(2, C, 5, 3, seed=1)   # (B, C, H, W)
X3 = rand(2, 5, D, seed=2)      # (B, S, D)

LAYER_NORM = [
    case("hf_convnext_channels_first", lambda: ConvNextLayerNorm(C, data_format="channels_first"), (X4,),
         dict(layer_norm=1)),
    case("hf_convnext_channels_last_nhwc", lambda: ConvNextLayerNorm(C), (rand(2, 5, 3, C, seed=3),),
         dict(layer_norm=1)),
    case("timm_layernorm2d_permute", lambda: TimmLayerNorm2d(C), (X4,), dict(layer_norm=1)),
    case("timm_layernorm2d_no_affine", lambda: TimmLayerNorm2d(C, affine=False), (X4,), dict(layer_norm=1)),
    case("movedim_channels_first", lambda: MovedimLN(C), (X4,), dict(layer_norm=1)),
    case("hf_cohere_layernorm_no_bias", lambda: CohereLayerNorm(D, eps=1e-5), (X3,),
         dict(layer_norm=1, rms_norm=0)),
    case("hf_cohere_qk_norm_tuple_shape", lambda: CohereLayerNorm((3, 8)), (rand(2, 5, 3, 8, seed=4),),
         dict(layer_norm=1)),
    case("hf_olmo_nonparametric", lambda: OlmoLayerNorm(D), (X3,), dict(layer_norm=1)),
    case("addcmul_affine", lambda: HandLNAddcmul(D), (X3,), dict(layer_norm=1)),
    case("inplace_bias_pow_half", lambda: HandLNInplace(D), (X3,), dict(layer_norm=1)),
    case("torch_pow_mean_pow_half_no_affine", HandLNPowHalf, (X3,), dict(layer_norm=1)),
    case("nn_layernorm_two_dims", lambda: nn.LayerNorm([5, D]), (X3,), dict(layer_norm=1)),
    case("stress_offset_1e3_len37_module", lambda: nn.LayerNorm(37), (rand(3, 4, 37, seed=5, offset=1e3),),
         dict(layer_norm=1)),
    case("stress_offset_1e3_len37_hand", lambda: Fn(lambda m, x: (lambda mu: (x - mu) * torch.rsqrt(
        (x - mu).pow(2).mean(-1, keepdim=True) + 1e-5) * m.w + m.b)(x.mean(-1, keepdim=True)),
        w=P(37, base=1.0, seed=6), b=P(37, seed=7)), (rand(3, 4, 37, seed=8, offset=1e3),),
        dict(layer_norm=1)),
    case("ln_over_transposed_noncontiguous", lambda: Fn(lambda m, x: m.norm(x.transpose(1, 2)), norm=nn.LayerNorm(5)),
         (X3,), dict(layer_norm=1)),
    case("tied_layernorm_two_inputs", TiedLayerNorms, (X3, rand(2, 5, D, seed=14)), dict(layer_norm=2)),
    case("dit_adaln_modulate_per_sample", DiTModulate, (X3, rand(2, D, seed=15)), dict(layer_norm=1)),
    case("ln_then_positionwise_scale_shift", lambda: Fn(lambda m, x: F.layer_norm(x, (D,)) * m.w + m.b,
                                                         w=P(5, D, base=1.0), b=P(5, D)), (X3,), dict(layer_norm=1)),
    case("bert_self_output_post_norm", lambda: BertSelfOutput(bert_config()), (X3, rand(2, 5, D, seed=9)),
         dict(layer_norm=1, residual_norm=1)),
]


@pytest.mark.parametrize("make,inputs,counts,reason,details", LAYER_NORM)
def test_layer_norm(make, inputs, counts, reason, details):
    check(make, inputs, counts, details=details)


# ================================================================================================ RMSNorm
RMS_NORM = [
    case("hf_t5_layernorm", lambda: T5LayerNorm(D), (X3,), dict(rms_norm=1, layer_norm=0)),
    case("hf_llama_rmsnorm", lambda: LlamaRMSNorm(D), (X3,), dict(rms_norm=1)),
    case("hf_gemma_one_plus_w", lambda: GemmaRMSNorm(D), (X3,), dict(rms_norm=1)),
    case("hf_olmo2_weight_before_cast", lambda: Olmo2RMSNorm(D), (X3,), dict(rms_norm=1)),
    case("hf_qwen2_rmsnorm_2d", lambda: Qwen2RMSNorm(D), (rand(7, D, seed=10),), dict(rms_norm=1)),
    case("hf_mistral_len37_offset", lambda: MistralRMSNorm(37), (rand(2, 3, 37, seed=11, offset=1e3),),
         dict(rms_norm=1)),
    case("qkv_split_slices_rmsnorm", QKVSplitRMS, (X3,), dict(rms_norm=2)),
    case("dit_modulate_after_llama_rmsnorm", lambda: DiTModulate(rms=True), (X3, rand(2, D, seed=16)),
         dict(rms_norm=1)),
    case("norm_squared_over_d", lambda: Fn(lambda m, x: x * torch.rsqrt(
        torch.linalg.vector_norm(x, dim=-1, keepdim=True).pow(2) / x.shape[-1] + EPS) * m.w, w=P(D, base=1.0)),
         (X3,), dict(rms_norm=1)),
    case("square_method_div_sqrt", lambda: Fn(lambda m, x: m.w * x.div(
        x.square().mean(-1, keepdim=True).add(EPS).sqrt()), w=P(D, base=1.0)), (X3,), dict(rms_norm=1)),
]


@pytest.mark.parametrize("make,inputs,counts,reason,details", RMS_NORM)
def test_rms_norm(make, inputs, counts, reason, details):
    check(make, inputs, counts, details=details)


# ================================================================================================ residual + norm
class TwoNormsOfOneResidual(nn.Module):
    """GPT-J / parallel block: h = x + y read by two LayerNorms and returned."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D, eps=1e-6)

    def forward(self, x, y):
        h = x + y
        return self.ln1(h) * self.ln2(h), h


class PosEmbedPreNorm(nn.Module):
    """ViT norm_pre: x + pos_embed (a parameter of x's shape at batch 1), then a LayerNorm; the sum returned."""

    def __init__(self):
        super().__init__()
        self.pos_embed, self.norm = nn.Parameter(0.02 * torch.randn(1, 5, D)), nn.LayerNorm(D)

    def forward(self, x):
        h = x + self.pos_embed
        return self.norm(h), h


RESIDUAL = [
    case("hf_llama_decoder_layer", HFLlamaDecoder, (X3,), dict(rms_norm=2, residual_norm=1)),
    case("llama_style_decoder_hf_rmsnorm", LlamaStyleDecoder, (X3,), dict(rms_norm=2, residual_norm=1)),
    case("residual_dropout_eval_gemma", lambda: ResidualNormReused(GemmaRMSNorm(D)), (X3, rand(2, 5, D, seed=12)),
         dict(rms_norm=1, residual_norm=1)),
    case("residual_dropout_eval_cohere", lambda: ResidualNormReused(CohereLayerNorm(D)),
         (X3, rand(2, 5, D, seed=13)), dict(layer_norm=1, residual_norm=1)),
    case("residual_self_add_x_plus_x", lambda: Fn(lambda m, x: (lambda h: (m.norm(h), h))(x + x), norm=LlamaRMSNorm(D)),
         (X3,), dict(rms_norm=1, residual_norm=1)),
    case("two_norms_of_one_residual", TwoNormsOfOneResidual, (X3, rand(2, 5, D, seed=17)), dict(layer_norm=2)),
    case("vit_pos_embed_param_batch1", PosEmbedPreNorm, (rand(1, 5, D, seed=18),),
         dict(layer_norm=1, residual_norm=1)),
]


@pytest.mark.parametrize("make,inputs,counts,reason,details", RESIDUAL)
def test_residual_norm(make, inputs, counts, reason, details):
    check(make, inputs, counts, details=details)


# ================================================================================================ bias + GELU
XG = rand(2, 5, D, seed=20)
BIAS = dict(bias_gelu=dict(bias=True))

GELU = [
    case("megatron_jit_script_bias_gelu", MegatronMLP, (XG,), dict(bias_gelu=1),
         details=dict(bias_gelu=dict(bias=True, approximate="tanh"))),
    # the Function's forward and hand-written backward are proven GELU's (passes/bias_gelu_function.py)
    case("megatron_bias_gelu_impl_autograd_function", MegatronMLPImpl, (XG,), dict(bias_gelu=1),
         details=dict(bias_gelu=dict(bias=True, approximate="tanh", spelling="autograd.Function"))),
    case("megatron_erf_gelu_verbatim", lambda: LinearAct(megatron_erf_gelu), (XG,), dict(bias_gelu=1)),
    case("erf_gelu_ones_like_exact_sqrt2", lambda: LinearAct(None, lambda m, x: (lambda h: h * 0.5 * (
        torch.erf(h / math.sqrt(2.0)) + torch.ones_like(h)))(m.fc(x))), (XG,), dict(bias_gelu=1)),
    case("erf_gelu_noop_cast_after_erf", lambda: LinearAct(None, lambda m, x: (lambda h: h * 0.5 * (
        1.0 + torch.erf(h / math.sqrt(2.0)).to(dtype=h.dtype)))(m.fc(x))), (XG,), dict(bias_gelu=1)),
    case("hf_bert_intermediate_gelu_python", lambda: BertIntermediate(bert_config(hidden_act="gelu_python")),
         (XG,), dict(bias_gelu=1), details=BIAS),
    case("hf_bert_intermediate_F_gelu", lambda: BertIntermediate(bert_config(hidden_act="gelu")), (XG,),
         dict(bias_gelu=1), details=BIAS),
    case("hf_gpt2_mlp_conv1d_gelu_new", lambda: GPT2MLP(2 * D, GPT2Config(n_embd=D, resid_pdrop=0.0)), (XG,),
         dict(bias_gelu=1), details=dict(bias_gelu=dict(bias=True, approximate="tanh"))),
    case("hf_gelu_fast_after_linear", lambda: LinearAct(tf_act.ACT2FN["gelu_fast"]), (XG,), dict(bias_gelu=1),
         details=BIAS),
    case("hf_gelu_pytorch_tanh_after_linear", lambda: LinearAct(tf_act.ACT2FN["gelu_pytorch_tanh"]), (XG,),
         dict(bias_gelu=1), details=BIAS),
    case("hf_clipped_gelu", lambda: LinearAct(tf_act.ClippedGELUActivation(-0.5, 2.0)), (XG,), dict(bias_gelu=1)),
    case("gelu_new_of_scaled_linear", lambda: LinearAct(tf_act.NewGELUActivation(),
                                                        lambda m, x: m.act(m.fc(x) * 0.5)), (XG,),
         dict(bias_gelu=1)),
    case("gelu_new_of_gated_linears", lambda: LinearAct(tf_act.NewGELUActivation(),
                                                        lambda m, x: m.act(m.fc(x) * m.fc2(x))), (XG,),
         dict(bias_gelu=1)),
    case("erf_gelu_of_linear_plus_linear", lambda: LinearAct(tf_act.GELUActivation(use_gelu_python=True),
                                                             lambda m, x: m.act(m.fc(x) + m.fc2(x))), (XG,),
         dict(bias_gelu=1)),
    case("gelu_linear_output_also_returned", lambda: LinearAct(None, lambda m, x: (lambda h: (F.gelu(h), h))(m.fc(x))),
         (XG,), dict(bias_gelu=1)),
    case("einsum_plus_bias_gelu_tanh", lambda: Fn(lambda m, x: F.gelu(
        torch.einsum("bsd,fd->bsf", x, m.W) + m.b, approximate="tanh"), W=P(2 * D, D, seed=21), b=P(2 * D, seed=22)),
        (XG,), dict(bias_gelu=1), details=BIAS),
    case("stress_gelu_len37_wide_range", lambda: Fn(lambda m, x: F.gelu(x + m.b), b=P(37, seed=24)),
         (rand(4, 37, seed=23, scale=6.0),), dict(bias_gelu=1), details=BIAS),
]


@pytest.mark.parametrize("make,inputs,counts,reason,details", GELU)
def test_bias_gelu(make, inputs, counts, reason, details):
    check(make, inputs, counts, negative="bias_gelu", reason=reason, details=details)


# ================================================================================================ PReLU
PRELU = [
    case("nn_prelu_C_on_odd_nchw", lambda: nn.PReLU(num_parameters=C, init=0.3), (rand(2, C, 5, 3, seed=30),),
         dict(prelu=1)),
    case("conv_bn_prelu_block", PreluConvBlock, (rand(2, 3, 5, 4, seed=31),), dict(prelu=1)),
    case("F_prelu_2d_rows", lambda: Fn(lambda m, x: F.prelu(x, m.a), a=P(C, base=0.2)), (rand(7, C, seed=32),),
         dict(prelu=1)),
    case("where_slope_C11_no_batch_dim", lambda: Fn(lambda m, x: torch.where(x > 0, x, m.a * x), a=P(C, 1, 1, base=.2)),
         (rand(2, C, 4, 3, seed=33),), dict(prelu=1)),
    case("relu_plus_slope_times_x_minus_relu", lambda: Fn(lambda m, x: F.relu(x) + m.a.view(1, -1, 1, 1) * (
        x - F.relu(x)), a=P(C, base=0.2)), (rand(2, C, 4, 3, seed=34),), dict(prelu=1)),
    case("nn_prelu_channels_last_memory", lambda: nn.PReLU(C, init=0.2),
         (rand(2, C, 4, 3, seed=36).contiguous(memory_format=torch.channels_last),), dict(prelu=1)),
    case("where_slope_sigmoid_of_param", lambda: Fn(lambda m, x: torch.where(
        x > 0, x, torch.sigmoid(m.a).view(1, -1, 1, 1) * x), a=P(C)), (rand(2, C, 4, 3, seed=37),), dict(prelu=1)),
    case("prelu_channels_last_where_last_dim", lambda: Fn(lambda m, x: torch.where(x > 0, x, x * m.a), a=P(C, base=.2)),
         (rand(2, 4, 3, C, seed=35),), dict(prelu=1)),
]


@pytest.mark.parametrize("make,inputs,counts,reason,details", PRELU)
def test_prelu(make, inputs, counts, reason, details):
    check(make, inputs, counts, details=details)


# ================================================================================================ global pooling
XP = rand(2, 3, 5, 4, seed=40)
MEAN23 = dict(global_pool=dict(kind="mean", dims=(2, 3)))

POOL = [
    case("sum_neg_list_div_hw_single_op", lambda: Fn(lambda m, x: x.sum([-1, -2]) / (x.shape[-2] * x.shape[-1])),
         (XP,), dict(global_pool=0)),
    case("nn_adaptive_avg_pool_module_view", lambda: Fn(lambda m, x: m.pool(x).view(x.shape[0], -1),
                                                        pool=nn.AdaptiveAvgPool2d((1, 1))), (XP,), dict(global_pool=0)),
    case("sum_sum_div_H_div_W_named", lambda: Fn(
        lambda m, x: (lambda B, Ch, H, W: x.sum(-1).sum(-1) / H / W)(*x.shape)),
         (XP,), dict(global_pool=1), details=MEAN23),
    case("sum_sum_times_reciprocal_hw", lambda: Fn(lambda m, x: x.sum(-1).sum(-1) * (1 / (x.size(2) * x.size(3)))),
         (XP,), dict(global_pool=1), details=MEAN23),
    case("mean_3d_volume_three_steps_keepdim", lambda: Fn(lambda m, x: x.mean(-1, True).mean(-2, True).mean(-3, True)),
         (rand(2, 3, 4, 5, 2, seed=41),), dict(global_pool=1),
         details=dict(global_pool=dict(kind="mean", dims=(2, 3, 4)))),
    case("mean_mean_then_linear_head", lambda: Fn(lambda m, x: m.head(x.mean(-1).mean(-1)), head=nn.Linear(3, 4)),
         (XP,), dict(global_pool=1), details=MEAN23),
    case("channels_last_mean1_mean1", lambda: Fn(lambda m, x: x.mean(1).mean(1)), (rand(2, 5, 4, 3, seed=43),),
         dict(global_pool=1), details=dict(global_pool=dict(kind="mean", dims=(1, 2)))),
    case("mean_mean_channels_last_memory", lambda: Fn(lambda m, x: x.mean(-1).mean(-1)),
         (rand(2, 3, 5, 4, seed=44).contiguous(memory_format=torch.channels_last),), dict(global_pool=1),
         details=MEAN23),
    case("stress_mean_mean_offset_37x5", lambda: Fn(lambda m, x: x.mean(-1).mean(-1)),
         (rand(2, 3, 37, 5, seed=42, offset=1e3),), dict(global_pool=1), details=MEAN23),
    case("torch_sum_sum_div_numel_of_plane", lambda: Fn(lambda m, x: torch.sum(torch.sum(x, -1), -1) / x[0, 0].numel()),
         (XP,), dict(global_pool=1), details=MEAN23),
]


@pytest.mark.parametrize("make,inputs,counts,reason,details", POOL)
def test_global_pool(make, inputs, counts, reason, details):
    check(make, inputs, counts, details=details)


# ================================================================================================ eltwise chain
ELT = [
    case("layer_scale_two_branches", lambda: Fn(lambda m, x, a, b: x + a * m.g1 + b * m.g2, g1=P(D, seed=50),
                                                g2=P(D, seed=51)),
         (X3, rand(2, 5, D, seed=52), rand(2, 5, D, seed=53)), dict(eltwise_chain=1)),
    case("swiglu_style_product_minus", lambda: Fn(lambda m, a, b, c: (a * b - c) / (1.0 + b * b)),
         (X3, rand(2, 5, D, seed=54), rand(2, 5, D, seed=55)), dict(eltwise_chain=1)),
]


@pytest.mark.parametrize("make,inputs,counts,reason,details", ELT)
def test_eltwise_chain(make, inputs, counts, reason, details):
    check(make, inputs, counts, details=details)


# ================================================================================================ negatives
NEGATIVE = [
    case("timm_layer_norm_cf_var_mean_dim1", lambda: TimmLayerNorm2dCF(C), (X4,), dict(layer_norm=0, rms_norm=0),
         reason="statistics over dim 1"),
    case("timm_rmsnorm2d_fallback_dim1", lambda: TimmRmsNorm2dFallback(C), (X4,), dict(rms_norm=0, layer_norm=0),
         reason="statistics over dim 1"),
    case("hand_batchnorm_stats_over_dim0", lambda: Fn(lambda m, x: (x - x.mean(0)) / torch.sqrt(
        x.var(0, unbiased=False) + EPS) * m.w + m.b, w=P(D, base=1.0), b=P(D)), (rand(7, D, seed=62),),
         dict(layer_norm=0, rms_norm=0), reason="dim 0"),
    case("lucidrains_norm_clamp", lambda: LucidrainsRMSNorm(D), (X3,), dict(rms_norm=0, layer_norm=0)),
    case("hf_quick_gelu_after_linear", lambda: LinearAct(tf_act.ACT2FN["quick_gelu"]), (XG,), dict(bias_gelu=0)),
    case("silu_after_linear", lambda: LinearAct(nn.SiLU()), (XG,), dict(bias_gelu=0)),
    case("hand_silu_x_sigmoid_x", lambda: LinearAct(None, lambda m, x: (lambda h: h * torch.sigmoid(h))(m.fc(x))),
         (XG,), dict(bias_gelu=0)),
    case("nn_leaky_relu_module", lambda: nn.LeakyReLU(0.2), (rand(2, C, 4, 3, seed=60),), dict(prelu=0)),
    case("residual_broadcast_condition_vector", BroadcastCondResidual, (X3, rand(2, D, seed=61)),
         dict(residual_norm=0, layer_norm=1), reason="broadcasts"),
    case("ln_mean_over_seq_axis", lambda: Fn(lambda m, x: (x - x.mean(1, keepdim=True)) / torch.sqrt(
        x.var(1, keepdim=True, unbiased=False) + EPS)), (X3,), dict(layer_norm=0), reason="statistics over dim 1"),
]


@pytest.mark.parametrize("make,inputs,counts,reason,details", NEGATIVE)
def test_negatives(make, inputs, counts, reason, details):
    fusion = next(k for k, v in counts.items() if v == 0)
    check(make, inputs, counts, negative=fusion, reason=reason, details=details)
