"""The backward's kernels compiled ahead (triton_impl.warm_backward): a training graph's attention makes the
forward's first call start the dK/dV and dQ builds in the background. The builds are only worth it when they
are the kernels the backward then launches, with the same specialization: checked here on the arguments
(CPU, the interpreter), and on the GPU by the kernels' caches."""
import math
import os
import types

import pytest
import sympy
import torch
import torch.nn as nn
import torch.nn.functional as F

import flashfuse
from flashfuse.kernels import launch
from flashfuse.kernels.attention import op as attention_op
from flashfuse.kernels.attention import score_mod as sm

SCALED = sm.to_text(0.25 * sm.score)
CAUSAL = sm.to_text(sympy.Piecewise((-sympy.oo, sm.kv_idx > sm.q_idx), (0.125 * sm.score, True)))

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="needs CUDA or TRITON_INTERPRET=1")


def _ti():
    from flashfuse.kernels.attention import triton_impl
    return triton_impl


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: masked_fill on a tril buffer, dropout on the probabilities."""

    def __init__(self, n, h, d, p):
        super().__init__()
        self.h, self.d, self.p = h, d, p
        self.qkv = nn.Linear(h * d, 3 * h * d)
        self.register_buffer("bias", torch.tril(torch.ones(n, n)).view(1, 1, n, n))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (t.view(b, n, self.h, self.d).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d))
        att = att.masked_fill(self.bias[:, :, :n, :n] == 0, float("-inf"))
        att = F.dropout(F.softmax(att, dim=-1), p=self.p, training=self.training)
        return (att @ v).transpose(1, 2).reshape(b, n, c)


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def not_expected(monkeypatch):
    monkeypatch.setattr(attention_op, "_BACKWARD_EXPECTED", False)


def _compiled(model, remainder="eager"):
    return torch.compile(model, backend=flashfuse.backend(remainder=remainder, passes=["attention"]))


def test_only_a_training_graph_makes_the_pass_expect_a_backward(not_expected):
    model = CausalSelfAttention(12, 2, 8, 0.0).to(_dev())
    x = torch.randn(2, 12, 16, device=_dev())
    with torch.no_grad():
        _compiled(model)(x)
    assert attention_op._BACKWARD_EXPECTED is False
    torch._dynamo.reset()
    _compiled(model)(x)  # the parameters require grad
    assert attention_op._BACKWARD_EXPECTED is True


def test_the_expectation_starts_a_warmup_at_a_forwards_first_call_only(not_expected, monkeypatch):
    ti = _ti()
    calls = []
    monkeypatch.setattr(ti, "warm_backward", lambda *a: calls.append(a) or False)
    ti._PLANS.clear()
    q, k, v = (torch.randn(1, 2, 9, 16, device=_dev()) for _ in range(3))
    attention_op.attention(q, k, v, [], [], SCALED, 0.0, None, "ieee")
    assert calls == []  # nothing expects a backward yet
    attention_op.expect_backward()
    ti._PLANS.clear()
    attention_op.attention(q, k, v, [], [], SCALED, 0.0, None, "ieee")
    attention_op.attention(q, k, v, [], [], SCALED, 0.0, None, "ieee")
    assert len(calls) == 1  # the second call found the plan
    monkeypatch.setenv("FLASHFUSE_WARM_BACKWARD", "0")
    ti._PLANS.clear()
    attention_op.attention(q, k, v, [], [], SCALED, 0.0, None, "ieee")
    assert len(calls) == 1


def test_a_failing_warmup_never_fails_the_forward(monkeypatch):
    """The stand-in plan raising (anything the backward's own call would report later) costs the warm-up only."""
    ti = _ti()

    def broken(*a):
        raise ValueError("stand-in plan")

    monkeypatch.setattr(ti, "INTERPRET", False)
    monkeypatch.setattr(ti, "backward_standin_jobs", broken)
    gpu_like = types.SimpleNamespace(is_cuda=True, device="cuda")
    assert ti.warm_backward(None, gpu_like, None, None, None, [], [], SCALED, 0.0, None, "ieee", None) is False
    assert ti._WARMUPS == []


def _triton_spec(args) -> list:
    """What Triton specializes a build on: a tensor's dtype and 16-byte alignment, an integer's being 1, its
    divisibility by 16 and its width; a float's type. (launch.spec_key is stricter: exact integers.)"""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or a is None:
            out.append(a)
        elif isinstance(a, int):
            out.append(("1" if a == 1 else "16" if a % 16 == 0 else "int", -2**31 <= a < 2**31))
        else:
            out.append(type(a).__name__)
    return out


@pytest.mark.parametrize("p,remainder", [(0.0, "eager"), (0.25, "eager"), (0.25, "inductor")])
def test_the_warmup_compiles_the_kernels_the_backward_launches(not_expected, monkeypatch, p, remainder):
    """The stand-in jobs a forward hands to the background against the launches of the real backward that
    follows: same kernels, same specialization of every argument (what Triton's caches key on), same
    constexprs and grid. GPT-2's case (tril buffer read as causal, dropout) through torch.compile."""
    ti = _ti()
    ti._PLANS.clear()
    standin = []
    monkeypatch.setattr(ti, "warm_backward", lambda *a: standin.append(ti.backward_standin_jobs(*a)) or False)
    launched = []
    real_call = launch.FixedLaunch.__call__

    def record(self, args):
        launched.append((self.cached.kernel, args, self.constexprs, self.grid))
        return real_call(self, args)

    monkeypatch.setattr(launch.FixedLaunch, "__call__", record)
    torch.manual_seed(0)
    model = CausalSelfAttention(24, 2, 16, p).to(_dev())
    x = torch.randn(2, 24, 32, device=_dev(), requires_grad=True)
    out = _compiled(model, remainder)(x)
    assert len(standin) == 1 and len(standin[0]) == 2  # dK/dV and dQ
    n_forward = len(launched)
    out.backward(torch.randn_like(out))
    backward = [c for c in launched[n_forward:] if c[0] is not ti.triton_common.attn_bwd_preprocess]
    assert len(backward) == 2
    blocks = {"BLOCK_M": 16, "BLOCK_N": 16}
    for (kernel, args, consts, grid), (w_kernel, w_grid, w_args, w_consts) in zip(backward, standin[0]):
        assert kernel is w_kernel
        assert _triton_spec(args) == _triton_spec(w_args)
        assert consts == w_consts
        assert grid(blocks) == w_grid(blocks)


def _jit(kernel):
    """The JITFunction: the kernel itself, or the one under an autotuner (a JITFunction's own `.fn` is the
    plain Python function)."""
    return kernel if hasattr(kernel, "device_caches") else kernel.fn


def _built(kernel) -> int:
    return sum(len(c[0]) for c in _jit(kernel).device_caches.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_warmup_leaves_nothing_for_the_backward_to_build(not_expected, monkeypatch):
    """The backward kernels' in-memory caches are emptied when the warm-up starts; after it they hold one
    build each, and the backward's first call adds none (a stand-in of another specialization would make it
    build its own). The gradients are right."""
    ti = _ti()
    ti._PLANS.clear()
    monkeypatch.setenv("FLASHFUSE_ATTN_AUTOTUNE", "0")  # one configuration per kernel: one build each
    seen = []
    real = ti.warm_backward

    def spy(*a):
        jobs = ti.backward_standin_jobs(*a)
        for kernel, *_ in jobs:
            _jit(kernel).device_caches.clear()
        seen.append([job[0] for job in jobs])
        return real(*a)

    monkeypatch.setattr(ti, "warm_backward", spy)
    attention_op.expect_backward()
    g = torch.Generator(device="cuda").manual_seed(3)
    b, h, n, d = 2, 4, 200, 64
    q, k, v = (torch.randn(b, n, h, d, device="cuda", generator=g, dtype=torch.bfloat16).transpose(1, 2)
               .requires_grad_() for _ in range(3))
    out = attention_op.flash_attention(q, k, v, CAUSAL)
    ti.wait_for_backward_warmup()
    assert len(seen) == 1 and len(seen[0]) == 2
    assert [_built(kn) for kn in seen[0]] == [1, 1]
    dout = torch.randn_like(out)
    out.backward(dout)
    assert [_built(kn) for kn in seen[0]] == [1, 1]
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    s = ref[0] @ ref[1].transpose(-2, -1) * 0.125
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    o = torch.softmax(s, -1) @ ref[2]
    o.backward(dout.double())
    for a, r in zip((q, k, v), ref):
        err = ((a.grad.double() - r.grad).norm() / r.grad.norm()).item()
        assert err < 2e-2, err
