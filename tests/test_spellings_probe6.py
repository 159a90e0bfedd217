"""Hidden set #6: more hand-written spellings of the NON-attention fusions, as they appear in real code
bases, written without reading the passes: fairseq's Fp32LayerNorm, Whisper / CLIP LayerNorm subclasses,
pytorch-pretrained-bert's BertLayerNorm, nanoGPT's LayerNorm(bias=False), x-transformers (buffer beta,
unit-offset gamma, ScaleNorm), Megatron layernorm1p, BLIP-2 expanded query tokens, apex manual_rms_norm,
ChatGLM RMSNorm, Mamba's layer_norm_ref / rms_norm_ref / gated and grouped RMSNorm / Block, StyleGAN
PixelNorm, lucidrains' channels-first norms, MAE's norm_pix_loss, fairseq post-norm and time-major residuals,
T5LayerFF stacks, Gemma2 sandwich norms, DeepNorm, ConvNeXt blocks, GELU spelled with ndtr / erfc / sigmoid,
HF gelu_accurate / gelu_python_tanh, GEGLU, PReLU with a buffer slope, RReLU / ELU negatives, mixed pooling
chains, masked mean pooling, DDPM / Adam / EMA / RoPE / AdaIN / LSQ / ConvNeXt-V2 GRN pointwise chains,
bf16 / fp16 norms that upcast and cast back for real, float64 (must be left alone), and gradient stops:
statistics or producers written under `.detach()` or `with torch.no_grad():` (DetachNorm, frozen
backbones / embeddings, DINO-style teacher centring).

Harness: tests/probe_harness.py (shared with probes 10 and 11; first written for probe 5): each case compiles a
copy of the model with flashfuse.backend(remainder="eager", norm_policy="always"), asserts the exact fusion
counts, and compares outputs and every input / parameter gradient with eager (relative L2 < 1e-4 in fp32,
2e-2 for bf16 / fp16, 1e-10 for float64; NaN / inf at eager's positions). In addition: every input is
compared after the call (in-place updates), each output's requires_grad must equal eager's, and a tensor that
eager gives no gradient must get none (or zeros).
Negatives assert the fusion did NOT happen (and the near-miss reason when one is given) and eager's
numbers. Cases flashfuse gets wrong today are marked xfail(strict=True) with what was measured; those that
start with "WRONG GRADIENT" fuse and then differ from eager.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from probe_harness import ROWS, P, Fn, case, rand, run_row

tf_act = pytest.importorskip("transformers.activations")
from transformers import T5Config  # noqa: E402
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.t5.modeling_t5 import T5LayerFF  # noqa: E402

D = 24      # hidden size
C = 6       # channels
TOL_BF16 = 2e-2


# ================================================================================================ LayerNorm models
class Fp32LayerNorm(nn.LayerNorm):
    """fairseq.modules.layer_norm.Fp32LayerNorm, verbatim."""

    def forward(self, input):
        output = F.layer_norm(
            input.float(), self.normalized_shape,
            self.weight.float() if self.weight is not None else None,
            self.bias.float() if self.bias is not None else None,
            self.eps)
        return output.type_as(input)


class WhisperLayerNorm(nn.LayerNorm):
    """openai/whisper model.py LayerNorm (CLIP's is the same with x.type(torch.float32))."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class OldBertLayerNorm(nn.Module):
    """pytorch-pretrained-bert BertLayerNorm, "TF style (epsilon inside the square root)"."""

    def __init__(self, hidden_size, eps=1e-12):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(hidden_size)), nn.Parameter(torch.zeros(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.variance_epsilon)
        return self.weight * x + self.bias


class NanoGPTLayerNorm(nn.Module):
    """nanoGPT model.py LayerNorm with an optional bias."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class XTransformersLayerNormBuffer(nn.Module):
    """x-transformers (older) LayerNorm: learned gamma, beta a buffer (filled off zero here)."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", 0.1 * rand(dim, seed=77))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class XTransformersLayerNormUnitOffset(nn.Module):
    """x-transformers LayerNorm(unit_offset=True): nn.LayerNorm(elementwise_affine=False) * (gamma + 1.)."""

    def __init__(self, dim):
        super().__init__()
        self.ln = nn.LayerNorm(dim, elementwise_affine=False)
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        normed = self.ln(x)
        gamma = self.gamma + float(True)
        return normed * gamma


class MegatronLayerNorm1P(nn.Module):
    """Megatron MixedFusedLayerNorm(apply_layernorm_1p=True) torch fallback: weight stored zero-centred."""

    def __init__(self, hidden, eps=1e-5):
        super().__init__()
        self.normalized_shape = (hidden,)
        self.weight, self.bias = nn.Parameter(torch.zeros(hidden)), nn.Parameter(torch.zeros(hidden))
        self.eps = eps

    def forward(self, input):
        weight = self.weight + 1
        return F.layer_norm(input, self.normalized_shape, weight, self.bias, self.eps)


class LucidrainsChanLayerNorm(nn.Module):
    """denoising-diffusion-pytorch / imagen ChanLayerNorm: statistics over dim 1 of NCHW."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.g, self.b = nn.Parameter(torch.ones(1, dim, 1, 1)), nn.Parameter(torch.zeros(1, dim, 1, 1))

    def forward(self, x):
        var = torch.var(x, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=1, keepdim=True)
        return (x - mean) / (var + self.eps).sqrt() * self.g + self.b


class LucidrainsChanRMSNorm(nn.Module):
    """denoising-diffusion-pytorch RMSNorm for NCHW: F.normalize over dim 1 * g * sqrt(C)."""

    def __init__(self, dim):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.g * (x.shape[1] ** 0.5)


# ================================================================================================ RMSNorm models
def manual_rms_norm(input, normalized_shape, weight, eps):
    """apex.normalization.fused_layer_norm.manual_rms_norm, verbatim."""
    dims = tuple(i for i in range(-1, -len(normalized_shape) - 1, -1))
    variance = input.to(torch.float32).pow(2).mean(dims, keepdim=True)
    input = input * torch.rsqrt(variance + eps)
    if weight is None:
        return input
    if weight.dtype in [torch.float16, torch.bfloat16]:
        input = input.to(weight.dtype)
    return weight * input


class ApexRMSNorm(nn.Module):
    def __init__(self, normalized_shape, eps=1e-5):
        super().__init__()
        self.normalized_shape, self.eps = tuple(normalized_shape), eps
        self.weight = nn.Parameter(torch.ones(*normalized_shape))

    def forward(self, x):
        return manual_rms_norm(x, self.normalized_shape, self.weight, self.eps)


class ChatGLMRMSNorm(nn.Module):
    """ChatGLM2/3 RMSNorm: the variance in fp32, but the un-upcast hidden_states multiplied."""

    def __init__(self, normalized_shape, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.eps = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return (self.weight * hidden_states).to(input_dtype)


def mamba_rms_norm_ref(x, weight, bias, residual=None, eps=1e-6, prenorm=False, upcast=False):
    """mamba_ssm/ops/triton/layer_norm.py rms_norm_ref, verbatim."""
    dtype = x.dtype
    if upcast:
        weight = weight.float()
        bias = bias.float() if bias is not None else None
    if upcast:
        x = x.float()
        residual = residual.float() if residual is not None else residual
    if residual is not None:
        x = (x + residual).to(x.dtype)
    rstd = 1 / torch.sqrt((x.square()).mean(dim=-1, keepdim=True) + eps)
    out = (x * rstd * weight) + bias if bias is not None else (x * rstd * weight)
    out = out.to(dtype)
    return out if not prenorm else (out, x)


def mamba_layer_norm_ref(x, weight, bias, residual=None, eps=1e-6, prenorm=False, upcast=False):
    """mamba_ssm/ops/triton/layer_norm.py layer_norm_ref, verbatim."""
    dtype = x.dtype
    if upcast:
        weight = weight.float()
        bias = bias.float() if bias is not None else None
    if upcast:
        x = x.float()
        residual = residual.float() if residual is not None else residual
    if residual is not None:
        x = (x + residual).to(x.dtype)
    out = F.layer_norm(x.to(weight.dtype), x.shape[-1:], weight=weight, bias=bias, eps=eps).to(dtype)
    return out if not prenorm else (out, x)


class MambaRMSNormRef(nn.Module):
    def __init__(self, dim, bias=False, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x, residual=None, prenorm=False):
        return mamba_rms_norm_ref(x, self.weight, self.bias, residual=residual, eps=self.eps, prenorm=prenorm)


class Mamba2GatedRMSNorm(nn.Module):
    """mamba_ssm/ops/triton/layernorm_gated.py rms_norm_ref (RMSNormGated, norm_before_gate=False);
    `group_size` reshapes the last dim into groups as the reference does with einops."""

    def __init__(self, dim, group_size=None, eps=1e-5):
        super().__init__()
        self.weight, self.eps, self.group_size = nn.Parameter(torch.ones(dim)), eps, group_size

    def forward(self, x, z):
        dtype = x.dtype
        weight = self.weight.float()
        x, z = x.float(), z.float()
        x = x * F.silu(z)
        if self.group_size is None:
            rstd = 1 / torch.sqrt((x.square()).mean(dim=-1, keepdim=True) + self.eps)
            out = x * rstd * weight
        else:
            x_group = x.view(*x.shape[:-1], -1, self.group_size)          # "... (g d) -> ... g d"
            rstd = 1 / torch.sqrt((x_group.square()).mean(dim=-1, keepdim=True) + self.eps)
            out = (x_group * rstd).flatten(-2) * weight                     # "... g d -> ... (g d)"
        return out.to(dtype)


class PixelNorm(nn.Module):
    """rosinality stylegan2-pytorch PixelNorm, applied to the (B, z_dim) latent: dim 1 is the last dim."""

    def forward(self, input):
        return input * torch.rsqrt(torch.mean(input ** 2, dim=1, keepdim=True) + 1e-8)


def normalize_2nd_moment(x, dim=1, eps=1e-8):
    """NVlabs stylegan2-ada-pytorch / stylegan3 networks.normalize_2nd_moment, verbatim."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


class XTransformersScaleNorm(nn.Module):
    """x-transformers ScaleNorm: F.normalize (a clamp of the norm) * sqrt(d) * scalar g."""

    def __init__(self, dim):
        super().__init__()
        self.scale = dim ** 0.5
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return F.normalize(x, dim=-1) * self.scale * self.g


class ScaleNormTWT(nn.Module):
    """Nguyen & Salazar "Transformers without Tears" ScaleNorm: g / clamp(||x||, eps), no 1/sqrt(d)."""

    def __init__(self, scale, eps=1e-5):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        self.eps = eps

    def forward(self, x):
        norm = self.scale / torch.norm(x, dim=-1, keepdim=True).clamp(min=self.eps)
        return x * norm


# ================================================================================================ residual models
class MambaLNRefPrenorm(nn.Module):
    """layer_norm_ref(x, w, b, residual=r, prenorm=True): LayerNorm of x + r, the sum returned."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D))

    def forward(self, x, residual):
        return mamba_layer_norm_ref(x, self.weight, self.bias, residual=residual, eps=1e-5, prenorm=True)


class MambaBlock(nn.Module):
    """mamba_ssm/modules/block.py Block.forward without fused_add_norm, residual_in_fp32=True."""

    def __init__(self):
        super().__init__()
        self.norm = MambaRMSNormRef(D)
        self.mixer = nn.Linear(D, D)
        self.residual_in_fp32 = True

    def forward(self, hidden_states, residual):
        residual = (hidden_states + residual) if residual is not None else hidden_states
        hidden_states = self.norm(residual.to(dtype=self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        hidden_states = self.mixer(hidden_states)
        return hidden_states, residual


class PreNormDropoutP0(nn.Module):
    """nanoGPT-style pre-norm block trained with dropout=0.0 (dropout in training mode, p = 0)."""

    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn, self.mlp = nn.Linear(D, D), nn.Linear(D, D)
        self.dropout = 0.0

    def forward(self, x):
        x = x + F.dropout(self.attn(self.ln_1(x)), p=self.dropout, training=True)
        x = x + F.dropout(self.mlp(self.ln_2(x)), p=self.dropout, training=True)
        return x


class FairseqPostNormEncoderLayer(nn.Module):
    """fairseq TransformerEncoderLayer(normalize_before=False), attention replaced by a projection."""

    def __init__(self):
        super().__init__()
        self.self_attn = nn.Linear(D, D)
        self.self_attn_layer_norm = nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.final_layer_norm = nn.LayerNorm(D)
        self.dropout_module = nn.Dropout(0.1)

    def residual_connection(self, x, residual):
        return residual + x

    def forward(self, x):
        residual = x
        x = self.self_attn(x)
        x = self.dropout_module(x)
        x = self.residual_connection(x, residual)
        x = self.self_attn_layer_norm(x)
        residual = x
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        x = self.dropout_module(x)
        x = self.residual_connection(x, residual)
        x = self.final_layer_norm(x)
        return x


class T5FFStack(nn.Module):
    """Two transformers T5LayerFF in a row: the second's T5LayerNorm reads the first's residual sum."""

    def __init__(self):
        super().__init__()
        cfg = T5Config(d_model=D, d_ff=2 * D, dropout_rate=0.0, feed_forward_proj="relu", layer_norm_epsilon=1e-6)
        self.ff1, self.ff2 = T5LayerFF(cfg), T5LayerFF(cfg)

    def forward(self, x):
        return self.ff2(self.ff1(x))


class Gemma2SandwichBlock(nn.Module):
    """Gemma2DecoderLayer's norm layout (HF Gemma2RMSNorm x4), attention replaced by a projection."""

    def __init__(self):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = Gemma2RMSNorm(D), Gemma2RMSNorm(D)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = Gemma2RMSNorm(D), Gemma2RMSNorm(D)
        self.o_proj = nn.Linear(D, D, bias=False)
        self.gate_proj, self.up_proj = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False)
        self.down_proj = nn.Linear(2 * D, D, bias=False)

    def forward(self, hidden_states):
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = self.o_proj(hidden_states)
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.pre_feedforward_layernorm(hidden_states)
        hidden_states = self.down_proj(F.gelu(self.gate_proj(hidden_states), approximate="tanh")
                                       * self.up_proj(hidden_states))
        hidden_states = self.post_feedforward_layernorm(hidden_states)
        return residual + hidden_states


class DeepNormSublayer(nn.Module):
    """DeepNet post-LN: LN(x * alpha + f(x)) with alpha = (2N) ** 0.25."""

    def __init__(self, n_layers=6):
        super().__init__()
        self.alpha = (2 * n_layers) ** 0.25
        self.f, self.norm = nn.Linear(D, D), nn.LayerNorm(D)

    def forward(self, x):
        return self.norm(x * self.alpha + self.f(x))


class InplaceResidual(nn.Module):
    """h = proj(y); h += x (in place on a temporary); the norm of h and h returned."""

    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Linear(D, D), nn.LayerNorm(D, eps=1e-6)

    def forward(self, x, y):
        h = self.proj(y)
        h += x
        return self.norm(h), h


class BlipQueryTokensNorm(nn.Module):
    """BLIP-2 Q-Former: learned query tokens expanded over the batch (stride 0), then a LayerNorm."""

    def __init__(self, n_query=4):
        super().__init__()
        self.query_tokens = nn.Parameter(0.5 * rand(1, n_query, D, seed=90))
        self.layernorm = nn.LayerNorm(D, eps=1e-12)

    def forward(self, image_embeds):
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.layernorm(query_tokens) + image_embeds[:, : query_tokens.shape[1]]


class ExpandedPosEmbedResidual(nn.Module):
    """h = x + pos_embed.expand(B, -1, -1) (same shape as x, stride 0 over the batch), LN(h) and h."""

    def __init__(self):
        super().__init__()
        self.pos_embed, self.norm = nn.Parameter(0.5 * rand(1, 5, D, seed=91)), nn.LayerNorm(D)

    def forward(self, x):
        h = x + self.pos_embed.expand(x.shape[0], -1, -1)
        return self.norm(h), h


class TimeMajorResidual(nn.Module):
    """fairseq keeps T x B x C: a B x T x C branch output transposed onto the residual, then LN."""

    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Linear(D, D), nn.LayerNorm(D)

    def forward(self, x_tbc, y_btc):
        h = x_tbc + self.proj(y_btc).transpose(0, 1)
        return self.norm(h), h


class ConvNeXtBlock(nn.Module):
    """facebookresearch ConvNeXt Block: dwconv on NCHW, permute to NHWC, LN, pwconvs, permute back, residual."""

    def __init__(self, dim=C):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.pwconv2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.gamma = nn.Parameter(1e-1 * torch.ones(dim))

    def forward(self, x):
        input = x
        x = self.dwconv(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.pwconv2(F.gelu(self.pwconv1(x)))
        x = self.gamma * x
        x = x.permute(0, 3, 1, 2)
        return input + x


class LNXhatReturned(nn.Module):
    """A LayerNorm whose normalized value (before the affine) is also returned (a feature loss reads it)."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D))

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        xhat = (x - mu) * torch.rsqrt((x - mu).pow(2).mean(-1, keepdim=True) + 1e-5)
        return xhat * self.weight + self.bias, xhat


class MambaBlockMixed(MambaBlock):
    """The Block above in bf16 after the first layer: hidden_states bf16, residual kept in fp32."""

    def __init__(self):
        super().__init__()
        self.to(torch.bfloat16)


def timm_ema_update(m, ema_v, model_v):
    """timm ModelEmaV2._update: ema_v.copy_(decay * e + (1. - decay) * m), in place on the EMA tensor."""
    decay = 0.9998
    ema_v.copy_(decay * ema_v + (1.0 - decay) * model_v)
    return ema_v


def torch_single_tensor_adam(m, param, grad, exp_avg, exp_avg_sq):
    """torch.optim.adam._single_tensor_adam (the pre-lerp spelling), step 3, in place on the state."""
    lr, beta1, beta2, eps, step = 1e-2, 0.9, 0.999, 1e-8, 3
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
    return param


class DetachNorm(nn.Module):
    """Xu et al. 2019 "Understanding and Improving Layer Normalization" DetachNorm: the forward of a
    LayerNorm, but mean and variance detached (no gradient through the statistics)."""

    def __init__(self, spelling="detach"):
        super().__init__()
        self.spelling = spelling
        self.weight, self.bias = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D))

    def forward(self, x):
        if self.spelling == "detach":
            mean = x.mean(-1, keepdim=True).detach()
            var = x.var(-1, keepdim=True, unbiased=False).detach()
        else:
            with torch.no_grad():
                mean = x.mean(-1, keepdim=True)
                var = x.var(-1, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + 1e-5) * self.weight + self.bias


class DetachedRMS(nn.Module):
    """RMSNorm with the mean of squares detached (a stop-gradient normaliser)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).detach() + 1e-6) * self.weight


class VQStraightThroughNorm(nn.Module):
    """VQ-VAE straight-through estimator z + (q - z).detach(), then a LayerNorm of the quantized latent."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)

    def forward(self, z, q):
        z_q = z + (q - z).detach()
        return self.norm(z_q)


def lsq_grad_scale(m, x, s):
    """LSQ quantization (Esser et al.) grad_scale / round_pass-style straight-through, verbatim structure:
    forward value x, gradient x * scale."""
    scale = 0.25
    y, y_grad = x, x * scale
    return ((y - y_grad).detach() + y_grad) * s + x * x


def mae_norm_pix_target(m, target):
    """MAE forward_loss with norm_pix_loss: unbiased variance (torch default), + 1e-6 inside the root."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + 1.e-6) ** .5


class UnbindAffineLN(nn.Module):
    """LayerNorm whose weight and bias are the two columns of one (D, 2) parameter (strided views)."""

    def __init__(self):
        super().__init__()
        self.affine = nn.Parameter(torch.stack([torch.ones(D), torch.zeros(D)], dim=-1))

    def forward(self, x):
        gamma, beta = self.affine.unbind(-1)
        return F.layer_norm(x, (D,), gamma, beta, 1e-5)


class NoGradRMS(nn.Module):
    """RMSNorm whose mean of squares is computed under torch.no_grad() (a stop-gradient normaliser)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))

    def forward(self, x):
        with torch.no_grad():
            ms = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(ms + 1e-6) * self.weight


class FrozenLinearGelu(nn.Module):
    """Linear probing / adapters: a frozen projection run under no_grad, the GELU (and what follows) trained."""

    def __init__(self):
        super().__init__()
        self.backbone_fc, self.head = nn.Linear(D, 2 * D), nn.Linear(2 * D, 4)

    def forward(self, x):
        with torch.no_grad():
            h = self.backbone_fc(x)
        return self.head(F.gelu(h))


class FrozenSumThenNorm(nn.Module):
    """Frozen embeddings: token + position summed under no_grad, the LayerNorm after it trained."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)

    def forward(self, tok, pos):
        with torch.no_grad():
            h = tok + pos
        return self.norm(h)


class FrozenPartialPool(nn.Module):
    """A frozen extractor that returns x.sum(-1) under no_grad; the head finishes the pooling and scales."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        with torch.no_grad():
            s = x.sum(-1)
        return s.sum(-1) / (x.shape[-1] * x.shape[-2]) * self.w


def dino_like_centering(m, s, t, c):
    """Teacher output centred under no_grad (DINO), then a pointwise student/teacher expression."""
    with torch.no_grad():
        t = (t - c) / 0.04
    return s * t - s * s


class FrozenTransposedWeight(nn.Module):
    """A frozen (no_grad) transposed copy of a weight, then a trained matmul against it."""

    def __init__(self):
        super().__init__()
        self.W = P(8, D, seed=81)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        with torch.no_grad():
            w_t = self.W.t().contiguous()
        return (x @ w_t) * self.scale


# ================================================================================================ GELU / PReLU models
class LinearAct(nn.Module):
    def __init__(self, act=None, fn=None, out=2 * D):
        super().__init__()
        self.fc, self.act, self.fn = nn.Linear(D, out), act, fn

    def forward(self, x):
        return self.fn(self, x) if self.fn else self.act(self.fc(x))


class DiffusersGEGLU(nn.Module):
    """diffusers.models.activations.GEGLU: proj to 2*dim_out, chunk, hidden * gelu(gate)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, hidden_states):
        hidden_states, gate = self.proj(hidden_states).chunk(2, dim=-1)
        return hidden_states * F.gelu(gate)


SQ2PI = math.sqrt(2.0 / math.pi)


def _gelu_of_fc(body):
    return lambda: LinearAct(fn=lambda m, x: body(m.fc(x)))


# ================================================================================================ LayerNorm
X4 = rand(2, C, 5, 3, seed=1)   # (B, C, H, W)
X3 = rand(2, 5, D, seed=2)      # (B, S, D)

LAYER_NORM = [
    case("fairseq_fp32_layernorm", lambda: Fp32LayerNorm(D), (X3,), dict(layer_norm=1)),
    case("whisper_layernorm_float_type_back", lambda: WhisperLayerNorm(D), (X3,), dict(layer_norm=1)),
    case("pytorch_pretrained_bert_layernorm_eps1e12", lambda: OldBertLayerNorm(D), (X3,),
         dict(layer_norm=1, rms_norm=0)),
    case("nanogpt_layernorm_bias_false_weight_shape", lambda: NanoGPTLayerNorm(D, bias=False), (X3,),
         dict(layer_norm=1)),
    case("nanogpt_layernorm_bias_true", lambda: NanoGPTLayerNorm(D, bias=True), (rand(7, D, seed=3),),
         dict(layer_norm=1)),
    case("x_transformers_beta_buffer", lambda: XTransformersLayerNormBuffer(D), (X3,), dict(layer_norm=1)),
    case("x_transformers_unit_offset_gamma", lambda: XTransformersLayerNormUnitOffset(D), (X3,),
         dict(layer_norm=1)),
    case("megatron_layernorm_1p", lambda: MegatronLayerNorm1P(D), (X3,), dict(layer_norm=1)),
    case("blip2_layernorm_of_expanded_query_tokens", BlipQueryTokensNorm, (X3,), dict(layer_norm=1)),
    case("ln_xhat_also_returned", LNXhatReturned, (X3,), dict(layer_norm=1)),
    case("convnext_blocks_permuted_ln_nchw_residual", lambda: nn.Sequential(ConvNeXtBlock(), ConvNeXtBlock()),
         (X4,), dict(layer_norm=2)),
    case("fairseq_fp32_layernorm_fp16_model", lambda: Fp32LayerNorm(D).half(),
         (rand(2, 5, D, seed=5, dtype=torch.float16),), dict(layer_norm=1), tol=TOL_BF16),
    case("ln_weight_bias_unbind_strided_columns", UnbindAffineLN, (X3,), dict(layer_norm=1)),
    case("vq_straight_through_then_layernorm", VQStraightThroughNorm, (X3, rand(2, 5, D, seed=6)),
         dict(layer_norm=1, residual_norm=1)),
    case("float64_nn_layernorm", lambda: nn.LayerNorm(D).double(), (rand(2, 5, D, seed=7, dtype=torch.float64),),
         dict(layer_norm=0), tol=1e-10),
    case("whisper_layernorm_bf16_input", lambda: WhisperLayerNorm(D), (rand(2, 5, D, seed=4, dtype=torch.bfloat16),),
         dict(layer_norm=1), tol=TOL_BF16),
]


@pytest.mark.parametrize(ROWS, LAYER_NORM)
def test_layer_norm(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)


# ================================================================================================ RMSNorm
XZ = rand(2, 5, D, seed=11)

RMS_NORM = [
    case("apex_manual_rms_norm", lambda: ApexRMSNorm((D,)), (X3,), dict(rms_norm=1, layer_norm=0)),
    case("apex_manual_rms_norm_two_dims", lambda: ApexRMSNorm((5, D)), (X3,), dict(rms_norm=1)),
    case("nn_rmsnorm_two_dims", lambda: nn.RMSNorm([5, D], eps=1e-6), (X3,), dict(rms_norm=1)),
    case("chatglm_rmsnorm_uncast_multiply", lambda: ChatGLMRMSNorm(D), (X3,), dict(rms_norm=1)),
    case("mamba_rms_norm_ref_with_bias", lambda: MambaRMSNormRef(D, bias=True), (X3,), dict(rms_norm=1)),
    case("mamba2_gated_rmsnorm_gate_before_norm", lambda: Mamba2GatedRMSNorm(D), (X3, XZ), dict(rms_norm=1)),
    case("mamba2_gated_rmsnorm_grouped", lambda: Mamba2GatedRMSNorm(D, group_size=8), (X3, XZ),
         dict(rms_norm=1)),
    case("stylegan_pixelnorm_latent_2d", PixelNorm, (rand(4, 32, seed=12),), dict(rms_norm=1)),
    case("stylegan2_normalize_2nd_moment_2d", lambda: Fn(lambda m, x: normalize_2nd_moment(x)),
         (rand(4, 32, seed=13),), dict(rms_norm=1)),
    case("hf_llama_rmsnorm_fp32_weight_bf16_input", lambda: LlamaRMSNorm(D),
         (rand(2, 5, D, seed=15, dtype=torch.bfloat16),), dict(rms_norm=1), tol=TOL_BF16),
    case("hf_gemma2_rmsnorm_bf16", lambda: Gemma2RMSNorm(D).to(torch.bfloat16),
         (rand(2, 5, D, seed=16, dtype=torch.bfloat16),), dict(rms_norm=1), tol=TOL_BF16),
    case("hf_t5_layer_ff_fp16", lambda: T5FFStack().half(), (rand(2, 5, D, seed=17, dtype=torch.float16),),
         dict(rms_norm=2), tol=TOL_BF16),
    case("float64_hand_rmsnorm", lambda: Fn(lambda m, x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * m.w,
                                            w=nn.Parameter(torch.ones(D, dtype=torch.float64))),
         (rand(2, 5, D, seed=18, dtype=torch.float64),), dict(rms_norm=0), tol=1e-10),
    case("hf_llama_rmsnorm_bf16", lambda: LlamaRMSNorm(D).to(torch.bfloat16),
         (rand(2, 5, D, seed=14, dtype=torch.bfloat16),), dict(rms_norm=1), tol=TOL_BF16),
]


@pytest.mark.parametrize(ROWS, RMS_NORM)
def test_rms_norm(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)


# ================================================================================================ residual + norm
RESIDUAL = [
    case("mamba_layer_norm_ref_prenorm_residual", MambaLNRefPrenorm, (X3, rand(2, 5, D, seed=20)),
         dict(layer_norm=1, residual_norm=1)),
    case("mamba_block_add_norm_residual_fp32", MambaBlock, (X3, rand(2, 5, D, seed=21)),
         dict(rms_norm=1, residual_norm=1)),
    case("prenorm_dropout_p0_training", PreNormDropoutP0, (X3,), dict(layer_norm=2, residual_norm=1)),
    case("fairseq_postnorm_encoder_layer", FairseqPostNormEncoderLayer, (X3,), dict(layer_norm=2, residual_norm=2)),
    case("hf_t5_layer_ff_stacked", T5FFStack, (X3,), dict(rms_norm=2, residual_norm=1, layer_norm=0)),
    case("gemma2_sandwich_norm_block", Gemma2SandwichBlock, (X3,), dict(rms_norm=4, residual_norm=1, bias_gelu=1)),
    case("deepnorm_post_ln_alpha", DeepNormSublayer, (X3,), dict(layer_norm=1, residual_norm=1)),
    # only the norms are asserted: whether the add is fused with a stride-0 / transposed operand is open,
    # the numbers are not
    case("residual_plus_expanded_pos_embed", ExpandedPosEmbedResidual, (X3,), dict(layer_norm=1)),
    case("residual_time_major_transposed_branch", TimeMajorResidual, (rand(5, 2, D, seed=23), rand(2, 5, D, seed=24)),
         dict(layer_norm=1)),
    case("mamba_block_bf16_hidden_fp32_residual", MambaBlockMixed,
         (rand(2, 5, D, seed=25, dtype=torch.bfloat16), rand(2, 5, D, seed=26)), dict(rms_norm=1), tol=TOL_BF16),
    case("frozen_embedding_sum_under_no_grad_then_ln", FrozenSumThenNorm, (X3, rand(2, 5, D, seed=27)),
         dict(layer_norm=1, residual_norm=0)),
    case("inplace_residual_on_temporary", InplaceResidual, (X3, rand(2, 5, D, seed=22)),
         dict(layer_norm=1, residual_norm=1)),
]


@pytest.mark.parametrize(ROWS, RESIDUAL)
def test_residual_norm(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)


# ================================================================================================ bias + GELU
XG = rand(2, 5, D, seed=30)
TANH = dict(bias_gelu=dict(bias=True, approximate="tanh"))
ERF = dict(bias_gelu=dict(bias=True, approximate="none"))

GELU = [
    case("nn_gelu_tanh_positional", lambda: LinearAct(nn.GELU("tanh")), (XG,), dict(bias_gelu=1), details=TANH),
    case("hf_gelu_accurate", lambda: LinearAct(tf_act.ACT2FN["gelu_accurate"]), (XG,), dict(bias_gelu=1),
         details=TANH),
    case("hf_gelu_python_tanh", lambda: LinearAct(tf_act.ACT2FN["gelu_python_tanh"]), (XG,), dict(bias_gelu=1),
         details=TANH),
    case("x_times_special_ndtr", _gelu_of_fc(lambda h: h * torch.special.ndtr(h)), (XG,), dict(bias_gelu=1),
         details=ERF),
    case("half_x_erfc_minus_x_over_sqrt2", _gelu_of_fc(lambda h: 0.5 * h * torch.erfc(-h / math.sqrt(2.0))), (XG,),
         dict(bias_gelu=1), details=ERF),
    case("tanh_gelu_sigmoid_form", _gelu_of_fc(
        lambda h: h * torch.sigmoid(2.0 * SQ2PI * (h + 0.044715 * torch.pow(h, 3)))), (XG,), dict(bias_gelu=1),
         details=TANH),
    case("float64_linear_gelu", lambda: LinearAct(nn.GELU()).double(), (XG.double(),), dict(bias_gelu=0), tol=1e-10),
    case("gelu_bias_on_transposed_input", lambda: Fn(lambda m, x: F.gelu(x.transpose(1, 2) + m.b), b=P(D, seed=31)),
         (rand(2, D, 5, seed=32),), dict(bias_gelu=1)),
    case("gelu_column_plus_row_bias", lambda: Fn(lambda m, x: F.gelu(x.sum(-1, keepdim=True) + m.b), b=P(D, seed=33)),
         (rand(2, 5, 4, seed=34),), dict(bias_gelu=1)),
    case("frozen_linear_under_no_grad_then_gelu", FrozenLinearGelu, (XG,), dict(bias_gelu=1),
         details=dict(bias_gelu=dict(bias=False))),
    case("diffusers_geglu_chunk_gate", lambda: DiffusersGEGLU(D, D), (XG,), dict(bias_gelu=1)),
    case("gelu_fp32_upcast_type_back", _gelu_of_fc(lambda h: F.gelu(h.float()).type(h.dtype)), (XG,),
         dict(bias_gelu=1)),
]

GELU_NEGATIVE = [
    case("hf_laplace_activation", lambda: LinearAct(tf_act.ACT2FN["laplace"]), (XG,), dict(bias_gelu=0)),
    case("tanh_gelu_square_typo", _gelu_of_fc(lambda h: 0.5 * h * (1 + torch.tanh(SQ2PI * (h + 0.044715 * h ** 2)))),
         (XG,), dict(bias_gelu=0)),
    case("tanh_gelu_sqrt_2pi_typo", _gelu_of_fc(
        lambda h: 0.5 * h * (1 + torch.tanh(math.sqrt(2 * math.pi) * (h + 0.044715 * h ** 3)))), (XG,),
         dict(bias_gelu=0)),
    case("mish_x_tanh_softplus", _gelu_of_fc(lambda h: h * torch.tanh(F.softplus(h))), (XG,), dict(bias_gelu=0)),
]


@pytest.mark.parametrize(ROWS, GELU + GELU_NEGATIVE)
def test_bias_gelu(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)


# ================================================================================================ PReLU
XC = rand(2, C, 4, 3, seed=40)

PRELU = [
    case("where_slope_buffer_per_channel", lambda: Fn(lambda m, x: torch.where(x > 0, x, x * m.slope.view(1, -1, 1, 1)),
                                                      buffers=dict(slope=0.2 + 0.1 * rand(C, seed=41))),
         (XC,), dict(prelu=1)),
    case("nn_prelu_single_after_linear_3d", lambda: Fn(lambda m, x: m.act(m.fc(x)), fc=nn.Linear(D, D),
                                                       act=nn.PReLU()), (X3,), dict(prelu=1)),
    case("float64_nn_prelu", lambda: nn.PReLU(C).double(), (XC.double(),), dict(prelu=0), tol=1e-10),
    case("where_weight_index_none_ncl", lambda: Fn(lambda m, x: torch.where(x > 0, x, x.mul(m.weight[None, :, None])),
                                                   weight=P(C, base=0.25, seed=42)), (rand(2, C, 7, seed=43),),
         dict(prelu=1)),
    # ---- negatives
    case("rrelu_eval_is_fixed_leaky", lambda: Fn(lambda m, x: F.rrelu(x, 1.0 / 8, 1.0 / 3, training=False)), (XC,),
         dict(prelu=0)),
    case("elu_with_learned_alpha", lambda: Fn(lambda m, x: torch.where(
        x > 0, x, m.a.view(1, -1, 1, 1) * (torch.exp(x) - 1)), a=P(C, base=1.0, seed=44)), (XC,), dict(prelu=0)),
    case("slope_on_positive_side", lambda: Fn(lambda m, x: torch.where(x > 0, m.a.view(1, -1, 1, 1) * x, x),
                                              a=P(C, base=0.25, seed=45)), (XC,), dict(prelu=0)),
]


@pytest.mark.parametrize(ROWS, PRELU)
def test_prelu(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)


# ================================================================================================ global pooling
XP = rand(2, 3, 5, 4, seed=50)
MEAN23 = dict(global_pool=dict(kind="mean", dims=(2, 3)))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation with the squeeze written as two means."""

    def __init__(self, c=3, r=2):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, r), nn.Linear(r, c)

    def forward(self, x):
        y = x.mean(-1).mean(-1)
        y = torch.sigmoid(self.fc2(F.relu(self.fc1(y))))
        return x * y[:, :, None, None]


def masked_mean_pooling(m, token_embeddings, mask):
    """sentence-transformers mean pooling: sums weighted by the attention mask / the mask count."""
    input_mask_expanded = mask.unsqueeze(-1).expand(token_embeddings.size()).float()
    return torch.sum(token_embeddings * input_mask_expanded, 1) / torch.clamp(input_mask_expanded.sum(1), min=1e-9)


def _inplace_div_pool(m, x):
    s = x.sum(-1).sum(-1)
    s.div_(x.shape[-1] * x.shape[-2])
    return s


POOL = [
    case("sum_then_mean_then_div_W", lambda: Fn(lambda m, x: x.sum(-1).mean(-1) / x.shape[-1]), (XP,),
         dict(global_pool=1), details=MEAN23),
    case("sum_sum_div_size_slice_numel", lambda: Fn(lambda m, x: x.sum(-1).sum(-1) / x.shape[2:].numel()), (XP,),
         dict(global_pool=1), details=MEAN23),
    case("sum_sum_inplace_div_hw", lambda: Fn(_inplace_div_pool), (XP,), dict(global_pool=1), details=MEAN23),
    case("sum_sum_div_hw_minus_one_stays_sum", lambda: Fn(
        lambda m, x: x.sum(-1).sum(-1) / (x.shape[-1] * x.shape[-2] - 1)), (XP,), dict(global_pool=1),
         details=dict(global_pool=dict(kind="sum", dims=(2, 3)))),
    case("video_mean_T_H_W_no_keepdim", lambda: Fn(lambda m, x: x.mean(-1).mean(-1).mean(-1)),
         (rand(2, 3, 2, 4, 3, seed=51),), dict(global_pool=1),
         details=dict(global_pool=dict(kind="mean", dims=(2, 3, 4)))),
    case("mean_mean_on_permuted_nhwc_view", lambda: Fn(lambda m, x: x.permute(0, 3, 1, 2).mean(-1).mean(-1)),
         (rand(2, 5, 4, 3, seed=53),), dict(global_pool=1), details=MEAN23),
    case("pool_split_by_no_grad", FrozenPartialPool, (XP,), dict(global_pool=0)),
    case("squeeze_excite_mean_mean", SqueezeExcite, (XP,), dict(global_pool=1), details=MEAN23),
    # ---- negative: division by data, not by a count
    case("sentence_transformers_masked_mean", lambda: Fn(masked_mean_pooling),
         (rand(2, 5, D, seed=52), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])), dict(global_pool=0)),
]


@pytest.mark.parametrize(ROWS, POOL)
def test_global_pool(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)


# ================================================================================================ eltwise chains
def ddpm_step(m, sample, model_output, noise):
    """diffusers DDPMScheduler.step, epsilon prediction, no clipping; the schedule values as floats."""
    alpha_prod_t, alpha_prod_t_prev, beta_t = 0.64, 0.7, 0.0857
    beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
    pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    pred_original_sample_coeff = (alpha_prod_t_prev ** (0.5) * beta_t) / beta_prod_t
    current_sample_coeff = (1 - beta_t) ** (0.5) * beta_prod_t_prev / beta_prod_t
    pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample
    return pred_prev_sample + 0.1 * noise


def adam_step(m, p, exp_avg, exp_avg_sq):
    """A hand-written Adam update (bias-corrected), pow 0.5 for the root."""
    lr, b1, b2, eps, step = 1e-2, 0.9, 0.999, 1e-8, 3
    return p - lr * (exp_avg / (1 - b1 ** step)) / ((exp_avg_sq / (1 - b2 ** step)) ** 0.5 + eps)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_q(m, q, cos, sin):
    """HF apply_rotary_pos_emb for q alone."""
    return (q * cos) + (rotate_half(q) * sin)


class ConvNeXtV2GRN(nn.Module):
    """ConvNeXt-V2 GRN (channels-last): an L2 norm over H, W and a pointwise tail; no LayerNorm / RMSNorm."""

    def __init__(self, dim):
        super().__init__()
        self.gamma, self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim)), nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x):
        Gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        Nx = Gx / (Gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * Nx) + self.beta + x


ELT = [
    case("diffusers_ddpm_step_floats", lambda: Fn(ddpm_step),
         (rand(2, 3, 4, 4, seed=60), rand(2, 3, 4, 4, seed=61), rand(2, 3, 4, 4, seed=62)), dict(eltwise_chain=1)),
    case("adam_update_by_hand", lambda: Fn(adam_step),
         (rand(4, 6, seed=63), rand(4, 6, seed=64), rand(4, 6, seed=65).abs() + 0.1), dict(eltwise_chain=1)),
    case("rope_q_cos_sin_broadcast", lambda: Fn(rope_q), (rand(2, 5, 8, seed=66), rand(5, 8, seed=67),
                                                          rand(5, 8, seed=68)), dict(eltwise_chain=1)),
    case("adain_modulate_per_sample", lambda: Fn(
        lambda m, x, shift, scale: x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)),
         (X3, rand(2, D, seed=69), rand(2, D, seed=70)), dict(eltwise_chain=1)),
    case("pow_minus_three_halves_and_cube", lambda: Fn(lambda m, a, b, c: a * (b * b + 1.0) ** -1.5 - c ** 3),
         (rand(3, 7, seed=72), rand(3, 7, seed=73), rand(3, 7, seed=74)), dict(eltwise_chain=1)),
    # the chain starts after the detach: (d + y_grad) * s + x * x, 4 ops over 4 tensors
    case("lsq_grad_scale_straight_through", lambda: Fn(lsq_grad_scale), (rand(3, 7, seed=76), rand(3, 7, seed=77)),
         dict(eltwise_chain=1)),
    case("float64_chain", lambda: Fn(lambda m, a, b, c: (a * b - c) / (1.0 + b * b)),
         tuple(rand(3, 7, seed=84 + i, dtype=torch.float64) for i in range(3)), dict(eltwise_chain=0), tol=1e-10),
    case("dino_teacher_centered_under_no_grad", lambda: Fn(dino_like_centering),
         (rand(3, 7, seed=87), rand(3, 7, seed=88), rand(3, 7, seed=89)), dict(eltwise_chain=1)),
    case("bf16_chain_with_0d_fp32_param", lambda: Fn(lambda m, a, b, c: a * m.w + b * (1 - m.w) - c,
                                                     w=nn.Parameter(torch.tensor(0.3))),
         tuple(rand(4, 6, seed=75 + i, dtype=torch.bfloat16) for i in range(3)), dict(eltwise_chain=1), tol=TOL_BF16),
    case("timm_model_ema_copy_inplace", lambda: Fn(timm_ema_update), (rand(4, 6, seed=78), rand(4, 6, seed=79)),
         dict(eltwise_chain=1), grad=False),
    # the chain is exp_avg / (sqrt(v) / c + eps), read after the in-place moment updates
    case("torch_single_tensor_adam_inplace", lambda: Fn(torch_single_tensor_adam),
         (rand(4, 6, seed=80), rand(4, 6, seed=81), rand(4, 6, seed=82), rand(4, 6, seed=83).abs() + 0.1),
         dict(eltwise_chain=1), grad=False),
    case("convnextv2_grn", lambda: ConvNeXtV2GRN(C), (rand(2, 4, 3, C, seed=71),),
         dict(eltwise_chain=1, layer_norm=0, rms_norm=0)),
]


@pytest.mark.parametrize(ROWS, ELT)
def test_eltwise_chain(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)


# ================================================================================================ matmul + transpose
MM = [
    # the t() view is made under no_grad too, so reading it as strides keeps W without a gradient
    case("frozen_weight_transposed_copy_under_no_grad", FrozenTransposedWeight, (X3,), dict(matmul_transpose=1)),
    case("weight_permute_10_contiguous", lambda: Fn(lambda m, x: x @ m.W.permute(1, 0).contiguous(),
                                                    W=P(8, D, seed=80)), (X3,), dict(matmul_transpose=1)),
]


@pytest.mark.parametrize(ROWS, MM)
def test_matmul_transpose(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)


# ================================================================================================ norm negatives
NORM_NEGATIVE = [
    case("detachnorm_statistics_detached", DetachNorm, (X3,), dict(layer_norm=0, rms_norm=0)),
    case("detachnorm_statistics_under_no_grad", lambda: DetachNorm("no_grad"), (X3,), dict(layer_norm=0, rms_norm=0)),
    case("rmsnorm_mean_square_under_no_grad", NoGradRMS, (X3,), dict(rms_norm=0, layer_norm=0)),
    case("rmsnorm_mean_square_detached", DetachedRMS, (X3,), dict(rms_norm=0, layer_norm=0)),
    case("mae_norm_pix_loss_unbiased_var", lambda: Fn(mae_norm_pix_target), (X3,), dict(layer_norm=0, rms_norm=0),
         reason="unbiased"),
    case("lucidrains_chan_layernorm_dim1", lambda: LucidrainsChanLayerNorm(C), (X4,),
         dict(layer_norm=0, rms_norm=0), reason="statistics over dim 1"),
    case("lucidrains_chan_rmsnorm_F_normalize_dim1", lambda: LucidrainsChanRMSNorm(C), (X4,),
         dict(rms_norm=0, layer_norm=0)),
    case("x_transformers_scalenorm", lambda: XTransformersScaleNorm(D), (X3,), dict(rms_norm=0, layer_norm=0)),
    case("transformers_without_tears_scalenorm", lambda: ScaleNormTWT(D ** 0.5), (X3,),
         dict(rms_norm=0, layer_norm=0)),
]


@pytest.mark.parametrize(ROWS, NORM_NEGATIVE)
def test_norm_negatives(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)
