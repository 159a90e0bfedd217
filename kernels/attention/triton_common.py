"""Triton helpers shared by every generated attention module: dropout bits, tanh, the backward
preprocess, and a kernel that materialises the dropout keep mask (for tests and debugging)."""
import triton
import triton.language as tl

PHILOX_ROUNDS = tl.constexpr(7)  # Philox4x32-7, as in curand and FlashAttention


@triton.jit
def dropout_keep(seed, rng_off, bh, offs_q, n0, Nk, keep_thresh, BLOCK_N: tl.constexpr):
    """Keep flags (len(offs_q), BLOCK_N) of queries `offs_q` and keys n0 .. n0 + BLOCK_N - 1 (n0 % 8 == 0).
    One Philox draw per (query, group of 8 keys): counter (q * cdiv(Nk, 8) + group, bh, offset lo, hi);
    its 4 words give 8 16-bit numbers, kept below keep_thresh (see dropout.py). The forward, the backward
    and `dropout_mask` all call this, so the bits agree whatever their tile sizes."""
    groups = n0 // 8 + tl.arange(0, BLOCK_N // 8)
    c0 = (offs_q[:, None] * ((Nk + 7) // 8) + groups[None, :]).to(tl.uint32, bitcast=True)
    zero = tl.zeros_like(c0)
    c1 = zero + bh.to(tl.uint32, bitcast=True)
    c2 = zero + (rng_off & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + ((rng_off >> 32) & 0xFFFFFFFF).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3, PHILOX_ROUNDS)
    words = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (offs_q.shape[0], BLOCK_N // 2))
    halves = tl.join(words & 0xFFFF, words >> 16)
    return tl.reshape(halves, (offs_q.shape[0], BLOCK_N)).to(tl.int32) < keep_thresh


@triton.jit
def _tanh(x, FAST: tl.constexpr):
    if FAST:
        # one MUFU op; abs error ~5e-4 relative, below bf16/fp16 resolution
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)


@triton.jit
def attn_bwd_preprocess(Out, dOut, LSE, Delta, stride_ob, stride_oh, stride_om, stride_od,
                        stride_db, stride_dh, stride_dm, stride_dd, H, Nq,
                        DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Delta = rowsum(dO ∘ O), 0 on fully masked rows (lse = -inf, O = NaN) so they carry no gradient."""
    pid_m = tl.program_id(0)
    off_bh = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < Nq) & (offs_d[None, :] < DV)
    o = tl.load(Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(dOut + off_b.to(tl.int64) * stride_db + off_h.to(tl.int64) * stride_dh
                 + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    lse = tl.load(LSE + off_bh.to(tl.int64) * Nq + offs_m, mask=offs_m < Nq, other=0.0)
    delta = tl.where(lse == float("-inf"), 0.0, delta)
    tl.store(Delta + off_bh.to(tl.int64) * Nq + offs_m, delta, mask=offs_m < Nq)


@triton.jit
def dropout_mask_kernel(Mask, RNG, H, Nq, Nk, keep_thresh, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    off_bh = tl.program_id(2)
    seed = tl.load(RNG)
    rng_off = tl.load(RNG + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = dropout_keep(seed, rng_off, off_bh, offs_m, pid_n * BLOCK_N, Nk, keep_thresh, BLOCK_N)
    ptrs = Mask + off_bh.to(tl.int64) * Nq * Nk + offs_m[:, None] * Nk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < Nq) & (offs_n[None, :] < Nk))
