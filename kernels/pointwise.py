"""flashfuse::pointwise — one generated elementwise kernel for an arithmetic expression.

The expression travels through the graph as text (`exprs`), a prefix notation that round-trips exactly:

    sub(add(mul(x0,x1),mul(x2,x3)),mul(x4,x5))      # x_i = inputs[i]; numbers are float reprs

It is parsed into a sympy expression built with ``evaluate=False``, so the tree is kept as the user
wrote it (sympy would otherwise fold ``(x + c) - c`` to ``x`` and change the floating-point result),
printed as Triton source, written to a file, imported and cached by its text. Several expressions
separated by ``;`` give several outputs from one kernel. The gradient w.r.t. each input is
``sum_k grad_k * d expr_k / d x_i`` by ``sympy.diff``: another pointwise op of the same kind (so the
backward is one generated kernel too, and differentiable again).

All inputs have one dtype (fp16, bf16 or fp32) and broadcastable shapes; the kernel computes in fp32 and
writes outputs of the input dtype and the broadcast shape. When all inputs have that shape and share one
dense layout, the kernel indexes storage directly and the outputs keep that layout (channels_last stays
channels_last); otherwise outputs are contiguous and each input is read through its own (broadcast)
strides, so nothing is expanded or copied. A broadcast input's gradient is summed to its shape.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import tempfile
from typing import Sequence

import sympy
import torch

from flashfuse.kernels.registration import define, define_autograd

# ------------------------------------------------------------------------------------------------
# text <-> sympy
# ------------------------------------------------------------------------------------------------
_TOKEN = re.compile(r"\s*(?:(?P<name>[a-z_][a-z_0-9]*)|(?P<num>[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|inf|nan))|(?P<p>[(),]))")
_SYMBOL = re.compile(r"^x(\d+)$")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_INT_POWER = 32  # the passes allow |exponent| <= 8; derivatives (of derivatives) go further


def symbol(i: int) -> sympy.Symbol:
    return sympy.Symbol(f"x{i}")


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"flashfuse pointwise: cannot parse {text[pos:pos + 20]!r} in {text!r}")
        out.append(m.group(m.lastgroup))
        pos = m.end()
    return out


def _number(tok: str) -> sympy.Expr:
    if re.fullmatch(r"[-+]?\d+", tok):
        return sympy.Integer(int(tok))
    return sympy.Float(float(tok))


def parse(text: str) -> list[sympy.Expr]:
    """`"add(x0,mul(x1,2.5));neg(x0)"` -> [x0 + x1*2.5, -x0], unevaluated (the tree as written)."""
    result = []
    for part in text.split(";"):
        toks = _tokens(part)
        try:
            expr, pos = _parse(toks, 0)
        except IndexError:
            raise ValueError(f"flashfuse pointwise: {part!r} ends early") from None
        if pos != len(toks):
            raise ValueError(f"flashfuse pointwise: trailing text in {part!r}")
        result.append(expr)
    return result


def _parse(toks: list[str], pos: int) -> tuple[sympy.Expr, int]:
    tok = toks[pos]
    if _SYMBOL.match(tok):
        return sympy.Symbol(tok), pos + 1
    if tok[0].isdigit() or tok[0] in "+-" or tok in ("inf", "nan"):
        return _number(tok), pos + 1
    if pos + 1 >= len(toks) or toks[pos + 1] != "(":
        raise ValueError(f"flashfuse pointwise: expected '(' after {tok!r}")
    args, pos = [], pos + 2
    while True:
        a, pos = _parse(toks, pos)
        args.append(a)
        if toks[pos] == ",":
            pos += 1
            continue
        if toks[pos] == ")":
            pos += 1
            break
        raise ValueError(f"flashfuse pointwise: expected ',' or ')' but got {toks[pos]!r}")
    return _build(tok, args), pos


def _build(op: str, args: list[sympy.Expr]) -> sympy.Expr:
    E = dict(evaluate=False)
    if op == "add":
        return sympy.Add(*args, **E)
    if op == "mul":
        return sympy.Mul(*args, **E)
    if op == "sub":
        a, b = args
        return sympy.Add(a, sympy.Mul(sympy.Integer(-1), b, **E), **E)
    if op == "div":
        a, b = args
        return sympy.Mul(a, sympy.Pow(b, sympy.Integer(-1), **E), **E)
    if op == "neg":
        return sympy.Mul(sympy.Integer(-1), args[0], **E)
    if op == "pow":
        return sympy.Pow(args[0], args[1], **E)
    if op == "rat":
        return sympy.Rational(int(args[0]), int(args[1]))
    raise ValueError(f"flashfuse pointwise: unknown operation {op!r}")


def serialize(expr: sympy.Expr) -> str:
    """The inverse of `parse` for the expressions this module generates (Add, Mul, Pow, numbers, x_i)."""
    if isinstance(expr, sympy.Symbol):
        if not _SYMBOL.match(expr.name):
            raise ValueError(f"flashfuse pointwise: unexpected symbol {expr}")
        return expr.name
    if isinstance(expr, sympy.Integer):
        return str(int(expr))
    if isinstance(expr, sympy.Rational):
        return f"rat({int(expr.p)},{int(expr.q)})"
    if isinstance(expr, sympy.Float):
        return repr(float(expr))
    if isinstance(expr, sympy.Add):
        return "add(" + ",".join(serialize(a) for a in expr.args) + ")"
    if isinstance(expr, sympy.Mul):
        return "mul(" + ",".join(serialize(a) for a in expr.args) + ")"
    if isinstance(expr, sympy.Pow):
        return f"pow({serialize(expr.base)},{serialize(expr.exp)})"
    raise ValueError(f"flashfuse pointwise: cannot serialize {type(expr).__name__} {expr}")


# ------------------------------------------------------------------------------------------------
# sympy -> Triton source
# ------------------------------------------------------------------------------------------------
def _exponent(e: sympy.Expr) -> sympy.Rational | None:
    """An exponent the printer can write with multiplies, sqrt and rsqrt: integers and halves."""
    if isinstance(e, sympy.Float) and float(e) * 2 == int(float(e) * 2):
        e = sympy.Rational(int(float(e) * 2), 2)
    if isinstance(e, sympy.Rational) and e.q in (1, 2) and abs(e.p) <= MAX_INT_POWER * e.q:
        return e
    return None


def printable(expr: sympy.Expr) -> bool:
    try:
        to_triton(expr)
        return True
    except ValueError:
        return False


def to_triton(expr: sympy.Expr) -> str:
    """A Triton (Python) expression computing `expr` from fp32 variables x0, x1, ..."""
    if isinstance(expr, sympy.Symbol):
        return expr.name
    if isinstance(expr, sympy.Number):
        v = float(expr)
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("flashfuse pointwise: non-finite constant")
        return f"({v!r})" if v < 0 else repr(v)
    if isinstance(expr, sympy.Add):
        return "(" + " + ".join(to_triton(a) for a in expr.args) + ")"
    if isinstance(expr, sympy.Mul):
        args = list(expr.args)
        if len(args) == 2 and args[0] == -1:
            return f"(-{to_triton(args[1])})"
        text = None
        for a in args:
            if isinstance(a, sympy.Pow) and (_exponent(a.exp) is not None) and _exponent(a.exp) < 0:
                den = _pow(a.base, -_exponent(a.exp))
                text = f"(1.0 / {den})" if text is None else f"({text} / {den})"
            else:
                t = to_triton(a)
                text = t if text is None else f"({text} * {t})"
        return text
    if isinstance(expr, sympy.Pow):
        e = _exponent(expr.exp)
        if e is None:
            raise ValueError(f"flashfuse pointwise: exponent {expr.exp} not supported")
        if e < 0:
            return f"(1.0 / {_pow(expr.base, -e)})"
        return _pow(expr.base, e)
    raise ValueError(f"flashfuse pointwise: cannot print {type(expr).__name__} {expr}")


def _pow(base: sympy.Expr, e: sympy.Rational) -> str:
    """base ** e for e > 0 an integer or a half-integer, as multiplies of base or sqrt(base)."""
    b = to_triton(base)
    if e.q == 2:
        b = f"tl.sqrt({b})"
    n = int(e.p)
    return "(" + " * ".join([b] * n) + ")" if n > 1 else b


def kernel_source(exprs: Sequence[sympy.Expr], n_inputs: int, rank: int | None = None) -> str:
    """Triton source. rank None: every input is indexed by the output's flat index (same shape and
    layout). rank R: the output is contiguous, each input is read through its own R strides (0 along
    broadcast dims) from the R-dim index of the output element."""
    ins = [f"in{i}" for i in range(n_inputs)]
    outs = [f"out{k}" for k in range(len(exprs))]
    params = ins + outs + ["n_elements"]
    if rank is not None:
        params += [f"size{d}" for d in range(1, rank)]
        params += [f"st{i}_{d}" for i in range(n_inputs) for d in range(rank)]
    lines = [
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        f"def pointwise_kernel({', '.join(params)}, BLOCK: tl.constexpr):",
        "    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
        "    mask = offs < n_elements",
    ]
    if rank is not None:
        lines.append("    rem = offs")
        for d in range(rank - 1, 0, -1):
            lines.append(f"    i{d} = rem % size{d}")
            lines.append(f"    rem = rem // size{d}")
        lines.append("    i0 = rem")
    for i in range(n_inputs):
        where = "offs" if rank is None else " + ".join(f"i{d} * st{i}_{d}" for d in range(rank))
        # `other=1.0`: masked lanes never divide by zero
        lines.append(f"    x{i} = tl.load(in{i} + ({where}), mask=mask, other=1.0).to(tl.float32)")
    for k, e in enumerate(exprs):
        if e.free_symbols:
            lines.append(f"    y{k} = {to_triton(e)}")
        else:  # a constant (e.g. a zero gradient): still a block of values
            lines.append(f"    y{k} = tl.full([BLOCK], {to_triton(e)}, tl.float32)")
        lines.append(f"    tl.store(out{k} + offs, y{k}.to(out{k}.dtype.element_ty), mask=mask)")
    return "\n".join(lines) + "\n"


_CACHE_DIR = os.path.join(tempfile.gettempdir(), f"flashfuse_pointwise_{os.getuid()}")


@functools.lru_cache(maxsize=None)
def compiled_kernel(exprs_text: str, n_inputs: int, rank: int | None = None):
    """The Triton kernel for `exprs_text`, generated and imported once per process. Triton reads a
    kernel's source with `inspect`, so the source is written to a real file first."""
    src = kernel_source(parse(exprs_text), n_inputs, rank)
    digest = hashlib.sha256(src.encode()).hexdigest()[:20]
    os.makedirs(_CACHE_DIR, exist_ok=True)
    path = os.path.join(_CACHE_DIR, f"pw_{digest}.py")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(src)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"flashfuse_pw_{digest}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.pointwise_kernel


# ------------------------------------------------------------------------------------------------
# reference (CPU without the interpreter): evaluate the tree with torch ops in fp32
# ------------------------------------------------------------------------------------------------
def evaluate(expr: sympy.Expr, env: dict[str, torch.Tensor]):
    if isinstance(expr, sympy.Symbol):
        return env[expr.name]
    if isinstance(expr, sympy.Number):
        return float(expr)
    if isinstance(expr, sympy.Add):
        out = evaluate(expr.args[0], env)
        for a in expr.args[1:]:
            out = out + evaluate(a, env)
        return out
    if isinstance(expr, sympy.Mul):
        args = list(expr.args)
        if len(args) == 2 and args[0] == -1:
            return -evaluate(args[1], env)
        out = None
        for a in args:
            e = _exponent(a.exp) if isinstance(a, sympy.Pow) else None
            if e is not None and e < 0:
                den = evaluate(sympy.Pow(a.base, -e, evaluate=False), env)
                out = 1.0 / den if out is None else out / den
            else:
                v = evaluate(a, env)
                out = v if out is None else out * v
        return out
    if isinstance(expr, sympy.Pow):
        e = _exponent(expr.exp)
        if e is None:
            raise ValueError(f"flashfuse pointwise: exponent {expr.exp} not supported")
        b = evaluate(expr.base, env)
        if e < 0:
            return 1.0 / evaluate(sympy.Pow(expr.base, -e, evaluate=False), env)
        if e.q == 2:
            b = torch.sqrt(b) if isinstance(b, torch.Tensor) else b ** 0.5
        out = b
        for _ in range(int(e.p) - 1):
            out = out * b
        return out
    raise ValueError(f"flashfuse pointwise: cannot evaluate {type(expr).__name__}")


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _check(inputs: Sequence[torch.Tensor]) -> torch.Size:
    """The output shape (the inputs' broadcast shape); raises unless dtypes and devices agree."""
    if not inputs:
        raise ValueError("flashfuse::pointwise needs at least one input")
    x = inputs[0]
    for t in inputs:
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError("flashfuse::pointwise inputs must share dtype and device; got "
                             f"{[(tuple(t.shape), t.dtype, t.device.type) for t in inputs]}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"flashfuse::pointwise does not support {x.dtype}")
    try:
        return torch.broadcast_shapes(*[t.shape for t in inputs])
    except RuntimeError as e:
        raise ValueError(f"flashfuse::pointwise: shapes {[tuple(t.shape) for t in inputs]} do not broadcast") from e


def coalesce(shape: Sequence[int], strides: Sequence[Sequence[int]]) -> tuple[list[int], list[list[int]]]:
    """Drop size-1 dims and merge neighbours that every tensor walks as one dim (so the kernel does as
    few divisions as possible). strides: per tensor, for `shape`. Returns (sizes, strides) of rank >= 1."""
    dims = [d for d in range(len(shape)) if shape[d] != 1]
    sizes: list[int] = []
    out: list[list[int]] = [[] for _ in strides]
    for d in dims:
        if sizes and all(st[-1] == s[d] * shape[d] for st, s in zip(out, strides)):
            sizes[-1] *= shape[d]
            for st, s in zip(out, strides):
                st[-1] = s[d]
        else:
            sizes.append(shape[d])
            for st, s in zip(out, strides):
                st.append(s[d])
    if not sizes:
        return [1], [[0] for _ in strides]
    return sizes, out


BLOCK = 1024


def _pointwise_kernel(inputs: list[torch.Tensor], exprs: str) -> list[torch.Tensor]:
    """Evaluate the `;`-separated expressions `exprs` over `inputs` (x0, x1, ...) elementwise, with
    broadcasting (the outputs have the inputs' broadcast shape)."""
    shape = _check(inputs)
    x = inputs[0]
    trees = parse(exprs)
    same_layout = _same_dense_layout(inputs, shape)
    outs = [_new_output(x, shape, same_layout) for _ in trees]
    if not _use_triton(x):
        env = {f"x{i}": t.float() for i, t in enumerate(inputs)}
        for out, tree in zip(outs, trees):
            out.copy_(evaluate(tree, env))  # copy_ broadcasts (a constant, a smaller input)
        return outs
    n = outs[0].numel()
    if n == 0:
        return outs
    grid = (triton_cdiv(n, BLOCK),)
    if same_layout:
        # one shape, one dense layout (e.g. all channels_last): index the storage directly
        compiled_kernel(exprs, len(inputs))[grid](*inputs, *outs, n, BLOCK=BLOCK)
        return outs
    # contiguous outputs; each input read through its broadcast strides (no expanded copies)
    expanded = [t.expand(shape) for t in inputs]
    sizes, strides = coalesce(list(shape), [list(t.stride()) for t in expanded])
    kernel = compiled_kernel(exprs, len(inputs), len(sizes))
    kernel[grid](*expanded, *outs, n, *sizes[1:], *[s for st in strides for s in st], BLOCK=BLOCK)
    return outs


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _same_dense_layout(inputs: Sequence[torch.Tensor], shape) -> bool:
    """All inputs have the output's shape and x's strides, and x covers its memory densely: then element
    k of every input is at storage offset k from its data pointer, whatever the layout."""
    x = inputs[0]
    return (x.shape == shape and _dense(x)
            and all(t.shape == shape and t.stride() == x.stride() for t in inputs[1:]))


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: sorted by stride, each dim's stride is the product of the sizes of
    the faster dims (size-1 dims do not matter)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _new_output(x: torch.Tensor, shape, same_layout: bool) -> torch.Tensor:
    if same_layout:
        return torch.empty_like(x, memory_format=torch.preserve_format)
    return torch.empty(shape, dtype=x.dtype, device=x.device)


def _pointwise_fake(inputs, exprs):
    shape = _check(inputs)
    same_layout = _same_dense_layout(inputs, shape)
    return [_new_output(inputs[0], shape, same_layout) for _ in range(exprs.count(";") + 1)]


def gradient_exprs(exprs: str, n_inputs: int, wanted: Sequence[int]) -> str:
    """Text of d/dx_i of sum_k g_k * expr_k for each i in `wanted`; the g_k are x_{n_inputs + k}."""
    trees = parse(exprs)
    grads = [symbol(n_inputs + k) for k in range(len(trees))]
    out = []
    for i in wanted:
        xi = symbol(i)
        d = sympy.Add(*[g * sympy.diff(t, xi) for g, t in zip(grads, trees)])
        out.append(serialize(d))
    return ";".join(out)


pointwise = define("pointwise", "(Tensor[] inputs, str exprs) -> Tensor[]", _pointwise_kernel, _pointwise_fake)


class _Pointwise(torch.autograd.Function):
    """The inputs are separate arguments: autograd does not look inside lists."""

    @staticmethod
    def forward(ctx, exprs, *tensors):
        with torch._C._AutoDispatchBelowAutograd():
            outs = pointwise(list(tensors), exprs)
        ctx.exprs = exprs
        ctx.out_shape = outs[0].shape
        ctx.wanted = [i for i in range(len(tensors)) if ctx.needs_input_grad[1 + i]]
        ctx.save_for_backward(*tensors)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        tensors = list(ctx.saved_tensors)
        result: list = [None] * len(tensors)
        if not ctx.wanted:
            return (None, *result)
        x = tensors[0]
        gs = [g if g is not None else x.new_zeros(ctx.out_shape) for g in grads]
        text = gradient_exprs(ctx.exprs, len(tensors), ctx.wanted)
        computed = pointwise(tensors + [g.to(x.dtype) for g in gs], text)  # differentiable again
        for i, g in zip(ctx.wanted, computed):
            # a broadcast input's gradient is summed over the dims it was broadcast along
            result[i] = g if g.shape == tensors[i].shape else g.sum_to_size(tensors[i].shape)
        return (None, *result)


define_autograd("pointwise", pointwise, lambda inputs, exprs: list(_Pointwise.apply(exprs, *inputs)))
