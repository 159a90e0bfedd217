"""flashfuse::bias_gelu — y = gelu(x + bias) in one pass over x (erf or tanh form), and its backward.

x: (..., N) any float dtype of fp16/bf16/fp32; bias: (N,) (or (1, ..., 1, N), no more dims than x) of
the same dtype, or None. The kernel
computes in fp32 and writes y in x's dtype. The backward kernel returns d(loss)/d(x + bias); the bias
gradient is its sum over the leading dims (a plain reduction, done by torch).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from flashfuse.kernels.registration import define, define_autograd

APPROXIMATIONS = ("none", "tanh")
SQRT_1_2 = 1.0 / math.sqrt(2.0)
SQRT_2_PI = math.sqrt(2.0 / math.pi)
TANH_CUBIC = 0.044715
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
BLOCK = 2048  # elements per program (a BLOCK_M x BLOCK_N tile)

if os.environ.get("TRITON_INTERPRET") == "1":
    # libdevice is not available in the interpreter: tanh from exp, with the Taylor series near 0
    # where 1 - 2/(e^2x + 1) loses relative precision.
    @triton.jit
    def _tanh(x):
        ax = tl.abs(x)
        big = 1.0 - 2.0 / (tl.exp(2.0 * tl.minimum(ax, 20.0)) + 1.0)  # tanh(20) == 1 in fp32
        x2 = x * x
        small = ax * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0 - x2 * (17.0 / 315.0))))
        t = tl.where(ax < 0.0625, small, big)
        return tl.where(x < 0, -t, t)
else:
    from triton.language.extra import libdevice

    @triton.jit
    def _tanh(x):
        return libdevice.tanh(x)


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Offsets and mask of this program's BLOCK_M x BLOCK_N tile of a contiguous (M, N) matrix, and its
    column indices (the bias index: a 2-D tile needs no division per element)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    return rows[:, None] * N + cols[None, :], mask, cols


@triton.jit
def _bias_gelu_fwd_kernel(x_ptr, b_ptr, y_ptr, M, N, HAS_BIAS: tl.constexpr, TANH: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs, mask, cols = _tile(M, N, BLOCK_M, BLOCK_N)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        x += b[None, :]
    if TANH:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (1.0 + _tanh(inner))
    else:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(g_ptr, x_ptr, b_ptr, dx_ptr, M, N, HAS_BIAS: tl.constexpr, TANH: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs, mask, cols = _tile(M, N, BLOCK_M, BLOCK_N)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        x += b[None, :]
    if TANH:
        x2 = x * x
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x2 * x))
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x2)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        d = cdf + x * pdf
    tl.store(dx_ptr + offs, (g * d).to(dx_ptr.dtype.element_ty), mask=mask)


def _launch(kernel, tensors, x: torch.Tensor, bias, approximate: str) -> None:
    n = x.shape[-1]
    m = x.numel() // n if n else 0
    if m == 0 or n == 0:
        return
    block_n = min(triton.next_power_of_2(n), 1024)
    block_m = max(1, BLOCK // block_n)
    b = bias.reshape(-1).contiguous() if bias is not None else tensors[0]
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    kernel[grid](*tensors[:-1], b, tensors[-1], m, n, HAS_BIAS=bias is not None, TANH=approximate == "tanh",
                 BLOCK_M=block_m, BLOCK_N=block_n)


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _check(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str) -> None:
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"flashfuse::bias_gelu: approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    if x.dim() == 0:
        raise ValueError("flashfuse::bias_gelu: x must have at least one dim")
    if bias is not None and not is_last_dim_vector(bias, x):
        raise ValueError(f"flashfuse::bias_gelu: bias must be ({x.shape[-1]},) (or with leading 1s, no more "
                         f"dims than x) of {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")


def is_last_dim_vector(bias: torch.Tensor, x: torch.Tensor) -> bool:
    """bias is a vector along x's last dim: shape (N,), (1, N), (1, 1, N), ... with at most x.dim() dims,
    so that x + bias has x's shape."""
    return (bias.dtype == x.dtype and 1 <= bias.dim() <= x.dim() and bias.shape[-1] == x.shape[-1]
            and all(s == 1 for s in bias.shape[:-1]))


def reference_gelu_grad(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """d gelu / dx at x (computed in x's dtype; callers pass fp32/fp64)."""
    if approximate == "tanh":
        t = torch.tanh(SQRT_2_PI * (x + TANH_CUBIC * x ** 3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * SQRT_2_PI * (1 + 3 * TANH_CUBIC * x * x)
    return 0.5 * (1 + torch.erf(x * SQRT_1_2)) + x * torch.exp(-0.5 * x * x) * INV_SQRT_2PI


def _bias_gelu_kernel(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str) -> torch.Tensor:
    """gelu(x + bias, approximate) with bias broadcast over the last dim."""
    _check(x, bias, approximate)
    if not _use_triton(x):
        pre = x.float() if bias is None else x.float() + bias.float()
        return torch.nn.functional.gelu(pre, approximate=approximate).to(x.dtype)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(_bias_gelu_fwd_kernel, [x.contiguous(), y], x, bias, approximate)
    return y


def _bias_gelu_fake(x, bias, approximate):
    _check(x, bias, approximate)
    return x.new_empty(x.shape)


def _bias_gelu_backward_kernel(grad: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor],
                               approximate: str) -> torch.Tensor:
    """grad * gelu'(x + bias): the gradient w.r.t. x (and, summed over the leading dims, the bias)."""
    _check(x, bias, approximate)
    if not _use_triton(x):
        pre = x.float() if bias is None else x.float() + bias.float()
        return (grad.float() * reference_gelu_grad(pre, approximate)).to(x.dtype)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(_bias_gelu_bwd_kernel, [grad.contiguous().to(x.dtype), x.contiguous(), dx], x, bias, approximate)
    return dx


def _bias_gelu_backward_fake(grad, x, bias, approximate):
    _check(x, bias, approximate)
    return x.new_empty(x.shape)


bias_gelu = define("bias_gelu", "(Tensor x, Tensor? bias, str approximate) -> Tensor", _bias_gelu_kernel,
                   _bias_gelu_fake)
bias_gelu_backward = define("bias_gelu_backward", "(Tensor grad, Tensor x, Tensor? bias, str approximate) -> Tensor",
                            _bias_gelu_backward_kernel, _bias_gelu_backward_fake)


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approximate):
        with torch._C._AutoDispatchBelowAutograd():
            y = bias_gelu(x, bias, approximate)
        ctx.approximate = approximate
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, bias)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, bias = ctx.saved_tensors
        dx = bias_gelu_backward(grad, x, bias, ctx.approximate)  # differentiable again (double backward)
        dbias = None
        if ctx.has_bias and ctx.needs_input_grad[1]:
            dbias = dx.reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype).reshape(bias.shape)
        return dx, dbias, None


class _BiasGeluBackward(torch.autograd.Function):
    """Double backward, in torch ops: d/dgrad = gelu'(pre) * ggrad; d/dpre = grad * gelu''(pre) * ggrad."""

    @staticmethod
    def forward(ctx, grad, x, bias, approximate):
        with torch._C._AutoDispatchBelowAutograd():
            dx = bias_gelu_backward(grad, x, bias, approximate)
        ctx.approximate = approximate
        ctx.has_bias = bias is not None
        ctx.save_for_backward(grad, x, bias)
        return dx

    @staticmethod
    def backward(ctx, ggrad):
        grad, x, bias = ctx.saved_tensors
        pre = x.float() if bias is None else x.float() + bias.float()
        with torch.enable_grad():
            p = pre.detach().requires_grad_()
            d1 = reference_gelu_grad(p, ctx.approximate)
            (d2,) = torch.autograd.grad(d1.sum(), p)
        dgrad = (ggrad.float() * d1.detach()).to(grad.dtype)
        dpre = ggrad.float() * grad.float() * d2
        dx = dpre.to(x.dtype)
        dbias = dpre.reshape(-1, x.shape[-1]).sum(0).to(bias.dtype).reshape(bias.shape) if ctx.has_bias else None
        return dgrad, dx, dbias, None


define_autograd("bias_gelu", bias_gelu, _BiasGelu.apply)
define_autograd("bias_gelu_backward", bias_gelu_backward, _BiasGeluBackward.apply)
