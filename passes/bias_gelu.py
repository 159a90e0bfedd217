"""Bias + GELU: `gelu(x @ W + b)` (and `F.gelu`, and GELU written out by hand, erf or tanh form) ->
one `flashfuse::bias_gelu` kernel that adds the bias and applies GELU in one pass (fwd and bwd).

Hand-written GELU is recognised by meaning, not by spelling: the pointwise region that ends at a
candidate node is read into sympy over its single tensor input x, expanded, and compared with
    0.5*x + 0.5*x*erf(c*x)                  c = 1/sqrt(2)
    0.5*x + 0.5*x*tanh(c1*x + c3*x**3)      c1 = sqrt(2/pi), c3 = c1 * 0.044715
with every constant within a relative 1e-6 (so `math.sqrt(2/math.pi)`, `0.7978845608`, `x*x*x`,
`pow(x, 3)`, `x / math.sqrt(2)`, `x * 0.7071067811865476`, `x*(1+erf(..))/2` all match). A region with
the right shape but another constant is a different function: recorded as a near-miss.

The bias is folded when the GELU input is `t + b` with b a vector over the last dim (`x @ W + b`),
`linear(inp, W, b)` or `addmm(b, x, W)`, also seen through a view that keeps the last dim (GPT-2's Conv1D)
(then the linear / mm runs without its bias and the kernel adds it), and that sum has no other user.
"""
from __future__ import annotations

import math

import sympy
import torch
import torch.fx as fx

from torch._functorch.autograd_function import autograd_function_apply

from flashfuse.passes import PassContext, bias_gelu_function, register_pass
from flashfuse.passes.eltwise_chain import (ARITHMETIC, AUTOCAST_NOTE, INDUCTOR_NOTE, autocast_nodes, erase_unused,
                                            grow_region, guarded, in_autocast, insert_call, is_number, kernel_fusions_enabled,
                                            known_equal, order_of, pow_exponent_ok, same_shape, shape_str, to_sympy,
                                            write_between)
from flashfuse.passes.normalize import val

aten = torch.ops.aten
NAME = "bias_gelu"
# constants are GELU's within 1e-5 relative: Megatron's erf_gelu divides by 1.41421 (2.5e-6 off sqrt(2)), which
# moves GELU by < 3e-6 relative, below fp32 test tolerance and far below bf16/fp16 resolution
REL_TOL = 1e-5
SQRT_1_2 = 1.0 / math.sqrt(2.0)
SQRT_2_PI = math.sqrt(2.0 / math.pi)
TANH_CUBIC = 0.044715
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_DEPTH = 5          # ops between erf/tanh and the end of a hand-written GELU
MAX_REGION = 24        # nodes in a hand-written GELU region
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _erf(a, kw, ev):
    return sympy.erf(a, evaluate=ev)


def _tanh(a, kw, ev):
    return sympy.tanh(a, evaluate=ev)


# functions that are erf / tanh up to an affine map, written out so match_gelu sees GELU's one erf or tanh:
# erfc(a) = 1 - erf(a), ndtr(a) = Phi(a) = (1 + erf(a/sqrt(2)))/2, sigmoid(a) = (1 + tanh(a/2))/2
def _erfc(a, kw, ev):
    return 1 - sympy.erf(a, evaluate=ev)


def _ndtr(a, kw, ev):
    return (1 + sympy.erf(a / sympy.sqrt(2), evaluate=ev)) / 2


def _sigmoid(a, kw, ev):
    return (1 + sympy.tanh(a / 2, evaluate=ev)) / 2


def _same(a, *rest):
    return a


GELU_OPS = dict(ARITHMETIC)
GELU_OPS[aten.erf.default] = _erf
GELU_OPS[aten.special_erf.default] = _erf  # torch.special.erf: an alias kept by the pre-dispatch trace
GELU_OPS[aten.tanh.default] = _tanh
for _op, _fn in ((aten.erfc.default, _erfc), (aten.special_erfc.default, _erfc), (aten.special_ndtr.default, _ndtr),
                 (aten.sigmoid.default, _sigmoid), (aten.special_expit.default, _sigmoid)):
    GELU_OPS[_op] = _fn
# the ops a hand-written GELU is searched from (one per GELU)
GELU_FUNCS = (aten.erf.default, aten.special_erf.default, aten.tanh.default, aten.erfc.default,
              aten.special_erfc.default, aten.special_ndtr.default, aten.sigmoid.default, aten.special_expit.default)
# value-neutral inside a GELU (Megatron writes `erf(..).to(x.dtype) + ones_like(x).to(x.dtype)`): casts to the
# dtype the value already has, and ones_like as the number 1; _gelu_absorb checks that no dtype changes
NEUTRAL_CASTS = (aten._to_copy.default, aten.to.dtype)
for _op in NEUTRAL_CASTS:
    GELU_OPS[_op] = _same
GELU_OPS[aten.ones_like.default] = lambda a, kw, ev: sympy.Integer(1)


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOL * abs(b)


def match_gelu(expr: sympy.Expr, x: sympy.Symbol) -> tuple[str | None, str | None]:
    """("none"|"tanh", None) if `expr` is GELU of x; (None, reason) if it has GELU's form with a wrong
    constant; (None, None) if it is something else."""
    e = sympy.expand(expr)
    funcs = [f for f in e.atoms(sympy.Function) if isinstance(f, (sympy.erf, sympy.tanh))]
    if len(funcs) != 1 or e.atoms(sympy.Function) != set(funcs):
        return None, None
    f = funcs[0]
    t = sympy.Dummy("t")
    try:
        outer = sympy.Poly(e.subs(f, t), x, t).as_dict()
        inner = sympy.Poly(sympy.expand(f.args[0]), x).as_dict()
    except sympy.PolynomialError:
        return None, None
    outer = {k: float(v) for k, v in outer.items() if float(v) != 0.0}
    inner = {k: float(v) for k, v in inner.items() if float(v) != 0.0}
    kind = "tanh" if isinstance(f, sympy.tanh) else "none"
    want_inner = {(1,)} if kind == "none" else {(1,), (3,)}
    if set(outer) != {(1, 0), (1, 1)} or set(inner) != want_inner:
        return None, None
    a, b = outer[(1, 0)], outer[(1, 1)]
    if not (_close(a, 0.5) and _close(b, 0.5)):
        return None, f"the outer coefficients are {a:g}*x + {b:g}*x*{type(f).__name__}(..), not 0.5 and 0.5"
    c1 = inner[(1,)]
    if kind == "none":
        if not _close(c1, SQRT_1_2):
            return None, (f"erf(c*x) with c = {c1:.10g}, not 1/sqrt(2) = {SQRT_1_2:.10g}: a different function")
        return kind, None
    c3 = inner[(3,)]
    if not _close(c1, SQRT_2_PI):
        return None, f"tanh(c*(x + ..)) with c = {c1:.10g}, not sqrt(2/pi) = {SQRT_2_PI:.10g}: a different function"
    if not _close(c3 / c1, TANH_CUBIC):
        return None, f"cubic coefficient {c3 / c1:.10g}, not 0.044715: a different function"
    return kind, None


def _gelu_absorb(like: torch.Tensor, done: set):
    def absorb(p: fx.Node) -> str | None:
        if p in done or p.op != "call_function" or p.target not in GELU_OPS:
            return "not a GELU op"
        out = val(p)
        if out is None or out.dtype != like.dtype or not same_shape(out, like):
            return "shape or dtype differs"
        if p.target in NEUTRAL_CASTS or p.target is aten.ones_like.default:
            src = val(p.args[0]) if isinstance(p.args[0], fx.Node) else None
            if src is None or src.dtype != out.dtype or not same_shape(src, out) or len(p.args) > 2:
                return "a cast that changes the dtype"
            return None
        if set(p.kwargs) - {"alpha"} or not is_number(p.kwargs.get("alpha", 1)):
            return "extra arguments"
        for a in p.args:
            if isinstance(a, fx.Node):
                t = val(a)
                if t is None:
                    return "a runtime scalar (not a constant)"
                if t.dtype != like.dtype or not same_shape(t, like):
                    return "broadcast input"
            elif not is_number(a):
                return "non-numeric constant"
        if p.target is aten.pow.Tensor_Scalar and not pow_exponent_ok(p.args[1]):
            return "unsupported power"
        return None
    return absorb


def _hand_written(gm: fx.GraphModule, func: fx.Node, order, done: set):
    """Find the GELU that contains the erf/tanh node `func`: (root, region, x, kind) or a near-miss
    (root, reason) or None."""
    like = val(func)
    if like is None or like.dtype not in FLOAT_DTYPES or like.dim() == 0:
        return None
    # candidate ends: pointwise users of func up to MAX_DEPTH ops downstream, latest first
    cands, frontier = [], [func]
    for _ in range(MAX_DEPTH):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u.op == "call_function" and u.target in GELU_OPS and u not in cands:
                    nxt.append(u)
        cands += nxt
        frontier = nxt
    cands.sort(key=lambda n: -order[n])
    absorb = _gelu_absorb(like, done)
    near = None
    for root in cands:
        if absorb(root) is not None:
            continue
        region, rejected = grow_region(root, order, absorb)
        if func not in region or len(region) > MAX_REGION:
            continue
        leaves: dict = {}
        expr = to_sympy(root, region, leaves, GELU_OPS, evaluate=True)
        if len(leaves) == 1:
            x = next(iter(leaves))
            kind, reason = match_gelu(expr, leaves[x])
            if kind is not None:
                return root, region, x, kind
            cut = _gelu_of_inner_node(root, region, func, order, absorb)
            if cut is not None:
                return cut
            if reason is not None and near is None:
                # GELU's form with another constant; a smaller region (`gelu * 3` -> `gelu`) may still match
                near = (root, reason)
            continue
        cut = _gelu_of_inner_node(root, region, func, order, absorb)
        if cut is not None:
            return cut
        # more than one input: is it a GELU whose intermediate is shared with another user?
        loose, _ = grow_region(root, order, absorb, private=False)
        lleaves: dict = {}
        if len(loose) <= MAX_REGION:
            lexpr = to_sympy(root, loose, lleaves, GELU_OPS, evaluate=True)
            if len(lleaves) == 1 and match_gelu(lexpr, next(iter(lleaves.values())))[0] is not None:
                shared = [r for r in rejected.values() if "also used" in r]
                near = near or (root, f"GELU matched, but {shared[0] if shared else 'an intermediate is shared'}"
                                      " (the fused value must have no other user)")
    return near


def _gelu_of_inner_node(root: fx.Node, region: set, func: fx.Node, order, absorb):
    """The region also took in the ops that compute GELU's input (`gelu(y * 0.5)`, `gelu(a * b)`,
    `gelu(y + 1)`), so it is not GELU of its leaf. Try each inner node, latest first, as the input:
    (root, region ending there, input, kind), or None."""
    for n in sorted(region - {root, func}, key=lambda m: -order[m]):
        def cut(p, n=n):
            return "the GELU's input" if p is n else absorb(p)
        sub, _ = grow_region(root, order, cut)
        if func not in sub:
            continue
        leaves: dict = {}
        expr = to_sympy(root, sub, leaves, GELU_OPS, evaluate=True)
        if list(leaves) == [n]:
            kind, _ = match_gelu(expr, leaves[n])
            if kind is not None:
                return root, sub, n, kind
    return None


def _bias_of(gm: fx.GraphModule, x: fx.Node, region: set) -> tuple[fx.Node, fx.Node | None, str, fx.Node | None]:
    """(input, bias, how, linear-to-split) for the GELU input x: the bias is folded when x = t + b with b
    a last-dim vector, or x = linear(inp, W, b) or addmm(b, t, W), and x feeds only the GELU."""
    xv = val(x)
    if any(u not in region for u in x.users) or x.op != "call_function":
        return x, None, "", None
    if x.target is aten.add.Tensor and x.kwargs.get("alpha", 1) == 1 and len(x.args) == 2:
        for t, b in (x.args, x.args[::-1]):
            if not (isinstance(t, fx.Node) and isinstance(b, fx.Node)):
                continue
            tv, bv = val(t), val(b)
            if tv is None or bv is None or tv.dtype != xv.dtype or bv.dtype != xv.dtype or bv.device != xv.device:
                continue
            if not same_shape(tv, xv) or not (1 <= bv.dim() <= xv.dim()) \
                    or not known_equal(bv.shape[-1], xv.shape[-1]) or not all(known_equal(s, 1) for s in bv.shape[:-1]):
                continue
            return t, b, "the bias add", None
    if x.target is aten.linear.default and len(x.args) == 3 and isinstance(x.args[2], fx.Node):
        bv = val(x.args[2])
        if bv is not None and bv.dim() == 1 and bv.dtype == xv.dtype:
            return x, x.args[2], "the linear's bias", x
    # torch.addmm(b, x, W) (beta = alpha = 1) is `x @ W + b` in one op: split like the linear. GPT-2's Conv1D
    # writes `addmm(b, x.view(-1, nx), W).view(*lead, nf)`: the view only splits the rows (the last dim is kept),
    # so the bias still lines up with the last dim and the view can move after the bias-free mm
    mm = x
    if x.target in VIEWS and isinstance(x.args[0], fx.Node) and x.args[0].target is aten.addmm.default \
            and len(x.args[0].users) == 1 and val(x.args[0]) is not None \
            and known_equal(val(x.args[0]).shape[-1], xv.shape[-1]):
        mm = x.args[0]
    if mm.target is aten.addmm.default and len(mm.args) == 3 and not mm.kwargs and isinstance(mm.args[0], fx.Node):
        bv, mv = val(mm.args[0]), val(mm)
        if bv is not None and mv is not None and 1 <= bv.dim() <= 2 and bv.dtype == xv.dtype == mv.dtype \
                and known_equal(bv.shape[-1], mv.shape[-1]) and all(known_equal(s, 1) for s in bv.shape[:-1]):
            return x, mm.args[0], "the addmm's bias" + (" (through the view after it)" if mm is not x else ""), mm
    return x, None, "", None


def _rewrite(gm: fx.GraphModule, ctx: PassContext, root: fx.Node, region: set, x: fx.Node, kind: str,
             spelling: str) -> bool:
    inp, bias, how, linear = _bias_of(gm, x, region)
    if in_autocast(autocast_nodes(gm), set(region) | {x}):
        ctx.graph_report.add_near_miss(NAME, root, AUTOCAST_NOTE)
        return False
    order = order_of(gm)
    first = {linear} if linear is not None else ({x} if bias is not None else set())
    writer = write_between(gm, order, set(region) | first, root)
    if writer is not None:
        ctx.graph_report.add_near_miss(NAME, root, f"`{writer.name}` writes in place inside the GELU "
                                                   "(fused, it would read after the write)")
        return False
    erase = set(region)
    if linear is not None:  # the matmul without its bias: linear(inp, W) / mm(x, W) for addmm(b, x, W)
        if linear.target is aten.addmm.default:
            inp = insert_call(gm, root, aten.mm.default, tuple(linear.args[1:]), like=linear)
            if x is not linear:  # the view that followed the addmm, now after the mm
                inp = insert_call(gm, root, x.target, (inp, *x.args[1:]), x.kwargs, like=x)
                erase.add(x)
        else:
            inp = insert_call(gm, root, aten.linear.default, tuple(linear.args[:2]), like=linear)
        erase.add(linear)
    elif bias is not None:
        erase.add(x)
    fused = insert_call(gm, root, torch.ops.flashfuse.bias_gelu.default, (inp, bias, kind), like=root)
    form = "tanh" if kind == "tanh" else "erf"
    what = f"{spelling} GELU ({form} form)" + (f" with {how} folded in" if bias is not None else "")
    root.replace_all_uses_with(fused)
    ctx.graph_report.add_match(NAME, root, what + " -> one kernel", approximate=kind, bias=bias is not None,
                               spelling=spelling, shape=shape_str(val(root)))
    erase_unused(gm, erase)
    return True


@register_pass(NAME)
def run(gm: fx.GraphModule, ctx: PassContext) -> int:
    order = order_of(gm)
    enabled = kernel_fusions_enabled(ctx)
    done: set = set()
    rewrites = 0
    def one(node: fx.Node) -> bool:
        nonlocal order
        if node.target is aten.gelu.default:
            x = node.args[0]
            xv, out = val(x), val(node)
            kind = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            done.add(node)
            if xv is None or out is None or xv.dtype not in FLOAT_DTYPES or kind not in ("none", "tanh") \
                    or xv.dim() == 0:
                ctx.graph_report.add_near_miss(NAME, node, f"gelu on {None if xv is None else xv.dtype} "
                                                           "of dim 0 or a dtype the kernel lacks (fp16/bf16/fp32, >= 1 dim)")
                return False
            if not enabled:
                ctx.graph_report.add_near_miss(NAME, node, INDUCTOR_NOTE)
                return False
            if _rewrite(gm, ctx, node, {node}, x, kind, "F.gelu"):
                order = order_of(gm)
                return True
            return False
        found = _hand_written(gm, node, order, done)
        done.add(node)
        if found is None:
            return False
        if len(found) == 2:
            root, reason = found
            ctx.graph_report.add_near_miss(NAME, root, reason)
            return False
        root, region, x, kind = found
        done.update(region)
        if not enabled:
            ctx.graph_report.add_near_miss(NAME, root, INDUCTOR_NOTE)
            return False
        if _rewrite(gm, ctx, root, region, x, kind, "hand-written"):
            order = order_of(gm)
            return True
        return False

    def function(node: fx.Node) -> bool:
        found = bias_gelu_function.match(gm, node)
        if found is None:
            return False
        if isinstance(found, str):
            ctx.graph_report.add_near_miss(NAME, node, f"GELU inside a custom autograd.Function, kept whole: {found}")
            return False
        if not enabled:
            ctx.graph_report.add_near_miss(NAME, node, INDUCTOR_NOTE)
            return False
        if in_autocast(autocast_nodes(gm), [node]):
            ctx.graph_report.add_near_miss(NAME, node, AUTOCAST_NOTE)
            return False
        inp, bias, kind = found
        out = next(iter(node.users))
        fused = insert_call(gm, node, torch.ops.flashfuse.bias_gelu.default, (inp, bias, kind), like=out)
        for u in list(node.users):
            u.replace_all_uses_with(fused)
        ctx.graph_report.add_match(NAME, node, f"custom autograd.Function GELU ({'tanh' if kind == 'tanh' else 'erf'} "
                                   "form; forward and backward proven GELU's)" + (" with its bias" if bias is not None
                                                                                   else "") + " -> one kernel",
                                   approximate=kind, bias=bias is not None, spelling="autograd.Function",
                                   shape=shape_str(val(out)))
        erase_unused(gm, set(node.users) | {node})
        return True

    for node in list(gm.graph.nodes):
        if node in done or node.op != "call_function":
            continue
        if node.target is aten.gelu.default or node.target in GELU_FUNCS:
            rewrites += guarded(ctx, NAME, node, lambda: one(node))
        elif node.target is autograd_function_apply:
            rewrites += guarded(ctx, NAME, node, lambda: function(node))
    return rewrites
