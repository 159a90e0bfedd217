"""A second, independent "hidden set" of hand-written attention spellings, as users write them in real
code (annotated transformer, HF BERT/GPT-2/BLOOM/T5, timm/Swin, lucidrains, SAGAN, torch's own MHA
internals, ...), written without looking at the spellings in test_attention_zoo.py.

Each positive asserts the exact number of `flashfuse::attention` rewrites (flashfuse.testing.assert_fused)
and outputs + gradients equal to eager (assert_close_to_eager), on fresh random inputs. Each negative
asserts that nothing was fused and that the program still computes eager's numbers. Cases flashfuse
misses today are marked xfail(strict=True) with the diagnosis in the reason.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flashfuse.testing import assert_close_to_eager, assert_fused

EAGER = {"remainder": "eager"}
B, H, N, D = 2, 4, 11, 16
E = H * D // 2  # model width for the modules with projections: 4 heads of 8


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def qkv(b=B, h=H, nq=N, nk=None, d=D, hkv=None, seed=0):
    nk = nq if nk is None else nk
    hkv = h if hkv is None else hkv
    return rand(b, h, nq, d, seed=seed), rand(b, hkv, nk, d, seed=seed + 1), rand(b, hkv, nk, d, seed=seed + 2)


def padding_keep(b=B, n=N, seed=0):
    """bool (B, N): True = real token; every row keeps at least the first few keys."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(b, n, dtype=torch.bool)
    for i in range(1, b):
        keep[i, n - int(torch.randint(1, n // 2, (1,), generator=g)):] = False
    return keep


class Fn(nn.Module):
    """A plain function as a module (assert_fused / assert_close_to_eager take either)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def check(model, *inputs, attention=1, options=EAGER):
    report = assert_fused(model, *inputs, options=options, attention=attention)
    assert_close_to_eager(model, *inputs, options=options)
    return report


# ================================================================================================
# S = Q·Kᵀ and the scale
# ================================================================================================
def s_swapaxes_torch_div(q, k, v):
    s = torch.div(torch.matmul(q, k.swapaxes(-1, -2)), math.sqrt(q.size(-1)))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def s_tensor_sqrt_scale(q, k, v):
    d = q.shape[-1]
    return F.softmax(q @ k.transpose(-2, -1) / torch.tensor(d).sqrt(), dim=-1) @ v


def s_scale_both_q_and_k(q, k, v):  # guided-diffusion QKVAttention: d**-0.25 on each side
    scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
    w = torch.einsum("bhtc,bhsc->bhts", q * scale, k * scale)
    return torch.einsum("bhts,bhsc->bhtc", w.softmax(dim=-1), v)


def s_scale_on_k_mul(q, k, v):
    k = k * q.size(-1) ** -0.5
    return (q @ k.transpose(2, 3)).softmax(3) @ v


def s_einsum_spaces_list_operands(q, k, v):  # lucidrains style, old list-of-operands API
    sim = torch.einsum("b h i d, b h j d -> b h i j", [q, k]) * q.shape[-1] ** -0.5
    return torch.einsum("b h i j, b h j d -> b h i d", [sim.softmax(dim=-1), v])


def s_einsum_ellipsis(q, k, v):
    s = torch.einsum("...id,...jd->...ij", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("...ij,...jd->...id", s.softmax(-1), v)


def s_einsum_k_first(q, k, v):  # operands written as (k, q): same scores
    s = torch.einsum("bhjd,bhid->bhij", k, q) * 0.25
    return torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v)


def s_k_from_bnhd_permute(q, k, v):  # K kept as (B, N, H, d) and permuted straight to (B, H, d, N)
    return F.softmax(q @ k.permute(0, 2, 3, 1) * 0.25, dim=-1) @ v


def s_inplace_mul_method(q, k, v):
    attn = q.matmul(k.transpose(-2, -1))
    attn.mul_(q.shape[-1] ** -0.5)
    return attn.softmax(dim=-1).matmul(v)


def s_mm_2d(q, k, v):  # one sequence, one head: torch.mm and .t()
    q, k, v = q[0, 0], k[0, 0], v[0, 0]
    return torch.mm(F.softmax(torch.mm(q, k.t()) / 4.0, dim=1), v)


def s_3d_einsum_no_head(q, k, v):
    q, k, v = q[:, 0], k[:, 0], v[:, 0]  # (B, N, d)
    return torch.einsum("bij,bjd->bid", F.softmax(torch.einsum("bid,bjd->bij", q, k) * 0.25, dim=2), v)


def s_bmm_torch_mha_internals(q, k, v):  # F.multi_head_attention_forward: (N, B*H, d) then transpose(0, 1)
    b, h, n, d = q.shape
    q, k, v = (x.permute(2, 0, 1, 3).reshape(n, b * h, d).transpose(0, 1) for x in (q, k, v))
    q_scaled = q * math.sqrt(1.0 / d)
    attn_mask = torch.zeros(b * h, n, n).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    w = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
    out = torch.bmm(F.softmax(w, dim=-1), v)
    return out.transpose(0, 1).reshape(n, b, h * d)


def s_bloom_baddbmm_alibi(q, k, v):  # BLOOM: alibi (B*H, 1, N) through baddbmm's beta/alpha
    b, h, n, d = q.shape
    slopes = torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)])
    alibi = (slopes[:, None] * torch.arange(n)[None, :]).repeat(b, 1).reshape(b * h, 1, n)
    q3, v3 = q.reshape(b * h, n, d), v.reshape(b * h, n, d)
    k3 = k.reshape(b * h, n, d).transpose(-1, -2)
    scores = alibi.baddbmm(batch1=q3, batch2=k3, beta=1.0, alpha=1 / math.sqrt(d))
    probs = F.softmax(scores.view(b, h, n, n), dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.bmm(probs.view(b * h, n, n), v3).view(b, h, n, d)


def s_baddbmm_alibi_3d(q, k, v):  # the same without the 4-D views: softmax on the (B*H, N, N) scores
    b, h, n, d = q.shape
    slopes = torch.tensor([2 ** (-8 * (i + 1) / h) for i in range(h)])
    alibi = (slopes[:, None] * torch.arange(n)[None, :]).repeat(b, 1).reshape(b * h, 1, n)
    q3, v3 = q.reshape(b * h, n, d), v.reshape(b * h, n, d)
    scores = torch.baddbmm(alibi, q3, k.reshape(b * h, n, d).transpose(1, 2), alpha=d ** -0.5)
    return torch.bmm(scores.softmax(-1), v3).view(b, h, n, d)


def s_bmm_scores_viewed_to_4d(q, k, v):  # heads folded into the batch for the bmm, unfolded for the mask
    b, h, n, d = q.shape
    s = torch.bmm(q.reshape(b * h, n, d), k.reshape(b * h, n, d).transpose(1, 2)).view(b, h, n, n)
    return F.softmax(s * d ** -0.5, dim=-1) @ v


def s_gqa_folded_into_query_length(q, k, v):  # q (B, Hkv, g*N, d): groups folded into the rows
    q = q.reshape(q.shape[0], 2, -1, q.shape[-1])
    return (q @ k.mT * 0.25).softmax(-1) @ v


def s_fp16(q, k, v):
    return F.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), dim=-1) @ v


# ================================================================================================
# masks and biases
# ================================================================================================
def m_annotated_transformer(q, k, v, mask):  # mask (B, 1, 1, N) int, `mask == 0` -> -1e9
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(mask == 0, -1e9)
    p_attn = scores.softmax(dim=-1)
    return torch.matmul(p_attn, v)


def m_bert_old_additive(q, k, v, attention_mask):  # (1.0 - m) * -10000.0 on a float (B, N) mask
    ext = attention_mask[:, None, None, :]
    ext = (1.0 - ext) * -10000.0
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.size(-1)) + ext
    return torch.matmul(nn.functional.softmax(scores, dim=-1), v)


def m_padding_not_finfo_min(q, k, v, keep):  # bool keep (B, N): ~keep -> finfo.min
    s = q @ k.mT * q.size(-1) ** -0.5
    s = s.masked_fill(~keep.unsqueeze(1).unsqueeze(2), torch.finfo(s.dtype).min)
    return s.softmax(-1) @ v


def m_padding_from_lengths(q, k, v, lengths):  # lengths (B,) int: arange < lengths
    n = k.size(-2)
    keep = torch.arange(n)[None, :] < lengths[:, None]
    s = (q @ k.mT / 4).masked_fill(~keep[:, None, None, :], float("-inf"))
    return s.softmax(-1) @ v


def m_where_tensor_minus_inf(q, k, v, keep):
    s = q @ k.mT / 4
    s = torch.where(keep[:, None, None, :], s, torch.tensor(float("-inf")))
    return torch.softmax(s, -1) @ v


def m_causal_ones_tril_bool(q, k, v):
    n = q.size(-2)
    causal = torch.ones(n, n).tril().bool()
    s = (q @ k.mT * 0.25).masked_fill(~causal, float("-inf"))
    return s.softmax(-1) @ v


def m_causal_triu_bool_diag1(q, k, v):
    n = q.size(-2)
    s = (q @ k.mT * 0.25).masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1), -float("inf"))
    return s.softmax(-1) @ v


def m_pytorch_tutorial_square_subsequent(q, k, v):  # the old nn.Transformer tutorial's mask
    sz = q.size(-2)
    mask = (torch.triu(torch.ones(sz, sz)) == 1).transpose(0, 1)
    mask = mask.float().masked_fill(mask == 0, float("-inf")).masked_fill(mask == 1, float(0.0))
    return F.softmax(q @ k.transpose(-2, -1) / 4 + mask, dim=-1) @ v


def m_lucidrains_causal_neg_finfo_max(q, k, v):
    sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * q.shape[-1] ** -0.5
    i, j = sim.shape[-2:]
    causal_mask = torch.ones((i, j), dtype=torch.bool).triu(j - i + 1)
    sim = sim.masked_fill(causal_mask, -torch.finfo(sim.dtype).max)
    return torch.einsum("b h i j, b h j d -> b h i d", sim.softmax(dim=-1), v)


def m_symmetric_local_window_abs(q, k, v):
    i = torch.arange(q.size(-2))
    far = (i[:, None] - i[None, :]).abs() > 2
    return (q @ k.mT / 4).masked_fill(far, float("-inf")).softmax(-1) @ v


def m_chunked_causal_floordiv(q, k, v):  # chunked / block-local causal attention
    i = torch.arange(q.size(-2))
    keep = (i[:, None] // 4 == i[None, :] // 4) & (i[:, None] >= i[None, :])
    return (q @ k.mT / 4).masked_fill(~keep, float("-inf")).softmax(-1) @ v


def m_bool_to_additive_in_forward(q, k, v, keep):  # SDPA-style conversion: where(mask, 0, -inf) then +
    add = torch.where(keep, 0.0, float("-inf"))[:, None, None, :]
    return F.softmax(q @ k.mT * 0.25 + add, dim=-1) @ v


def m_causal_and_padding_combined(q, k, v, keep):
    n = q.size(-2)
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    allowed = causal[None, None] & keep[:, None, None, :]
    s = (q @ k.mT * 0.25).masked_fill(allowed.logical_not(), float("-inf"))
    return s.softmax(-1) @ v


def m_full_like_where_causal(q, k, v):
    s = q @ k.mT * 0.25
    n = s.size(-1)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    s = torch.where(causal, s, torch.full_like(s, float("-inf")))
    return s.softmax(-1) @ v


def m_expanded_bool_mask(q, k, v, keep):  # padding mask expanded to the full score shape first
    m = keep[:, None, None, :].expand(-1, q.size(1), q.size(2), -1)
    return (q @ k.mT * 0.25).masked_fill(~m, float("-inf")).softmax(-1) @ v


def m_alibi_key_positions_only(q, k, v):  # MPT/BLOOM form: slope * j (softmax-invariant shift)
    h, n = q.size(1), k.size(-2)
    slopes = 1.0 / (2 ** torch.arange(1, h + 1).float())
    alibi = slopes.view(1, h, 1, 1) * torch.arange(n).view(1, 1, 1, n)
    return ((q @ k.mT) * 0.25 + alibi).softmax(-1) @ v


class SwinWindowAttention(nn.Module):
    """timm/Swin: relative position bias gathered from a learned table with a buffer index."""

    def __init__(self, ws=(3, 4), heads=H, d=D):
        super().__init__()
        self.heads, self.scale = heads, d ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * ws[0] - 1) * (2 * ws[1] - 1), heads) * 0.5)
        coords = torch.stack(torch.meshgrid(torch.arange(ws[0]), torch.arange(ws[1]), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += ws[0] - 1
        rel[:, :, 1] += ws[1] - 1
        rel[:, :, 0] *= 2 * ws[1] - 1
        self.register_buffer("relative_position_index", rel.sum(-1), persistent=False)
        self.n = ws[0] * ws[1]

    def forward(self, q, k, v):
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(self.n, self.n, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        attn = attn.softmax(dim=-1)
        return (attn @ v).transpose(1, 2).reshape(q.shape[0], self.n, -1)


class T5StyleBias(nn.Module):
    """T5: no scaling, a bias from nn.Embedding over clipped relative positions, plus a padding mask."""

    def __init__(self, heads=H, buckets=9):
        super().__init__()
        self.rel = nn.Embedding(buckets, heads)
        self.buckets = buckets

    def forward(self, q, k, v, keep):
        n = q.size(-2)
        ctx = torch.arange(n)[:, None]
        mem = torch.arange(n)[None, :]
        bucket = (mem - ctx).clamp(-(self.buckets // 2), self.buckets // 2) + self.buckets // 2
        position_bias = self.rel(bucket).permute([2, 0, 1]).unsqueeze(0)
        position_bias = position_bias + (1.0 - keep[:, None, None, :].float()) * torch.finfo(q.dtype).min
        scores = torch.matmul(q, k.transpose(3, 2)) + position_bias
        attn = nn.functional.softmax(scores.float(), dim=-1).type_as(scores)
        return torch.matmul(attn, v)


class SwinV2CosineAttention(nn.Module):
    """Swin v2: cosine attention with a learned, clamped per-head logit scale."""

    def __init__(self, heads=H):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.log(10 * torch.rand((heads, 1, 1)) + 1))

    def forward(self, q, k, v):
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        logit_scale = torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        attn = attn * logit_scale
        return attn.softmax(dim=-1) @ v


class PerHeadLearnedBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(H, 1, N) * 0.3)  # a learned per-head key bias

    def forward(self, q, k, v):
        return torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) / 4 + self.bias, dim=-1) @ v


def m_softcap_method_tanh(q, k, v):
    cap = 30.0
    s = q @ k.mT / math.sqrt(q.size(-1))
    s = cap * (s / cap).tanh()
    return s.softmax(-1) @ v


# ================================================================================================
# softmax spellings
# ================================================================================================
def p_positive_dim_3(q, k, v):
    return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.25, 3), v)


def p_softmax_fp32_dtype_kwarg_to_v_dtype(q, k, v):
    return torch.softmax(q @ k.mT * 0.25, dim=-1, dtype=torch.float32).to(v.dtype) @ v


def p_manual_softmax_max_getitem0(q, k, v):
    s = q @ k.mT * 0.25
    e = torch.exp(s - torch.max(s, dim=-1, keepdim=True)[0])
    return (e / torch.sum(e, dim=-1, keepdim=True)) @ v


def p_manual_softmax_no_max(q, k, v):
    s = q @ k.mT * 0.25
    return (torch.exp(s) / torch.exp(s).sum(-1, keepdim=True)) @ v


def p_manual_softmax_sum_unsqueeze(q, k, v):
    e = (q @ k.mT * 0.25).exp()
    return (e / e.sum(-1).unsqueeze(-1)) @ v


def p_exp_minus_logsumexp(q, k, v):
    s = q @ k.mT * 0.25
    return torch.exp(s - torch.logsumexp(s, dim=-1, keepdim=True)) @ v


def p_log_softmax_exp(q, k, v):
    return F.log_softmax(q @ k.mT * 0.25, dim=-1).exp() @ v


def p_stable_max_subtracted_then_softmax(q, k, v):  # lucidrains: sim - sim.amax(-1, keepdim).detach()
    sim = q @ k.mT * 0.25
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    return sim.softmax(dim=-1) @ v


# ================================================================================================
# modules: projections, dropout, output layouts, GQA, cross-attention
# ================================================================================================
class BertSelfAttention(nn.Module):
    """HF BERT (pre-SDPA): transpose_for_scores, additive extended mask, nn.Dropout, permute + view."""

    def __init__(self, hidden=E, heads=H, p=0.1):
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, hidden // heads
        self.all_head_size = hidden
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))
        self.dropout = nn.Dropout(p)

    def transpose_for_scores(self, x):
        new_x_shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        return x.view(new_x_shape).permute(0, 2, 1, 3)

    def forward(self, hidden_states, attention_mask):
        query_layer = self.transpose_for_scores(self.query(hidden_states))
        key_layer = self.transpose_for_scores(self.key(hidden_states))
        value_layer = self.transpose_for_scores(self.value(hidden_states))
        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2))
        attention_scores = attention_scores / math.sqrt(self.attention_head_size)
        attention_scores = attention_scores + attention_mask
        attention_probs = nn.functional.softmax(attention_scores, dim=-1)
        attention_probs = self.dropout(attention_probs)
        context_layer = torch.matmul(attention_probs, value_layer)
        context_layer = context_layer.permute(0, 2, 1, 3).contiguous()
        new_context_layer_shape = context_layer.size()[:-2] + (self.all_head_size,)
        return context_layer.view(new_context_layer_shape)


class BertWithHeadMask(BertSelfAttention):
    """The same, with HF's optional head_mask multiplied into the probabilities."""

    def forward(self, hidden_states, attention_mask, head_mask):
        q = self.transpose_for_scores(self.query(hidden_states))
        k = self.transpose_for_scores(self.key(hidden_states))
        v = self.transpose_for_scores(self.value(hidden_states))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size) + attention_mask
        probs = self.dropout(nn.functional.softmax(scores, dim=-1))
        probs = probs * head_mask
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(ctx.size()[:-2] + (self.all_head_size,))


class CausalSelfAttentionFunctionalDropout(nn.Module):
    """A GPT block with a fused qkv Linear, chunk(), F.dropout(training=self.training), permute+flatten."""

    def __init__(self, dim=E, heads=H, p=0.2):
        super().__init__()
        self.heads, self.p = heads, p
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3) for t in (q, k, v))
        att = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(k.size(-1)))
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        att = att.masked_fill(causal.logical_not(), float("-inf"))
        att = F.dropout(F.softmax(att, dim=-1), p=self.p, training=self.training)
        y = (att @ v).permute(0, 2, 1, 3).flatten(2)
        return self.out(y)


class GQAUnsqueezeExpandFlatten(nn.Module):
    """GQA by unsqueeze(2).expand(...).flatten(1, 2), with nn.Softmax held as a submodule."""

    def __init__(self, dim=E, heads=H, kv_heads=2):
        super().__init__()
        self.h, self.hkv, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.d, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.d, bias=False)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.hkv, self.d).permute(2, 0, 3, 1, 4).unbind(0)
        g = self.h // self.hkv
        k = k.unsqueeze(2).expand(-1, -1, g, -1, -1).flatten(1, 2)
        v = v.unsqueeze(2).expand(-1, -1, g, -1, -1).flatten(1, 2)
        att = self.softmax(q @ k.transpose(-2, -1) * self.d ** -0.5)
        return (att @ v).transpose(1, 2).reshape(b, n, -1)


def g_repeat_interleave_neg_dim(q, k, v):
    k = torch.repeat_interleave(k, repeats=2, dim=-3)
    v = torch.repeat_interleave(v, repeats=2, dim=-3)
    return F.softmax(q @ k.mT * 0.25, dim=-1) @ v


def g_repeat_tiles_heads(q, k, v):  # .repeat(1, g, 1, 1): head h reads kv head h % Hkv (not interleaved)
    k, v = k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1)
    return F.softmax(q @ k.mT * 0.25, dim=-1) @ v


def g_gqa_5d_broadcast(q, k, v):  # q viewed as (B, Hkv, g, N, d), K/V broadcast over the group dim
    b, h, n, d = q.shape
    qg = q.view(b, k.size(1), h // k.size(1), n, d)
    s = qg @ k[:, :, None].transpose(-2, -1) * 0.25
    return (s.softmax(-1) @ v[:, :, None]).view(b, h, n, d)


class CrossAttentionPadded(nn.Module):
    """Decoder cross-attention: Nq != Nk, separate q and kv projections, a key padding mask."""

    def __init__(self, dim=E, ctx_dim=12, heads=H):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(ctx_dim, 2 * dim, bias=False)

    def forward(self, x, context, context_keep):
        b, nq, _ = x.shape
        q = self.to_q(x).view(b, nq, self.h, self.d).transpose(1, 2)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k = k.view(b, -1, self.h, self.d).transpose(1, 2)
        v = v.view(b, -1, self.h, self.d).transpose(1, 2)
        sim = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(self.d)
        sim = sim.masked_fill(~context_keep[:, None, None, :], float("-inf"))
        out = torch.einsum("bhij,bhjd->bhid", sim.softmax(dim=-1), v)
        return out.transpose(1, 2).reshape(b, nq, -1)


class SAGANSelfAttention(nn.Module):
    """SAGAN / BigGAN: 1x1 convs, bmm, and the output as V @ Pᵀ (probabilities on the right)."""

    def __init__(self, c=16):
        super().__init__()
        self.query_conv = nn.Conv2d(c, c // 8, 1)
        self.key_conv = nn.Conv2d(c, c // 8, 1)
        self.value_conv = nn.Conv2d(c, c, 1)
        self.gamma = nn.Parameter(torch.tensor(0.5))
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        b, c, w, h = x.size()
        proj_query = self.query_conv(x).view(b, -1, w * h).permute(0, 2, 1)
        proj_key = self.key_conv(x).view(b, -1, w * h)
        energy = torch.bmm(proj_query, proj_key)
        attention = self.softmax(energy)
        proj_value = self.value_conv(x).view(b, -1, w * h)
        out = torch.bmm(proj_value, attention.permute(0, 2, 1))
        return self.gamma * out.view(b, c, w, h) + x


class NonLocalBlock(nn.Module):
    """Non-local neural networks (embedded Gaussian): theta/phi/g convs, matmul, softmax, matmul."""

    def __init__(self, c=16, inter=8):
        super().__init__()
        self.inter = inter
        self.g, self.theta, self.phi = (nn.Conv2d(c, inter, 1) for _ in range(3))
        self.W = nn.Conv2d(inter, c, 1)

    def forward(self, x):
        b = x.size(0)
        g_x = self.g(x).view(b, self.inter, -1).permute(0, 2, 1)
        theta_x = self.theta(x).view(b, self.inter, -1).permute(0, 2, 1)
        phi_x = self.phi(x).view(b, self.inter, -1)
        f = torch.matmul(theta_x, phi_x)
        f_div_C = F.softmax(f, dim=-1)
        y = torch.matmul(f_div_C, g_x).permute(0, 2, 1).contiguous()
        y = y.view(b, self.inter, *x.size()[2:])
        return self.W(y) + x


# ================================================================================================
# the table of positives
# ================================================================================================
def _keep():
    return padding_keep(seed=3)


POSITIVE = {
    # scores and scale
    "swapaxes_torch_div": lambda: (Fn(s_swapaxes_torch_div), qkv(seed=10)),
    "tensor_sqrt_scale": lambda: (Fn(s_tensor_sqrt_scale), qkv(seed=11)),
    "scale_both_q_and_k": lambda: (Fn(s_scale_both_q_and_k), qkv(seed=12)),
    "scale_on_k_mul": lambda: (Fn(s_scale_on_k_mul), qkv(seed=13)),
    "einsum_spaces_list_operands": lambda: (Fn(s_einsum_spaces_list_operands), qkv(seed=14)),
    "einsum_ellipsis": lambda: (Fn(s_einsum_ellipsis), qkv(seed=15)),
    "einsum_k_first": lambda: (Fn(s_einsum_k_first), qkv(seed=16)),
    "k_from_bnhd_permute": lambda: (Fn(s_k_from_bnhd_permute),
                                    (rand(B, H, N, D, seed=17), rand(B, N, H, D, seed=18), rand(B, H, N, D, seed=19))),
    "inplace_mul_method": lambda: (Fn(s_inplace_mul_method), qkv(seed=20)),
    "mm_2d": lambda: (Fn(s_mm_2d), qkv(seed=21)),
    "3d_einsum_no_head": lambda: (Fn(s_3d_einsum_no_head), qkv(seed=22)),
    "bmm_torch_mha_internals_baddbmm_mask": lambda: (Fn(s_bmm_torch_mha_internals), qkv(seed=23)),
    "bloom_baddbmm_alibi": lambda: (Fn(s_bloom_baddbmm_alibi), qkv(seed=24)),
    "baddbmm_alibi_3d": lambda: (Fn(s_baddbmm_alibi_3d), qkv(seed=27)),
    "bmm_scores_viewed_to_4d": lambda: (Fn(s_bmm_scores_viewed_to_4d), qkv(seed=28)),
    "gqa_folded_into_query_length": lambda: (Fn(s_gqa_folded_into_query_length), qkv(hkv=2, seed=25)),
    "fp16_inputs": lambda: (Fn(s_fp16), tuple(t.half() for t in qkv(seed=26))),
    # masks and biases
    "annotated_transformer_mask_eq_0": lambda: (Fn(m_annotated_transformer),
                                                (*qkv(seed=30), _keep().long()[:, None, None, :])),
    "bert_old_additive_minus_10000": lambda: (Fn(m_bert_old_additive), (*qkv(seed=31), _keep().float())),
    "padding_not_finfo_min": lambda: (Fn(m_padding_not_finfo_min), (*qkv(seed=32), _keep())),
    "padding_from_lengths": lambda: (Fn(m_padding_from_lengths), (*qkv(seed=33), torch.tensor([N, 6]))),
    "where_tensor_minus_inf": lambda: (Fn(m_where_tensor_minus_inf), (*qkv(seed=34), _keep())),
    "causal_ones_tril_bool": lambda: (Fn(m_causal_ones_tril_bool), qkv(seed=35)),
    "causal_triu_bool_diag1": lambda: (Fn(m_causal_triu_bool_diag1), qkv(seed=36)),
    "pytorch_tutorial_square_subsequent_mask": lambda: (Fn(m_pytorch_tutorial_square_subsequent), qkv(seed=37)),
    "lucidrains_causal_neg_finfo_max": lambda: (Fn(m_lucidrains_causal_neg_finfo_max), qkv(seed=38)),
    "symmetric_local_window_abs": lambda: (Fn(m_symmetric_local_window_abs), qkv(seed=39)),
    "chunked_causal_floordiv": lambda: (Fn(m_chunked_causal_floordiv), qkv(seed=29)),
    "bool_to_additive_in_forward": lambda: (Fn(m_bool_to_additive_in_forward), (*qkv(seed=40), _keep())),
    "causal_and_padding_combined": lambda: (Fn(m_causal_and_padding_combined), (*qkv(seed=41), _keep())),
    "full_like_where_causal": lambda: (Fn(m_full_like_where_causal), qkv(seed=42)),
    "expanded_bool_mask": lambda: (Fn(m_expanded_bool_mask), (*qkv(seed=43), _keep())),
    "alibi_key_positions_only": lambda: (Fn(m_alibi_key_positions_only), qkv(seed=44)),
    "swin_relative_position_bias": lambda: (SwinWindowAttention(), qkv(nq=12, seed=45)),
    "t5_embedding_bias_and_padding": lambda: (T5StyleBias(), (*qkv(seed=46), _keep())),
    "swinv2_cosine_logit_scale": lambda: (SwinV2CosineAttention(), qkv(seed=47)),
    "per_head_learned_key_bias": lambda: (PerHeadLearnedBias(), qkv(seed=48)),
    "softcap_method_tanh": lambda: (Fn(m_softcap_method_tanh), qkv(seed=49)),
    # softmax spellings
    "softmax_positive_dim_3": lambda: (Fn(p_positive_dim_3), qkv(seed=50)),
    "softmax_fp32_dtype_kwarg_to_v_dtype": lambda: (Fn(p_softmax_fp32_dtype_kwarg_to_v_dtype), qkv(seed=51)),
    "manual_softmax_max_getitem0": lambda: (Fn(p_manual_softmax_max_getitem0), qkv(seed=52)),
    "manual_softmax_no_max": lambda: (Fn(p_manual_softmax_no_max), qkv(seed=53)),
    "manual_softmax_sum_unsqueeze": lambda: (Fn(p_manual_softmax_sum_unsqueeze), qkv(seed=54)),
    "exp_minus_logsumexp": lambda: (Fn(p_exp_minus_logsumexp), qkv(seed=55)),
    "log_softmax_exp": lambda: (Fn(p_log_softmax_exp), qkv(seed=56)),
    "stable_max_subtracted_then_softmax": lambda: (Fn(p_stable_max_subtracted_then_softmax), qkv(seed=57)),
    # modules
    "bert_self_attention_dropout_train": lambda: (BertSelfAttention().train(),
                                                  (rand(B, N, E, seed=60),
                                                   ((1.0 - _keep().float()) * -10000.0)[:, None, None, :])),
    "bert_head_mask": lambda: (BertWithHeadMask().eval(),
                               (rand(B, N, E, seed=61), ((1.0 - _keep().float()) * -10000.0)[:, None, None, :],
                                (torch.rand(1, H, 1, 1, generator=torch.Generator().manual_seed(5)) + 0.5))),
    "gpt_functional_dropout_permute_flatten": lambda: (CausalSelfAttentionFunctionalDropout().eval(),
                                                       (rand(B, N, E, seed=62),)),
    "gqa_unsqueeze_expand_flatten_nn_softmax": lambda: (GQAUnsqueezeExpandFlatten(), (rand(B, N, E, seed=63),)),
    "gqa_repeat_interleave_neg_dim": lambda: (Fn(g_repeat_interleave_neg_dim), qkv(hkv=2, seed=64)),
    "gqa_repeat_tiles_heads": lambda: (Fn(g_repeat_tiles_heads), qkv(hkv=2, seed=65)),
    "gqa_5d_broadcast": lambda: (Fn(g_gqa_5d_broadcast), qkv(hkv=2, seed=66)),
    "cross_attention_padded_nq_ne_nk": lambda: (CrossAttentionPadded(),
                                                (rand(B, 5, E, seed=67), rand(B, 13, 12, seed=68),
                                                 padding_keep(n=13, seed=4))),
    "sagan_v_times_p_transposed": lambda: (SAGANSelfAttention(), (rand(B, 16, 3, 4, seed=69),)),
    "non_local_block": lambda: (NonLocalBlock(), (rand(B, 16, 3, 4, seed=70),)),
    # NEGATIVE's gate_after_softmax with a per-query gate (B, 1, N, 1): a row scale of the output, fused exactly
    "query_gate_after_softmax": lambda: (Fn(n_gate_after_softmax), (*qkv(seed=90), rand(B, 1, N, 1, seed=91))),
}

XFAIL: dict[str, str] = {
}


def _params(cases, xfails):
    for name in cases:
        marks = [pytest.mark.xfail(reason=xfails[name], strict=True)] if name in xfails else []
        yield pytest.param(name, id=name, marks=marks)


@pytest.mark.parametrize("name", list(_params(POSITIVE, XFAIL)))
def test_attention_spelling(name):
    torch.manual_seed(0)
    model, inputs = POSITIVE[name]()
    check(model, *inputs, attention=1)


# ================================================================================================
# negatives: not attention (or not fusable), left alone, eager's numbers
# ================================================================================================
def n_softmax_over_heads(q, k, v):
    return F.softmax(q @ k.mT * 0.25, dim=1) @ v


def n_bias_added_after_softmax(q, k, v, bias):
    return ((q @ k.mT * 0.25).softmax(-1) + bias) @ v


def n_gate_after_softmax(q, k, v, gate):
    return ((q @ k.mT * 0.25).softmax(-1) * gate.sigmoid()) @ v


def n_scores_also_returned(q, k, v):  # attention logits kept for an auxiliary loss
    s = q @ k.mT * 0.25
    return s.softmax(-1) @ v, s


def n_threshold_from_score_statistics(q, k, v):  # sparse attention: drop keys below the row mean
    s = q @ k.mT * 0.25
    s = s.masked_fill(s < s.mean(-1, keepdim=True), float("-inf"))
    return s.softmax(-1) @ v


def n_talking_heads(q, k, v, mix):  # heads mixed before the softmax: not elementwise
    s = torch.einsum("bhij,hg->bgij", q @ k.mT * 0.25, mix)
    return s.softmax(-1) @ v


class AnnotatedTransformerStoresAttn(nn.Module):
    """The annotated transformer keeps `self.attn = p_attn` and returns it: the probabilities escape."""

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        p_attn = scores.softmax(dim=-1)
        return torch.matmul(p_attn, v), p_attn


NEGATIVE = {
    "softmax_over_heads": lambda: (Fn(n_softmax_over_heads), qkv(seed=80)),
    "bias_added_after_softmax": lambda: (Fn(n_bias_added_after_softmax), (*qkv(seed=81), rand(1, 1, N, N, seed=82))),
    # a gate along the keys (B, 1, 1, N) reweights them after the normalisation: not a softmax attention.
    # (Its per-query form (B, 1, N, 1) is a row scale of the output, fused exactly: POSITIVE below.)
    "gate_after_softmax": lambda: (Fn(n_gate_after_softmax), (*qkv(seed=83), rand(B, 1, 1, N, seed=84))),
    "scores_also_returned": lambda: (Fn(n_scores_also_returned), qkv(seed=85)),
    "threshold_from_score_statistics": lambda: (Fn(n_threshold_from_score_statistics), qkv(seed=86)),
    "talking_heads": lambda: (Fn(n_talking_heads), (*qkv(seed=87), rand(H, H, seed=88))),
    "annotated_transformer_returns_p_attn": lambda: (AnnotatedTransformerStoresAttn(), qkv(seed=89)),
}

NEG_XFAIL: dict[str, str] = {
}


@pytest.mark.parametrize("name", list(_params(NEGATIVE, NEG_XFAIL)))
def test_not_attention_left_alone(name):
    torch.manual_seed(0)
    model, inputs = NEGATIVE[name]()
    check(model, *inputs, attention=0)
