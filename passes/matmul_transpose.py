"""Matmul + transpose folding: `a @ b.transpose(-2, -1).contiguous()` (also `permute`, `.t()`, `.mT`,
`.clone()`) -> `a @ b.transpose(-2, -1)`: the copy is removed and the matmul reads the strided view.

A pure graph simplification (no kernel of ours): it applies under every remainder and norm_policy.
It is done only when provably the same values and no copy comes back inside the matmul:
- the copy (`contiguous` / `clone`) feeds only matmuls (`matmul`, `mm`, `bmm`);
- nothing between the copy and its last matmul writes to memory in place (the view would see it);
- the strided operand is one BLAS reads directly: one of its two matrix dims has stride 1 and its
  batch dims collapse into one batch stride, with both operands' batch shapes equal (a broadcast
  batch or a 2-D operand against a batched one makes `matmul` reshape, i.e. copy, it itself).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from flashfuse.passes import PassContext, grad_mode, register_pass
from flashfuse.passes.eltwise_chain import guarded, known_equal, mutates, order_of, shape_str
from flashfuse.passes.normalize import val

aten = torch.ops.aten
NAME = "matmul_transpose"
MATMULS = (aten.matmul.default, aten.mm.default, aten.bmm.default)
# `W.T` of a 2-D tensor reaches the pre-dispatch graph as aten.numpy_T (a permute view)
VIEWS = (aten.transpose.int, aten.permute.default, aten.t.default, aten.mT.default, aten.numpy_T.default,
         aten.swapaxes.default, aten.swapdims.default, aten.movedim.int)


def _is_copy(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is aten.contiguous.default:
        fmt = node.kwargs.get("memory_format", node.args[1] if len(node.args) > 1 else torch.contiguous_format)
        return fmt == torch.contiguous_format
    if node.target is aten.clone.default:
        fmt = node.kwargs.get("memory_format", None)
        return fmt in (None, torch.contiguous_format, torch.preserve_format) and len(node.args) == 1
    return False


def _collapses(t: torch.Tensor, upto: int) -> bool:
    """Dims [0, upto) of t merge into one strided dim (a view, no copy), ignoring size-1 dims."""
    dims = [(s, d) for s, d in zip(t.stride()[:upto], t.shape[:upto]) if not known_equal(d, 1)]
    return all(known_equal(s0, s1 * d1) for (s0, _), (s1, d1) in zip(dims, dims[1:]))


def blas_reason(t: torch.Tensor, other: torch.Tensor, t_is_second: bool) -> str | None:
    """None if a matmul reads `t` (strided) against `other` without copying it; else why not."""
    if t.dim() < 2 or other.dim() < 2:
        return "a 1-D operand (matmul reshapes it)"
    st = tuple(t.stride())
    if not (known_equal(st[-1], 1) or known_equal(st[-2], 1)):
        return f"neither matrix dim has stride 1 (strides {st})"
    if t.dim() == 2 and other.dim() == 2:
        return None
    if t.dim() == 2 and t_is_second and _collapses(other, other.dim() - 1):
        return None  # `x @ W`: matmul folds x's batch into its rows and calls mm on the strided W
    if t.dim() != other.dim() or not all(known_equal(a, b) for a, b in zip(t.shape[:-2], other.shape[:-2])):
        return (f"batch shapes {shape_str(t)} and {shape_str(other)} differ (matmul broadcasts or folds, "
                "which copies the strided operand)")
    if not _collapses(t, t.dim() - 2):
        return f"its batch dims do not collapse into one stride (strides {st}), so matmul would copy it"
    return None


@register_pass(NAME)
def run(gm: fx.GraphModule, ctx: PassContext) -> int:
    order = order_of(gm)

    def one(copy: fx.Node) -> bool:
        view = copy.args[0]
        if not isinstance(view, fx.Node) or view.op != "call_function" or view.target not in VIEWS:
            return False
        # a grad-mode boundary between the copy and its matmuls is kept: the view it will carry is made in the
        # copy's grad mode (no boundary between view and copy), so it is exactly as differentiable as the copy
        boundaries = [u for u in copy.users if grad_mode.is_boundary(u)]
        users = [u for u in copy.users if u not in boundaries] + [u for b in boundaries for u in b.users]
        mm_users = [u for u in users if u.op == "call_function" and u.target in MATMULS]
        if not mm_users:
            return False
        if len(mm_users) != len(users):
            other = next(u for u in users if u not in mm_users)
            ctx.graph_report.add_near_miss(NAME, copy, f"the copy `{copy.name}` of a transpose feeds a matmul but "
                                                       f"is also used by `{other.name}`")
            return False
        last = max(order[u] for u in mm_users)
        writer = next((n for n in gm.graph.nodes if order[copy] < order[n] < last and mutates(n)), None)
        if writer is not None:
            ctx.graph_report.add_near_miss(NAME, copy, f"`{writer.name}` writes in place between the copy and "
                                                       "the matmul (the view would see the write)")
            return False
        vv = val(view)
        reason = None
        for mm in mm_users:
            for i, arg in enumerate(mm.args[:2]):
                if arg is copy:
                    other = mm.args[1 - i]
                    ov = val(other) if isinstance(other, fx.Node) else None
                    reason = reason or (blas_reason(vv, ov, i == 1) if ov is not None else "the other operand is unknown")
        if reason is not None:
            ctx.graph_report.add_near_miss(NAME, copy, f"transpose kept as a copy: {reason}")
            return False
        for mm in mm_users:
            mm.args = tuple(view if a is copy else a for a in mm.args)
        for b in boundaries:
            b.args = (view,)
        ctx.graph_report.add_match(NAME, copy, f"{view.target.__name__.split('.')[0]} + {copy.target.__name__.split('.')[0]} "
                                   f"feeding {len(mm_users)} matmul(s) read as strides: copy of "
                                   f"{shape_str(vv)} removed", shape=shape_str(vv))
        gm.graph.erase_node(copy)
        return True

    rewrites = 0
    for copy in list(gm.graph.nodes):
        if _is_copy(copy):
            rewrites += guarded(ctx, NAME, copy, lambda: one(copy))
    return rewrites
