"""Triton kernels shared by the norm family (LayerNorm, RMSNorm, each with an optional residual add).

One program normalizes ROWS rows that sit entirely in registers (N <= MAX_N), so every element of x is
read once and every element of y written once. Statistics are in fp32 whatever the input dtype.

Forward, per row (x, r, w, b loaded and upcast to fp32):
    h    = x + r, rounded to h's dtype and stored          (HAS_RES; the norm then reads rounded h)
    xhat = (h - mean) * rsqrt(var + eps)                    (LayerNorm; var is the biased variance)
    xhat = h * rsqrt(mean(h*h) + eps)                       (RMSNorm)
    xhat = xhat rounded to MID (MID != 0: a cast the user wrote between the norm and the weight)
    y    = xhat * w + b, rounded to y's dtype
Backward recomputes mean/rstd from x (the row is loaded anyway), so nothing but x is saved.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Longest row kept in registers. Longer rows are not fused (the pass says so) and the ops fall back to
# the PyTorch reference implementation.
MAX_N = 16384

# MID codes: the dtype of an intermediate rounding between the normalization and the weight.
MID_NONE, MID_FP16, MID_BF16 = 0, 1, 2


@triton.jit
def _round_mid(v, MID: tl.constexpr):
    if MID == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif MID == 2:
        v = v.to(tl.bfloat16).to(tl.float32)
    return v


@triton.jit
def _add_pairs(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _add_triples(a0, b0, c0, a1, b1, c1):
    return a0 + a1, b0 + b1, c0 + c1


@triton.jit
def norm_fwd_kernel(X, R, H, W, B, Y, M, N, stride_x, stride_r, stride_h, stride_y, eps,
                    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
                    HAS_B: tl.constexpr, MID: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)
        tl.store(H + rows64[:, None] * stride_h + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    if IS_RMS:
        var = tl.sum(x * x, axis=1) / N
        xhat = x * tl.rsqrt(var + eps)[:, None]
    else:
        mean = tl.sum(x, axis=1) / N
        d = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(d * d, axis=1) / N
        xhat = d * tl.rsqrt(var + eps)[:, None]
    xhat = _round_mid(xhat, MID)
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        xhat = xhat * w[None, :]
    if HAS_B:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        xhat = xhat + b[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], xhat.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def norm_bwd_kernel(DY, X, W, DH, DX, DW, DB, M, N, rows_per_prog,
                    stride_dy, stride_x, stride_dh, stride_dx, stride_part, eps,
                    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DH: tl.constexpr,
                    MID: tl.constexpr, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr = False,
                    PAIRED: tl.constexpr = True):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w (RMSNorm: without the mean(g) term).
    Each program walks `rows_per_prog` rows and writes its partial dw/db sums to row `pid` of DW/DB (rows
    `stride_part` apart: dw and db side by side in one buffer, summed by one reduction).
    PREFETCH: the next row's x and dy are loaded before this row's reductions, so each program keeps a load
    in flight while it reduces (one row at a time leaves the memory idle during the row sums).
    PAIRED: sums that do not depend on each other are reduced together (sum x with sum g, then sum d, d*d
    and g*d, as mean(g*xhat) = rstd*mean(g*d)): 2 rounds per row instead of 4, and sum d corrects the
    rounded mean."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_prog  # int64 rows: no offset overflow on huge tensors
    row_end = tl.minimum(row_start + rows_per_prog, M)
    if PREFETCH:
        # masks as column limits (N, or 0 past the program's last row): plain integer arithmetic
        first = cols < tl.maximum(tl.minimum(row_end - row_start, 1), 0) * N
        x_next = tl.load(X + row_start * stride_x + cols, mask=first, other=0.0)
        dy_next = tl.load(DY + row_start * stride_dy + cols, mask=first, other=0.0)
    for row64 in range(row_start, row_end):
        if PREFETCH:
            x = x_next.to(tl.float32)
            dy = dy_next.to(tl.float32)
            more = cols < tl.minimum(row_end - row64 - 1, 1) * N
            x_next = tl.load(X + (row64 + 1) * stride_x + cols, mask=more, other=0.0)
            dy_next = tl.load(DY + (row64 + 1) * stride_dy + cols, mask=more, other=0.0)
        else:
            x = tl.load(X + row64 * stride_x + cols, mask=col_ok, other=0.0).to(tl.float32)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_W:
            g = dy * w
        else:
            g = dy
        if PAIRED:
            # independent sums reduced together: 2 rounds of shuffles and barriers per row (1 for RMSNorm)
            if IS_RMS:
                sxx, sgx = tl.reduce((x * x, g * x), 0, _add_pairs)
                rstd = tl.rsqrt(sxx / N + eps)
                xhat = x * rstd
                mean_gx = rstd * sgx / N  # mean(g * xhat)
            else:
                sx, sg = tl.reduce((x, g), 0, _add_pairs)
                d = tl.where(col_ok, x - sx / N, 0.0)
                sd, sdd, sgd = tl.reduce((d, d * d, g * d), 0, _add_triples)
                # the mean's rounding error shows as sum(d) != 0 (large offsets, e.g. x ~ 1e3 + noise):
                # take it out of d and of both sums, which makes d more exact than one rounded mean does
                dm = sd / N
                d = tl.where(col_ok, d - dm, 0.0)
                rstd = tl.rsqrt((sdd - sd * dm) / N + eps)
                xhat = d * rstd
                mean_gx = rstd * (sgd - sg * dm) / N
        else:  # one sum after the other: 4 rounds (2 for RMSNorm)
            if IS_RMS:
                rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
                xhat = x * rstd
            else:
                mean = tl.sum(x, axis=0) / N
                d = tl.where(col_ok, x - mean, 0.0)
                rstd = tl.rsqrt(tl.sum(d * d, axis=0) / N + eps)
                xhat = d * rstd
                sg = tl.sum(g, axis=0)
            mean_gx = tl.sum(g * xhat, axis=0) / N
        if HAS_W:
            dw += dy * _round_mid(xhat, MID)
        if HAS_B:
            db += dy
        if IS_RMS:
            dx = rstd * (g - xhat * mean_gx)
        else:
            dx = rstd * (g - sg / N - xhat * mean_gx)
        if HAS_DH:
            dx += tl.load(DH + row64 * stride_dh + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=col_ok)
    if HAS_W:
        tl.store(DW + pid * stride_part + cols, dw, mask=col_ok)
    if HAS_B:
        tl.store(DB + pid * stride_part + cols, db, mask=col_ok)


@triton.jit
def column_sum_kernel(Part, Out, P, W, stride_p, BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr):
    """Out[j] = sum_i Part[i, j] in fp32, rows in a fixed order (deterministic): the backward's per-program
    partial dw / db sums. One program per BLOCK_W columns walks all P rows, BLOCK_P at a time. torch's
    `part.sum(0)` took 15 us for RMSNorm 16384x1024's (1024, 1024) partials on the H100, Inductor's own
    reduction of its partials 6.3 (session 17)."""
    cols = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    col_ok = cols < W
    acc = tl.zeros([BLOCK_P, BLOCK_W], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        acc += tl.load(Part + rows[:, None].to(tl.int64) * stride_p + cols[None, :],
                       mask=(rows[:, None] < P) & col_ok[None, :], other=0.0)
    tl.store(Out + cols, tl.sum(acc, axis=0), mask=col_ok)
