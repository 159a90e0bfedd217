"""LayerNorm -> flashfuse::layer_norm.

Spellings: `aten.layer_norm` (nn.LayerNorm, F.layer_norm) and the hand-written form
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)  |  var(correction=0)  |  (x - mu).pow(2).mean(-1, keepdim=True)
    y = (x - mu) / sqrt(var + eps)  |  (x - mu) * rsqrt(var + eps)
    y = y * weight + bias                          (optional, either order of operands; casts around it)
`x.mean(-1).unsqueeze(-1)` / `[..., None]` count as the keepdim reductions (norm_match.restore_keepdim).
Left alone, with the reason as a near-miss: unbiased variance, eps outside the square root, statistics
over another dim than the last, mean and variance over different dims.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from flashfuse.passes import register_pass
from flashfuse.passes.norm_match import (Tail, aliases, apply_norm, dims_text, hand_written_tail, is_number, is_op,
                                         match_tail, parse_denominator, parse_scale, per_feature, reduce_dims,
                                         run_norm_pass, same_value, scaling_uses, squared_input, trailing_shape,
                                         var_mean_part)
from flashfuse.passes.normalize import val

aten = torch.ops.aten
FUSION = "layer_norm"


@register_pass(FUSION)
def run(gm: fx.GraphModule, ctx) -> int:
    return run_norm_pass(gm, aten.layer_norm.default, lambda n: _library_form(gm, ctx, n),
                         lambda n: n.target is aten.mean.dim or var_mean_part(n, 1) is not None,
                         lambda n: _hand_written(gm, ctx, n))


# ---------------------------------------------------------------------------------------------- aten.layer_norm
def _library_form(gm, ctx, node: fx.Node) -> int:
    args = list(node.args) + [None] * (6 - len(node.args))
    x, shape, weight, bias, eps = args[0], args[1], args[2], args[3], args[4]
    weight = node.kwargs.get("weight", weight)
    bias = node.kwargs.get("bias", bias)
    eps = node.kwargs.get("eps", eps)
    eps = 1e-5 if eps is None else eps
    if not isinstance(x, fx.Node) or not is_number(eps):
        return 0
    if len(shape) != 1:
        flat = _flatten_trailing(gm, node, x, list(shape), weight, bias, eps)
        if flat is None:
            ctx.graph_report.add_near_miss(FUSION, node, f"normalized over {len(shape)} trailing dims {list(shape)} "
                                                         "of symbolic size; the kernel normalizes one")
            return 0
        return _library_form(gm, ctx, flat)
    n = val(x).shape[-1]
    for p in (weight, bias):
        if p is not None and not (isinstance(p, fx.Node) and per_feature(p, n, val(x).shape)):
            return 0
    # the op's own affine is in; absorb an output cast (`F.layer_norm(x.float(), ...).type_as(x)`) or,
    # without an affine, a weight/bias written after it
    tail = match_tail(node, n, val(node).shape, have_weight=weight is not None, have_bias=bias is not None)
    tail.weight = weight if weight is not None else tail.weight
    tail.bias = bias if bias is not None else tail.bias
    if (weight is not None or bias is not None) and tail.mid_dtype is not None:
        tail = Tail(node, weight, bias)  # a rounding after the op's own affine: keep the tail outside
    return apply_norm(gm, ctx, FUSION, x, tail, float(eps), "aten.layer_norm", node)


def _flatten_trailing(gm, node: fx.Node, x: fx.Node, shape: list, weight, bias, eps) -> fx.Node | None:
    """`layer_norm(x, [A, B], w, b)` as `layer_norm(x.reshape(.., A*B), [A*B], w.reshape(-1), b.reshape(-1))`
    viewed back: the same statistics over the same elements. Returns the new layer_norm node (its users are
    the view back) or None when a size is symbolic."""
    from flashfuse.passes.eltwise_chain import insert_call

    if not all(isinstance(d, int) for d in shape):
        return None
    n = 1
    for d in shape:
        n *= d
    lead = list(val(x).shape[:-len(shape)])
    x2 = insert_call(gm, node, aten.reshape.default, (x, [*lead, n]), like=node)
    w2, b2 = (insert_call(gm, node, aten.reshape.default, (p, [n]), like=node) if isinstance(p, fx.Node) else p
              for p in (weight, bias))
    ln = insert_call(gm, node, aten.layer_norm.default, (x2, [n], w2, b2, float(eps)), like=node)
    back = insert_call(gm, node, aten.reshape.default, (ln, list(val(node).shape)), like=node)
    node.replace_all_uses_with(back)
    return ln


# ---------------------------------------------------------------------------------------------- hand-written
def _centered(mu: fx.Node, x: fx.Node) -> list[fx.Node]:
    """Every `x - mu` (Dynamo does not merge repeated subexpressions; x may appear through a no-op cast)."""
    return [u for m in aliases(mu) for u in m.users if is_op(u, aten.sub.Tensor) and len(u.args) == 2
            and not u.kwargs and same_value(u.args[0], x) and u.args[1] is m]


def _variance_reason(v, x: fx.Node, cs: list[fx.Node], dims, keepdim, mu: fx.Node | None = None) -> str | None:
    """None when v is the biased variance of x over `dims`; otherwise why it is not."""
    v = var_mean_part(v, 0) or v
    one_pass = False
    if mu is not None and is_op(v, aten.sub.Tensor) and len(v.args) == 2 and not v.kwargs:
        # one-pass statistics E[x^2] - E[x]^2: the same variance, which the kernel computes about the mean
        # (it does not cancel the way the spelled difference does when |mean| >> std)
        sq_mean, mu_sq = v.args
        if is_op(sq_mean, aten.mean.dim) and sq_mean.kwargs.get("dtype") is None \
                and same_value(squared_input(sq_mean.args[0], copies=lambda a: [a]), x) \
                and squared_input(mu_sq, copies=lambda a: [a]) is mu:
            v, one_pass = sq_mean, True
    root = squared_input(v, copies=lambda a: [a])  # std * std: the same node twice
    if root is not None and is_op(root, aten.std.dim, aten.std.correction):
        v = root  # std(x)**2: the variance, up to a rounding of the square root; same checks as var
    if is_op(v, aten.var.dim, aten.var.correction, aten.var_mean.dim, aten.var_mean.correction, aten.std.dim,
             aten.std.correction):
        if not (same_value(v.args[0], x) or v.args[0] in cs):  # var(x - mean) == var(x)
            return "the variance is of another tensor than the mean"
        if v.target in (aten.var.correction, aten.var_mean.correction, aten.std.correction):
            corr = v.kwargs.get("correction", 1)
            corr = 1 if corr is None else corr
        else:
            unbiased = v.args[2] if len(v.args) > 2 else v.kwargs.get("unbiased", True)
            corr = 1 if unbiased else 0
        if corr != 0:
            return (f"unbiased variance (correction={corr}): layer norm divides by N, not N-{corr}; "
                    "use var(unbiased=False) or correction=0")
    elif is_op(v, aten.mean.dim):
        if squared_input(v.args[0], copies=lambda a: cs) not in cs \
                and not one_pass:
            return "the divisor is not built from the variance of x about its mean"
        if v.kwargs.get("dtype") is not None:
            return "the variance's mean has a dtype argument"
    else:
        return "the divisor is not built from the variance of x about its mean"
    vdims, vkeep = reduce_dims(v)
    if vdims != dims:
        return f"mean over {dims_text(dims)} but variance over {dims_text(vdims)}: statistics over different axes"
    rank = val(x).dim()
    if trailing_shape(x, vdims) is None:  # the axis first: over dim 0 it is a BatchNorm-like function
        return f"statistics over {dims_text(vdims)} of a {rank}-d tensor, not the last dim(s) the kernel normalizes"
    if not vkeep:
        return "the variance is reduced without keepdim"
    return None


def _hand_written(gm, ctx, mu: fx.Node) -> int:
    vm = var_mean_part(mu, 1)
    x = vm.args[0] if vm is not None else mu.args[0]
    if not isinstance(x, fx.Node) or val(x) is None or mu.kwargs.get("dtype") is not None:
        return 0
    cs = _centered(mu, x)
    if not cs:
        return 0  # not a centering mean (maybe an RMSNorm's mean of squares)
    dims, keepdim = reduce_dims(mu)
    reasons, found = [], []
    for c in cs:
        feats = trailing_shape(x, dims) if dims else None
        for user, how, other, pre_weight in scaling_uses(c, val(x).shape, skip=cs, features=feats):
            parsed = parse_scale(other) if how == "mul" else parse_denominator(other)
            if parsed is None:
                continue
            if isinstance(parsed, str):
                reasons.append((user, parsed))
                continue
            v, eps = parsed
            why = _variance_reason(v, x, cs, dims, keepdim, mu)
            if why is not None:
                reasons.append((user, why))
                continue
            found.append((user, eps, pre_weight))
    for user, why in reasons:
        ctx.graph_report.add_near_miss(FUSION, user, why)
    return sum(_fuse_one(gm, ctx, x, dims, keepdim, normed, eps, w) for normed, eps, w in found)


def _fuse_one(gm, ctx, x, dims, keepdim, normed, eps, pre_weight=None) -> int:
    tail = hand_written_tail(ctx, FUSION, x, dims, keepdim, normed, pre_weight, "mean")
    if tail is None:
        return 0
    spelling = "hand-written layer norm (" + ("x-mu)*rsqrt" if normed.target is aten.mul.Tensor else "x-mu)/sqrt") \
        + "(var+eps)"
    return apply_norm(gm, ctx, FUSION, x, tail, eps, spelling, normed)
