"""Residual add + norm -> flashfuse::add_layer_norm / flashfuse::add_rms_norm.

    h = x + y          (same shape and dtype, no broadcast)
    out = norm(h)      (already turned into flashfuse::layer_norm / rms_norm by the norm passes)
    ... h used later (the residual stream) ...
becomes one kernel that reads x and y once and writes both h and out. Runs after the norm passes.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from flashfuse.passes import register_pass
from flashfuse.passes.norm_match import (choose, insert_call, insert_getitem, is_op, needs_grad, norm_op,
                                         producer_inductor_fuses)
from flashfuse.passes.normalize import val

aten = torch.ops.aten
FUSION = "residual_norm"


@register_pass(FUSION)
def run(gm: fx.GraphModule, ctx) -> int:
    import flashfuse.kernels.norms  # noqa: F401

    norms = {torch.ops.flashfuse.layer_norm.default: "add_layer_norm",
             torch.ops.flashfuse.rms_norm.default: "add_rms_norm"}
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in norms:
            count += _fuse(gm, ctx, node, norms[node.target])
    if count:
        gm.graph.eliminate_dead_code()  # the pipeline recompiles after each pass that rewrote
    return count


def _fuse(gm, ctx, norm: fx.Node, kind: str) -> int:
    h, weight, bias, eps, mid_dtype, out_dtype = norm.args
    flat = None  # a norm over several trailing dims runs on h flattened to one (layer_norm._flatten_trailing)
    if is_op(h, aten.reshape.default) and len(h.users) == 1 and is_op(h.args[0], aten.add.Tensor):
        flat, h = h, h.args[0]
        if not all(isinstance(d, int) for d in val(h).shape):  # h's shape to view back: static sizes only
            return 0
    if not (is_op(h, aten.add.Tensor) and len(h.args) == 2 and not h.kwargs):
        return 0
    a, b = h.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return 0
    hv, av, bv = val(h), val(a), val(b)
    if av is None or bv is None:
        return 0
    if tuple(av.shape) != tuple(hv.shape) or tuple(bv.shape) != tuple(hv.shape):
        ctx.graph_report.add_near_miss(FUSION, h, f"the residual add broadcasts {tuple(av.shape)} + {tuple(bv.shape)}; "
                                                  "the kernel adds two tensors of the same shape")
        return 0
    if av.dtype != hv.dtype or bv.dtype != hv.dtype:
        ctx.graph_report.add_near_miss(FUSION, h, f"the residual add mixes dtypes {av.dtype} + {bv.dtype}")
        return 0
    # The fused op writes h where the add stood, so every other user of h can read it; the norm's other
    # inputs (weight, bias, a run-time eps) must be ready there: hoist their pure producers above it.
    params = [p for p in (weight, bias, eps) if isinstance(p, fx.Node)]
    if any(_depends_on(p, h) for p in params):
        ctx.graph_report.add_near_miss(FUSION, h, "the norm's weight/bias/eps is computed from h itself")
        return 0
    ok, reason = choose(ctx, kind, hv.shape[-1], needs_grad(a, b, weight, bias), producer_inductor_fuses(h))
    if not ok:
        ctx.graph_report.add_near_miss(FUSION, h, reason)
        return 0
    # above h itself: a producer may be h.next (Gemma's `1 + weight` cast right after the add)
    if not all(_hoist_before(p, h) for p in params):
        ctx.graph_report.add_near_miss(FUSION, h, "the norm's weight/bias/eps is computed by an impure op after "
                                                  "h = x + y and cannot be moved before it")
        return 0
    anchor = h.next
    others = len(h.users) - 1
    if flat is not None:  # the same flattening of both terms (views when they are contiguous)
        a, b = (insert_call(gm.graph, anchor, aten.reshape.default, [t, flat.args[1]], flat) for t in (a, b))
    fused = insert_call(gm.graph, anchor, norm_op(kind), [a, b, weight, bias, eps, mid_dtype, out_dtype], norm)
    h_new = insert_getitem(gm.graph, fused, 1)
    y = insert_getitem(gm.graph, fused, 0)
    norm.replace_all_uses_with(y)
    gm.graph.erase_node(norm)
    if flat is not None:  # h's other users read it in its own shape
        gm.graph.erase_node(flat)
        h_new = insert_call(gm.graph, anchor, aten.reshape.default, [h_new, list(hv.shape)], h)
    h.replace_all_uses_with(h_new)
    used = f"h also used by {others} later op(s)" if others else "h not used elsewhere"
    text = f"flashfuse::{kind}: residual add fused into the norm ({used})"
    if ctx.config.remainder != "eager":
        text += f" [{reason}]"
    ctx.graph_report.add_match(FUSION, h, text, policy=reason, kind=kind)
    return 1


def _depends_on(node: fx.Node, target: fx.Node) -> bool:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is target:
            return True
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def _before(a: fx.Node, b: fx.Node) -> bool:
    """Whether a comes before b in the graph."""
    n = a
    while n.op != "root":
        if n is b:
            return True
        n = n.next
    return False


def _hoist_before(node: fx.Node, anchor: fx.Node) -> bool:
    """Move `node` and whatever it needs above `anchor` (pure ops only). True when it is there now."""
    if node.op in ("placeholder", "get_attr") or not _before(anchor, node):
        return True
    if node.op != "call_function" or node.is_impure():
        return False
    if not all(_hoist_before(i, anchor) for i in node.all_input_nodes):
        return False
    anchor.prepend(node)
    return True
