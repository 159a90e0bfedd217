"""ESPnet's zero fill of the probabilities: `softmax(s.masked_fill(m, min)).masked_fill(m, 0.0) @ v`.

The post-softmax fill is a no-op except on rows where m masks every key: eager gives 0 there (the uniform
average or the NaN row is zeroed). The pass fuses it only when the post-fill's mask is provably the scores'
fill mask and that fill is the scores' only huge-negative source; the op then runs with empty_rows_zero
(rows with nothing kept give 0). Kernel tests compare with eager in float64 on fresh random inputs; pass tests
compare outputs and gradients of the compiled function with eager, and check the near-misses."""
import math
import os

import pytest
import sympy
import torch
import torch.nn.functional as F

import flashfuse
from flashfuse.kernels.attention import reference
from flashfuse.kernels.attention import score_mod as sm
from flashfuse.report import Report, _active

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="needs CUDA or TRITON_INTERPRET=1")
F32_MIN = torch.finfo(torch.float32).min


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _eager_espnet(q, k, v, masked, fill, scale):
    """ESPnet's forward_attention in float64 (masked: True = padding)."""
    s = (q @ k.transpose(-2, -1)) * scale
    p = torch.softmax(s.masked_fill(masked, fill), dim=-1).masked_fill(masked, 0.0)
    return p @ v


def _inputs(seed, B, H, Nq, Nk, D, dtype):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (Nq, Nk, Nk))
    masked = torch.rand(B, 1, Nq, Nk, generator=g) < 0.4
    masked[0, :, 3] = True   # fully masked query rows
    masked[-1, :, Nq - 2] = True
    masked[:, :, 5] = False  # and one row with everything kept
    return [t.to(_dev(), dtype) for t in (q, k, v)], masked.to(_dev())


# ---------------------------------------------------------------- the kernels

@pytest.mark.parametrize("fill", [-math.inf, F32_MIN], ids=["-inf", "finfo.min"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_empty_rows_zero_matches_eager(fill, dtype):
    """Triton kernels with the flag: out (fully masked rows exactly 0), and dq/dk/dv through the Triton
    backward, against eager float64 autograd of the ESPnet spelling."""
    _check_kernel(fill, dtype, (2, 3, 27, 38, 16), 11 if fill == -math.inf else 12)


@pytest.mark.gpu
@pytest.mark.parametrize("fill", [-math.inf, F32_MIN], ids=["-inf", "finfo.min"])
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 64), (torch.float16, 128)])
def test_gpu_kernel_empty_rows_zero_matches_eager(fill, dtype, d):
    """The same on the GPU at sizes that take several tiles each way, bf16 included."""
    _check_kernel(fill, dtype, (2, 4, 203, 333, d), 13)


def _check_kernel(fill, dtype, shape, seed):
    from flashfuse.kernels.attention import triton_impl as ti

    B, H, Nq, Nk, D = shape
    (q, k, v), masked = _inputs(seed, B, H, Nq, Nk, D, dtype)
    scale = D ** -0.5
    expr = sympy.Piecewise((-sympy.oo if fill == -math.inf else sympy.Float(fill), sympy.Ne(sm.side(0), 0)),
                           (scale * sm.score, True))
    text = sm.to_text(expr)
    out, lse = ti.attention_forward(q, k, v, [masked], [], text, 0.0, None, "ieee", empty_rows_zero=True)
    ref = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    rout = _eager_espnet(*ref, masked, fill, scale)
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
    assert not out.isnan().any()
    assert (out[0, :, 3] == 0).all() and (out[-1, :, Nq - 2] == 0).all()
    assert _rel(out, rout) < tol
    row_lse = reference.row_lse(lse)
    assert torch.isneginf(row_lse[0, :, 3]).all() and torch.isfinite(row_lse[:, :, 5]).all()

    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    dq, dk, dv, _ = ti.attention_backward(dout, q, k, v, out, lse, [masked], [], text, 0.0, None, [False], "ieee")
    rout.backward(dout.double())
    for name, a, r in (("dq", dq, ref[0].grad), ("dk", dk, ref[1].grad), ("dv", dv, ref[2].grad)):
        assert not a.isnan().any(), name
        assert _rel(a, r) < 3 * tol, f"{name} rel err {_rel(a, r)}"
    assert (dq[0, :, 3] == 0).all()


@pytest.mark.parametrize("fill", [-math.inf, F32_MIN], ids=["-inf", "finfo.min"])
def test_reference_empty_rows_zero_matches_eager(fill):
    """The CPU reference (flashfuse's path without Triton) with the flag: forward and backward as eager."""
    B, H, Nq, Nk, D = 2, 2, 19, 23, 8
    (q, k, v), masked = _inputs(21, B, H, Nq, Nk, D, torch.float64)
    q, k, v, masked = (t.cpu() for t in (q, k, v, masked))
    text = sm.to_text(sympy.Piecewise((sympy.Float(fill) if fill != -math.inf else -sympy.oo,
                                       sympy.Ne(sm.side(0), 0)), (0.5 * sm.score, True)))
    out, lse = reference.attention_forward(q, k, v, [masked], [], text, 0.0, None, block=8, empty_rows_zero=True)
    ref = [t.clone().requires_grad_(True) for t in (q, k, v)]
    rout = _eager_espnet(*ref, masked, fill, 0.5)
    assert _rel(out, rout) < 1e-12 and torch.isneginf(reference.row_lse(lse)[0, :, 3]).all()
    dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    rout.backward(dout)
    grads = reference.attention_backward(dout, q, k, v, [masked], [], text, 0.0, None, [False], block=8,
                                         empty_rows_zero=True)
    for a, r in zip(grads[:3], ref):
        assert _rel(a, r.grad) < 1e-12


@pytest.mark.parametrize("interpreted", [True, False], ids=["triton", "reference"])
def test_op_autograd_with_empty_rows_zero(interpreted, monkeypatch):
    """flashfuse::attention(..., empty_rows_zero=True) end to end (autograd), Triton and reference paths, and
    without mask recognition (the device mask check path keeps the flag)."""
    from flashfuse.kernels.attention import op  # noqa: F401  (registers the op)

    if not interpreted:
        if torch.cuda.is_available():
            pytest.skip("the reference path runs for CPU tensors without the interpreter")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    (q, k, v), masked = _inputs(31, 1, 2, 17, 17, 16, torch.float32)
    # a tril mask with the first three rows empty, as a float side (what mask recognition and the check read)
    keep = torch.ones(1, 1, 17, 17, device=_dev()).tril(-3)
    text = sm.to_text(sympy.Piecewise((-sympy.oo, sympy.Eq(sm.side(0), 0)), (0.25 * sm.score, True)))
    for recognize in (True, False):
        x = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, _, _ = torch.ops.flashfuse.attention(*x, [keep], [], text, 0.0, None, "ieee", recognize, True)
        out.square().sum().backward()
        ref = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        rout = _eager_espnet(*ref, keep == 0, -math.inf, 0.25)
        rout.square().sum().backward()
        assert (out[:, :, :3] == 0).all()
        assert _rel(out, rout) < 1e-5
        for a, r in zip(x, ref):
            assert _rel(a.grad, r.grad) < 3e-5


# ---------------------------------------------------------------- the pass

def _run(fn, inputs, expected, near_miss=None, tol=1e-4):
    """Compile `fn` with flashfuse (eager remainder); assert the fused count, a near-miss containing
    `near_miss`, and outputs / input gradients equal to eager's."""
    torch._dynamo.reset()
    leaf = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    ref_in = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    report = Report()
    _active.append(report)
    try:
        out = torch.compile(fn, backend=flashfuse.backend(remainder="eager"))(*leaf)
    finally:
        _active.pop()
    ref = fn(*ref_in)
    assert report.count("attention") == expected, str(report)
    reasons = [n.reason for n in report.near_misses if n.fusion == "attention"]
    if near_miss is not None:
        assert any(near_miss in r for r in reasons), reasons
    assert torch.equal(out.isnan(), ref.isnan())
    ok = ~ref.isnan()
    assert _rel(out[ok], ref[ok]) < tol
    if expected:
        assert not out.isnan().any()
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
        out.backward(g)
        ref.backward(g)
        for a, b in zip(leaf, ref_in):
            if b.grad is not None:
                assert not b.grad.isnan().any()
                assert _rel(a.grad, b.grad) < tol or (a.grad - b.grad).double().norm() < 1e-5
    return report


def _pad_mask(lengths, n):
    return torch.arange(n)[None, :] >= torch.as_tensor(lengths)[:, None]  # True = padding


def espnet(q, k, v, lengths):
    mask = _pad_mask(lengths, k.size(-2))[:, None, None, :]  # (B, 1, 1, T)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(mask, torch.finfo(scores.dtype).min)
    attn = torch.softmax(scores, dim=-1).masked_fill(mask, 0.0)
    return torch.matmul(F.dropout(attn, 0.1, training=False), v)


def espnet_inf_where(q, k, v, lengths):
    keep = ~_pad_mask(lengths, k.size(-2))[:, None, None, :]
    scores = torch.where(keep, q @ k.mT * q.size(-1) ** -0.5, float("-inf"))
    return torch.where(keep, scores.softmax(-1), 0.0) @ v


def post_fill_expanded_mask(q, k, v, lengths):  # the same mask, expanded to the probabilities' shape
    mask = _pad_mask(lengths, k.size(-2))[:, None, :]
    s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(mask.unsqueeze(1), float("-inf"))
    p = s.softmax(-1)
    return p.masked_fill(mask.unsqueeze(1).expand(p.shape), 0.0) @ v


def mask_written_twice(q, k, v, keep):  # keep: (B, 1, Nq, Nk) 0/1, the mask compared in both fills
    s = q @ k.transpose(-2, -1) * 0.25
    s = s.masked_fill(keep == 0, -1e9)
    return s.softmax(-1).masked_fill(keep == 0, 0.0) @ v


def _qkv(seed, B=3, H=2, Nq=13, Nk=11, D=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g).to(dtype) for n in (Nq, Nk, Nk)]


@pytest.mark.parametrize("fn", [espnet, espnet_inf_where, post_fill_expanded_mask])
def test_pass_fuses_espnet_with_fully_masked_rows(fn):
    """A batch entry of length 0: every row masked; eager gives 0 there, so must the fused op."""
    report = _run(fn, (*_qkv(1), torch.tensor([11, 0, 6])), 1)
    assert "fully masked rows give 0" in report.matches[0].description


def test_pass_fuses_espnet_fp16_finfo_min():
    """fp16's finfo.min (-65504) is not below the kernel's 1e30 mark: the pass fills with -inf instead."""
    _run(espnet, (*_qkv(2, dtype=torch.float16), torch.tensor([0, 11, 4])), 1, tol=2e-3)


def test_pass_fuses_the_mask_written_twice():
    g = torch.Generator().manual_seed(3)
    keep = (torch.rand(3, 1, 13, 11, generator=g) > 0.3).float()
    keep[1, :, 4] = 0  # a fully masked row
    _run(mask_written_twice, (*_qkv(3), keep), 1)


def post_fill_other_mask(q, k, v, lengths, other):
    mask = _pad_mask(lengths, k.size(-2))[:, None, None, :]
    s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(mask, float("-inf"))
    return s.softmax(-1).masked_fill(other, 0.0) @ v


def post_fill_nonzero(q, k, v, lengths):
    mask = _pad_mask(lengths, k.size(-2))[:, None, None, :]
    s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(mask, torch.finfo(q.dtype).min)
    return s.softmax(-1).masked_fill(mask, 0.5) @ v


def causal_and_padding(q, k, v, lengths):
    """Two -inf sources; the post-fill zeroes only the padding: a row masked by causality alone stays NaN
    in eager, so 'rows with nothing kept give 0' would be wrong."""
    mask = _pad_mask(lengths, k.size(-2))[:, None, None, :]
    causal = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool).tril(-2)
    s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~causal, float("-inf"))
    s = s.masked_fill(mask, float("-inf"))
    return s.softmax(-1).masked_fill(mask, 0.0) @ v


def padding_plus_bias(q, k, v, lengths, bias):
    mask = _pad_mask(lengths, k.size(-2))[:, None, None, :]
    s = (q @ k.transpose(-2, -1) * 0.25 + bias).masked_fill(mask, torch.finfo(q.dtype).min)
    return s.softmax(-1).masked_fill(mask, 0.0) @ v


def small_fill(q, k, v, lengths):
    mask = _pad_mask(lengths, k.size(-2))[:, None, None, :]
    s = (q @ k.transpose(-2, -1) * 0.25).masked_fill(mask, -1e4)
    return s.softmax(-1).masked_fill(mask, 0.0) @ v


def test_pass_leaves_a_post_fill_with_another_mask():
    other = _pad_mask([11, 3, 6], 11)[:, None, None, :]
    _run(post_fill_other_mask, (*_qkv(4), torch.tensor([11, 2, 6]), other), 0, "uses another mask")


def test_pass_leaves_a_nonzero_post_fill():
    _run(post_fill_nonzero, (*_qkv(5), torch.tensor([11, 0, 6])), 0, "filled with 0.5")


def test_pass_leaves_another_inf_source():
    _run(causal_and_padding, (*_qkv(6), torch.tensor([11, 0, 6])), 0, "another mask or a bias")


def test_pass_leaves_a_float_bias_that_may_hold_inf():
    bias = torch.randn(1, 2, 13, 11, generator=torch.Generator().manual_seed(8))
    bias[0, 0, 2] = float("-inf")
    _run(padding_plus_bias, (*_qkv(7), torch.tensor([11, 0, 6]), bias), 0, "another mask or a bias")


def test_pass_leaves_a_fill_that_is_not_huge():
    _run(small_fill, (*_qkv(9), torch.tensor([11, 0, 6])), 0, "finfo.min-like")
