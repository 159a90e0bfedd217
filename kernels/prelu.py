"""flashfuse::prelu — y = x if x > 0 else a * x, with a scalar slope or one slope per channel.

x is viewed as (outer, C, inner) around `channel_dim` (C = weight.numel(); a single slope uses C = 1).
The backward kernel writes dx and reduces the slope gradient sum(g * x over x <= 0) per channel in the
same pass (fp32 partial sums per program, added by torch; no atomics, so it is deterministic).

`zero_grad` says what dx is at exactly x == 0, where the spellings differ (the forward value is 0 for
all): dx = (one + slope * a) * g with (one, slope) = AT_ZERO[zero_grad]. 0 -> a * g (`F.prelu`,
`where(x > 0, x, a*x)`), 1 -> 0 (`relu(x) - a*relu(-x)`: relu'(0) = 0), 2 -> g (`where(x >= 0, x, a*x)`),
3 -> (1 + a) * g (`x.clamp(min=0) + a*x.clamp(max=0)`: both clamps pass the gradient at their bound), and
halves for the spellings that split it: `a * (x - |x|) / 2` (abs'(0) = 0, so a/2) and
`maximum(x, 0) + a * minimum(x, 0)` (a tie passes half to each side, so (1 + a) / 2).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from flashfuse.kernels.registration import define, define_autograd

ZERO_GRAD_SLOPE, ZERO_GRAD_ZERO, ZERO_GRAD_ONE, ZERO_GRAD_ONE_PLUS_SLOPE = 0, 1, 2, 3
# zero_grad -> (one, slope): dx at x == 0 is (one + slope * a) * g
AT_ZERO = ((0.0, 1.0), (0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 0.5), (0.5, 0.0), (0.5, 0.5), (0.5, 1.0), (1.0, 0.5))
ZERO_GRAD_OF = {pair: code for code, pair in enumerate(AT_ZERO)}
BLOCK = 1024


@triton.jit
def _prelu_fwd_kernel(x_ptr, w_ptr, y_ptr, R, L, C, CHANNEL_IS_COLUMN: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_L: tl.constexpr):
    # x as an (R, L) matrix: (outer, C) when the channels are contiguous (channel = column), else
    # (outer * C, inner) (channel = row % C): one division per row, none per element
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    mask = (rows[:, None] < R) & (cols[None, :] < L)
    offs = rows[:, None] * L + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CHANNEL_IS_COLUMN:
        w = tl.load(w_ptr + cols, mask=cols < L, other=0.0).to(tl.float32)[None, :]
    else:
        w = tl.load(w_ptr + rows % C, mask=rows < R, other=0.0).to(tl.float32)[:, None]
    y = tl.where(x > 0, x, w * x)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _prelu_bwd_kernel(g_ptr, x_ptr, w_ptr, dx_ptr, dw_part_ptr, C, INNER, K, k_per_prog,
                      ONE_AT_ZERO: tl.constexpr, SLOPE_AT_ZERO: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    # tile: BLOCK_C channels x BLOCK_K positions k = outer_index * INNER + inner_index
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    w = tl.load(w_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    k_lo = pid_k * k_per_prog
    for k0 in range(k_lo, k_lo + k_per_prog, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        kmask = ks < K
        outer = ks // INNER
        inner = ks % INNER
        offs = outer[None, :] * C * INNER + cs[:, None].to(tl.int64) * INNER + inner[None, :]
        m = cmask[:, None] & kmask[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
        wg = w[:, None] * g
        at_zero = ONE_AT_ZERO * g + SLOPE_AT_ZERO * wg
        dx = tl.where(x > 0, g, tl.where(x < 0, wg, at_zero))
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
        acc += tl.sum(tl.where(x > 0, 0.0, g * x), axis=1)
    tl.store(dw_part_ptr + pid_k * C + cs, acc, mask=cmask)


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def layout(x_shape, weight_numel: int, channel_dim: int) -> tuple[int, int, int]:
    """(outer, C, inner) of x around the channel dim."""
    numel = 1
    for s in x_shape:
        numel *= s
    if weight_numel == 1:
        return numel, 1, 1
    inner = 1
    for s in x_shape[channel_dim + 1:]:
        inner *= s
    c = x_shape[channel_dim]
    return (numel // (c * inner) if c * inner else 0), c, inner


def _check(x: torch.Tensor, weight: torch.Tensor, channel_dim: int, zero_grad: int) -> None:
    if not 0 <= zero_grad < len(AT_ZERO):
        raise ValueError(f"flashfuse::prelu: zero_grad must be 0 to {len(AT_ZERO) - 1} (AT_ZERO), got {zero_grad}")
    if weight.numel() != 1:
        if not 0 <= channel_dim < x.dim() or x.shape[channel_dim] != weight.numel():
            raise ValueError(f"flashfuse::prelu: {weight.numel()} slopes do not match dim {channel_dim} of "
                             f"x {tuple(x.shape)}")


def _broadcast_weight(x: torch.Tensor, weight: torch.Tensor, channel_dim: int) -> torch.Tensor:
    if weight.numel() == 1:
        return weight.reshape(())
    shape = [1] * x.dim()
    shape[channel_dim] = weight.numel()
    return weight.reshape(shape)


def _prelu_kernel(x: torch.Tensor, weight: torch.Tensor, channel_dim: int, zero_grad: int) -> torch.Tensor:
    """where(x > 0, x, weight * x) with weight's numel slopes along `channel_dim` (or one slope)."""
    _check(x, weight, channel_dim, zero_grad)
    if not _use_triton(x):
        w = _broadcast_weight(x, weight, channel_dim).float()
        xf = x.float()
        return torch.where(xf > 0, xf, w * xf).to(x.dtype)
    xc = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if xc.numel():
        outer, c, inner = layout(x.shape, weight.numel(), channel_dim)
        by_column = inner == 1
        r, l = (outer, c) if by_column else (outer * c, inner)
        block_l = min(triton.next_power_of_2(l), BLOCK)
        block_r = max(1, BLOCK // block_l)
        grid = (triton.cdiv(r, block_r), triton.cdiv(l, block_l))
        _prelu_fwd_kernel[grid](xc, weight.contiguous().reshape(-1), y, r, l, c, CHANNEL_IS_COLUMN=by_column,
                                BLOCK_R=block_r, BLOCK_L=block_l)
    return y


def _prelu_fake(x, weight, channel_dim, zero_grad):
    _check(x, weight, channel_dim, zero_grad)
    return x.new_empty(x.shape)


def _blocks(c: int, inner: int, k: int) -> tuple[int, int]:
    if inner == 1:  # channels are contiguous: tile across them
        block_c = min(128, triton.next_power_of_2(c))
        block_k = max(1, min(triton.next_power_of_2(k), 2048 // block_c))
    else:           # positions are contiguous within a channel
        block_k = min(1024, triton.next_power_of_2(k))
        block_c = max(1, min(triton.next_power_of_2(c), 1024 // block_k))
    return block_c, block_k


def _prelu_backward_kernel(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, channel_dim: int,
                           zero_grad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) of flashfuse::prelu; dweight has weight's shape and dtype."""
    _check(x, weight, channel_dim, zero_grad)
    if not _use_triton(x):
        w = _broadcast_weight(x, weight, channel_dim).float()
        xf, gf = x.float(), grad.float()
        one, slope = AT_ZERO[zero_grad]
        at_zero = one * gf + slope * w * gf
        dx = torch.where(xf > 0, gf, torch.where(xf < 0, w * gf, at_zero))
        contrib = torch.where(xf > 0, torch.zeros_like(gf), gf * xf)
        dw = contrib.sum_to_size(w.shape) if w.dim() else contrib.sum()
        return dx.to(x.dtype), dw.reshape(weight.shape).to(weight.dtype)
    xc, gc = x.contiguous(), grad.contiguous().to(x.dtype)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    outer, c, inner = layout(x.shape, weight.numel(), channel_dim)
    k = outer * inner
    if x.numel() == 0:
        return dx, torch.zeros_like(weight)
    block_c, block_k = _blocks(c, inner, k)
    c_blocks = triton.cdiv(c, block_c)
    k_blocks = triton.cdiv(k, block_k)
    # enough programs to fill a GPU, few enough that the partial sums stay small
    target = 512 if x.is_cuda else 4
    n_split = max(1, min(k_blocks, target // c_blocks))
    k_per_prog = triton.cdiv(k_blocks, n_split) * block_k
    n_split = triton.cdiv(k, k_per_prog)
    part = torch.empty((n_split, c), dtype=torch.float32, device=x.device)
    _prelu_bwd_kernel[(c_blocks, n_split)](gc, xc, weight.contiguous().reshape(-1), dx, part, c, inner, k,
                                           k_per_prog, ONE_AT_ZERO=AT_ZERO[zero_grad][0],
                                           SLOPE_AT_ZERO=AT_ZERO[zero_grad][1], BLOCK_C=block_c, BLOCK_K=block_k)
    dw = part.sum(0).reshape(weight.shape).to(weight.dtype)
    return dx, dw


def _prelu_backward_fake(grad, x, weight, channel_dim, zero_grad):
    _check(x, weight, channel_dim, zero_grad)
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


prelu = define("prelu", "(Tensor x, Tensor weight, int channel_dim, int zero_grad) -> Tensor", _prelu_kernel,
               _prelu_fake)
prelu_backward = define("prelu_backward", "(Tensor grad, Tensor x, Tensor weight, int channel_dim, int zero_grad) "
                        "-> (Tensor, Tensor)", _prelu_backward_kernel, _prelu_backward_fake)


class _Prelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, channel_dim, zero_grad):
        with torch._C._AutoDispatchBelowAutograd():
            y = prelu(x, weight, channel_dim, zero_grad)
        ctx.channel_dim, ctx.zero_grad = channel_dim, zero_grad
        ctx.save_for_backward(x, weight)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        dx, dw = prelu_backward(grad, x, weight, ctx.channel_dim, ctx.zero_grad)  # differentiable again
        return dx, dw, None, None


class _PreluBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, x, weight, channel_dim, zero_grad):
        with torch._C._AutoDispatchBelowAutograd():
            dx, dw = prelu_backward(grad, x, weight, channel_dim, zero_grad)
        ctx.channel_dim, ctx.zero_grad = channel_dim, zero_grad
        ctx.save_for_backward(grad, x, weight)
        return dx, dw

    @staticmethod
    def backward(ctx, gdx, gdw):
        return _backward_backward(ctx, gdx, gdw)


def _backward_backward(ctx, gdx, gdw):
    """Double backward (e.g. a gradient penalty), in torch ops. dx = g * slope(x) is linear in g and in
    w; dw = sum of g * x over the slope branch is linear in g and in x. At x == 0 each spelling's own
    branch choice is reproduced (see `zero_grad`)."""
    grad, x, weight = ctx.saved_tensors
    w = _broadcast_weight(x, weight, ctx.channel_dim).float()
    xf, gf = x.float(), grad.float()
    pos, neg, zero = xf > 0, xf < 0, xf == 0
    # at x == 0, dx = (one + slope * w) * g: ws is how much of the slope branch each element takes
    one, slope = AT_ZERO[ctx.zero_grad]
    ws = neg.float() + zero.float() * slope
    d_grad = torch.zeros_like(gf)
    d_x = torch.zeros_like(xf)
    d_w = torch.zeros_like(w)
    if gdx is not None:
        d_grad = d_grad + gdx.float() * (pos.float() + zero.float() * one + ws * w)
        contrib = ws * gdx.float() * gf
        d_w = d_w + (contrib.sum_to_size(w.shape) if w.dim() else contrib.sum())
    if gdw is not None:
        gw = _broadcast_weight(x, gdw, ctx.channel_dim).float()
        # dw's terms g * x come from the slope branch, taken at x == 0 by the share `slope`
        d_grad = d_grad + ws * gw * xf
        d_x = d_x + ws * gw * gf
    return (d_grad.to(grad.dtype), d_x.to(x.dtype), d_w.reshape(weight.shape).to(weight.dtype), None, None)


define_autograd("prelu", prelu, _Prelu.apply)
define_autograd("prelu_backward", prelu_backward, lambda *args: tuple(_PreluBackward.apply(*args)))
