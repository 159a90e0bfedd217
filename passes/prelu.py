"""PReLU: `F.prelu` / `nn.PReLU` (aten.prelu), `where(x > 0, x, a*x)`, `relu(x) - a*relu(-x)`,
`x.clamp(min=0) + a*x.clamp(max=0)` (clamp_min / clamp_max too), `relu(x) + a*(x - relu(x))`,
`maximum(x, zeros) + a*minimum(x, zeros)` and `relu(x) + a*(x - |x|)/2` (any product order of a, the numbers
and the negative part, as long as the numbers make it exactly min(x, 0)) ->
one `flashfuse::prelu` kernel (fwd, and a bwd that gives dx and the slope gradient in one pass).

The slope a is a tensor: one value (any shape of numel 1) or one value per channel along exactly one
dim of x (a of shape (C, 1, 1) against (N, C, H, W) is channel dim 1; a of shape (C,) against (N, L, C)
is the last dim). A Python-number slope (a leaky ReLU), a slope that varies along two dims or would
broadcast x to a larger shape is left alone with a near-miss.

The spellings agree everywhere except the gradient at exactly x == 0; the kernel is told which
convention to reproduce (see kernels/prelu.py, `zero_grad`), so gradients equal eager's there too.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from flashfuse.kernels.prelu import ZERO_GRAD_OF, ZERO_GRAD_ONE, ZERO_GRAD_SLOPE
from flashfuse.passes import PassContext, register_pass
from flashfuse.passes.eltwise_chain import (AUTOCAST_NOTE, INDUCTOR_NOTE, autocast_nodes, erase_unused, guarded, in_autocast,
                                            insert_call, kernel_fusions_enabled, known_equal, order_of, same_shape,
                                            shape_str, write_between)
from flashfuse.passes.normalize import val

aten = torch.ops.aten
NAME = "prelu"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# comparison of x with 0 -> (x is the true branch?, zero_grad convention)
_COMPARE = {
    aten.gt.Scalar: (True, ZERO_GRAD_SLOPE),   # where(x > 0, x, a*x)
    aten.ge.Scalar: (True, ZERO_GRAD_ONE),     # where(x >= 0, x, a*x)
    aten.le.Scalar: (False, ZERO_GRAD_SLOPE),  # where(x <= 0, a*x, x)
    aten.lt.Scalar: (False, ZERO_GRAD_ONE),    # where(x < 0, a*x, x)
}


class NotPrelu(Exception):
    """Raised with the precise reason when a PReLU-shaped subgraph cannot be fused."""


def _slope_of(mul: fx.Node, x: fx.Node) -> fx.Node:
    """`a` for mul(a, x) / mul(x, a); raises NotPrelu for a Python-number slope."""
    if mul.op != "call_function" or mul.target is not aten.mul.Tensor or len(mul.args) != 2:
        raise LookupError
    a, b = mul.args
    if b is x and a is not x:
        a, b = b, a
    if a is not x:
        raise LookupError
    if not isinstance(b, fx.Node):
        raise NotPrelu(f"the slope is the number {b!r} (a leaky ReLU), not a tensor")
    return b


def channel_dim_of(x: torch.Tensor, a: torch.Tensor) -> int:
    """The dim of x that the slope varies along (-1: a single slope). Raises NotPrelu otherwise."""
    if a.numel() == 1 and a.dim() <= x.dim():
        return -1
    if a.dim() > x.dim():
        raise NotPrelu(f"slope of shape {shape_str(a)} broadcasts x {shape_str(x)} to more dims")
    pad = x.dim() - a.dim()
    dims = [pad + i for i, s in enumerate(a.shape) if not known_equal(s, 1)]
    for d in dims:
        if not known_equal(a.shape[d - pad], x.shape[d]):
            raise NotPrelu(f"slope of shape {shape_str(a)} does not broadcast to x {shape_str(x)} "
                           "without enlarging it")
    if len(dims) != 1:
        raise NotPrelu(f"slope of shape {shape_str(a)} varies along {len(dims)} dims of x {shape_str(x)} "
                       "(kernel: one slope or one per channel)")
    return dims[0]


def _private(nodes: list[fx.Node], end: fx.Node) -> None:
    inside = set(nodes) | {end}
    for n in nodes:
        outside = [u for u in n.users if u not in inside]
        if outside:
            raise NotPrelu(f"the intermediate `{n.name}` is also used by `{outside[0].name}` "
                           "(the fused value must have no other user)")


def _is_zero(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0


def _clamp_part(node, positive: bool):
    """(x, d/dx at x == 0) for the positive part max(x, 0) (`relu(x)`: 0, `clamp(x, min=0)` /
    `clamp_min(x, 0)`: 1) or, with positive=False, the negative part min(x, 0) (`clamp(x, max=0)` /
    `clamp_max(x, 0)`: 1; clamps pass the gradient at their bound); None otherwise."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
        return None
    x = node.args[0]
    if node.target is aten.relu.default:
        return (x, 0) if positive else None
    if _is_zero_tie(node, aten.maximum.default if positive else aten.minimum.default):
        return x, 0.5  # torch.maximum / minimum against zeros split the gradient at a tie
    if not positive and node.target is aten.sub.Tensor and len(node.args) == 2 and not node.kwargs:
        p = _clamp_part(node.args[1], True)  # x - max(x, 0) == min(x, 0), gradient 1 - P'(0) at 0
        return (x, 1 - p[1]) if p is not None and p[0] is x else None
    if node.target in (aten.clamp_min.default, aten.clamp_max.default):
        bound = node.args[1] if len(node.args) > 1 else None
        ok = _is_zero(bound) and (node.target is aten.clamp_min.default) == positive
        return (x, 1) if ok else None
    if node.target is aten.clamp.default:
        args = list(node.args) + [None] * 2
        lo, hi = node.kwargs.get("min", args[1]), node.kwargs.get("max", args[2])
        ok = (_is_zero(lo) and hi is None) if positive else (lo is None and _is_zero(hi))
        return (x, 1) if ok else None
    return None


# (d/dx at 0 of the positive part, of the slope part / a) -> zero_grad convention: ZERO_GRAD_OF


def _product(node: fx.Node, inner: list) -> tuple[float, list]:
    """A product tree `a * (x - |x|) * 0.5`, `a * (..) / 2`: (the numbers multiplied, the other factors);
    the mul / div nodes it walks through go into `inner`."""
    if isinstance(node, fx.Node) and node.op == "call_function" and len(node.args) == 2 and not node.kwargs \
            and node.target in (aten.mul.Tensor, aten.div.Tensor):
        lhs, rhs = node.args
        if node.target is aten.div.Tensor and not (isinstance(rhs, (int, float)) and not isinstance(rhs, bool) and rhs):
            return 1.0, [node]
        inner.append(node)
        n1, f1 = _product(lhs, inner)
        if node.target is aten.div.Tensor:
            return n1 / rhs, f1
        n2, f2 = _product(rhs, inner)
        return n1 * n2, f1 + f2
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node), []
    return 1.0, [node]


def _negative_part(node, inner: list):
    """(x, c, d) for a node equal to c * min(x, 0) whose gradient at x == 0 is d: the clamp forms (c 1),
    `x - |x|` (c 2, d 1: abs'(0) = 0 in torch); None otherwise."""
    m = _clamp_part(node, False)
    if m is not None:
        return m[0], 1.0, m[1]
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is aten.sub.Tensor \
            and len(node.args) == 2 and not node.kwargs:
        x, ab = node.args
        if isinstance(ab, fx.Node) and ab.op == "call_function" and ab.target is aten.abs.default and ab.args[0] is x:
            inner.append(ab)
            return x, 2.0, 1.0
    return None


def _scaled_negative_part(scaled: fx.Node, x: fx.Node):
    """slope * (number) * negative part with number * c == 1, e.g. `a * (x - |x|) * 0.5`: (a, share of a at
    x == 0, intermediates) or None."""
    inner: list = []
    num, factors = _product(scaled, inner)
    if len(factors) != 2:
        return None
    for part, a in (factors, factors[::-1]):
        found = _negative_part(part, inner)
        if found is None or found[0] is not x or not isinstance(a, fx.Node) or a is x:
            continue
        _, c, d = found
        if abs(num * c - 1.0) > 1e-12:
            raise NotPrelu(f"the negative part is scaled by {num * c:g}, not 1 (a different function)")
        return a, num * d, inner + [part]
    return None


def _is_zero_tie(node, op) -> bool:
    """`op(x, zeros)` (torch.maximum / minimum against a zero tensor), which splits the gradient at a tie."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is op and len(node.args) == 2):
        return False
    z = node.args[1]
    return isinstance(z, fx.Node) and z.op == "call_function" and (
        z.target in (aten.zeros_like.default, aten.new_zeros.default, aten.zeros.default)
        or (z.target in (aten.full_like.default, aten.full.default) and _is_zero(z.args[1])))


def _split_form(node: fx.Node):
    """`relu(x) - a*relu(-x)` and `x.clamp(min=0) + a*x.clamp(max=0)` (any mix of relu / clamp forms):
    the positive part plus the slope times the negative part. Returns what `match` returns, or None."""
    lhs, rhs = node.args
    if node.target is aten.sub.Tensor:   # P(x) - a * M(-x), M(-x) = max(-x, 0) = -min(x, 0)
        candidates = [(lhs, rhs)]
    else:                                # P(x) + a * min(x, 0), either operand first
        candidates = [(lhs, rhs), (rhs, lhs)]
    for pos, scaled in candidates:
        p = _clamp_part(pos, True)
        if p is None or not isinstance(scaled, fx.Node) or scaled.target is not aten.mul.Tensor:
            continue
        x, p_grad = p
        for part in scaled.args:
            if node.target is aten.sub.Tensor:
                m = _clamp_part(part, True)
                neg = m[0] if m is not None else None
                if not (isinstance(neg, fx.Node) and neg.target is aten.neg.default and neg.args[0] is x):
                    continue
                inner = [pos, scaled, part, neg]
            else:
                m = _clamp_part(part, False)
                if m is None or m[0] is not x:
                    continue
                inner = [pos, scaled, part]
                if part.target is aten.sub.Tensor and part.args[1] is not pos:
                    inner.append(part.args[1])  # the positive part inside `x - relu(x)`
            try:
                a = _slope_of(scaled, part)
            except LookupError:
                continue
            _private(inner, node)
            spelling = "relu(x) - a*relu(-x)" if node.target is aten.sub.Tensor else "x.clamp(min=0) + a*x.clamp(max=0)"
            return x, a, None, ZERO_GRAD_OF[(float(p_grad), float(m[1]))], inner, spelling
        if node.target is aten.add.Tensor:
            found = _scaled_negative_part(scaled, x)
            if found is not None:
                a, share, parts = found
                inner = [pos, *parts]
                if (float(p_grad), share) not in ZERO_GRAD_OF:
                    raise NotPrelu(f"the gradient at x == 0 is {p_grad:g} + {share:g}*a, not a kernel convention")
                _private(inner, node)
                return x, a, None, ZERO_GRAD_OF[(float(p_grad), share)], inner, "relu(x) + a*(x - |x|)/2"
    return None


def match(node: fx.Node):
    """(x, a, channel_dim, zero_grad, intermediates, spelling) if `node` ends a PReLU; None if it does
    not look like one; raises NotPrelu with the reason if it looks like one but cannot be fused."""
    if node.op != "call_function":
        return None
    if node.target is aten.prelu.default:
        x, a = node.args
        xv, av = val(x), val(a)
        if xv is None or av is None:
            return None
        if av.numel() == 1:
            cd = -1
        elif xv.dim() >= 2 and av.dim() == 1 and known_equal(av.shape[0], xv.shape[1]):
            cd = 1
        else:
            raise NotPrelu(f"prelu weight {shape_str(av)} against input {shape_str(xv)}")
        return x, a, cd, ZERO_GRAD_SLOPE, [], "F.prelu / nn.PReLU"
    if node.target is aten.where.self and len(node.args) == 3:
        cond, t, f = node.args
        if not isinstance(cond, fx.Node) or cond.target not in _COMPARE or not _is_zero(cond.args[1]):
            return None
        x = cond.args[0]
        x_true, zero_grad = _COMPARE[cond.target]
        plain, scaled = (t, f) if x_true else (f, t)
        if plain is not x or not isinstance(scaled, fx.Node):
            return None
        try:
            a = _slope_of(scaled, x)
        except LookupError:
            return None
        _private([cond, scaled], node)
        return x, a, None, zero_grad, [cond, scaled], "where(x > 0, x, a*x)"
    if node.target in (aten.add.Tensor, aten.sub.Tensor) and len(node.args) == 2 \
            and node.kwargs.get("alpha", 1) == 1:
        return _split_form(node)
    return None


@register_pass(NAME)
def run(gm: fx.GraphModule, ctx: PassContext) -> int:
    enabled = kernel_fusions_enabled(ctx)
    erased: set = set()

    def one(node: fx.Node) -> bool:
        try:
            found = match(node)
            if found is None:
                return False
            x, a, cd, zero_grad, inner, spelling = found
            xv, av, out = val(x), val(a), val(node)
            if xv is None or av is None or out is None:
                raise NotPrelu("x or the slope is not a tensor")
            if av.device != xv.device:
                raise NotPrelu(f"the slope is on {av.device}, x on {xv.device}")
            if xv.dtype not in FLOAT_DTYPES or out.dtype != xv.dtype:
                raise NotPrelu(f"computes in {out.dtype} from x of {xv.dtype} (kernel: fp16/bf16/fp32, no casts)")
            if not same_shape(out, xv):
                raise NotPrelu(f"the slope broadcasts x {shape_str(xv)} to {shape_str(out)}")
            if cd is None:
                cd = channel_dim_of(xv, av)
        except NotPrelu as why:
            ctx.graph_report.add_near_miss(NAME, node, str(why))
            return False
        if in_autocast(autocast_nodes(gm), [node] + inner):
            ctx.graph_report.add_near_miss(NAME, node, AUTOCAST_NOTE)
            return False
        if inner:
            writer = write_between(gm, order_of(gm), inner, node)
            if writer is not None:
                ctx.graph_report.add_near_miss(NAME, node, f"`{writer.name}` writes in place inside the PReLU")
                return False
        if not enabled:
            ctx.graph_report.add_near_miss(NAME, node, INDUCTOR_NOTE)
            return False
        fused = insert_call(gm, node, torch.ops.flashfuse.prelu.default, (x, a, max(cd, 0), zero_grad), like=node)
        node.replace_all_uses_with(fused)
        where = "one slope" if cd < 0 else f"one slope per channel along dim {cd}"
        ctx.graph_report.add_match(NAME, node, f"{spelling} with {where} -> one kernel", spelling=spelling,
                                   channel_dim=cd, shape=shape_str(xv))
        erased.update([node] + inner)
        erase_unused(gm, [node] + inner)
        return True

    rewrites = 0
    for node in list(gm.graph.nodes):
        if node not in erased and node.op == "call_function":
            rewrites += guarded(ctx, NAME, node, lambda: one(node))
    return rewrites
