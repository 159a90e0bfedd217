"""Property tests: random batch, heads, lengths (1 and non-multiples of 16), head dims, masks and GQA;
the compiled hand-written attention is fused once and equals eager."""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashfuse
from flashfuse.report import Report, _active


def _attention(q, k, v, kind, window):
    nq, nk = q.size(-2), k.size(-2)
    if k.size(1) != q.size(1):
        rep = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    i, j = torch.arange(nq)[:, None], torch.arange(nk)[None, :]
    if kind == "causal":
        s = s.masked_fill(j > i + (nk - nq), float("-inf"))
    elif kind == "window":
        s = s.masked_fill((j > i + (nk - nq)) | (j < i + (nk - nq) - window), float("-inf"))
    elif kind == "alibi":
        s = s - 0.5 * (i - j).abs()
    return s.softmax(-1) @ v


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(b=st.integers(1, 2), hkv=st.integers(1, 2), rep=st.sampled_from([1, 2]), nq=st.integers(1, 37),
       extra=st.integers(0, 20), d=st.sampled_from([8, 16, 24, 32]),
       kind=st.sampled_from(["none", "causal", "window", "alibi"]), window=st.integers(0, 5),
       seed=st.integers(0, 2**16))
def test_random_shapes_and_masks(b, hkv, rep, nq, extra, d, kind, window, seed):
    torch.manual_seed(seed)
    nk = nq + extra
    q = torch.randn(b, hkv * rep, nq, d)
    k, v = torch.randn(b, hkv, nk, d), torch.randn(b, hkv, nk, d)

    def f(q, k, v):
        return _attention(q, k, v, kind, window)

    torch._dynamo.reset()
    report = Report()
    compiled = torch.compile(f, backend=flashfuse.backend(remainder="eager", passes=["attention"]))
    _active.append(report)
    try:
        out = compiled(q, k, v)
    finally:
        _active.pop()
    ref = f(q, k, v)
    assert report.count("attention") == 1, str(report)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))  # rows with no key: NaN in both
    ok = ~torch.isnan(ref)
    err = (out[ok] - ref[ok]).norm() / ref[ok].norm().clamp_min(1e-12)
    assert err < 1e-4, (err.item(), str(report))
