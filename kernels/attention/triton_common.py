"""Triton helpers shared by every generated attention module: dropout bits, tanh, the backward
preprocess, and a kernel that materialises the dropout keep mask (for tests and debugging)."""
import triton
import triton.language as tl

PHILOX_ROUNDS = tl.constexpr(7)  # Philox4x32-7, as in curand and FlashAttention


@triton.jit
def _philox_at(seed, rng_off, bh, c0):
    """The four Philox words of counters (c0, bh, offset lo, offset hi), key: the seed; c0 any shape."""
    c0 = c0.to(tl.uint32, bitcast=True)
    zero = tl.zeros_like(c0)
    c1 = zero + bh.to(tl.uint32, bitcast=True)
    c2 = zero + (rng_off & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + ((rng_off >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return tl.philox(seed, c0, c1, c2, c3, PHILOX_ROUNDS)


@triton.jit
def _span_draws(seed, rng_off, bh, offs_q, span0, Nk, SPANS: tl.constexpr):
    """The four Philox words, each (len(offs_q), SPANS, 4), of queries `offs_q` and key spans span0 .. + SPANS:
    one draw per (query, span of 32 keys, lane l < 4), counter (q * 4 cdiv(Nk, 32) + 4 span + l, bh, offset
    lo, hi), key: the seed. Its word i, half b is the number of key 32 span + 8 i + 2 l + b (dropout.py)."""
    spans = span0 + tl.arange(0, SPANS)
    lanes = tl.arange(0, 4)
    per_row = ((Nk + 31) // 32) * 4
    c0 = offs_q[:, None, None] * per_row + spans[None, :, None] * 4 + lanes[None, None, :]
    return _philox_at(seed, rng_off, bh, c0)


@triton.jit
def _keep_of_draws(r0, r1, r2, r3, keep_thresh, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep flags (BLOCK_Q, BLOCK_N) from `_span_draws`' words. Key 32 s + 8 i + 2 l + b comes from word i,
    half b of draw (s, l): the 8 keys one thread holds in a row of a Hopper wgmma accumulator (columns
    8 i + 2 l + b of each 32, l = thread % 4), so on the GPU each thread compares its own draw's numbers and
    no value moves between threads."""
    t0 = tl.join(r0 & 0xFFFF, r0 >> 16)  # (Q, S, l, b)
    t1 = tl.join(r1 & 0xFFFF, r1 >> 16)
    t2 = tl.join(r2 & 0xFFFF, r2 >> 16)
    t3 = tl.join(r3 & 0xFFFF, r3 >> 16)
    u = tl.join(tl.join(t0, t1), tl.join(t2, t3))  # (Q, S, l, b, i % 2, i // 2)
    u = tl.permute(u, (0, 1, 5, 4, 2, 3))  # (Q, S, i // 2, i % 2, l, b): key 32 s + 8 i + 2 l + b
    return tl.reshape(u, (BLOCK_Q, BLOCK_N)).to(tl.int32) < keep_thresh


@triton.jit
def _keep_by_key(seed, rng_off, bh, offs_q, offs_k, Nk, keep_thresh):
    """The same flags one element at a time (a draw per element, 4x the Philox work): for tiles narrower than
    a span of 32 keys (the interpreter's and the tests' small blocks)."""
    per_row = ((Nk + 31) // 32) * 4
    c0 = offs_q[:, None] * per_row + (offs_k[None, :] // 32) * 4 + (offs_k[None, :] % 8) // 2
    r0, r1, r2, r3 = _philox_at(seed, rng_off, bh, c0)
    i = (offs_k[None, :] % 32) // 8
    word = tl.where(i == 0, r0, tl.where(i == 1, r1, tl.where(i == 2, r2, r3)))
    half = tl.where(offs_k[None, :] % 2 == 0, word & 0xFFFF, word >> 16)
    return half.to(tl.int32) < keep_thresh


@triton.jit
def dropout_keep(seed, rng_off, bh, offs_q, n0, Nk, keep_thresh, BLOCK_N: tl.constexpr):
    """Keep flags (len(offs_q), BLOCK_N) of queries `offs_q` and keys n0 .. n0 + BLOCK_N - 1 (n0 a multiple
    of BLOCK_N, a power of two >= 8). Each draw's 4 words give 8 16-bit numbers, kept below keep_thresh (see
    dropout.py). The forward, the backward and `dropout_mask` all call this, so the flags agree whatever
    their tile sizes."""
    if BLOCK_N >= 32:
        r0, r1, r2, r3 = _span_draws(seed, rng_off, bh, offs_q, n0 // 32, Nk, BLOCK_N // 32)
        return _keep_of_draws(r0, r1, r2, r3, keep_thresh, offs_q.shape[0], BLOCK_N)
    else:
        return _keep_by_key(seed, rng_off, bh, offs_q, n0 + tl.arange(0, BLOCK_N), Nk, keep_thresh)


@triton.jit
def _bits(word, i: tl.constexpr, keep_thresh):
    """Word i's two flags at bits 2 i (low half) and 2 i + 1 (high half) of the draw's byte."""
    lo = ((word & 0xFFFF).to(tl.int32) < keep_thresh).to(tl.int32) << (2 * i)
    hi = ((word >> 16).to(tl.int32) < keep_thresh).to(tl.int32) << (2 * i + 1)
    return lo | hi


@triton.jit
def _bytes_of_draws(r0, r1, r2, r3, keep_thresh, BLOCK_Q: tl.constexpr, SPANS: tl.constexpr):
    """One byte per draw, (BLOCK_Q, 4 SPANS) int32: byte 4 s + l holds draw (s, l), word i half b at bit 2 i + b."""
    byte = _bits(r0, 0, keep_thresh) | _bits(r1, 1, keep_thresh) | _bits(r2, 2, keep_thresh) | _bits(r3, 3, keep_thresh)
    return tl.reshape(byte, (BLOCK_Q, 4 * SPANS))


@triton.jit
def dropout_keep_and_bits(seed, rng_off, bh, offs_q, n0, Nk, keep_thresh, BLOCK_N: tl.constexpr):
    """`dropout_keep` and the flags packed for the backward (dropout.py): int32 bytes (len(offs_q), 4 spans) of
    the spans n0 // 32 ..., one byte per draw. A tile narrower than 32 keys returns its whole span's 4 bytes:
    both tiles of a span store the same bytes, so each is written whichever tiles the forward visits."""
    if BLOCK_N >= 32:
        r0, r1, r2, r3 = _span_draws(seed, rng_off, bh, offs_q, n0 // 32, Nk, BLOCK_N // 32)
        keep = _keep_of_draws(r0, r1, r2, r3, keep_thresh, offs_q.shape[0], BLOCK_N)
        return keep, _bytes_of_draws(r0, r1, r2, r3, keep_thresh, offs_q.shape[0], BLOCK_N // 32)
    else:
        r0, r1, r2, r3 = _span_draws(seed, rng_off, bh, offs_q, n0 // 32, Nk, 1)
        keep = _keep_by_key(seed, rng_off, bh, offs_q, n0 + tl.arange(0, BLOCK_N), Nk, keep_thresh)
        return keep, _bytes_of_draws(r0, r1, r2, r3, keep_thresh, offs_q.shape[0], 1)


@triton.jit
def saved_keep(bits_row, offs_q, n0, NkW, Nq, BLOCK_N: tl.constexpr, KEYS_ARE_ROWS: tl.constexpr):
    """Keep flags of queries `offs_q` and keys n0 .. n0 + BLOCK_N - 1 (n0 a multiple of BLOCK_N, a power of
    two >= 8), read from the bits the forward saved, seen as int32 words: `bits_row` points at this
    batch-head's (Nq, NkW) words, key 32 w + j in word w, bit 8 ((j % 8) // 2) + 2 (j // 8) + j % 2 (byte l,
    bit 2 i + b of `_bytes_of_draws`). Shape (len(offs_q), BLOCK_N), or its transpose with KEYS_ARE_ROWS (the
    dK/dV tiles). A query's words are vectors along the queries that broadcast over the keys: a tile element
    costs a select, a shift and a mask, not a load of its own."""
    q_ok = offs_q < Nq
    w0 = offs_q * 0 + n0 // 32  # a vector: n0 may be a plain int (a loop counter under the interpreter)
    if BLOCK_N >= 32:  # n0 % 32 == 0: the shifts do not depend on n0 (hoisted out of the key loop)
        kk = tl.arange(0, BLOCK_N)
    else:
        kk = (n0 % 32) + tl.arange(0, BLOCK_N)  # key offsets from the first word's first key
    shift = ((kk >> 1) & 3) * 8 + ((kk >> 3) & 3) * 2 + (kk & 1)  # computed once per key, along one axis
    if KEYS_ARE_ROWS:
        kk = kk[:, None]
        shift = shift[:, None]
        word = tl.load(bits_row + offs_q * NkW + w0, mask=q_ok & (w0 < NkW), other=0)[None, :]
        for w in tl.static_range(1, (BLOCK_N + 31) // 32):
            more = tl.load(bits_row + offs_q * NkW + w0 + w, mask=q_ok & (w0 + w < NkW), other=0)[None, :]
            word = tl.where(kk >= 32 * w, more, word)
    else:
        kk = kk[None, :]
        shift = shift[None, :]
        word = tl.load(bits_row + offs_q * NkW + w0, mask=q_ok & (w0 < NkW), other=0)[:, None]
        for w in tl.static_range(1, (BLOCK_N + 31) // 32):
            more = tl.load(bits_row + offs_q * NkW + w0 + w, mask=q_ok & (w0 + w < NkW), other=0)[:, None]
            word = tl.where(kk >= 32 * w, more, word)
    return ((word >> shift) & 1) != 0


@triton.jit
def block_order(blk_x, bh_y, n_blk, n_bh, GROUP_HEADS: tl.constexpr):
    """(block, batch-head) of the program at grid (blk_x, bh_y). The GPU starts programs in linear order,
    x fastest. GROUP_HEADS = 0: each head's blocks in turn (as the grid reads). G > 0: heads in groups of
    G, each group's programs block by block over its heads, so that the heaviest blocks of a causal mask
    (block 0 here: the caller maps it to the heaviest) start first and the light ones fill the tail.
    One group of all heads is longest-first scheduling; smaller groups keep fewer heads' Q/dO in L2."""
    if GROUP_HEADS == 0:
        blk = blk_x
        bh = bh_y
    else:
        pid = bh_y * n_blk + blk_x
        group = pid // (GROUP_HEADS * n_blk)
        r = pid - group * (GROUP_HEADS * n_blk)
        heads_here = tl.minimum(n_bh - group * GROUP_HEADS, GROUP_HEADS)  # the last group may be short
        blk = r // heads_here
        bh = group * GROUP_HEADS + r % heads_here
    return blk, bh


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
def attn_bwd_preprocess(Out, dOut, Stats, Delta, DQacc, stride_ob, stride_oh, stride_om, stride_od,
                        stride_db, stride_dh, stride_dm, stride_dd, H, Nq,
                        DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
                        D: tl.constexpr = 1, BLOCK_D: tl.constexpr = 16, ZERO_DQ: tl.constexpr = False):
    """Delta = rowsum(dO ∘ O), 0 on fully masked rows (log2(l) = -inf in the row stats, O = NaN) so they
    carry no gradient.
    ZERO_DQ: also zero the same rows of the fp32 dQ accumulator (B, H, Nq, D) the fused backward adds into,
    which saves a memset launch."""
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
    log2_l = tl.load(Stats + off_bh.to(tl.int64) * 2 * Nq + Nq + offs_m, mask=offs_m < Nq, other=0.0)
    delta = tl.where(log2_l == float("-inf"), 0.0, delta)
    tl.store(Delta + off_bh.to(tl.int64) * Nq + offs_m, delta, mask=offs_m < Nq)
    if ZERO_DQ:
        offs_k = tl.arange(0, BLOCK_D)
        tl.store(DQacc + off_bh.to(tl.int64) * Nq * D + offs_m[:, None] * D + offs_k[None, :],
                 tl.zeros([BLOCK_M, BLOCK_D], tl.float32), mask=(offs_m[:, None] < Nq) & (offs_k[None, :] < D))


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
