"""The comparison harness of the hidden spelling sets (test_spellings_probe6.py to test_spellings_probe11.py).
Not a test module: imported by name, as test_explain.py imports flashfuse_toy_pass.py (pytest puts
tests/ on sys.path).

Each case compiles a copy of a model with flashfuse.backend(remainder="eager", norm_policy="always") and runs
another copy in eager on the same inputs and random cotangents; it asserts the exact counts of fusions (and,
for a negative, the near-miss reason; optionally the details of a match) and compares with eager: every output
(shape, dtype, requires_grad), every input after the call (in-place updates), every input and parameter
gradient (one eager does not give must be absent or zero). Errors are relative L2 over the entries finite in
both; NaN / +inf / -inf positions must be eager's (a mismatch is an infinite error). `ref64` judges a case
against a float64 run where eager itself is the inaccurate one.

A table row is case(name, make, inputs, counts, ...) with the options of check, run by run_row under
@pytest.mark.parametrize(ROWS, table); cases that fail today carry xfail=<what was measured> (strict).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import flashfuse
from flashfuse.report import Report, _active

TOL = 1e-4
ROWS = "make,inputs,counts,reason,opts"


def rand(*shape, seed=0, scale=1.0, offset=0.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def perturb(model, seed=1234, amount=0.1):
    """Every parameter moved off its init (ones / zeros): a dropped weight or bias shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


def flat(out):
    """The tensors of a (nested tuple / list) result, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat(o)]
    return []


def nonfinite_differs(a, b):
    """Where the NaN / +inf / -inf positions of a and b differ, a short description; None if they agree."""
    a, b = a.detach().double(), b.detach().double()
    for what, fa, fb in (("NaN", a.isnan(), b.isnan()), ("+inf", a == math.inf, b == math.inf),
                         ("-inf", a == -math.inf, b == -math.inf)):
        if not torch.equal(fa, fb):
            return f"{what} at {int(fa.sum())} positions (eager {int(fb.sum())}), {int((fa != fb).sum())} differ"
    return None


def rel(a, b, floor=1e-6, nonfinite=True):
    """Relative L2 error of a against b over the entries finite in both; inf if the shapes or the NaN / inf
    positions differ (nonfinite=False: positions not checked)."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape or (nonfinite and nonfinite_differs(a, b)):
        return math.inf
    fin = torch.isfinite(b) & torch.isfinite(a)
    a, b = a[fin], b[fin]
    return ((a - b).norm() / max(b.norm().item(), floor)).item()


def _call(model, inputs, grad, seed, compiled=False, dtype=None):
    """Run model (a copy, compiled with flashfuse or not, optionally cast to dtype) on copies of inputs,
    backward with fixed random cotangents: (outputs, [(what, tensor)] of inputs after the call and gradients,
    report)."""
    model = copy.deepcopy(model)
    if dtype is not None and isinstance(model, nn.Module):
        model = model.to(dtype)
    ins = [t.detach().clone().to(dtype if dtype is not None and t.is_floating_point() else t.dtype)
           .requires_grad_(grad and t.is_floating_point()) for t in inputs]
    fn = torch.compile(model, backend=flashfuse.backend(remainder="eager", norm_policy="always")) if compiled \
        else model
    report = Report()
    _active.append(report)
    try:
        outs = flat(fn(*ins))
    finally:
        _active.pop()
    g = torch.Generator().manual_seed(seed + 7)
    cot = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    pairs = [(o, c) for o, c in zip(outs, cot) if o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [c for _, c in pairs])
    more = [(f"input {i} after the call", t) for i, t in enumerate(ins) if t.is_floating_point()]
    more += [(f"grad input {i}", t.grad) for i, t in enumerate(ins) if t.is_floating_point()]
    if isinstance(model, nn.Module):
        more += [(f"grad {name}", p.grad) for name, p in model.named_parameters()]
    return outs, more, report


def run_case(make, inputs, seed=0, grad=True, ref64=False, floor=1e-6):
    """(report, list of (what, relative error), eager outputs) for a compiled copy against eager. With
    grad=False the inputs do not require grad (code that writes into them in place, e.g. optimizer / EMA
    updates). ref64: eager is ill-conditioned here, so both are measured against a float64 run of the same
    model on the same inputs; the error reported is flashfuse's / max(ref64, 2 x eager's): < 1 passes.
    A model is perturbed off its init unless it has `keep_params = True`."""
    torch.manual_seed(seed)
    model = make()
    if isinstance(model, nn.Module):
        if not getattr(model, "keep_params", False):
            perturb(model, seed + 1)
        model.eval()
    outs, more, report = _call(model, inputs, grad, seed, compiled=True)
    refs, ref_more, _ = _call(model, inputs, grad, seed)
    assert len(outs) == len(refs), f"{len(outs)} outputs, eager {len(refs)}"
    for o, r in zip(outs, refs):
        assert o.shape == r.shape and o.dtype == r.dtype, (o.shape, r.shape, o.dtype, r.dtype)
        assert o.requires_grad == r.requires_grad, "requires_grad differs from eager"
    pairs = [(f"output {i}", o, r) for i, (o, r) in enumerate(zip(outs, refs))]
    pairs += [(w, a, b) for (w, a), (_, b) in zip(more, ref_more)]
    exact = [None] * len(pairs)
    if ref64:
        r64, more64, _ = _call(model, inputs, grad, seed, dtype=torch.float64)
        exact = list(r64) + [t for _, t in more64]
    errs = []
    for (what, a, b), x in zip(pairs, exact):
        if b is None:
            if a is not None and a.abs().max() > 0:
                errs.append((f"{what} (none in eager)", math.inf))
            continue
        assert a is not None, f"no {what} under flashfuse"
        e = rel(a, b, floor=floor)
        if e == math.inf:
            what += f" ({nonfinite_differs(a, b) or 'shape'})"
        if ref64 and e != math.inf:    # NaN / inf positions as eager's; finite values against float64
            e = rel(a, x, nonfinite=False) / max(ref64, 2 * rel(b, x, nonfinite=False))
        errs.append((what, e))
    return report, errs, refs


def check(make, inputs, counts, negative=None, reason=None, details=None, tol=TOL, seed=0, grad=True,
          nonfinite=None, ref64=False, floor=1e-6):
    """`counts`: {fusion: exact count}. `negative` / `reason`: a near-miss of that fusion must contain the
    text. `details`: {fusion: {key: value}} the first match of that fusion must report. `nonfinite`: None
    (not checked), True (eager's output must hold a NaN or inf: the case is about them) or False (eager's
    output must be finite). `ref64`: where eager itself is ill-conditioned, pass if flashfuse's error against
    float64 is < max(tol, 2 x eager's error against float64) (NaN / inf positions still as eager's). `floor`:
    the smallest norm an error is relative to (eager's gradient may be exactly 0)."""
    report, errs, refs = run_case(make, inputs, seed, grad, ref64=tol if ref64 else False, floor=floor)
    got = {k: report.count(k) for k in counts}
    assert got == counts, f"expected {counts}, got {got}\n{report}"
    if negative is not None and reason is not None:
        reasons = [n.reason for n in report.near_misses if n.fusion == negative]
        assert any(reason in r for r in reasons), f"no near-miss containing {reason!r}\n{report}"
    for fusion, want in (details or {}).items():
        m = next(m for m in report.matches if m.fusion == fusion)
        for k, v in want.items():
            assert m.details.get(k) == v, f"{fusion}.{k}: {m.details.get(k)!r} != {v!r}\n{report}"
    if nonfinite is not None:
        has = any(not torch.isfinite(r).all() for r in refs)
        assert has == nonfinite, f"eager's output {'has no' if nonfinite else 'has a'} NaN / inf: a bad case"
    bad = [(w, e) for w, e in errs if not e < (1.0 if ref64 else tol)]
    assert not bad, f"differs from {'float64 more than eager' if ref64 else 'eager'}: {bad}\n{report}"
    return report


_OPTS = ("details", "tol", "seed", "grad", "nonfinite", "ref64", "floor")


def case(name, make, inputs, counts, reason=None, xfail=None, xfail_if=True, **opts):
    """One row: pytest id, a model factory, its inputs, the exact counts; `reason` = near-miss text expected
    for a negative (the first fusion whose count is 0); `xfail` = what fails today (strict), `xfail_if` its
    condition; `opts`: check's details, tol, seed, grad, nonfinite, ref64, floor."""
    unknown = sorted(set(opts) - set(_OPTS))
    if unknown:
        raise TypeError(f"case {name!r}: unknown options {unknown}")
    marks = [pytest.mark.xfail(xfail_if, strict=True, reason=xfail)] if xfail else []
    return pytest.param(make, inputs, counts, reason, opts, id=name, marks=marks)


def run_row(make, inputs, counts, reason, opts):
    negative = next((k for k, v in counts.items() if v == 0), None)
    check(make, inputs, counts, negative=negative, reason=reason, **opts)


class Fn(nn.Module):
    """A module around fn(self, *inputs) with named parameters / buffers; keep_params=True: not perturbed."""

    def __init__(self, fn, buffers=None, keep_params=False, **params):
        super().__init__()
        self.fn = fn
        self.keep_params = keep_params
        for k, v in params.items():
            setattr(self, k, v)
        for k, v in (buffers or {}).items():
            self.register_buffer(k, v)

    def forward(self, *xs):
        return self.fn(self, *xs)


def P(*shape, base=0.0, seed=0, scale=0.3):
    """A parameter: base + scale * rand(*shape, seed=seed)."""
    return nn.Parameter(base + scale * rand(*shape, seed=seed))


# ---- attention helpers the sets share
def sdpa_scale(q):
    return 1.0 / math.sqrt(q.shape[-1])


def causal_keep(nq, nk=None):
    """bool (nq, nk), True = may attend; the last query sees the last key (KV offset nk - nq)."""
    nk = nq if nk is None else nk
    return torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)


def repeat_kv(x, n_rep):
    """HF repeat_kv: (B, KVH, S, D) -> (B, KVH * n_rep, S, D)."""
    b, kvh, slen, hd = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, kvh, n_rep, slen, hd).reshape(b, kvh * n_rep, slen, hd)
