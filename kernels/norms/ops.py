"""torch.library definitions shared by the norm family: the forward ops are made by `define_norm_ops`
(one call per norm in layer_norm.py / rms_norm.py), the backward is one op for all of them.

    flashfuse::<norm>(x, weight?, bias?, eps, mid_dtype?, out_dtype) -> y
    flashfuse::add_<norm>(x, residual, weight?, bias?, eps, mid_dtype?, out_dtype) -> (y, h = x + residual)
    flashfuse::norm_backward(dy, x, weight?, dh?, eps, is_rms, has_bias, mid_dtype?, dx_dtype) -> (dx, dw, db)

The norm runs over the last dim; weight/bias hold one value per element of it (any shape of that numel).
`mid_dtype` is a rounding the user's code applied between the normalization and the weight (LLaMA's
`.to(input_dtype)`), `out_dtype` the dtype the replaced subgraph produced.
"""
from __future__ import annotations

from typing import Optional

import torch

from flashfuse.kernels.norms.impl import norm_backward, norm_forward

Tensor = torch.Tensor


@torch.library.custom_op("flashfuse::norm_backward", mutates_args=())
def norm_backward_op(dy: Tensor, x: Tensor, weight: Optional[Tensor], dh: Optional[Tensor], eps: float,
                     is_rms: bool, has_bias: bool, mid_dtype: Optional[torch.dtype],
                     dx_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    return norm_backward(dy, x, weight, dh, eps, is_rms, has_bias, mid_dtype, dx_dtype)


@norm_backward_op.register_fake
def _(dy, x, weight, dh, eps, is_rms, has_bias, mid_dtype, dx_dtype):
    dx = torch.empty(x.shape, dtype=dx_dtype, device=x.device)
    dw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    db = x.new_empty(x.shape[-1] if has_bias else 0, dtype=torch.float32)
    return dx, dw, db


def _grads(ctx, dy, dh):
    x, weight = ctx.saved_tensors[0], ctx.saved_tensors[1] if ctx.has_weight else None
    if dy is None:
        dy = torch.zeros(x.shape, dtype=ctx.out_dtype, device=x.device)
    dx, dw, db = torch.ops.flashfuse.norm_backward(dy, x, weight, dh, ctx.eps, ctx.is_rms, ctx.has_bias,
                                                   ctx.mid_dtype, ctx.dx_dtype)
    dw = dw if ctx.has_weight else None
    db = db.to(ctx.bias_dtype).reshape(ctx.bias_shape) if ctx.has_bias else None
    return dx, dw, db


def _save(ctx, x, weight, bias, eps, mid_dtype, out_dtype, is_rms, dx_dtype):
    ctx.has_weight = weight is not None
    ctx.has_bias = bias is not None
    if ctx.has_bias:
        ctx.bias_dtype, ctx.bias_shape = bias.dtype, bias.shape
    ctx.eps, ctx.mid_dtype, ctx.out_dtype, ctx.is_rms, ctx.dx_dtype = eps, mid_dtype, out_dtype, is_rms, dx_dtype
    ctx.save_for_backward(x, weight) if weight is not None else ctx.save_for_backward(x)


def define_norm_ops(name: str, is_rms: bool):
    """Define flashfuse::<name> and flashfuse::add_<name>; returns both op objects."""

    @torch.library.custom_op(f"flashfuse::{name}", mutates_args=())
    def norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
             mid_dtype: Optional[torch.dtype], out_dtype: torch.dtype) -> Tensor:
        return norm_forward(x, None, weight, bias, eps, is_rms, mid_dtype, out_dtype)[0]

    @norm.register_fake
    def _(x, weight, bias, eps, mid_dtype, out_dtype):
        return torch.empty(x.shape, dtype=out_dtype, device=x.device)

    def setup_norm(ctx, inputs, output):
        x, weight, bias, eps, mid_dtype, out_dtype = inputs
        _save(ctx, x, weight, bias, eps, mid_dtype, out_dtype, is_rms, x.dtype)

    def backward_norm(ctx, dy):
        dx, dw, db = _grads(ctx, dy, None)
        return dx, dw, db, None, None, None

    norm.register_autograd(backward_norm, setup_context=setup_norm)

    @torch.library.custom_op(f"flashfuse::add_{name}", mutates_args=())
    def add_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                 mid_dtype: Optional[torch.dtype], out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return norm_forward(x, residual, weight, bias, eps, is_rms, mid_dtype, out_dtype)

    @add_norm.register_fake
    def _(x, residual, weight, bias, eps, mid_dtype, out_dtype):
        h_dtype = torch.promote_types(x.dtype, residual.dtype)
        return (torch.empty(x.shape, dtype=out_dtype, device=x.device),
                torch.empty(x.shape, dtype=h_dtype, device=x.device))

    def setup_add(ctx, inputs, output):
        x, residual, weight, bias, eps, mid_dtype, out_dtype = inputs
        h = output[1]
        ctx.x_dtype, ctx.r_dtype = x.dtype, residual.dtype
        _save(ctx, h, weight, bias, eps, mid_dtype, out_dtype, is_rms, h.dtype)

    def backward_add(ctx, dy, dh):
        dx, dw, db = _grads(ctx, dy, dh)  # dx already holds dh: the gradient of h = x + residual
        return dx.to(ctx.x_dtype), dx.to(ctx.r_dtype), dw, db, None, None, None

    add_norm.register_autograd(backward_add, setup_context=setup_add)
    return norm, add_norm
