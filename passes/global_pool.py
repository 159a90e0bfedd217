"""Reduction -> global pooling: `x.mean(-1).mean(-1)` (any number of steps), `x.sum(-1).sum(-1)`,
`x.sum(-1).sum(-1) / (H*W)` and the keepdim forms -> one `aten.mean.dim` / `aten.sum.dim_IntList` over
all the reduced dims at once (one reduction kernel instead of one per step). `x.amax(-1).amax(-1)` (and
amin) -> one amax when no gradient is needed (see TIES_NOTE).

A pure graph simplification: it applies under every remainder and norm_policy. Conditions:
- every step is a mean or a sum with no dtype argument (steps that differ in keepdim become one reduction
  and a view to the chain's output shape; sums mixed with means fuse when the divisions make one mean);
- each intermediate has no other user;
- the reduced dims, in the coordinates of the original input, are adjacent (a pooling over one
  block of dims, such as the trailing spatial dims);
- `sum / n` (or `/ H / W`, `* (1 / n)`) becomes a mean only when the divisors provably multiply to the
  number of summed elements.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from flashfuse.passes import PassContext, register_pass
from flashfuse.passes.eltwise_chain import (autocast_nodes, erase_unused, guarded, in_autocast, insert_call, known_equal,
                                            order_of, write_between)
from flashfuse.passes.normalize import requires_grad, val

aten = torch.ops.aten
NAME = "global_pool"
REDUCTIONS = {aten.mean.dim: "mean", aten.sum.dim_IntList: "sum", aten.amax.default: "amax",
              aten.amin.default: "amin"}
EXTREMA = {"amax": aten.amax.default, "amin": aten.amin.default}
# amax(amax(x, -1), -1) has amax(x, (-2, -1))'s value exactly, but not its gradient where the maximum is tied:
# each step splits among its own ties (1/2 · 1/2 for two tied rows with two ties in one of them), one amax among
# all ties (1/3)
TIES_NOTE = ("an amax/amin chain whose input needs a gradient: one reduction would split the gradient among tied "
             "extrema differently from the steps; left as separate reductions (fused when no gradient is needed)")


def _step(node: fx.Node):
    """(kind, input, dims, keepdim) of a reduction node, or None."""
    if node.op != "call_function" or node.target not in REDUCTIONS:
        return None
    args = list(node.args) + [None] * 3
    x, dims = args[0], args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.kwargs.get("keepdim", args[2] if args[2] is not None else False)
    if node.kwargs.get("dtype") is not None or len(node.args) > 3 or not isinstance(x, fx.Node):
        return None
    xv = val(x)
    if xv is None or dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return None  # dims None / [] reduce everything: not a pooling step
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        return None
    rank = xv.dim()
    return REDUCTIONS[node.target], x, sorted(d % rank for d in dims), bool(keepdim)


def _chain(node: fx.Node):
    """The reductions ending at `node`, outermost last: [(node, kind, dims, keepdim)], or a near-miss."""
    first = _step(node)
    if first is None:
        return None, None
    steps = [node]
    cur = first
    while True:
        inner = cur[1]
        prev = _step(inner) if isinstance(inner, fx.Node) else None
        if prev is None:
            break
        if len(inner.users) != 1:
            return None, (inner, f"the intermediate {prev[0]} `{inner.name}` is also used by "
                                 f"`{next(u for u in inner.users if u is not steps[-1]).name}`")
        steps.append(inner)
        cur = prev
    if len(steps) < 2:
        return None, None
    steps.reverse()              # innermost first
    base = _step(steps[0])[1]
    rank = val(base).dim()
    removed: set[int] = set()
    current = list(range(rank))  # the original dim behind each dim of the current tensor
    keepdims = set()
    for s in steps:
        _, _, dims, keepdim = _step(s)
        removed |= {current[d] for d in dims}
        if not keepdim:
            current = [m for i, m in enumerate(current) if i not in dims]
        keepdims.add(keepdim)
    removed = sorted(removed)
    if removed != list(range(removed[0], removed[-1] + 1)):
        return None, (node, f"reduces dims {tuple(removed)} of the input, which are not adjacent: not a pooling "
                            "over one block of dims; left as separate reductions")
    # mixed keepdim: one reduction without keepdim, then a view to the chain's own output shape
    kinds = {_step(s)[0] for s in steps}
    if len(kinds) > 1 and kinds - {"sum", "mean"}:
        return None, None  # an amax / amin mixed with other reductions: a different function per step
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    return (base, kind, removed, keepdims.pop() if len(keepdims) == 1 else None, steps), None


def _mean_step_sizes(steps: list[fx.Node]):
    """The product of the sizes that the chain's mean steps divide by (1 with none)."""
    factor = 1
    for s in steps:
        kind, x, dims, _ = _step(s)
        if kind == "mean":
            for d in dims:
                factor = factor * val(x).shape[d]
    return factor


def _mean_end(node: fx.Node, base: fx.Node, dims: list[int], divisor=1) -> fx.Node | None:
    """The last of the divisions (and multiplications by a reciprocal) by numbers that follow the sum `node`
    and together divide by the number of summed elements: `/ (H*W)`, `/ H / W`, `* (1 / (H*W))`. None if
    there is no such chain."""
    count = 1
    for d in dims:
        count = count * val(base).shape[d]
    cur, exact = node, True
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        if u.op != "call_function" or u.kwargs or len(u.args) != 2 or u.args[0] is not cur:
            return None
        n = u.args[1].meta.get("val") if isinstance(u.args[1], fx.Node) else u.args[1]
        if n is None or isinstance(n, (torch.Tensor, bool)):
            return None
        if u.target in (aten.div.Tensor, aten.div.Scalar):
            divisor = divisor * n
        elif u.target in (aten.mul.Tensor, aten.mul.Scalar) and isinstance(n, float) and n > 0:
            divisor, exact = divisor / n, False  # a reciprocal: equal up to its rounding
        else:
            return None
        cur = u
        if exact and known_equal(divisor, count):
            return cur
        if not exact and isinstance(count, int) and abs(divisor - count) <= 1e-9 * count:
            return cur
    return None


@register_pass(NAME)
def run(gm: fx.GraphModule, ctx: PassContext) -> int:
    reported: set = set()
    done: set = set()

    def one(node: fx.Node) -> bool:
        found, miss = _chain(node)
        if miss is not None:
            where, reason = miss
            if where not in reported:
                ctx.graph_report.add_near_miss(NAME, where, reason)
                reported.add(where)
            return False
        if found is None:
            return False
        base, kind, dims, keepdim, steps = found
        writer = write_between(gm, order_of(gm), steps, node)
        if writer is not None:
            ctx.graph_report.add_near_miss(NAME, node, f"`{writer.name}` writes in place between the reductions")
            return False
        root = node
        bv = val(base)
        # under autocast sum runs in fp32 and mean in the input dtype: sum/n -> mean would change the dtype
        # a sum chain (or sums mixed with means, which divide by their own sizes: `sum(-1) / W` may reach here
        # as a mean) followed by divisions that complete the count is a mean
        if kind in ("sum", "mixed") and bv.dtype.is_floating_point and not in_autocast(autocast_nodes(gm), steps):
            end = _mean_end(node, base, dims, _mean_step_sizes(steps))
            if end is not None and val(end) is not None and val(end).dtype == bv.dtype:
                kind, root = "mean", end
        if kind == "mixed":
            return False  # sums and means whose divisions do not add up to one mean: left as written
        if kind in EXTREMA and requires_grad(base):
            ctx.graph_report.add_near_miss(NAME, node, TIES_NOTE)
            return False
        target = EXTREMA.get(kind) or (aten.mean.dim if kind == "mean" else aten.sum.dim_IntList)
        if keepdim is None:
            flat = insert_call(gm, root, target, (base, list(dims), False), like=root)
            new = insert_call(gm, root, aten.reshape.default, (flat, list(val(root).shape)), like=root)
        else:
            new = insert_call(gm, root, target, (base, list(dims), keepdim), like=root)
        root.replace_all_uses_with(new)
        what = f"{len(steps)} reduction steps" + (" and the division by their size" if root is not node else "")
        ctx.graph_report.add_match(NAME, root, f"{what} -> one {kind} over dims {tuple(dims)}", dims=tuple(dims),
                                   kind=kind, steps=len(steps))
        done.update(steps)
        erase_unused(gm, [root] + steps)
        return True

    rewrites = 0
    for node in reversed(list(gm.graph.nodes)):
        if node not in done and node.op == "call_function" and node.target in REDUCTIONS:
            rewrites += guarded(ctx, NAME, node, lambda: one(node))
    return rewrites
