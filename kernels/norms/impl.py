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

from flashfuse.kernels.launch import autotune, launcher, spec_key, submit
from flashfuse.kernels.norms.triton_kernels import (MAX_N, MID_BF16, MID_FP16, MID_NONE, column_sum_kernel,
                                                    norm_bwd_kernel, norm_fwd_kernel)

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
# Autotuning (the forward, CUDA only) picks among a few configurations with 8-16 elements per thread (16 bf16 =
# two 16-byte loads); FLASHFUSE_NORM_AUTOTUNE=0 uses the heuristic one alone (faster first call, e.g. in tests).
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


def bwd_warps(block_n: int) -> int:
    """The backward's warps: 4 up to 2048 columns, 8 above (the autotuner's picks at 1024 / 4096 / 8192 on the
    H100, session 12). The backward is no longer autotuned: its grid depends on the compiled kernel."""
    return 4 if block_n <= 2048 else 8


def resident_per_sm(n_regs: int, shared: int, warps: int, props) -> int:
    """Programs of `warps` warps that one SM holds at once, limited by registers (allocated per warp in units
    of 256), shared memory and warp slots; 0 when the registers are unknown."""
    if n_regs <= 0:
        return 0
    regs = getattr(props, "regs_per_multiprocessor", None) or 65536
    threads = getattr(props, "max_threads_per_multi_processor", None) or 2048
    smem = getattr(props, "shared_memory_per_multiprocessor", None) or 0
    per_warp = ((n_regs * 32 + 255) // 256) * 256
    fit = min(regs // (per_warp * warps), threads // (32 * warps))
    if shared > 0 and smem > 0:
        fit = min(fit, smem // shared)
    return max(0, fit)


# The backward's programs per SM, per (device, specialization): one full wave of resident programs. Each
# program keeps its dw / db partial sums in registers across its rows, so a second, partial wave only lengthens
# some SMs' work: LayerNorm 16384 x 1024 on the H100 (4 warps, 80 registers, 6 resident) took 46 us at 8 programs
# per SM and 39 us at 6 (benchmarks/norm_bwd_sweep.py, session 15). Until a specialization is compiled, the
# old fixed rule sizes its first launch.
_BWD_PER_SM: dict = {}


def _bwd_per_sm(key, n: int) -> int:
    return _BWD_PER_SM.get(key) or (8 if n <= 2048 else 4)


def _learn_bwd_per_sm(key, compiled, warps: int, device_index: int) -> None:
    """Remember one wave for `key` from the compiled kernel's registers and shared memory (0: keep the rule)."""
    meta = getattr(compiled, "metadata", None)
    shared = getattr(meta, "shared", 0) if meta is not None else 0
    fit = resident_per_sm(getattr(compiled, "n_regs", 0) or 0, shared or 0, warps,
                          torch.cuda.get_device_properties(device_index))
    _BWD_PER_SM[key] = fit


@functools.lru_cache(maxsize=None)
def _tuned_fwd():
    return autotune(norm_fwd_kernel, _fwd_configs(), ["N", "IS_RMS", "HAS_RES", "HAS_W", "HAS_B", "MID"],
                    prune_configs_by={"early_config_prune": _prune_fwd})


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ---------------------------------------------------------------------------------------------- forward
def norm_forward(x, residual, weight, bias, eps: float, is_rms: bool, mid_dtype, out_dtype):
    """Returns (y, h); h is None without a residual."""
    if not _use_triton(x):
        return reference_forward(x, residual, weight, bias, eps, is_rms, mid_dtype, out_dtype)
    y, h, job = _forward_launch(x, residual, weight, bias, eps, is_rms, mid_dtype, out_dtype)
    if job is None:
        return y, h
    kernel, grid, args, flags = job
    if x.is_cuda:
        with torch.cuda.device(x.device):
            # launcher(): Triton's compiled kernel launched directly after the first call (kernels/launch.py)
            launcher(kernel)(grid, args, flags)
    else:  # interpreter: one row per program is the fastest to interpret
        flags = {k: v for k, v in flags.items() if k not in ("ROWS", "num_warps")}
        norm_fwd_kernel[(args[6],)](*args, **flags, ROWS=1)
    return y, h


def _forward_launch(x, residual, weight, bias, eps, is_rms, mid_dtype, out_dtype):
    """(y, h, the CUDA launch (kernel, grid, args, constexprs) or None when there are no rows), the outputs
    allocated: what norm_forward launches, and what `build_ahead` compiles for stand-ins."""
    n = x.shape[-1]
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
        return y, h, None
    block_n = triton.next_power_of_2(n)
    args = (x2, r2, h2, w if w is not None else x2, b if b is not None else x2, y2, m, n,
            x2.stride(0), r2.stride(0), h2.stride(0), y2.stride(0), float(eps))
    flags = dict(IS_RMS=is_rms, HAS_RES=residual is not None, HAS_W=w is not None, HAS_B=b is not None,
                 MID=mid_code(mid_dtype), BLOCK_N=block_n)
    if _autotune_enabled():
        return y, h, (_tuned_fwd(), lambda meta: (triton.cdiv(m, meta["ROWS"]),), args, flags)
    rows, warps = heuristic_fwd(block_n)
    return y, h, (norm_fwd_kernel, (triton.cdiv(m, rows),), args, {**flags, "ROWS": rows, "num_warps": warps})


# Norm forwards whose builds were queued at compile time (passes/build_ahead.py), by what Triton
# specializes on: one queue per specialization, whatever the number of layers.
_AHEAD: set = set()


def forward_standin_job(x, residual, weight, bias, eps, is_rms, mid_dtype, out_dtype):
    """The launch a first norm forward with tensors laid out like these makes (None: none)."""
    return _forward_launch(x, residual, weight, bias, eps, is_rms, mid_dtype, out_dtype)[2]


def build_ahead(x, residual, weight, bias, eps, is_rms, mid_dtype, out_dtype, backward: bool = False,
                has_dh: bool = False, tune: bool = True) -> bool:
    """At compile time: queue the builds of the norm forward a first call with tensors laid out like the stand-ins
    will launch (launch.submit), and with `backward` those of its first backward (backward_standin_jobs); `tune`
    off: the forward's autotuner is not timed ahead. CUDA only. Returns whether builds were queued."""
    if not (x.is_cuda and _use_triton(x)):
        return False
    queued = _queue([forward_standin_job(x, residual, weight, bias, eps, is_rms, mid_dtype, out_dtype)], x.device,
                    "forward", "norm forward, compile time", tune)
    if backward:
        jobs = backward_standin_jobs(x, residual, weight, bias, eps, is_rms, mid_dtype, out_dtype, has_dh)
        queued = _queue(jobs, x.device, "backward", "norm backward, compile time", tune) or queued
    return queued


def _queue(jobs, device, kind: str, what: str, tune: bool = True) -> bool:
    """Queue the builds of the `jobs` not queued before, once per specialization (the layers of a model share one)."""
    new = []
    for job in jobs:
        if job is None:
            continue
        kernel, _grid, args, flags = job
        key = (id(kernel), spec_key(args), tuple(flags.items()))
        if key not in _AHEAD:
            _AHEAD.add(key)
            new.append(job)
    if new:
        submit(kind, new, device, what, tune)
    return bool(new)


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
    dx, part, job, wave_key = _backward_launch(dy, x, weight, dh, eps, is_rms, has_bias, mid_dtype, dx_dtype)
    if job is not None:
        kernel, grid, args, flags = job
        if x.is_cuda:
            with torch.cuda.device(x.device):
                compiled = launcher(kernel)(grid, args, flags)
            if wave_key not in _BWD_PER_SM:
                _learn_bwd_per_sm(wave_key, compiled, flags["num_warps"], wave_key[0])
        else:
            kernel[grid](*args, **flags)
    width = part.shape[1] if part is not None else 0
    sums = column_sums(part, job is not None) if part is not None else None
    dw = sums[:n].to(weight.dtype).reshape(weight.shape) if weight is not None else x.new_empty(0)
    db = sums[width - n:] if has_bias else x.new_empty(0, dtype=torch.float32)
    return dx, dw, db


def _backward_launch(dy, x, weight, dh, eps, is_rms, has_bias, mid_dtype, dx_dtype):
    """(dx, the partial sums' buffer or None, the launch (kernel, grid, args, constexprs) or None when there are no
    rows, the wave key on CUDA), the outputs allocated: what norm_backward launches, and what
    `backward_standin_jobs` compiles for stand-ins."""
    n = x.shape[-1]
    x2 = _rows(x, n)
    dy2 = _rows(dy, n)
    dh2 = _rows(dh, n) if dh is not None else dy2
    m = x2.shape[0]
    dx = torch.empty(x.shape, dtype=dx_dtype, device=x.device)
    dx2 = dx.view(-1, n)
    w = _flat_param(weight, n)
    block_n = triton.next_power_of_2(n)
    flags = dict(IS_RMS=is_rms, HAS_W=w is not None, HAS_B=has_bias, HAS_DH=dh is not None,
                 MID=mid_code(mid_dtype), BLOCK_N=block_n)
    wave_key = None
    if x.is_cuda:
        device_index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        wave_key = (device_index, x.dtype, dy.dtype, tuple(flags.items()))
        programs = max(1, min(m, _sm_count(device_index) * _bwd_per_sm(wave_key, n)))
        # PREFETCH (the next row loaded during this row's sums) won at every shape timed (H100, session 12:
        # LayerNorm fwd+bwd 16384x4096 305 -> 271 us)
        flags.update(num_warps=bwd_warps(block_n), PREFETCH=True)
    else:
        programs = max(1, min(m, 4))
    rows_per_prog = triton.cdiv(max(m, 1), programs)
    programs = triton.cdiv(max(m, 1), rows_per_prog)
    # each program's partial dw and db side by side in one buffer: one reduction over the programs sums both
    width = n * ((w is not None) + has_bias)
    part = torch.empty((programs, width), dtype=torch.float32, device=x.device) if width else None
    if m == 0:
        return dx, part, None, wave_key
    dw_part = part[:, :n] if w is not None else None
    db_part = part[:, width - n:] if has_bias else None
    args = (dy2, x2, w if w is not None else x2, dh2, dx2,
            dw_part if dw_part is not None else dx2, db_part if db_part is not None else dx2,
            m, n, rows_per_prog, dy2.stride(0), x2.stride(0), dh2.stride(0), dx2.stride(0), width, float(eps))
    return dx, part, (norm_bwd_kernel, (programs,), args, flags), wave_key


def backward_standin_jobs(x, residual, weight, bias, eps, is_rms, mid_dtype, out_dtype, has_dh: bool) -> list:
    """The launches (backward and column sums) of the first backward of a norm forward called with tensors laid
    out like these (`has_dh`: the residual form's h has a gradient of its own), on fresh stand-ins: the backward
    reads the forward's input (h = x + residual for the residual form) and gets dy in the output's dtype."""
    saved = x if residual is None else torch.empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype),
                                                   device=x.device)
    dy = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    dh = torch.empty_like(saved) if residual is not None and has_dh else None
    _dx, part, job, _ = _backward_launch(dy, saved, weight, dh, eps, is_rms, bias is not None, mid_dtype,
                                         saved.dtype)
    if job is None:
        return []
    return [job] + ([_column_sum_launch(part)[1]] if part is not None else [])


def column_sum_config(p: int, w: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_W, num_warps) of the partial sums' reduction: enough columns per program for whole
    32-byte sectors, enough programs to spread over the SMs, ~4K elements loaded per step.
    FLASHFUSE_NORM_COLSUM=bp,bw,warps overrides it (benchmarks/norm_bwd_sweep.py); =torch sums with torch's
    sum(0) instead, as before session 17 (for A/B timing)."""
    forced = os.environ.get("FLASHFUSE_NORM_COLSUM")
    if forced and forced != "torch":
        bp, bw, warps = (int(v) for v in forced.split(","))
        return bp, bw, warps
    bw = 16 if w <= 2048 else 32
    return min(4096 // bw, triton.next_power_of_2(max(p, 1))), bw, 4


def column_sums(part: torch.Tensor, filled: bool = True) -> torch.Tensor:
    """part (P, W) fp32, rows contiguous -> its column sums (W,) fp32, by `column_sum_kernel` (zeros when
    nothing was `filled`: no rows)."""
    p, w = part.shape
    if not filled or p == 0:
        return part.new_zeros(w)
    if os.environ.get("FLASHFUSE_NORM_COLSUM") == "torch":
        return part.sum(0)
    out, (kernel, grid, args, constexprs) = _column_sum_launch(part)
    if part.is_cuda:
        with torch.cuda.device(part.device):
            launcher(kernel)(grid, args, constexprs)
    else:
        kernel[grid](*args, **constexprs)
    return out


def _column_sum_launch(part: torch.Tensor):
    """(out, the launch (kernel, grid, args, constexprs)) of the column sums of `part`, out allocated."""
    p, w = part.shape
    out = torch.empty(w, dtype=torch.float32, device=part.device)
    bp, bw, warps = column_sum_config(p, w)
    return out, (column_sum_kernel, (triton.cdiv(w, bw),), (part, out, p, w, part.stride(0)),
                 {"BLOCK_P": bp, "BLOCK_W": bw, "num_warps": warps})


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
