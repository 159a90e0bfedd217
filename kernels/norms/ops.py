"""torch.library definitions shared by the norm family: the forward ops are made by `define_norm_ops`
(one call per norm in layer_norm.py / rms_norm.py), the backward is one op for all of them.

    flashfuse::<norm>(x, weight?, bias?, eps, mid_dtype?, out_dtype) -> y
    flashfuse::add_<norm>(x, residual, weight?, bias?, eps, mid_dtype?, out_dtype) -> (y, h = x + residual)
    flashfuse::norm_backward(dy, x, weight?, dh?, eps, is_rms, has_bias, mid_dtype?, dx_dtype) -> (dx, dw, db)

The norm runs over the last dim; weight/bias hold one value per element of it (any shape of that numel).
`mid_dtype` is a rounding the user's code applied between the normalization and the weight (LLaMA's
`.to(input_dtype)`), `out_dtype` the dtype the replaced subgraph produced.

Registered through kernels/registration.py (a plain `torch.library.Library` and an Autograd kernel that is
a `torch.autograd.Function`), not `torch.library.custom_op`: on the H100 the custom_op wrappers cost ~1 ms of
host time per forward+backward, several times the kernels' own time at these sizes (docs/perf-notes.md,
"Norms"); this path is ~3x lighter and traces the same under aot_autograd.
"""
from __future__ import annotations

import torch

from flashfuse.kernels.norms.impl import norm_backward, norm_forward
from flashfuse.kernels.registration import define, define_autograd

_NORM_ARGS = "Tensor? weight, Tensor? bias, float eps, ScalarType? mid_dtype, ScalarType out_dtype"


# ---------------------------------------------------------------------------------------------- backward op
def _backward_kernel(dy, x, weight, dh, eps, is_rms, has_bias, mid_dtype, dx_dtype):
    return norm_backward(dy, x, weight, dh, eps, is_rms, has_bias, mid_dtype, dx_dtype)


def _backward_fake(dy, x, weight, dh, eps, is_rms, has_bias, mid_dtype, dx_dtype):
    dx = torch.empty(x.shape, dtype=dx_dtype, device=x.device)
    dw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    db = x.new_empty(x.shape[-1] if has_bias else 0, dtype=torch.float32)
    return dx, dw, db


define("norm_backward", "(Tensor dy, Tensor x, Tensor? weight, Tensor? dh, float eps, bool is_rms, "
       "bool has_bias, ScalarType? mid_dtype, ScalarType dx_dtype) -> (Tensor, Tensor, Tensor)",
       _backward_kernel, _backward_fake)


def _grads(ctx, dy, dh):
    saved = ctx.saved_tensors
    x, weight = saved[0], (saved[1] if ctx.has_weight else None)
    if dy is None:
        dy = torch.zeros(x.shape, dtype=ctx.out_dtype, device=x.device)
    dx, dw, db = torch.ops.flashfuse.norm_backward.default(dy, x, weight, dh, ctx.eps, ctx.is_rms, ctx.has_bias,
                                                           ctx.mid_dtype, ctx.dx_dtype)
    dw = dw if ctx.has_weight and ctx.needs_input_grad[ctx.weight_index] else None
    db = db.to(ctx.bias_dtype).reshape(ctx.bias_shape) if ctx.has_bias else None
    return dx, dw, db


def _save(ctx, x, weight, bias, eps, mid_dtype, out_dtype, is_rms, dx_dtype, weight_index):
    ctx.set_materialize_grads(False)  # an unused output (h) gets no zero-filled gradient
    ctx.has_weight = weight is not None
    ctx.has_bias = bias is not None
    if ctx.has_bias:
        ctx.bias_dtype, ctx.bias_shape = bias.dtype, bias.shape
    ctx.eps, ctx.mid_dtype, ctx.out_dtype, ctx.is_rms, ctx.dx_dtype = eps, mid_dtype, out_dtype, is_rms, dx_dtype
    ctx.weight_index = weight_index
    if weight is not None:
        ctx.save_for_backward(x, weight)
    else:
        ctx.save_for_backward(x)


def define_norm_ops(name: str, is_rms: bool):
    """Define flashfuse::<name> and flashfuse::add_<name>; returns both op overloads."""

    # ------------------------------------------------------------------ y = norm(x)
    def norm_kernel(x, weight, bias, eps, mid_dtype, out_dtype):
        return norm_forward(x, None, weight, bias, eps, is_rms, mid_dtype, out_dtype)[0]

    def norm_fake(x, weight, bias, eps, mid_dtype, out_dtype):
        return torch.empty(x.shape, dtype=out_dtype, device=x.device)

    op = define(name, f"(Tensor x, {_NORM_ARGS}) -> Tensor", norm_kernel, norm_fake)

    class NormFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, eps, mid_dtype, out_dtype):
            _save(ctx, x, weight, bias, eps, mid_dtype, out_dtype, is_rms, x.dtype, weight_index=1)
            with torch._C._AutoDispatchBelowAutograd():
                return op(x, weight, bias, eps, mid_dtype, out_dtype)

        @staticmethod
        def backward(ctx, dy):
            if dy is None:
                return None, None, None, None, None, None
            dx, dw, db = _grads(ctx, dy, None)
            return dx, dw, db, None, None, None

    define_autograd(name, op, NormFunction.apply)

    # ------------------------------------------------------------------ (y, h) = norm(x + residual), h
    def add_kernel(x, residual, weight, bias, eps, mid_dtype, out_dtype):
        return norm_forward(x, residual, weight, bias, eps, is_rms, mid_dtype, out_dtype)

    def add_fake(x, residual, weight, bias, eps, mid_dtype, out_dtype):
        h_dtype = torch.promote_types(x.dtype, residual.dtype)
        return (torch.empty(x.shape, dtype=out_dtype, device=x.device),
                torch.empty(x.shape, dtype=h_dtype, device=x.device))

    add_op = define(f"add_{name}", f"(Tensor x, Tensor residual, {_NORM_ARGS}) -> (Tensor, Tensor)", add_kernel,
                    add_fake)

    class AddNormFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, residual, weight, bias, eps, mid_dtype, out_dtype):
            with torch._C._AutoDispatchBelowAutograd():
                y, h = add_op(x, residual, weight, bias, eps, mid_dtype, out_dtype)
            _save(ctx, h, weight, bias, eps, mid_dtype, out_dtype, is_rms, h.dtype, weight_index=2)
            ctx.x_dtype, ctx.r_dtype = x.dtype, residual.dtype
            return y, h

        @staticmethod
        def backward(ctx, dy, dh):
            if dy is None:  # only h was used: its gradient goes straight to x and residual
                return dh, dh, None, None, None, None, None
            dx, dw, db = _grads(ctx, dy, dh)  # dx already holds dh: the gradient of h = x + residual
            return dx.to(ctx.x_dtype), dx.to(ctx.r_dtype), dw, db, None, None, None

    define_autograd(f"add_{name}", add_op, lambda *args: tuple(AddNormFunction.apply(*args)))
    return op, add_op
