"""Attention pass: matmul → score modification → softmax → (dropout) → matmul  ⇒  flashfuse::attention.

For every softmax in the (normalized, ATen-level) graph:
  1. the softmax must be over the last axis of the scores;
  2. forwards: the probabilities, through casts / dropout / copies that nobody else reads, feed the left
     operand of a matmul with V (`matmul`, `bmm`, `einsum`);
  3. backwards: the elementwise DAG between the softmax and S = Q·Kᵀ is turned into one sympy expression
     (score_mod.py) — index-only parts (arange comparisons, tril/triu of constants) stay symbolic; other
     tensors become side inputs loaded with their broadcast strides;
  4. Q, K, V are recovered as views of the user's tensors (no copies); K/V repeated by expand+reshape or
     repeat_interleave are replaced by the shared head (GQA).
Anything that cannot be proven leaves the graph unchanged and records a near-miss with the reason.
"""
from __future__ import annotations

import collections
import functools
import math
import operator

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from flashfuse.kernels.attention import codegen
from flashfuse.kernels.attention import op as attention_op
from flashfuse.kernels.attention import score_mod as sm
from flashfuse.passes import PassContext, register_pass
from flashfuse.passes.eltwise_chain import mutates
from flashfuse.passes.norm_match import strip_upcast
from flashfuse.passes.normalize import requires_grad, val
from flashfuse.report import at_source

aten = torch.ops.aten
NAME = "attention"
MAX_HEAD_DIM = 256

SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default, aten.einsum.default, aten.mm.default,
              aten.baddbmm.default}
# ops between the softmax and P·V that keep the probabilities' values (up to dtype)
PASS_THROUGH = {aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default,
                aten.alias.default, aten.type_as.default, aten.to.dtype_layout, aten.to.device,
                aten.detach.default}
CASTS = {aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.to.dtype_layout, aten.to.device,
         aten.clone.default, aten.contiguous.default, aten.alias.default}
DROPOUT_OPS = {aten.dropout.default}


class NotFusable(Exception):
    """A precondition failed; the message is the near-miss reason shown to the user."""

    def __init__(self, reason: str, node: fx.Node | None = None):
        super().__init__(reason)
        self.node = node


_where = at_source


def _op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.name.split("::")[1]
    return getattr(t, "__name__", str(t))


def _same(a, b) -> bool:
    """Sizes equal, provably (symbolic sizes included)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def _shape_str(shape) -> str:
    return "(" + ",".join(str(s) for s in shape) + ")"


# --------------------------------------------------------------------------------------------------
# Expressions over the axes of the scores
# --------------------------------------------------------------------------------------------------
class Value:
    """What a node computes, as a sympy expression: `expr` over axis symbols ax0..ax{rank-1} (for
    index-only values), `score`, `sideN`; `rank`/`shape` of the tensor; `is_bool` for conditions."""

    def __init__(self, expr: sympy.Basic, rank: int, shape, is_bool: bool):
        self.expr, self.rank, self.shape, self.is_bool = expr, rank, tuple(shape), is_bool

    def cond(self) -> sympy.Basic:
        return self.expr if self.is_bool else sympy.Ne(self.expr, 0)

    def num(self) -> sympy.Basic:
        return sympy.Piecewise((1, self.expr), (0, True)) if self.is_bool else self.expr


def _ax(i: int) -> sympy.Symbol:
    return sympy.Symbol(f"ax{i}", integer=True)


def _is_index_only(expr: sympy.Basic) -> bool:
    return not any(s.name == "score" or s.name.startswith("side") for s in expr.free_symbols)


class ScoreModBuilder:
    """Walks the DAG from the softmax input back to S, building the score_mod expression."""

    def __init__(self, softmax_in: fx.Node, score_shape):
        self.score_node: fx.Node | None = None
        self.score_shape = tuple(score_shape)
        self.rank = len(score_shape)
        self.sides: list[fx.Node] = []
        self.side_desc: list[str] = []
        self.memo: dict[fx.Node, Value] = {}
        self.root = softmax_in
        self._index_only = False  # while True, anything but an index-only value is _NotPointwise

    def index_operand(self, x) -> Value:
        """The operand as an index-only value (arange/ones/tril ...), without registering side inputs."""
        prev, self._index_only = self._index_only, True
        try:
            v = self.operand(x)
        finally:
            self._index_only = prev
        if not _is_index_only(v.expr):
            raise _NotPointwise
        return v

    # -- leaves ------------------------------------------------------------------------------------
    def side(self, node: fx.Node) -> Value:
        if self._index_only:
            raise _NotPointwise
        t = val(node)
        if t is None:
            raise NotFusable(f"`{node.name}` between the matmul and the softmax is not a tensor", node)
        if t.dim() > self.rank or any(
            not (_same(s, 1) or _same(s, S)) for s, S in zip(reversed(t.shape), reversed(self.score_shape))
        ):
            raise NotFusable(f"mask/bias `{node.name}` of shape {_shape_str(t.shape)} does not broadcast to "
                             f"the scores {_shape_str(self.score_shape)}", node)
        if node not in self.sides:
            self.sides.append(node)
            kind = "bool mask" if t.dtype == torch.bool else "float bias/mask"
            self.side_desc.append(f"{kind} {_shape_str(t.shape)}")
        i = self.sides.index(node)
        if t.dtype == torch.bool:
            return Value(sympy.Ne(sm.side(i), 0), t.dim(), t.shape, True)
        return Value(sm.side(i), t.dim(), t.shape, False)

    def const(self, x) -> Value:
        if isinstance(x, bool):
            return Value(sympy.true if x else sympy.false, 0, (), True)
        if isinstance(x, (int, float)):
            if math.isinf(x):
                return Value(sympy.oo if x > 0 else -sympy.oo, 0, (), False)
            return Value(sympy.Integer(x) if isinstance(x, int) else sympy.Float(x), 0, (), False)
        raise NotFusable(f"unsupported constant {x!r} in the score modification")

    def operand(self, x) -> Value:
        if isinstance(x, fx.Node):
            if not isinstance(x.meta.get("val"), torch.Tensor):
                return self.sym_scalar(x)
            return self.visit(x)
        return self.const(x)

    def sym_scalar(self, node: fx.Node) -> Value:
        """A symbolic size or scalar (dynamic shapes): the sequence lengths stay symbolic (Nq, Nk);
        anything else is specialized with a guard (Dynamo recompiles if it changes)."""
        from torch.fx.experimental.symbolic_shapes import guard_scalar

        x = node.meta.get("val")
        if isinstance(x, torch.SymInt):
            if _same(x, self.score_shape[-2]):
                return Value(sm.Nq, 0, (), False)
            if _same(x, self.score_shape[-1]):
                return Value(sm.Nk, 0, (), False)
            in_lengths = _in_lengths(x, self.score_shape)  # e.g. a KV cache's diagonal offset Nk - Nq + 1
            if in_lengths is not None:
                return Value(in_lengths, 0, (), False)
        if isinstance(x, (torch.SymInt, torch.SymFloat, int, float)):
            return self.const(guard_scalar(x) if not isinstance(x, (int, float)) else x)
        raise NotFusable(f"`{node.name}` between the matmul and the softmax is not a tensor or a number",
                         node)

    # -- the walk ------------------------------------------------------------------------------------
    def visit(self, node: fx.Node) -> Value:
        if node in self.memo:
            return self.memo[node]
        v = self._visit(node)
        if self._small_side_subtree(node, v):
            # A mask/bias computed from tensors without the scores, smaller than Nq×Nk (e.g. an HF padding
            # mask (B,1,1,N)): let the graph compute it exactly as eager does and load the result.
            v = self.side(node)
        self.memo[node] = v
        return v

    def _small_side_subtree(self, node: fx.Node, v: Value) -> bool:
        if self._index_only or node in self.sides or v.expr.has(sm.score):
            return False
        if not any(s.name.startswith("side") for s in v.expr.free_symbols):
            return False
        if isinstance(v.expr, sympy.Symbol) or (v.is_bool and isinstance(v.expr, sympy.Ne)
                                                  and v.expr.args[1] == 0 and v.expr.args[0].is_Symbol):
            return False  # already a plain side load
        t = val(node)
        if t is None:
            return False
        shape = list(t.shape)
        spans_q = len(shape) >= 2 and not _same(shape[-2], 1)
        spans_k = len(shape) >= 1 and not _same(shape[-1], 1)
        return not (spans_q and spans_k)

    def _visit(self, node: fx.Node) -> Value:
        t = val(node)
        if node.op != "call_function":
            return self.side(node)
        target = node.target
        if not self._index_only and self._is_score_matmul(node):
            if self.score_node is None or self.score_node is node:
                self.score_node = node
                if target == aten.baddbmm.default:  # beta * input + alpha * (q @ k)
                    beta = node.kwargs.get("beta", 1)
                    alpha = node.kwargs.get("alpha", 1)
                    if isinstance(beta, fx.Node) or isinstance(alpha, fx.Node):
                        raise NotFusable("baddbmm with a tensor alpha/beta", node)
                    e = alpha * sm.score
                    if beta != 0:  # torch ignores `input` (even NaN) when beta == 0
                        e = e + beta * self._align(self.operand(node.args[0]), self.rank).num()
                    return Value(e, self.rank, t.shape, False)
                return Value(sm.score, self.rank, t.shape, False)
        try:
            return self._pointwise(node, t)
        except _NotPointwise:
            if self._depends_on_score(node) or self._has_score_like_ancestor(node):
                raise NotFusable(f"`{_op_name(node)}`{_where(node)} between the scores and the softmax is "
                                 f"not an elementwise op flashfuse understands", node)
            return self.side(node)

    def _is_score_matmul(self, n: fx.Node) -> bool:
        """A matmul whose output has the scores' shape: the candidate for S = Q·Kᵀ."""
        t = val(n)
        return n.op == "call_function" and n.target in MATMUL_OPS and t is not None and \
            t.dim() == self.rank and all(_same(a, b) for a, b in zip(t.shape, self.score_shape))

    def _has_score_like_ancestor(self, node: fx.Node) -> bool:
        """Before S is found: does a matmul of the scores' shape feed this node?"""
        if self.score_node is not None:
            return False
        return any(_nearest_ancestor(i, self._is_score_matmul) is not None for i in node.all_input_nodes)

    def _matmul_ancestor(self, node: fx.Node):
        """The nearest matmul feeding `node` (for the near-miss reason)."""
        return _nearest_ancestor(node, lambda n: n.op == "call_function" and n.target in MATMUL_OPS)

    def _depends_on_score(self, node: fx.Node) -> bool:
        if self.score_node is None:
            return False
        return _nearest_ancestor(node, lambda n: n is self.score_node) is not None

    def _pointwise(self, node: fx.Node, t) -> Value:
        target, args, kw = node.target, node.args, node.kwargs
        out_shape = tuple(t.shape) if t is not None else ()
        out_rank = len(out_shape)
        is_bool = t is not None and t.dtype == torch.bool

        def bin_(f):
            a, b = self.operand(args[0]), self.operand(args[1])
            return Value(f(self._align(a, out_rank).num(), self._align(b, out_rank).num()), out_rank, out_shape,
                         False)

        def cmp(rel):
            a, b = self.operand(args[0]), self.operand(args[1])
            return Value(rel(self._align(a, out_rank).num(), self._align(b, out_rank).num()), out_rank,
                         out_shape, True)

        def unary(f):
            a = self._align(self.operand(args[0]), out_rank)
            return Value(f(a.num()), out_rank, out_shape, False)

        if target in (aten.mul.Tensor, aten.mul.Scalar):
            if is_bool:
                a, b = (self._align(self.operand(x), out_rank) for x in args[:2])
                return Value(sympy.And(a.cond(), b.cond()), out_rank, out_shape, True)
            return bin_(operator.mul)
        if target in (aten.div.Tensor, aten.div.Scalar, aten.true_divide.Tensor, aten.true_divide.Scalar) or (
                target in (aten.div.Tensor_mode, aten.div.Scalar_mode) and kw.get("rounding_mode") is None):
            return bin_(operator.truediv)
        if target in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar,
                      aten.rsub.Tensor):
            alpha = kw.get("alpha", args[2] if len(args) > 2 else 1)
            if isinstance(alpha, fx.Node):
                raise _NotPointwise
            a, b = (self._align(self.operand(x), out_rank).num() for x in args[:2])
            if target in (aten.add.Tensor, aten.add.Scalar):
                return Value(a + alpha * b, out_rank, out_shape, False)
            if target in (aten.sub.Tensor, aten.sub.Scalar):
                return Value(a - alpha * b, out_rank, out_shape, False)
            return Value(b - alpha * a, out_rank, out_shape, False)
        if target == aten.neg.default:
            return unary(lambda a: -a)
        if target == aten.tanh.default:
            return unary(sympy.tanh)
        if target == aten.exp.default:
            return unary(sympy.exp)
        if target == aten.log.default:  # torch: log(0) = -inf, where sympy gives complex infinity (zoo)
            return unary(lambda a: sympy.piecewise_fold(sympy.log(a)).xreplace({sympy.zoo: -sympy.oo}))
        if target == aten.abs.default:
            return unary(sympy.Abs)
        if target == aten.sqrt.default:
            return unary(sympy.sqrt)
        if target == aten.rsqrt.default:
            return unary(lambda a: 1 / sympy.sqrt(a))
        if target == aten.sigmoid.default:
            return unary(lambda a: 1 / (1 + sympy.exp(-a)))
        if target == aten.reciprocal.default:
            return unary(lambda a: 1 / a)
        if target in (aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar):
            return bin_(lambda a, b: a ** b)
        if target in (aten.maximum.default, aten.max.other, aten.clamp_min.default):  # max.other: torch.max(a, b)
            return bin_(sympy.Max)
        if target in (aten.minimum.default, aten.min.other, aten.clamp_max.default):
            return bin_(sympy.Min)
        if target == aten.clamp.default:
            a = self._align(self.operand(args[0]), out_rank).num()
            lo = args[1] if len(args) > 1 else kw.get("min")
            hi = args[2] if len(args) > 2 else kw.get("max")
            if lo is not None:
                a = sympy.Max(a, self.operand(lo).num())
            if hi is not None:
                a = sympy.Min(a, self.operand(hi).num())
            return Value(a, out_rank, out_shape, False)
        rels = {aten.eq.Scalar: sympy.Eq, aten.eq.Tensor: sympy.Eq, aten.ne.Scalar: sympy.Ne,
                aten.ne.Tensor: sympy.Ne, aten.lt.Scalar: sympy.Lt, aten.lt.Tensor: sympy.Lt,
                aten.le.Scalar: sympy.Le, aten.le.Tensor: sympy.Le, aten.gt.Scalar: sympy.Gt,
                aten.gt.Tensor: sympy.Gt, aten.ge.Scalar: sympy.Ge, aten.ge.Tensor: sympy.Ge}
        if target in rels:
            return cmp(rels[target])
        if target in (aten.logical_not.default, aten.bitwise_not.default):
            a = self._align(self.operand(args[0]), out_rank)
            if not a.is_bool:
                raise _NotPointwise
            return Value(sympy.Not(a.cond()), out_rank, out_shape, True)
        if target in (aten.logical_and.default, aten.bitwise_and.Tensor, aten.logical_or.default,
                      aten.bitwise_or.Tensor, aten.logical_xor.default, aten.bitwise_xor.Tensor):
            a, b = (self._align(self.operand(x), out_rank) for x in args[:2])
            if not (a.is_bool and b.is_bool):
                raise _NotPointwise
            f = {aten.logical_and.default: sympy.And, aten.bitwise_and.Tensor: sympy.And,
                 aten.logical_or.default: sympy.Or, aten.bitwise_or.Tensor: sympy.Or}.get(target, sympy.Xor)
            return Value(f(a.cond(), b.cond()), out_rank, out_shape, True)
        if target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            x = self._align(self.operand(args[0]), out_rank)
            m = self._align(self.operand(args[1]), out_rank)
            fill = args[2]
            if isinstance(fill, fx.Node):
                fv = val(fill)
                if fv is None or fv.dim() != 0:
                    raise _NotPointwise
            fillv = self._align(self.operand(fill), out_rank)
            return Value(sympy.Piecewise((fillv.num(), m.cond()), (x.num(), True)), out_rank, out_shape,
                         False)
        if target in (aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar):
            c, a, b = (self._align(self.operand(x), out_rank) for x in args[:3])
            if is_bool:
                return Value(sympy.Or(sympy.And(c.cond(), a.cond()), sympy.And(sympy.Not(c.cond()), b.cond())),
                             out_rank, out_shape, True)
            return Value(sympy.Piecewise((a.num(), c.cond()), (b.num(), True)), out_rank, out_shape, False)
        if target in CASTS:
            a = self._align(self.operand(args[0]), out_rank)
            if t is not None and t.dtype == torch.bool:
                return Value(a.cond(), out_rank, out_shape, True)
            return Value(a.num(), out_rank, out_shape, False)
        # index-only sources
        if target in (aten.arange.default, aten.arange.start, aten.arange.start_step):
            nums = [a for a in args if not isinstance(a, torch.dtype)]
            start, step = 0, 1
            if target != aten.arange.default:
                start = nums[0]
                step = nums[2] if len(nums) > 2 else kw.get("step", 1)
            # a symbolic start (x-transformers' arange(Nk - Nq, Nk) under dynamic shapes) is a polynomial of the
            # lengths; any other run-time value makes the arange a side tensor
            start, step = (_in_lengths(a.meta.get("val"), self.score_shape) if isinstance(a, fx.Node) else a
                           for a in (start, step))
            if start is None or step is None:
                raise _NotPointwise
            return Value(start + step * _ax(0), 1, out_shape, False)
        if target in (aten.ones.default, aten.zeros.default, aten.full.default, aten.ones_like.default,
                      aten.zeros_like.default, aten.full_like.default, aten.scalar_tensor.default,
                      aten.new_ones.default, aten.new_zeros.default, aten.new_full.default):
            # the *_like / new_* forms read only their first argument's shape and dtype
            fill = {aten.ones.default: 1, aten.ones_like.default: 1, aten.new_ones.default: 1, aten.zeros.default: 0,
                    aten.zeros_like.default: 0, aten.new_zeros.default: 0}.get(target)
            if fill is None:
                fill = {aten.scalar_tensor.default: args[0], aten.new_full.default: args[2] if len(args) > 2
                        else kw.get("fill_value")}.get(target, args[1] if len(args) > 1 else None)
            if isinstance(fill, fx.Node):
                raise _NotPointwise
            c = self.const(fill)
            return Value(c.expr if not is_bool else c.cond(), out_rank, out_shape, is_bool)
        if target in (aten.tril.default, aten.triu.default):
            a = self.index_operand(args[0])
            if a.rank < 2:
                raise _NotPointwise
            diag = args[1] if len(args) > 1 else kw.get("diagonal", 0)
            if isinstance(diag, fx.Node):  # symbolic: a polynomial of Nq, Nk, or specialized with a guard
                diag = self.sym_scalar(diag).expr
            r, c = _ax(a.rank - 2), _ax(a.rank - 1)
            keep = (c - r <= diag) if target == aten.tril.default else (c - r >= diag)
            zero = sympy.false if a.is_bool else 0
            if a.is_bool:
                return Value(sympy.And(keep, a.cond()), a.rank, out_shape, True)
            return Value(sympy.Piecewise((a.num(), keep), (zero, True)), a.rank, out_shape, False)
        return self._view(node, t)

    # view ops: understood only on index-only values (anything else becomes a side tensor)
    def _view(self, node: fx.Node, t) -> Value:
        target, args = node.target, node.args
        if t is None or not args or not isinstance(args[0], fx.Node):
            raise _NotPointwise
        view_ops = (aten.unsqueeze.default, aten.slice.Tensor, aten.view.default, aten.reshape.default,
                    aten.expand.default, aten.squeeze.dim, aten.squeeze.default, aten.select.int)
        if target not in view_ops:
            raise _NotPointwise
        src = self.index_operand(args[0])
        out_shape = tuple(t.shape)
        e = src.expr
        if target == aten.unsqueeze.default:
            d = args[1] % (src.rank + 1)
            mapping = {_ax(i): _ax(i + 1) for i in range(d, src.rank)}
            return Value(e.xreplace(mapping), src.rank + 1, out_shape, src.is_bool)
        if target == aten.slice.Tensor:
            d = (args[1] if len(args) > 1 else 0) % src.rank
            start = args[2] if len(args) > 2 else 0
            step = args[4] if len(args) > 4 else 1
            if start is None:
                start = 0
            if isinstance(start, int) and start < 0:  # x[-n:]: from the end, clamped at 0 as Python slices are
                size = val(node.args[0]).shape[d] if val(node.args[0]) is not None else None
                if not isinstance(size, int):
                    raise _NotPointwise
                start = max(0, start + size)
            if isinstance(start, fx.Node) or step != 1:
                raise _NotPointwise
            return Value(e.xreplace({_ax(d): _ax(d) + start}), src.rank, out_shape, src.is_bool)
        if target == aten.expand.default:
            lead = len(out_shape) - src.rank
            mapping = {_ax(i): _ax(i + lead) for i in range(src.rank)}
            return Value(e.xreplace(mapping), len(out_shape), out_shape, src.is_bool)
        if target == aten.select.int:
            d, idx = args[1] % src.rank, args[2]
            if isinstance(idx, fx.Node) or idx < 0:
                raise _NotPointwise
            mapping = {_ax(d): sympy.Integer(idx)}
            mapping.update({_ax(i): _ax(i - 1) for i in range(d + 1, src.rank)})
            return Value(e.xreplace(mapping), src.rank - 1, out_shape, src.is_bool)
        # view / reshape / squeeze: only inserting or removing size-1 dims
        in_shape = list(src.shape)
        non1_in = [i for i, s in enumerate(in_shape) if not _same(s, 1)]
        non1_out = [i for i, s in enumerate(out_shape) if not _same(s, 1)]
        if len(non1_in) != len(non1_out) or not all(
                _same(in_shape[i], out_shape[j]) for i, j in zip(non1_in, non1_out)):
            raise _NotPointwise
        mapping = {_ax(i): _ax(j) for i, j in zip(non1_in, non1_out)}
        # axes of size 1 that disappear must not matter
        gone = [i for i in range(src.rank) if i not in non1_in]
        mapping.update({_ax(i): sympy.Integer(0) for i in gone})
        return Value(e.xreplace(mapping), len(out_shape), out_shape, src.is_bool)

    def _align(self, v: Value, rank: int) -> Value:
        """Right-align an index-only expression's axes to a result of rank `rank` (broadcasting)."""
        if v.rank == rank or v.rank == 0:
            return v
        lead = rank - v.rank
        mapping = {_ax(i): _ax(i + lead) for i in range(v.rank)}
        return Value(v.expr.xreplace(mapping), rank, v.shape, v.is_bool)

    def build(self) -> sympy.Basic:
        v = self.visit(self.root)
        if self.score_node is None:
            mm = self._matmul_ancestor(self.root)
            if mm is not None:
                raise NotFusable(f"the scores {_shape_str(val(mm).shape)} of `{_op_name(mm)}`{_where(mm)} are "
                                 f"broadcast to {_shape_str(self.score_shape)} before the softmax (a mask or bias "
                                 f"of another shape)", mm)
            raise NotFusable("no Q·Kᵀ matmul of the scores' shape feeds the softmax", self.root)
        v = self._align(v, self.rank)
        # rank 5: the three leading dims are merged into (batch, heads) by _fuse_one; an index mask may only
        # use the query and key positions there
        names = {2: ("q_idx", "kv_idx"), 3: ("b", "q_idx", "kv_idx"), 4: ("b", "h", "q_idx", "kv_idx"),
                 5: (None, None, None, "q_idx", "kv_idx")}
        if self.rank not in names:
            raise NotFusable(f"scores of rank {self.rank}; flashfuse handles rank 2 to 5", self.root)
        syms = {"b": sm.b, "h": sm.h, "q_idx": sm.q_idx, "kv_idx": sm.kv_idx}
        mapping = {_ax(i): syms[n] for i, n in enumerate(names[self.rank]) if n is not None}
        expr = v.num().xreplace(mapping)
        nq, nk = self.score_shape[-2], self.score_shape[-1]
        leftover = [s for s in expr.free_symbols if s.name.startswith("ax")]
        if leftover:
            raise NotFusable("an index-only mask does not line up with the scores' axes", self.root)
        del nq, nk
        # sympy folds nested Piecewise conditions into ITE(a, b, c); printers know And/Or/Not
        expr = expr.replace(sympy.ITE, lambda a, b_, c: sympy.Or(sympy.And(a, b_), sympy.And(sympy.Not(a), c)))
        # drop side inputs that a materialized subtree made unused, and renumber the rest
        used = sm.side_ids(expr)
        expr = expr.xreplace({sm.side(old): sm.side(new) for new, old in enumerate(used)})
        self.sides = [self.sides[i] for i in used]
        self.side_desc = [self.side_desc[i] for i in used]
        return expr


class _NotPointwise(Exception):
    pass


def _in_lengths(x: torch.SymInt, score_shape):
    """x as a sympy polynomial of the symbols Nq, Nk when its free symbols are those of the scores' two last
    dims, each a plain symbol (dynamic shapes); else None."""
    if not isinstance(x, torch.SymInt):
        return None
    try:
        expr = x.node.expr
        syms = {}
        for name, n in ((sm.Nq, score_shape[-2]), (sm.Nk, score_shape[-1])):
            if isinstance(n, torch.SymInt) and isinstance(n.node.expr, sympy.Symbol):
                syms.setdefault(n.node.expr, name)
    except (AttributeError, IndexError):
        return None
    if not syms or not expr.free_symbols <= set(syms) or not expr.is_polynomial(*syms):
        return None
    return expr.xreplace(syms)


def _nearest_ancestor(node: fx.Node, pred):
    """Breadth-first over `node` and its inputs: the nearest node satisfying `pred`, or None."""
    seen, queue = set(), collections.deque([node])
    while queue:
        n = queue.popleft()
        if n in seen:
            continue
        seen.add(n)
        if pred(n):
            return n
        queue.extend(n.all_input_nodes)
    return None


# --------------------------------------------------------------------------------------------------
# Q, K, V recovery
# --------------------------------------------------------------------------------------------------
def _is_transpose_last2(node: fx.Node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    t = val(node)
    if t is None:
        return False
    r = t.dim()
    if node.target == aten.transpose.int:
        dims = sorted(d % r for d in node.args[1:3])
        return dims == [r - 2, r - 1]
    if node.target == aten.permute.default:
        perm = [d % r for d in node.args[1]]
        return perm == list(range(r - 2)) + [r - 1, r - 2]
    if node.target in (aten.mT.default, aten.t.default, aten.adjoint.default):
        return True
    return False


def _strip_noop_slices(node):
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.slice.Tensor:
        src, t = node.args[0], val(node)
        s = val(src)
        if s is None or t is None or tuple(s.shape) != tuple(t.shape):
            break
        node = src
    return node


def _gqa_base(node: fx.Node):
    """K/V repeated along heads -> (shared tensor, n_rep); (node, 1) when not repeated."""
    t = val(node)
    if t is None or t.dim() != 4:
        return node, 1
    if node.op == "call_function" and node.target == aten.repeat_interleave.self_int:
        src, rep = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        if isinstance(rep, int) and dim is not None and dim % 4 == 1 and val(src) is not None:
            return src, rep
    if node.op == "call_function" and node.target in (aten.reshape.default, aten.view.default,
                                                      aten._unsafe_view.default):
        ex = node.args[0]
        if isinstance(ex, fx.Node) and ex.target == aten.expand.default:
            un = _strip_noop_slices(ex.args[0])
            if isinstance(un, fx.Node) and un.target == aten.unsqueeze.default and un.args[1] % 5 == 2:
                base = _strip_noop_slices(un.args[0])
                bt, et = val(base), val(ex)
                if bt is not None and bt.dim() == 4 and et is not None and et.dim() == 5:
                    rep = et.shape[2]
                    if isinstance(rep, int) and _same(et.shape[1], bt.shape[1]) and \
                            all(_same(et.shape[i], bt.shape[j]) for i, j in ((0, 0), (3, 2), (4, 3))):
                        return base, rep
    return node, 1


def _parse_einsum(eq: str, ranks=None):
    """(a, b, out) subscripts of a two-operand einsum; `...` is spelled out with fresh letters when the
    operand ranks are given (both operands must then hold the same number of `...` dims)."""
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != 2:
        return None
    if "..." in eq:
        if ranks is None or len(ranks) != 2:
            return None
        counts = {r - len(x.replace("...", "")) for x, r in zip(ins, ranks) if "..." in x}
        if len(counts) != 1 or not all("..." in x for x in ins) or eq.count("...") != 3:
            return None
        n = counts.pop()
        fresh = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq)[:max(n, 0)]
        ins = [x.replace("...", fresh) for x in ins]
        out = out.replace("...", fresh)
    a, b = ins
    if any(len(set(s)) != len(s) for s in (a, b, out)):
        return None
    return a, b, out


class Graph:
    """Small helper for inserting nodes before a given node."""

    def __init__(self, gm: fx.GraphModule, before: fx.Node):
        self.g = gm.graph
        self.before = before

    def call(self, target, *args, **kwargs) -> fx.Node:
        with self.g.inserting_before(self.before):
            n = self.g.call_function(target, args, kwargs)
        n.meta["stack_trace"] = self.before.meta.get("stack_trace")
        return n


# --------------------------------------------------------------------------------------------------
# the pass
# --------------------------------------------------------------------------------------------------
def _manual_softmax(node: fx.Node):
    """`e / e.sum(d, keepdim=True)` (or `e.sum(d).unsqueeze(d)`) with `e = exp(x - x.amax(d, keepdim=True))`
    (or `exp(x)`), `log_softmax(x, d).exp()` or `exp(x - x.logsumexp(d, keepdim=True))`: (x, d)."""
    if node.op == "call_function" and node.target == aten.exp.default and isinstance(node.args[0], fx.Node):
        return _exp_of_log_softmax(node.args[0])
    if node.op != "call_function" or node.target != aten.div.Tensor or len(node.args) != 2:
        return None
    e, s = node.args
    if not (isinstance(e, fx.Node) and isinstance(s, fx.Node)) or val(e) is None:
        return None
    rank = val(e).dim()
    if s.target == aten.unsqueeze.default and isinstance(s.args[0], fx.Node):  # sum without keepdim, put back
        d_back, s = s.args[1] % max(rank, 1), s.args[0]
        if s.target != aten.sum.dim_IntList or (len(s.args) > 2 and s.args[2]):
            return None
    else:
        d_back = None
        if s.target != aten.sum.dim_IntList or len(s.args) < 3 or not s.args[2]:
            return None
    if len(s.args[1]) != 1 or s.kwargs.get("dtype") is not None:
        return None
    d = s.args[1][0] % max(rank, 1)
    if d_back is not None and d_back != d:
        return None
    e2 = s.args[0]
    if not all(isinstance(x, fx.Node) and x.target == aten.exp.default for x in (e, e2)):
        return None
    if e.args[0] is not e2.args[0]:
        return None
    return _strip_row_max(e.args[0], d), d


def _exp_of_log_softmax(a: fx.Node):
    """(x, d) when `a` is log_softmax(x, d) or x - x.logsumexp(d, keepdim=True), in x's own dtype."""
    if a.op != "call_function":
        return None
    if a.target == aten._log_softmax.default and not a.args[2]:
        return a.args[0], a.args[1]
    if a.target == aten.log_softmax.int and a.kwargs.get("dtype", a.args[2] if len(a.args) > 2 else None) is None:
        return a.args[0], a.args[1]
    if a.target == aten.sub.Tensor and len(a.args) == 2 and isinstance(a.args[1], fx.Node) and \
            a.kwargs.get("alpha", 1) == 1:
        lse = a.args[1]
        if lse.op == "call_function" and lse.target == aten.logsumexp.default and lse.args[0] is a.args[0] and \
                len(lse.args[1]) == 1 and (lse.args[2] if len(lse.args) > 2 else False):
            return a.args[0], lse.args[1][0]
    return None


def _strip_row_max(x, d: int):
    """x0 when `x = x0 - x0.amax(d, keepdim=True)` (or `x0.max(d, keepdim=True)[0]`, detached or not): a shift
    per row, which a softmax over d cancels; else x itself."""
    if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target == aten.sub.Tensor
            and len(x.args) == 2 and isinstance(x.args[1], fx.Node) and x.kwargs.get("alpha", 1) == 1):
        return x
    x0, m = x.args
    while m.op == "call_function" and m.target in (aten.detach.default, aten.alias.default):
        m = m.args[0]
    rank = val(x0).dim() if val(x0) is not None else 0
    if rank == 0 or d % rank != rank - 1:
        return x
    if m.target == aten.amax.default and m.args[0] is x0 and len(m.args[1]) == 1 and \
            m.args[1][0] % rank == rank - 1 and (m.args[2] if len(m.args) > 2 else False):
        return x0
    if m.target == operator.getitem and m.args[1] == 0 and m.args[0].target == aten.max.dim and \
            m.args[0].args[0] is x0 and m.args[0].args[1] % rank == rank - 1 and \
            (m.args[0].args[2] if len(m.args[0].args) > 2 else False):
        return x0
    return x


# --------------------------------------------------------------------------------------------------
# a zero fill of the probabilities with the mask of the scores' fill (ESPnet's forward_attention)
# --------------------------------------------------------------------------------------------------
# The fill value up to which a pre-softmax fill counts as "masked" (finfo(float16).min; -inf and the fp32/bf16
# finfo.min are below): the masked probabilities are then exp(fill - row max) = 0 wherever a row keeps anything.
HUGE_FILL = codegen.HUGE_FILL
# ops that give the same value, broadcast the same way against the scores (right-aligned)
_SAME_VALUE_VIEWS = {aten.expand.default, aten.alias.default, aten.clone.default, aten.contiguous.default,
                     aten.detach.default}
# deterministic, functional ops: two nodes with equal targets and equal arguments hold equal values
_PURE_OPS = {aten.eq.Scalar, aten.eq.Tensor, aten.ne.Scalar, aten.ne.Tensor, aten.lt.Scalar, aten.lt.Tensor,
             aten.le.Scalar, aten.le.Tensor, aten.gt.Scalar, aten.gt.Tensor, aten.ge.Scalar, aten.ge.Tensor,
             aten.logical_not.default, aten.bitwise_not.default, aten.logical_and.default,
             aten.logical_or.default, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.unsqueeze.default,
             aten.squeeze.dim, aten.view.default, aten.reshape.default, aten.slice.Tensor, aten.select.int,
             aten.expand.default, aten.to.dtype, aten._to_copy.default, aten.arange.default, aten.arange.start,
             aten.arange.start_step, aten.sub.Tensor, aten.add.Tensor, aten.sub.Scalar, aten.add.Scalar,
             aten.ones.default, aten.tril.default, aten.triu.default}


def _scalar_fill(x):
    """The Python number of a fill argument, else None."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _fill_of(node: fx.Node, data):
    """(mask, negated, value) when `node` replaces `data` by a number where a bool tensor says so:
    masked_fill(data, m, c) and where(m, c, data) fill where m; where(m, data, c) fills where not m."""
    if node.op != "call_function":
        return None
    a = node.args
    if node.target == aten.masked_fill.Scalar and a[0] is data and isinstance(a[1], fx.Node):
        return a[1], False, _scalar_fill(a[2])
    if node.target == aten.where.ScalarSelf and a[2] is data and a[1] is not data:
        return a[0], False, _scalar_fill(a[1])
    if node.target == aten.where.ScalarOther and a[1] is data and a[0] is not data:
        return a[0], True, _scalar_fill(a[2])
    return None


def _zero_fill_mask(node: fx.Node, p: fx.Node):
    """(mask, negated) when `node` zeroes some of the probabilities `p`; None when it is no such fill."""
    fill = _fill_of(node, p)
    if fill is None:
        return None
    m, negated, value = fill
    if value != 0.0:
        what = "a non-constant value" if value is None else repr(value)
        raise NotFusable(f"probabilities are filled with {what} by `{_op_name(node)}`{_where(node)} (only a "
                         "zero fill where the scores were masked is a no-op the kernel can reproduce)", node)
    return m, negated


def _value_root(n):
    """Strip ops that keep the value and its broadcast against the scores: expand, alias, copies, and views
    that only add or drop leading size-1 dims."""
    while isinstance(n, fx.Node) and n.op == "call_function" and n.args and isinstance(n.args[0], fx.Node):
        src = n.args[0]
        if n.target in _SAME_VALUE_VIEWS:
            n = src
            continue
        t, s = val(n), val(src)
        if n.target in (aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten.squeeze.dim) and \
                t is not None and s is not None:
            a, b = (list(t.shape), list(s.shape)) if t.dim() >= s.dim() else (list(s.shape), list(t.shape))
            lead = len(a) - len(b)
            if all(_same(x, 1) for x in a[:lead]) and all(_same(x, y) for x, y in zip(a[lead:], b)):
                n = src
                continue
        break
    return n


def _same_value(a, b, depth: int = 12) -> bool:
    """a and b provably hold the same values, broadcast the same way: one node (up to `_value_root`), or the
    same pure op on arguments that are (the mask written twice, `mask == 0` in both fills)."""
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return type(a) is type(b) and a == b
    a, b = _value_root(a), _value_root(b)
    if a is b:
        return True
    if depth == 0 or a.op != "call_function" or a.target != b.target or a.target not in _PURE_OPS:
        return False
    if len(a.args) != len(b.args) or a.kwargs != b.kwargs:
        return False
    ta, tb = val(a), val(b)
    if ta is None or tb is None or ta.dim() != tb.dim() or not all(_same(x, y) for x, y in zip(ta.shape, tb.shape)):
        return False
    return all(_same_value(x, y, depth - 1) for x, y in zip(a.args, b.args))  # constants: compared at the top


def _absorb_post_fill(expr: sympy.Basic, s_in: fx.Node, post: fx.Node, zeroed) -> sympy.Basic:
    """`softmax(fill(s, m, c)).masked_fill(m, 0)`: the post-fill zeroes probabilities that are already 0 except
    on rows where m masks every key, which it turns into 0 (NaN or the uniform average before). Proven when
    the scores' only huge-negative source is one fill of c <= HUGE_FILL with the very same mask: the score
    modification then fills with -inf and the kernel gives rows with nothing kept 0 (empty_rows_zero).
    Returns that expression; anything else is a near-miss."""
    why = f"the zero fill of the probabilities `{_op_name(post)}`{_where(post)}"
    pre = s_in
    while pre.op == "call_function" and pre.target in CASTS and isinstance(pre.args[0], fx.Node):
        pre = pre.args[0]
    data = {aten.masked_fill.Scalar: 0, aten.where.ScalarSelf: 2, aten.where.ScalarOther: 1}.get(pre.target)
    fill = _fill_of(pre, pre.args[data]) if pre.op == "call_function" and data is not None else None
    if fill is None:
        raise NotFusable(f"probabilities go to `{_op_name(post)}`{_where(post)}, not to a matmul with V (a zero "
                         "fill is a no-op only when the softmax input is a fill of the scores with the same mask; "
                         f"it is `{_op_name(pre)}`{_where(pre)})", post)
    m_pre, neg_pre, c = fill
    if neg_pre != zeroed[1] or not _same_value(m_pre, zeroed[0]):
        raise NotFusable(f"{why} uses another mask than the fill of the scores `{_op_name(pre)}`{_where(pre)}",
                         post)
    if c is None or not (c == -math.inf or c <= HUGE_FILL):
        raise NotFusable(f"{why} after a fill of the scores with {'a non-constant' if c is None else repr(c)}: "
                         f"only -inf or a finfo.min-like fill "
                         f"(<= {HUGE_FILL:g}) leaves the masked probabilities at 0", post)
    pieces = expr.args if isinstance(expr, sympy.Piecewise) else ()
    huge = [i for i, (e, _) in enumerate(pieces) if e == -sympy.oo or codegen.is_huge_fill(e)]
    if len(pieces) != 2 or pieces[1].cond != sympy.true or len(huge) != 1 or \
            not codegen.never_huge_negative(pieces[1 - huge[0]].expr):
        raise NotFusable(f"{why}: the scores have another mask or a bias that may hold -inf besides the fill "
                         f"`{_op_name(pre)}`{_where(pre)}, so rows it zeroes may differ from rows with nothing "
                         "kept", post)
    return sympy.Piecewise(*[(-sympy.oo if i == huge[0] else e, cond) for i, (e, cond) in enumerate(pieces)])


@register_pass(NAME)
def attention_pass(gm: fx.GraphModule, ctx: PassContext) -> int:
    from flashfuse.passes.attention_layouts import rewrite_layouts  # it imports this module's op sets

    # nodes nobody uses (a `qk.detach()` the caller drops, nn.MultiheadAttention's averaged weights when only
    # the output is kept) are not uses of the scores or the probabilities
    gm.graph.eliminate_dead_code()
    rewrite_layouts(gm)  # heads folded into the batch, probabilities on the right (attention_layouts.py)
    count = 0
    for node in list(gm.graph.nodes):
        manual = _manual_softmax(node)
        if (node.op == "call_function" and node.target in SOFTMAX_OPS) or manual is not None:
            try:
                desc = _fuse_one(gm, node, ctx, manual)
            except NotFusable as e:
                ctx.graph_report.add_near_miss(NAME, e.node or node, str(e))
                continue
            if desc is not None:
                count += 1
    return count


def _check_scores_stay_inside(builder, S: fx.Node, pv: fx.Node) -> None:
    """The scores, raw or modified, used outside the attention (returned, an auxiliary loss): fusing would
    keep them alive and compute QKᵀ twice. Nodes on the way from S to the softmax are the builder's memo
    entries downstream of S; a user off that way that does not lead to P·V is such a use."""
    region, todo = {S}, [S]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in builder.memo and u not in region:
                region.add(u)
                todo.append(u)
    for n in region:
        for u in n.users:
            if u not in region and u is not pv and not downstream(u, lambda x: x is pv, 255):
                raise NotFusable(f"the scores are also used by `{_op_name(u)}`{_where(u)}: fused, QKᵀ would be "
                                 "computed twice", u)


def _one_dtype(q: fx.Node, k: fx.Node, v: fx.Node, S: fx.Node):
    """Q, K, V in one dtype, as the kernel takes them. `q.float() @ k.float().mT` with V in half precision
    (scores formed in fp32, probabilities cast back before P·V) reads the half-precision Q and K: the upcast is
    exact and the kernel accumulates QKᵀ in fp32 as the fp32 matmul does."""
    dtypes = {val(x).dtype for x in (q, k, v)}
    if len(dtypes) == 1:
        return q, k, v
    stripped = [strip_upcast(x) for x in (q, k, v)]
    if len({val(x).dtype for x in stripped}) == 1:
        return tuple(stripped)
    raise NotFusable(f"Q, K and V have different dtypes ({', '.join(str(val(x).dtype) for x in (q, k, v))})", S)


def _alias_base(node):
    """The tensor whose memory `node` reads: through view ops (their schema returns an alias) to the base."""
    while isinstance(node, fx.Node) and node.op == "call_function":
        src = node
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            src = node.args[0]
        target = src.target
        if not (isinstance(target, torch._ops.OpOverload) and src.args and isinstance(src.args[0], fx.Node)
                and any(r.alias_info is not None for r in target._schema.returns)):
            break
        node = src.args[0]
    return node


def _check_no_write_before_pv(gm: fx.GraphModule, S: fx.Node, pv: fx.Node, builder) -> None:
    """The fused op runs where P·V stood and reads Q, K and the side tensors there, where eager's ops read them
    earlier (Q, K at QKᵀ, a side where the score modification uses it): an in-place write in between to one of
    them (`k.mul_(2)`, a cache written through a view of K) would reach the kernel but not eager. A write that
    produces the value before its first read (`bias *= cls_mask` and then `s + bias`) is no such write."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first_read = {}  # alias base -> the earliest position eager reads a fused operand on it
    for x, readers in [(x, [S]) for x in S.all_input_nodes] + \
            [(side, [u for u in side.users if u in builder.memo] or [S]) for side in builder.sides]:
        if isinstance(x, fx.Node):
            base = _alias_base(x)
            at = min(order[u] for u in readers)
            first_read[base] = min(first_read.get(base, at), at)
    for n in gm.graph.nodes:
        if not order[S] <= order[n] < order[pv]:
            continue
        if not mutates(n):
            continue
        schema = n.target._schema
        writes = [arg for arg in schema.arguments if arg.alias_info is not None and arg.alias_info.is_write]
        written = [a for a, arg in zip(n.args, schema.arguments) if arg in writes]
        written += [n.kwargs[arg.name] for arg in writes if arg.name in n.kwargs]
        late = [w for w in written
                if not isinstance(w, fx.Node) or order[n] > first_read.get(_alias_base(w), order[pv])]
        if not written or late:
            raise NotFusable(f"`{_op_name(n)}`{_where(n)} writes in place between QKᵀ and P·V to a tensor the "
                             "scores read (fused, the kernel would read it after the write)", n)


def downstream(node: fx.Node, found, limit: int) -> bool:
    """`found(u)` holds for some node u downstream of `node`, through any ops, within `limit` nodes."""
    seen, todo = set(), [node]
    while todo and len(seen) < limit:
        n = todo.pop()
        for u in n.users:
            if found(u):
                return True
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return False


def _softmax_dim(node: fx.Node) -> int:
    return node.args[1] if len(node.args) > 1 else node.kwargs["dim"]


def _fuse_one(gm: fx.GraphModule, softmax: fx.Node, ctx: PassContext, manual=None) -> str | None:
    s_in, dim = manual if manual is not None else (softmax.args[0], _softmax_dim(softmax))
    s_in = _strip_row_max(s_in, dim)  # `s - s.amax(-1, keepdim=True).detach()`: the softmax cancels it
    sv = val(s_in)
    if sv is None:
        return None
    rank = sv.dim()
    if dim % rank != rank - 1:
        raise NotFusable(f"softmax over dim {dim} of the {rank}-d scores, not the last dim (the kernel takes the keys "
                         "there)", softmax)

    # 2. forwards: probabilities -> (casts, dropout, a zero fill) -> P @ V, nobody else reading them
    chain, cur, dropout_p, post_fill = [softmax], softmax, 0.0, None
    while True:
        users = list(cur.users)
        if not users:
            return None
        if len(users) != 1:
            ordered = [n for n in gm.graph.nodes if n in users]
            u = next((x for x in ordered if x.target not in PASS_THROUGH | DROPOUT_OPS | MATMUL_OPS), ordered[-1])
            what = "returned from the graph" if u.op == "output" else f"used by `{_op_name(u)}`{_where(u)}"
            raise NotFusable(f"probabilities also {what}", u)
        nxt = users[0]
        if nxt.op != "call_function":
            raise NotFusable("probabilities are returned from the graph", softmax)
        if nxt.target in PASS_THROUGH:
            chain.append(nxt)
            cur = nxt
            continue
        if nxt.target in DROPOUT_OPS:
            p, train = nxt.args[1], nxt.args[2]
            if isinstance(p, fx.Node) or isinstance(train, fx.Node):
                raise NotFusable("dropout probability or training flag is not a constant", nxt)
            if train and p > 0:
                if dropout_p:
                    raise NotFusable("two dropouts on the probabilities", nxt)
                dropout_p = float(p)
            chain.append(nxt)
            cur = nxt
            continue
        if nxt.target in MATMUL_OPS:
            pv = nxt
            break
        zeroed = _zero_fill_mask(nxt, cur)
        if zeroed is not None:  # ESPnet: softmax(s.masked_fill(m, min)).masked_fill(m, 0); checked below
            if post_fill is not None:
                raise NotFusable("two fills on the probabilities", nxt)
            post_fill = (nxt, zeroed)
            chain.append(nxt)
            cur = nxt
            continue
        raise NotFusable(f"probabilities go to `{_op_name(nxt)}`{_where(nxt)}, not to a matmul with V", nxt)
    if dropout_p >= 1.0:
        raise NotFusable(f"dropout p={dropout_p} drops everything", pv)

    # 3. backwards: the score modification
    builder = ScoreModBuilder(s_in, sv.shape)
    expr = builder.build()
    S = builder.score_node
    if post_fill is not None:
        expr = _absorb_post_fill(expr, s_in, *post_fill)
    _check_scores_stay_inside(builder, S, pv)

    # Q, K from S;  V from P @ V
    q_node, kt_node, _ = _mm_operands(S, which="qk")
    p_side, v_node, out_perm = _mm_operands(pv, which="pv")
    if p_side is not chain[-1]:
        raise NotFusable("probabilities are the right operand of the matmul (P·V expected)", pv)
    _check_no_write_before_pv(gm, S, pv, builder)
    qv, ktv, vv, ov = val(q_node), val(kt_node), val(v_node), val(pv)
    # K and V may be one (M, d) matrix shared by every batch and head (memory tokens): matmul broadcasts it,
    # and the kernel reads it through a stride-0 view (_to4d, _broadcast_batch)
    shared = [x.dim() == 2 and rank in (3, 4) for x in (ktv, vv)]
    if qv.dim() != rank or ov.dim() != rank or any(x.dim() != rank and not ok for x, ok in zip((ktv, vv), shared)):
        raise NotFusable("Q, K, V and the scores do not have the same rank (broadcasting matmul)", S)
    if not qv.is_floating_point() or qv.dtype == torch.float64:
        raise NotFusable(f"dtype {qv.dtype} is not supported by the kernel (fp16, bf16, fp32)", S)
    from torch.fx.experimental.symbolic_shapes import guard_int

    d, dv = guard_int(qv.shape[-1]), guard_int(vv.shape[-1])  # the kernel specializes on head dims
    for what, x in (("head dim", d), ("value head dim", dv)):
        if x > MAX_HEAD_DIM:
            raise NotFusable(f"{what} {x} > {MAX_HEAD_DIM} is not supported by the kernel", S)
    for other in (ktv, vv):
        for i, (a, b) in enumerate(zip(qv.shape[:-2], other.shape[:-2])):
            if not (_same(a, b) or _same(b, 1)):
                raise NotFusable("Q, K, V batch/head dims differ (broadcasting matmul)", S)
    if any(_same(a, 1) and not _same(b, 1) for x in (ktv, vv) for a, b in zip(qv.shape[:-2], x.shape[:-2])):
        raise NotFusable("K/V have more batch/head entries than Q (broadcasting matmul)", S)

    g = Graph(gm, pv)
    # K as (.., Nk, d): undo the transpose if there is one, else take a transposed view
    if kt_node is not None and _is_transpose_last2(kt_node) and val(kt_node.args[0]) is not None and \
            val(kt_node.args[0]).dim() == rank:
        k_node = kt_node.args[0]
    else:
        k_node = g.call(aten.transpose.int, kt_node, -2, -1)
        k_node.meta["val"] = ktv.transpose(-2, -1)
    q_node, k_node, v_node = _one_dtype(q_node, k_node, v_node, S)
    qv = val(q_node)
    if rank == 5:
        q4, k4, v4, k_rep, merged = _merge_rank5(g, q_node, k_node, v_node, S)
        sides4 = [_merge_side(g, s, merged, sv.shape) for s in builder.sides]
    else:
        k_base, k_rep = _gqa_base(k_node)
        v_base, v_rep = _gqa_base(v_node)
        if k_rep != v_rep:
            k_base, k_rep, v_base, v_rep = k_node, 1, v_node, 1
        # sides as 4-D views, rank-aligned with the scores
        sides4 = [_to4d(g, s, rank) for s in builder.sides]
        q4, k4, v4 = (_to4d(g, x, rank) for x in (q_node, k_base, v_base))
    k4, v4 = (_broadcast_batch(g, x, val(q4)) for x in (k4, v4))

    # dropout seed, drawn from torch's generator so manual_seed reproduces it
    rng = None
    if dropout_p > 0:
        rng = g.call(aten.randint.low, 0, 2**31 - 1, [2], dtype=torch.int64, device=qv.device)
        rng.meta["val"] = torch.empty(2, dtype=torch.int64, device=qv.device)

    # autocast: matmuls in the region run in the autocast dtype; the op must see those dtypes too
    ac_dtype = _autocast_dtype(gm, pv, qv.device.type)
    if ac_dtype is not None:
        q4, k4, v4 = (g.call(aten.to.dtype, x, ac_dtype) for x in (q4, k4, v4))

    text = sm.to_text(expr)
    _check_kernel_can_print(text, len(builder.sides), S)
    precision = ctx.config.fp32_precision
    # under CUDA graphs a mask cannot be re-checked per call (replays skip the op's Python): keep it a tensor
    att = g.call(torch.ops.flashfuse.attention.default, q4, k4, v4, sides4, [], text, dropout_p, rng,
                 precision, not ctx.cuda_graphs, *([True] if post_fill is not None else []))
    if requires_grad(pv):
        attention_op.expect_backward()  # a training graph: the forward's first call starts the backward's builds
        att.meta["flashfuse_backward"] = True  # and build_ahead queues them at compile time
    out = g.call(operator.getitem, att, 0)
    out_final = out
    if rank != 4:
        canon_shape = list(ov.shape) if out_perm is None else [ov.shape[out_perm.index(i)] for i in range(rank)]
        out_final = g.call(aten.reshape.default, out, canon_shape)
    if out_perm is not None:
        out_final = g.call(aten.permute.default, out_final, out_perm)
    out_dtype = ac_dtype or qv.dtype
    if ov.dtype != out_dtype and ac_dtype is None:
        out_final = g.call(aten.to.dtype, out_final, ov.dtype)
    pv.replace_all_uses_with(out_final)
    # the op's output is stored (B, N, H, Dv)-contiguous (op.empty_bnhd): say so where it is the result itself,
    # a later pass that reads strides (a view that needs contiguity) must not see P·V's contiguous layout
    out_final.meta["val"] = ov if out_final is not out else \
        ov.new_empty((ov.shape[0], ov.shape[2], ov.shape[1], ov.shape[3])).transpose(1, 2)

    description = _describe(gm, expr, builder, dropout_p, qv, ktv, k_rep, rank, ctx.example_inputs,
                            ctx.cuda_graphs, post_fill is not None)
    ctx.graph_report.add_match(NAME, pv, description, score_mod=str(expr), dropout_p=dropout_p,
                               gqa=k_rep, head_dim=d, sides=list(builder.side_desc))
    # the original nodes are now dead; the pipeline's dead-code elimination removes them
    return description


def _mm_operands(node: fx.Node, which: str):
    """(left, right, out_perm): operands of a matmul as (.., M, K) and (.., K, N) views (einsum operands
    are permuted) and the permutation from (.., M, N) to the node's output order (None if identity)."""
    if node.target in (aten.matmul.default, aten.bmm.default, aten.mm.default):
        return node.args[0], node.args[1], None
    if node.target == aten.baddbmm.default:
        return node.args[1], node.args[2], None
    ranks = [val(x).dim() if isinstance(x, fx.Node) and val(x) is not None else None for x in node.args[1]]
    eq = _parse_einsum(node.args[0], ranks if None not in ranks else None)
    if eq is None or len(node.args[1]) != 2:
        raise NotFusable(f"einsum '{node.args[0]}' is not a batched matmul flashfuse can read", node)
    a_s, b_s, out_s = eq
    a, b = node.args[1]
    a, a_s, b, b_s = _broadcast_einsum_batch(node, which, a, a_s, b, b_s, out_s)
    contracted = [c for c in a_s if c in b_s and c not in out_s]
    if len(contracted) != 1:
        raise NotFusable(f"einsum '{node.args[0]}' contracts {len(contracted)} dims (1 expected)", node)
    c = contracted[0]
    i_l = [x for x in a_s if x in out_s and x not in b_s]
    j_l = [x for x in b_s if x in out_s and x not in a_s]
    if which == "qk" and len(i_l) == 1 and len(j_l) == 1 and out_s.index(i_l[0]) > out_s.index(j_l[0]):
        a, b, a_s, b_s, i_l, j_l = b, a, b_s, a_s, j_l, i_l  # written (k, q): the same scores
    # scores keep the output's dim order; for P·V the probabilities (left) are already in the scores' order
    order = out_s if which == "qk" else a_s
    batch = [x for x in order if x in a_s and x in b_s and x in out_s]
    canonical = "".join(batch) + "".join(i_l) + "".join(j_l)
    if len(i_l) != 1 or len(j_l) != 1 or sorted(out_s) != sorted(canonical) or \
            set(a_s) != set(batch + i_l + [c]) or set(b_s) != set(batch + j_l + [c]):
        raise NotFusable(f"einsum '{node.args[0]}' is not a batched matmul (..ik,..kj->..ij)", node)
    out_perm = None
    if out_s != canonical:
        if which == "qk":
            raise NotFusable(f"einsum '{node.args[0]}' puts the scores' axes in another order", node)
        out_perm = [canonical.index(x) for x in out_s]
    g = Graph(node.graph.owning_module, node)
    av, bv = val(a), val(b)
    perm_a = [a_s.index(x) for x in batch + i_l + [c]]
    perm_b = [b_s.index(x) for x in batch + [c] + j_l]
    if perm_a != list(range(len(a_s))):
        a2 = g.call(aten.permute.default, a, perm_a)
        a2.meta["val"] = av.permute(perm_a)
        a = a2
    if perm_b != list(range(len(b_s))):
        b2 = g.call(aten.permute.default, b, perm_b)
        b2.meta["val"] = bv.permute(perm_b)
        b = b2
    return a, b, out_perm


def _broadcast_einsum_batch(node: fx.Node, which: str, a, a_s: str, b, b_s: str, out_s: str):
    """An einsum operand without one of the other's batch letters (`b h i d, b j d -> b h i j`: one K/V
    head for all query heads, PaLM's multi-query attention) gets that letter as a size-1 dim, so the matmul
    broadcasts it as `k[:, None]` would."""
    if which == "qk":
        own = {out_s[-2], out_s[-1]} if len(out_s) >= 2 else set()  # the rows and columns of the scores
    else:
        own = {a_s[-2] if len(a_s) >= 2 else None, b_s[-1] if b_s else None}
    g = None
    for missing_from, other_s in (("b", a_s), ("a", b_s)):
        have = b_s if missing_from == "b" else a_s
        for x in [x for x in other_s if x in out_s and x not in have and x not in own]:
            g = g or Graph(node.graph.owning_module, node)
            t = b if missing_from == "b" else a
            u = g.call(aten.unsqueeze.default, t, 0)
            u.meta["val"] = val(t).unsqueeze(0)
            if missing_from == "b":
                b, b_s = u, x + b_s
            else:
                a, a_s = u, x + a_s
    return a, a_s, b, b_s


def _to4d(g: Graph, node: fx.Node, rank: int) -> fx.Node:
    """Views (no copies): right-align to the scores' rank, then to (B, H, N, X)."""
    t = val(node)
    cur, cur_t = node, t
    for _ in range(rank - t.dim()):
        cur = g.call(aten.unsqueeze.default, cur, 0)
        cur_t = cur_t.unsqueeze(0)
        cur.meta["val"] = cur_t
    insert = {4: [], 3: [1], 2: [0, 0]}[rank]
    for d in insert:
        cur = g.call(aten.unsqueeze.default, cur, d)
        cur_t = cur_t.unsqueeze(d)
        cur.meta["val"] = cur_t
    return cur


def _merged_shape(shape, i: int) -> list:
    return [*shape[:i], shape[i] * shape[i + 1], *shape[i + 2:]]


def _view_ok(t: torch.Tensor, shape) -> bool:
    try:
        t.view(shape)
        return True
    except (RuntimeError, ValueError):  # fake tensors raise ValueError
        return False


def _merge_rank5(g: Graph, q: fx.Node, k: fx.Node, v: fx.Node, S: fx.Node):
    """(q4, k4, v4, GQA group, i): rank-5 q, k (.., Nk, d), v as 4-D views with leading dims i, i+1 merged.
    Dims (1, 2) merge into heads when Q's are a view; K/V either merge the same way or have size 1 on dim 2
    (a group of query heads shares each K/V head: GQA by index mapping, h // group). Otherwise dims (0, 1)
    merge into the batch. No copies: anything else is not fused."""
    qv = val(q)
    for i in (1, 0):
        if not _view_ok(qv, _merged_shape(qv.shape, i)):
            continue
        out, group = [], 1
        for x in (k, v):
            t = val(x)
            if _same(t.shape[i], qv.shape[i]) and _same(t.shape[i + 1], qv.shape[i + 1]) and \
                    _view_ok(t, _merged_shape(t.shape, i)):
                out.append((x, aten.reshape.default, _merged_shape(t.shape, i)))
            elif _same(t.shape[i + 1], 1) and (i == 1 or _same(t.shape[i], 1)):
                out.append((x, aten.squeeze.dim, i + 1))  # K/V shared by the merged dim's inner part
                group = qv.shape[2] if i == 1 else 1
            else:
                break
        else:
            if out[0][1] != out[1][1]:
                continue  # K and V must end with the same heads
            q4 = g.call(aten.reshape.default, q, _merged_shape(qv.shape, i))
            q4.meta["val"] = qv.reshape(_merged_shape(qv.shape, i))
            kv4 = []
            for x, op, arg in out:
                n = g.call(op, x, arg)
                n.meta["val"] = op(val(x), arg)
                kv4.append(n)
            return q4, kv4[0], kv4[1], group, i
    raise NotFusable("rank-5 scores whose leading dims do not merge into (batch, heads) without copying Q, K or V",
                     S)


def _merge_side(g: Graph, node: fx.Node, i: int, score_shape) -> fx.Node:
    """A side of rank-5 scores as 4-D with dims i, i+1 merged: a view when it can be, else expanded over
    those two dims and copied (what eager materialises for the scores anyway)."""
    t = val(node)
    cur = node
    for _ in range(5 - t.dim()):
        cur = g.call(aten.unsqueeze.default, cur, 0)
        t = t.unsqueeze(0)
        cur.meta["val"] = t
    if _same(t.shape[i], 1) and _same(t.shape[i + 1], 1):
        out = g.call(aten.squeeze.dim, cur, i + 1)
        out.meta["val"] = t.squeeze(i + 1)
        return out
    full = _same(t.shape[i], score_shape[i]) and _same(t.shape[i + 1], score_shape[i + 1])
    if not (full and _view_ok(t, _merged_shape(t.shape, i))):
        sizes = [-1] * 5
        sizes[i], sizes[i + 1] = score_shape[i], score_shape[i + 1]
        cur = g.call(aten.expand.default, cur, sizes)
        t = t.expand(*[score_shape[d] if d in (i, i + 1) else t.shape[d] for d in range(5)])
        cur.meta["val"] = t
    out = g.call(aten.reshape.default, cur, _merged_shape(t.shape, i))
    out.meta["val"] = t.reshape(_merged_shape(t.shape, i))
    return out


@functools.lru_cache(maxsize=256)
def _kernel_source_error(text: str, n_sides: int) -> str:
    """'' if the Triton code generator can print this score_mod (forward and every gradient), else why."""
    from flashfuse.kernels.attention import codegen

    try:
        codegen.generate_source(text, n_sides, 0, (True,) * n_sides)
    except codegen.UnsupportedExpression as exc:
        return str(exc)
    return ""


def _check_kernel_can_print(text: str, n_sides: int, node: fx.Node) -> None:
    """Decide at compile time, not at the first call: an expression the kernel cannot print is not fused."""
    err = _kernel_source_error(text, n_sides)
    if err:
        raise NotFusable(f"the score modification has a term the kernel generator cannot print ({err})", node)


def _broadcast_batch(g: Graph, node: fx.Node, q4) -> fx.Node:
    """K/V with a size-1 batch dim where Q has B: an expand view (stride 0). A size-1 head dim stays:
    the kernel maps every query head onto it (MQA)."""
    t = val(node)
    if _same(t.shape[0], q4.shape[0]):
        return node
    sizes = [q4.shape[0], -1, -1, -1]
    out = g.call(aten.expand.default, node, sizes)
    out.meta["val"] = t.expand(q4.shape[0], *t.shape[1:])
    return out


def _autocast_dtype(gm: fx.GraphModule, at: fx.Node, device_type: str):
    """The autocast dtype in force at node `at` for `device_type` (None when autocast is off)."""
    from flashfuse.passes.eltwise_chain import autocast_state
    return autocast_state(gm, at).get(device_type)


def _concrete_side(gm: fx.GraphModule, node: fx.Node, example_inputs) -> torch.Tensor | None:
    """The value of a side tensor that is a (sliced) graph input, from the real example inputs; None if it is
    computed, or the inputs are fake. Used for the report only, never to decide what to compute."""
    from torch._subclasses.fake_tensor import FakeTensor

    slices, n = [], node  # slices and views, outermost first
    while n.op == "call_function" and n.target in (aten.slice.Tensor, aten.view.default, aten.reshape.default,
                                                   aten.unsqueeze.default):
        slices.append(n)
        n = n.args[0]
    if n.op != "placeholder":
        return None
    placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
    i = placeholders.index(n)
    if i >= len(example_inputs):
        return None
    t = example_inputs[i]
    if not isinstance(t, torch.Tensor) or isinstance(t, FakeTensor):
        return None
    for sl in reversed(slices):
        if sl.target != aten.slice.Tensor:  # a view: the node's own output shape
            shape = tuple(val(sl).shape)
            if not all(isinstance(x, int) for x in shape):
                return None
            t = t.reshape(shape)
            continue
        dim = sl.args[1] if len(sl.args) > 1 else 0
        start = sl.args[2] if len(sl.args) > 2 and isinstance(sl.args[2], int) else 0
        length = val(sl).shape[dim]  # the slice's own output length (a size hint under dynamic shapes)
        t = t.narrow(dim, start, length if isinstance(length, int) else int(length.node.hint))
    return t


def _side_words(gm, builder: ScoreModBuilder, expr, example_inputs, cuda_graphs: bool, nq, nk) -> list[str]:
    """'causal (tril buffer ...)' for a mask input that is lower-triangular now, 'key positions (...)' for a
    row or column equal to 0..n-1 now (an `arange` buffer), else kind and shape."""
    from flashfuse.kernels.attention import mask_recognition
    from flashfuse.kernels.attention.op import device_mask_check_enabled

    words = []
    for i, (node, desc) in enumerate(zip(builder.sides, builder.side_desc)):
        t = _concrete_side(gm, node, example_inputs)
        pattern = None
        if t is not None and t.dim() == 4 and mask_recognition.side_conditions(expr, i):
            pattern = mask_recognition._nonzero_pattern(t, t.shape[2], t.shape[3])
        if pattern is not None and torch.equal(pattern, torch.ones_like(pattern).tril(pattern.shape[1] - pattern.shape[0])):
            how = "verified at run time"
            if cuda_graphs:  # the op reads the switch when it runs; the report says what it is now
                how = ("checked on the device at every replay" if device_mask_check_enabled()
                       else "loaded per tile: not re-checked under CUDA graphs")
            words.append(f"causal (tril buffer {_shape_str(t.shape)}, {how})")
        elif (padding := _key_padding_words(t, expr, i, nq, nk, cuda_graphs)) is not None:
            words.append(padding)
        elif (t is not None and isinstance(nq, int) and isinstance(nk, int)
              and mask_recognition._index_side(t, nq, nk) is not None):
            axis = "key" if mask_recognition._index_axis(t, nq, nk) == sm.kv_idx else "query"
            how = ("loaded per tile under CUDA graphs" if cuda_graphs
                   else f"verified at run time: the {axis} index, not a load")
            words.append(f"{axis} positions (arange {_shape_str(t.shape)}, {how})")
        else:
            words.append(desc)
    return words


def _key_padding_words(t, expr, i: int, nq, nk, cuda_graphs: bool) -> str | None:
    """'key padding (...)' for a mask input that holds key padding now (alone or with causal, as HF models
    build it): right padding runs as key counts (loop bounds), other padding as one row of keys."""
    from flashfuse.kernels.attention import mask_recognition

    if t is None or not isinstance(nq, int) or not isinstance(nk, int) or t.dim() != 4:
        return None
    conds = mask_recognition.side_conditions(expr, i)
    if conds:
        keeps = mask_recognition._kept_where(expr, conds)
        found = mask_recognition._key_padding(t, nq, nk, keeps) if keeps is not None else None
        if found is None:
            return None
        causal, kind, _, _ = found
    elif isinstance(expr, sympy.Add) and mask_recognition._additive_key_padding(expr, i, t, nk) is not None:
        causal, kind = False, "counts"
    else:
        return None
    what = "key padding" + (" & causal" if causal else "")
    if cuda_graphs:  # mask_check.py: per-batch masks with conditions get key counts on the device
        from flashfuse.kernels.attention.op import device_mask_check_enabled
        on_device = (device_mask_check_enabled() and kind == "counts" and nq == nk and t.shape[0] > 1
                     and mask_recognition.side_conditions(expr, i))
        how = "key counts checked on the device at every replay" if on_device else "loaded per tile under CUDA graphs"
        return f"{what} ({_shape_str(t.shape)}, {how})"
    how = "key counts: blocks past them skipped" if kind == "counts" else "one row of keys per block"
    return f"{what} ({_shape_str(t.shape)}, {how}; verified at run time)"


def _is_causal_condition(c) -> bool:
    """c is `kv_idx <= q_idx + d` (a kept condition) or `kv_idx > q_idx + d` (a masked one), d in {0, Nk - Nq}:
    the future is masked. Windows, anti-causal and non-linear index conditions are not."""
    from flashfuse.kernels.attention.codegen import linear_bound

    lb = linear_bound(c)
    if lb is None or lb.alpha != 1:
        return False
    offsets = (0, sm.Nk - sm.Nq) if lb.upper else (1, sm.Nk - sm.Nq + 1)
    return any(sympy.simplify(lb.beta - d) == 0 for d in offsets)


def _describe(gm, expr, builder: ScoreModBuilder, dropout_p: float, qv, ktv, rep: int, rank: int,
              example_inputs, cuda_graphs: bool = False, empty_rows_zero: bool = False) -> str:
    """The specialization in words, e.g. 'causal, scale 0.125, dropout p=0.1, GQA 4:1, d=64'."""
    parts = []
    index_conds = [c for c in expr.atoms(sympy.core.relational.Relational) if _is_index_only(c)
                   and c.free_symbols & {sm.q_idx, sm.kv_idx}]
    if len(index_conds) == 1 and _is_causal_condition(index_conds[0]):
        parts.append("causal")
    elif len(index_conds) >= 2:
        parts.append("sliding window / banded mask")
    elif index_conds:
        parts.append("index mask")
    parts += _side_words(gm, builder, expr, example_inputs, cuda_graphs, qv.shape[-2], ktv.shape[-1])
    unmasked = expr.args[-1].expr if isinstance(expr, sympy.Piecewise) else expr
    coeff = unmasked.coeff(sm.score) if unmasked.is_Add or unmasked.is_Mul else None
    if coeff is not None and coeff.is_Number and coeff != 0:
        parts.append(f"scale {float(coeff):.4g}")
    for t in expr.atoms(sympy.tanh):
        cap = (expr.args[-1].expr if isinstance(expr, sympy.Piecewise) else expr).coeff(t)
        parts.append(f"tanh softcap {float(cap):g}" if cap.is_Number and cap != 0 else "tanh softcap")
    if dropout_p:
        parts.append(f"dropout p={dropout_p:g}")
    if empty_rows_zero:
        parts.append("probabilities zeroed where masked (fully masked rows give 0)")
    if rep > 1:
        parts.append(f"GQA {rep}:1")
    nq, nk = qv.shape[-2], ktv.shape[-1]
    if not _same(nq, nk):
        parts.append(f"cross-attention Nq={nq} Nk={nk}")
    parts.append(f"d={qv.shape[-1]}")
    if rank != 4:
        parts.append(f"{rank}-D inputs")
    if isinstance(nq, int) and isinstance(nk, int):
        text = sm.to_text(expr)
        if codegen.fills_as_masks(text, nq, nk) != text:
            parts.append(f"its huge fill runs as -inf at Nq={nq}, Nk={nk} (no row is all fill: masked blocks "
                         "skipped)")
    parts.append(f"score = {expr}")
    return ", ".join(parts)
