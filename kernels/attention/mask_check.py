"""Mask recognition on the device, for calls that cannot check a mask on the host (CUDA graphs).

Run-time recognition (mask_recognition.py) reads the mask on the host: a sync, illegal while a CUDA graph
is captured, and a replay would reuse the captured answer whatever the mask holds by then. So graphs
lowered for CUDA graphs call the op with `recognize_masks=False`, and used to load the mask on every tile
and skip no key block. Here instead:
1. `candidate` picks, from the expression and the shapes alone (no data read), the side that could be the
   causal mask: used only as `side == 0` / `side != 0`, full (Nq, Nk) trailing dims, no gradient, Nq == Nk.
2. `causal_check` launches a small kernel that reads that side and writes flag = 1 if its nonzero pattern
   is `kv_idx <= q_idx` for every batch and head it has, else 0 (4 MB read for a 1024² fp32 tril buffer).
3. Both kernel variants are launched: the causal one (the side replaced by the index predicate: key blocks
   above the diagonal skipped, no mask loads) runs when flag == 1, the general one when flag == 0; the
   other exits at once (`FLAG_WANT` in the templates). All of it is captured and replayed, so a mask changed
   between replays is checked again: never a wrong number.
A mask with a batch dim > 1 (HF padding masks) is checked instead for right padding (`padding_check`): the
kept keys of each (b, h) are counted on the device, and flag 2 runs causal & key counts, flag 3 key counts
alone (encoders), both with the counts as loop bounds (mask_recognition's key counts). A tril buffer shared
by the batch keeps the cheaper causal check.
On by default since measured on the H100 (GPT-2 8x1024 under reduce-overhead: 28.0 -> 23.1 ms per step,
docs/perf-notes.md); FLASHFUSE_DEVICE_MASK_CHECK=0 switches it off (the mask is then loaded on every tile).
"""
from __future__ import annotations

import functools

import sympy
import torch
import triton
import triton.language as tl

from flashfuse.kernels.attention import mask_recognition
from flashfuse.kernels.attention import score_mod as sm
from flashfuse.kernels.attention import triton_impl as ti
from flashfuse.kernels.attention.op import empty_bnhd

CAUSAL = sm.kv_idx <= sm.q_idx  # the predicate checked (== bottom-right alignment when Nq == Nk)


def candidate(score_mod: str, sides: list, nq: int, nk: int, needs_grad) -> tuple | None:
    """(side index, specialized score_mod, indices of the sides it keeps) or None. Reads no tensor data."""
    if nq != nk or any(needs_grad):
        return None
    expr = sm.from_text(score_mod)
    for i, t in enumerate(sides):
        if t.dim() != 4 or tuple(t.shape[-2:]) != (nq, nk) or (t.is_floating_point() and t.requires_grad):
            continue
        conds = mask_recognition.side_conditions(expr, i)
        if not conds:
            continue
        new = expr.xreplace({c: (CAUSAL if isinstance(c, sympy.Ne) else sympy.Not(CAUSAL)) for c in conds})
        kept = [j for j in range(len(sides)) if j != i]
        new = new.xreplace({sm.side(old): sm.side(pos) for pos, old in enumerate(kept)})
        return i, sm.to_text(new), kept
    return None


@triton.jit
def causal_check_kernel(Side, stride_b, stride_h, stride_m, stride_n, H1, Nq, Nk, Flag,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Flag[0] = 0 when any element of Side (B1, H1, Nq, Nk) has (side != 0) != (kv_idx <= q_idx)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H1
    h = bh % H1
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
    s = tl.load(Side + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + offs_m[:, None] * stride_m
                + offs_n[None, :] * stride_n, mask=inside, other=0)
    wrong = inside & ((s != 0) != (offs_n[None, :] <= offs_m[:, None]))
    if tl.sum(wrong.to(tl.int32)) > 0:
        tl.store(Flag, 0)


def causal_check(side: torch.Tensor) -> torch.Tensor:
    """An int32 tensor [1]: 1 if `side` (B1, H1, N, N) is nonzero exactly where kv_idx <= q_idx, else 0."""
    flag = torch.ones(1, dtype=torch.int32, device=side.device)
    b1, h1, nq, nk = side.shape
    block = ti.INTERPRET_BLOCK if ti.INTERPRET else 64
    if side.dtype == torch.bool:
        side = side.view(torch.uint8)  # same bytes; a plain integer load everywhere
    causal_check_kernel[(triton.cdiv(nq, block), triton.cdiv(nk, block), b1 * h1)](
        side, *side.stride(), h1, nq, nk, flag, BLOCK_M=block, BLOCK_N=block)
    return flag


# ---- key padding under CUDA graphs: per-batch masks (HF causal LMs and encoders with a padding mask) ----
FLAG_GENERAL, FLAG_CAUSAL, FLAG_CAUSAL_COUNTS, FLAG_COUNTS = 0, 1, 2, 3


@functools.lru_cache(maxsize=256)
def padding_variants(score_mod: str, i: int) -> tuple:
    """((flag, score_mod), ...) with side i read as key counts: causal & right padding, then right padding
    alone (mask_recognition._wrap_causal writes both, side i becoming the counts). Empty when the masked scores
    are not a fill (a soft mask: -inf would change them). Cached: captured calls ask on every call."""
    expr = sm.from_text(score_mod)
    conds = mask_recognition.side_conditions(expr, i)
    out = []
    for flag, causal in ((FLAG_CAUSAL_COUNTS, True), (FLAG_COUNTS, False)):
        replaced: dict = {}
        new = mask_recognition._wrap_causal(expr, conds, replaced, i, (causal, "counts", None, True))
        if replaced:
            out.append((flag, sm.to_text(new)))
    return tuple(out)


@triton.jit
def key_count_kernel(Side, stride_b, stride_h, stride_m, stride_n, H1, Nq, Nk, Counts, BLOCK_N: tl.constexpr):
    """Counts[b * H1 + h] = the nonzeros in the last query row of Side[b, h]."""
    bh = tl.program_id(0)
    row = Side + (bh // H1).to(tl.int64) * stride_b + (bh % H1).to(tl.int64) * stride_h + (Nq - 1) * stride_m
    total = tl.zeros([BLOCK_N], tl.int32)
    for start in range(0, Nk, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        total += (tl.load(row + offs * stride_n, mask=offs < Nk, other=0) != 0).to(tl.int32)
    tl.store(Counts + bh, tl.sum(total))


@triton.jit
def padding_check_kernel(Side, stride_b, stride_h, stride_m, stride_n, H1, Nq, Nk, Counts, Ok,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Ok[0] = 0 when Side's nonzero pattern is not `causal & kv_idx < count` somewhere, Ok[1] = 0 when it
    is not `kv_idx < count` (count: its (b, h)'s Counts); both 0 when a count is 0 (rows that keep no key)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    count = tl.load(Counts + bh)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
    s = tl.load(Side + (bh // H1).to(tl.int64) * stride_b + (bh % H1).to(tl.int64) * stride_h
                + offs_m[:, None] * stride_m + offs_n[None, :] * stride_n, mask=inside, other=0)
    nz = s != 0
    keep = offs_n[None, :] < count
    if tl.sum((inside & (nz != ((offs_n[None, :] <= offs_m[:, None]) & keep))).to(tl.int32)) > 0:
        tl.store(Ok, 0)
    if tl.sum((inside & (nz != keep)).to(tl.int32)) > 0:
        tl.store(Ok + 1, 0)
    if count < 1:
        tl.store(Ok, 0)
        tl.store(Ok + 1, 0)


@triton.jit
def choose_kernel(Ok, Flag):
    causal_counts = tl.load(Ok) != 0
    counts = tl.load(Ok + 1) != 0
    tl.store(Flag, tl.where(causal_counts, 2, tl.where(counts, 3, 0)))


def padding_check(side: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flag [1] int32, counts (B1, H1, 1, 1) int32) for a (B1, H1, N, N) mask, on the device: flag 2 when it
    is causal & right padding, 3 when it is right padding alone (every row alike), else 0; the counts are the
    kept keys of each (b, h)'s last row."""
    b1, h1, nq, nk = side.shape
    if side.dtype == torch.bool:
        side = side.view(torch.uint8)
    counts = torch.empty(b1, h1, 1, 1, dtype=torch.int32, device=side.device)
    ok = torch.ones(2, dtype=torch.int32, device=side.device)
    flag = torch.empty(1, dtype=torch.int32, device=side.device)
    block = ti.INTERPRET_BLOCK if ti.INTERPRET else 64  # the check's tiles
    row_block = ti.INTERPRET_BLOCK if ti.INTERPRET else 1024  # the count's steps along a row
    key_count_kernel[(b1 * h1,)](side, *side.stride(), h1, nq, nk, counts, BLOCK_N=row_block)
    padding_check_kernel[(triton.cdiv(nq, block), triton.cdiv(nk, block), b1 * h1)](
        side, *side.stride(), h1, nq, nk, counts, ok, BLOCK_M=block, BLOCK_N=block)
    choose_kernel[(1,)](ok, flag)
    return flag, counts


def _launch_check(score_mod, q, k, sides, needs_grad):
    """(flag, [(flag value, score_mod, sides)] of the specialized variants), the check launched; None when no
    side qualifies (the caller then takes the general path alone). A mask with a batch dim (HF padding masks)
    is checked for right padding, with or without causal (its counts are loop bounds); a mask shared by the
    batch (a tril buffer) for causal alone, which costs fewer launches."""
    if q.numel() == 0 or k.numel() == 0:
        return None
    cand = candidate(score_mod, sides, q.shape[2], k.shape[2], needs_grad)
    if cand is None:
        return None
    i, text, kept = cand
    if sides[i].shape[0] > 1 and mask_recognition.KEY_COUNTS:
        variants = padding_variants(score_mod, i)
        if variants:
            flag, counts = padding_check(sides[i])
            return flag, [(want, vtext, [counts if j == i else t for j, t in enumerate(sides)])
                          for want, vtext in variants]
    return causal_check(sides[i]), [(FLAG_CAUSAL, text, [sides[j] for j in kept])]


def forward(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, bits=None, empty_rows_zero=False):
    """(out, stats) from every variant under the device check, or None when no side qualifies. `bits` as in
    triton_impl.attention_forward: the variant that runs fills them."""
    checked = _launch_check(score_mod, q, k, sides, [False] * len(sides))
    if checked is None:
        return None
    flag, variants = checked
    out, stats = ti.attention_forward(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, flag,
                                      FLAG_GENERAL, bits=bits, empty_rows_zero=empty_rows_zero)
    for want, text, vsides in variants:
        ti.attention_forward(q, k, v, vsides, scalars, text, dropout_p, rng, precision, flag, want,
                             into=(out, stats), bits=bits, empty_rows_zero=empty_rows_zero)
    return out, stats


def backward(dout, q, k, v, out, stats, sides, scalars, score_mod, dropout_p, rng, side_needs_grad, precision,
             bits=None):
    """(dq, dk, dv, side gradients) from every variant under the device check, or None (as `forward`)."""
    checked = _launch_check(score_mod, q, k, sides, side_needs_grad)
    if checked is None:
        return None
    flag, variants = checked
    into = (empty_bnhd(q.shape, q), empty_bnhd(k.shape, k), empty_bnhd(v.shape, v),
            ti.backward_preprocess(out, dout, stats))
    ti.attention_backward(dout, q, k, v, out, stats, sides, scalars, score_mod, dropout_p, rng,
                          [False] * len(sides), precision, flag, FLAG_GENERAL, into=into, bits=bits)
    for want, text, vsides in variants:
        ti.attention_backward(dout, q, k, v, out, stats, vsides, scalars, text, dropout_p, rng,
                              [False] * len(vsides), precision, flag, want, into=into, bits=bits)
    return into[0], into[1], into[2], [None] * len(sides)
