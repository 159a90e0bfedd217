"""The captured score modification: a sympy expression, its text form, and a torch evaluator.

The attention pass turns the elementwise DAG between S = Q·Kᵀ and the softmax into one expression over
    score            the raw dot product q·k (fp32)
    b, h             batch and (query) head index
    q_idx, kv_idx    query and key position
    Nq, Nk           sequence lengths (so causal alignment stays symbolic under dynamic shapes)
    side0, side1 ..  side tensors, each loaded at [b, h, q_idx, kv_idx] through its broadcast strides
                     (bool sides read as 1/0)
    scalar0 ..       runtime scalars (e.g. a scale computed from a symbolic size)
An element whose expression is -oo is masked out. The kernels print this expression (and its derivative
w.r.t. `score` and the sides) as Triton code; the reference evaluates it with torch.
"""
from __future__ import annotations

import functools

import sympy
import torch

score, b, h, q_idx, kv_idx, Nq, Nk = sympy.symbols("score b h q_idx kv_idx Nq Nk")
INDEX_SYMBOLS = (b, h, q_idx, kv_idx, Nq, Nk)


def side(i: int) -> sympy.Symbol:
    return sympy.Symbol(f"side{i}")


def scalar(i: int) -> sympy.Symbol:
    return sympy.Symbol(f"scalar{i}")


class key_count(sympy.Function):
    """key_count(side_j): how many keys batch b / head h keeps, read from side j (one integer per batch and
    head). Only mask_recognition writes it (right padding: `kv_idx >= key_count(side_j)` is masked), so it
    never stands for anything a user wrote; the kernels turn it into a loop bound (codegen.kv_len)."""
    is_integer = True
    nargs = 1


def to_text(expr: sympy.Basic) -> str:
    """A stable text form of the expression (the op's `score_mod` argument, and a cache key)."""
    return sympy.srepr(expr)


@functools.lru_cache(maxsize=512)
def from_text(text: str) -> sympy.Basic:
    """Inverse of `to_text`: srepr is sympy's own constructor syntax."""
    ns = {name: getattr(sympy, name) for name in dir(sympy) if not name.startswith("_")}
    ns["ExprCondPair"] = sympy.functions.elementary.piecewise.ExprCondPair
    ns["true"], ns["false"] = sympy.true, sympy.false
    ns["key_count"] = key_count
    return eval(text, {"__builtins__": {}}, ns)


def uses_index(expr: sympy.Basic) -> bool:
    return bool(expr.free_symbols & set(INDEX_SYMBOLS))


def side_ids(expr: sympy.Basic) -> list[int]:
    return sorted(int(s.name[4:]) for s in expr.free_symbols if s.name.startswith("side"))


def add_terms_in_order(e: sympy.Add) -> list:
    """The terms of a sum in the order to add them in floating point: terms without `score` first, then
    those with it. Masks like `(1 - m) * finfo.min` expand to `min - min*m`; adding the score in between
    would lose it (min + s - min == 0 in fp32) where eager computes the mask first. Among the terms without
    the score, a number comes first together with the terms whose coefficient cancels it (`-c + c*m`, the
    expanded `(m - 1) * c`), so a bias added beside such a mask is not lost in the huge sum either. Printers
    of the expression (the Triton codegen, `evaluate`) add in this order."""
    free = [a for a in e.args if not a.has(score)]
    with_score = [a for a in e.args if a.has(score)]
    numbers = [a for a in free if a.is_Number]
    if numbers:
        c = abs(numbers[0])
        first = [a for a in free if a.is_Number or abs(a.as_coeff_Mul()[0]) == c]
        free = first + [a for a in free if not any(a is f for f in first)]
    return free + with_score


def real_diff(expr: sympy.Basic, sym: sympy.Symbol) -> sympy.Basic:
    """d expr / d sym with every symbol taken as real (scores, indices and side values are): sympy's
    derivative of |x| over complex symbols is written with re / im, which no printer knows; over reals it is
    sign(x)."""
    reals = {s: sympy.Symbol(s.name, real=True) for s in expr.free_symbols}
    back = {r: s for s, r in reals.items()}
    return sympy.diff(expr.xreplace(reals), reals.get(sym, sym)).xreplace(back)


# ---- evaluation with torch (used by the reference implementation and by the tests) ----

_UNARY = {
    sympy.tanh: torch.tanh, sympy.exp: torch.exp, sympy.log: torch.log, sympy.Abs: torch.abs,
    sympy.sin: torch.sin, sympy.cos: torch.cos, sympy.floor: torch.floor, sympy.ceiling: torch.ceil,
    sympy.sign: torch.sign, sympy.erf: torch.erf, sympy.sqrt: torch.sqrt,
    key_count: lambda t: t,
}
_RELATIONS = {
    sympy.StrictLessThan: torch.lt, sympy.LessThan: torch.le, sympy.StrictGreaterThan: torch.gt,
    sympy.GreaterThan: torch.ge, sympy.Equality: torch.eq, sympy.Unequality: torch.ne,
}


def evaluate(expr: sympy.Basic, env: dict[str, torch.Tensor | float]):
    """Evaluate `expr` with torch; `env` maps symbol names to tensors that broadcast together."""

    def ev(e):
        if e.is_Symbol:
            return env[e.name]
        if e is sympy.true:
            return True
        if e is sympy.false:
            return False
        if e.is_Number:
            if e in (sympy.oo, -sympy.oo):
                return float(e)
            return float(e)
        if isinstance(e, sympy.Add):
            out = None
            for a in add_terms_in_order(e):
                out = ev(a) if out is None else out + ev(a)
            return out
        if isinstance(e, sympy.Mul):
            out = ev(e.args[0])
            for a in e.args[1:]:
                out = out * ev(a)
            return out
        if isinstance(e, sympy.Pow):
            base, ex = ev(e.args[0]), e.args[1]
            if ex == sympy.Rational(1, 2):
                return torch.sqrt(torch.as_tensor(base))
            if ex == -1:
                return 1.0 / base
            return base ** ev(ex)
        if isinstance(e, sympy.Piecewise):
            out = None
            for value, cond in reversed(e.args):
                v = ev(value)
                if out is None:
                    out = torch.as_tensor(v) if cond is sympy.true else torch.as_tensor(float("nan"))
                    if cond is sympy.true:
                        continue
                c = ev(cond)
                out = torch.where(torch.as_tensor(c), torch.as_tensor(v), out)
            return out
        if type(e) in _RELATIONS:
            return _RELATIONS[type(e)](torch.as_tensor(ev(e.args[0])), torch.as_tensor(ev(e.args[1])))
        if isinstance(e, sympy.And):
            out = torch.as_tensor(ev(e.args[0]))
            for a in e.args[1:]:
                out = out & torch.as_tensor(ev(a))
            return out
        if isinstance(e, sympy.Or):
            out = torch.as_tensor(ev(e.args[0]))
            for a in e.args[1:]:
                out = out | torch.as_tensor(ev(a))
            return out
        if isinstance(e, sympy.Not):
            return ~torch.as_tensor(ev(e.args[0]))
        if isinstance(e, (sympy.Max, sympy.Min)):
            f = torch.maximum if isinstance(e, sympy.Max) else torch.minimum
            out = torch.as_tensor(ev(e.args[0]))
            for a in e.args[1:]:
                out = f(out, torch.as_tensor(ev(a)))
            return out
        fn = _UNARY.get(type(e)) or _UNARY.get(e.func)
        if fn is not None:
            return fn(torch.as_tensor(ev(e.args[0])))
        raise NotImplementedError(f"score_mod: cannot evaluate {type(e).__name__}: {e}")

    return ev(expr)
