"""Unit tests of the pointwise kernels (flashfuse::pointwise, ::bias_gelu, ::prelu) against float64
references on fresh random inputs with odd sizes, fp32 and fp16 (bf16 on GPU only), forward and
backward; plus the CPU reference implementations and the op registrations (torch.library.opcheck)."""
from __future__ import annotations


import pytest
import sympy
import torch
import torch.nn.functional as F

import flashfuse.kernels  # noqa: F401  (registers the ops)
from flashfuse.kernels import pointwise as pw
from flashfuse.kernels.prelu import AT_ZERO, ZERO_GRAD_ONE, ZERO_GRAD_ONE_PLUS_SLOPE, ZERO_GRAD_SLOPE, ZERO_GRAD_ZERO

ops = torch.ops.flashfuse
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, dtype=torch.float32, dev=None, scale=1.0):
    return (torch.randn(tuple(shape), dtype=torch.float64) * scale).to(dev or device(), dtype)


def assert_close64(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype, what: str = ""):
    """actual (in dtype) vs a float64 reference rounded once to dtype."""
    rtol, atol = TOL[dtype]
    assert actual.dtype == dtype, what
    torch.testing.assert_close(actual.double(), expected64.to(dtype).double(), rtol=rtol, atol=atol, msg=what)


# ------------------------------------------------------------------------------------------------
# flashfuse::pointwise
# ------------------------------------------------------------------------------------------------
EXPRS = {
    # text: (float64 reference over tensors xs, number of inputs)
    "sub(add(mul(x0,x1),mul(x2,x3)),mul(x4,x5))": (lambda x: x[0] * x[1] + x[2] * x[3] - x[4] * x[5], 6),
    "add(mul(x0,2.5),div(x1,x2),neg(x0),3)": (lambda x: x[0] * 2.5 + x[1] / x[2] - x[0] + 3, 3),
    "mul(pow(x0,3),pow(x1,-2),pow(x1,rat(1,2)))": (lambda x: x[0] ** 3 * x[1] ** -2 * x[1].sqrt(), 2),
    "div(sub(1,x0),pow(x0,-0.5))": (lambda x: (1 - x[0]) / x[0] ** -0.5, 1),
}


def _inputs(n, shape, dtype):
    # positive values so that sqrt and division are well conditioned
    return [(randn(*shape, dtype=torch.float64).abs() + 0.5).to(dtype) for _ in range(n)]


def test_text_round_trips_and_keeps_the_tree():
    for text in EXPRS:
        (e,) = pw.parse(text)
        assert pw.parse(pw.serialize(e))[0] == e
    # unevaluated: (x0 + 1e8) - 1e8 is not simplified to x0
    (e,) = pw.parse("sub(add(x0,100000000.0),100000000.0)")
    assert e != sympy.Symbol("x0")
    with pytest.raises(ValueError):
        pw.parse("add(x0,")
    with pytest.raises(ValueError):
        pw.to_triton(sympy.exp(sympy.Symbol("x0")))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("text", list(EXPRS))
def test_pointwise_forward_backward_vs_float64(text, dtype):
    torch.manual_seed(0)
    ref, n = EXPRS[text]
    xs = _inputs(n, (7, 37), dtype)
    leaves = [x.clone().requires_grad_() for x in xs]
    (y,) = ops.pointwise(leaves, text)
    x64 = [x.double().requires_grad_() for x in xs]
    y64 = ref(x64)
    assert_close64(y, y64, dtype, "forward")
    g = randn(7, 37, dtype=dtype)
    grads = torch.autograd.grad(y, leaves, g)
    grads64 = torch.autograd.grad(y64, x64, g.double())
    for i, (a, e) in enumerate(zip(grads, grads64)):
        assert_close64(a, e, dtype, f"grad of x{i}")


def test_pointwise_several_outputs_non_contiguous_inputs_and_double_backward():
    torch.manual_seed(1)
    a = randn(9, 5).t().requires_grad_()    # non-contiguous
    b = randn(5, 9).requires_grad_()
    y0, y1 = ops.pointwise([a, b], "mul(x0,x1);add(pow(x0,2),neg(x1))")
    torch.testing.assert_close(y0, a * b)
    torch.testing.assert_close(y1, a * a - b)
    (ga,) = torch.autograd.grad((y0 * y1).sum(), [a], create_graph=True)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double()
    (ga64,) = torch.autograd.grad((a64 * b64 * (a64 * a64 - b64)).sum(), [a64], create_graph=True)
    torch.testing.assert_close(ga.double(), ga64, rtol=1e-5, atol=1e-5)
    (gga,) = torch.autograd.grad(ga.sum(), [a])
    (gga64,) = torch.autograd.grad(ga64.sum(), [a64])
    torch.testing.assert_close(gga.double(), gga64, rtol=1e-5, atol=1e-5)


def test_pointwise_rejects_mixed_shapes_and_dtypes():
    with pytest.raises(ValueError):
        ops.pointwise([randn(3, 4), randn(5)], "add(x0,x1)")
    with pytest.raises(ValueError):
        ops.pointwise([randn(3, 4), randn(3, 4, dtype=torch.float16)], "add(x0,x1)")


def test_pointwise_cpu_reference_matches_kernel(monkeypatch):
    torch.manual_seed(2)
    text = next(iter(EXPRS))
    xs = [randn(5, 11, dev="cpu") for _ in range(6)]
    (kernel,) = ops.pointwise(xs, text)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    (reference,) = ops.pointwise(xs, text)
    torch.testing.assert_close(kernel, reference)


def test_pointwise_opcheck():
    xs = [randn(3, 5).requires_grad_() for _ in range(2)]
    torch.library.opcheck(ops.pointwise.default, (xs, "add(mul(x0,x1),x0)"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ------------------------------------------------------------------------------------------------
# flashfuse::bias_gelu
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu_vs_float64(approximate, with_bias, dtype):
    torch.manual_seed(3)
    x = randn(3, 5, 37, dtype=dtype, scale=3.0)
    b = randn(37, dtype=dtype) if with_bias else None
    xl = x.clone().requires_grad_()
    bl = b.clone().requires_grad_() if with_bias else None
    y = ops.bias_gelu(xl, bl, approximate)
    x64 = x.double().requires_grad_()
    b64 = b.double().requires_grad_() if with_bias else None
    y64 = F.gelu(x64 + b64 if with_bias else x64, approximate=approximate)
    assert_close64(y, y64, dtype, "forward")
    g = randn(3, 5, 37, dtype=dtype)
    want = [xl] + ([bl] if with_bias else [])
    grads = torch.autograd.grad(y, want, g)
    grads64 = torch.autograd.grad(y64, [x64] + ([b64] if with_bias else []), g.double())
    assert_close64(grads[0], grads64[0], dtype, "dx")
    if with_bias:  # a sum over 15 rows of rounded values
        torch.testing.assert_close(grads[1].double(), grads64[1], rtol=1e-2 if dtype == torch.float16 else 1e-5,
                                   atol=1e-2 if dtype == torch.float16 else 1e-5)


def test_bias_gelu_small_and_large_inputs():
    # tanh near 0 (relative precision) and saturation far from 0
    small, large = randn(101, scale=1e-4), randn(101, scale=20.0)
    for approximate in ("none", "tanh"):
        y = ops.bias_gelu(small, None, approximate)
        torch.testing.assert_close(y.double(), F.gelu(small.double(), approximate=approximate), rtol=1e-5, atol=0)
        # far left, 0.5*x*(1 + erf) cancels in fp32 (as in torch's own fp32 gelu): absolute error only
        y = ops.bias_gelu(large, None, approximate)
        torch.testing.assert_close(y.double(), F.gelu(large.double(), approximate=approximate), rtol=1e-6, atol=1e-6)


def test_bias_gelu_double_backward():
    torch.manual_seed(4)
    x, b = randn(4, 9).requires_grad_(), randn(9).requires_grad_()
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    for approximate in ("none", "tanh"):
        (gx,) = torch.autograd.grad(ops.bias_gelu(x, b, approximate).sum(), [x], create_graph=True)
        (gx64,) = torch.autograd.grad(F.gelu(x64 + b64, approximate=approximate).sum(), [x64], create_graph=True)
        torch.testing.assert_close(gx.double(), gx64, rtol=1e-5, atol=1e-6)
        gg = torch.autograd.grad((gx * gx).sum(), [x, b])
        gg64 = torch.autograd.grad((gx64 * gx64).sum(), [x64, b64])
        for a, e in zip(gg, gg64):
            torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5)


def test_bias_gelu_cpu_reference_matches_kernel(monkeypatch):
    x, b, g = randn(5, 13, dev="cpu"), randn(13, dev="cpu"), randn(5, 13, dev="cpu")
    kernel = [ops.bias_gelu(x, b, "tanh"), ops.bias_gelu_backward(g, x, b, "tanh")]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reference = [ops.bias_gelu(x, b, "tanh"), ops.bias_gelu_backward(g, x, b, "tanh")]
    for a, e in zip(kernel, reference):
        torch.testing.assert_close(a, e)


def test_bias_gelu_checks_and_opcheck():
    with pytest.raises(ValueError):
        ops.bias_gelu(randn(3, 4), randn(5), "none")
    with pytest.raises(ValueError):
        ops.bias_gelu(randn(3, 4), None, "sigmoid")
    torch.library.opcheck(ops.bias_gelu.default, (randn(3, 5).requires_grad_(), randn(5).requires_grad_(), "none"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ------------------------------------------------------------------------------------------------
# flashfuse::prelu
# ------------------------------------------------------------------------------------------------
PRELU_CASES = [
    # x shape, weight shape, channel dim
    ((3, 5, 7, 3), (5,), 1),        # NCHW, per channel
    ((2, 9, 13), (13,), 2),         # channels last
    ((4, 11), (1,), 0),             # one slope
    ((37,), (), 0),                 # one 0-dim slope, 1-D x
    ((2, 130, 3), (130,), 1),       # more channels than one tile
]


def _prelu64(x, w, channel_dim, zero_grad):
    shape = [1] * x.dim()
    if w.numel() > 1:
        shape[channel_dim] = w.numel()
    wb = w.reshape(shape) if w.numel() > 1 else w.reshape(())
    # the gradient at 0 of each convention, reproduced by eager spellings: a positive part whose gradient
    # at 0 is `one` plus the slope times a negative part whose gradient at 0 is `slope`
    one, slope = AT_ZERO[zero_grad]
    z = torch.zeros_like(x)
    pos = {0.0: F.relu(x), 0.5: torch.maximum(x, z), 1.0: x.clamp(min=0)}[one]
    neg = {0.0: -F.relu(-x), 0.5: torch.minimum(x, z), 1.0: x.clamp(max=0)}[slope]
    return pos + wb * neg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", PRELU_CASES, ids=lambda c: "x".join(map(str, c[0])))
@pytest.mark.parametrize("zero_grad", range(len(AT_ZERO)))
def test_prelu_vs_float64(case, zero_grad, dtype):
    torch.manual_seed(5)
    shape, w_shape, cd = case
    x = randn(*shape, dtype=dtype)
    x.view(-1)[::7] = 0.0   # exact zeros: the three gradient conventions differ there
    w = (torch.rand(w_shape, dtype=torch.float64) * 0.5).to(device(), dtype)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = ops.prelu(xl, wl, cd, zero_grad)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    y64 = _prelu64(x64, w64, cd, zero_grad)
    assert_close64(y, y64, dtype, "forward")
    g = randn(*shape, dtype=dtype)
    dx, dw = torch.autograd.grad(y, [xl, wl], g)
    dx64, dw64 = torch.autograd.grad(y64, [x64, w64], g.double())
    assert_close64(dx, dx64, dtype, "dx")
    assert dw.shape == w.shape and dw.dtype == w.dtype
    rt = 1e-2 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(dw.double(), dw64, rtol=rt, atol=rt * max(1.0, x.numel() ** 0.5))


def test_prelu_cpu_reference_matches_kernel(monkeypatch):
    x, w, g = randn(2, 6, 5, dev="cpu"), torch.rand(6), randn(2, 6, 5, dev="cpu")
    x.view(-1)[::5] = 0
    kernel = [ops.prelu(x, w, 1, ZERO_GRAD_ZERO), *ops.prelu_backward(g, x, w, 1, ZERO_GRAD_ZERO)]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reference = [ops.prelu(x, w, 1, ZERO_GRAD_ZERO), *ops.prelu_backward(g, x, w, 1, ZERO_GRAD_ZERO)]
    for a, e in zip(kernel, reference):
        torch.testing.assert_close(a, e)


def test_prelu_checks_and_opcheck():
    with pytest.raises(ValueError):
        ops.prelu(randn(3, 4), torch.rand(5, device=device()), 1, 0)
    with pytest.raises(ValueError, match="zero_grad must be 0 to"):
        ops.prelu(randn(3, 4), torch.rand(4, device=device()), 1, len(AT_ZERO))
    torch.library.opcheck(ops.prelu.default, (randn(2, 3, 5).requires_grad_(),
                                              torch.rand(3, device=device()).requires_grad_(), 1, 0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ------------------------------------------------------------------------------------------------
# GPU (bf16, larger shapes); run on the device by the lead
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_kernels_large(dtype):
    torch.manual_seed(6)
    dev = "cuda"
    # pointwise
    xs = [randn(1023, 4097, dtype=dtype, dev=dev) for _ in range(6)]
    (y,) = ops.pointwise(xs, next(iter(EXPRS)))
    x64 = [x.double() for x in xs]
    assert_close64(y, x64[0] * x64[1] + x64[2] * x64[3] - x64[4] * x64[5], dtype, "pointwise")
    # broadcast and strided inputs, two outputs
    a = randn(16, 4097, 1023, dtype=dtype, dev=dev).transpose(1, 2)
    w, b = randn(1023, 1, dtype=dtype, dev=dev), randn(4097, dtype=dtype, dev=dev)
    y0, y1 = ops.pointwise([a, w, b], "add(mul(x0,x1),x2);mul(x0,x0)")
    a64, w64, b64 = a.double(), w.double(), b.double()
    assert_close64(y0, a64 * w64 + b64, dtype, "broadcast")
    assert_close64(y1, a64 * a64, dtype, "second output")
    # bias_gelu
    x, b = randn(8, 511, 3073, dtype=dtype, dev=dev, scale=3.0), randn(3073, dtype=dtype, dev=dev)
    for approximate in ("none", "tanh"):
        y = ops.bias_gelu(x, b, approximate)
        assert_close64(y, F.gelu(x.double() + b.double(), approximate=approximate), dtype, approximate)
        g = randn(*x.shape, dtype=dtype, dev=dev)
        dx = ops.bias_gelu_backward(g, x, b, approximate)
        x64 = (x.double() + b.double()).requires_grad_()
        (dx64,) = torch.autograd.grad(F.gelu(x64, approximate=approximate), [x64], g.double())
        assert_close64(dx, dx64, dtype, approximate + " backward")
    # prelu, NCHW and channels-last layouts
    for shape, cd in (((16, 64, 57, 57), 1), ((16, 1023, 768), 2)):
        x = randn(*shape, dtype=dtype, dev=dev)
        w = (torch.rand(shape[cd], device=dev) * 0.5).to(dtype).requires_grad_()
        xl = x.clone().requires_grad_()
        y = ops.prelu(xl, w, cd, ZERO_GRAD_SLOPE)
        x64, w64 = x.double().requires_grad_(), w.detach().double().requires_grad_()
        y64 = _prelu64(x64, w64, cd, ZERO_GRAD_SLOPE)
        assert_close64(y, y64, dtype, "prelu")
        g = randn(*shape, dtype=dtype, dev=dev)
        dx, dw = torch.autograd.grad(y, [xl, w], g)
        dx64, dw64 = torch.autograd.grad(y64, [x64, w64], g.double())
        assert_close64(dx, dx64, dtype, "prelu dx")
        torch.testing.assert_close(dw.double(), dw64, rtol=2e-2, atol=2e-2 * x.numel() ** 0.5 / shape[cd] ** 0.5)


@pytest.mark.gpu
def test_gpu_fusions_bf16_end_to_end():
    """bf16 end to end against float64 eager. Not element-wise against bf16 eager: the PReLU kink turns
    eager's own bf16 rounding of h into gradient jumps of a few 1e-2 on 0.2% of x's gradient. The check
    is the norm-wise error, which must stay within twice eager bf16's own (or 1e-2)."""
    import copy

    from flashfuse.backend import Backend
    from flashfuse.testing import assert_fused, testing_options

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(256, 512)
            self.prelu = torch.nn.PReLU(512)

        def forward(self, x, y):
            h = F.gelu(self.lin(x), approximate="tanh")
            h = self.prelu(h.transpose(1, 2)).transpose(1, 2)
            return h * y + y * 0.5 - h / 3, h.mean(-1).mean(-1)

    torch.manual_seed(0)
    model = Block().cuda().to(torch.bfloat16)
    x = randn(4, 129, 256, dtype=torch.bfloat16, dev="cuda")
    y = randn(4, 129, 512, dtype=torch.bfloat16, dev="cuda")
    g = [randn(4, 129, 512, dtype=torch.bfloat16, dev="cuda"), randn(4, dtype=torch.bfloat16, dev="cuda")]

    def run(m, xs, grads):
        xs = [t.detach().clone().requires_grad_() for t in xs]
        outs = m(*xs)
        torch.autograd.backward(outs, [gg.to(outs[0].dtype) for gg in grads])
        return [o.detach().double() for o in outs] + [t.grad.double() for t in xs] + \
            [p.grad.double() for p in m.parameters()]

    ref = run(copy.deepcopy(model).double(), [x.double(), y.double()], g)
    eager = run(copy.deepcopy(model), [x, y], g)
    for options in ({"remainder": "eager"}, {"remainder": "inductor", "norm_policy": "always"}):
        torch._dynamo.reset()
        assert_fused(model, x, y, options=options, bias_gelu=1, prelu=1)
        torch._dynamo.reset()
        backend = Backend(**testing_options(options))
        got = run(torch.compile(copy.deepcopy(model), backend=backend), [x, y], g)
        for i, (a, e, r) in enumerate(zip(got, eager, ref)):
            err, eager_err = ((a - r).norm() / r.norm()).item(), ((e - r).norm() / r.norm()).item()
            assert err <= max(2 * eager_err, 1e-2), (options, i, err, eager_err)


def test_pointwise_keeps_a_shared_channels_last_layout():
    torch.manual_seed(7)
    xs = [randn(2, 5, 3, 7).to(memory_format=torch.channels_last) for _ in range(3)]
    (y,) = ops.pointwise(xs, "add(mul(x0,x1),neg(x2))")
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, xs[0] * xs[1] - xs[2])
    # mixed layouts: contiguous output, same values
    (z,) = ops.pointwise([xs[0], xs[1].contiguous(), xs[2]], "add(mul(x0,x1),neg(x2))")
    assert z.is_contiguous()
    torch.testing.assert_close(z, y)


def test_pointwise_zero_and_high_power_gradients():
    # d/dx0 of (x0 - x0) is the constant 0; d/dx1 of x1**-8 has exponent -9
    x0, x1 = randn(3, 5).requires_grad_(), (randn(3, 5).abs() + 0.5).requires_grad_()
    (y,) = ops.pointwise([x0, x1], "add(sub(x0,x0),pow(x1,-8))")
    g0, g1 = torch.autograd.grad(y.sum(), [x0, x1])
    assert torch.equal(g0, torch.zeros_like(g0))
    x64 = x1.detach().double()
    torch.testing.assert_close(g1.double(), -8 * x64 ** -9, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pointwise_broadcasting_vs_float64(dtype):
    torch.manual_seed(8)
    text = "sub(add(mul(x0,x1),mul(x2,x3)),x4)"
    shapes = [(2, 5, 3, 7), (5, 1, 1), (2, 5, 3, 7), (7,), ()]
    xs = [randn(*s, dtype=dtype) for s in shapes]
    xs[0] = randn(2, 7, 3, 5, dtype=dtype).transpose(1, 3)   # a strided full-size input
    leaves = [x.clone().requires_grad_() for x in xs]
    (y,) = ops.pointwise(leaves, text)
    x64 = [x.double().requires_grad_() for x in xs]
    y64 = x64[0] * x64[1] + x64[2] * x64[3] - x64[4]
    assert y.shape == y64.shape and y.is_contiguous()
    assert_close64(y, y64, dtype, "forward")
    g = randn(*y.shape, dtype=dtype)
    grads = torch.autograd.grad(y, leaves, g)
    grads64 = torch.autograd.grad(y64, x64, g.double())
    for i, (a, e) in enumerate(zip(grads, grads64)):
        assert a.shape == xs[i].shape
        rt = 1e-2 if dtype == torch.float16 else 1e-5  # broadcast grads are sums over many elements
        torch.testing.assert_close(a.double(), e, rtol=rt, atol=rt * 10, msg=f"grad of x{i}")


def test_coalesce_merges_dims_walked_together():
    # contiguous (2, 3, 4) and a broadcast (1, 3, 4) -> the last two dims merge for both
    sizes, strides = pw.coalesce([2, 3, 4], [[12, 4, 1], [0, 4, 1]])
    assert sizes == [2, 12] and strides == [[12, 1], [0, 1]]
    assert pw.coalesce([1, 1], [[1, 1]]) == ([1], [[0]])


@pytest.mark.parametrize("shape", [(3, 1500), (2055,)], ids=["wide-rows", "one-row"])
def test_bias_gelu_tiles_cover_wide_and_single_rows(shape):
    torch.manual_seed(10)
    x, b, g = randn(*shape), randn(shape[-1]), randn(*shape)
    for approximate in ("none", "tanh"):
        y = ops.bias_gelu(x, b, approximate)
        x64 = (x.double() + b.double()).requires_grad_()
        y64 = F.gelu(x64, approximate=approximate)
        assert_close64(y, y64, torch.float32, "forward")
        (dx64,) = torch.autograd.grad(y64, [x64], g.double())
        assert_close64(ops.bias_gelu_backward(g, x, b, approximate), dx64, torch.float32, "backward")


@pytest.mark.parametrize("zero_grad", range(len(AT_ZERO)))
def test_prelu_double_backward(zero_grad):
    # a gradient penalty: d/d(x, w) of |d out / d x|^2, against the spellings in float64
    torch.manual_seed(11)
    x, w = randn(2, 5, 3, 7), torch.rand(5, device=device()) * 0.5
    x.view(-1)[::9] = 0.0
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    v = randn(2, 5, 3, 7)
    (gx,) = torch.autograd.grad((ops.prelu(xl, wl, 1, zero_grad) * v).sum(), [xl], create_graph=True)
    (gx64,) = torch.autograd.grad((_prelu64(x64, w64, 1, zero_grad) * v.double()).sum(), [x64], create_graph=True)
    torch.testing.assert_close(gx.double(), gx64, rtol=1e-5, atol=1e-6)
    penalty, penalty64 = (gx * gx).sum() + gx.sum(), (gx64 * gx64).sum() + gx64.sum()
    got = torch.autograd.grad(penalty, [xl, wl])
    want = torch.autograd.grad(penalty64, [x64, w64], allow_unused=True)  # x only selects branches
    for a, e, t in zip(got, want, [x64, w64]):
        torch.testing.assert_close(a.double(), torch.zeros_like(t) if e is None else e, rtol=1e-5, atol=1e-5)
    # and the slope's gradient through the weight gradient
    (gw,) = torch.autograd.grad((ops.prelu(xl, wl, 1, zero_grad) * v).sum(), [wl], create_graph=True)
    (gw64,) = torch.autograd.grad((_prelu64(x64, w64, 1, zero_grad) * v.double()).sum(), [w64], create_graph=True)
    got = torch.autograd.grad((gw * gw).sum(), [xl])
    want = torch.autograd.grad((gw64 * gw64).sum(), [x64])
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-5)
