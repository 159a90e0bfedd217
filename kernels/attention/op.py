"""The `flashfuse::attention` op: fake impl, autograd formula, and the dispatch to the Triton kernels
(CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) or to the chunked PyTorch reference.

Layout: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) with any strides; Hq % Hkv == 0 (GQA by
index mapping). Each side tensor is a 4-D view broadcastable to (B, Hq, Nq, Nk) (size-1 dims broadcast).
`score_mod` is the text form of the captured expression (see score_mod.py). `rng` is an int64 tensor
[seed, offset] on q's device when dropout is active, else None. `precision` ("tf32"/"ieee") applies to
fp32 inputs. Returns out (B, Hq, Nq, Dv) — stored (B, Nq, Hq, Dv)-contiguous so the usual
`transpose(1, 2).reshape(B, N, H*Dv)` is free — and the log-sum-exp (B, Hq, Nq) in fp32 (natural log).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from flashfuse.kernels.attention import mask_recognition, reference


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors run the Triton kernels; CPU tensors do so only under Triton's interpreter."""
    return t.is_cuda or (t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


_TRITON_IMPL = None


def _triton():
    global _TRITON_IMPL
    if _TRITON_IMPL is None:
        from flashfuse.kernels.attention import triton_impl  # imported lazily: triton is heavy
        _TRITON_IMPL = triton_impl
    return _TRITON_IMPL


def _has_triton_impl() -> bool:
    if _TRITON_IMPL is not None:  # every call asks: the common answer costs one global lookup
        return True
    try:
        _triton()
        return True
    except ImportError:
        return False


def empty_bnhd(shape, like: torch.Tensor) -> torch.Tensor:
    """A (B, H, N, D) tensor stored (B, N, H, D)-contiguous: the layout of q/k/v split off a projection
    (`view(B, N, H, D).transpose(1, 2)`), so the model's transpose back to (B, N, H*D) costs nothing.
    The output and the q/k/v gradients use it."""
    bsz, h, n, d = shape
    return torch.empty(bsz, n, h, d, dtype=like.dtype, device=like.device).transpose(1, 2)


def as_bnhd(t: torch.Tensor) -> torch.Tensor:
    """`t` in the layout of `empty_bnhd`; no copy when it already is (the kernels' usual case)."""
    bsz, h, n, d = t.shape
    if t.stride() == (n * h * d, d, h * d, 1) or t.numel() == 0:
        return t
    return empty_bnhd(t.shape, t).copy_(t)


def _empty_out(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    bsz, hq, nq, _ = q.shape
    return empty_bnhd((bsz, hq, nq, v.shape[-1]), q)


@torch.library.custom_op("flashfuse::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sides: list[torch.Tensor],
              scalars: list[float], score_mod: str, dropout_p: float, rng: Optional[torch.Tensor],
              precision: str, recognize_masks: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`recognize_masks=False` keeps mask sides as tensors (no run-time recognition, mask_recognition.py):
    the pass sets it for graphs captured in CUDA graphs, whose replays never call back here."""
    if use_triton(q) and _has_triton_impl():
        if recognize_masks:
            score_mod, sides, _ = mask_recognition.specialize(score_mod, sides, q.shape[2], k.shape[2])
        out, lse = _triton().attention_forward(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision)
    else:
        out, lse = reference.attention_forward(q, k, v, sides, scalars, score_mod, dropout_p, rng)
    # the fake impl promises these layouts; compiled graphs rely on the strides
    return as_bnhd(out), lse.contiguous()


@attention.register_fake
def _(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, recognize_masks=True):
    bsz, hq, nq, _ = q.shape
    return _empty_out(q, v), q.new_empty((bsz, hq, nq), dtype=torch.float32)


@torch.library.custom_op("flashfuse::attention_backward", mutates_args=())
def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, sides: list[torch.Tensor],
                       scalars: list[float], score_mod: str, dropout_p: float,
                       rng: Optional[torch.Tensor], side_needs_grad: list[bool], precision: str,
                       recognize_masks: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Returns dq, dk, dv and the gradients of the sides whose `side_needs_grad` is set (in order)."""
    if use_triton(q) and _has_triton_impl():
        n_all = len(sides)
        kept = list(range(n_all))
        if recognize_masks:
            score_mod, sides, kept = mask_recognition.specialize(score_mod, sides, q.shape[2], k.shape[2],
                                                                 side_needs_grad)
        needs = [side_needs_grad[i] for i in kept]
        dq, dk, dv, dkept = _triton().attention_backward(
            dout, q, k, v, out, lse, sides, scalars, score_mod, dropout_p, rng, needs, precision)
        dsides = [None] * n_all
        for i, d in zip(kept, dkept):
            dsides[i] = d
    else:
        dq, dk, dv, dsides = reference.attention_backward(
            dout, q, k, v, sides, scalars, score_mod, dropout_p, rng, side_needs_grad)
    return (as_bnhd(dq), as_bnhd(dk), as_bnhd(dv),
            [d.contiguous() for d, g in zip(dsides, side_needs_grad) if g])


@attention_backward.register_fake
def _(dout, q, k, v, out, lse, sides, scalars, score_mod, dropout_p, rng, side_needs_grad, precision,
      recognize_masks=True):
    dsides = [s.new_empty(s.shape) for s, g in zip(sides, side_needs_grad) if g]
    return empty_bnhd(q.shape, q), empty_bnhd(k.shape, k), empty_bnhd(v.shape, v), dsides


def _setup_context(ctx, inputs, output):
    q, k, v, sides, scalars, score_mod, dropout_p, rng, precision = inputs[:9]
    ctx.recognize_masks = inputs[9]
    # the dispatcher drops a trailing argument equal to its default, and the backward must return one
    # gradient per argument it was given
    ctx.n_inputs = 9 if ctx.recognize_masks else 10
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *sides, *([rng] if rng is not None else []))
    ctx.n_sides = len(sides)
    ctx.has_rng = rng is not None
    ctx.side_needs_grad = [bool(s.requires_grad and s.is_floating_point()) for s in sides]
    ctx.meta = (list(scalars), score_mod, dropout_p, precision)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    saved = ctx.saved_tensors
    q, k, v, out, lse = saved[:5]
    sides = list(saved[5:5 + ctx.n_sides])
    rng = saved[5 + ctx.n_sides] if ctx.has_rng else None
    scalars, score_mod, dropout_p, precision = ctx.meta
    dq, dk, dv, dsides_some = torch.ops.flashfuse.attention_backward(
        dout, q, k, v, out, lse, sides, scalars, score_mod, dropout_p, rng, ctx.side_needs_grad, precision,
        ctx.recognize_masks)
    it = iter(dsides_some)
    dsides = [next(it) if g else None for g in ctx.side_needs_grad]
    return (dq, dk, dv, dsides, [None] * len(scalars), None, None, None, None, None)[:ctx.n_inputs]


attention.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: str,
                    sides: Sequence[torch.Tensor] = (), scalars: Sequence[float] = (),
                    dropout_p: float = 0.0, rng: Optional[torch.Tensor] = None,
                    precision: str = "tf32") -> torch.Tensor:
    """Convenience wrapper returning only the output."""
    return torch.ops.flashfuse.attention(q, k, v, list(sides), list(scalars), score_mod, dropout_p, rng,
                                         precision)[0]
