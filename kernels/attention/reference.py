"""Exact PyTorch reference for flashfuse::attention, chunked over query blocks: O(N·block) memory.

Used for CPU tensors when Triton's interpreter is off, and as the oracle in tests. Dropout here draws its
own mask from a torch.Generator seeded by (seed, query block), so forward and backward agree; tests that
compare with the Triton kernels pass the kernels' mask explicitly.
"""
from __future__ import annotations

import math

import torch

from flashfuse.kernels.attention import dropout
from flashfuse.kernels.attention import score_mod as sm

QUERY_BLOCK = 128


def _expand_kv(t: torch.Tensor, hq: int) -> torch.Tensor:
    """GQA: view (B, Hkv, N, D) as (B, Hq, N, D) without copying (expand of a new axis)."""
    bsz, hkv, n, d = t.shape
    if hkv == hq:
        return t
    return t[:, :, None].expand(bsz, hkv, hq // hkv, n, d).reshape(bsz, hq, n, d)


def _env(s, sides, scalars, q0, nq, nk, compute_dtype):
    """Values of the score_mod symbols for query rows [q0, q0 + s.shape[2]) given raw scores s."""
    bsz, hq, rows, _ = s.shape
    dev = s.device
    env = {
        "score": s,
        "b": torch.arange(bsz, device=dev).view(-1, 1, 1, 1),
        "h": torch.arange(hq, device=dev).view(1, -1, 1, 1),
        "q_idx": torch.arange(q0, q0 + rows, device=dev).view(1, 1, -1, 1),
        "kv_idx": torch.arange(nk, device=dev).view(1, 1, 1, -1),
        "Nq": nq,
        "Nk": nk,
    }
    for i, t in enumerate(sides):
        t = t[:, :, q0:q0 + rows] if t.shape[2] != 1 else t
        env[f"side{i}"] = t.to(compute_dtype)
    for i, x in enumerate(scalars):
        env[f"scalar{i}"] = x
    return env


def _eval(expr, env, compute_dtype):
    s = env["score"]
    out = sm.evaluate(expr, env)
    return torch.as_tensor(out, device=s.device, dtype=compute_dtype).expand(s.shape)


def _scores(qs, k, compute_dtype):
    return torch.matmul(qs.to(compute_dtype), k.to(compute_dtype).transpose(-2, -1))


def _dropout_mask(rng, shape, q0, p, device):
    """The reference's own keep mask (not the kernels' bits), at the kernels' quantised rate."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(rng[0].item()) * 1000003 + q0)
    bits = torch.randint(0, dropout.KEEP_RANGE, shape, generator=gen)
    return (bits < dropout.keep_threshold(p)).to(device)


def _empty_rows(logits):
    """Rows with nothing kept: every value -inf or a huge fill (finfo.min), as the kernels mark them."""
    return logits.amax(-1) < -1.0e30


def attention_forward(q, k, v, sides, scalars, score_mod: str, dropout_p: float, rng,
                      dropout_mask=None, block: int = QUERY_BLOCK, bits=None, empty_rows_zero=False):
    """Returns out (B, Hq, Nq, Dv) in q's dtype and the row stats (B, Hq, 2, Nq) fp32 the kernels save: the
    row max (natural units) and log2 of the row sum relative to it (`row_lse` joins them). `bits`: a uint8
    tensor of `dropout.bits_shape` that receives the keep flags (packed, `dropout.pack_bits`).
    `empty_rows_zero`: rows with nothing kept give out 0 and log2(sum) -inf (the kernels' flag of the same
    name)."""
    expr = sm.from_text(score_mod)
    bsz, hq, nq, _ = q.shape
    nk = k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    kx, vx = _expand_kv(k, hq), _expand_kv(v, hq)
    out = torch.empty(bsz, nq, hq, v.shape[-1], dtype=q.dtype, device=q.device).transpose(1, 2)
    stats = torch.empty(bsz, hq, 2, nq, dtype=torch.float32, device=q.device)
    for q0 in range(0, nq, block):
        qs = q[:, :, q0:q0 + block]
        env = _env(_scores(qs, kx, compute), sides, scalars, q0, nq, nk, compute)
        logits = _eval(expr, env, compute)
        row_max = logits.amax(-1)
        safe = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
        e = torch.exp(logits - safe[..., None])
        row_sum = e.sum(-1)
        log2_sum = torch.log2(row_sum)  # -inf: nothing kept
        p = e / row_sum[..., None]  # the softmax (0 / 0 = NaN on rows with nothing kept, as eager)
        if dropout_p > 0 and rng is not None:
            keep = (dropout_mask[:, :, q0:q0 + block] if dropout_mask is not None
                    else _dropout_mask(rng, p.shape, q0, dropout_p, p.device))
            p = p * keep * dropout.keep_scale(dropout_p)
            if bits is not None:
                bits[:, :, q0:q0 + block] = dropout.pack_bits(keep.expand(p.shape))
        if empty_rows_zero:
            empty = _empty_rows(logits)
            p = p.masked_fill(empty[..., None], 0.0)
            log2_sum = log2_sum.masked_fill(empty, float("-inf"))
        out[:, :, q0:q0 + block] = torch.matmul(p, vx.to(compute)).to(q.dtype)
        stats[:, :, 0, q0:q0 + block] = row_max.float()
        stats[:, :, 1, q0:q0 + block] = log2_sum.float()
    return out, stats


def row_lse(stats: torch.Tensor) -> torch.Tensor:
    """The natural log-sum-exp (B, H, Nq) of each row from the saved stats (for tests and users)."""
    return stats[:, :, 0].double() + stats[:, :, 1].double() * math.log(2.0)  # -inf where nothing is kept


def _reduce_to(grad: torch.Tensor, shape) -> torch.Tensor:
    """Sum a (B, Hq, rows, Nk) gradient over the dims a side tensor broadcasts along."""
    dims = [i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1]
    return grad.sum(dim=dims, keepdim=True) if dims else grad


def attention_backward(dout, q, k, v, sides, scalars, score_mod: str, dropout_p: float, rng,
                       side_needs_grad, dropout_mask=None, block: int = QUERY_BLOCK, empty_rows_zero=False):
    """FlashAttention's backward formulas, one query block at a time (O(N·block) memory). With
    `empty_rows_zero`, rows with nothing kept carry no gradient (their output is the constant 0):
    dV += Pdᵀ·dO;  dP = dO·Vᵀ (∘ dropout);  dL = P∘(dP − rowsum(dP∘P));  dscore = dL·∂mod/∂score;
    dQ = dscore·K;  dK += dscoreᵀ·Q;  dside_i += reduce(dL·∂mod/∂side_i)."""
    import sympy

    expr = sm.from_text(score_mod)
    d_score = sm.real_diff(expr, sm.score)
    d_sides = {i: sm.real_diff(expr, sm.side(i)) for i, g in enumerate(side_needs_grad) if g}
    bsz, hq, nq, _ = q.shape
    nk = k.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    kx, vx = _expand_kv(k, hq).to(compute), _expand_kv(v, hq).to(compute)
    dq = torch.empty_like(q)
    dkx = torch.zeros(kx.shape, dtype=compute, device=q.device)
    dvx = torch.zeros(vx.shape, dtype=compute, device=q.device)
    dsides = [torch.zeros(s.shape, dtype=compute, device=q.device) if g else None
              for s, g in zip(sides, side_needs_grad)]
    for q0 in range(0, nq, block):
        qs = q[:, :, q0:q0 + block].to(compute)
        rows = qs.shape[2]
        env = _env(_scores(qs, kx, compute), sides, scalars, q0, nq, nk, compute)
        logits = _eval(expr, env, compute)
        p = torch.softmax(logits, dim=-1)
        if empty_rows_zero:
            p = p.masked_fill(_empty_rows(logits)[..., None], 0.0)
        pd, scale_keep = p, None
        if dropout_p > 0 and rng is not None:
            keep = (dropout_mask[:, :, q0:q0 + block] if dropout_mask is not None
                    else _dropout_mask(rng, p.shape, q0, dropout_p, p.device))
            scale_keep = keep.to(compute) * dropout.keep_scale(dropout_p)
            pd = p * scale_keep
        do = dout[:, :, q0:q0 + block].to(compute)
        dvx += pd.transpose(-2, -1) @ do
        dp = do @ vx.transpose(-2, -1)
        if scale_keep is not None:
            dp = dp * scale_keep
        dl = p * (dp - (dp * p).sum(-1, keepdim=True))
        dl = torch.where(p == 0, torch.zeros_like(dl), dl)  # masked entries carry no gradient
        ds = dl * _eval(d_score, env, compute)
        dq[:, :, q0:q0 + block] = (ds @ kx).to(q.dtype)
        dkx += ds.transpose(-2, -1) @ qs
        for i, de in d_sides.items():
            g = torch.where(dl == 0, torch.zeros_like(dl), dl * _eval(de, env, compute))
            rows_shape = list(sides[i].shape)
            if rows_shape[2] != 1:
                rows_shape[2] = rows
                dsides[i][:, :, q0:q0 + rows] += _reduce_to(g, rows_shape)
            else:
                dsides[i] += _reduce_to(g, rows_shape)
    dk = _reduce_gqa(dkx, k.shape[1])
    dv = _reduce_gqa(dvx, v.shape[1])
    dsides_out = [d.to(s.dtype) if d is not None else None for d, s in zip(dsides, sides)]
    return dq, dk.to(k.dtype), dv.to(v.dtype), dsides_out


def _reduce_gqa(g: torch.Tensor, hkv: int) -> torch.Tensor:
    """Sum the gradient of each repeated K/V head back onto the shared head."""
    bsz, hq, n, d = g.shape
    return g.view(bsz, hkv, hq // hkv, n, d).sum(2) if hq != hkv else g
