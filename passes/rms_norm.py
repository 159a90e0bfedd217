"""RMSNorm -> flashfuse::rms_norm.

Spellings: `aten.rms_norm` (nn.RMSNorm, F.rms_norm) and the hand-written forms
    xf = x.float()                                       (optional upcast; the kernel reads x itself)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)   |   x / sqrt(mean(x * x) + eps)
    y = weight * y.to(input_dtype)                       (LLaMA: the rounding before the weight is kept)
    weight * x * rsqrt(..)                               (weight first; `(w * x) * rsqrt(..)` in Python)
`x.pow(2).mean(-1).unsqueeze(-1)` counts as the keepdim mean (norm_match.restore_keepdim).
`x / (x.norm(2, -1, keepdim=True) * n**-0.5)` (or `/ (norm / sqrt(n))`) is the same with eps = 0: the 2-norm
scaled by 1/sqrt(n) is the root mean square.
Left alone, with the reason as a near-miss: eps outside the square root, statistics over another dim.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from flashfuse.passes import register_pass
from flashfuse.passes.eltwise_chain import insert_call
from flashfuse.passes.norm_match import (apply_norm, exact_copies, hand_written_tail, is_number, is_op, match_tail,
                                         parse_denominator, parse_scale, per_feature, reduce_dims, run_norm_pass,
                                         trailing_shape,
                                         scaling_uses, squared_input)
from flashfuse.passes.normalize import val

aten = torch.ops.aten
FUSION = "rms_norm"


@register_pass(FUSION)
def run(gm: fx.GraphModule, ctx) -> int:
    rms_op = getattr(aten, "rms_norm", None)  # older torch: no aten.rms_norm, only hand-written forms
    return run_norm_pass(gm, rms_op.default if rms_op is not None else None, lambda n: _library_form(gm, ctx, n),
                         lambda n: n.target in (aten.mean.dim, aten.linalg_vector_norm.default),
                         lambda n: _vector_norm(gm, ctx, n) if n.target is aten.linalg_vector_norm.default
                         else _hand_written(gm, ctx, n))


def _library_form(gm, ctx, node: fx.Node) -> int:
    args = list(node.args) + [None] * (4 - len(node.args))
    x, shape, weight, eps = args[0], args[1], node.kwargs.get("weight", args[2]), node.kwargs.get("eps", args[3])
    if not isinstance(x, fx.Node) or val(x) is None:
        return 0
    if eps is None:  # F.rms_norm's default: the machine epsilon of the type it computes in (fp32 for half inputs)
        dtype = val(x).dtype
        eps = torch.finfo(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype).eps
    if not is_number(eps):
        return 0
    feats = tuple(shape)
    if len(feats) != 1 and trailing_shape(x, list(range(val(x).dim() - len(feats), val(x).dim()))) != feats:
        ctx.graph_report.add_near_miss(FUSION, node, f"normalized over {len(feats)} trailing dims {list(feats)} "
                                                     "of symbolic size; the kernel normalizes one")
        return 0
    if weight is not None and not (isinstance(weight, fx.Node) and per_feature(weight, feats, val(x).shape)):
        return 0
    tail = match_tail(node, feats, val(node).shape, have_weight=weight is not None)
    if weight is not None:
        if tail.mid_dtype is not None:
            return 0
        tail.weight = weight
    tail.features = feats if len(feats) > 1 else ()
    return apply_norm(gm, ctx, FUSION, x, tail, float(eps), "aten.rms_norm", node)


def _is_centered(x: fx.Node) -> bool:
    """x = a - mean(a): a layer norm's business (the layer_norm pass runs first and says why not)."""
    return is_op(x, aten.sub.Tensor) and len(x.args) == 2 and is_op(x.args[1], aten.mean.dim) \
        and x.args[1].args[0] is x.args[0]


def _scaled_to_rms(norm: fx.Node):
    """The node `norm * n**-0.5` / `norm / n**0.5` of a `linalg_vector_norm(x, 2, dims, keepdim)` whose only
    user it is, with n the number of elements reduced: that value is sqrt(mean(x * x)). Else None."""
    args = list(norm.args) + [None] * (4 - len(norm.args))
    x, order, dims, keepdim = args[0], norm.kwargs.get("ord", args[1]), norm.kwargs.get("dim", args[2]), \
        norm.kwargs.get("keepdim", args[3])
    if set(norm.kwargs) - {"ord", "dim", "keepdim"} or order not in (2, 2.0) or not dims \
            or not all(isinstance(d, int) for d in dims) or len(norm.users) != 1 or val(x) is None \
            or not val(x).is_floating_point():
        return None
    size = math.prod(val(x).shape[d] for d in dims)
    user = next(iter(norm.users))
    if not isinstance(size, int) or not is_op(user, aten.mul.Tensor, aten.div.Tensor) or user.kwargs \
            or len(user.args) != 2 or val(user) is None or val(user).dtype != val(x).dtype:
        return None
    a, c = user.args
    if user.target is aten.mul.Tensor and c is norm:
        a, c = c, a
    if a is not norm or not is_number(c) or c <= 0:
        return None
    c2 = float(c) ** 2 * size if user.target is aten.mul.Tensor else size / float(c) ** 2
    return (user, x, list(dims), bool(keepdim)) if abs(c2 - 1.0) < 1e-9 else None


def _vector_norm(gm, ctx, norm: fx.Node) -> int:
    """`x / (||x|| * n**-0.5)`: try the hand-written matcher on sqrt(mean(x * x)) put in the scaled norm's
    place; if that does not fuse, put the user's nodes back (x * x in a half dtype could overflow where the
    norm does not)."""
    found = _scaled_to_rms(norm)
    if found is None:
        return 0
    scaled, x, dims, keepdim = found
    sq = insert_call(gm, scaled, aten.mul.Tensor, (x, x), like=scaled)
    ms = insert_call(gm, scaled, aten.mean.dim, (sq, dims, keepdim), like=scaled)
    root = insert_call(gm, scaled, aten.sqrt.default, (ms,), like=scaled)
    scaled.replace_all_uses_with(root)
    if _hand_written(gm, ctx, ms, "hand-written rms norm (x/(||x||*n^-0.5))"):
        return 1
    root.replace_all_uses_with(scaled)
    for node in (root, ms, sq):
        gm.graph.erase_node(node)
    return 0


def _hand_written(gm, ctx, ms: fx.Node, spelling: str | None = None) -> int:
    x = squared_input(ms.args[0])
    if not isinstance(x, fx.Node) or val(x) is None or _is_centered(x) or ms.kwargs.get("dtype") is not None:
        return 0
    found, reason = None, None
    dims, keepdim = reduce_dims(ms)
    feats = trailing_shape(x, dims) if dims else None
    # T5: the mean is of x.float() but the multiply is by x itself; Gemma writes x.float() twice
    # (exact either way: upcasting loses nothing)
    uses = [t for xa in exact_copies(x) for t in scaling_uses(xa, val(x).shape, features=feats)]
    for user, how, other, pre_weight in uses:
        parsed = parse_scale(other) if how == "mul" else parse_denominator(other)
        if isinstance(parsed, str):
            reason = reason or (user, parsed)
            continue
        if parsed is None or parsed[0] is not ms:
            continue
        found = (user, parsed[1], pre_weight)
        break
    if found is None:
        if reason is not None and (any(a is ms for a in _sqrt_args(reason[0])) or _reaches(reason[0], ms)):
            ctx.graph_report.add_near_miss(FUSION, reason[0], reason[1])
        return 0
    normed, eps, pre_weight = found
    tail = hand_written_tail(ctx, FUSION, x, dims, keepdim, normed, pre_weight, "mean of squares")
    if tail is None:
        return 0
    if spelling is None:
        spelling = ("hand-written rms norm (x*rsqrt" if normed.target is aten.mul.Tensor else
                    "hand-written rms norm (x/sqrt") + "(mean(x^2)+eps))"
    return apply_norm(gm, ctx, FUSION, x, tail, eps, spelling, normed)


def _reaches(node: fx.Node, target: fx.Node, depth: int = 4) -> bool:
    """`target` feeds `node` within `depth` steps (the divisor or scale is built from this mean of squares)."""
    frontier = [node]
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes]
        if target in frontier:
            return True
    return False


def _sqrt_args(div_node: fx.Node) -> list:
    """For `x / (sqrt(ms) + eps)`: [ms]."""
    d = div_node.args[1]
    return [a.args[0] for a in d.args if is_op(a, aten.sqrt.default)] if isinstance(d, fx.Node) else []
