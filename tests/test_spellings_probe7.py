"""Hidden set #7: spellings of attention and of the norm / pointwise fusions as real code bases write
them, written without reading the passes, and the correctness traps around them: open_clip's Attention
(time-major in_proj + bmm, in-place additive mask, scaled cosine with a clamped logit scale), DeBERTa's
sqrt(d * scale_factor) on K^T with the query x key mask product and XSoftmax's post-fill, T5 in fp16
(softmax(scores.float()).type_as), scores upcast to fp32 and cast back, where(...)-built additive masks,
in-place scale / causal fill on the score temporary, attention with K not transposed (K^T given), KV-cache
concatenation for one query, a per-sample temperature, fully padded query rows under finfo.min, attention
under torch.no_grad / with detached K, V / Q, q = k = v = x, shared (M, d) memory read by F.linear, a
bias added before the scale; negatives (probabilities transposed before PV, an attention sink column,
log_softmax, a zero fill that is not a mask); a timm ViT Block with in-place LayerScale; norms on sliced
(cls-token dropped / column-split) inputs, with detached weights, under no_grad / enable_grad, on detached
inputs, fp16 with odd hidden 33; GELU with an in-place bias, in-place tanh chains, conv-style bias, frozen
weights; PReLU on 2-D inputs / slices / detached slopes; pooling in fp16 / under no_grad / sum-div
interleaved; pointwise chains with in-place steps, views, int masks, intermediates returned; matmul +
transpose copy folding under no_grad and in fp16, and a copy written in place.

Harness: tests/probe_harness.py (as probes 6, 10 and 11): each case compiles a copy of the model with
flashfuse.backend(remainder="eager", norm_policy="always"), asserts the exact fusion counts, and compares
outputs and every input / parameter gradient with eager (relative L2 < 1e-4 in fp32, 2e-2 for fp16).
Every input is compared after the call (in-place updates), each output's requires_grad must equal
eager's, and a tensor that eager gives no gradient must get none (or zeros). Negatives assert the fusion
did NOT happen and eager's numbers. Cases flashfuse gets wrong today are marked xfail(strict=True) with
what was measured; "WRONG OUTPUT" / "WRONG GRADIENT" ones fuse and then differ from eager.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

D = 24      # hidden size
C = 6       # channels
B, H, N, HD = 2, 2, 7, 8   # attention: batch, heads, sequence, head dim
E = H * HD                 # model width of the attention modules with projections
TOL = 1e-4
TOL_HALF = 2e-2
SQ2PI = math.sqrt(2.0 / math.pi)


# ================================================================================================ harness
# tests/probe_harness.py (compile, compare outputs, gradients, requires_grad and in-place inputs); probe 6's
# GELU match details
from probe_harness import ROWS, P, Fn, case, rand, run_row  # noqa: E402
from test_spellings_probe6 import ERF, TANH  # noqa: E402


def qkv(seed, b=B, h=H, nq=N, nk=None, d=HD, dtype=torch.float32):
    nk = nq if nk is None else nk
    return (rand(b, h, nq, d, seed=seed, dtype=dtype), rand(b, h, nk, d, seed=seed + 1, dtype=dtype),
            rand(b, h, nk, d, seed=seed + 2, dtype=dtype))


def keep_from_lengths(lengths, n):
    """bool (B, n), True = a real token."""
    return torch.arange(n)[None, :] < torch.as_tensor(lengths)[:, None]


# ================================================================================================ attention models
class OpenClipAttention(nn.Module):
    """open_clip transformer.py Attention (the non-SDPA path), time-major (L, N, C) input."""

    def __init__(self, dim=E, num_heads=H, scaled_cosine=False, scale_heads=False,
                 logit_scale_max=math.log(1.0 / 0.01)):
        super().__init__()
        self.scaled_cosine, self.scale_heads = scaled_cosine, scale_heads
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.logit_scale_max = logit_scale_max
        self.in_proj_weight = nn.Parameter(torch.randn((dim * 3, dim)) * self.scale)
        self.in_proj_bias = nn.Parameter(torch.zeros(dim * 3))
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((num_heads, 1, 1)))) if scaled_cosine else None
        self.attn_drop = nn.Dropout(0.1)
        self.head_scale = nn.Parameter(torch.ones((num_heads, 1, 1))) if scale_heads else None
        self.out_proj = nn.Linear(dim, dim)
        self.out_drop = nn.Dropout(0.1)

    def forward(self, x, attn_mask=None):
        L, N_, C_ = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q = q.reshape(L, N_ * self.num_heads, -1).transpose(0, 1)
        k = k.reshape(L, N_ * self.num_heads, -1).transpose(0, 1)
        v = v.reshape(L, N_ * self.num_heads, -1).transpose(0, 1)
        if self.logit_scale is not None:
            attn = torch.bmm(F.normalize(q, dim=-1), F.normalize(k, dim=-1).transpose(-1, -2))
            logit_scale = torch.clamp(self.logit_scale, max=self.logit_scale_max).exp()
            attn = attn.view(N_, self.num_heads, L, L) * logit_scale
            attn = attn.view(-1, L, L)
        else:
            q = q * self.scale
            attn = torch.bmm(q, k.transpose(-1, -2))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                new_attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype)
                new_attn_mask.masked_fill_(attn_mask, float("-inf"))
                attn_mask = new_attn_mask
            attn += attn_mask
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = torch.bmm(attn, v)
        if self.head_scale is not None:
            x = x.view(N_, self.num_heads, L, C_ // self.num_heads) * self.head_scale
            x = x.view(-1, L, C_ // self.num_heads)
        x = x.transpose(0, 1).reshape(L, N_, C_)
        x = self.out_proj(x)
        return self.out_drop(x)


class OpenClipCausal(OpenClipAttention):
    """open_clip TextTransformer.build_causal_mask (float -inf, triu_(1)) passed to the attention."""

    def forward(self, x):
        mask = torch.empty(x.shape[0], x.shape[0])
        mask.fill_(float("-inf"))
        mask.triu_(1)
        return super().forward(x, attn_mask=mask)


class OpenClipCosineBoolCausal(OpenClipAttention):
    def __init__(self):
        super().__init__(scaled_cosine=True, scale_heads=True)

    def forward(self, x):
        L = x.shape[0]
        return super().forward(x, attn_mask=torch.ones(L, L, dtype=torch.bool).triu(1))


class DebertaStyleSelfAttention(nn.Module):
    """DeBERTa-v2 DisentangledSelfAttention without the relative terms (scale_factor = 1 + 2 for c2p and
    p2c), heads folded into the batch, scale on K^T as a tensor; the (B, 1, N, N) mask is the product
    query x key of the padding mask (get_attention_mask) and XSoftmax fills finfo.min, softmax, fills 0."""

    def __init__(self, dim=E, heads=H, scale_factor=3):
        super().__init__()
        self.heads, self.scale_factor = heads, scale_factor
        # key_proj without bias: a key bias adds one constant per query row, which the softmax cancels, so its
        # gradient is 0 and both sides compute only fp32 noise (~2e-7, above the harness's 1e-6 floor ratio)
        self.query_proj, self.value_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.key_proj = nn.Linear(dim, dim, bias=False)

    def transpose_for_scores(self, x):
        new_x_shape = x.size()[:-1] + (self.heads, -1)
        x = x.view(new_x_shape)
        return x.permute(0, 2, 1, 3).contiguous().view(-1, x.size(1), x.size(-1))

    def forward(self, hidden_states, input_mask):
        extended = input_mask.unsqueeze(1).unsqueeze(2)
        attention_mask = extended * extended.squeeze(-2).unsqueeze(-1)          # (B, 1, N, N)
        query_layer = self.transpose_for_scores(self.query_proj(hidden_states))
        key_layer = self.transpose_for_scores(self.key_proj(hidden_states))
        value_layer = self.transpose_for_scores(self.value_proj(hidden_states))
        scale = torch.sqrt(torch.tensor(query_layer.size(-1), dtype=torch.float) * self.scale_factor)
        attention_scores = torch.bmm(query_layer, key_layer.transpose(-1, -2) / scale.to(dtype=query_layer.dtype))
        attention_scores = attention_scores.view(-1, self.heads, attention_scores.size(-2), attention_scores.size(-1))
        rmask = ~(attention_mask.to(torch.bool))
        output = attention_scores.masked_fill(rmask, torch.tensor(torch.finfo(attention_scores.dtype).min))
        output = torch.softmax(output, -1)
        output = output.masked_fill(rmask, 0)
        context = torch.bmm(output.view(-1, output.size(-2), output.size(-1)), value_layer)
        context = context.view(-1, self.heads, context.size(-2), context.size(-1)).permute(0, 2, 1, 3).contiguous()
        return context.view(context.size()[:-2] + (-1,))


def t5_fp16_attention(m, q, k, v, position_bias):
    """HF T5Attention core: no scaling, position_bias (incl. the mask) added in place, softmax in fp32."""
    scores = torch.matmul(q, k.transpose(3, 2))
    scores += position_bias
    attn_weights = F.softmax(scores.float(), dim=-1).type_as(scores)
    attn_weights = F.dropout(attn_weights, p=0.1, training=False)
    return torch.matmul(attn_weights, v)


def upcast_scores_cast_back(m, q, k, v):
    """fp16 activations, the scores formed in fp32 (q.float() @ k.float()^T) and the probabilities cast back."""
    attn = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    attn = attn.softmax(dim=-1).to(q.dtype)
    return attn @ v


def cross_bool_padding_odd_head(m, q, k, v, keep):
    """Cross-attention Nq=5, Nk=9, head dim 5, a bool (B, Nk) keep mask broadcast as (B, 1, 1, Nk)."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    return s.softmax(-1) @ v


def where_built_additive_mask(m, q, k, v, keep):
    """The additive mask made by torch.where with Python numbers: 0.0 where kept, -10000.0 where padded."""
    bias = torch.where(keep[:, None, None, :], 0.0, -10000.0)
    s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.size(-1))) + bias
    return torch.matmul(torch.softmax(s, dim=-1), v)


def inplace_div_and_causal_fill(m, q, k, v):
    """The score temporary scaled with div_ and causally filled with masked_fill_ (triu, diagonal=1)."""
    n = q.shape[-2]
    scores = torch.matmul(q, k.transpose(-2, -1))
    scores.div_(math.sqrt(q.shape[-1]))
    causal = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    scores.masked_fill_(causal, float("-inf"))
    return torch.matmul(F.softmax(scores, dim=-1), v)


def k_given_transposed(m, q, kt, v):
    """K arrives as K^T (B, H, d, N) with N == d, and is used without a transpose: q @ kt."""
    return torch.softmax((q @ kt) * 0.3, dim=-1) @ v


def kv_cache_single_query(m, q, past_k, past_v, k_new, v_new):
    """One decoding step: the new key / value concatenated to the cache, one query attends to all."""
    k = torch.cat([past_k, k_new], dim=2)
    v = torch.cat([past_v, v_new], dim=2)
    w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
    return torch.matmul(F.softmax(w, dim=-1), v)


def per_sample_temperature(m, q, k, v, temp):
    """Scores divided by a per-sample temperature (B, 1, 1, 1) that gets a gradient."""
    s = (q @ k.transpose(-1, -2)) / temp.view(-1, 1, 1, 1)
    return s.softmax(-1) @ v


def padded_query_rows_finfo_min(m, q, k, v, keep):
    """A (B, N, N) mask (query x key padding, as older HF / BERT-style 3-D masks), finfo.min fill:
    padded query rows are fully filled and get a uniform distribution in eager."""
    m3 = keep[:, :, None] & keep[:, None, :]
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~m3[:, None], torch.finfo(s.dtype).min)
    return torch.matmul(s.softmax(-1), v)


def padded_query_rows_additive_finfo_min(m, q, k, v, keep):
    """The same (B, 1, N, N) query x key mask as HF's additive (1 - mask) * finfo.min: padded query rows are
    s + finfo.min everywhere (uniform in eager; the add passes the gradient on to q and k)."""
    m4 = (keep[:, :, None] & keep[:, None, :])[:, None].float()
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + (1.0 - m4) * torch.finfo(torch.float32).min
    return s.softmax(-1) @ v


def fp16_hf_finfo_min_additive(m, q, k, v, keep):
    """fp16 scores plus HF's (1 - mask) * finfo(fp16).min additive padding mask, softmax in fp32."""
    ext = (1.0 - keep[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + ext
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


class TeacherStudentAttention(nn.Module):
    """A frozen teacher attention under torch.no_grad and the student's attention outside it."""

    def forward(self, q, k, v, tq):
        with torch.no_grad():
            t = F.softmax(tq @ k.transpose(-1, -2) * HD ** -0.5, dim=-1) @ v
        s = F.softmax(q @ k.transpose(-1, -2) * HD ** -0.5, dim=-1) @ v
        return s, t


def detached_memory_kv(m, q, k, v):
    """Memorizing-transformer style: attention into a memory whose keys / values are detached."""
    k, v = k.detach(), v.detach()
    return (q @ k.transpose(-1, -2) * HD ** -0.5).softmax(-1) @ v


def detached_query(m, q, k, v):
    return (q.detach() @ k.transpose(-1, -2) * HD ** -0.5).softmax(-1) @ v


def self_attention_q_k_v_same_tensor(m, x):
    """No projections: softmax(x x^T / sqrt(d)) x, one tensor in all three roles."""
    return torch.softmax(x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1]), dim=-1) @ x


class FrozenKVProjection(nn.Module):
    """The key / value projections of a frozen memory computed under torch.no_grad; the queries train."""

    def __init__(self):
        super().__init__()
        self.wq, self.wkv = nn.Linear(E, E), nn.Linear(E, 2 * E)

    def forward(self, x, mem):
        q = self.wq(x).view(B, -1, H, HD).transpose(1, 2)
        with torch.no_grad():
            k, v = self.wkv(mem).view(B, -1, 2 * H, HD).transpose(1, 2).chunk(2, dim=1)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HD), dim=-1)
        return (a @ v).transpose(1, 2).reshape(B, -1, E)


def shared_memory_f_linear(m, q, mem_k, mem_v):
    """Batched queries (B, N, d) against a shared memory (M, d): scores by F.linear(q, mem_k)."""
    return F.softmax(F.linear(q, mem_k) * q.shape[-1] ** -0.5, dim=-1) @ mem_v


class BiasBeforeScale(nn.Module):
    """A learned (H, N, N) bias added to the raw scores, and the sum scaled: the bias is scaled too."""

    def __init__(self):
        super().__init__()
        self.bias = P(H, N, N, seed=5)

    def forward(self, q, k, v):
        return ((q @ k.transpose(-2, -1) + self.bias) * HD ** -0.5).softmax(-1) @ v


def inplace_scaled_query_clip_style(m, x, wq, wk, wv):
    """HF CLIP-like projections, the query scaled in place on the projection temporary (q *= scale)."""
    q = (x @ wq).view(B, N, H, HD).transpose(1, 2)
    q *= HD ** -0.5
    k = (x @ wk).view(B, N, H, HD).transpose(1, 2)
    v = (x @ wv).view(B, N, H, HD).transpose(1, 2)
    return (torch.matmul(q, k.transpose(-1, -2)).softmax(-1) @ v).transpose(1, 2).reshape(B, N, E)


def scale_after_minus_1e4_fill(m, q, k, v, keep):
    """masked_fill(-1e4) on the raw scores, then the scale: the fill is scaled too (-1250), still ~0."""
    s = (q @ k.transpose(-1, -2)).masked_fill(~keep[:, None, None, :], -1e4) / math.sqrt(HD)
    return s.softmax(-1) @ v


def zero_fill_is_not_a_mask(m, q, k, v, keep):
    """A user bug kept by the model: padded scores filled with 0.0, not -inf; they still get weight."""
    s = (q @ k.transpose(-1, -2) * HD ** -0.5).masked_fill(~keep[:, None, None, :], 0.0)
    return s.softmax(-1) @ v


def sqrt_d_scale_causal_and_window_int_positions(m, q, k, v):
    """A causal sliding window of 3 written from integer positions, with the scale applied last."""
    i = torch.arange(q.shape[-2])[:, None]
    j = torch.arange(k.shape[-2])[None, :]
    allowed = (j <= i) & (i - j < 3)
    s = torch.where(allowed, q @ k.mT, torch.tensor(float("-inf"))) * HD ** -0.5
    return s.softmax(-1) @ v


def tensordot_style_einsum_heads_last(m, q, k, v):
    """(B, N, H, d) tensors, heads last in the scores too: 'bqhd,bkhd->bqkh', softmax over k (dim 2)."""
    s = torch.einsum("bqhd,bkhd->bqkh", q, k) * HD ** -0.5
    p = s.softmax(dim=2)
    return torch.einsum("bqkh,bkhd->bqhd", p, v)


# ---- negatives
def probs_transposed_before_pv(m, q, k, v):
    """Normalised over the keys, then summed over the queries: P^T V is not attention."""
    p = (q @ k.transpose(-1, -2) * HD ** -0.5).softmax(-1)
    return p.transpose(-1, -2) @ v


def attention_sink_column(m, q, k, v, sink):
    """gpt-oss style sink: a per-head logit joins the softmax and its column is dropped after: rows sum < 1."""
    s = q @ k.transpose(-1, -2) * HD ** -0.5
    sinks = sink.view(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[-2], 1)
    p = torch.cat([s, sinks], dim=-1).softmax(dim=-1)[..., :-1]
    return p @ v


def log_softmax_weights(m, q, k, v):
    """log-probabilities as weights: not attention."""
    return F.log_softmax(q @ k.transpose(-1, -2) * HD ** -0.5, dim=-1) @ v


def softmax_then_square(m, q, k, v):
    """Probabilities squared before PV (a sharpened, un-normalised weighting): not attention."""
    p = (q @ k.transpose(-1, -2) * HD ** -0.5).softmax(-1)
    return (p * p) @ v


# ---- timm ViT block
class TimmAttention(nn.Module):
    """timm vision_transformer.Attention with fused_attn=False."""

    def __init__(self, dim=E, num_heads=H, qkv_bias=True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(0.0), nn.Linear(dim, dim), nn.Dropout(0.0)

    def forward(self, x):
        B_, N_, C_ = x.shape
        qkv = self.qkv(x).reshape(B_, N_, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = attn @ v
        x = x.transpose(1, 2).reshape(B_, N_, C_)
        return self.proj_drop(self.proj(x))


class TimmLayerScale(nn.Module):
    def __init__(self, dim, init_values=1e-5, inplace=False):
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x.mul_(self.gamma) if self.inplace else x * self.gamma


class TimmMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class TimmBlock(nn.Module):
    """timm vision_transformer.Block with LayerScale(inplace=True): x.mul_(gamma) on the branch output."""

    def __init__(self, dim=E, inplace=True):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), TimmAttention(dim)
        self.ls1, self.drop_path1 = TimmLayerScale(dim, 0.5, inplace), nn.Identity()
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), TimmMlp(dim, 2 * dim)
        self.ls2, self.drop_path2 = TimmLayerScale(dim, 0.5, inplace), nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def _q(seed):
    return qkv(seed=seed)


KEEP = keep_from_lengths([N, 4], N)
KEEP9 = keep_from_lengths([9, 5], 9)
KV5 = (rand(B, H, 5, 5, seed=310), rand(B, H, 9, 5, seed=311), rand(B, H, 9, 5, seed=312))

ATTENTION = [
    case("open_clip_attention_causal_float_mask_time_major", lambda: OpenClipCausal().eval(),
         (rand(N, B, E, seed=300),), dict(attention=1)),
    case("open_clip_scaled_cosine_bool_mask_head_scale", lambda: OpenClipCosineBoolCausal().eval(),
         (rand(N, B, E, seed=301),), dict(attention=1)),
    case("open_clip_attention_no_mask", lambda: OpenClipAttention().eval(), (rand(N, B, E, seed=302),),
         dict(attention=1)),
    case("deberta_sqrt_d_times_3_on_kT_xsoftmax_query_key_mask", lambda: DebertaStyleSelfAttention(),
         (rand(B, N, E, seed=303), KEEP.long()), dict(attention=1)),
    case("t5_fp16_no_scale_inplace_bias_softmax_float_type_as", lambda: Fn(t5_fp16_attention),
         (*qkv(seed=304, dtype=torch.float16), rand(1, H, N, N, seed=307, dtype=torch.float16)),
         dict(attention=1), tol=TOL_HALF),
    case("fp16_scores_upcast_to_fp32_probs_cast_back", lambda: Fn(upcast_scores_cast_back),
         qkv(seed=308, dtype=torch.float16), dict(attention=1), tol=TOL_HALF),
    case("cross_nq5_nk9_head_dim5_bool_key_padding", lambda: Fn(cross_bool_padding_odd_head), (*KV5, KEEP9),
         dict(attention=1)),
    case("torch_where_python_numbers_additive_mask", lambda: Fn(where_built_additive_mask), (*_q(313), KEEP),
         dict(attention=1)),
    case("inplace_div_then_inplace_triu_causal_fill", lambda: Fn(inplace_div_and_causal_fill), _q(316),
         dict(attention=1)),
    case("k_given_transposed_q_at_kt_n_equals_d", lambda: Fn(k_given_transposed),
         (rand(B, H, 8, 8, seed=319), rand(B, H, 8, 8, seed=320), rand(B, H, 8, 8, seed=321)), dict(attention=1)),
    case("kv_cache_cat_single_query_step", lambda: Fn(kv_cache_single_query),
         (rand(B, H, 1, HD, seed=322), rand(B, H, 6, HD, seed=323), rand(B, H, 6, HD, seed=324),
          rand(B, H, 1, HD, seed=325), rand(B, H, 1, HD, seed=326)), dict(attention=1)),
    case("per_sample_temperature_with_gradient", lambda: Fn(per_sample_temperature),
         (*_q(327), rand(B, seed=330).abs() + 0.5), dict(attention=1)),
    case("padded_query_rows_fully_filled_finfo_min_3d_mask", lambda: Fn(padded_query_rows_finfo_min),
         (*_q(331), KEEP), dict(attention=1)),
    case("padded_query_rows_additive_hf_finfo_min", lambda: Fn(padded_query_rows_additive_finfo_min),
         (*_q(331), KEEP), dict(attention=1)),
    case("fp16_hf_additive_finfo_min_softmax_fp32", lambda: Fn(fp16_hf_finfo_min_additive),
         (*qkv(seed=334, dtype=torch.float16), KEEP), dict(attention=1), tol=TOL_HALF),
    case("teacher_under_no_grad_student_outside", TeacherStudentAttention, (*_q(337), rand(B, H, N, HD, seed=340)),
         dict(attention=2)),
    case("memory_keys_values_detached", lambda: Fn(detached_memory_kv), _q(341), dict(attention=1)),
    case("query_detached", lambda: Fn(detached_query), _q(344), dict(attention=1)),
    case("q_k_v_one_tensor_no_projection", lambda: Fn(self_attention_q_k_v_same_tensor), (rand(B, N, HD, seed=347),),
         dict(attention=1)),
    case("frozen_kv_projection_under_no_grad", FrozenKVProjection, (rand(B, N, E, seed=348), rand(B, 9, E, seed=349)),
         dict(attention=1)),
    case("shared_memory_scores_by_f_linear", lambda: Fn(shared_memory_f_linear),
         (rand(B, N, HD, seed=350), rand(9, HD, seed=351), rand(9, HD, seed=352)), dict(attention=1)),
    case("learned_bias_added_before_the_scale", BiasBeforeScale, _q(353), dict(attention=1)),
    case("clip_style_query_scaled_in_place", lambda: Fn(inplace_scaled_query_clip_style),
         (rand(B, N, E, seed=356), 0.3 * rand(E, E, seed=357), 0.3 * rand(E, E, seed=358), 0.3 * rand(E, E, seed=359)),
         dict(attention=1)),
    case("fill_minus_1e4_then_scale", lambda: Fn(scale_after_minus_1e4_fill), (*_q(360), KEEP), dict(attention=1)),
    case("zero_fill_is_a_score_edit_not_a_mask", lambda: Fn(zero_fill_is_not_a_mask), (*_q(363), KEEP),
         dict(attention=1)),
    case("causal_window3_int_positions_scale_last", lambda: Fn(sqrt_d_scale_causal_and_window_int_positions), _q(366),
         dict(attention=1)),
    case("einsum_heads_last_scores_softmax_dim2", lambda: Fn(tensordot_style_einsum_heads_last),
         (rand(B, N, H, HD, seed=369), rand(B, 9, H, HD, seed=370), rand(B, 9, H, HD, seed=371)), dict(attention=1)),
    case("timm_vit_block_inplace_layerscale", lambda: TimmBlock().eval(), (rand(B, N, E, seed=372),),
         dict(attention=1, layer_norm=2, residual_norm=1, bias_gelu=1)),
    case("timm_vit_block_layerscale_out_of_place", lambda: TimmBlock(inplace=False).eval(), (rand(B, N, E, seed=373),),
         dict(attention=1, layer_norm=2, residual_norm=1, bias_gelu=1)),
    # ---- negatives
    case("probabilities_transposed_before_pv", lambda: Fn(probs_transposed_before_pv), _q(374), dict(attention=0)),
    case("attention_sink_column_dropped", lambda: Fn(attention_sink_column), (*_q(377), rand(H, seed=380)),
         dict(attention=0)),
    case("log_softmax_weights", lambda: Fn(log_softmax_weights), _q(381), dict(attention=0)),
    case("probabilities_squared", lambda: Fn(softmax_then_square), _q(384), dict(attention=0)),
]


@pytest.mark.parametrize(ROWS, ATTENTION)
def test_attention(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)


# ================================================================================================ LayerNorm / RMSNorm
X3 = rand(2, 5, D, seed=400)
X33 = rand(3, 7, 33, seed=401)


class ClsDroppedNorm(nn.Module):
    """timm: patch tokens x[:, num_prefix_tokens:] normalised (a view that starts one row in)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        return self.norm(x[:, 1:])


class SplitColumnsNorm(nn.Module):
    """A fused projection split on the last dim, only the first D columns normalised (row stride 3D)."""

    def __init__(self):
        super().__init__()
        self.proj, self.norm = nn.Linear(D, 3 * D), nn.LayerNorm(D)

    def forward(self, x):
        a, rest = self.proj(x).split([D, 2 * D], dim=-1)
        return self.norm(a), rest


class DetachedWeightLN(nn.Module):
    """F.layer_norm with the weight detached (frozen scale, trained shift)."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(D)), nn.Parameter(torch.zeros(D))

    def forward(self, x):
        return F.layer_norm(x, (D,), self.weight.detach(), self.bias, 1e-5)


class DetachedWeightRMS(nn.Module):
    """LLaMA-style RMSNorm with the weight read through .detach()."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight.detach() * (x * torch.rsqrt(var + 1e-6))


class NoGradLN(nn.Module):
    """Feature extraction: the whole LayerNorm under torch.no_grad (the output has no grad_fn)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        with torch.no_grad():
            return self.norm(x)


class EnableGradInsideNoGrad(nn.Module):
    """torch.enable_grad() re-entered inside torch.no_grad(): the norm is differentiable again."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        with torch.no_grad():
            y = x * 2.0
            with torch.enable_grad():
                out = self.norm(x)
        return out, y


class DetachedInputLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        return self.norm(x.detach())


class LNOutputInplace(nn.Module):
    """The LayerNorm output edited in place (mul_ / add_) before it is returned."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        y = self.norm(x)
        y.mul_(2.0).add_(1.0)
        return y


class LNInputBuiltInplace(nn.Module):
    """The LayerNorm input assembled with in-place ops on a temporary: h = 2x; h.add_(y)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)

    def forward(self, x, y):
        h = x * 2.0
        h.add_(y)
        return self.norm(h)


class InputMutatedResidualNorm(nn.Module):
    """Inference code: the residual stream updated in place on the caller's tensor, then normed."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)

    def forward(self, x, y):
        x.add_(y)
        return self.norm(x)


class HalfRMSNorm33(nn.Module):
    """LLaMA RMSNorm with an fp16 weight, hidden 33: variance in fp32, cast back before the weight."""

    def __init__(self, dim=33):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float16))

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + 1e-6)
        return self.weight * hidden_states.to(input_dtype)


class AnnotatedTransformerLayerNorm(nn.Module):
    """The Annotated Transformer's LayerNorm: x.std(-1) is UNBIASED and eps is added to the std."""

    def __init__(self, features, eps=1e-6):
        super().__init__()
        self.a_2, self.b_2 = nn.Parameter(torch.ones(features)), nn.Parameter(torch.zeros(features))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        return self.a_2 * (x - mean) / (std + self.eps) + self.b_2


class LNOverHeadsView(nn.Module):
    """A LayerNorm over the last dim of a (B, N, D) tensor viewed as (B, N, 4, D/4): per-head groups,
    an affine of shape (D/4,)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D // 4)

    def forward(self, x):
        return self.norm(x.view(*x.shape[:-1], 4, D // 4)).flatten(-2)


class RMSNormMeanOfSquareMul(nn.Module):
    """RMSNorm with torch.mean(x * x, -1) and a division by torch.sqrt, weight on the left."""

    def __init__(self, dim=33):
        super().__init__()
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.g * (x / torch.sqrt(torch.mean(x * x, dim=-1, keepdim=True) + 1e-8))


class LNWithSubtractedMeanReused(nn.Module):
    """Hand LayerNorm with the centred input computed once and reused (xc * xc for the variance)."""

    def __init__(self, dim=33):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xc = x - x.mean(dim=-1, keepdim=True)
        var = (xc * xc).mean(dim=-1, keepdim=True)
        return xc * torch.rsqrt(var + 1e-5) * self.w + self.b


class CentredOverUncentredRMS(nn.Module):
    """(x - mean) divided by the root mean square of the UNcentred x: neither LayerNorm nor RMSNorm."""

    def forward(self, x):
        return (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class RMSStatisticsOfAnotherTensor(nn.Module):
    """y scaled by the inverse RMS of x (a gain computed from a different tensor): not a norm of y or x."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))

    def forward(self, x, y):
        return self.weight * (y * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


NORMS = [
    case("timm_cls_token_dropped_slice_ln", ClsDroppedNorm, (X3,), dict(layer_norm=1)),
    case("ln_of_first_split_columns_row_stride_3d", SplitColumnsNorm, (X3,), dict(layer_norm=1)),
    case("f_layer_norm_weight_detached", DetachedWeightLN, (X3,), dict(layer_norm=1)),
    case("rmsnorm_weight_detached", DetachedWeightRMS, (X3,), dict(rms_norm=1)),
    case("layernorm_module_under_no_grad", NoGradLN, (X3,), dict(layer_norm=1)),
    case("enable_grad_inside_no_grad_ln", EnableGradInsideNoGrad, (X3,), dict(layer_norm=1)),
    case("ln_of_detached_input", DetachedInputLN, (X3,), dict(layer_norm=1)),
    case("ln_output_mul_add_in_place", LNOutputInplace, (X3,), dict(layer_norm=1)),
    case("ln_input_built_in_place", LNInputBuiltInplace, (X3, rand(2, 5, D, seed=402)), dict(layer_norm=1)),
    case("residual_written_into_caller_input_then_ln", InputMutatedResidualNorm, (X3, rand(2, 5, D, seed=403)),
         dict(layer_norm=1), grad=False),
    case("fp16_nn_layernorm_hidden33_seq7", lambda: nn.LayerNorm(33).half(), (X33.half(),), dict(layer_norm=1),
         tol=TOL_HALF),
    case("fp16_llama_rmsnorm_fp16_weight_hidden33", HalfRMSNorm33, (X33.half(),), dict(rms_norm=1), tol=TOL_HALF),
    case("ln_over_per_head_groups_view", LNOverHeadsView, (X3,), dict(layer_norm=1)),
    case("rms_mean_x_times_x_div_sqrt_hidden33", RMSNormMeanOfSquareMul, (X33,), dict(rms_norm=1, layer_norm=0)),
    case("ln_centred_input_reused_hidden33", LNWithSubtractedMeanReused, (X33,), dict(layer_norm=1, rms_norm=0)),
    # ---- negatives
    case("annotated_transformer_unbiased_std_eps_outside", lambda: AnnotatedTransformerLayerNorm(D), (X3,),
         dict(layer_norm=0, rms_norm=0)),
    case("centred_x_over_rms_of_uncentred_x", CentredOverUncentredRMS, (X3,), dict(layer_norm=0, rms_norm=0)),
    case("rms_gain_from_another_tensor", RMSStatisticsOfAnotherTensor, (X3, rand(2, 5, D, seed=404)),
         dict(rms_norm=0, layer_norm=0)),
]


@pytest.mark.parametrize(ROWS, NORMS)
def test_norms(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)


# ================================================================================================ bias + GELU
XG = rand(2, 5, D, seed=500)


def gelu_inplace_bias(m, x):
    """h = x @ W^T; h += b (in place on the temporary); gelu(h)."""
    h = x @ m.W.t()
    h += m.b
    return F.gelu(h)


def tanh_gelu_inplace_chain(m, x):
    """The tanh GELU assembled with in-place ops on temporaries (pow, mul_, add_, mul_, tanh_)."""
    h = F.linear(x, m.W, m.b)
    inner = h.pow(3).mul_(0.044715).add_(h).mul_(SQ2PI)
    return 0.5 * h * (1.0 + inner.tanh_())


def gelu_under_no_grad(m, x):
    with torch.no_grad():
        return F.gelu(F.linear(x, m.W, m.b))


def gelu_weight_detached(m, x):
    return F.gelu(F.linear(x, m.W.detach(), m.b))


def gelu_times_gate_in_place(m, x):
    """h = gelu(fc1(x)); h *= fc2(x): the GELU output multiplied in place by a gate."""
    h = F.gelu(F.linear(x, m.W, m.b))
    h *= F.linear(x, m.W2)
    return h


def conv_bias_gelu(m, x):
    """A 1x1 conv without bias, its per-channel bias added as b[:, None, None], then erf GELU."""
    return F.gelu(F.conv2d(x, m.w) + m.b[:, None, None])


def baddbmm_bias_gelu(m, x):
    """Batched per-sample weights: baddbmm(b, x, W) with b a last-dim vector, then GELU."""
    return F.gelu(torch.baddbmm(m.b, x, m.W))


def gelu_erf_on_detached_linear(m, x):
    h = F.linear(x, m.W, m.b).detach()
    return h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))


def sqrt_half_special_erf(m, x):
    h = F.linear(x, m.W, m.b)
    return 0.5 * h * (1.0 + torch.special.erf(h * math.sqrt(0.5)))


def gelu_bias_applied_after(m, x):
    """gelu(x @ W^T) + b: the bias after the activation (bias=False for the GELU, the add stays outside)."""
    return F.gelu(x @ m.W.t()) + m.b


def erf_gelu_missing_half(m, x):
    """x * (1 + erf(x / sqrt 2)): twice GELU, a different function."""
    h = F.linear(x, m.W, m.b)
    return h * (1.0 + torch.erf(h / math.sqrt(2.0)))


def _gf(fn, d_in=D, d_out=2 * D, w2=False):
    def make():
        params = dict(W=P(d_out, d_in, seed=501), b=P(d_out, seed=502))
        if w2:
            params["W2"] = P(d_out, d_in, seed=503)
        return Fn(fn, **params)
    return make


GELU = [
    case("bias_added_in_place_then_gelu", _gf(gelu_inplace_bias), (XG,), dict(bias_gelu=1), details=ERF),
    case("tanh_gelu_in_place_chain", _gf(tanh_gelu_inplace_chain), (XG,), dict(bias_gelu=1), details=TANH),
    case("linear_gelu_under_no_grad", _gf(gelu_under_no_grad), (XG,), dict(bias_gelu=1)),
    case("linear_weight_detached_gelu", _gf(gelu_weight_detached), (XG,), dict(bias_gelu=1), details=ERF),
    case("gelu_output_times_gate_in_place", _gf(gelu_times_gate_in_place, w2=True), (XG,), dict(bias_gelu=1),
         details=ERF),
    case("fp16_linear33_gelu_tanh_seq7", lambda: nn.Sequential(nn.Linear(33, 65), nn.GELU("tanh")).half(),
         (X33.half(),), dict(bias_gelu=1), tol=TOL_HALF),
    case("conv1x1_channel_bias_then_gelu", lambda: Fn(conv_bias_gelu, w=P(C, 3, 1, 1, seed=504), b=P(C, seed=505)),
         (rand(2, 3, 4, 5, seed=506),), dict(bias_gelu=1)),
    case("baddbmm_last_dim_bias_gelu", lambda: Fn(baddbmm_bias_gelu, W=P(2, D, 16, seed=507), b=P(16, seed=508)),
         (XG,), dict(bias_gelu=1)),
    case("erf_gelu_of_detached_linear", _gf(gelu_erf_on_detached_linear), (XG,), dict(bias_gelu=1)),
    case("special_erf_sqrt_half", _gf(sqrt_half_special_erf), (XG,), dict(bias_gelu=1), details=ERF),
    case("bias_after_the_gelu", _gf(gelu_bias_applied_after), (XG,), dict(bias_gelu=1),
         details=dict(bias_gelu=dict(bias=False))),
    # ---- negative
    case("erf_gelu_without_the_half", _gf(erf_gelu_missing_half), (XG,), dict(bias_gelu=0)),
]


@pytest.mark.parametrize(ROWS, GELU)
def test_bias_gelu(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)


# ================================================================================================ PReLU
XC = rand(2, C, 4, 3, seed=600)

PRELU = [
    case("nn_prelu_per_feature_on_2d_linear_output", lambda: nn.Sequential(nn.Linear(D, C), nn.PReLU(C)),
         (rand(5, D, seed=601),), dict(prelu=1)),
    case("fp16_nn_prelu_single_slope_hidden33", lambda: nn.PReLU().half(), (X33.half(),), dict(prelu=1),
         tol=TOL_HALF),
    case("relu_plus_slope_times_minimum_zeros_like", lambda: Fn(
        lambda m, x: F.relu(x) + m.a.view(1, -1, 1, 1) * torch.minimum(x, torch.zeros_like(x)),
        a=P(C, base=0.25, seed=602)),
         (XC,), dict(prelu=1)),
    case("nn_prelu_under_no_grad", lambda: Fn(lambda m, x: _no_grad(m.act, x), act=nn.PReLU(C)), (XC,), dict(prelu=1)),
    case("f_prelu_slope_detached", lambda: Fn(lambda m, x: F.prelu(x, m.a.detach()), a=P(C, base=0.25, seed=603)),
         (XC,), dict(prelu=1)),
    case("nn_prelu_on_sliced_columns", lambda: Fn(lambda m, x: m.act(x[:, :, 1:]), act=nn.PReLU(C)),
         (rand(2, C, 8, seed=604),), dict(prelu=1)),
    # ---- negatives
    case("slope_times_another_tensor", lambda: Fn(lambda m, x, y: torch.where(x > 0, x, m.a.view(1, -1, 1, 1) * y),
                                                  a=P(C, base=0.25, seed=605)), (XC, rand(2, C, 4, 3, seed=606)),
         dict(prelu=0)),
    case("negative_side_is_slope_times_x_squared", lambda: Fn(
        lambda m, x: torch.where(x > 0, x, m.a.view(1, -1, 1, 1) * x * x), a=P(C, base=0.25, seed=607)), (XC,),
         dict(prelu=0)),
]


def _no_grad(f, x):
    with torch.no_grad():
        return f(x)


@pytest.mark.parametrize(ROWS, PRELU)
def test_prelu(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)


# ================================================================================================ global pooling
XP = rand(2, 3, 7, 5, seed=700)
MEAN23 = dict(global_pool=dict(kind="mean", dims=(2, 3)))


def pool_under_no_grad(m, x):
    with torch.no_grad():
        feats = x.mean(-1).mean(-1)
    return feats


def sum_div_interleaved(m, x):
    """torch.sum(x, -1).div(W).sum(-1).div(H): each sum divided by its own length."""
    return torch.sum(x, -1).div(x.shape[-1]).sum(-1).div(x.shape[-2])


def video_channels_last_hw(m, x):
    """(B, T, H, W, C) channels-last video: mean over H then W, both written -2."""
    return x.mean(-2).mean(-2)


def pool_of_detached_features(m, x):
    return x.detach().mean(-1).mean(-1) + m.b


POOL = [
    case("fp16_mean_mean_7x5", lambda: Fn(lambda m, x: x.mean(-1).mean(-1)), (XP.half(),), dict(global_pool=1),
         details=MEAN23, tol=TOL_HALF),
    case("mean_mean_under_no_grad", lambda: Fn(pool_under_no_grad), (XP,), dict(global_pool=1), details=MEAN23),
    case("sum_div_w_sum_div_h_interleaved", lambda: Fn(sum_div_interleaved), (XP,), dict(global_pool=1),
         details=MEAN23),
    case("video_channels_last_mean_minus2_twice", lambda: Fn(video_channels_last_hw), (rand(2, 2, 4, 3, C, seed=701),),
         dict(global_pool=1), details=MEAN23),
    case("mean_mean_of_detached_features", lambda: Fn(pool_of_detached_features, b=P(3, seed=702)), (XP,),
         dict(global_pool=1), details=MEAN23),
    case("sum_sum_positive_dims_div_hw", lambda: Fn(lambda m, x: x.sum(2).sum(2) / (x.shape[2] * x.shape[3])),
         (XP,), dict(global_pool=1), details=MEAN23),
    # the division is by the channel count, not by the summed length: stays a sum, the division outside
    case("sum_sum_divided_by_channels", lambda: Fn(lambda m, x: x.sum(-1).sum(-1) / x.shape[1]), (XP,),
         dict(global_pool=1), details=dict(global_pool=dict(kind="sum", dims=(2, 3)))),
]


@pytest.mark.parametrize(ROWS, POOL)
def test_global_pool(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)


# ================================================================================================ eltwise chains
def chain_in_place(m, a, b, c, d):
    t = a * b
    t.add_(c)
    t.mul_(d)
    return t


def chain_under_no_grad(m, a, b, c, d, e):
    with torch.no_grad():
        return a * b + c * d - e


def chain_across_detach(m, a, b, c, d):
    return (a.detach() * b + c) * d


def chain_with_views(m, a, b, c, d):
    """Reshapes between the steps: (a * b).view(-1) + c.view(-1), viewed back, times d, minus a."""
    t = (a * b).view(-1)
    t = t + c.view(-1)
    return t.view(3, 7) * d - a


def chain_long_mask_promotion(m, a, mask, b, c):
    """An int64 mask multiplied into float tensors (type promotion inside the chain)."""
    return a * mask + b * (1 - mask) - c


def chain_intermediate_returned(m, a, b, c, d, e):
    t = a * b + c
    return t * d - e, t


def chain_expanded_operand(m, a, b, c, d):
    return a.expand(4, 6) * b + c * d - b


ELT = [
    case("chain_with_in_place_add_mul_on_temporary", lambda: Fn(chain_in_place),
         tuple(rand(3, 7, seed=800 + i) for i in range(4)), dict(eltwise_chain=1)),
    case("chain_under_no_grad", lambda: Fn(chain_under_no_grad), tuple(rand(3, 7, seed=805 + i) for i in range(5)),
         dict(eltwise_chain=1)),
    case("chain_across_detach", lambda: Fn(chain_across_detach), tuple(rand(3, 7, seed=811 + i) for i in range(4)),
         dict(eltwise_chain=1)),
    case("chain_with_views_between_steps", lambda: Fn(chain_with_views),
         tuple(rand(3, 7, seed=816 + i) for i in range(4)), dict(eltwise_chain=1)),
    case("chain_int64_mask_promotion", lambda: Fn(chain_long_mask_promotion),
         (rand(3, 7, seed=821), (rand(3, 7, seed=822) > 0).long(), rand(3, 7, seed=823), rand(3, 7, seed=824)),
         dict(eltwise_chain=1)),
    case("chain_intermediate_also_returned", lambda: Fn(chain_intermediate_returned),
         tuple(rand(3, 7, seed=825 + i) for i in range(5)), dict(eltwise_chain=1)),
    case("fp16_chain_7x33", lambda: Fn(lambda m, a, b, c, d, e: a * b + c * d - e),
         tuple(rand(7, 33, seed=831 + i, dtype=torch.float16) for i in range(5)), dict(eltwise_chain=1), tol=TOL_HALF),
    case("chain_with_expanded_stride0_operand", lambda: Fn(chain_expanded_operand),
         (rand(1, 6, seed=837), rand(4, 6, seed=838), rand(4, 6, seed=839), rand(4, 6, seed=840)),
         dict(eltwise_chain=1)),
]


@pytest.mark.parametrize(ROWS, ELT)
def test_eltwise_chain(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)


# ================================================================================================ matmul + transpose
def mt_under_no_grad(m, x):
    with torch.no_grad():
        return x @ m.W.t().contiguous()


def mt_copy_written_in_place(m, x):
    """The transposed copy is scaled in place before the matmul: the matmul reads 2 * W^T."""
    wt = m.W.t().contiguous()
    wt.mul_(2.0)
    return x @ wt


MM = [
    case("weight_t_contiguous_under_no_grad", lambda: Fn(mt_under_no_grad, W=P(8, D, seed=900)), (X3,),
         dict(matmul_transpose=1)),
    case("fp16_bmm_transpose_contiguous", lambda: Fn(lambda m, a, b: torch.bmm(a, b.transpose(1, 2).contiguous())),
         (rand(2, 5, 7, seed=901, dtype=torch.float16), rand(2, 3, 7, seed=902, dtype=torch.float16)),
         dict(matmul_transpose=1), tol=TOL_HALF),
    case("detached_weight_mT_contiguous",
         lambda: Fn(lambda m, x: x @ m.W.detach().mT.contiguous(), W=P(8, D, seed=903)),
         (rand(5, D, seed=904),), dict(matmul_transpose=1)),
    # ---- negative
    case("transposed_copy_scaled_in_place", lambda: Fn(mt_copy_written_in_place, W=P(8, D, seed=905)), (X3,),
         dict(matmul_transpose=0)),
]


@pytest.mark.parametrize(ROWS, MM)
def test_matmul_transpose(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)
