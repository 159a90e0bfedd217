"""Triton helpers shared by every generated attention module: dropout bits, tanh, the backward
preprocess, and a kernel that materialises the dropout keep mask (for tests and debugging)."""
import triton
import triton.language as tl

PHILOX_ROUNDS = tl.constexpr(7)  # Philox4x32-7, as in curand and FlashAttention


@triton.jit
def _dropout_words(seed, rng_off, bh, offs_q, n0, Nk, BLOCK_N: tl.constexpr):
    """The four Philox words (len(offs_q), BLOCK_N // 8) of queries `offs_q`, key groups n0 // 8 ... One draw
    per (query, group of 8 keys): counter (q * cdiv(Nk, 8) + group, bh, offset lo, hi); key: the seed."""
    groups = n0 // 8 + tl.arange(0, BLOCK_N // 8)
    c0 = (offs_q[:, None] * ((Nk + 7) // 8) + groups[None, :]).to(tl.uint32, bitcast=True)
    zero = tl.zeros_like(c0)
    c1 = zero + bh.to(tl.uint32, bitcast=True)
    c2 = zero + (rng_off & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + ((rng_off >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return tl.philox(seed, c0, c1, c2, c3, PHILOX_ROUNDS)


@triton.jit
def _keep_of_words(r0, r1, r2, r3, keep_thresh, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep flags (BLOCK_Q, BLOCK_N): the words' 8 16-bit numbers per group, in the key order
    r0 lo, r0 hi, r2 lo, r2 hi, r1 lo, r1 hi, r3 lo, r3 hi (the order the joins below lay them out)."""
    words = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_Q, BLOCK_N // 2))
    halves = tl.join(words & 0xFFFF, words >> 16)
    return tl.reshape(halves, (BLOCK_Q, BLOCK_N)).to(tl.int32) < keep_thresh


@triton.jit
def dropout_keep(seed, rng_off, bh, offs_q, n0, Nk, keep_thresh, BLOCK_N: tl.constexpr):
    """Keep flags (len(offs_q), BLOCK_N) of queries `offs_q` and keys n0 .. n0 + BLOCK_N - 1 (n0 % 8 == 0).
    Each draw's 4 words give 8 16-bit numbers, kept below keep_thresh (see dropout.py). The forward, the
    backward and `dropout_mask` all call this, so the bits agree whatever their tile sizes."""
    r0, r1, r2, r3 = _dropout_words(seed, rng_off, bh, offs_q, n0, Nk, BLOCK_N)
    return _keep_of_words(r0, r1, r2, r3, keep_thresh, offs_q.shape[0], BLOCK_N)


@triton.jit
def _bit(word, shift: tl.constexpr, keep_thresh, pos: tl.constexpr):
    return (((word >> shift) & 0xFFFF).to(tl.int32) < keep_thresh).to(tl.int32) << pos


@triton.jit
def dropout_keep_and_bits(seed, rng_off, bh, offs_q, n0, Nk, keep_thresh, BLOCK_N: tl.constexpr):
    """`dropout_keep` and the same flags packed for the backward (dropout.py): (len(offs_q), BLOCK_N // 8)
    int32 bytes, key 8 g + j in bit j of byte g. Packed straight from the words, in `_keep_of_words`'s order."""
    r0, r1, r2, r3 = _dropout_words(seed, rng_off, bh, offs_q, n0, Nk, BLOCK_N)
    keep = _keep_of_words(r0, r1, r2, r3, keep_thresh, offs_q.shape[0], BLOCK_N)
    bits = (_bit(r0, 0, keep_thresh, 0) | _bit(r0, 16, keep_thresh, 1) | _bit(r2, 0, keep_thresh, 2)
            | _bit(r2, 16, keep_thresh, 3) | _bit(r1, 0, keep_thresh, 4) | _bit(r1, 16, keep_thresh, 5)
            | _bit(r3, 0, keep_thresh, 6) | _bit(r3, 16, keep_thresh, 7))
    return keep, bits


@triton.jit
def saved_keep(bits_row, offs_q, n0, NkW, Nq, BLOCK_N: tl.constexpr, KEYS_ARE_ROWS: tl.constexpr):
    """Keep flags of queries `offs_q` and keys n0 .. n0 + BLOCK_N - 1 (n0 a multiple of BLOCK_N, a power of
    two >= 8), read from the bits the forward saved, seen as int32 words: `bits_row` points at this
    batch-head's (Nq, NkW) words, key k in bit k % 32 of word k // 32. Shape (len(offs_q), BLOCK_N), or its
    transpose with KEYS_ARE_ROWS (the dK/dV tiles). A query's words are vectors along the queries that
    broadcast over the keys: a tile element costs a select, a shift and a mask, not a load of its own."""
    q_ok = offs_q < Nq
    w0 = offs_q * 0 + n0 // 32  # a vector: n0 may be a plain int (a loop counter under the interpreter)
    if KEYS_ARE_ROWS:
        kk = (n0 % 32) + tl.arange(0, BLOCK_N)[:, None]
        word = tl.load(bits_row + offs_q * NkW + w0, mask=q_ok & (w0 < NkW), other=0)[None, :]
        for w in tl.static_range(1, (BLOCK_N + 31) // 32):
            more = tl.load(bits_row + offs_q * NkW + w0 + w, mask=q_ok & (w0 + w < NkW), other=0)[None, :]
            word = tl.where(kk >= 32 * w, more, word)
    else:
        kk = (n0 % 32) + tl.arange(0, BLOCK_N)[None, :]
        word = tl.load(bits_row + offs_q * NkW + w0, mask=q_ok & (w0 < NkW), other=0)[:, None]
        for w in tl.static_range(1, (BLOCK_N + 31) // 32):
            more = tl.load(bits_row + offs_q * NkW + w0 + w, mask=q_ok & (w0 + w < NkW), other=0)[:, None]
            word = tl.where(kk >= 32 * w, more, word)
    return ((word >> (kk & 31)) & 1) != 0


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
