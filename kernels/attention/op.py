"""The `flashfuse::attention` op: fake impl, autograd formula, and the dispatch to the Triton kernels
(CUDA tensors, or CPU tensors under TRITON_INTERPRET=1) or to the chunked PyTorch reference.

Layout: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) with any strides; Hq % Hkv == 0 (GQA by
index mapping). Each side tensor is a 4-D view broadcastable to (B, Hq, Nq, Nk) (size-1 dims broadcast).
`score_mod` is the text form of the captured expression (see score_mod.py). `rng` is an int64 tensor
[seed, offset] on q's device when dropout is active, else None. `precision` ("tf32"/"ieee") applies to
fp32 inputs. `empty_rows_zero`: query rows with nothing kept (every score masked) give 0 instead of NaN or
the uniform average (the user zeroed the masked probabilities after the softmax). Returns out
(B, Hq, Nq, Dv) — stored (B, Nq, Hq, Dv)-contiguous so the usual `transpose(1, 2).reshape(B, N, H*Dv)` is
free — and the log-sum-exp (B, Hq, Nq) in fp32 (natural log).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from flashfuse.kernels import registration
from flashfuse.kernels.attention import codegen, dropout, mask_recognition, reference


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


def device_mask_check_enabled() -> bool:
    """Calls that do not recognize masks on the host (graphs captured in CUDA graphs) check a tril side on the
    device instead (mask_check.py), unless FLASHFUSE_DEVICE_MASK_CHECK=0. Read when the op runs."""
    return os.environ.get("FLASHFUSE_DEVICE_MASK_CHECK", "1") != "0"


def _device_mask_check(recognize_masks: bool, sides):
    """mask_check.py for a call that takes the device check, else None."""
    if recognize_masks or not sides or not device_mask_check_enabled():
        return None
    from flashfuse.kernels.attention import mask_check
    return mask_check


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


# Whether a backward is expected in this process: set by the attention pass when it rewrites attention whose
# inputs require grad (a training graph), and by the autograd formula's forward. A forward's first call of each
# shape then starts compiling the backward's kernels in the background (triton_impl.warm_backward), unless they
# were queued at compile time (`build_ahead`) or FLASHFUSE_WARM_BACKWARD=0.
_BACKWARD_EXPECTED = False


def expect_backward() -> None:
    global _BACKWARD_EXPECTED
    _BACKWARD_EXPECTED = True


def _backward_builds_on() -> bool:
    return os.environ.get("FLASHFUSE_WARM_BACKWARD", "1") != "0"


def _warm_backward() -> bool:
    return _BACKWARD_EXPECTED and _backward_builds_on()


def build_ahead(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, recognize_masks=True,
                empty_rows_zero=False, backward=False) -> bool:
    """Called at compile time with stand-ins laid out like a flashfuse::attention call's arguments (the sides
    with their values: masks are recognized from them as the call will): queue the Triton builds its first call,
    and with `backward` its backward's, will need (triton_impl.build_ahead). Not for graphs captured in CUDA
    graphs (`recognize_masks` off: the calls take the device mask check), nor with FLASHFUSE_BUILD_AHEAD=0 (or
    FLASHFUSE_WARM_BACKWARD=0 for the backward's builds). Returns whether builds were queued."""
    if not (recognize_masks and use_triton(q) and os.environ.get("FLASHFUSE_BUILD_AHEAD", "1") != "0"
            and _has_triton_impl()):
        return False
    bits = _empty_bits(q, k, dropout_p, rng)
    score_mod, sides, _ = mask_recognition.specialize(score_mod, sides, q.shape[2], k.shape[2])
    return _triton().build_ahead(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision,
                                 bits if bits.numel() else None, empty_rows_zero,
                                 backward and _backward_builds_on())


# Registered with a plain torch.library.Library, not custom_op (kernels/registration.py says why).
_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor[] sides, float[] scalars, str score_mod, float dropout_p, "
           "Tensor? rng, str precision, bool recognize_masks=True, bool empty_rows_zero=False) "
           "-> (Tensor, Tensor, Tensor)")
_BACKWARD_SCHEMA = ("(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor[] sides, "
                    "float[] scalars, str score_mod, float dropout_p, Tensor? rng, bool[] side_needs_grad, "
                    "str precision, bool recognize_masks=True, Tensor? dropout_bits=None, bool empty_rows_zero=False) "
                    "-> (Tensor, Tensor, Tensor, Tensor[])")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sides: list[torch.Tensor],
              scalars: list[float], score_mod: str, dropout_p: float, rng: Optional[torch.Tensor],
              precision: str, recognize_masks: bool = True, empty_rows_zero: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CPU/CUDA kernel of flashfuse::attention: out, the row stats (B, H, 2, Nq) fp32 (row max and log2
    of the row sum, kept apart so rows of huge fills keep their gradient; `reference.row_lse` joins them)
    and the dropout's keep bits, which the backward
    reads instead of drawing again (`_empty_bits`: an empty tensor when there are none).
    `recognize_masks=False` keeps mask sides as tensors (no run-time recognition, mask_recognition.py): the
    pass sets it for graphs captured in CUDA graphs, whose replays never call back here."""
    bits = _empty_bits(q, k, dropout_p, rng)
    saved = bits if bits.numel() else None
    if use_triton(q) and _has_triton_impl():
        checker = _device_mask_check(recognize_masks, sides)
        checked = (checker.forward(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, saved,
                                   empty_rows_zero) if checker else None)
        if checked is not None:
            out, lse = checked
        else:
            if recognize_masks:
                score_mod, sides, _ = mask_recognition.specialize(score_mod, sides, q.shape[2], k.shape[2])
            out, lse = _triton().attention_forward(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision,
                                                   bits=saved, empty_rows_zero=empty_rows_zero,
                                                   warm_backward_too=_warm_backward())
    else:
        out, lse = reference.attention_forward(q, k, v, sides, scalars, score_mod, dropout_p, rng, bits=saved,
                                               empty_rows_zero=empty_rows_zero)
    # the fake impl promises these layouts; compiled graphs rely on the strides
    return as_bnhd(out), lse.contiguous(), bits


def _empty_bits(q, k, dropout_p, rng):
    """The forward's keep bits, uninitialised: (B, Hq, Nq, ceil(Nk / 8)) uint8 when the dropout is on and
    `dropout.saves_bits` keeps them, else an empty tensor (the backward draws again)."""
    if dropout_p > 0 and rng is not None and dropout.saves_bits(k.shape[2], q.shape[-1], q.element_size()):
        return q.new_empty(dropout.bits_shape(q.shape[0], q.shape[1], q.shape[2], k.shape[2]), dtype=torch.uint8)
    return q.new_empty((0,), dtype=torch.uint8)


def _attention_fake(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, recognize_masks=True,
                    empty_rows_zero=False):
    bsz, hq, nq, _ = q.shape
    return _empty_out(q, v), q.new_empty((bsz, hq, 2, nq), dtype=torch.float32), _empty_bits(q, k, dropout_p, rng)


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, sides: list[torch.Tensor],
                       scalars: list[float], score_mod: str, dropout_p: float,
                       rng: Optional[torch.Tensor], side_needs_grad: list[bool], precision: str,
                       recognize_masks: bool = True, dropout_bits: Optional[torch.Tensor] = None,
                       empty_rows_zero: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The CPU/CUDA kernel of flashfuse::attention_backward: dq, dk, dv and the gradients of the sides whose
    `side_needs_grad` is set (in order). `dropout_bits`: the forward's third output (empty: draw again).
    `empty_rows_zero` matters to the reference only: the kernels give rows whose log2 sum is -inf no gradient."""
    bits = dropout_bits if dropout_bits is not None and dropout_bits.numel() and dropout_p > 0 else None
    triton = use_triton(q) and _has_triton_impl()
    spelled = rows_of = score_mod  # as the graph wrote it, and as mask recognition rewrites it below
    checker = _device_mask_check(recognize_masks, sides) if triton else None
    checked = checker.backward(dout, q, k, v, out, lse, sides, scalars, score_mod, dropout_p, rng, side_needs_grad,
                               precision, bits) if checker else None
    if checked is not None:
        dq, dk, dv, dsides = checked
    elif triton:
        n_all = len(sides)
        kept = list(range(n_all))
        if recognize_masks:
            score_mod, sides, kept = mask_recognition.specialize(score_mod, sides, q.shape[2], k.shape[2],
                                                                 side_needs_grad)
            rows_of = score_mod
        needs = [side_needs_grad[i] for i in kept]
        dq, dk, dv, dkept = _triton().attention_backward(
            dout, q, k, v, out, lse, sides, scalars, score_mod, dropout_p, rng, needs, precision, bits=bits)
        dsides = [None] * n_all
        for i, d in zip(kept, dkept):
            dsides[i] = d
    else:
        dq, dk, dv, dsides = reference.attention_backward(
            dout, q, k, v, sides, scalars, score_mod, dropout_p, rng, side_needs_grad,
            dropout_mask=None if bits is None else dropout.unpack_bits(bits, k.shape[2]),
            empty_rows_zero=empty_rows_zero)
    # eager's NaNs where a row may be empty, as the graph spelled the mask; none where the recognized mask (the
    # same mask) proves every row keeps a key: a tril buffer read as causal. Session 17: that check's kernels took
    # ~35 us of each GPT-2 backward (H100), on rows that could never be empty.
    nan_rows = None
    if triton and not empty_rows_zero and codegen.neg_inf_rows(rows_of, q.shape[2], k.shape[2]) is not None:
        nan_rows = codegen.neg_inf_rows(spelled, q.shape[2], k.shape[2])
    if nan_rows:
        _eager_nans_of_empty_rows(dq, dk, dv, lse, nan_rows == "additive")
    return (as_bnhd(dq), as_bnhd(dk), as_bnhd(dv),
            [d.contiguous() for d, g in zip(dsides, side_needs_grad) if g])


def _eager_nans_of_empty_rows(dq, dk, dv, lse, additive: bool) -> None:
    """Eager's gradients where a row has every score -inf. Its softmax is NaN, and P^T dO spreads the NaN over
    all of dV of that batch and (key) head. A -inf fill's gradient is zero (masked_fill / where), so dQ and dK
    keep the kernels' values; an additive -inf passes the NaN on: that row of dQ, and all of dK of the head.
    The kernels give such rows P = 0 (their log2 sum, plane 1 of the row stats, is -inf)."""
    b, hkv = dv.shape[0], dv.shape[1]
    rows = lse[:, :, 1, :] == float("-inf")  # (B, Hq, Nq)
    heads = rows.any(-1).view(b, hkv, -1).any(-1)[:, :, None, None]  # (B, Hkv, 1, 1)
    dv.masked_fill_(heads, float("nan"))
    if additive:
        dk.masked_fill_(heads, float("nan"))
        dq.masked_fill_(rows[..., None], float("nan"))


def _attention_backward_fake(dout, q, k, v, out, lse, sides, scalars, score_mod, dropout_p, rng, side_needs_grad,
                             precision, recognize_masks=True, dropout_bits=None, empty_rows_zero=False):
    dsides = [s.new_empty(s.shape) for s, g in zip(sides, side_needs_grad) if g]
    return empty_bnhd(q.shape, q), empty_bnhd(k.shape, k), empty_bnhd(v.shape, v), dsides


_attention_op = registration.define("attention", _SCHEMA, attention, _attention_fake)
_attention_backward_op = registration.define("attention_backward", _BACKWARD_SCHEMA, attention_backward,
                                             _attention_backward_fake)


class _AttentionFunction(torch.autograd.Function):
    """Autograd of flashfuse::attention. The sides are separate arguments so that a learned bias gets its
    gradient (autograd does not look inside lists)."""

    @staticmethod
    def forward(ctx, meta, q, k, v, rng, *sides):
        scalars, score_mod, dropout_p, precision, recognize_masks, empty_rows_zero = meta
        if any(ctx.needs_input_grad[1:4]):
            expect_backward()
        with torch._C._AutoDispatchBelowAutograd():
            out, lse, bits = _attention_op(q, k, v, list(sides), list(scalars), score_mod, dropout_p, rng,
                                           precision, recognize_masks, empty_rows_zero)
        ctx.meta = meta
        ctx.has_rng = rng is not None
        ctx.side_needs_grad = [bool(ctx.needs_input_grad[5 + i] and s.is_floating_point())
                               for i, s in enumerate(sides)]
        ctx.save_for_backward(q, k, v, out, lse, bits, *sides, *([rng] if rng is not None else []))
        ctx.mark_non_differentiable(lse, bits)
        return out, lse, bits

    @staticmethod
    def backward(ctx, dout, dlse, dbits):
        scalars, score_mod, dropout_p, precision, recognize_masks, empty_rows_zero = ctx.meta
        saved = ctx.saved_tensors
        n_sides = len(ctx.side_needs_grad)
        q, k, v, out, lse, bits = saved[:6]
        sides = list(saved[6:6 + n_sides])
        rng = saved[6 + n_sides] if ctx.has_rng else None
        dq, dk, dv, dsides_some = _attention_backward_op(
            dout, q, k, v, out, lse, sides, list(scalars), score_mod, dropout_p, rng, ctx.side_needs_grad,
            precision, recognize_masks, bits, empty_rows_zero)
        it = iter(dsides_some)
        dsides = [next(it) if g else None for g in ctx.side_needs_grad]
        return (None, dq, dk, dv, None, *dsides)


def _attention_differentiable(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, recognize_masks=True,
                              empty_rows_zero=False):
    meta = (tuple(scalars), score_mod, dropout_p, precision, recognize_masks, empty_rows_zero)
    return tuple(_AttentionFunction.apply(meta, q, k, v, rng, *sides))


registration.define_autograd("attention", _attention_op, _attention_differentiable)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: str,
                    sides: Sequence[torch.Tensor] = (), scalars: Sequence[float] = (),
                    dropout_p: float = 0.0, rng: Optional[torch.Tensor] = None,
                    precision: str = "tf32") -> torch.Tensor:
    """Convenience wrapper returning only the output."""
    return torch.ops.flashfuse.attention(q, k, v, list(sides), list(scalars), score_mod, dropout_p, rng,
                                         precision)[0]
