"""A fourth, independent probe of hand-written attention spellings, taken from real code bases
(diffusers, llama2.c, Meta llama, HF RoPE, fairseq, Megatron, x-transformers, timm ViT/CaiT, Perceiver,
DETR via nn.MultiheadAttention, Whisper, audiocraft/MusicGen, MPT, DeBERTa, ESPnet/Conformer, Restormer,
PaLM, xformers' reference implementation, GPT-J, ...), written without looking at flashfuse's attention pass.

Each positive compiles the case with `flashfuse.backend(remainder="eager")`, asserts the number of fused
`flashfuse::attention` ops, and compares the outputs and the input/parameter gradients (random upstream
gradient) with eager (relative L2 error < 1e-4). Each negative (not softmax attention, or the scores /
probabilities escape) must fuse nothing and give eager's numbers. Cases that fail today are marked
xfail(strict=True) with the near-miss text or the measured mismatch.
"""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

import flashfuse
from flashfuse.report import Report, _active

B, H, N, D = 2, 4, 12, 16
E = H * D  # model width for modules with projections
TOL = 1e-4


# ================================================================================================
# harness
# ================================================================================================
def rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def qkv(seed, b=B, h=H, nq=N, nk=None, d=D, hkv=None):
    nk = nq if nk is None else nk
    hkv = h if hkv is None else hkv
    return rand(b, h, nq, d, seed=seed), rand(b, hkv, nk, d, seed=seed + 1), rand(b, hkv, nk, d, seed=seed + 2)


def keep_from_lengths(lengths, n):
    """bool (B, n), True = a real token."""
    return torch.arange(n)[None, :] < torch.as_tensor(lengths)[:, None]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error over the finite entries; non-finite entries (a returned -inf mask) must match."""
    a, b = a.detach().double(), b.detach().double()
    finite = torch.isfinite(b)
    if not torch.equal(finite, torch.isfinite(a)) or not torch.equal(a[~finite], b[~finite]):
        return math.inf
    a, b = a[finite], b[finite]
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def grad_close(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    """rel err < TOL, or an absolute L2 difference < 1e-5 where eager's gradient is zero in exact arithmetic
    (e.g. a LayerNorm bias on the keys: adding one vector to every key shifts each score row by a
    constant, which the softmax cancels; eager's gradient there is rounding noise of norm ~1e-7)."""
    err = rel_err(a, b)
    return err < TOL or (a.double() - b.double()).norm().item() < 1e-5, err


def _leaf(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().clone()
        if x.is_floating_point():
            x.requires_grad_(True)
    return x


def _float_tensors(out):
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def run_case(model, inputs, expected):
    torch._dynamo.reset()
    if isinstance(model, nn.Module):
        ref_model, test_model = model, copy.deepcopy(model)
    else:
        ref_model = test_model = model
    ref_in = [_leaf(x) for x in inputs]
    test_in = [_leaf(x) for x in inputs]

    compiled = torch.compile(test_model, backend=flashfuse.backend(remainder="eager"))
    report = Report()
    _active.append(report)
    try:
        out = compiled(*test_in)
    finally:
        _active.pop()
    ref = ref_model(*ref_in)
    text = str(report)

    got = report.count("attention")
    assert got == expected, f"fused {got} attention(s), expected {expected}\n{text}"

    outs, refs = _float_tensors(out), _float_tensors(ref)
    assert len(outs) == len(refs)
    for i, (o, r) in enumerate(zip(outs, refs)):
        err = rel_err(o, r)
        assert err < TOL, f"output {i}: rel err {err:.3g}\n{text}"

    pairs = [(o, r) for o, r in zip(outs, refs) if r.requires_grad]
    if pairs:
        gs = [rand(*r.shape, seed=1234 + i).to(r.dtype) for i, (_, r) in enumerate(pairs)]
        torch.autograd.backward([r for _, r in pairs], gs)
        torch.autograd.backward([o for o, _ in pairs], gs)
        for i, (a, b) in enumerate(zip(test_in, ref_in)):
            if isinstance(b, torch.Tensor) and b.grad is not None:
                assert a.grad is not None, f"input {i}: no gradient\n{text}"
                ok, err = grad_close(a.grad, b.grad)
                assert ok, f"input {i} grad: rel err {err:.3g}\n{text}"
        if isinstance(model, nn.Module):
            for (name, pa), (_, pb) in zip(test_model.named_parameters(), ref_model.named_parameters()):
                if pb.grad is not None:
                    assert pa.grad is not None, f"param {name}: no gradient\n{text}"
                    ok, err = grad_close(pa.grad, pb.grad)
                    assert ok, f"param {name} grad: rel err {err:.3g}\n{text}"
    return report


# ================================================================================================
# diffusers CrossAttention / Attention + AttnProcessor (baddbmm, head_to_batch_dim)
# ================================================================================================
class DiffusersAttention(nn.Module):
    def __init__(self, query_dim=E, cross_attention_dim=None, heads=H, dim_head=D,
                 upcast_attention=False, upcast_softmax=False):
        super().__init__()
        inner_dim = heads * dim_head
        cross_attention_dim = cross_attention_dim or query_dim
        self.heads, self.scale = heads, dim_head ** -0.5
        self.upcast_attention, self.upcast_softmax = upcast_attention, upcast_softmax
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim), nn.Dropout(0.1)])

    def head_to_batch_dim(self, tensor, out_dim=3):
        head_size = self.heads
        batch_size, seq_len, dim = tensor.shape
        tensor = tensor.reshape(batch_size, seq_len, head_size, dim // head_size)
        tensor = tensor.permute(0, 2, 1, 3)
        if out_dim == 3:
            tensor = tensor.reshape(batch_size * head_size, seq_len, dim // head_size)
        return tensor

    def batch_to_head_dim(self, tensor):
        head_size = self.heads
        batch_size, seq_len, dim = tensor.shape
        tensor = tensor.reshape(batch_size // head_size, head_size, seq_len, dim)
        return tensor.permute(0, 2, 1, 3).reshape(batch_size // head_size, seq_len, dim * head_size)

    def prepare_attention_mask(self, attention_mask, target_length, batch_size):
        return attention_mask.repeat_interleave(self.heads, dim=0)

    def get_attention_scores(self, query, key, attention_mask=None):
        dtype = query.dtype
        if self.upcast_attention:
            query = query.float()
            key = key.float()
        if attention_mask is None:
            baddbmm_input = torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype,
                                        device=query.device)
            beta = 0
        else:
            baddbmm_input = attention_mask
            beta = 1
        attention_scores = torch.baddbmm(baddbmm_input, query, key.transpose(-1, -2), beta=beta, alpha=self.scale)
        del baddbmm_input
        if self.upcast_softmax:
            attention_scores = attention_scores.float()
        attention_probs = attention_scores.softmax(dim=-1)
        del attention_scores
        return attention_probs.to(dtype)

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None):
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = self.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        query = self.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        key = self.to_k(encoder_hidden_states)
        value = self.to_v(encoder_hidden_states)
        query = self.head_to_batch_dim(query)
        key = self.head_to_batch_dim(key)
        value = self.head_to_batch_dim(value)
        attention_probs = self.get_attention_scores(query, key, attention_mask)
        hidden_states = torch.bmm(attention_probs, value)
        hidden_states = self.batch_to_head_dim(hidden_states)
        hidden_states = self.to_out[0](hidden_states)
        return self.to_out[1](hidden_states)


class DiffusersCrossWithMask(DiffusersAttention):
    """Cross-attention to text tokens with the UNet's (1 - mask) * -10000 additive mask, unsqueeze(1)."""

    def __init__(self):
        super().__init__(cross_attention_dim=24, upcast_attention=True, upcast_softmax=True)

    def forward(self, hidden_states, encoder_hidden_states, encoder_attention_mask):
        mask = (1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0
        mask = mask.unsqueeze(1)
        return super().forward(hidden_states, encoder_hidden_states, mask)


# ================================================================================================
# llama2.c (real-valued RoPE, repeat_kv in (B, N, H, d), full(-inf).triu(1) buffer, softmax(.float()))
# ================================================================================================
def l2c_precompute_freqs_cis(dim, end, theta=10000.0):
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device)
    freqs = torch.outer(t, freqs).float()
    return torch.cos(freqs), torch.sin(freqs)


def l2c_reshape_for_broadcast(freqs_cis, x):
    ndim = x.ndim
    shape = [d if i == 1 or i == ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(shape)


def l2c_apply_rotary_emb(xq, xk, freqs_cos, freqs_sin):
    xq_r, xq_i = xq.float().reshape(xq.shape[:-1] + (-1, 2)).unbind(-1)
    xk_r, xk_i = xk.float().reshape(xk.shape[:-1] + (-1, 2)).unbind(-1)
    freqs_cos = l2c_reshape_for_broadcast(freqs_cos, xq_r)
    freqs_sin = l2c_reshape_for_broadcast(freqs_sin, xq_r)
    xq_out_r = xq_r * freqs_cos - xq_i * freqs_sin
    xq_out_i = xq_r * freqs_sin + xq_i * freqs_cos
    xk_out_r = xk_r * freqs_cos - xk_i * freqs_sin
    xk_out_i = xk_r * freqs_sin + xk_i * freqs_cos
    xq_out = torch.stack([xq_out_r, xq_out_i], dim=-1).flatten(3)
    xk_out = torch.stack([xk_out_r, xk_out_i], dim=-1).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def l2c_repeat_kv(x, n_rep):
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (x[:, :, :, None, :].expand(bs, slen, n_kv_heads, n_rep, head_dim)
            .reshape(bs, slen, n_kv_heads * n_rep, head_dim))


class Llama2cAttention(nn.Module):
    def __init__(self, dim=E, n_heads=H, n_kv_heads=2, max_seq_len=32):
        super().__init__()
        self.n_local_heads, self.n_local_kv_heads = n_heads, n_kv_heads
        self.n_rep = n_heads // n_kv_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.attn_dropout = nn.Dropout(0.1)
        mask = torch.full((1, 1, max_seq_len, max_seq_len), float("-inf"))
        mask = torch.triu(mask, diagonal=1)
        self.register_buffer("mask", mask)
        cos, sin = l2c_precompute_freqs_cis(self.head_dim, max_seq_len)
        self.register_buffer("freqs_cos", cos, persistent=False)
        self.register_buffer("freqs_sin", sin, persistent=False)

    def forward(self, x):
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        xq = xq.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq, xk = l2c_apply_rotary_emb(xq, xk, self.freqs_cos[:seqlen], self.freqs_sin[:seqlen])
        xk = l2c_repeat_kv(xk, self.n_rep)
        xv = l2c_repeat_kv(xv, self.n_rep)
        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)
        scores = torch.matmul(xq, xk.transpose(2, 3)) / math.sqrt(self.head_dim)
        scores = scores + self.mask[:, :, :seqlen, :seqlen]
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        scores = self.attn_dropout(scores)
        output = torch.matmul(scores, xv)
        output = output.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.wo(output)


# ================================================================================================
# Meta llama (complex RoPE through view_as_complex / torch.polar)
# ================================================================================================
class MetaLlamaComplexRope(nn.Module):
    def __init__(self, head_dim=D, max_seq_len=32):
        super().__init__()
        freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2)[: (head_dim // 2)].float() / head_dim))
        freqs = torch.outer(torch.arange(max_seq_len).float(), freqs)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(freqs), freqs), persistent=False)

    def forward(self, xq, xk, xv):  # (B, N, H, d), as llama's Attention.forward holds them
        seqlen = xq.shape[1]
        freqs_cis = self.freqs_cis[:seqlen]
        xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
        xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
        freqs_cis = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
        xq = torch.view_as_real(xq_ * freqs_cis).flatten(3).type_as(xq)
        xk = torch.view_as_real(xk_ * freqs_cis).flatten(3).type_as(xk)
        xq, keys, values = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(xq.shape[-1])
        mask = torch.full((seqlen, seqlen), float("-inf"))
        mask = torch.triu(mask, diagonal=1)
        scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        output = torch.matmul(scores, values)
        return output.transpose(1, 2).contiguous().view(xq.shape[0], seqlen, -1)


# ================================================================================================
# HF rotate_half RoPE + finfo.min causal mask from full().triu(1)
# ================================================================================================
def hf_rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def s_hf_rotate_half_rope(q, k, v):
    n, d = q.size(-2), q.size(-1)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = torch.arange(n).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]
    q = (q * cos) + (hf_rotate_half(q) * sin)
    k = (k * cos) + (hf_rotate_half(k) * sin)
    attn_weights = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(d)
    causal_mask = torch.full((n, n), fill_value=torch.finfo(q.dtype).min).triu(1)
    attn_weights = attn_weights + causal_mask[None, None, :, :]
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(attn_weights, v)


# ================================================================================================
# fairseq MultiheadAttention: (T, B, C), q *= scaling, bmm, key padding via a 4-D view, float softmax
# ================================================================================================
class FairseqMHA(nn.Module):
    def __init__(self, embed_dim=E, num_heads=H, dropout=0.1):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.scaling = self.head_dim ** -0.5
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.dropout_module = nn.Dropout(dropout)

    def forward(self, query, key, value, key_padding_mask):
        tgt_len, bsz, embed_dim = query.size()
        src_len = key.size(0)
        q = self.q_proj(query)
        k = self.k_proj(key)
        v = self.v_proj(value)
        q *= self.scaling
        q = q.contiguous().view(tgt_len, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        k = k.contiguous().view(-1, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        v = v.contiguous().view(-1, bsz * self.num_heads, self.head_dim).transpose(0, 1)
        attn_weights = torch.bmm(q, k.transpose(1, 2))
        attn_weights = attn_weights.view(bsz, self.num_heads, tgt_len, src_len)
        attn_weights = attn_weights.masked_fill(
            key_padding_mask.unsqueeze(1).unsqueeze(2).to(torch.bool), float("-inf"))
        attn_weights = attn_weights.view(bsz * self.num_heads, tgt_len, src_len)
        attn_weights_float = F.softmax(attn_weights, dim=-1, dtype=torch.float32)
        attn_weights = attn_weights_float.type_as(attn_weights)
        attn_probs = self.dropout_module(attn_weights)
        attn = torch.bmm(attn_probs, v)
        attn = attn.transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
        return self.out_proj(attn)


# ================================================================================================
# Megatron CoreAttention: [s, b, np, hn], baddbmm(empty, beta=0), query-key layer scaling, masked_fill_
# ================================================================================================
class MegatronCoreAttention(nn.Module):
    def __init__(self, heads=H, hn=D, layer_number=3):
        super().__init__()
        self.hidden_size_per_partition = heads * hn
        self.coeff = layer_number  # apply_query_key_layer_scaling
        self.norm_factor = math.sqrt(hn) * self.coeff
        self.attention_dropout = nn.Dropout(0.1)

    def forward(self, query_layer, key_layer, value_layer):
        # [b, np, sq, sk]
        output_size = (query_layer.size(1), query_layer.size(2), query_layer.size(0), key_layer.size(0))
        query_layer = query_layer.reshape(output_size[2], output_size[0] * output_size[1], -1)
        key_layer = key_layer.view(output_size[3], output_size[0] * output_size[1], -1)
        matmul_input_buffer = torch.empty(output_size[0] * output_size[1], output_size[2], output_size[3],
                                          dtype=query_layer.dtype, device=query_layer.device)
        matmul_result = torch.baddbmm(matmul_input_buffer, query_layer.transpose(0, 1),
                                      key_layer.transpose(0, 1).transpose(1, 2),
                                      beta=0.0, alpha=(1.0 / self.norm_factor))
        attention_scores = matmul_result.view(*output_size)
        # FusedScaleMaskSoftmax, torch fallback (softmax_in_fp32, scale = coeff)
        sq = attention_scores.size(2)
        attention_mask = torch.tril(torch.ones((1, sq, sq), device=attention_scores.device)).view(1, 1, sq, sq)
        attention_mask = attention_mask < 0.5
        inp = attention_scores.float()
        inp = inp * self.coeff
        mask_output = inp.masked_fill_(attention_mask, -10000.0)
        probs = torch.nn.Softmax(dim=-1)(mask_output)
        attention_probs = self.attention_dropout(probs)
        output_size = (value_layer.size(1), value_layer.size(2), query_layer.size(0), value_layer.size(3))
        value_layer = value_layer.view(value_layer.size(0), output_size[0] * output_size[1], -1)
        attention_probs = attention_probs.view(output_size[0] * output_size[1], output_size[2], -1)
        context_layer = torch.bmm(attention_probs, value_layer.transpose(0, 1))
        context_layer = context_layer.view(*output_size)
        context_layer = context_layer.permute(2, 0, 1, 3).contiguous()
        new_context_layer_shape = context_layer.size()[:-2] + (self.hidden_size_per_partition,)
        return context_layer.view(*new_context_layer_shape)


# ================================================================================================
# x-transformers: partial(F.softmax, dtype=float32), masked_fill_ in place, attn.type(dtype)
# ================================================================================================
class XTransformersAttention(nn.Module):
    def __init__(self, dim=E, heads=H, dim_head=D):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.attn_fn = functools.partial(F.softmax, dtype=torch.float32)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x, mask):
        b, n, _ = x.shape
        h = self.heads
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        q, k, v = map(lambda t: t.reshape(b, n, h, -1).transpose(1, 2), (q, k, v))
        dots = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.scale
        mask_value = -torch.finfo(dots.dtype).max
        input_mask = mask[:, None, None, :]
        dots.masked_fill_(~input_mask, mask_value)
        i, j = dots.shape[-2:]
        causal_mask = torch.ones((i, j), dtype=torch.bool).triu(j - i + 1)
        dots.masked_fill_(causal_mask, mask_value)
        dtype = dots.dtype
        attn = self.attn_fn(dots, dim=-1)
        attn = attn.type(dtype)
        attn = self.dropout(attn)
        out = torch.einsum("b h i j, b h j d -> b h i d", attn, v)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


# ================================================================================================
# timm ViT with qk_norm (LayerNorm per head), fused qkv, unbind
# ================================================================================================
class TimmAttentionQKNorm(nn.Module):
    def __init__(self, dim=E, num_heads=H):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim)
        self.k_norm = nn.LayerNorm(self.head_dim)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        with torch.no_grad():
            for ln in (self.q_norm, self.k_norm):
                ln.weight.add_(rand(self.head_dim, seed=7) * 0.2)
                ln.bias.add_(rand(self.head_dim, seed=8) * 0.2)

    def forward(self, x):
        B_, N_, C = x.shape
        qkv = self.qkv(x).reshape(B_, N_, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v
        x = x.transpose(1, 2).reshape(B_, N_, C)
        return self.proj(x)


# ================================================================================================
# timm CaiT class attention: one query (the CLS token)
# ================================================================================================
class CaiTClassAttn(nn.Module):
    def __init__(self, dim=E, num_heads=H):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B_, N_, C = x.shape
        q = self.q(x[:, 0]).unsqueeze(1).reshape(B_, 1, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        k = self.k(x).reshape(B_, N_, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        q = q * self.scale
        v = self.v(x).reshape(B_, N_, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x_cls = (attn @ v).transpose(1, 2).reshape(B_, 1, C)
        return self.proj(x_cls)


# ================================================================================================
# Perceiver (lucidrains): learned latent queries, heads folded into the batch, mask repeated per head
# ================================================================================================
class PerceiverCrossAttention(nn.Module):
    def __init__(self, num_latents=7, latent_dim=E, input_dim=24, heads=H, dim_head=D):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.latents = nn.Parameter(rand(num_latents, latent_dim, seed=9))
        self.to_q = nn.Linear(latent_dim, inner, bias=False)
        self.to_kv = nn.Linear(input_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, latent_dim)

    def forward(self, data, mask):
        b = data.shape[0]
        h = self.heads
        x = self.latents.unsqueeze(0).expand(b, -1, -1)           # repeat(latents, 'n d -> b n d')
        q = self.to_q(x)
        k, v = self.to_kv(data).chunk(2, dim=-1)
        q, k, v = map(lambda t: t.reshape(b, t.shape[1], h, -1).permute(0, 2, 1, 3)
                      .reshape(b * h, t.shape[1], -1), (q, k, v))   # 'b n (h d) -> (b h) n d'
        sim = torch.einsum("b i d, b j d -> b i j", q, k) * self.scale
        mask = mask.reshape(b, -1)
        max_neg_value = -torch.finfo(sim.dtype).max
        mask = mask[:, None, None, :].expand(b, h, 1, mask.shape[-1]).reshape(b * h, 1, -1)  # 'b j -> (b h) () j'
        sim.masked_fill_(~mask, max_neg_value)
        attn = sim.softmax(dim=-1)
        out = torch.einsum("b i j, b j d -> b i d", attn, v)
        n = out.shape[1]
        out = out.reshape(b, h, n, -1).permute(0, 2, 1, 3).reshape(b, n, -1)  # '(b h) n d -> b n (h d)'
        return self.to_out(out)


# ================================================================================================
# DETR encoder layer: nn.MultiheadAttention(...)[0] (need_weights=True by default; weights dropped)
# ================================================================================================
class DetrEncoderLayer(nn.Module):
    def __init__(self, d_model=E, nhead=H):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.1)
        self.dropout1 = nn.Dropout(0.1)

    @staticmethod
    def with_pos_embed(tensor, pos):
        return tensor if pos is None else tensor + pos

    def forward(self, src, src_key_padding_mask, pos):
        q = k = self.with_pos_embed(src, pos)
        src2 = self.self_attn(q, k, value=src, key_padding_mask=src_key_padding_mask)[0]
        return src + self.dropout1(src2)


class MHAWeightsReturned(nn.Module):
    """NEGATIVE: nn.MultiheadAttention whose (head-averaged) weights are returned for visualisation."""

    def __init__(self, d_model=E, nhead=H):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, nhead, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=True)


# ================================================================================================
# Whisper: d**-0.25 on q and on a K permuted straight to (B, H, d, N), mask buffer fill_(-inf).triu_(1)
# ================================================================================================
class WhisperMHA(nn.Module):
    def __init__(self, n_state=E, n_head=H, n_ctx=16, causal=False, return_qk=False):
        super().__init__()
        self.n_head, self.causal, self.return_qk = n_head, causal, return_qk
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)
        mask = torch.empty(n_ctx, n_ctx).fill_(-math.inf).triu_(1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x, xa=None):
        q = self.query(x)
        k = self.key(x if xa is None else xa)
        v = self.value(x if xa is None else xa)
        wv, qk = self.qkv_attention(q, k, v, self.mask if self.causal else None)
        if self.return_qk:
            return self.out(wv), qk
        return self.out(wv)

    def qkv_attention(self, q, k, v, mask=None):
        n_batch, n_ctx, n_state = q.shape
        scale = (n_state // self.n_head) ** -0.25
        q = q.view(*q.shape[:2], self.n_head, -1).permute(0, 2, 1, 3) * scale
        k = k.view(*k.shape[:2], self.n_head, -1).permute(0, 2, 3, 1) * scale
        v = v.view(*v.shape[:2], self.n_head, -1).permute(0, 2, 1, 3)
        qk = q @ k
        if mask is not None:
            qk = qk + mask[:n_ctx, :n_ctx]
        qk = qk.float()
        w = F.softmax(qk, dim=-1).to(q.dtype)
        return (w @ v).permute(0, 2, 1, 3).flatten(start_dim=2), qk.detach()


class WhisperDecoderBlock(nn.Module):
    """Two attentions in one graph: causal self-attention, then cross-attention to the audio features."""

    def __init__(self, n_state=E, n_head=H):
        super().__init__()
        self.attn = WhisperMHA(n_state, n_head, causal=True)
        self.attn_ln = nn.LayerNorm(n_state)
        self.cross_attn = WhisperMHA(n_state, n_head)
        self.cross_attn_ln = nn.LayerNorm(n_state)

    def forward(self, x, xa):
        x = x + self.attn(self.attn_ln(x))
        return x + self.cross_attn(self.cross_attn_ln(x), xa)


# ================================================================================================
# audiocraft / MusicGen StreamingMultiheadAttention (custom path): 'b t h d' einsums with spaces,
# mask = where(valid, zeros([]), full([], -inf)) with a past_context window, F.dropout(...).to(v)
# ================================================================================================
def audiocraft_get_mask(current_steps, past_context=5):
    queries_pos = torch.arange(0, current_steps).view(-1, 1)
    keys_pos = torch.arange(current_steps).view(1, -1)
    delta = queries_pos - keys_pos
    valid = delta >= 0
    valid &= (delta <= past_context)
    return torch.where(valid, torch.zeros([]), torch.full([], float("-inf")))


def s_audiocraft_bthd(q, k, v):  # (B, T, H, d)
    attn_mask = audiocraft_get_mask(q.shape[1])
    q = q / q.shape[-1] ** 0.5
    layout = "b t h d"
    key_layout = layout.replace("t", "k")
    pre_w = torch.einsum(f"{layout},{key_layout}-> b h t k", q, k)
    pre_w = pre_w + attn_mask
    w = torch.softmax(pre_w, dim=-1)
    w = F.dropout(w, 0.1, training=False).to(v)
    return torch.einsum(f"b h t k, {key_layout} -> {layout}", w, v)


# ================================================================================================
# MPT: K rearranged straight to 'b h d s', ALiBi from arange(1 - s, 1) int32 * slopes,
# key padding with finfo.min, causal mask via new_ones(float16).tril().to(bool), ~
# ================================================================================================
def mpt_gen_slopes(n_heads, alibi_bias_max=8):
    _n_heads = 2 ** math.ceil(math.log2(n_heads))
    m = torch.arange(1, _n_heads + 1, dtype=torch.float32)
    m = m.mul(alibi_bias_max / _n_heads)
    slopes = 1.0 / torch.pow(2, m)
    if _n_heads != n_heads:
        slopes = torch.concat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes.view(1, n_heads, 1, 1)


def mpt_build_alibi_bias(n_heads, seq_len, full=False):
    alibi_bias = torch.arange(1 - seq_len, 1, dtype=torch.int32).view(1, 1, 1, seq_len)
    if full:
        alibi_bias = alibi_bias - torch.arange(1 - seq_len, 1, dtype=torch.int32).view(1, 1, seq_len, 1)
        alibi_bias = alibi_bias.abs().mul(-1)
    return alibi_bias * mpt_gen_slopes(n_heads)


def mpt_attention(query, key, value, key_padding_mask, n_heads, is_causal, full_alibi):
    b, s, _ = query.shape
    q = query.view(b, s, n_heads, -1).permute(0, 2, 1, 3)       # 'b s (h d) -> b h s d'
    k = key.view(b, s, n_heads, -1).permute(0, 2, 3, 1)         # 'b s (h d) -> b h d s'
    v = value.view(b, s, n_heads, -1).permute(0, 2, 1, 3)
    softmax_scale = 1 / math.sqrt(q.size(-1))
    attn_bias = mpt_build_alibi_bias(n_heads, s, full=full_alibi)
    min_val = torch.finfo(q.dtype).min
    _, _, s_q, d = q.shape
    s_k = k.size(-1)
    attn_weight = q.matmul(k) * softmax_scale
    attn_weight = attn_weight + attn_bias
    attn_weight = attn_weight.masked_fill(~key_padding_mask.view((b, 1, 1, s_k)), min_val)
    if is_causal:
        ss = max(s_q, s_k)
        causal_mask = attn_weight.new_ones(ss, ss, dtype=torch.float16)
        causal_mask = causal_mask.tril()
        causal_mask = causal_mask.to(torch.bool)
        causal_mask = ~causal_mask
        causal_mask = causal_mask[-s_q:, -s_k:]
        attn_weight = attn_weight.masked_fill(causal_mask.view(1, 1, s_q, s_k), min_val)
    attn_weight = torch.softmax(attn_weight, dim=-1)
    out = attn_weight.matmul(v)
    return out.permute(0, 2, 1, 3).reshape(b, s_q, -1)          # 'b h s d -> b s (h d)'


def s_mpt_causal_alibi_padding(query, key, value, keep):
    return mpt_attention(query, key, value, keep, H, is_causal=True, full_alibi=False)


def s_mpt_full_symmetric_alibi_6_heads(query, key, value, keep):
    return mpt_attention(query, key, value, keep, 6, is_causal=False, full_alibi=True)


# ================================================================================================
# relative position biases
# ================================================================================================
class RelBiasIndexSelect(nn.Module):
    """A (2N-1, H) table, index_select over i - j + N - 1 built from aranges in forward."""

    def __init__(self, n=N, heads=H):
        super().__init__()
        self.table = nn.Parameter(rand(2 * n - 1, heads, seed=11) * 0.5)
        self.scale = D ** -0.5

    def forward(self, q, k, v):
        n = q.size(-2)
        pos = torch.arange(n)
        idx = (pos[None, :] - pos[:, None]) + n - 1
        bias = self.table.index_select(0, idx.reshape(-1)).view(n, n, -1).permute(2, 0, 1)
        return ((q @ k.mT) * self.scale + bias).softmax(-1) @ v


class RelBiasTorchGather(nn.Module):
    """The same table transposed to (H, 2N-1) and read with torch.gather along the last dim."""

    def __init__(self, n=N, heads=H):
        super().__init__()
        self.table = nn.Parameter(rand(heads, 2 * n - 1, seed=12) * 0.5)

    def forward(self, q, k, v):
        h, n = q.size(1), q.size(-2)
        rel = torch.arange(n)[None, :] - torch.arange(n)[:, None] + (n - 1)
        bias = torch.gather(self.table.unsqueeze(1).expand(h, n, 2 * n - 1), 2, rel.unsqueeze(0).expand(h, n, n))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        return torch.matmul(F.softmax(scores + bias.unsqueeze(0), dim=-1), v)


class DebertaC2P(nn.Module):
    """DeBERTa-v2 content-to-position: a q-dependent bias gathered from q @ pos_keyᵀ; scale on Kᵀ."""

    def __init__(self, n=N, heads=H, d=D):
        super().__init__()
        self.rel_embeddings = nn.Parameter(rand(2 * n - 1, heads * d, seed=13) * 0.3)
        self.heads = heads

    def forward(self, query_layer, key_layer, value_layer):
        b, h, n, d = query_layer.shape
        scale_factor = 2  # c2c + c2p
        scale = torch.sqrt(torch.tensor(d, dtype=torch.float) * scale_factor)
        attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2) / scale.to(dtype=query_layer.dtype))
        pos_key_layer = self.rel_embeddings.view(2 * n - 1, h, d).permute(1, 0, 2)  # (h, 2n-1, d)
        c2p_att = torch.matmul(query_layer, pos_key_layer.transpose(-1, -2))
        relative_pos = torch.arange(n)[:, None] - torch.arange(n)[None, :]
        c2p_pos = torch.clamp(relative_pos + (n - 1), 0, 2 * n - 2)
        c2p_att = torch.gather(c2p_att, dim=-1, index=c2p_pos.expand([b, h, n, n]))
        rel_att = c2p_att / scale.to(dtype=c2p_att.dtype)
        attention_scores = attention_scores + rel_att
        attention_probs = nn.functional.softmax(attention_scores, -1)
        return torch.matmul(attention_probs, value_layer)


class ConformerRelPosMHA(nn.Module):
    """ESPnet RelPositionMultiHeadedAttention: pos_bias_u/v added to q, Transformer-XL rel_shift."""

    def __init__(self, n_head=H, d_k=D):
        super().__init__()
        self.h, self.d_k = n_head, d_k
        self.linear_pos = nn.Linear(n_head * d_k, n_head * d_k, bias=False)
        self.pos_bias_u = nn.Parameter(rand(n_head, d_k, seed=14) * 0.3)
        self.pos_bias_v = nn.Parameter(rand(n_head, d_k, seed=15) * 0.3)
        self.dropout = nn.Dropout(0.1)

    @staticmethod
    def rel_shift(x):
        zero_pad = torch.zeros((*x.size()[:3], 1), device=x.device, dtype=x.dtype)
        x_padded = torch.cat([zero_pad, x], dim=-1)
        x_padded = x_padded.view(*x.size()[:2], x.size(3) + 1, x.size(2))
        return x_padded[:, :, 1:].view_as(x)[:, :, :, : x.size(-1) // 2 + 1]

    def forward(self, q, k, v, pos_emb):  # q: (B, T, H, d_k); k, v: (B, H, T, d_k); pos_emb (1, 2T-1, H*d_k)
        n_batch_pos = pos_emb.size(0)
        p = self.linear_pos(pos_emb).view(n_batch_pos, -1, self.h, self.d_k).transpose(1, 2)
        q_with_bias_u = (q + self.pos_bias_u).transpose(1, 2)
        q_with_bias_v = (q + self.pos_bias_v).transpose(1, 2)
        matrix_ac = torch.matmul(q_with_bias_u, k.transpose(-2, -1))
        matrix_bd = torch.matmul(q_with_bias_v, p.transpose(-2, -1))
        matrix_bd = self.rel_shift(matrix_bd)
        scores = (matrix_ac + matrix_bd) / math.sqrt(self.d_k)
        attn = torch.softmax(scores, dim=-1)
        x = torch.matmul(self.dropout(attn), v)
        return x.transpose(1, 2).contiguous().view(q.size(0), -1, self.h * self.d_k)


# ================================================================================================
# masks
# ================================================================================================
def s_pad_ge_lengths_inplace_minus_1e4(q, k, v, lengths):
    pad = torch.arange(k.size(-2))[None, :] >= lengths[:, None]
    s = torch.matmul(q, k.transpose(-1, -2)) * (q.size(-1) ** -0.5)
    s.masked_fill_(pad[:, None, None, :], -1e4)
    return torch.softmax(s, dim=-1) @ v


def s_prefix_lm_where_minus_torch_inf(q, k, v):  # UniLM / GLM / T5 prefix-LM: prefix sees all of itself
    prefix = 4
    i = torch.arange(q.size(-2)).unsqueeze(-1)
    j = torch.arange(k.size(-2)).unsqueeze(0)
    allowed = (j <= i) | (j < prefix)
    s = torch.where(allowed, q @ k.mT * q.size(-1) ** -0.5, -torch.inf)
    return s.softmax(-1) @ v


def espnet_make_pad_mask(lengths, maxlen):
    seq_range = torch.arange(0, maxlen, dtype=torch.int64)
    seq_range_expand = seq_range.unsqueeze(0).expand(lengths.size(0), maxlen)
    seq_length_expand = lengths.unsqueeze(-1)
    return seq_range_expand >= seq_length_expand


def s_espnet_forward_attention_post_softmax_zero(q, k, v, lengths):
    """ESPnet MultiHeadedAttention.forward_attention: masked_fill(min) before the softmax AND
    masked_fill(0.0) after it with the same mask (a no-op on the probabilities)."""
    mask = ~espnet_make_pad_mask(lengths, k.size(-2))[:, None, :]   # (B, 1, T2), True = keep
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    mask = mask.unsqueeze(1).eq(0)                                  # (B, 1, 1, T2), True = pad
    min_value = torch.finfo(scores.dtype).min
    scores = scores.masked_fill(mask, min_value)
    attn = torch.softmax(scores, dim=-1).masked_fill(mask, 0.0)
    return torch.matmul(attn, v)


def s_xformers_ref_bmhk_log_tril_window(q, k, v):
    """xformers' ref_attention_bmhk with a materialised LowerTriangular(+window) mask:
    log(tril(ones)) gives 0 / -inf."""
    def materialize_causal_mask(shape, window_size):
        tensor = torch.full(shape, dtype=torch.float32, fill_value=1)
        mask = torch.tril(tensor, diagonal=0)
        mask = torch.triu(mask, diagonal=-window_size + 1)
        return torch.log(mask)

    def ref_attention(q, k, v, attn_bias):
        q = q.float()
        k = k.float()
        v = v.float()
        q = q * (1 / q.shape[-1] ** 0.5)
        attn = q @ k.transpose(-2, -1)
        attn = attn + attn_bias
        attn = attn.softmax(-1)
        return attn @ v

    def T(t):
        return t.permute((0, 2, 1, 3)).reshape([t.shape[0] * t.shape[2], t.shape[1], t.shape[3]])

    bias = materialize_causal_mask((q.shape[1], k.shape[1]), window_size=4)
    out = ref_attention(T(q), T(k), T(v), bias)
    out = out.reshape([q.shape[0], q.shape[2], q.shape[1], v.shape[3]])
    return out.permute((0, 2, 1, 3))


class LucidrainsNullKV(nn.Module):
    """A learned null key/value concatenated in front, the padding mask extended by F.pad(value=True)."""

    def __init__(self, heads=H, d=D):
        super().__init__()
        self.null_kv = nn.Parameter(rand(2, heads, 1, d, seed=16))
        self.scale = d ** -0.5

    def forward(self, q, k, v, keep):
        b = q.shape[0]
        nk, nv = self.null_kv.unbind(0)
        nk, nv = nk.unsqueeze(0).expand(b, -1, -1, -1), nv.unsqueeze(0).expand(b, -1, -1, -1)
        k = torch.cat((nk, k), dim=-2)
        v = torch.cat((nv, v), dim=-2)
        mask = F.pad(keep, (1, 0), value=True)
        sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * self.scale
        sim = sim.masked_fill(~mask[:, None, None, :], -torch.finfo(sim.dtype).max)
        attn = sim.softmax(dim=-1)
        return torch.einsum("b h i j, b h j d -> b h i d", attn, v)


class GPTJAttn(nn.Module):
    """GPT-J: bool tril buffer sliced, where(mask, w, tensor(finfo.min)), divide by a tensor attribute."""

    def __init__(self, max_positions=16):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones((max_positions, max_positions), dtype=torch.bool))
                             .view(1, 1, max_positions, max_positions), persistent=False)
        self.scale_attn = torch.sqrt(torch.tensor(D, dtype=torch.float32)).to(torch.get_default_dtype())
        self.attn_dropout = nn.Dropout(0.1)

    def forward(self, query, key, value):
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length: key_length, :key_length]
        query = query.to(torch.float32)
        key = key.to(torch.float32)
        attn_weights = torch.matmul(query, key.transpose(-1, -2))
        mask_value = torch.finfo(attn_weights.dtype).min
        mask_value = torch.tensor(mask_value, dtype=attn_weights.dtype).to(attn_weights.device)
        attn_weights = torch.where(causal_mask, attn_weights, mask_value)
        attn_weights = attn_weights / self.scale_attn
        attn_weights = nn.functional.softmax(attn_weights, dim=-1)
        attn_weights = attn_weights.to(value.dtype)
        attn_weights = self.attn_dropout(attn_weights)
        return torch.matmul(attn_weights, value)


# ================================================================================================
# scale, layout and matmul spellings
# ================================================================================================
class RestormerMDTA(nn.Module):
    """Restormer / XCiT transposed attention: over channels, L2-normalised along the pixels, a learned
    per-head temperature (H, 1, 1)."""

    def __init__(self, dim=32, num_heads=H):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.rand(num_heads, 1, 1, generator=torch.Generator().manual_seed(17)) + 0.5)
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1)
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=1)
        q = q.reshape(b, self.num_heads, c // self.num_heads, h * w)   # 'b (head c) h w -> b head c (h w)'
        k = k.reshape(b, self.num_heads, c // self.num_heads, h * w)
        v = v.reshape(b, self.num_heads, c // self.num_heads, h * w)
        q = F.normalize(q, dim=-1)
        k = F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature
        attn = attn.softmax(dim=-1)
        out = attn @ v
        out = out.reshape(b, c, h, w)
        return self.project_out(out)


def s_einsum_mixed_layouts_out_bqhd(q, k, v):  # q (B,H,N,d), k (B,N,H,d), v (B,H,N,d); out (B,N,H,d)
    s = torch.einsum("bhqd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhqk,bhkd->bqhd", s.softmax(-1), v)


def s_bmm_contiguous_pretransposed_k(q, k, v):
    b, h, n, d = q.shape
    q3 = q.contiguous().view(b * h, n, d)
    kt = k.transpose(2, 3).contiguous().view(b * h, d, n)
    v3 = v.contiguous().view(b * h, n, d)
    s = torch.bmm(q3, kt)
    s.mul_(d ** -0.5)
    p = torch.softmax(s, dim=2)
    return torch.bmm(p, v3).view(b, h, n, d)


def s_bmm_scaled_in_3d_then_4d_view_for_mask(q, k, v, mask):
    """HF CLIP/BART-style bmm + 4-D view for the additive mask + 3-D view for the softmax, but with the
    scale applied to the 3-D scores (after the bmm) instead of to q."""
    b, h, n, d = q.shape
    q3, k3, v3 = (x.reshape(b * h, -1, d) for x in (q, k, v))
    attn_weights = torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(d)
    attn_weights = attn_weights.view(b, h, n, -1) + mask
    attn_weights = attn_weights.view(b * h, n, -1)
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    return torch.bmm(attn_weights, v3).view(b, h, n, d)


def s_adjoint_true_divide(q, k, v):
    return F.softmax(torch.true_divide(q @ k.adjoint(), math.sqrt(q.size(-1))), -1) @ v


class ScaleBufferTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(D ** -0.5))

    def forward(self, q, k, v):
        return torch.matmul(torch.mul(torch.matmul(q, k.transpose(-1, -2)), self.scale).softmax(-1), v)


def s_palm_mqa_einsum(q, k, v):  # PaLM: one K/V head (B, N, d) with no head dim in the einsum
    q = q * q.shape[-1] ** -0.5
    sim = torch.einsum("b h i d, b j d -> b h i j", q, k)
    i, j = sim.shape[-2:]
    causal_mask = torch.ones((i, j), dtype=torch.bool).triu(j - i + 1)
    sim = sim.masked_fill(causal_mask, -torch.finfo(sim.dtype).max)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    attn = sim.softmax(dim=-1)
    return torch.einsum("b h i j, b j d -> b h i d", attn, v)


class DropoutP0TrainMethodSoftmaxDtype(nn.Module):
    """Training mode with nn.Dropout(0.0) (a common default), and Tensor.softmax(dim, dtype=float32)."""

    def __init__(self):
        super().__init__()
        self.attn_drop = nn.Dropout(0.0)

    def forward(self, q, k, v):
        attn = (q @ k.transpose(-2, -1)).mul(q.shape[-1] ** -0.5)
        attn = attn.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return self.attn_drop(attn) @ v


# ================================================================================================
# the table of positives: name -> (factory returning (model, inputs), expected fused count)
# ================================================================================================
def _lengths():
    return torch.tensor([N, 7])


POSITIVE = {
    "diffusers_baddbmm_empty_beta0_head_to_batch": (
        lambda: (DiffusersAttention().eval(), (rand(B, N, E, seed=100),)), 1),
    "diffusers_cross_baddbmm_mask_repeat_interleave_upcast": (
        lambda: (DiffusersCrossWithMask().eval(),
                 (rand(B, N, E, seed=101), rand(B, 13, 24, seed=102), keep_from_lengths([13, 9], 13))), 1),
    "llama2c_real_rope_repeat_kv_full_triu_buffer": (
        lambda: (Llama2cAttention().eval(), (rand(B, N, E, seed=103),)), 1),
    "meta_llama_complex_rope": (
        lambda: (MetaLlamaComplexRope(), tuple(rand(B, N, H, D, seed=104 + i) for i in range(3))), 1),
    "hf_rotate_half_rope_finfo_min_triu": (lambda: (s_hf_rotate_half_rope, qkv(seed=107)), 1),
    "fairseq_mha_tbc_bmm_key_padding": (
        lambda: (FairseqMHA().eval(),
                 (rand(N, B, E, seed=108), rand(13, B, E, seed=109), rand(13, B, E, seed=110),
                  (~keep_from_lengths([13, 8], 13)).long())), 1),
    "megatron_sbhd_baddbmm_beta0_layer_scaling": (
        lambda: (MegatronCoreAttention().eval(), tuple(rand(N, B, H, D, seed=111 + i) for i in range(3))), 1),
    "xtransformers_partial_softmax_fp32_inplace_fill": (
        lambda: (XTransformersAttention().eval(), (rand(B, N, E, seed=114), keep_from_lengths([N, 9], N))), 1),
    "timm_vit_qk_layernorm_unbind": (lambda: (TimmAttentionQKNorm().eval(), (rand(B, N, E, seed=115),)), 1),
    "cait_class_attention_one_query": (lambda: (CaiTClassAttn().eval(), (rand(B, N, E, seed=116),)), 1),
    "perceiver_latent_queries_heads_in_batch": (
        lambda: (PerceiverCrossAttention().eval(), (rand(B, 13, 24, seed=117), keep_from_lengths([13, 6], 13))), 1),
    "detr_nn_mha_weights_discarded_key_padding": (
        lambda: (DetrEncoderLayer().eval(),
                 (rand(N, B, E, seed=118), ~keep_from_lengths([N, 8], N), rand(N, B, E, seed=119))), 1),
    "whisper_quarter_scale_k_permuted_to_bhdn": (
        lambda: (WhisperMHA(causal=True).eval(), (rand(B, N, E, seed=120),)), 1),
    "whisper_decoder_block_self_and_cross": (
        lambda: (WhisperDecoderBlock().eval(), (rand(B, N, E, seed=121), rand(B, 13, E, seed=122))), 2),
    "audiocraft_bthd_einsum_where_window_mask": (
        lambda: (s_audiocraft_bthd, tuple(rand(B, N, H, D, seed=123 + i) for i in range(3))), 1),
    "mpt_causal_alibi_int32_padding": (
        lambda: (s_mpt_causal_alibi_padding,
                 (*(rand(B, N, E, seed=126 + i) for i in range(3)), keep_from_lengths([N, 8], N))), 1),
    "mpt_full_symmetric_alibi_6_heads": (
        lambda: (s_mpt_full_symmetric_alibi_6_heads,
                 (*(rand(B, N, 6 * D, seed=129 + i) for i in range(3)), keep_from_lengths([N, 5], N))), 1),
    "rel_bias_index_select": (lambda: (RelBiasIndexSelect(), qkv(seed=132)), 1),
    "rel_bias_torch_gather": (lambda: (RelBiasTorchGather(), qkv(seed=135)), 1),
    "deberta_c2p_gather_scale_on_kT": (lambda: (DebertaC2P(), qkv(seed=138)), 1),
    "conformer_rel_shift_pos_bias_uv": (
        lambda: (ConformerRelPosMHA().eval(),
                 (rand(B, N, H, D, seed=141), rand(B, H, N, D, seed=142), rand(B, H, N, D, seed=143),
                  rand(1, 2 * N - 1, E, seed=144))), 1),
    "pad_ge_lengths_inplace_minus_1e4": (
        lambda: (s_pad_ge_lengths_inplace_minus_1e4, (*qkv(seed=145), _lengths())), 1),
    "prefix_lm_where_minus_torch_inf": (lambda: (s_prefix_lm_where_minus_torch_inf, qkv(seed=148)), 1),
    "espnet_post_softmax_zero_same_mask": (
        lambda: (s_espnet_forward_attention_post_softmax_zero, (*qkv(seed=151), _lengths())), 1),
    "xformers_ref_bmhk_log_tril_window": (
        lambda: (s_xformers_ref_bmhk_log_tril_window, tuple(rand(B, N, H, D, seed=154 + i) for i in range(3))), 1),
    "lucidrains_null_kv_fpad_mask": (
        lambda: (LucidrainsNullKV(), (*qkv(seed=157), keep_from_lengths([N, 5], N))), 1),
    "gptj_where_tensor_min_then_divide": (lambda: (GPTJAttn().eval(), qkv(seed=160)), 1),
    "restormer_channel_attention_temperature": (
        lambda: (RestormerMDTA(), (rand(B, 32, 3, 4, seed=163),)), 1),
    "einsum_mixed_layouts_out_bqhd": (
        lambda: (s_einsum_mixed_layouts_out_bqhd,
                 (rand(B, H, N, D, seed=164), rand(B, N, H, D, seed=165), rand(B, H, N, D, seed=166))), 1),
    "bmm_contiguous_pretransposed_k_inplace_mul": (lambda: (s_bmm_contiguous_pretransposed_k, qkv(seed=167)), 1),
    "bmm_scaled_in_3d_then_4d_view_for_mask": (
        lambda: (s_bmm_scaled_in_3d_then_4d_view_for_mask,
                 (*qkv(seed=185), ((1.0 - keep_from_lengths([N, 7], N).float()) * -1e9)[:, None, None, :])), 1),
    "adjoint_true_divide": (lambda: (s_adjoint_true_divide, qkv(seed=170)), 1),
    "scale_buffer_tensor_torch_mul": (lambda: (ScaleBufferTensor(), qkv(seed=173)), 1),
    "palm_mqa_einsum_no_kv_head_dim": (
        lambda: (s_palm_mqa_einsum, (rand(B, H, N, D, seed=176), rand(B, N, D, seed=177), rand(B, N, D, seed=178))),
        1),
    "dropout_p0_train_softmax_method_dtype": (
        lambda: (DropoutP0TrainMethodSoftmaxDtype().train(), qkv(seed=179)), 1),
}

XFAIL: dict[str, str] = {}


def _params(cases, xfails):
    for name in cases:
        marks = [pytest.mark.xfail(reason=xfails[name], strict=True)] if name in xfails else []
        yield pytest.param(name, id=name, marks=marks)


@pytest.mark.parametrize("name", list(_params(POSITIVE, XFAIL)))
def test_attention_spelling(name):
    torch.manual_seed(0)
    make, expected = POSITIVE[name]
    model, inputs = make()
    run_case(model, inputs, expected)


# ================================================================================================
# negatives: not softmax attention, or the scores / probabilities escape
# ================================================================================================
class CaiTTalkingHead(nn.Module):
    """timm CaiT talking heads: nn.Linear over the heads before and after the softmax."""

    def __init__(self, heads=H):
        super().__init__()
        self.proj_l = nn.Linear(heads, heads)
        self.proj_w = nn.Linear(heads, heads)
        self.scale = D ** -0.5

    def forward(self, q, k, v):
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = attn.softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return attn @ v


def n_sigmoid_attention(q, k, v):  # "sigmoid attention" (Apple 2024): no normalisation over the keys
    s = q @ k.mT * q.size(-1) ** -0.5 - math.log(k.size(-2))
    return torch.sigmoid(s) @ v


def n_slot_attention(inputs_k, inputs_v, slots_q):
    """Slot attention: softmax over the slots (dim=1), then a weighted mean over the inputs."""
    dots = torch.einsum("bid,bjd->bij", slots_q, inputs_k) * inputs_k.shape[-1] ** -0.5
    attn = dots.softmax(dim=1) + 1e-8
    attn = attn / attn.sum(dim=-1, keepdim=True)
    return torch.einsum("bjd,bij->bid", inputs_v, attn)


class DinoKeepsAttn(nn.Module):
    """DINO-style: the probabilities are stored on the module (get_last_selfattention)."""

    def forward(self, q, k, v):
        attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        attn = attn.softmax(dim=-1)
        self.last_attn = attn
        return attn @ v


def n_softmax_dim2_over_queries(q, k, v):
    return torch.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.25, 2) @ v


NEGATIVE = {
    "cait_talking_heads_linear_over_heads": lambda: (CaiTTalkingHead(), qkv(seed=200)),
    "sigmoid_attention": lambda: (n_sigmoid_attention, qkv(seed=203)),
    "slot_attention_softmax_over_slots": lambda: (
        n_slot_attention, (rand(B, 13, D, seed=206), rand(B, 13, D, seed=207), rand(B, 5, D, seed=208))),
    "dino_stores_probabilities_on_module": lambda: (DinoKeepsAttn(), qkv(seed=209)),
    "whisper_returns_qk_detached": lambda: (WhisperMHA(causal=True, return_qk=True).eval(),
                                            (rand(B, N, E, seed=212),)),
    "nn_mha_weights_returned": lambda: (MHAWeightsReturned().eval(), (rand(B, N, E, seed=213),)),
    "softmax_dim2_over_queries": lambda: (n_softmax_dim2_over_queries, qkv(seed=214)),
}

NEG_XFAIL: dict[str, str] = {}


@pytest.mark.parametrize("name", list(_params(NEGATIVE, NEG_XFAIL)))
def test_not_attention_left_alone(name):
    torch.manual_seed(0)
    model, inputs = NEGATIVE[name]()
    run_case(model, inputs, 0)
