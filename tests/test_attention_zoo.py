"""The zoo: hand-written attention in every spelling people use, each fused exactly as often as expected,
with outputs and gradients equal to eager; and the negatives, left untouched with a reason."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flashfuse
from flashfuse.report import Report, _active

torch.manual_seed(0)
B, H, T, D = 2, 4, 11, 16


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def compile_and_report(fn, *, remainder="eager", dynamic=False, options=None):
    report = Report()
    opts = {"remainder": remainder, "passes": ["attention"], **(options or {})}
    compiled = torch.compile(fn, backend=flashfuse.backend(**opts), dynamic=dynamic)

    def run(*args):
        _active.append(report)
        try:
            return compiled(*args)
        finally:
            _active.pop()

    return run, report


def fused_op_count(report: Report) -> int:
    """flashfuse::attention calls in the graphs that were actually compiled."""
    n = 0
    for g in report.graphs:
        if g.graph_after is None:
            continue
        n += sum(1 for node in g.graph_after.graph.nodes
                 if node.op == "call_function" and node.target == torch.ops.flashfuse.attention.default)
    return n


def check(fn, *inputs, expected=1, grads=True, tol=1e-4, remainder="eager", dynamic=False):
    """Compile fn with flashfuse; assert `expected` fusions and equality with eager (fwd + grads)."""
    ref_fn = fn
    if isinstance(fn, nn.Module):
        fn.zero_grad(set_to_none=True)
    test_fn = copy.deepcopy(fn) if isinstance(fn, nn.Module) else fn
    ref_in = [x.detach().clone().requires_grad_(x.is_floating_point() and grads) for x in inputs]
    test_in = [x.detach().clone().requires_grad_(x.is_floating_point() and grads) for x in inputs]
    run, report = compile_and_report(test_fn, remainder=remainder, dynamic=dynamic)
    out = run(*test_in)
    ref = ref_fn(*ref_in)
    assert report.count("attention") == expected, str(report)
    assert fused_op_count(report) == expected, str(report)
    assert rel_err(out, ref) < tol, (rel_err(out, ref), str(report))
    if grads:
        g = torch.randn_like(ref)
        out.backward(g)
        ref.backward(g)
        for a, b in zip(test_in, ref_in):
            if b.grad is not None:
                assert rel_err(a.grad, b.grad) < tol, ("input grad", rel_err(a.grad, b.grad))
        if isinstance(fn, nn.Module):
            for (name, pa), (_, pb) in zip(test_fn.named_parameters(), ref_fn.named_parameters()):
                if pb.grad is not None:
                    assert pa.grad is not None, f"no grad for {name}"
                    assert rel_err(pa.grad, pb.grad) < tol, (name, rel_err(pa.grad, pb.grad))
    return report


def qkv(b=B, h=H, nq=T, nk=None, d=D, hkv=None, dv=None):
    nk = nq if nk is None else nk
    hkv = h if hkv is None else hkv
    dv = d if dv is None else dv
    return torch.randn(b, h, nq, d), torch.randn(b, hkv, nk, d), torch.randn(b, hkv, nk, dv)


# ------------------------------------------------------------------------------------------------
# S = Q·Kᵀ spellings and scales
# ------------------------------------------------------------------------------------------------
def sp_at_transpose_mul(q, k, v):
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    return F.softmax(att, dim=-1) @ v


def sp_matmul_transpose23_div(q, k, v):
    return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1]), -1), v)


def sp_method_matmul_mT(q, k, v):
    return q.matmul(k.mT).mul(D ** -0.5).softmax(dim=-1).matmul(v)


def sp_permute(q, k, v):
    s = torch.matmul(q, k.permute(0, 1, 3, 2)) * 0.125
    return torch.matmul(s.softmax(-1), v)


def sp_bmm_3d(q, k, v):
    b, h, n, d = q.shape
    q3, k3, v3 = (x.reshape(b * h, -1, d) for x in (q, k, v))
    s = torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(d)
    return torch.bmm(F.softmax(s, dim=-1), v3).view(b, h, n, d)


def sp_einsum(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * q.size(-1) ** -0.5
    return torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v)


def sp_einsum_other_letters(q, k, v):
    s = torch.einsum("bnid,bnjd->bnij", q, k) / 4.0
    return torch.einsum("bnij,bnjd->bnid", torch.softmax(s, dim=3), v)


def sp_prescaled_q(q, k, v):
    q = q * (q.size(-1) ** -0.5)
    return F.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def sp_prescaled_k(q, k, v):
    k = k / math.sqrt(k.shape[-1])
    return F.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def sp_nn_softmax(q, k, v):
    return nn.Softmax(dim=-1)(q @ k.transpose(-2, -1) / 4) @ v


def sp_softmax_fp32_cast_back(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.25
    return F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def sp_float_type_as(q, k, v):
    s = (q @ k.transpose(-2, -1)).float() / 4
    return s.softmax(-1).type_as(q) @ v


def sp_inplace_div(q, k, v):
    att = q @ k.transpose(-2, -1)
    att /= math.sqrt(q.size(-1))
    return att.softmax(-1) @ v


@pytest.mark.parametrize("fn", [
    sp_at_transpose_mul, sp_matmul_transpose23_div, sp_method_matmul_mT, sp_permute, sp_bmm_3d, sp_einsum,
    sp_einsum_other_letters, sp_prescaled_q, sp_prescaled_k, sp_nn_softmax, sp_softmax_fp32_cast_back,
    sp_float_type_as, sp_inplace_div,
], ids=lambda f: f.__name__)
def test_matmul_and_scale_spellings(fn):
    check(fn, *qkv())


def test_single_head_3d_inputs():
    def f(q, k, v):
        return F.softmax(q @ k.transpose(1, 2) / math.sqrt(q.size(-1)), dim=-1) @ v
    check(f, torch.randn(3, 13, 8), torch.randn(3, 13, 8), torch.randn(3, 13, 8))


# ------------------------------------------------------------------------------------------------
# masks and biases
# ------------------------------------------------------------------------------------------------
class NanoGPTAttention(nn.Module):
    def __init__(self, n_embd=32, n_head=4, block_size=16, dropout=0.0):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd = n_head, n_embd
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        Bx, Tx, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(Bx, Tx, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(Bx, Tx, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(Bx, Tx, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :Tx, :Tx] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(Bx, Tx, C)
        return self.c_proj(y)


def test_nanogpt_causal_tril_buffer():
    check(NanoGPTAttention().eval(), torch.randn(2, 13, 32))


def test_nanogpt_dropout_eval_mode_is_exact():
    check(NanoGPTAttention(dropout=0.1).eval(), torch.randn(2, 13, 32))


def test_nanogpt_dropout_train_mode():
    torch.manual_seed(1)
    m = NanoGPTAttention(dropout=0.2).train()
    x = torch.randn(2, 13, 32, requires_grad=True)
    run, report = compile_and_report(m)
    out = run(x)
    assert report.count("attention") == 1 and "dropout p=0.2" in report.matches[0].description
    assert out.shape == (2, 13, 32) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # eval mode of the same module: the same numbers as eager
    m.eval()
    torch._dynamo.reset()
    check(m, torch.randn(2, 13, 32))


def test_functional_dropout_training_false():
    def f(q, k, v):
        return F.dropout(F.softmax(q @ k.mT * 0.25, -1), p=0.3, training=False) @ v
    check(f, *qkv())


def _causal_bool(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def test_masked_fill_finfo_min():
    def f(q, k, v):
        s = q @ k.mT * 0.25
        s = s.masked_fill(~_causal_bool(s.size(-1)), torch.finfo(s.dtype).min)
        return s.softmax(-1) @ v
    check(f, *qkv())


def test_where_mask():
    def f(q, k, v, m):
        s = torch.where(m, q @ k.mT / 4, float("-inf"))
        return s.softmax(-1) @ v
    m = torch.rand(B, 1, T, T) > 0.3
    m[..., 0] = True  # no fully masked row: eager gives NaN there (tested in the kernel tests)
    check(f, *qkv(), m)


def test_additive_hf_style_mask():
    def f(q, k, v, attention_mask):
        ext = (1.0 - attention_mask[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.size(-1)) + ext
        return torch.matmul(nn.functional.softmax(s, dim=-1), v)
    am = torch.ones(B, T, dtype=torch.long)  # HF masks are integer
    am[0, -4:] = 0
    check(f, *qkv(), am)


def test_additive_full_mask_b1nn():
    def f(q, k, v, mask):
        return (q @ k.mT * 0.25 + mask).softmax(-1) @ v
    mask = torch.randn(B, 1, T, T)
    check(f, *qkv(), mask)


def test_bool_key_padding_mask():
    def f(q, k, v, pad):
        s = q @ k.mT * 0.25
        s = s.masked_fill(pad[:, None, None, :], float("-inf"))
        return s.softmax(-1) @ v
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, -3:] = True
    check(f, *qkv(), pad)


def test_tril_ones_inline():
    def f(q, k, v):
        n = q.size(-2)
        s = q @ k.mT * 0.25
        s = s.masked_fill(torch.tril(torch.ones(n, n)) == 0, float("-inf"))
        return s.softmax(-1) @ v
    r = check(f, *qkv())
    assert "causal" in r.matches[0].description


def test_triu_additive_causal():
    def f(q, k, v):
        n = q.size(-2)
        mask = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
        return F.softmax(q @ k.mT / 4 + mask, dim=-1) @ v
    check(f, *qkv())


def test_arange_causal():
    def f(q, k, v):
        n = q.size(-2)
        i = torch.arange(n)
        s = (q @ k.mT / 4).masked_fill(i[None, :] > i[:, None], float("-inf"))
        return s.softmax(-1) @ v
    check(f, *qkv())


def test_bottom_right_causal_cross():
    def f(q, k, v):
        nq, nk = q.size(-2), k.size(-2)
        keep = torch.ones(nq, nk, dtype=torch.bool).tril(diagonal=nk - nq)
        s = (q @ k.mT / 4).masked_fill(~keep, float("-inf"))
        return s.softmax(-1) @ v
    check(f, *qkv(nq=7, nk=12))


def test_sliding_window():
    def f(q, k, v):
        n = q.size(-2)
        i = torch.arange(n)
        diff = i[:, None] - i[None, :]
        keep = (diff >= 0) & (diff < 4)
        return (q @ k.mT / 4).masked_fill(~keep, float("-inf")).softmax(-1) @ v
    check(f, *qkv())


class AlibiAttention(nn.Module):
    def __init__(self, n_head=H):
        super().__init__()
        slopes = torch.tensor([2 ** (-8 * (i + 1) / n_head) for i in range(n_head)])
        self.register_buffer("slopes", slopes)

    def forward(self, q, k, v):
        n = q.size(-2)
        pos = torch.arange(n)
        rel = pos[None, :] - pos[:, None]
        bias = self.slopes[:, None, None] * rel[None]
        s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + bias
        return s.softmax(-1) @ v


def test_alibi():
    check(AlibiAttention(), *qkv())


class LearnedBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, H, T, T) * 0.5)

    def forward(self, q, k, v):
        return F.softmax(q @ k.mT * 0.25 + self.bias, dim=-1) @ v


def test_learned_bias_gets_gradient():
    check(LearnedBias(), *qkv())


def test_tanh_softcap():
    def f(q, k, v):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        s = 5.0 * torch.tanh(s / 5.0)
        return s.softmax(-1) @ v
    r = check(f, *qkv())
    assert "softcap" in r.matches[0].description


# ------------------------------------------------------------------------------------------------
# GQA, cross-attention, head dims, several blocks
# ------------------------------------------------------------------------------------------------
def repeat_kv(x, n_rep):
    b, hkv, n, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, hkv, n_rep, n, d).reshape(b, hkv * n_rep, n, d)


def test_gqa_llama_repeat_kv():
    def f(q, k, v):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        return F.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.25, dim=-1, dtype=torch.float32).to(q.dtype) @ v
    r = check(f, *qkv(hkv=2))
    assert "GQA 2:1" in r.matches[0].description


def test_mqa_repeat_interleave():
    def f(q, k, v):
        k = torch.repeat_interleave(k, 4, dim=1)
        v = v.repeat_interleave(4, dim=1)
        return (q @ k.mT / 4).softmax(-1) @ v
    r = check(f, *qkv(hkv=1))
    assert "GQA 4:1" in r.matches[0].description


def test_cross_attention_nq_ne_nk():
    check(sp_at_transpose_mul, *qkv(nq=5, nk=19))


def test_odd_head_dim_and_value_dim():
    check(sp_at_transpose_mul, *qkv(d=24, dv=40))


def test_two_attention_blocks_in_one_graph():
    def f(q, k, v):
        y = sp_at_transpose_mul(q, k, v)
        return sp_einsum(y, k, v) + y
    check(f, *qkv(), expected=2)


class ViTAttention(nn.Module):
    def __init__(self, dim=32, num_heads=4):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        Bx, N, C = x.shape
        qkv = self.qkv(x).reshape(Bx, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(Bx, N, C)
        return self.proj(x)


def test_vit_attention_module():
    check(ViTAttention(), torch.randn(2, 17, 32))


def test_inductor_remainder():
    check(NanoGPTAttention().eval(), torch.randn(2, 13, 32), remainder="inductor")


# ------------------------------------------------------------------------------------------------
# more spellings: manual softmax, baddbmm, (B, N, H, d) einsum, broadcast MQA, learned temperature
# ------------------------------------------------------------------------------------------------
def test_manual_softmax_with_max_subtraction():
    def f(q, k, v):
        s = q @ k.mT * 0.25
        e = torch.exp(s - s.amax(dim=-1, keepdim=True))
        return (e / e.sum(dim=-1, keepdim=True)) @ v
    check(f, *qkv())


def test_manual_softmax_with_max_values():
    def f(q, k, v):
        s = q @ k.mT * 0.25
        e = (s - s.max(dim=-1, keepdim=True).values).exp()
        return torch.matmul(e / e.sum(-1, keepdim=True), v)
    check(f, *qkv())


def test_baddbmm_scores():
    def f(q, k, v):
        b, h, n, d = q.shape
        q3, k3, v3 = (x.reshape(b * h, -1, d) for x in (q, k, v))
        s = torch.baddbmm(torch.empty(b * h, n, n), q3, k3.transpose(1, 2), beta=0.0, alpha=d ** -0.5)
        return torch.bmm(s.softmax(-1), v3).view(b, h, n, d)
    check(f, *qkv())


def test_scores_viewed_to_4d_for_the_mask_and_back_to_3d_for_the_softmax():
    """fairseq / HF XGLM: bmm scores (B*H, N, N), viewed to 4-D for an additive padding mask and a clamp at
    finfo.min (torch.max against a 0-d tensor), back to 3-D for an fp32 softmax, cast back, then bmm with V."""
    def f(q, k, v, mask):
        b, h, n, d = q.shape
        q3, k3, v3 = (x.reshape(b * h, -1, d) for x in (q, k, v))
        w = torch.bmm(q3 * d ** -0.5, k3.transpose(1, 2)).view(b, h, n, n) + mask
        w = torch.max(w, torch.full((), torch.finfo(w.dtype).min))
        p = F.softmax(w.view(b * h, n, n), dim=-1, dtype=torch.float32).to(q.dtype)
        p = p.view(b, h, n, n).view(b * h, n, n)  # XGLM keeps the 4-D view for output_attentions
        return torch.bmm(p, v3).view(b, h, n, d)
    mask = torch.zeros(B, 1, T, T)
    mask[1, :, :, -2:] = torch.finfo(torch.float32).min  # padded keys in the second sequence
    check(f, *qkv(), mask)


@pytest.mark.parametrize("mask_heads", [1, H], ids=["mask_per_window", "mask_per_window_and_head"])
def test_window_mask_added_in_a_5d_view_of_the_scores(mask_heads):
    """Swin (Microsoft, timm): scores of b * nW windows viewed to (b, nW, H, N, N) for the mask of each window, and
    back to 4-D for the softmax. The mask is folded into the batch (attention_layouts._window_mask_in_5d_view)."""
    nw = 2

    def f(q, k, v, mask):
        attn = q @ k.transpose(-2, -1) * 0.25
        attn = attn.view(-1, nw, H, T, T) + mask.unsqueeze(0)
        return attn.view(-1, H, T, T).softmax(-1) @ v
    mask = torch.where(torch.rand(nw, mask_heads, T, T) < 0.3, -100.0, 0.0)
    q, k, v = (torch.randn(2 * nw, H, T, 8) for _ in range(3))
    check(f, q, k, v, mask)


def test_5d_view_that_does_not_split_the_batch_is_left_alone():
    def f(q, k, v, mask):  # the 5-D view splits the heads, not the batch: not a window mask
        b, h, n, _ = q.shape
        attn = (q @ k.transpose(-2, -1)).view(b, 2, h // 2, n, n) + mask
        return attn.view(b, h, n, n).softmax(-1) @ v
    q, k, v = (torch.randn(2, 4, T, 8) for _ in range(3))
    check(f, q, k, v, torch.randn(2, 1, T, T), expected=0)


def test_softmax_over_the_heads_of_3d_viewed_scores_is_left_alone():
    def f(q, k, v):  # the view folds (B, H); a softmax over dim 0 mixes heads: no attention, no rewrite
        b, h, n, d = q.shape
        s = (q @ k.mT * 0.25).view(b * h, n, n)
        return torch.bmm(s.softmax(0), v.reshape(b * h, n, d)).view(b, h, n, d)
    check(f, *qkv(), expected=0)


def test_row_scale_of_the_probabilities_moves_after_pv():
    """HF's head_mask (1, H, 1, 1), or a per-row gate (B, H, N, 1): constant along the keys, so it scales
    the output rows; flashfuse fuses the attention and multiplies after it, gradients included."""
    def f(q, k, v, head_mask, row_gate):
        p = F.softmax(q @ k.mT * 0.25, dim=-1) * head_mask
        return torch.matmul(0.5 * (p * row_gate.sigmoid()), v)
    check(f, *qkv(), torch.rand(1, H, 1, 1) + 0.5, torch.randn(B, H, T, 1))


def test_scale_varying_along_the_keys_is_not_a_row_scale():
    def f(q, k, v, key_gate):  # (1, 1, 1, N): reweights keys after the softmax, not a row scale
        return (F.softmax(q @ k.mT * 0.25, dim=-1) * key_gate) @ v
    # head dim == N, so a gate wrongly moved after P·V would still broadcast (and give other numbers)
    check(f, *qkv(d=T), torch.rand(1, 1, 1, T), expected=0)


def test_rank5_gqa_groups_with_causal_and_padding_masks():
    """Q viewed (B, Hkv, g, N, d), K/V (B, Hkv, 1, N, d) broadcast over the group: 5-D scores. The group dim
    merges into the heads (GQA by index mapping); the masks keep their broadcast shapes."""
    def f(q, k, v, keep):
        b, h, n, d = q.shape
        qg = q.view(b, k.size(1), h // k.size(1), n, d)
        s = qg @ k[:, :, None].transpose(-2, -1) * d ** -0.5
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        s = s.masked_fill(~causal, float("-inf")).masked_fill(~keep[:, None, None, None, :], float("-inf"))
        return (s.softmax(-1) @ v[:, :, None]).view(b, h, n, d)
    keep = torch.ones(B, T, dtype=torch.bool)
    keep[1, -3:] = False
    check(f, *qkv(hkv=2), keep)


def test_rank5_local_blocks_merge_into_the_batch():
    """Blocked local attention (LongT5): (B, blocks, H, L, 3L) scores, a full 5-D mask side and a per-head
    bias (1, 1, H, L, 3L) with a gradient; one side (B, 1, H, L, 3L) needs a copy to merge (blocks broadcast)."""
    nb, blk = 3, 4

    def f(q, k, v, bias, block_mask, batch_bias):
        s = torch.einsum("...qhd,...khd->...hqk", q, k) + bias + batch_bias
        s = s.masked_fill(block_mask == 0, -1e10)
        return torch.einsum("...hqk,...khd->...qhd", s.softmax(-1), v)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, nb, blk, H, D, generator=g)
    k, v = (torch.randn(B, nb, 3 * blk, H, D, generator=g) for _ in range(2))
    block_mask = (torch.rand(B, nb, H, blk, 3 * blk, generator=g) > 0.2).float()
    check(f, q, k, v, torch.randn(1, 1, H, blk, 3 * blk, generator=g), block_mask,
          torch.randn(B, 1, H, blk, 3 * blk, generator=g))


def test_rank5_kv_shared_along_the_outer_dim_is_not_fused():
    def f(q, k, v):  # K/V (B, 1, g, N, d): shared across dim 1, varying along dim 2: no merge without a copy
        b, h, n, d = q.shape
        qg = q.view(b, 2, h // 2, n, d)
        return ((qg @ k[:, None].transpose(-2, -1) * 0.25).softmax(-1) @ v[:, None]).view(b, h, n, d)
    q, _, _ = qkv()
    _, k, v = qkv(hkv=H // 2)
    check(f, q, k, v, expected=0)


def test_einsum_bnhd_layout_both_sides():
    def f(q, k, v):  # (B, N, H, d) activations, as many codebases keep them
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.size(-1))
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)
    check(f, *(t.transpose(1, 2).contiguous() for t in qkv()))


def test_mqa_by_matmul_broadcast():
    def f(q, k, v):  # k, v with one head, broadcast by the matmul
        return F.softmax(q @ k.transpose(-2, -1) / 4, dim=-1) @ v
    r = check(f, *qkv(hkv=1))
    assert r.count("attention") == 1


class Temperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.log_t = nn.Parameter(torch.tensor(0.3))

    def forward(self, q, k, v):
        return (q @ k.mT / self.log_t.exp()).softmax(-1) @ v


def test_learned_temperature_gets_gradient():
    check(Temperature(), *qkv())


def test_inplace_masked_fill_and_where_tensor_constant():
    def f(q, k, v):
        n = q.size(-2)
        s = q @ k.mT
        s.div_(4.0)
        s.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        s = torch.where(s > -1e4, s, torch.tensor(float("-inf")))
        return s.softmax(-1) @ v
    check(f, *qkv())


def test_hf_gpt2_style_full_scale_and_where_mask():
    def f(q, k, v):
        n = q.size(-2)
        w = torch.matmul(q, k.transpose(-1, -2))
        w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype, device=w.device)
        causal = torch.tril(torch.ones((n, n), dtype=torch.bool)).view(1, 1, n, n)
        w = torch.where(causal, w.to(w.dtype), torch.finfo(w.dtype).min)
        return torch.matmul(nn.functional.softmax(w, dim=-1).type(v.dtype), v)
    check(f, *qkv())


def sp_scale_after_mask(q, k, v):
    m = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).triu(1)
    return ((q @ k.mT).masked_fill(m, float("-inf")) / 4).softmax(-1) @ v


def sp_pretransposed_k(q, k, v):
    kt = k.transpose(-1, -2).contiguous()  # K stored as (B, H, d, N)
    return (q @ kt / 4).softmax(-1) @ v


def sp_decode_step(q, k, v):
    return (q[:, :, -1:] @ k.mT / 4).softmax(-1) @ v  # one query against the cache


def sp_gemma_softcap_steps(q, k, v):
    s = q @ k.mT * 0.25
    s = s / 50.0
    s = torch.tanh(s)
    s = s * 50.0
    return F.softmax(s.float(), dim=-1).to(q.dtype) @ v


def sp_heads_first_3d(q, k, v):
    q, k, v = q[0], k[0], v[0]  # (H, N, d)
    return (q @ k.transpose(1, 2) / 4).softmax(-1) @ v


@pytest.mark.parametrize("fn", [sp_scale_after_mask, sp_pretransposed_k, sp_decode_step, sp_gemma_softcap_steps,
                                sp_heads_first_3d], ids=lambda f: f.__name__)
def test_more_spellings(fn):
    check(fn, *qkv())


def test_causal_and_padding_masks_together():
    def f(q, k, v, pad):
        i = torch.arange(q.size(-2))
        s = (q @ k.mT / 4).masked_fill(i[None, :] > i[:, None], float("-inf"))
        s = s.masked_fill(~pad[:, None, None, :], float("-inf"))
        return s.softmax(-1) @ v
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, -3:] = False
    check(f, *qkv(), pad)


def test_relative_position_bias_from_embedding_table():
    def f(q, k, v, table):
        i = torch.arange(q.size(-2))
        rel = (i[None, :] - i[:, None]).clamp(-3, 3) + 3
        bias = table[rel].permute(2, 0, 1)  # (H, N, N), gathered from a learned table
        return ((q @ k.mT) * 0.25 + bias).softmax(-1) @ v
    check(f, *qkv(), torch.randn(7, H))


@pytest.mark.parametrize("where", ["ambient", "in_graph"])
def test_autocast_dtypes_follow_eager(where):
    """Autocast around the call or inside the graph: the op must see and return fp16, as eager's matmuls."""
    def f(q, k, v):
        if where == "in_graph":
            with torch.autocast("cpu", dtype=torch.float16):
                return F.softmax(q @ k.mT / 4, dim=-1) @ v
        return F.softmax(q @ k.mT / 4, dim=-1) @ v

    q, k, v = qkv()
    run, report = compile_and_report(f)
    with torch.autocast("cpu", dtype=torch.float16, enabled=where == "ambient"):
        out = run(q, k, v)
        ref = f(q, k, v)
    assert report.count("attention") == 1
    assert out.dtype == ref.dtype == torch.float16
    assert rel_err(out.float(), ref.float()) < 1e-2


def sp_rank2_single_sequence(q, k, v):
    q, k, v = q[0, 0], k[0, 0], v[0, 0]  # (N, d)
    return torch.softmax(q @ k.T * 0.25, -1) @ v


def sp_rsqrt_tensor_scale(q, k, v):
    return (q @ k.mT * torch.rsqrt(torch.tensor(float(q.size(-1))))).softmax(-1) @ v


def sp_ones_like_tril(q, k, v):
    s = q @ k.mT / 4
    return s.masked_fill(torch.ones_like(s).tril() == 0, float("-inf")).softmax(-1) @ v


def sp_mask_moved_to_device_minus_1e9(q, k, v):
    m = torch.tril(torch.ones(q.size(-2), k.size(-2))).to(q.device)
    return (q @ k.mT / 4).masked_fill(m == 0, -1e9).softmax(-1) @ v


class BoolMaskBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.tril(torch.ones(32, 32, dtype=torch.bool)))

    def forward(self, q, k, v):
        n = q.size(-2)
        return (q @ k.mT / 4).masked_fill(~self.mask[:n, :n], float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("fn", [sp_rank2_single_sequence, sp_rsqrt_tensor_scale, sp_ones_like_tril,
                                sp_mask_moved_to_device_minus_1e9, BoolMaskBuffer()],
                         ids=lambda f: getattr(f, "__name__", type(f).__name__))
def test_even_more_spellings(fn):
    check(fn, *qkv())


# ------------------------------------------------------------------------------------------------
# negatives: left untouched, with the reason
# ------------------------------------------------------------------------------------------------
def _negative(fn, *inputs, reason: str):
    run, report = compile_and_report(fn)
    out = run(*inputs)
    ref = fn(*inputs)
    assert report.count("attention") == 0 and fused_op_count(report) == 0, str(report)
    assert any(reason in nm.reason for nm in report.near_misses) or reason == "", str(report)
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for a, b in zip(outs, refs):
        assert rel_err(a, b) < 1e-5
    return report


def test_negative_softmax_over_queries():
    r = _negative(lambda q, k, v: F.softmax(q @ k.mT, dim=-2) @ v, *qkv(), reason="softmax over dim -2")
    assert "not the last dim" in r.near_misses[0].reason


def test_negative_probabilities_returned():
    def f(q, k, v):
        p = (q @ k.mT).softmax(-1)
        return p @ v, p
    _negative(f, *qkv(), reason="probabilities also returned")


def test_negative_probabilities_summed():
    def f(q, k, v):
        p = (q @ k.mT).softmax(-1)
        return (p @ v) + p.sum()
    r = _negative(f, *qkv(), reason="probabilities also used by `sum`")
    assert "test_attention_zoo.py" in r.near_misses[0].source


def test_negative_no_softmax_between_matmuls():
    _negative(lambda q, k, v: (q @ k.mT * 0.1).relu() @ v, *qkv(), reason="")


def test_negative_post_softmax_masking():
    def f(q, k, v, m):
        p = (q @ k.mT).softmax(-1).masked_fill(m, 0.0)
        return p @ v
    _negative(f, *qkv(), torch.rand(T, T) > 0.5, reason="not to a matmul with V")


def test_negative_bias_broadcasts_scores_to_a_larger_shape():
    def f(q, k, v, bias):  # one query head, bias with four heads: the softmax sees (B, 4, N, N)
        return (q @ k.mT / 4 + bias).softmax(-1) @ v
    _negative(f, *qkv(h=1), torch.randn(1, 4, T, T), reason="are broadcast to (2,4,11,11) before the softmax")


def test_abs_of_the_scores_fuses():
    def f(q, k, v):  # d|s| = sign(s): gradients are taken over real symbols (score_mod.real_diff)
        return (q @ k.mT).abs().mul(0.25).softmax(-1) @ v
    check(f, *qkv())


def test_expression_the_kernel_cannot_print_is_decided_at_compile_time():
    """The pass asks the code generator before it rewrites (attention._check_kernel_can_print): a term without a
    Triton spelling is a near-miss at compile time, not an error at the first call."""
    import sympy

    from flashfuse.kernels.attention import score_mod as sm
    from flashfuse.passes import attention

    assert attention._kernel_source_error(sm.to_text(0.25 * sm.score), 0) == ""
    assert "cannot print" in attention._kernel_source_error(sm.to_text(sympy.atan(sm.score)), 0)
    with pytest.raises(attention.NotFusable, match="kernel generator cannot print"):
        attention._check_kernel_can_print(sm.to_text(sympy.atan(sm.score)), 0, None)


def test_negative_head_dim_too_large():
    _negative(sp_at_transpose_mul, *qkv(b=1, h=1, nq=3, d=512), reason="head dim 512 > 256")


def test_negative_unknown_op_between_scores_and_softmax():
    def f(q, k, v):
        s = torch.cumsum(q @ k.mT, dim=-1)
        return s.softmax(-1) @ v
    _negative(f, *qkv(), reason="`cumsum`")


# ------------------------------------------------------------------------------------------------
# dynamic shapes
# ------------------------------------------------------------------------------------------------
def test_dynamic_new_length_no_recompile_and_fused():
    calls = []
    backend = flashfuse.backend(remainder="eager", passes=["attention"])

    def counting(gm, ex):
        calls.append(1)
        return backend(gm, ex)

    def f(q, k, v):
        n = q.size(-2)
        s = (q @ k.mT / math.sqrt(q.size(-1))).masked_fill(torch.tril(torch.ones(n, n)) == 0, float("-inf"))
        return s.softmax(-1) @ v

    report = Report()
    compiled = torch.compile(f, backend=counting, dynamic=True)
    _active.append(report)
    try:
        for n in (9, 14, 23):
            inputs = qkv(nq=n)
            out = compiled(*inputs)
            assert rel_err(out, f(*inputs)) < 1e-4
    finally:
        _active.pop()
    assert len(calls) == 1
    assert report.count("attention") == 1 and fused_op_count(report) == 1


# ------------------------------------------------------------------------------------------------
# GPU: the same modules on CUDA in bf16, under Inductor, autocast and CUDA graphs
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_gpu_nanogpt_bf16_autocast_train(mode):
    torch.manual_seed(0)
    m = NanoGPTAttention(n_embd=256, n_head=4, block_size=512).cuda().train()
    ref_m = copy.deepcopy(m)
    x = torch.randn(4, 384, 256, device="cuda")
    report = Report()
    compiled = torch.compile(m, backend="flashfuse", mode=mode)
    _active.append(report)
    try:
        for _ in range(3):  # CUDA graphs: record, then replay
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = compiled(x)
    finally:
        _active.pop()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = ref_m(x)
    assert report.count("attention") == 1, str(report)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert rel_err(out.float(), ref.float()) < 2e-2
    out.float().sum().backward()
    ref.float().sum().backward()
    for (name, a), (_, b) in zip(m.named_parameters(), ref_m.named_parameters()):
        assert rel_err(a.grad, b.grad) < 3e-2, name


@pytest.mark.parametrize("mode,device_check,words", [
    (None, True, "verified at run time"),
    ("reduce-overhead", False, "not re-checked under CUDA graphs"),
    ("reduce-overhead", True, "checked on the device at every replay"),
], ids=["default", "reduce-overhead-no-device-check", "reduce-overhead"])
def test_cuda_graph_mode_keeps_the_mask_a_tensor(mode, device_check, words, monkeypatch):
    """A CUDA-graph replay never calls the op's Python, so under mode="reduce-overhead" the tril mask is not
    recognized at run time (the captured choice could not follow a changed mask): it stays a loaded side,
    it is checked on the device (mask_check.py, the default), or with FLASHFUSE_DEVICE_MASK_CHECK=0 stays a
    loaded side; the report says which. Same numbers every way."""
    monkeypatch.setenv("FLASHFUSE_DEVICE_MASK_CHECK", "1" if device_check else "0")
    torch.manual_seed(0)
    m = NanoGPTAttention(n_embd=32, n_head=4, block_size=16).eval()
    x = torch.randn(2, 13, 32)
    report = Report()
    _active.append(report)
    try:
        out = torch.compile(m, backend="flashfuse", mode=mode)(x)
    finally:
        _active.pop()
    assert report.count("attention") == 1, str(report)
    desc = str(report.matches[0])
    assert words in desc, desc
    torch.testing.assert_close(out, m(x), rtol=1e-4, atol=1e-5)


def cuda_graph_training(backend: str, dropout: float) -> None:
    """Four training steps under mode="reduce-overhead" (warm-up, capture, replays of forward and backward);
    without dropout the last step's gradients must equal eager's. Gradients are set to None before each
    step, as a training loop's zero_grad does: accumulating into a .grad that is a graph output fails under
    plain Inductor too ("accessing tensor output of CUDAGraphs that has been overwritten", H100, torch 2.11).
    Runs in a child process: a failed capture leaves torch's CUDA generator in capture mode, which would
    break later tests."""
    torch.manual_seed(0)
    m = NanoGPTAttention(n_embd=256, n_head=4, block_size=512, dropout=dropout).cuda().train()
    ref_m = copy.deepcopy(m)
    x = torch.randn(4, 384, 256, device="cuda")

    def loss_of(inp):
        return m(inp).float().square().mean()

    compiled = torch.compile(loss_of, backend=backend, mode="reduce-overhead")
    for _ in range(4):
        torch.compiler.cudagraph_mark_step_begin()
        m.zero_grad(set_to_none=True)  # .grad would otherwise alias graph memory that the next replay overwrites
        loss = compiled(x)
        loss.backward()
        assert torch.isfinite(loss).item()
    if dropout:
        return
    ref_m(x).float().square().mean().backward()
    for (name, a), (_, b) in zip(m.named_parameters(), ref_m.named_parameters()):
        assert rel_err(a.grad, b.grad) < 2e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["inductor", "flashfuse"])
def test_gpu_cuda_graph_training_steps(backend, dropout):
    """Inductor alone is the control: if it fails too, the setup is at fault, not flashfuse."""
    import subprocess
    import sys

    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('zoo', sys.argv[1]); "
            "zoo = importlib.util.module_from_spec(spec); sys.modules['zoo'] = zoo; spec.loader.exec_module(zoo); "
            "zoo.cuda_graph_training(sys.argv[2], float(sys.argv[3]))")
    run = subprocess.run([sys.executable, "-c", code, __file__, backend, str(dropout)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.gpu
def test_gpu_dropout_reproducible_with_manual_seed():
    m = NanoGPTAttention(n_embd=128, n_head=2, block_size=256, dropout=0.1).cuda().train()
    compiled = torch.compile(m, backend="flashfuse")
    x = torch.randn(2, 200, 128, device="cuda")
    torch.manual_seed(5)
    a = compiled(x)
    torch.manual_seed(5)
    b = compiled(x)
    c = compiled(x)
    assert torch.equal(a, b) and not torch.equal(b, c)


@pytest.mark.gpu
@pytest.mark.parametrize("fn", [sp_einsum, sp_bmm_3d, sp_softmax_fp32_cast_back], ids=lambda f: f.__name__)
def test_gpu_spellings_fp16(fn):
    q, k, v = (t.cuda().half() for t in qkv(b=2, h=4, nq=300, d=64))
    run, report = compile_and_report(fn, remainder="inductor")
    out = run(q, k, v)
    ref = fn(q.float(), k.float(), v.float())
    assert report.count("attention") == 1
    assert rel_err(out.float(), ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_half_q_k_upcast_for_the_scores(dtype):
    """Session 9: the half Q, K behind `q.float() @ k.float().mT` go to the kernel (it raised before)."""
    q, k, v = (t.cuda().to(dtype) for t in qkv(b=2, h=4, nq=300, d=64))
    run, report = compile_and_report(_scores_in_fp32_v_half, remainder="inductor")
    out = run(q, k, v)
    ref = _scores_in_fp32_v_half(q.float(), k.float(), v.float())
    assert report.count("attention") == 1
    assert rel_err(out.float(), ref) < 2e-2


@pytest.mark.parametrize("mask_of,word", [
    (lambda i: i[None, :] > i[:, None], "causal"),
    (lambda i: i[None, :] < i[:, None], "index mask"),           # anti-causal: the past is masked
    (lambda i: (i[:, None] - i[None, :]) ** 2 > 4, "index mask"),  # a symmetric window, not causal
    (lambda i: (i[:, None] - i[None, :]).abs() > 2, "index mask"),
])
def test_the_report_calls_only_future_masks_causal(mask_of, word):
    def fn(q, k, v):
        i = torch.arange(q.shape[-2])
        s = (q @ k.transpose(-2, -1)) * 0.25
        return torch.softmax(s.masked_fill(mask_of(i), float("-inf")), -1) @ v

    q, k, v = qkv(b=1, h=2, nq=9, d=16)
    run, report = compile_and_report(fn)
    out = run(q, k, v)
    desc = str(report.matches[0])
    assert report.count("attention") == 1 and word in desc, desc
    assert ("causal" in desc) == (word == "causal"), desc
    torch.testing.assert_close(out, fn(q, k, v), rtol=1e-4, atol=1e-5)


def sp_row_max_shift_detached(q, k, v):
    s = (q @ k.transpose(-2, -1)) * 0.25
    s = s - s.amax(-1, keepdim=True).detach()  # lucidrains: a per-row shift the softmax cancels
    return s.softmax(-1) @ v


def sp_column_max_shift(q, k, v):
    s = (q @ k.transpose(-2, -1)) * 0.25
    return (s - s.amax(-2, keepdim=True)).softmax(-1) @ v  # per column: changes the softmax over keys


def sp_row_max_shift_then_tanh(q, k, v):
    s = (q @ k.transpose(-2, -1)) * 0.25
    return torch.tanh(s - s.amax(-1, keepdim=True)).softmax(-1) @ v  # not a plain shift of the softmax input


@pytest.mark.parametrize("fn,expected", [(sp_row_max_shift_detached, 1), (sp_column_max_shift, 0),
                                         (sp_row_max_shift_then_tanh, 0)], ids=lambda x: getattr(x, "__name__", x))
def test_a_row_max_shift_is_dropped_only_where_the_softmax_cancels_it(fn, expected):
    q, k, v = qkv(b=2, h=2, nq=11, d=16)
    check(fn, q, k, v, expected=expected)


@pytest.mark.parametrize("tail,expected", [(lambda s: s.softmax(-1), 1), (lambda s: s.sum(-1), 0)],
                         ids=["softmax", "no_softmax"])
def test_layouts_are_rewritten_only_around_a_softmax(tail, expected):
    """passes/attention_layouts.py rewrites view(bmm(..), (B, H, M, N)) to a 4-D matmul only when a softmax is
    downstream; the rewritten graph computes the same numbers."""
    from flashfuse.passes.attention_layouts import rewrite_layouts
    from flashfuse.passes.normalize import to_aten

    def fn(q3, k3):
        return tail(torch.bmm(q3, k3.transpose(1, 2)).view(2, 3, 5, 7))

    q3, k3 = torch.randn(6, 5, 4), torch.randn(6, 7, 4)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append((to_aten(gm, example_inputs), list(example_inputs)))  # Dynamo's input order
        return gm

    torch.compile(fn, backend=capture)(q3, k3)
    gm, inputs = graphs[0]
    assert rewrite_layouts(gm) == expected
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert (torch.ops.aten.bmm.default in targets) == (expected == 0)
    torch.testing.assert_close(torch.fx.Interpreter(gm).run(*inputs)[0], fn(q3, k3))



def sp_probabilities_right_without_softmax(q, k, v):
    s = (q @ k.transpose(-2, -1)) * 0.25
    return v.transpose(-2, -1) @ torch.sigmoid(s).transpose(-2, -1)  # no softmax: left as written


def sp_probabilities_right(q, k, v):
    p = ((q @ k.transpose(-2, -1)) * 0.25).softmax(-1)
    return v.transpose(-2, -1) @ p.transpose(-2, -1)  # (P·V)ᵀ, SAGAN's order


@pytest.mark.parametrize("fn,expected", [(sp_probabilities_right, 1), (sp_probabilities_right_without_softmax, 0)],
                         ids=lambda x: getattr(x, "__name__", x))
def test_probabilities_on_the_right_of_the_matmul(fn, expected):
    q, k, v = qkv(b=2, h=2, nq=10, d=16)
    check(fn, q, k, v, expected=expected)


def sp_probabilities_viewed_to_4d_and_back(q, k, v):
    """fairseq / XGLM: 3-D scores and softmax; the probabilities viewed to 4-D (kept for output_attentions)
    and straight back before the bmm with V."""
    b, h, n, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, n, d) for t in (q, k, v))
    p = torch.softmax(torch.bmm(q3, k3.transpose(1, 2)) * 0.25, dim=-1)
    p = p.view(b, h, n, n).view(b * h, n, n)
    return torch.bmm(p, v3).view(b, h, n, d)


def test_probabilities_viewed_to_4d_and_straight_back():
    q, k, v = qkv(b=2, h=2, nq=10, d=16)
    check(sp_probabilities_viewed_to_4d_and_back, q, k, v)


# ------------------------------------------------------------------------------------------------
# in-place writes between QKᵀ and P·V: the fused op reads Q, K and masks where P·V stood
# ------------------------------------------------------------------------------------------------
def _scale_k_in_place(q, k, v, cache, mask):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    k.mul_(2.0)  # eager's scores read k before this write
    return torch.softmax(s, -1) @ v


def _write_k_through_a_view(q, k, v, cache, mask):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    k[:, :, :2].zero_()
    return torch.softmax(s, -1) @ v


def _mask_cleared_after_use(q, k, v, cache, mask):
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(mask, float("-inf"))
    mask.fill_(False)
    return torch.softmax(s, -1) @ v


def _cache_written(q, k, v, cache, mask):  # writes a tensor the attention does not read: still fused
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    cache.copy_(k)
    return torch.softmax(s, -1) @ v


def _v_scaled_in_place(q, k, v, cache, mask):  # V is read at P·V in eager too: still fused
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    v.mul_(0.5)
    return torch.softmax(s, -1) @ v


def _bias_scaled_in_place_before_use(q, k, v, cache, mask):  # Funnel: `positional_attn *= cls_mask` on a view
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    pos = torch.cat([q @ cache.transpose(-2, -1), q[..., :1]], -1)[..., :-1]
    pos *= 0.5  # writes the bias before the score modification reads it: eager and the kernel read the same
    return torch.softmax(s + pos, -1) @ v


@pytest.mark.parametrize("fn, fused", [(_scale_k_in_place, 0), (_write_k_through_a_view, 0),
                                       (_mask_cleared_after_use, 0), (_cache_written, 1), (_v_scaled_in_place, 1),
                                       (_bias_scaled_in_place_before_use, 1)],
                         ids=["k_mul_", "k_view_zero_", "mask_fill_", "cache_copy_", "v_mul_", "bias_mul_first"])
def test_in_place_write_between_scores_and_pv(fn, fused):
    q, k, v = qkv()
    cache = torch.randn(k.shape)
    mask = torch.rand(B, 1, T, T) < 0.3
    mask[..., 0] = False  # no fully masked row
    args = (q, k, v, cache, mask)
    run, report = compile_and_report(fn)
    got_args = [a.clone() for a in args]
    out = run(*got_args)
    ref_args = [a.clone() for a in args]
    ref = fn(*ref_args)
    assert report.count("attention") == fused, str(report)
    if not fused:
        assert any("writes in place between" in nm.reason for nm in report.near_misses), str(report)
    assert rel_err(out, ref) < 1e-5
    for a, b in zip(got_args, ref_args):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# Q, K and V of different dtypes: the kernel takes one
# ------------------------------------------------------------------------------------------------
def _scores_in_fp32_v_half(q, k, v):
    s = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])
    return torch.softmax(s, -1).to(v.dtype) @ v


def test_half_q_k_upcast_for_the_scores_read_as_half():
    """`q.float() @ k.float().mT`, probabilities cast back to V's fp16: the exact upcasts are read through (it
    crashed in the kernel with fp32 Q, K against fp16 V)."""
    q, k, v = (x.half() for x in qkv())
    check(_scores_in_fp32_v_half, q, k, v, tol=2e-2)


def test_fp32_q_k_with_half_v_is_left_alone():
    q, k, _ = qkv()
    v = qkv()[2].half()
    _negative(_scores_in_fp32_v_half, q, k, v, reason="different dtypes")


def _mask_added_through_a_view(q, k, v, cache, mask):
    """open_clip: 4-D scores scaled per head, viewed back to 3-D and the (N, N) mask added in place."""
    b, h, n, d = q.shape
    s = torch.bmm(q.reshape(b * h, n, d), k.reshape(b * h, n, d).transpose(-1, -2))
    s = s.view(b, h, n, n) * torch.linspace(0.5, 1.5, h).view(h, 1, 1)
    s = s.view(-1, n, n)
    s += torch.zeros(n, n).masked_fill(mask[0, 0], float("-inf"))
    return torch.bmm(s.softmax(-1), v.reshape(b * h, n, d)).view(b, h, n, d)


def _write_through_a_view_read_later(q, k, v, cache, mask):
    """The scores' base is read after a write through its view: the write must stay a write."""
    s = q @ k.transpose(-2, -1)
    flat = s.view(-1)
    flat += 1.0
    return torch.softmax(s, -1) @ v, s


@pytest.mark.parametrize("fn, fused", [(_mask_added_through_a_view, 1), (_write_through_a_view_read_later, 0)],
                         ids=["open_clip_mask_add_", "base_read_after_write"])
def test_in_place_add_through_the_only_view_of_a_temporary(fn, fused):
    q, k, v = qkv()
    mask = torch.rand(B, 1, T, T) < 0.3
    mask[..., 0] = False
    args = (q, k, v, torch.zeros_like(k), mask)
    run, report = compile_and_report(fn)
    out, ref = run(*args), fn(*args)
    assert report.count("attention") == fused, str(report)
    for a, b in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        assert rel_err(a, b) < 1e-5


# ------------------------------------------------------------------------------------------------
# K and V one (M, d) matrix for every batch and head (memory tokens)
# ------------------------------------------------------------------------------------------------
def _memory_attention_4d(q, mem_k, mem_v):
    return torch.softmax(q @ mem_k.t() / math.sqrt(q.shape[-1]), -1) @ mem_v


def _memory_attention_by_linear(q, mem_k, mem_v):
    return F.softmax(F.linear(q, mem_k) * q.shape[-1] ** -0.5, dim=-1) @ mem_v


@pytest.mark.parametrize("fn, q_shape", [(_memory_attention_4d, (B, H, T, D)),
                                         (_memory_attention_by_linear, (B, T, D))], ids=["matmul_4d", "linear_3d"])
def test_attention_against_a_shared_memory(fn, q_shape):
    """The memory is read through a stride-0 view; its gradients are summed over batch and heads."""
    check(fn, torch.randn(*q_shape), torch.randn(9, D), torch.randn(9, D))


# ------------------------------------------------------------------------------------------------
# einsum scores in another layout than (..., queries, keys)
# ------------------------------------------------------------------------------------------------
def _einsum_heads_last(q, k, v):  # (B, N, H, d) tensors
    s = torch.einsum("bqhd,bkhd->bqkh", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bqkh,bkhd->bqhd", s.softmax(dim=2), v)


def _einsum_keys_before_queries(q, k, v):  # (B, H, N, d) tensors, scores (B, H, keys, queries)
    s = torch.einsum("bhqd,bhkd->bhkq", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhkq,bhkd->bhqd", s.softmax(dim=-2), v)


@pytest.mark.parametrize("fn, layout", [(_einsum_heads_last, "bnhd"), (_einsum_keys_before_queries, "bhnd")],
                         ids=["heads_last", "keys_before_queries"])
def test_einsum_scores_in_another_layout(fn, layout):
    q, k, v = qkv()
    if layout == "bnhd":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    check(fn, q, k, v)


def test_einsum_softmax_over_the_queries_is_not_attention():
    def f(q, k, v):
        s = torch.einsum("bhqd,bhkd->bhqk", q, k)
        return torch.einsum("bhqk,bhkd->bhqd", s.softmax(dim=2), v)

    _negative(f, *qkv(), reason="not the last dim")
