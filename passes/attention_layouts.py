"""Attention layouts the attention pass does not read directly, rewritten before it runs into ones it does,
with the same arithmetic. Only around a softmax, so other matmuls are left as written.

Heads folded into the batch (BLOOM, fairseq, torch's MHA internals): the scores come from a 3-D
`bmm`/`baddbmm` on (B*H, M, K) and are viewed to (B, H, M, N) for the mask and the softmax, and the
probabilities are viewed back to (B*H, M, N) for the `bmm` with V:

    view(bmm(a, b), (B, H, M, N))                 -> matmul(a.reshape(B, H, M, K), b.reshape(B, H, K, N))
    view(bmm(a, b) / c, (B, H, M, N))             -> matmul(...) / c    (numbers only between them)
    view(baddbmm(c, a, b, beta, alpha), (B, H..)) -> alpha * matmul(...) + beta * c.reshape(B, H, ...)
    bmm(view(P, (B*H, M, N)), v)                  -> matmul(P, v.reshape(B, H, N, D)).reshape(B*H, M, D)

Scores viewed to 4-D for the mask and back to 3-D for the softmax (XGLM): the softmax over the last dim runs
on the 4-D scores and the view moves after it, past the casts and dropout that follow (the same numbers:
the view only merges leading dims):

    softmax(view(S (B, H, M, N), (B*H, M, N)))    -> view(softmax(S), (B*H, M, N))

A view of the probabilities to 4-D and straight back (fairseq, XGLM) is dropped:

    view(view(P, (B, H, M, N)), (B*H, M, N))      -> P

A scale of the probabilities constant along the keys (HF's `head_mask`, (1, H, 1, 1)) moves after P·V, where
it scales the output rows instead (exact in real arithmetic):

    matmul(P * m, v)  with m (..., 1)             -> matmul(P, v) * m

Scores by a linear layer without bias against a shared (M, d) memory:

    linear(x, W)  (softmax downstream)            -> matmul(x, W.t())

Scores of an einsum whose output does not end in (queries, keys), the softmax over the keys' dim: the einsum
writes the canonical order, the softmax runs on its last dim, and the permutation back is folded into the P·V
einsum's subscripts:

    softmax(einsum('bqhd,bkhd->bqkh'), 2)         -> permute(softmax(einsum('bqhd,bkhd->bhqk'), -1), ..)
    einsum('bqkh,bkhd->bqhd', permute(P, ..), v)  -> einsum('bhqk,bkhd->bqhd', P, v)

A mask per window added in a 5-D view of the scores that splits the batch into (batch, windows) and views back
(Swin as Microsoft and timm write it): the mask is broadcast and folded into the batch instead, a small copy
of (B * nW, Hm, N, N) elements (Hm = the mask's heads, usually 1), and the add runs on the 4-D scores:

    view(view(S, (b, nW, H, N, N)) + M, (b * nW, H, N, N)) -> S + M.expand(b, nW, Hm, N, N).reshape(b * nW, Hm, N, N)

Probabilities on the right (SAGAN / BigGAN self-attention, output (B, C, N)):

    bmm(v, P.permute(0, 2, 1))                    -> matmul(P, v.transpose(-2, -1)).transpose(-2, -1)
"""
from __future__ import annotations

import torch
import torch.fx as fx

from flashfuse.passes.attention import SOFTMAX_OPS, _parse_einsum, downstream
from flashfuse.passes.eltwise_chain import insert_call, known_equal, same_shape
from flashfuse.passes.normalize import val

aten = torch.ops.aten
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# between a softmax and the probabilities' view: ops that keep the values (casts, dropout)
KEEPS_VALUES = {aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default,
                aten.alias.default, aten.type_as.default, aten.detach.default, aten.dropout.default}


def _call(gm: fx.GraphModule, before: fx.Node, target, *args, **kwargs) -> fx.Node:
    """A node computing target(*args, **kwargs) before `before`, with its fake value (eltwise_chain.insert_call)."""
    return insert_call(gm, before, target, args, kwargs)


def _split_heads(view: fx.Node, folded: fx.Node):
    """(B, H) when `view` turns `folded` (G, M, N) into (B, H, M, N) with B * H == G; else None."""
    src, out = val(folded), val(view)
    if src is None or out is None or src.dim() != 3 or out.dim() != 4:
        return None
    if not (known_equal(out.shape[0] * out.shape[1], src.shape[0]) and known_equal(out.shape[2], src.shape[1])
            and known_equal(out.shape[3], src.shape[2])):
        return None
    return out.shape[0], out.shape[1]


def _feeds_softmax(node: fx.Node, limit: int = 48) -> bool:
    """A softmax within `limit` nodes downstream (through any ops: the attention pass decides the rest)."""
    return downstream(node, lambda u: u.op == "call_function" and u.target in SOFTMAX_OPS, limit)


def _from_softmax(node: fx.Node) -> bool:
    """Probabilities: a softmax, through value-keeping ops and a zero fill (DeBERTa's XSoftmax, checked by the
    attention pass)."""
    while node.op == "call_function" and (node.target in KEEPS_VALUES or (
            node.target is aten.masked_fill.Scalar and node.args[2] == 0 and isinstance(node.args[0], fx.Node))):
        node = node.args[0]
    return node.op == "call_function" and node.target in SOFTMAX_OPS


def rewrite_layouts(gm: fx.GraphModule) -> int:
    """Rewrite the spots above; returns how many were rewritten."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function":
            changed += _round_trip_view(gm, node) or _scores_by_linear(gm, node) or _scores_viewed_to_4d(gm, node) or \
                _einsum_scores_keys_not_last(gm, node) or _permuted_probabilities_in_einsum(gm, node) or \
                _softmax_of_scores_viewed_to_3d(gm, node) or _probabilities_viewed_to_3d(gm, node) or \
                _probabilities_on_the_right(gm, node) or _row_scale_after_pv(gm, node) or _window_mask_in_5d_view(gm, node)
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return changed


def _window_mask_in_5d_view(gm, node: fx.Node) -> int:
    """view(view(x, (b, nW, H, N, N)) + M, x's shape) with x (b * nW, H, N, N), a softmax downstream:
    x + M folded into x's batch (M[i // nW, i % nW] for batch i, as the 5-D broadcast reads it)."""
    if node.target not in VIEWS or not isinstance(node.args[0], fx.Node):
        return 0
    add = node.args[0]
    if add.target is not aten.add.Tensor or add.kwargs or len(add.users) != 1 or len(add.args) != 2:
        return 0
    split = next((a for a in add.args if isinstance(a, fx.Node) and a.target in VIEWS and len(a.users) == 1
                  and isinstance(a.args[0], fx.Node)), None)
    mask = next((a for a in add.args if a is not split), None)
    if split is None or not isinstance(mask, fx.Node):
        return 0
    x, m, s5, out = val(split.args[0]), val(mask), val(split), val(node)
    if any(t is None for t in (x, m, s5, out)) or x.dim() != 4 or s5.dim() != 5 or m.dim() > 5 \
            or not x.is_floating_point() or val(add).dtype != x.dtype:
        return 0
    b, nw = s5.shape[0], s5.shape[1]
    if not (same_shape(out, x) and all(known_equal(i, j) for i, j in zip(s5.shape[2:], x.shape[1:]))
            and known_equal(b * nw, x.shape[0]) and same_shape(val(add), s5)):
        return 0
    m5 = (1,) * (5 - m.dim()) + tuple(m.shape)
    if not all(known_equal(d, 1) or known_equal(d, full) for d, full in zip(m5, s5.shape)):
        return 0
    if not _feeds_softmax(node, limit=8):
        return 0
    heads = m5[2]
    m_5d = _call(gm, node, aten.reshape.default, mask, list(m5))
    wide = _call(gm, node, aten.expand.default, m_5d, [b, nw, heads, s5.shape[3], s5.shape[4]])
    folded = _call(gm, node, aten.reshape.default, wide, [x.shape[0], heads, s5.shape[3], s5.shape[4]])
    args = (split.args[0], folded) if add.args[0] is split else (folded, split.args[0])
    node.replace_all_uses_with(_call(gm, node, aten.add.Tensor, *args))
    return 1


def _scores_by_linear(gm, node: fx.Node) -> int:
    """linear(x, W) with no bias and a 2-D W, a softmax downstream: x @ W.t() (the scores against a memory)."""
    if node.target is not aten.linear.default or not isinstance(node.args[1], fx.Node) or node.kwargs:
        return 0
    if len(node.args) > 2 and node.args[2] is not None:
        return 0
    w, x = val(node.args[1]), val(node.args[0])
    if w is None or x is None or w.dim() != 2 or x.dim() < 3 or not _feeds_softmax(node, limit=8):
        return 0
    wt = _call(gm, node, aten.t.default, node.args[1])
    node.replace_all_uses_with(_call(gm, node, aten.matmul.default, node.args[0], wt))
    return 1


def _einsum_scores_keys_not_last(gm, node: fx.Node) -> int:
    """softmax(einsum(a, b -> out), d) where out[d] is the key index but the output is not (shared..., query,
    key): the einsum rebuilt in that order, the softmax over its last dim, the result permuted back."""
    if node.target not in SOFTMAX_OPS or len(node.args) < 2 or not isinstance(node.args[1], int):
        return 0
    es, ops = node.args[0], []  # ops: scalar ops between the einsum and the softmax (a scale), nearest first
    while (isinstance(es, fx.Node) and es.op == "call_function" and es.target in SCALAR_OPS and len(es.users) == 1
           and isinstance(es.args[0], fx.Node) and _others_constant(es)):
        ops.append(es)
        es = es.args[0]
    if not (isinstance(es, fx.Node) and es.op == "call_function" and es.target is aten.einsum.default
            and len(es.users) == 1 and isinstance(es.args[1], (list, tuple)) and len(es.args[1]) == 2):
        return 0
    parsed = _parse_einsum(es.args[0])
    if parsed is None or "..." in es.args[0]:
        return 0
    a, b, out = parsed
    d = node.args[1] % len(out)
    only_a = [c for c in out if c in a and c not in b]
    only_b = [c for c in out if c in b and c not in a]
    shared = [c for c in out if c in a and c in b]
    if len(only_a) != 1 or len(only_b) != 1 or out[d] != only_b[0] or len(shared) + 2 != len(out):
        return 0
    canon = "".join(shared) + only_a[0] + only_b[0]
    if canon == out:
        return 0
    s4 = _call(gm, node, aten.einsum.default, f"{a},{b}->{canon}", list(es.args[1]))
    for op in reversed(ops):
        s4 = _call(gm, node, op.target, s4, *op.args[1:], **op.kwargs)
    p = _call(gm, node, node.target, s4, -1, *node.args[2:], **node.kwargs)
    back = _call(gm, node, aten.permute.default, p, [canon.index(c) for c in out])
    node.replace_all_uses_with(back)
    return 1


def _permuted_probabilities_in_einsum(gm, node: fx.Node) -> int:
    """einsum(eq, [permute(P, perm), v]) with P from a softmax: the permutation folded into P's subscripts."""
    if not (node.target is aten.einsum.default and isinstance(node.args[1], (list, tuple)) and len(node.args[1]) == 2):
        return 0
    pp, v = node.args[1]
    if not (isinstance(pp, fx.Node) and pp.op == "call_function" and pp.target is aten.permute.default
            and len(pp.users) == 1 and _from_softmax(pp.args[0])):
        return 0
    parsed = _parse_einsum(node.args[0])
    if parsed is None or "..." in node.args[0]:
        return 0
    a, b, out = parsed
    perm = list(pp.args[1])
    if sorted(perm) != list(range(len(a))):
        return 0
    inner = [""] * len(a)
    for i, src in enumerate(perm):  # permute: result dim i is P's dim perm[i]
        inner[src] = a[i]
    new = _call(gm, node, aten.einsum.default, f"{''.join(inner)},{b}->{out}", [pp.args[0], v])
    node.replace_all_uses_with(new)
    return 1


def _round_trip_view(gm, node: fx.Node) -> int:
    """view(view(P, (B, H, M, N)), (B*H, M, N)) back to P's own shape, P from a softmax (fairseq / XGLM keep
    the 4-D view for output_attentions): the outer view is P itself."""
    if node.target not in VIEWS or not isinstance(node.args[0], fx.Node):
        return 0
    inner = node.args[0]
    if inner.op != "call_function" or inner.target not in VIEWS or len(inner.users) != 1:
        return 0
    p = inner.args[0]
    pv, out = val(p) if isinstance(p, fx.Node) else None, val(node)
    if pv is None or out is None or not _from_softmax(p) or pv.dim() != out.dim():
        return 0
    if not all(known_equal(a, b) for a, b in zip(pv.shape, out.shape)):
        return 0
    node.replace_all_uses_with(p)
    return 1


# elementwise ops with a number that may sit between the 3-D scores and their view to 4-D (a scale)
SCALAR_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.add.Tensor, aten.add.Scalar,
              aten.sub.Tensor, aten.sub.Scalar}


def _scores_viewed_to_4d(gm, node: fx.Node) -> int:
    """view(bmm / baddbmm (G, M, N), possibly scaled by numbers) to (B, H, M, N), a softmax downstream."""
    if node.target not in VIEWS or not isinstance(node.args[0], fx.Node):
        return 0
    mm, ops = node.args[0], []  # ops: the scalar ops between the matmul and the view, nearest the view first
    while (mm.op == "call_function" and mm.target in SCALAR_OPS and len(mm.users) == 1
           and isinstance(mm.args[0], fx.Node) and _others_constant(mm)):
        ops.append(mm)
        mm = mm.args[0]
    if mm.op != "call_function" or mm.target not in (aten.bmm.default, aten.baddbmm.default):
        return 0
    if len(mm.users) != 1 or not _feeds_softmax(node):
        return 0
    bh = _split_heads(node, mm)
    return _unfold_scores(gm, node, mm, *bh, ops) if bh is not None else 0


def _others_constant(n: fx.Node) -> bool:
    """Every argument but the first is a constant: the op can be replayed on another tensor's shape."""
    return not any(isinstance(a, fx.Node) for a in (*n.args[1:], *n.kwargs.values()))


def _keeps_values(n: fx.Node) -> bool:
    """An op of KEEPS_VALUES whose other arguments are constants."""
    return n.op == "call_function" and n.target in KEEPS_VALUES and _others_constant(n)


# a mask or bias on the (B*H, M, N) scores that is the same for every (batch, head): open_clip adds its (L, L)
# attention mask after viewing its 4-D scores back to 3-D
MASK_OPS = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.masked_fill.Scalar}


def _same_on_every_head(n: fx.Node) -> bool:
    """`scores op t` whose other tensors broadcast over the folded batch·heads dim (shape (M, N) or (1, M, N)),
    so the op means the same on the 4-D scores; numbers otherwise."""
    if n.op != "call_function" or n.target not in MASK_OPS or not isinstance(n.args[0], fx.Node) or \
            set(n.kwargs) - {"alpha"}:
        return False
    for a in (*n.args[1:], *n.kwargs.values()):
        t = val(a) if isinstance(a, fx.Node) else None
        if isinstance(a, fx.Node) and (t is None or t.dim() > 3 or (t.dim() == 3 and not known_equal(t.shape[0], 1))):
            return False
    out, x = val(n), val(n.args[0])
    return out is not None and x is not None and tuple(out.shape) == tuple(x.shape)


def _softmax_of_scores_viewed_to_3d(gm, node: fx.Node) -> int:
    """softmax(casts(view(S (B, H, M, N) -> (B*H, M, N)))) over the last dim: rebuilt on S, the view moved after
    the softmax and the value-keeping ops that follow it (views between them folded away)."""
    if node.target not in SOFTMAX_OPS or len(node.args) < 2 or not isinstance(node.args[1], int):
        return 0
    x = node.args[0]
    xv = val(x) if isinstance(x, fx.Node) else None
    if xv is None or xv.dim() != 3 or node.args[1] % 3 != 2:
        return 0
    before = []  # value-keeping ops and masks between the view and the softmax, nearest first
    while (_keeps_values(x) or _same_on_every_head(x)) and len(x.users) == 1:
        before.append(x)
        x = x.args[0]
    if x.op != "call_function" or x.target not in VIEWS or len(x.users) != 1 or not isinstance(x.args[0], fx.Node):
        return 0
    scores = x.args[0]
    if _split_heads(scores, x) is None:
        return 0
    shape4, shape3 = list(val(scores).shape), list(xv.shape)
    after, end = [], node  # value-keeping ops (and views between the two shapes) after the softmax
    while len(end.users) == 1:
        (u,) = end.users
        if _keeps_values(u):
            after.append(u)
        elif not (u.op == "call_function" and u.target in VIEWS and val(u) is not None
                  and (list(val(u).shape) == shape4 or list(val(u).shape) == shape3)):
            break
        end = u
    cur = scores
    for op in reversed(before):
        cur = _call(gm, node, op.target, cur, *op.args[1:], **op.kwargs)
    cur = _call(gm, node, node.target, cur, 3 if node.args[1] >= 0 else -1, *node.args[2:], **node.kwargs)
    for op in after:
        cur = _call(gm, end, op.target, cur, *op.args[1:], **op.kwargs)
    if list(val(end).shape) != shape4:
        cur = _call(gm, end, aten.reshape.default, cur, list(val(end).shape))
    end.replace_all_uses_with(cur)
    return 1


def _probabilities_viewed_to_3d(gm, node: fx.Node) -> int:
    """bmm(view(P (B, H, M, N) -> (B*H, M, N)), v), P from a softmax."""
    if node.target != aten.bmm.default or not isinstance(node.args[0], fx.Node):
        return 0
    pv = node.args[0]
    if pv.op != "call_function" or pv.target not in VIEWS or len(pv.users) != 1:
        return 0
    p4 = pv.args[0]
    if not isinstance(p4, fx.Node) or not _from_softmax(p4):
        return 0
    bh = _split_heads(p4, pv)
    return _unfold_probabilities(gm, node, p4, *bh) if bh is not None else 0


def _probabilities_on_the_right(gm, node: fx.Node) -> int:
    """bmm / matmul(v, P with its last two dims swapped), P from a softmax."""
    if node.target not in (aten.bmm.default, aten.matmul.default) or not isinstance(node.args[1], fx.Node):
        return 0
    pt = node.args[1]
    if not _swaps_last_two(pt) or len(pt.users) != 1 or not _from_softmax(pt.args[0]):
        return 0
    return _probabilities_left(gm, node, pt.args[0])


def _row_scale_after_pv(gm, node: fx.Node) -> int:
    """matmul / bmm(P * m1 * m2 ..., v), P from a softmax and each m a number or a tensor of P's dtype whose
    last dim is 1 (so it scales whole rows): the products move after the matmul."""
    if node.target not in (aten.matmul.default, aten.bmm.default) or not isinstance(node.args[0], fx.Node):
        return 0
    x, factors = node.args[0], []
    while (x.op == "call_function" and x.target in (aten.mul.Tensor, aten.mul.Scalar) and len(x.users) == 1
           and not _from_softmax(x)):
        a, b = x.args[:2]
        x, m = (a, b) if isinstance(a, fx.Node) and (_from_softmax(a) or a.target in (aten.mul.Tensor,
                                                                                      aten.mul.Scalar)) else (b, a)
        if not isinstance(x, fx.Node) or val(x) is None or val(node.args[0]) is None:
            return 0
        factors.append(m)
    if not factors or not _from_softmax(x):
        return 0
    pv = val(x)
    if list(val(node.args[0]).shape) != list(pv.shape):
        return 0  # a factor would broadcast P to a larger shape
    for m in factors:
        if isinstance(m, fx.Node):
            mv = val(m)
            if mv is None or mv.dtype != pv.dtype or mv.dim() > pv.dim():
                return 0
            if mv.dim() and not known_equal(mv.shape[-1], 1):
                return 0  # varies along the keys: not a row scale
        elif not isinstance(m, (int, float)):
            return 0
    out = _call(gm, node, node.target, x, node.args[1])
    for m in factors:
        out = _call(gm, node, aten.mul.Tensor, out, m)
    node.replace_all_uses_with(out)
    return 1


def _unfold_scores(gm, view: fx.Node, mm: fx.Node, b, h, ops=()) -> int:
    if mm.target == aten.bmm.default:
        a, k, c, beta, alpha = mm.args[0], mm.args[1], None, 0, 1
    else:
        c, a, k = mm.args[:3]
        beta, alpha = mm.kwargs.get("beta", 1), mm.kwargs.get("alpha", 1)
        if isinstance(beta, fx.Node) or isinstance(alpha, fx.Node):
            return 0
    av, kv = val(a), val(k)
    a4 = _call(gm, view, aten.reshape.default, a, [b, h, av.shape[1], av.shape[2]])
    k4 = _call(gm, view, aten.reshape.default, k, [b, h, kv.shape[1], kv.shape[2]])
    out = _call(gm, view, aten.matmul.default, a4, k4)
    if alpha != 1:
        out = _call(gm, view, aten.mul.Tensor, out, alpha)
    if beta != 0:  # torch ignores the input (even NaN) when beta == 0
        cv = val(c)
        if cv is None:
            return 0
        if cv.dim() == 3 and not known_equal(cv.shape[0], 1):
            c = _call(gm, view, aten.reshape.default, c, [b, h, cv.shape[1], cv.shape[2]])
        if beta != 1:
            c = _call(gm, view, aten.mul.Tensor, c, beta)
        out = _call(gm, view, aten.add.Tensor, out, c)
    for op in reversed(ops):  # the scale, replayed on the 4-D scores
        out = _call(gm, view, op.target, out, *op.args[1:], **op.kwargs)
    view.replace_all_uses_with(out)
    return 1


def _unfold_probabilities(gm, bmm: fx.Node, p4: fx.Node, b, h) -> int:
    v = bmm.args[1]
    vv, ov = val(v), val(bmm)
    if vv is None or ov is None:
        return 0
    v4 = _call(gm, bmm, aten.reshape.default, v, [b, h, vv.shape[1], vv.shape[2]])
    out4 = _call(gm, bmm, aten.matmul.default, p4, v4)
    out = _call(gm, bmm, aten.reshape.default, out4, list(ov.shape))
    bmm.replace_all_uses_with(out)
    return 1


def _swaps_last_two(node: fx.Node) -> bool:
    """transpose(x, -2, -1) / permute(x, (..., r-1, r-2)) of a rank >= 2 tensor."""
    if node.op != "call_function" or not isinstance(node.args[0], fx.Node) or val(node.args[0]) is None:
        return False
    r = val(node.args[0]).dim()
    if r < 2:
        return False
    if node.target == aten.transpose.int:
        return sorted(d % r for d in node.args[1:3]) == [r - 2, r - 1]
    if node.target == aten.permute.default:
        return [d % r for d in node.args[1]] == list(range(r - 2)) + [r - 1, r - 2]
    return False


def _probabilities_left(gm, mm: fx.Node, p: fx.Node) -> int:
    v = mm.args[0]
    if not isinstance(v, fx.Node) or val(v) is None or val(v).dim() != val(p).dim():
        return 0
    vt = _call(gm, mm, aten.transpose.int, v, -2, -1)
    out = _call(gm, mm, aten.matmul.default, p, vt)
    out = _call(gm, mm, aten.transpose.int, out, -2, -1)
    mm.replace_all_uses_with(out)
    return 1
