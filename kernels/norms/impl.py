"""Launchers and the PyTorch reference for the norm kernels; the ops in layer_norm.py / rms_norm.py call these.

Dispatch (the flashfuse convention): CUDA tensors -> Triton; CPU tensors with TRITON_INTERPRET=1 -> the
same Triton kernels through the interpreter; other CPU tensors -> `reference_forward/backward` (fp32 math,
same formulas). Rows longer than MAX_N also take the reference path (the passes never create them).
"""
from __future__ import annotations

import functools
import os

import torch
import triton

from flashfuse.kernels.launch import launcher
from flashfuse.kernels.norms.triton_kernels import (MAX_N, MID_BF16, MID_FP16, MID_NONE, norm_bwd_kernel,
                                                    norm_fwd_kernel)

_MID_CODES = {None: MID_NONE, torch.float16: MID_FP16, torch.bfloat16: MID_BF16}


def mid_code(mid_dtype: torch.dtype | None) -> int:
    """A rounding to fp32 (or wider) is no rounding at all."""
    return _MID_CODES.get(mid_dtype, MID_NONE)


def _use_triton(x: torch.Tensor) -> bool:
    if x.shape[-1] > MAX_N or x.shape[-1] == 0:
        return False
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(..., N) -> (M, N) with unit stride along N (a copy only when the layout needs one)."""
    t2 = t.reshape(-1, n)
    if n > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _flat_param(p: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if p is None else p.reshape(n).contiguous()


# ---------------------------------------------------------------------------------------------- launch choices
# Autotuning (CUDA only) picks among a few configurations with 8-16 elements per thread (16 bf16 = two
# 16-byte loads); FLASHFUSE_NORM_AUTOTUNE=0 uses the heuristic one alone (faster first call, e.g. in tests).
def _autotune_enabled() -> bool:
    return os.environ.get("FLASHFUSE_NORM_AUTOTUNE", "1") != "0"


def heuristic_fwd(block_n: int) -> tuple[int, int]:
    """(ROWS, num_warps): ~4K elements per program, 16 per thread."""
    rows = max(1, min(8, 4096 // block_n))
    warps = min(16, max(4, rows * block_n // 512))
    return rows, warps


def _fwd_configs():
    return [triton.Config({"ROWS": rows}, num_warps=warps) for rows in (1, 2, 4, 8) for warps in (4, 8, 16)]


def _prune_fwd(configs, named_args, **kwargs):
    block_n = kwargs.get("BLOCK_N", named_args.get("BLOCK_N"))

    def per_thread(c):
        return c.kwargs["ROWS"] * block_n // (32 * c.num_warps)

    kept = [c for c in configs if 8 <= per_thread(c) <= 16]
    if kept:
        return kept
    rows, warps = heuristic_fwd(block_n)
    return [c for c in configs if c.kwargs["ROWS"] == rows and c.num_warps == warps][:1] or configs[:1]


def _bwd_warp_choices(block_n: int) -> tuple[int, ...]:
    return (4, 8) if block_n <= 2048 else (8, 16)


def heuristic_bwd(block_n: int) -> int:
    return max(4, min(16, block_n // 512))


@functools.lru_cache(maxsize=None)
def _tuned_fwd():
    return triton.autotune(configs=_fwd_configs(), key=["N", "IS_RMS", "HAS_RES", "HAS_W", "HAS_B", "MID"],
                           prune_configs_by={"early_config_prune": _prune_fwd})(norm_fwd_kernel)


def _prune_bwd(configs, named_args, **kwargs):
    block_n = kwargs.get("BLOCK_N", named_args.get("BLOCK_N"))
    return [c for c in configs if c.num_warps in _bwd_warp_choices(block_n)] or configs[:1]


@functools.lru_cache(maxsize=None)
def _tuned_bwd():
    # PREFETCH (load the next row during this row's sums) won at every shape timed (H100, session 12:
    # LayerNorm fwd+bwd 16384x4096 305 -> 271 us); kept in the search so other GPUs can still choose
    configs = [triton.Config({"PREFETCH": p}, num_warps=w) for p in (False, True) for w in (4, 8, 16)]
    return triton.autotune(configs=configs, key=["N", "IS_RMS", "HAS_W", "HAS_B", "HAS_DH", "MID"],
                           prune_configs_by={"early_config_prune": _prune_bwd})(norm_bwd_kernel)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ---------------------------------------------------------------------------------------------- forward
def norm_forward(x, residual, weight, bias, eps: float, is_rms: bool, mid_dtype, out_dtype):
    """Returns (y, h); h is None without a residual."""
    n = x.shape[-1]
    if not _use_triton(x):
        return reference_forward(x, residual, weight, bias, eps, is_rms, mid_dtype, out_dtype)
    x2 = _rows(x, n)
    m = x2.shape[0]
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    y2 = y.view(-1, n)
    if residual is not None:
        r2 = _rows(residual, n)
        h = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
        h2 = h.view(-1, n)
    else:
        r2 = h2 = x2  # unused (HAS_RES=False)
        h = None
    w = _flat_param(weight, n)
    b = _flat_param(bias, n)
    if m == 0:
        return y, h
    block_n = triton.next_power_of_2(n)
    args = (x2, r2, h2, w if w is not None else x2, b if b is not None else x2, y2, m, n,
            x2.stride(0), r2.stride(0), h2.stride(0), y2.stride(0), float(eps))
    flags = dict(IS_RMS=is_rms, HAS_RES=residual is not None, HAS_W=w is not None, HAS_B=b is not None,
                 MID=mid_code(mid_dtype), BLOCK_N=block_n)
    if x.is_cuda:
        with torch.cuda.device(x.device):
            # launcher(): Triton's compiled kernel launched directly after the first call (kernels/launch.py)
            if _autotune_enabled():
                launcher(_tuned_fwd())(lambda meta: (triton.cdiv(m, meta["ROWS"]),), args, flags)
            else:
                rows, warps = heuristic_fwd(block_n)
                launcher(norm_fwd_kernel)((triton.cdiv(m, rows),), args, {**flags, "ROWS": rows, "num_warps": warps})
    else:  # interpreter: one row per program is the fastest to interpret
        norm_fwd_kernel[(m,)](*args, **flags, ROWS=1)
    return y, h


def reference_forward(x, residual, weight, bias, eps, is_rms, mid_dtype, out_dtype):
    h = None
    if residual is not None:
        h = (x.float() + residual.float()).to(torch.promote_types(x.dtype, residual.dtype))
        x = h
    xf = x.float()
    if is_rms:
        xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        d = xf - xf.mean(-1, keepdim=True)
        xhat = d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + eps)
    if mid_code(mid_dtype) != MID_NONE:
        xhat = xhat.to(mid_dtype).float()
    n = x.shape[-1]
    if weight is not None:
        xhat = xhat * weight.reshape(n).float()
    if bias is not None:
        xhat = xhat + bias.reshape(n).float()
    return xhat.to(out_dtype), h


# ---------------------------------------------------------------------------------------------- backward
def norm_backward(dy, x, weight, dh, eps: float, is_rms: bool, has_bias: bool, mid_dtype, dx_dtype):
    """Returns (dx, dw, db) with dw/db summed in fp32 and cast to the parameter's dtype
    (empty tensors when there is no weight / no bias). dx includes dh (the gradient that reached h
    directly, for the residual variants)."""
    n = x.shape[-1]
    if not _use_triton(x):
        return reference_backward(dy, x, weight, dh, eps, is_rms, has_bias, mid_dtype, dx_dtype)
    x2 = _rows(x, n)
    dy2 = _rows(dy, n)
    dh2 = _rows(dh, n) if dh is not None else dy2
    m = x2.shape[0]
    dx = torch.empty(x.shape, dtype=dx_dtype, device=x.device)
    dx2 = dx.view(-1, n)
    w = _flat_param(weight, n)
    if x.is_cuda:
        per_sm = 8 if n <= 2048 else 4
        programs = max(1, min(m, _sm_count(x.device.index or 0) * per_sm))
    else:
        programs = max(1, min(m, 4))
    rows_per_prog = triton.cdiv(max(m, 1), programs)
    programs = triton.cdiv(max(m, 1), rows_per_prog)
    dw_part = torch.empty((programs, n), dtype=torch.float32, device=x.device) if w is not None else None
    db_part = torch.empty((programs, n), dtype=torch.float32, device=x.device) if has_bias else None
    if m > 0:
        block_n = triton.next_power_of_2(n)
        args = (dy2, x2, w if w is not None else x2, dh2, dx2,
                dw_part if dw_part is not None else dx2, db_part if db_part is not None else dx2,
                m, n, rows_per_prog, dy2.stride(0), x2.stride(0), dh2.stride(0), dx2.stride(0), float(eps))
        flags = dict(IS_RMS=is_rms, HAS_W=w is not None, HAS_B=has_bias, HAS_DH=dh is not None,
                     MID=mid_code(mid_dtype), BLOCK_N=block_n)
        if x.is_cuda:
            with torch.cuda.device(x.device):
                if _autotune_enabled():
                    launcher(_tuned_bwd())((programs,), args, flags)
                else:
                    launcher(norm_bwd_kernel)((programs,), args, {**flags, "num_warps": heuristic_bwd(block_n),
                                                                   "PREFETCH": True})
        else:
            norm_bwd_kernel[(programs,)](*args, **flags)
    else:
        if dw_part is not None:
            dw_part.zero_()
        if db_part is not None:
            db_part.zero_()
    dw = dw_part.sum(0).to(weight.dtype).reshape(weight.shape) if weight is not None else x.new_empty(0)
    db = db_part.sum(0) if has_bias else x.new_empty(0, dtype=torch.float32)
    return dx, dw, db


def reference_backward(dy, x, weight, dh, eps, is_rms, has_bias, mid_dtype, dx_dtype):
    n = x.shape[-1]
    xf = x.float()
    dyf = dy.float()
    if is_rms:
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        xhat = xf * rstd
    else:
        d = xf - xf.mean(-1, keepdim=True)
        rstd = torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + eps)
        xhat = d * rstd
    g = dyf * weight.reshape(n).float() if weight is not None else dyf
    dx = g - xhat * (g * xhat).mean(-1, keepdim=True)
    if not is_rms:
        dx = dx - g.mean(-1, keepdim=True)
    dx = dx * rstd
    if dh is not None:
        dx = dx + dh.float()
    if weight is not None:
        xm = xhat.to(mid_dtype).float() if mid_code(mid_dtype) != MID_NONE else xhat
        dw = (dyf * xm).reshape(-1, n).sum(0).to(weight.dtype).reshape(weight.shape)
    else:
        dw = x.new_empty(0)
    db = dyf.reshape(-1, n).sum(0) if has_bias else x.new_empty(0, dtype=torch.float32)
    return dx.to(dx_dtype), dw, db
