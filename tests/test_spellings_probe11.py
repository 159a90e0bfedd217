"""Hidden set #11: edge shapes and numerics, the inputs where a fused kernel is most likely to return a
silently wrong number. Written without reading the passes or the kernels (only flashfuse.testing / explain).

Attention shapes: decode steps (Nq = 1 over Nk = 1 / 33 / 65, with the causal KV offset), a single key
(Nk = 1), Nq < Nk and Nq > Nk (the causal offset then leaves whole rows without keys: NaN like eager), head
dims 1, 3, 5, 24, 40, 72, 80, 96, 120, 128, 136 and a value head dim different from the query / key one,
batch 1 and one head, GQA with 8 query heads over 1 and 2 KV heads (HF repeat_kv), empty batches (B = 0),
no queries (Nq = 0) and no keys (Nk = 0, eager gives zeros); layouts: (B, N, H, d) inputs transposed in the
model, every other head (stride 2), a query set expanded over the batch (stride 0), K passed pre-transposed,
q sliced along the sequence (storage offset), a channels_last image attended over its pixels.

Attention numerics: one-hot scores (q, k x 30), scale 0, a negative scale, temperature 1e-6, the scale as a
0-d buffer and as a learned 0-d parameter (its gradient); fp16 raw scores up to 6e4 with the scale after and
before the matmul, fp16 scores overflowing to inf, fp16 softmax over 1100 keys, HF's fp16 finfo.min mask on
a fully padded sequence; rows emptied by -inf (NaN), by finfo.min (uniform), keys no query sees (zero
dk / dv); additive biases of -1e4, -1e9, -inf and +inf on emptied rows / single entries, a per-row constant
bias, NaN in the bias where a later masked_fill hides it; NaN / inf in q, k, v, and NaN / inf in a v / k row
the causal mask hides (eager spreads them as 0 * NaN); dropout p = 0 and p = 1 in training mode.

Norms: constant rows (variance 0) with eps 1e-12, eps 0, a negative eps, offsets of 1e4 (fp32) and 300 (fp16)
over small noise (LayerNorm, a hand-written one and residual + LayerNorm), a single feature (LayerNorm and
RMSNorm), 4097 features (fp32 and fp16), NaN / inf in one row, fp16 input with fp32 weight (F.layer_norm and
HF LlamaRMSNorm, whose output is fp32), a weight with exact zeros, all-zero RMS rows with eps 1e-6 and eps 0
(NaN), torch.nn.RMSNorm on values of 1e-20, an RMSNorm without the fp32 upcast whose fp16 x^2 overflows.
Pointwise: a chain dividing by exact zeros (+-inf, NaN), an int64 tensor and 0-d tensors in chains, a chain
broadcast to an empty shape, bias + GELU at pre-activations up to 64 (fp32, fp16), PReLU spelled with x > 0
and x >= 0 on exact zeros (the gradient there differs), global pooling over planes holding inf and NaN.

Harness: tests/probe_harness.py (shared with probes 6 and 10; written for this set: NaN / inf positions
compared exactly, a mismatch is an infinite error): each case compiles a copy with flashfuse.backend(remainder="eager",
norm_policy="always"), asserts the exact fusion counts and compares outputs and every input / parameter
gradient with eager (relative L2 < 1e-4 in fp32, 1e-2 in fp16). Where eager itself is the inaccurate one
(`ref64`: LayerNorm's CPU backward on constant or offset rows, fp16 scores of 1e4), both are measured against a
float64 run of the same program and flashfuse must be within max(tol, 2 x eager's error). Cases that fail
today are xfail(strict=True) with what was measured: wrong numbers were checked against float64 and reduced
to a smallest reproduction (in the reason). test_cases_stress_what_they_claim checks the premises in eager.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from probe_harness import ROWS, Fn, case, causal_keep, rand, rel, repeat_kv, run_row

B, H, HD = 2, 2, 8     # batch, heads, head dim
TOL_FP16 = 1e-2
NEG_INF = float("-inf")
F16 = torch.float16

# ---- what this set found (each measured, and checked against a float64 eager run of the same program)
# wrong numbers
TEMPERATURE_GRAD = ("WRONG GRADIENT (vs eager and float64): scores / 1e-6, every softmax row exactly one-hot: eager's "
                    "and float64's dq, dk are exactly 0, flashfuse's have norms 5.4 / 5.9 (output and dv agree); "
                    "smallest: B = H = Nq = Nk = 1, d = 16 (one key, softmax == 1): dq entries up to 0.43 instead of "
                    "0, a ~1e-7 residue of dP - rowsum(dO * O) times the 1e6 scale (see decode_nq1_nk1)")
FP16_MIN_PADDED = ("WRONG OUTPUT (vs eager and the float64 program): fp16, HF's (1 - mask) * finfo(fp16).min, one "
                   "sequence entirely padded: eager rounds every score + (-65504) to -65504 and averages v "
                   "uniformly; flashfuse adds the fp16 bias to fp32 scores, which survive: softmax(q k^T / sqrt(d)) v "
                   "as if unmasked (rel 1.35 on that batch, 0.64 overall; within 1e-3 of unmasked fp32 attention); "
                   "smallest: B = H = 1, N = 2, d = 16, mask all 0 (the fp32 version is right)")
# NaN / inf that eager spreads through 0 * NaN at positions the mask hides: flashfuse skips them per tile
V_NAN_MASKED = ("WRONG OUTPUT (vs eager): v[16] = NaN, a key the causal mask hides from queries 0..15: eager's "
                "output column is NaN in all 17 rows (0 * NaN), flashfuse's in row 16 only (dq: 8 NaN vs 136); at "
                "N = 40 with v[39] NaN rows 32..39 (the key's tile) are NaN and rows 0..31 finite: the result "
                "depends on the tile size (at N = 2 they agree)")
K_INF_MASKED = ("WRONG GRADIENT (vs eager): k[39] = +inf, hidden by the causal mask from queries 0..38: the "
                "outputs agree (finite); eager's dq is NaN in all 40 rows (dS[i, 39] = 0 times inf in dS @ K), "
                "flashfuse's in rows 32..39 only, the key's tile (k[16] = NaN at N = 17: 1 row vs 17)")
# fp16 overflow in an eager intermediate that flashfuse keeps in fp32 (its numbers are float64's)
FP16_SCORE_OVERFLOW = ("WRONG OUTPUT (vs eager), flashfuse's = float64's: 17 fp16 raw scores q k^T exceed 65504, "
                       "inf in eager -> 192 NaN outputs and NaN gradients; flashfuse keeps the scores in fp32 and "
                       "returns finite numbers 4e-5 from a float64 run; smallest: q = k = full((1, 1, 1, 16), 70.) "
                       "fp16: eager NaN, flashfuse v")
FP16_RMS_OVERFLOW = ("WRONG OUTPUT (vs eager), flashfuse's = float64's: an RMSNorm without the fp32 upcast, fp16 "
                     "|x| ~ 300: eager's x.pow(2) overflows, rsqrt(inf) = 0, output and gradients exactly 0; "
                     "flashfuse (computing in fp32) is 2e-4 from float64; smallest: x = full((1, 1), 300.) fp16: "
                     "eager 0, flashfuse 1")


# ================================================================================================ inputs
# The harness (tests/probe_harness.py) took its NaN / inf handling from this set: `rel` compares the NaN / +-inf
# positions first (a mismatch is an infinite error) and the finite entries by relative L2; `floor` (per case) is
# the smallest norm an error is relative to; `ref64` judges a case against a float64 run where eager is
# ill-conditioned; `nonfinite` asserts eager's output has (or has no) NaN / inf, so a case cannot silently stop
# testing what its name says; a model may carry `keep_params = True` to skip `perturb` (zeros in a weight on purpose).
def qkv(seed, b=B, h=H, nq=17, nk=None, d=HD, scale=1.0, dtype=torch.float32, hk=None):
    nk = nq if nk is None else nk
    hk = h if hk is None else hk
    return (rand(b, h, nq, d, seed=seed, scale=scale, dtype=dtype),
            rand(b, hk, nk, d, seed=seed + 1, scale=scale, dtype=dtype),
            rand(b, hk, nk, d, seed=seed + 2, dtype=dtype))


def with_value(t, index, value):
    t = t.clone()
    t[index] = value
    return t


# ================================================================================================ attention spellings
def plain(m, q, k, v):
    """q k^T / sqrt(d), softmax, @ v (no mask)."""
    s = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1]))
    return F.softmax(s, dim=-1) @ v


def causal_offset(m, q, k, v):
    """Causal with the KV offset Nk - Nq (the last query sees every key), masked_fill -inf."""
    nq, nk = q.shape[-2], k.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~causal_keep(nq, nk), NEG_INF)
    return s.softmax(-1) @ v


def nanogpt_causal(m, q, k, v):
    """nanoGPT: scores * (1 / sqrt(d)), masked_fill(tril buffer == 0, -inf), softmax, @ v."""
    n = q.shape[-2]
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    att = att.masked_fill(m.bias[:, :, :n, :n] == 0, NEG_INF)
    return F.softmax(att, dim=-1) @ v


def NanoGPT(n=64):
    return Fn(nanogpt_causal, buffers=dict(bias=torch.tril(torch.ones(n, n)).view(1, 1, n, n)))


def gqa_causal(m, q, k, v):
    """HF eager_attention_forward: repeat_kv, * scaling, + the finfo.min causal mask, softmax in fp32."""
    k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
    n = q.shape[-2]
    mask = torch.triu(torch.full((n, n), torch.finfo(q.dtype).min, dtype=q.dtype), diagonal=1)[None, None]
    w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


# ---- layouts
def bnhd_inputs(m, q, k, v):
    """(B, N, H, d) inputs transposed to (B, H, N, d) in the model (the usual projection layout)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return (F.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1) @ v).transpose(1, 2)


def every_other_head(m, q, k, v):
    """q / k / v sliced [:, ::2]: strides 2x the head stride."""
    q, k, v = q[:, ::2], k[:, ::2], v[:, ::2]
    return F.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v


def expanded_batch_query(m, q, k, v):
    """One learned-query set (1, H, Nq, d) expanded over the batch (Perceiver latents): stride 0."""
    q = q.expand(k.shape[0], -1, -1, -1)
    return F.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v


def k_pre_transposed(m, q, kt, v):
    """K given already as (B, H, d, N) (contiguous): q @ kt."""
    return F.softmax(torch.matmul(q, kt) / math.sqrt(q.shape[-1]), -1) @ v


def q_sequence_sliced(m, q, k, v):
    """q[:, :, 3:]: the last Nq - 3 queries only (a non-zero storage offset, the sequence stride kept)."""
    q = q[:, :, 3:]
    return F.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), -1) @ v


def channels_last_image_attention(m, x):
    """diffusers / VAE AttnBlock on a channels_last image: q, k, v = x viewed (B, C, HW) and permuted,
    one head of C = 8 channels."""
    b, c, h, w = x.shape
    q = x.reshape(b, c, h * w).permute(0, 2, 1)          # (B, HW, C)
    k = (x * 0.5).reshape(b, c, h * w)                    # (B, C, HW)
    v = (x + 1.0).reshape(b, c, h * w)
    w_ = torch.bmm(q, k) * (int(c) ** (-0.5))
    w_ = F.softmax(w_, dim=2)
    out = torch.bmm(v, w_.permute(0, 2, 1))              # (B, C, HW)
    return out.reshape(b, c, h, w)


# ---- scales
def scaled(scale):
    def f(m, q, k, v):
        return F.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v
    f.__doc__ = f"q k^T * {scale}, softmax, @ v"
    return f


def divided_by_temperature(t):
    def f(m, q, k, v):
        return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / t, dim=-1) @ v
    return f


def tensor_scale(m, q, k, v):
    """The scale a 0-d tensor (a buffer or a learned Parameter)."""
    return F.softmax(q @ k.transpose(-2, -1) * m.scale, dim=-1) @ v


def scale_before_matmul(m, q, k, v):
    """q * (1 / sqrt(d)) before the matmul (HF BERT-style pre-scaling)."""
    q = q * (q.shape[-1] ** -0.5)
    return F.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


# ---- masks and biases
def masked_fill_keep(m, q, k, v):
    """masked_fill(~keep, fill) with a (Nq, Nk) / (B, 1, Nq, Nk) bool buffer `keep`; fill = m.fill."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~m.keep, m.fill)
    return s.softmax(-1) @ v


def Keep(keep, fill=NEG_INF):
    return Fn(masked_fill_keep, buffers=dict(keep=keep), fill=fill)


def additive_bias(m, q, k, v):
    """scores + a float bias buffer (HF extended attention mask / a fixed bias)."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + m.bias
    return F.softmax(s, dim=-1) @ v


def Bias(bias):
    return Fn(additive_bias, buffers=dict(bias=bias))


def bias_then_masked_fill(m, q, k, v):
    """scores + bias (NaN / inf where masked), then masked_fill(~keep, -inf): eager never sees the NaN."""
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + m.bias
    s = s.masked_fill(~m.keep, NEG_INF)
    return F.softmax(s, dim=-1) @ v


def hf_extended_padding_mask(m, q, k, v, mask):
    """HF get_extended_attention_mask: (1 - mask[:, None, None]) * finfo.min added to the scores."""
    ext = (1.0 - mask[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + ext
    return s.softmax(-1) @ v


# ---- dropout
def dropout_train(p):
    def f(m, q, k, v):
        a = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        a = F.dropout(a, p=p, training=True)
        return a @ v
    return f


# ---- sizes of the cases below
def _q(seed, n=17, scale=1.0, dtype=torch.float32, b=B, h=H, d=HD):
    return qkv(seed, b=b, h=h, nq=n, d=d, scale=scale, dtype=dtype)


def rows_emptied(nq=17, nk=17, rows=(3, 11)):
    """keep (Nq, Nk) causal with whole query rows False (those queries see no key)."""
    keep = causal_keep(nq, nk).clone()
    keep[list(rows)] = False
    return keep


def columns_emptied(nq=17, nk=17, cols=(2, 9, 16)):
    keep = torch.ones(nq, nk, dtype=torch.bool)
    keep[:, list(cols)] = False
    return keep


# ================================================================================================ attention shapes
SHAPES = [
    # ---- decode steps, one key, Nq != Nk
    # One key: the softmax is exactly 1, so the true (float64) and eager gradients of q and k are exactly 0;
    # flashfuse's are ~3e-7 per element (rounding of dP - rowsum(dO * O), against dv ~ 2): floor 0.1 on the
    # norm they are measured against. The same residue times a 1e6 scale is temperature_1e-6 below.
    case("decode_nq1_nk1", lambda: Fn(plain), qkv(1, nq=1, nk=1), dict(attention=1), floor=0.1),
    case("decode_nq1_nk33_causal_offset", lambda: Fn(causal_offset), qkv(4, nq=1, nk=33), dict(attention=1)),
    case("decode_nq1_nk65_causal_offset", lambda: Fn(causal_offset), qkv(7, nq=1, nk=65), dict(attention=1)),
    case("nk1_nq17_one_key", lambda: Fn(plain), qkv(13, nq=17, nk=1), dict(attention=1), floor=0.1),
    case("cross_nq5_nk41", lambda: Fn(plain), qkv(16, nq=5, nk=41), dict(attention=1)),
    # Nq > Nk with the KV offset Nk - Nq < 0: the first 36 queries see no key (eager: NaN rows)
    case("causal_offset_nq41_nk5_first_rows_see_nothing", lambda: Fn(causal_offset), qkv(22, nq=41, nk=5),
         dict(attention=1), nonfinite=True),
    # ---- head dims (the kernels claim 16..256, 80 / 96 padded; below 16 and odd ones fuse too, eager's numbers)
    case("head_dim_1", lambda: Fn(plain), _q(25, d=1), dict(attention=1)),
    case("head_dim_3", lambda: Fn(plain), _q(28, d=3), dict(attention=1)),
    case("head_dim_5_causal", NanoGPT, _q(31, d=5), dict(attention=1)),
    case("head_dim_24", lambda: Fn(plain), _q(34, d=24, b=1), dict(attention=1)),
    case("head_dim_40_causal", NanoGPT, _q(37, d=40, b=1), dict(attention=1)),
    case("head_dim_72", lambda: Fn(plain), _q(40, d=72, b=1), dict(attention=1)),
    case("head_dim_80_causal", NanoGPT, _q(43, d=80, b=1), dict(attention=1)),
    case("head_dim_96", lambda: Fn(plain), _q(46, d=96, b=1), dict(attention=1)),
    case("head_dim_120", lambda: Fn(plain), _q(49, d=120, b=1, h=1), dict(attention=1)),
    case("head_dim_128_causal", NanoGPT, _q(52, d=128, b=1, h=1), dict(attention=1)),
    case("head_dim_136", lambda: Fn(plain), _q(55, d=136, b=1, h=1), dict(attention=1)),
    case("value_head_dim_8_query_key_head_dim_16", lambda: Fn(plain),
         (rand(2, 2, 17, 16, seed=56), rand(2, 2, 17, 16, seed=57), rand(2, 2, 17, 8, seed=58)), dict(attention=1)),
    # ---- batch / heads
    case("batch1_heads1_n33", NanoGPT, _q(58, n=33, b=1, h=1), dict(attention=1)),
    case("gqa_8q_heads_over_1_kv_head_mqa", lambda: Fn(gqa_causal), qkv(61, b=1, h=8, hk=1, nq=13), dict(attention=1)),
    case("gqa_8q_heads_over_2_kv_heads", lambda: Fn(gqa_causal), qkv(64, b=1, h=8, hk=2, nq=13), dict(attention=1)),
    # ---- empty (fused; B = 0 and Nq = 0 give eager's empty results)
    case("zero_batch_b0", lambda: Fn(plain), qkv(67, b=0), dict(attention=1)),
    case("zero_queries_nq0", lambda: Fn(plain), qkv(70, nq=0, nk=9), dict(attention=1)),
    # eager: softmax over an empty dim is empty, the (Nq, 0) @ (0, d) product is exactly 0 (float64 too)
    # found by this set (fixed in session 16: the kernels gave NaN, as for a row whose keys are all masked)
    case("zero_keys_nk0_output_zeros", lambda: Fn(plain), qkv(73, nq=9, nk=0), dict(attention=1)),
    # ---- layouts
    case("bnhd_inputs_transposed_in_model", lambda: Fn(bnhd_inputs),
         tuple(t.transpose(1, 2).contiguous() for t in _q(76, n=19)), dict(attention=1)),
    case("every_other_head_sliced_stride2", lambda: Fn(every_other_head), _q(79, n=19, h=4), dict(attention=1)),
    case("expanded_batch_query_stride0", lambda: Fn(expanded_batch_query),
         (rand(1, H, 7, HD, seed=82),) + qkv(83, nq=21)[1:], dict(attention=1)),
    case("k_pre_transposed_bhdn", lambda: Fn(k_pre_transposed),
         (lambda q, k, v: (q, k.transpose(-2, -1).contiguous(), v))(*_q(86, n=19)), dict(attention=1)),
    case("q_sliced_along_the_sequence_storage_offset", lambda: Fn(q_sequence_sliced), _q(87, n=20),
         dict(attention=1)),
    case("channels_last_image_single_head_c8_5x5", lambda: Fn(channels_last_image_attention),
         (rand(2, 8, 5, 5, seed=89).to(memory_format=torch.channels_last),), dict(attention=1)),
]


@pytest.mark.parametrize(ROWS, SHAPES)
def test_attention_shapes(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)


# ================================================================================================ attention numerics
F32_MIN = torch.finfo(torch.float32).min


def _bias(keep, fill, other=0.0):
    """A float (Nq, Nk) bias: `other` where keep, `fill` elsewhere."""
    return torch.where(keep, torch.tensor(other), torch.tensor(fill))


def _nan_bias_where_masked(keep, value):
    return torch.where(keep, 0.3 * rand(*keep.shape, seed=5), torch.tensor(value))


def _row_constant_bias(nq=17, nk=17):
    """Each query row's bias one number (5 * row - 40): the softmax cannot see it."""
    return (5.0 * torch.arange(nq, dtype=torch.float32) - 40.0)[:, None].expand(nq, nk).contiguous()


def _plus_inf_bias(nq=17, nk=17):
    b = 0.2 * rand(nq, nk, seed=6)
    b[4, 7] = math.inf        # eager: exp(inf - inf) = NaN, the whole row NaN
    b[12, 0] = math.inf
    return b


def _padding(lengths, n=17):
    return torch.arange(n)[None] < torch.tensor(lengths)[:, None]


NUMERICS = [
    # ---- score magnitude and scale
    case("one_hot_q_k_times_30_scores_std_900_causal", NanoGPT, _q(103, scale=30.0), dict(attention=1)),
    case("scale_zero_exactly_uniform", lambda: Fn(scaled(0.0)), _q(109), dict(attention=1)),
    case("negative_scale_minus_0.35", lambda: Fn(scaled(-0.35)), _q(112), dict(attention=1)),
    case("temperature_1e-6_divided_scores_1e6", lambda: Fn(divided_by_temperature(1e-6)), _q(115),
         dict(attention=1), xfail=TEMPERATURE_GRAD),
    case("scale_as_0d_tensor_buffer", lambda: Fn(tensor_scale, buffers=dict(scale=torch.tensor(0.35))), _q(118),
         dict(attention=1)),
    case("scale_as_0d_learned_parameter_gets_its_gradient",
         lambda: Fn(tensor_scale, scale=nn.Parameter(torch.tensor(0.35))), _q(121), dict(attention=1)),
    # ---- fp16
    # raw fp16 q k^T up to 5.98e4 (fp16 max 65504), times 1 / 4: scores up to 1.5e4, where the fp16 spacing is 8, so
    # eager's own error is large (output 2.9e-2, dq 9.4e-2 against float64; flashfuse 2.6e-5 / 4.7e-4): judged
    # against a float64 run of the same program (ref64), once with the scale after and once before the matmul
    case("fp16_raw_scores_up_to_6e4_scale_after_matmul", lambda: Fn(plain), _q(100, d=16, scale=60.0, dtype=F16),
         dict(attention=1), tol=TOL_FP16, ref64=True, nonfinite=False),
    case("fp16_raw_scores_up_to_6e4_q_scaled_before_matmul", lambda: Fn(scale_before_matmul),
         _q(100, d=16, scale=60.0, dtype=F16), dict(attention=1), tol=TOL_FP16, ref64=True, nonfinite=False),
    # the same inputs times 80 / 60: 17 raw scores overflow fp16 in eager. flashfuse's finite answer is the float64
    # one and I consider it the better number; it is xfail because it is not eager's (NaN), for a decision
    case("fp16_raw_scores_overflow_to_inf_eager_nan", lambda: Fn(plain), _q(100, d=16, scale=80.0, dtype=F16),
         dict(attention=1), tol=TOL_FP16, nonfinite=True, xfail=FP16_SCORE_OVERFLOW),
    case("fp16_softmax_over_1100_keys_nq3", lambda: Fn(plain), qkv(124, nq=3, nk=1100, d=16, dtype=F16),
         dict(attention=1), tol=TOL_FP16),
    # batch 1 entirely padded: in fp16, s + finfo(fp16).min rounds every score to -65504, so eager (and the same
    # program in float64, whose finfo.min swallows the scores too) averages v uniformly
    case("fp16_hf_extended_mask_whole_batch_padded_fp16_finfo_min", lambda: Fn(hf_extended_padding_mask),
         (*_q(196, dtype=F16), _padding([13, 0]).long()), dict(attention=1), tol=TOL_FP16, nonfinite=False,
         xfail=FP16_MIN_PADDED),
    # ---- rows / columns with nothing to attend to
    case("rows_emptied_masked_fill_minus_inf_eager_nan", lambda: Keep(rows_emptied()), _q(130), dict(attention=1),
         nonfinite=True),
    case("rows_emptied_masked_fill_finfo_min_uniform", lambda: Keep(rows_emptied(), F32_MIN), _q(133),
         dict(attention=1), nonfinite=False),
    case("hf_extended_mask_whole_batch_padded_finfo_min_uniform", lambda: Fn(hf_extended_padding_mask),
         (*_q(142), _padding([11, 0]).long()), dict(attention=1), nonfinite=False),
    case("columns_emptied_keys_nobody_sees_zero_dk_dv", lambda: Keep(columns_emptied()), _q(145),
         dict(attention=1)),
    # ---- additive biases
    case("bias_minus_1e4_rows_emptied", lambda: Bias(_bias(rows_emptied(), -1e4)), _q(148), dict(attention=1)),
    case("bias_minus_1e9_rows_emptied_uniform", lambda: Bias(_bias(rows_emptied(), -1e9)), _q(151),
         dict(attention=1)),
    case("bias_minus_inf_rows_emptied_eager_nan", lambda: Bias(_bias(rows_emptied(), NEG_INF)), _q(157),
         dict(attention=1), nonfinite=True),
    case("bias_plus_inf_two_entries_eager_nan_rows", lambda: Bias(_plus_inf_bias()), _q(160), dict(attention=1),
         nonfinite=True),
    case("bias_constant_per_row_softmax_invariant", lambda: Bias(_row_constant_bias()), _q(163), dict(attention=1)),
    case("bias_nan_where_masked_then_masked_fill", lambda: Fn(bias_then_masked_fill, buffers=dict(
        bias=_nan_bias_where_masked(causal_keep(17), math.nan), keep=causal_keep(17))), _q(166), dict(attention=1),
         nonfinite=False),
    # ---- NaN / inf in the inputs
    case("q_one_nan_element", lambda: Fn(plain),
         (lambda q, k, v: (with_value(q, (0, 1, 5, 3), math.nan), k, v))(*_q(172)), dict(attention=1), nonfinite=True),
    case("k_one_nan_element_causal", NanoGPT,
         (lambda q, k, v: (q, with_value(k, (1, 0, 9, 2), math.nan), v))(*_q(175)), dict(attention=1), nonfinite=True),
    case("v_one_nan_element", lambda: Fn(plain),
         (lambda q, k, v: (q, k, with_value(v, (0, 0, 4, 6), math.nan)))(*_q(178)), dict(attention=1), nonfinite=True),
    case("q_one_plus_inf_element", lambda: Fn(plain),
         (lambda q, k, v: (with_value(q, (1, 1, 2, 0), math.inf), k, v))(*_q(184)), dict(attention=1), nonfinite=True),
    # eager: P[i, 16] = 0 for i < 16, but 0 * NaN = NaN, so column 0 of head (0, 1) is NaN in every row (and the
    # gradient of q); skipping keys the mask hides is defensible, but flashfuse does it per tile (see the reason)
    case("v_nan_at_causally_masked_last_key_eager_nan_everywhere", NanoGPT,
         (lambda q, k, v: (q, k, with_value(v, (0, 1, 16, 0), math.nan)))(*_q(181)), dict(attention=1),
         nonfinite=True, xfail=V_NAN_MASKED),
    # k[39] = +inf, hidden by the causal mask from queries 0..38: the outputs are finite in both; eager's dq is
    # NaN in every row (dS[i, 39] = 0 times k[39] = inf in dS @ K)
    case("k_inf_at_causally_masked_last_key_n40_eager_grad_nan", NanoGPT,
         (lambda q, k, v: (q, with_value(k, (0, 1, 39, 2), math.inf), v))(*_q(401, n=40)), dict(attention=1),
         nonfinite=False, xfail=K_INF_MASKED),
    # ---- dropout extremes (training=True)
    case("dropout_p0_training", lambda: Fn(dropout_train(0.0)), _q(190), dict(attention=1)),
    # declined with a near-miss, eager's zeros and zero gradients: right (nothing to compute; a kernel with a
    # 1 / (1 - p) scale would make 0 * inf = NaN)
    case("dropout_p1_training_all_zeros_declined", lambda: Fn(dropout_train(1.0)), _q(193), dict(attention=0),
         reason="dropout p=1.0 drops everything"),
]


@pytest.mark.parametrize(ROWS, NUMERICS)
def test_attention_numerics(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)


# ================================================================================================ norms
class LN(nn.Module):
    """nn.LayerNorm over the last dim (optionally of another dtype than the input)."""

    def __init__(self, n, eps=1e-5, dtype=torch.float32, affine=True):
        super().__init__()
        self.ln = nn.LayerNorm(n, eps=eps, elementwise_affine=affine, dtype=dtype)

    def forward(self, x):
        return self.ln(x)


class HandLN(nn.Module):
    """ConvNeXt / timm LayerNorm written out: mean, (x - u)^2 mean, / sqrt(var + eps), * w + b."""

    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n)), eps

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight * x + self.bias


class MixedLN(nn.Module):
    """F.layer_norm of an fp16 input with fp32 weight and bias (eager allows the mix: output fp16)."""

    def __init__(self, n):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(n)), nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, 1e-5)


class LlamaRMSNorm(nn.Module):
    """HF LlamaRMSNorm: upcast to fp32, x * rsqrt(mean(x^2) + eps), weight * x.to(input_dtype)."""

    def __init__(self, n, eps=1e-6, dtype=torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class NoUpcastRMSNorm(nn.Module):
    """An RMSNorm written without the fp32 upcast: in fp16 x^2 overflows for |x| > 256."""

    def __init__(self, n, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(n, dtype=F16)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class TorchRMS(nn.Module):
    def __init__(self, n, eps=None):
        super().__init__()
        self.norm = nn.RMSNorm(n, eps=eps)

    def forward(self, x):
        return self.norm(x)


class ResidualLN(nn.Module):
    """Pre-LN residual: h = x + residual, returned with LayerNorm(h)."""

    def __init__(self, n, eps=1e-5, dtype=torch.float32):
        super().__init__()
        self.ln = nn.LayerNorm(n, eps=eps, dtype=dtype)

    def forward(self, x, residual):
        h = x + residual
        return self.ln(h), h


def constant_rows(shape, rows, value=3.7, seed=0, dtype=torch.float32):
    """rand(shape) with the given rows of the last dim constant (variance exactly 0)."""
    x = rand(*shape, seed=seed)
    for r in rows:
        x[r] = value
    return x.to(dtype)


def _zero_weights(model, attr="weight", every=3):
    with torch.no_grad():
        w = getattr(model, attr) if not hasattr(model, "ln") else model.ln.weight
        w.copy_(1.0 + 0.3 * rand(*w.shape, seed=9))
        w[::every] = 0.0
        if hasattr(model, "ln"):
            model.ln.bias.copy_(0.5 * rand(*w.shape, seed=10))
    model.keep_params = True
    return model


NORMS = [
    # Rows marked ref64 are judged against a float64 run of the same module on the same inputs: there eager's own
    # error is the larger one (measured: constant rows with eps 1e-12, eager's dx is 6.7e-3 off float64 and its
    # dweight 1.9e-2, flashfuse's 5e-8 / 9e-8; offset 1e4, eager's dx 1.7e-2, flashfuse's 8e-8; a single
    # feature, eager's dx has norm 7e-5 where float64's is 1e-13). The forward of the offset rows is
    # ill-conditioned in fp32 for both (the mean's rounding): 4-7e-2 against float64.
    # ---- variance 0, eps
    case("ln_constant_rows_eps_1e-12", lambda: LN(32, eps=1e-12), (constant_rows((2, 5, 32), [(0, 1), (1, 4)]),),
         dict(layer_norm=1), ref64=True),
    case("ln_eps_zero_variance_positive", lambda: LN(24, eps=0.0), (rand(2, 5, 24, seed=200),), dict(layer_norm=1)),
    # eager accepts a negative eps: rows with variance > 1e-3 are normal, the constant row is NaN (sqrt < 0)
    case("ln_negative_eps_constant_row_eager_nan", lambda: LN(24, eps=-1e-3),
         (constant_rows((2, 5, 24), [(0, 2)], seed=201),), dict(layer_norm=1), nonfinite=True),
    # ---- large offsets (catastrophic cancellation if the variance were E[x^2] - E[x]^2)
    case("ln_offset_1e4_noise_1e-2_fp32", lambda: LN(64), (rand(2, 5, 64, seed=202, scale=1e-2, offset=1e4),),
         dict(layer_norm=1), ref64=True),
    case("hand_ln_offset_1e4_noise_1e-2_fp32", lambda: HandLN(64),
         (rand(2, 5, 64, seed=203, scale=1e-2, offset=1e4),), dict(layer_norm=1), ref64=True),
    case("ln_offset_300_noise_2_fp16", lambda: LN(64, dtype=F16),
         (rand(2, 5, 64, seed=204, scale=2.0, offset=300.0, dtype=F16),), dict(layer_norm=1), tol=TOL_FP16,
         ref64=True),
    case("residual_ln_offset_1e4_residual", lambda: ResidualLN(48),
         (rand(2, 5, 48, seed=205, scale=1e-2), rand(2, 5, 48, seed=206, scale=1e-2, offset=1e4)),
         dict(residual_norm=1), ref64=True),
    case("residual_ln_fp16_residual_offset_100", lambda: ResidualLN(48, dtype=F16),
         (rand(2, 5, 48, seed=410, dtype=F16), rand(2, 5, 48, seed=411, dtype=F16, offset=100.0)),
         dict(residual_norm=1), tol=TOL_FP16, ref64=True),
    # ---- sizes
    case("ln_single_feature_n1_output_is_bias", lambda: LN(1), (rand(2, 5, 1, seed=207),), dict(layer_norm=1),
         ref64=True),
    case("rms_single_feature_n1_values_1e-3_near_sqrt_eps", lambda: LlamaRMSNorm(1),
         (rand(2, 5, 1, seed=209, scale=1e-3),), dict(rms_norm=1)),
    case("ln_n4097_odd_wide", lambda: LN(4097), (rand(2, 4097, seed=208),), dict(layer_norm=1)),
    case("ln_fp16_n4097_offset_50", lambda: LN(4097, dtype=F16),
         (rand(2, 4097, seed=409, offset=50.0, dtype=F16),), dict(layer_norm=1), tol=TOL_FP16),
    # ---- NaN / inf in one row must stay in that row
    case("ln_nan_in_one_row", lambda: LN(32), (with_value(rand(2, 5, 32, seed=210), (1, 2, 7), math.nan),),
         dict(layer_norm=1), nonfinite=True),
    case("ln_inf_in_one_row", lambda: LN(32), (with_value(rand(2, 5, 32, seed=211), (0, 4, 0), math.inf),),
         dict(layer_norm=1), nonfinite=True),
    case("rms_nan_in_one_row", lambda: LlamaRMSNorm(32),
         (with_value(rand(2, 5, 32, seed=212), (0, 3, 31), math.nan),), dict(rms_norm=1), nonfinite=True),
    # ---- dtypes and weights
    case("ln_fp16_input_fp32_weight", lambda: MixedLN(40), (rand(2, 5, 40, seed=213, dtype=F16),),
         dict(layer_norm=1), tol=TOL_FP16),
    case("rms_llama_fp16_input_fp32_weight_fp32_output", lambda: LlamaRMSNorm(40),
         (rand(2, 5, 40, seed=214, dtype=F16),), dict(rms_norm=1), tol=TOL_FP16),
    case("ln_weight_with_exact_zeros", lambda: _zero_weights(LN(30)), (rand(2, 5, 30, seed=215),),
         dict(layer_norm=1)),
    # ---- RMS zeros and overflow
    case("rms_zero_rows_eps_1e-6", lambda: LlamaRMSNorm(32),
         (constant_rows((2, 5, 32), [(0, 0), (1, 4)], value=0.0, seed=217),), dict(rms_norm=1)),
    case("rms_zero_row_eps_0_eager_nan", lambda: LlamaRMSNorm(32, eps=0.0),
         (constant_rows((2, 5, 32), [(1, 1)], value=0.0, seed=218),), dict(rms_norm=1), nonfinite=True),
    case("torch_rmsnorm_eps_none_values_1e-20", lambda: TorchRMS(32), (rand(2, 5, 32, seed=220, scale=1e-20),),
         dict(rms_norm=1)),
    # no fp32 upcast, |x| ~ 300 in fp16: x^2 overflows, eager's rsqrt(inf) = 0 makes the output 0. flashfuse's
    # float64-accurate output is the better number; xfail because it is not eager's, for a decision
    case("rms_fp16_no_upcast_x_squared_overflows_eager_zeros", lambda: NoUpcastRMSNorm(32),
         (rand(2, 5, 32, seed=407, scale=300.0, dtype=F16),), dict(rms_norm=1), tol=TOL_FP16, xfail=FP16_RMS_OVERFLOW),
]


@pytest.mark.parametrize(ROWS, NORMS)
def test_norms(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)


# ================================================================================================ pointwise
def chain_div(a, b, c):
    """a / b * c + a: b has exact zeros (a / 0 = +-inf, 0 / 0 = NaN, as eager)."""
    return a / b * c + a


def chain_int(a, b, i):
    """An int64 tensor in a float chain (promoted in each op)."""
    return a * i + b - i * 2


def chain_0d(a, b, s, t):
    """0-d tensors (inputs with gradients) broadcast against (N, C) tensors."""
    return a * s + b * t - s


def chain_empty(a, w, c):
    """A (0, 5) tensor times a (5,) parameter-like input: an empty result, empty gradients."""
    return a * w + c * 2.0 - a


class BiasGelu(nn.Module):
    def __init__(self, k=12, n=9, approximate="none", dtype=torch.float32):
        super().__init__()
        self.lin, self.approximate = nn.Linear(k, n, dtype=dtype), approximate

    def forward(self, x):
        return F.gelu(self.lin(x), approximate=self.approximate)


class PreluWhere(nn.Module):
    """torch.where(x > 0, x, a * x) / (x >= 0): the two spellings differ only at x == 0 (gradient a or 1)."""

    def __init__(self, ge=False, channels=5):
        super().__init__()
        self.a, self.ge = nn.Parameter(torch.full((channels, 1, 1), 0.25)), ge

    def forward(self, x):
        keep = x >= 0 if self.ge else x > 0
        return torch.where(keep, x, self.a * x)


def zeros_every(x, k=3):
    """x with every k-th element exactly 0.0 (and one -0.0)."""
    x = x.clone()
    x.view(-1)[::k] = 0.0
    x.view(-1)[1] = -0.0
    return x


def _div_inputs(seed):
    a, b, c = rand(4, 9, seed=seed), rand(4, 9, seed=seed + 1), rand(4, 9, seed=seed + 2)
    b.view(-1)[::5] = 0.0      # a / 0 = +-inf
    a.view(-1)[::10] = 0.0     # 0 / 0 = NaN (every other zero of b)
    return a, b, c


def _pool_nonfinite(seed):
    x = rand(2, 3, 5, 7, seed=seed)
    x[0, 1, 2, 3] = math.inf                   # that plane's mean +inf
    x[1, 2, 0, 0], x[1, 2, 4, 6] = math.inf, -math.inf    # inf - inf: NaN
    x[1, 0, 1, 1] = math.nan
    return x


def mean_mean(x):
    return x.mean(-1).mean(-1)


POINTWISE = [
    case("chain_div_by_exact_zeros_inf_and_nan", lambda: chain_div, _div_inputs(300), dict(eltwise_chain=1),
         nonfinite=True),
    case("chain_int64_tensor_mixed_in", lambda: chain_int,
         (rand(4, 9, seed=303), rand(4, 9, seed=304), torch.arange(36).view(4, 9) - 17), dict(eltwise_chain=1)),
    case("chain_0d_tensors_with_gradients", lambda: chain_0d,
         (rand(4, 9, seed=305), rand(4, 9, seed=306), torch.tensor(0.7), torch.tensor(-1.3)), dict(eltwise_chain=1)),
    case("chain_broadcast_to_empty_0x5", lambda: chain_empty,
         (torch.zeros(0, 5), rand(5, seed=307), torch.zeros(0, 5)), dict(eltwise_chain=1)),
    case("bias_gelu_erf_preactivations_up_to_64", BiasGelu, (rand(3, 12, seed=308, scale=30.0),), dict(bias_gelu=1)),
    case("bias_gelu_fp16_preactivations_up_to_46", lambda: BiasGelu(dtype=F16),
         (rand(3, 12, seed=310, scale=30.0, dtype=F16),), dict(bias_gelu=1), tol=TOL_FP16),
    case("prelu_where_gt_exact_zeros_gradient_is_a", PreluWhere, (zeros_every(rand(2, 5, 3, 7, seed=311)),),
         dict(prelu=1)),
    case("prelu_where_ge_exact_zeros_gradient_is_1", lambda: PreluWhere(ge=True),
         (zeros_every(rand(2, 5, 3, 7, seed=312)),), dict(prelu=1)),
    case("global_pool_plane_with_inf_and_nan", lambda: mean_mean, (_pool_nonfinite(314),), dict(global_pool=1),
         nonfinite=True),
]


@pytest.mark.parametrize(ROWS, POINTWISE)
def test_pointwise(make, inputs, counts, reason, opts):
    run_row(make, inputs, counts, reason, opts)


# ================================================================================================ the cases' premises
def _probs(q, k, scale):
    return torch.softmax((q.double() @ k.double().transpose(-2, -1)) * scale, -1)


def test_cases_stress_what_they_claim():
    """The inputs above are the edge cases their names say (checked in eager, no flashfuse)."""
    # fp16 raw scores: up to ~6e4 but finite at x60, overflowing at x80
    q, k, _ = _q(100, d=16, scale=60.0, dtype=F16)
    raw = q @ k.transpose(-2, -1)
    assert torch.isfinite(raw).all() and raw.abs().max() > 5.5e4
    q, k, _ = _q(100, d=16, scale=80.0, dtype=F16)
    assert (q @ k.transpose(-2, -1)).isinf().sum() > 0
    # one-hot regimes: x30 (std 900) and temperature 1e-6 leave every row's largest probability ~1
    q, k, _ = _q(103, scale=30.0)
    assert (_probs(q, k, HD ** -0.5).amax(-1) > 0.999).float().mean() > 0.9
    q, k, _ = _q(115)
    assert (_probs(q, k, 1e6).amax(-1) == 1.0).all()
    # emptied rows: -1e9 / finfo.min make them uniform, -1e4 keeps the scores (not uniform)
    q, k, v = _q(148)
    keep = rows_emptied()
    out = Bias(_bias(keep, -1e4))(q, k, v)
    assert rel(out[:, :, 3], v.mean(-2)) > 0.05
    q, k, v = _q(151)
    assert rel(Bias(_bias(keep, -1e9))(q, k, v)[:, :, 3], v.mean(-2)) < 1e-6
    # fp16 HF mask, batch 1 entirely padded: eager averages v uniformly
    q, k, v = _q(196, dtype=F16)
    out = hf_extended_padding_mask(None, q, k, v, _padding([13, 0]).long())
    assert rel(out[1], v[1].float().mean(-2, keepdim=True).expand(H, 17, HD)) < 1e-3
    # the division chain makes +inf, -inf and NaN
    out = chain_div(*_div_inputs(300))
    assert out.isnan().any() and (out == math.inf).any() and (out == -math.inf).any()
    # constant LayerNorm rows have variance exactly 0
    x = constant_rows((2, 5, 32), [(0, 1), (1, 4)])
    assert x[0, 1].double().var() == 0 and x[1, 4].double().var() == 0
    # the two PReLU spellings differ only in the gradient at the exact zeros
    x = zeros_every(rand(2, 5, 3, 7, seed=311))
    grads = []
    for ge in (False, True):
        xi = x.clone().requires_grad_(True)
        PreluWhere(ge=ge)(xi).sum().backward()
        grads.append(xi.grad)
    differ = grads[0] != grads[1]
    assert differ.any() and torch.equal(differ, x == 0)
    # fp16 RMSNorm without the upcast: x^2 overflows, eager's output is 0
    x = rand(2, 5, 32, seed=407, scale=300.0, dtype=F16)
    assert x.pow(2).isinf().any(-1).all() and (NoUpcastRMSNorm(32)(x) == 0).all()
