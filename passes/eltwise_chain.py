"""Binary eltwise folding: a chain of >= 3 arithmetic ops over tensors that broadcast into the chain's
output (and Python scalars), such as ``x1*b1 + x2*b2 - x3*b3``, becomes one generated pointwise kernel
(``flashfuse::pointwise``).

The chain is read into a sympy expression (unevaluated: the tree exactly as the user wrote it), printed
as text for the op, which prints it as Triton source; the gradient of each input is ``sympy.diff``.

This file also holds the helpers the other pointwise passes share (bias_gelu, prelu): reading a
pointwise region of the FX graph into sympy, inserting a replacement node with its fake value, and the
policy that decides whether a kernel replacement applies under the current remainder.
"""
from __future__ import annotations

import heapq
import math
import operator
from typing import Any, Callable, Iterable

import sympy
import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from flashfuse.passes import PassContext, register_pass
from flashfuse.passes.normalize import traced, val

aten = torch.ops.aten
NAME = "eltwise_chain"
MIN_OPS = 3
MAX_INPUTS = 16
MAX_OUTPUTS = 4   # the chain's result and up to 3 intermediates that other ops read too
INDUCTOR_NOTE = ("left to Inductor, which fuses this pointwise chain itself (Inductor remainder with "
                 "norm_policy 'auto' or 'never'; norm_policy='always' forces flashfuse's kernel)")

# ------------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------------


def kernel_fusions_enabled(ctx: PassContext) -> bool:
    """Kernel replacements always apply under the eager remainder; under Inductor only with
    norm_policy='always' (Inductor already generates one kernel for a pointwise chain)."""
    if ctx.config.remainder == "eager":
        return True
    return ctx.config.norm_policy == "always"


def known_equal(a: Any, b: Any) -> bool:
    """a == b provably (ints or SymInts), without adding guards."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(known_equal(x, y) for x, y in zip(a.shape, b.shape))


def broadcasts_into(t: torch.Tensor, out: torch.Tensor) -> bool:
    """t broadcasts to out's shape without changing it (provably: each dim 1 or equal)."""
    if t.dim() > out.dim():
        return False
    return all(known_equal(a, 1) or known_equal(a, b) for a, b in zip(t.shape[::-1], out.shape[::-1]))


def shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def is_number(a: Any) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)


def order_of(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def node_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes]


def insert_call(gm: fx.GraphModule, before: fx.Node, target: Any, args: tuple, kwargs: dict | None = None,
                like: fx.Node | None = None) -> fx.Node:
    """Insert `target(*args, **kwargs)` before `before`, with its fake value in meta["val"] and the
    user's stack trace of `like` (so the report and later passes see a normal node)."""
    kwargs = kwargs or {}

    def fake(a):
        return a.meta["val"] if isinstance(a, fx.Node) else a

    fargs = torch.fx.node.map_aggregate(args, fake)
    fkwargs = torch.fx.node.map_aggregate(kwargs, fake)
    mode = detect_fake_mode([v for v in torch.utils._pytree.tree_leaves((fargs, fkwargs))
                             if isinstance(v, torch.Tensor)])
    with mode if mode is not None else _nullcontext():
        value = target(*fargs, **fkwargs)
    with gm.graph.inserting_before(before):
        new = gm.graph.call_function(target, args, kwargs)
    new.meta["val"] = value
    src = like if like is not None else before
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in src.meta:
            new.meta[key] = src.meta[key]
    return new


def getitem(gm: fx.GraphModule, node: fx.Node, index: int) -> fx.Node:
    with gm.graph.inserting_after(node):
        item = gm.graph.call_function(operator.getitem, (node, index))
    item.meta["val"] = node.meta["val"][index]
    for key in ("stack_trace", "nn_module_stack"):
        if key in node.meta:
            item.meta[key] = node.meta[key]
    return item


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


AUTOCAST_NOTE = ("under autocast: the fake values carry the dtypes without autocast, the real ops run in "
                 "autocast's dtypes (matmuls in half, pow/sum in fp32), so the fused kernel's dtypes cannot "
                 "be proven; left as is")


def autocast_nodes(gm: fx.GraphModule) -> set[fx.Node] | None:
    """The nodes inside an autocast region of the graph; None means the whole graph (autocast is on
    around the compiled call, which Dynamo guards on)."""
    for device_type in ("cuda", "cpu"):
        try:
            if torch.is_autocast_enabled(device_type):
                return None
        except (TypeError, RuntimeError):  # a build without that device type
            continue
    inside: set[fx.Node] = set()
    depth = 0
    for n in gm.graph.nodes:
        name = getattr(n.target, "__name__", "") if n.op == "call_function" else ""
        if name == "_enter_autocast":
            depth += 1
        elif name == "_exit_autocast":
            depth = max(0, depth - 1)
        elif depth:
            inside.add(n)
    return inside


def autocast_state(gm: fx.GraphModule, at: fx.Node) -> dict:
    """{device type: autocast dtype} for the device types whose autocast is on at node `at`: the regions open
    around it in the graph (inner ones override outer ones, `enabled=False` turns a device off), else
    autocast on around the compiled call."""
    stack = []
    for n in gm.graph.nodes:
        if n is at:
            break
        name = getattr(n.target, "__name__", "") if n.op == "call_function" else ""
        if name == "_enter_autocast":
            stack.append((n.args[0], n.args[1], bool(n.args[2]) if len(n.args) > 2 else True))
        elif name == "_exit_autocast" and stack:
            stack.pop()
    state: dict = {}
    for device_type in ("cuda", "cpu"):
        try:
            if torch.is_autocast_enabled(device_type):
                state[device_type] = torch.get_autocast_dtype(device_type)
        except (TypeError, RuntimeError):  # a build without that device type
            continue
    for dev, dtype, enabled in stack:
        if enabled:
            state[dev] = dtype
        else:
            state.pop(dev, None)
    return state


def in_autocast(regions: set[fx.Node] | None, nodes: Iterable[fx.Node]) -> bool:
    return regions is None or any(n in regions for n in nodes)


def guarded(ctx: PassContext, fusion: str, node: fx.Node, attempt: Callable[[], bool]) -> int:
    """Run one candidate's match-and-rewrite. A bug while matching one candidate must not cost the
    graph's other fusions (the pipeline drops them all when a pass raises): the candidate is left alone
    with a near-miss. The rewrites redirect uses only as their last step, so an exception leaves the
    graph valid (at most some unused inserted nodes, removed by dead-code elimination)."""
    try:
        return int(bool(attempt()))
    except Exception as exc:
        from flashfuse.log import logger

        logger.warning("flashfuse: %s: candidate %s left alone after %s: %s", fusion, node.name,
                       type(exc).__name__, exc)
        ctx.graph_report.add_near_miss(fusion, node, f"left alone after an internal error in the pass: "
                                                     f"{type(exc).__name__}: {exc}")
        return 0


def mutates(node: fx.Node) -> bool:
    """An op that writes to one of its inputs in place (kept by normalize when the target is an input
    or a view)."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def write_between(gm: fx.GraphModule, order: dict[fx.Node, int], nodes: Iterable[fx.Node],
                  end: fx.Node) -> fx.Node | None:
    """The first in-place write between the earliest of `nodes` and `end`: a fused op evaluated at `end`
    would read its inputs after that write, where the original ops read them before."""
    lo, hi = min(order[n] for n in nodes), order[end]
    if lo >= hi:
        return None
    return next((n for n in gm.graph.nodes if lo < order.get(n, -1) < hi and mutates(n)), None)


def erase_unused(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> None:
    """Erase the replaced nodes, users first (pure ATen ops only; the pipeline also runs DCE)."""
    order = order_of(gm)
    for n in sorted(set(nodes), key=lambda n: -order.get(n, -1)):
        if n.graph is gm.graph and not n.users:
            gm.graph.erase_node(n)


# FX node -> sympy. Each entry: target -> function(args (sympy or numbers), kwargs, evaluate) -> expr.
def _add(a, b, kw, ev):
    alpha = kw.get("alpha", 1)
    b = b if alpha == 1 else sympy.Mul(_num(alpha), b, evaluate=ev)
    return sympy.Add(a, b, evaluate=ev)


def _sub(a, b, kw, ev):
    alpha = kw.get("alpha", 1)
    return sympy.Add(a, sympy.Mul(_num(-alpha), b, evaluate=ev), evaluate=ev)


def _rsub(a, b, kw, ev):
    return _sub(b, a, kw, ev)


def _mul(a, b, kw, ev):
    return sympy.Mul(a, b, evaluate=ev)


def _div(a, b, kw, ev):
    return sympy.Mul(a, sympy.Pow(b, sympy.Integer(-1), evaluate=ev), evaluate=ev)


def _neg(a, kw, ev):
    return sympy.Mul(sympy.Integer(-1), a, evaluate=ev)


def _reciprocal(a, kw, ev):
    return sympy.Pow(a, sympy.Integer(-1), evaluate=ev)


def _pow(a, e, kw, ev):
    return sympy.Pow(a, _num(e), evaluate=ev)


def _addcmul(a, b, c, kw, ev):
    # a + value * b * c (torch.addcmul; Adam's moment updates spell it so)
    return sympy.Add(a, sympy.Mul(_num(kw.get("value", 1)), b, c, evaluate=ev), evaluate=ev)


def _addcdiv(a, b, c, kw, ev):
    return sympy.Add(a, sympy.Mul(_num(kw.get("value", 1)), b, sympy.Pow(c, sympy.Integer(-1), evaluate=ev),
                                  evaluate=ev), evaluate=ev)


def _num(v: Any) -> sympy.Expr:
    if isinstance(v, sympy.Basic):
        return v
    if isinstance(v, float) and v.is_integer() and abs(v) < 2 ** 53:
        return sympy.Integer(int(v))
    return sympy.Integer(v) if isinstance(v, int) else sympy.Float(v)


ARITHMETIC: dict[Any, Callable] = {
    aten.add.Tensor: _add, aten.add.Scalar: _add,
    aten.sub.Tensor: _sub, aten.sub.Scalar: _sub,
    aten.rsub.Tensor: _rsub, aten.rsub.Scalar: _rsub,
    aten.mul.Tensor: _mul, aten.mul.Scalar: _mul,
    aten.div.Tensor: _div, aten.div.Scalar: _div,
    aten.neg.default: _neg,
    aten.reciprocal.default: _reciprocal,
    aten.pow.Tensor_Scalar: _pow,
    # the NumPy-style aliases (torch.multiply, torch.subtract, torch.divide, torch.true_divide,
    # torch.negative) stay as their own ops in the pre-dispatch graph: the same functions
    aten.multiply.Tensor: _mul, aten.multiply.Scalar: _mul,
    aten.subtract.Tensor: _sub, aten.subtract.Scalar: _sub,
    aten.divide.Tensor: _div, aten.divide.Scalar: _div,
    aten.true_divide.Tensor: _div, aten.true_divide.Scalar: _div,
    aten.negative.default: _neg,
    aten.addcmul.default: _addcmul,
    aten.addcdiv.default: _addcdiv,
}
_KWARGS_OK = {"alpha", "value"}


def pow_exponent_ok(e: Any) -> bool:
    """Exponents the kernel writes exactly with multiplies (and sqrt for halves)."""
    return is_number(e) and float(e) * 2 == int(float(e) * 2) and 0 < abs(float(e)) <= 8


def to_sympy(root: fx.Node, region: set[fx.Node], leaves: dict[fx.Node, sympy.Symbol],
             table: dict[Any, Callable], evaluate: bool) -> sympy.Expr:
    """The sympy expression of `root` over the `region`; nodes outside it become symbols (added to
    `leaves` in order of first use: x0, x1, ...)."""
    memo: dict[fx.Node, sympy.Expr] = {}

    def conv(a: Any) -> sympy.Expr:
        if isinstance(a, fx.Node):
            if a in memo:
                return memo[a]
            if a not in region:
                if a not in leaves:
                    leaves[a] = sympy.Symbol(f"x{len(leaves)}")
                return leaves[a]
            fn = table[a.target]
            args = [conv(x) for x in a.args]
            e = fn(*args, dict(a.kwargs), evaluate)
            memo[a] = e
            return e
        return _num(a) if isinstance(a, (int, float, sympy.Basic)) else a  # a dtype stays a dtype

    return conv(root)


def grow_region(root: fx.Node, order: dict[fx.Node, int], absorb: Callable[[fx.Node], str | None],
                private: bool = True,
                shareable: Callable[[fx.Node], bool] | None = None) -> tuple[set[fx.Node], dict[fx.Node, str]]:
    """The pointwise region that ends at `root`: producers are absorbed while `absorb(p)` returns
    None (else the reason why not) and, with `private`, all their users are already in the region,
    unless `shareable(p)` says the fused op may return p's value too (its other users must then come
    after `root`, where the fused op is). Producers are visited latest first, so when one is popped all
    of its possible in-region users have been decided. Returns (region, {rejected producer: reason})."""
    region = {root}
    rejected: dict[fx.Node, str] = {}
    heap = [(-order[a], id(a), a) for a in node_args(root)]
    heapq.heapify(heap)
    seen = set()
    while heap:
        _, _, p = heapq.heappop(heap)
        if p in seen or p in region:
            continue
        seen.add(p)
        reason = absorb(p)
        if reason is None and private:
            outside = [u for u in p.users if u not in region]
            if outside and not (shareable is not None and all(order.get(u, -1) > order[root] for u in outside)
                                and shareable(p)):
                reason = f"its intermediate `{p.name}` is also used by `{outside[0].name}`"
        if reason is not None:
            rejected[p] = reason
            continue
        region.add(p)
        for a in node_args(p):
            heapq.heappush(heap, (-order[a], id(a), a))
    return region, rejected


# ------------------------------------------------------------------------------------------------
# the pass
# ------------------------------------------------------------------------------------------------
def _chain_reason(node: fx.Node, like: torch.Tensor | None) -> str | None:
    """None if `node` can be part of a chain whose output looks like `like`: its tensors broadcast into
    `like`'s shape (the kernel evaluates every op at each output element, which gives the same values
    as broadcasting op by op), one dtype and device, finite Python scalars."""
    if node.op != "call_function" or node.target not in ARITHMETIC:
        return "not an arithmetic op"
    out = val(node)
    if out is None or out.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"`{node.name}` computes in {None if out is None else out.dtype} (kernel: fp16/bf16/fp32)"
    if like is not None and out.dtype != like.dtype:
        return f"`{node.name}` changes dtype ({out.dtype} vs {like.dtype})"
    if set(node.kwargs) - _KWARGS_OK or not all(is_number(node.kwargs.get(k, 1)) for k in _KWARGS_OK):
        return f"`{node.name}` has arguments {dict(node.kwargs)}"
    ref = like if like is not None else out
    for a in node.args:
        if isinstance(a, fx.Node):
            t = val(a)
            if t is None:
                return f"`{node.name}` takes a non-tensor value `{a.name}`"
            if not broadcasts_into(t, ref):
                return f"an input of shape {shape_str(t)} does not broadcast into {shape_str(ref)} in `{node.name}`"
            if t.dtype != ref.dtype and not _promotes_away(node, t, ref):
                return f"`{node.name}` mixes dtypes ({t.dtype} and {ref.dtype})"
            if t.device != ref.device:
                return f"`{node.name}` mixes devices ({t.device} and {ref.device})"
        elif not is_number(a):
            return f"`{node.name}` takes the constant {a!r}"
    if node.target is aten.pow.Tensor_Scalar and not pow_exponent_ok(node.args[1]):
        return f"`{node.name}` raises to the power {node.args[1]!r} (kernel: integer or half powers up to 8)"
    if not broadcasts_into(out, ref):
        return f"`{node.name}` has shape {shape_str(out)}, which does not broadcast into {shape_str(ref)}"
    return None


def _promotes_away(node: fx.Node, t: torch.Tensor, ref: torch.Tensor) -> bool:
    """An input of another dtype that eager's type promotion casts to the chain's dtype before the op, so the
    fused op can take it through that same cast (inserted by the pass):
    - an integer or bool tensor (`a * mask_int64`): float wins by category, the op computes in `ref`'s dtype;
    - a 0-d float tensor of another float dtype (`a_bf16 * w_fp32_0d`, a scalar parameter): a dimensioned
      tensor of the same category decides."""
    if val(node).dtype != ref.dtype or t.is_complex():
        return False
    if not t.dtype.is_floating_point:
        return True
    if t.dim() != 0 or t.dtype == torch.float64:
        return False
    return any(isinstance(a, fx.Node) and val(a) is not None and val(a).dim() > 0 and val(a).dtype == ref.dtype
               for a in node.args)


_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_STRIDES_KNOWN = "flashfuse_strides_known"


def _reshape_of(node: Any) -> fx.Node | None:
    """x for a view / reshape of a contiguous x (the reshape then only renumbers the elements)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _VIEWS
            and isinstance(node.args[0], fx.Node)):
        return None
    x = val(node.args[0])
    # strides are trusted on values the re-trace computed (marked by normalize) and on those computed here by
    # fake execution, not on other passes' outputs (the attention op's layout is not P·V's)
    src = node.args[0]
    known = traced(src) or src.meta.get(_STRIDES_KNOWN) or src.op == "placeholder"
    return src if known and x is not None and x.is_contiguous() else None


def sink_reshapes(gm: fx.GraphModule) -> int:
    """Move reshapes of contiguous tensors out of pointwise chains, so the chain is one region:
    `op(x.view(s), y.view(s))` -> `op(x, y).view(s)` when x and y have one shape (elementwise ops commute
    with renumbering the elements), and `x.view(s).view(shape of x)` -> `x`. Each rewritten view has no other
    user, so nothing is computed twice."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _VIEWS and len(node.users) >= 1:  # x.view(s).view(x's shape) -> x
            inner = node.args[0]
            x = _reshape_of(inner)
            if x is not None and len(inner.users) == 1 and val(node) is not None \
                    and tuple(val(node).shape) == tuple(val(x).shape) and val(node).dtype == val(x).dtype:
                node.replace_all_uses_with(x)
                gm.graph.erase_node(node)
                gm.graph.erase_node(inner)
                changed += 1
            continue
        if node.target not in ARITHMETIC or node.kwargs.keys() - _KWARGS_OK:
            continue
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        sources = [_reshape_of(a) for a in tensors]
        if not tensors or any(src is None for src in sources) or any(len(a.users) != 1 for a in tensors) \
                or len(set(tensors)) != len(tensors):
            continue
        shapes = {tuple(val(src).shape) for src in sources}
        views = {tuple(val(a).shape) for a in tensors}
        out = val(node)
        if len(shapes) != 1 or len(views) != 1 or out is None or tuple(out.shape) != next(iter(views)):
            continue
        inner = insert_call(gm, node, node.target,
                            tuple(_reshape_of(a) if isinstance(a, fx.Node) else a for a in node.args),
                            dict(node.kwargs), like=node)
        outer = insert_call(gm, node, aten.reshape.default, (inner, list(out.shape)), like=node)
        inner.meta[_STRIDES_KNOWN] = outer.meta[_STRIDES_KNOWN] = True  # fake-executed by insert_call
        node.replace_all_uses_with(outer)
        gm.graph.erase_node(node)
        for a in tensors:
            gm.graph.erase_node(a)  # the views had no other user
        changed += 1
    if changed:
        gm.recompile()
    return changed


@register_pass(NAME)
def run(gm: fx.GraphModule, ctx: PassContext) -> int:
    from flashfuse.kernels import pointwise as pw

    enabled = kernel_fusions_enabled(ctx)
    if enabled:
        sink_reshapes(gm)
    order = order_of(gm)
    autocast = autocast_nodes(gm)
    done: set[fx.Node] = set()
    rewrites = 0

    def one(root: fx.Node) -> bool:
        nonlocal order, done
        if root in done or root.op != "call_function" or root.target not in ARITHMETIC:
            return False
        like = val(root)
        if _chain_reason(root, None) is not None:
            return False

        def absorb(p: fx.Node) -> str | None:
            if p in done:
                return "already fused"
            return _chain_reason(p, like)

        n_shared = [0]

        def shareable(p: fx.Node) -> bool:  # returned too, as an extra output of the root's shape
            pv = val(p)
            if pv is None or not same_shape(pv, like) or n_shared[0] + 1 >= MAX_OUTPUTS:
                return False
            n_shared[0] += 1
            return True

        region, rejected = grow_region(root, order, absorb, shareable=shareable)
        if len(region) < MIN_OPS:
            loose, _ = grow_region(root, order, lambda p: None if (
                p.op == "call_function" and p.target in ARITHMETIC and p not in done) else "x", private=False)
            reasons = [r for n, r in rejected.items() if n in loose]  # arithmetic ops that were left out
            if len(loose) >= MIN_OPS and reasons:
                reason = reasons[0]
                ctx.graph_report.add_near_miss(NAME, root, f"chain of {len(loose)} ops split: {reason}")
                done |= loose
            return False
        if in_autocast(autocast, region):
            ctx.graph_report.add_near_miss(NAME, root, AUTOCAST_NOTE)
            done |= region
            return False
        writer = write_between(gm, order, region, root)
        if writer is not None:
            ctx.graph_report.add_near_miss(NAME, root, f"`{writer.name}` writes in place inside the chain "
                                                       "(fused, the chain would read after the write)")
            done |= region
            return False
        shared = sorted((n for n in region if n is not root and any(u not in region for u in n.users)),
                        key=lambda n: order[n])
        leaves: dict[fx.Node, sympy.Symbol] = {}
        exprs = [to_sympy(n, region, leaves, ARITHMETIC, evaluate=False) for n in [root] + shared]
        if len(leaves) > MAX_INPUTS:
            ctx.graph_report.add_near_miss(NAME, root, f"chain reads {len(leaves)} tensors (max {MAX_INPUTS})")
            done |= region
            return False
        if not leaves or not all(pw.printable(e) for e in exprs):
            done |= region
            return False
        text = ";".join(pw.serialize(e) for e in exprs)
        done |= region
        if not enabled:
            ctx.graph_report.add_near_miss(NAME, root, INDUCTOR_NOTE)
            return False
        # leaves of another dtype (integer masks, 0-d floats): cast as eager's type promotion does (the kernel
        # takes one dtype)
        inputs = [leaf if val(leaf).dtype == like.dtype else
                  insert_call(gm, root, aten._to_copy.default, (leaf,), dict(dtype=like.dtype), like=root)
                  for leaf in leaves]
        fused = insert_call(gm, root, torch.ops.flashfuse.pointwise.default, (inputs, text), like=root)
        outs = [getitem(gm, fused, k) for k in range(len(exprs))]
        for k, s in enumerate(shared, start=1):  # their users outside the chain read the fused op's output
            s.replace_all_uses_with(outs[k], delete_user_cb=lambda u: u not in region)
        root.replace_all_uses_with(outs[0])
        also = f" (also returns {len(shared)} intermediate(s) used elsewhere)" if shared else ""
        ctx.graph_report.add_match(NAME, root, f"{len(region)} pointwise ops over {len(inputs)} tensors "
                                   f"-> one generated kernel{also}", ops=len(region), inputs=len(inputs),
                                   outputs=len(exprs), expr=text)
        erase_unused(gm, region)
        order = order_of(gm)
        return True

    for root in reversed(list(gm.graph.nodes)):
        if root in done or root.op != "call_function" or root.target not in ARITHMETIC:
            continue
        rewrites += guarded(ctx, NAME, root, lambda: one(root))
    return rewrites
