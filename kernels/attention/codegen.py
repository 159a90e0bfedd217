"""Score modification (sympy) -> Triton source for the attention kernels.

Three steps:
1. `analyze` splits the expression into an index-only *keep* condition (where it is not -oo) and the
   value on the kept region, and turns the keep condition's inequalities that are linear in q_idx and
   kv_idx (coefficient ±1 on kv_idx) into per-block loop bounds: which key blocks of a query block are
   empty (never loaded), partial (masked) or full (no mask math). Whatever is not linear stays a mask.
2. `TritonPrinter` prints sympy expressions as Triton expressions over the tile variables.
3. `generate_source` fills the kernel templates (triton_templates.py) with the printed code.

The value is folded into the exp2 domain (multiplied by log2(e) symbolically) when no float side tensor
appears in it: a side may hold finfo.min, and finfo.min·log2(e) overflows fp32 to -inf, which would turn a
fully filled row from eager's uniform average into NaN. Unfolded kernels use exp2((s - m)·log2(e)).
Values with a huge finite constant (a -1e9 or finfo.min fill) stay unfolded too: the forward saves each
row's max m (natural units) and log2 of its sum l apart, and the backward of an unfolded kernel recomputes
P as exp2((s - m)·log2(e) - log2(l)). A single log-sum-exp m + log(l) would lose log(l) to rounding when
|m| is huge (a row whose every key is filled), and that row's gradient with it. Folded kernels save the
joined log-sum-exp (one load per row in the backward). `fills_as_masks` turns a huge fill under an
index-only mask into -inf for the lengths where no row can be all fill (HF's causal masks): then the
fill's blocks are skipped and the value folds.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os

import sympy

from flashfuse.kernels.attention import score_mod as sm

FP32_MAX = 3.4028234663852886e38
NEG_INF = -sympy.oo


# ---------------------------------------------------------------------------------------------------
# 1. analysis
# ---------------------------------------------------------------------------------------------------

_INDEX_ONLY = set(sm.INDEX_SYMBOLS)


def kv_len(j: int) -> sympy.Symbol:
    """The kernels' name for `key_count(side_j)` (score_mod.key_count: mask_recognition writes right padding
    so) when side j is one value per program. An integer known before the key loop, it joins the loop bounds
    like Nk: key blocks past it are skipped, and only the block that straddles it is masked."""
    return sympy.Symbol(f"kvlen{j}", integer=True)


def _is_kv_len(x: sympy.Basic) -> bool:
    return isinstance(x, sympy.Symbol) and x.name.startswith("kvlen")


def _index_only(e: sympy.Basic) -> bool:
    return all(x in _INDEX_ONLY or _is_kv_len(x) for x in e.free_symbols)


def _lengths_as_symbols(expr: sympy.Basic, len_sides) -> sympy.Basic:
    """key_count(side_j) -> kvlen_j for the sides in `len_sides` (one value per program). Elsewhere it stays,
    is not index-only, and prints as the side's value (a mask on every score, correct and slower)."""
    if not len_sides:
        return expr
    reps = {f: kv_len(sm.side_ids(f)[0]) for f in expr.atoms(sm.key_count) if sm.side_ids(f)[0] in len_sides}
    return expr.xreplace(reps) if reps else expr


def kv_len_ids(e: sympy.Basic) -> list[int]:
    return sorted(int(x.name[5:]) for x in e.free_symbols if _is_kv_len(x))


def _split_keep(expr: sympy.Basic):
    """(keep, value): expr == value where keep holds and -oo elsewhere; keep is index-only."""
    if isinstance(expr, sympy.Piecewise):
        masked = []
        args = list(expr.args)
        while args and args[0].expr == NEG_INF and args[0].cond is not sympy.true and _index_only(args[0].cond):
            masked.append(args[0].cond)
            args.pop(0)
        if masked and args:
            rest = args[0].expr if args[0].cond is sympy.true else sympy.Piecewise(*[(a.expr, a.cond) for a in args])
            keep = sympy.And(*[sympy.Not(c) for c in masked])
            k2, v2 = _split_keep(rest)
            return sympy.And(keep, k2), v2
        return sympy.true, expr
    if isinstance(expr, sympy.Add):
        keeps, vals = [], []
        for a in expr.args:
            k, v = _split_keep(a)
            keeps.append(k)
            vals.append(v)
        return sympy.And(*keeps), sympy.Add(*vals)
    if isinstance(expr, sympy.Mul):
        # a positive constant factor keeps -oo at -oo
        coeff, rest = expr.as_coeff_Mul()
        if coeff.is_number and coeff > 0 and coeff != 1 and rest != 1:
            k, v = _split_keep(rest)
            return k, coeff * v
    return sympy.true, expr


@dataclasses.dataclass
class LinearBound:
    """kv_idx <= alpha*q_idx + beta (upper) or kv_idx >= alpha*q_idx + beta (lower); beta over Nq, Nk and
    per-program key counts (kv_len)."""
    upper: bool
    alpha: int
    beta: sympy.Basic


def linear_bound(rel: sympy.Basic):
    if not isinstance(rel, (sympy.StrictLessThan, sympy.LessThan, sympy.StrictGreaterThan, sympy.GreaterThan)):
        return None
    e = sympy.expand(rel.lhs - rel.rhs)
    if not all(x in (sm.q_idx, sm.kv_idx, sm.Nq, sm.Nk) or _is_kv_len(x) for x in e.free_symbols):
        return None
    try:
        poly = sympy.Poly(e, sm.q_idx, sm.kv_idx, sm.Nq, sm.Nk)
    except sympy.PolynomialError:  # |q_idx - kv_idx| <= w and the like: a mask, not a bound
        return None
    if poly.total_degree() > 1:
        return None
    bk = e.coeff(sm.kv_idx)
    a = e.coeff(sm.q_idx)
    c = sympy.expand(e - bk * sm.kv_idx - a * sm.q_idx)
    if bk not in (1, -1) or not a.is_integer or not all(
            x.is_integer for x in (sympy.Poly(c, *sorted(c.free_symbols, key=str)).coeffs()
                                   if c.free_symbols else [c])):
        return None
    strict = isinstance(rel, (sympy.StrictLessThan, sympy.StrictGreaterThan))
    less = isinstance(rel, (sympy.StrictLessThan, sympy.LessThan))  # e < 0 or e <= 0
    # bk*kv + a*q + c (<|<=|>|>=) 0
    if bk == 1:
        bound = -a * sm.q_idx - c
        upper = less
    else:
        bound = a * sm.q_idx + c
        upper = not less
    if strict:
        bound = bound - 1 if upper else bound + 1
    bound = sympy.expand(bound)
    alpha = int(bound.coeff(sm.q_idx))
    return LinearBound(upper, alpha, sympy.expand(bound - alpha * sm.q_idx))


@dataclasses.dataclass
class Analysis:
    expr: sympy.Basic          # the full expression (natural units)
    value: sympy.Basic         # value on the kept region (natural units)
    keep_other: sympy.Basic    # index-only keep condition not covered by the bounds (a mask everywhere)
    keep_linear: sympy.Basic   # the part covered by the bounds (a mask on partial blocks only)
    bounds: list               # LinearBound list
    fold: bool                 # value printed in the exp2 domain
    value_exp2: sympy.Basic    # value·log2(e) when folded, else value
    n_sides: int
    static_max: float | None = None  # an upper bound of value_exp2 that makes the running max unneeded


def _sides_in_value(e: sympy.Basic) -> set:
    if isinstance(e, sympy.Symbol):
        return {e} if e.name.startswith("side") else set()
    if isinstance(e, sympy.core.relational.Relational) or isinstance(e, sympy.logic.boolalg.Boolean):
        return set()
    if isinstance(e, sympy.Piecewise):
        out = set()
        for a in e.args:
            out |= _sides_in_value(a.expr)
        return out
    out = set()
    for a in e.args:
        out |= _sides_in_value(a)
    return out


# A constant at least this large (a finite fill such as -1e9 or finfo.min) can make a whole row's scores
# huge: the backward then needs the row max exactly (stored in natural units, exact only when unfolded).
HUGE_CONSTANT = 1000.0


def _huge_constants(e: sympy.Basic) -> bool:
    return any(math.isfinite(float(c)) and abs(float(c)) >= HUGE_CONSTANT for c in e.atoms(sympy.Number))


def analyze(expr: sympy.Basic, n_sides: int, len_sides=frozenset()) -> Analysis:
    """len_sides: the sides that are one value per program (scalar layout); key_count(side_j) of those is a
    key count (kv_len) that may bound the loops."""
    expr = _lengths_as_symbols(expr, len_sides)
    keep, value = _split_keep(expr)
    keep = sympy.logic.boolalg.to_nnf(keep)  # ~(a | b) -> ~a & ~b, so each inequality can become a bound
    conj = list(keep.args) if isinstance(keep, sympy.And) else ([] if keep is sympy.true else [keep])
    bounds, linear, other = [], [], []
    for c in conj:
        lb = linear_bound(c)
        if lb is None:
            other.append(c)
        else:
            bounds.append(lb)
            linear.append(c)
    fold = not _sides_in_value(value) and not _huge_constants(value)
    value_exp2 = sympy.piecewise_fold(value * sympy.Float(1.0 / math.log(2.0))) if fold else value
    an = Analysis(expr, value, sympy.And(*other), sympy.And(*linear), bounds, fold, value_exp2, n_sides)
    an.static_max = _static_max(value_exp2, fold)
    return an


# A fill at most this large (finfo(float16).min; -1e9 and the fp32/bf16 finfo.min are below) gives masked
# probabilities exp(fill - row max) = 0 in fp32 on every row that keeps a real score.
HUGE_FILL = -65504.0
_FINITE_SYMBOLS = {sm.score, sm.b, sm.h, sm.q_idx, sm.kv_idx, sm.Nq, sm.Nk}


def never_huge_negative(e: sympy.Basic) -> bool:
    """e cannot be -inf or a huge negative fill: the score and index symbols under + * tanh abs min max, with
    moderate constants. No side tensor (a float bias may hold -inf), no nested fill, no exp/log/division."""
    for x in sympy.preorder_traversal(e):
        if isinstance(x, sympy.Symbol):
            if x not in _FINITE_SYMBOLS:
                return False
        elif x.is_Number:
            if not x.is_finite or abs(float(x)) > 1e30:
                return False
        elif isinstance(x, sympy.Pow):
            if x.free_symbols:
                return False
        elif not isinstance(x, (sympy.Add, sympy.Mul, sympy.tanh, sympy.Abs, sympy.Max, sympy.Min)):
            return False
    return True


def _rows_all_keep_a_key(bounds: list, nq: int, nk: int) -> bool:
    """Every query row 0..nq-1 keeps at least one key 0..nk-1 under these linear bounds. The kept interval's
    width min(uppers) - max(lowers) is concave in q, so it is smallest at q = 0 or q = nq - 1."""
    subs = {sm.Nq: nq, sm.Nk: nk}
    for q in {0, nq - 1}:
        lo, hi = 0, nk - 1
        for b in bounds:
            x = int(b.alpha * q + b.beta.subs(subs))
            lo, hi = (lo, min(hi, x)) if b.upper else (max(lo, x), hi)
        if lo > hi:
            return False
    return True


def is_huge_fill(e: sympy.Basic) -> bool:
    """e is a finite constant fill of at most HUGE_FILL (finfo.min, -1e9, finfo(float16).min)."""
    return bool(e.is_Number and e.is_finite and e <= HUGE_FILL)


def _fill_split(expr: sympy.Basic):
    """(keep, value) of `Piecewise((fill, cond), (value, True))` (either order), or of the additive mask of HF
    models `value + Piecewise((0, keep), (fill, True))` (either order): a huge constant fill where an
    index-only condition says. None for anything else."""
    if isinstance(expr, sympy.Add):  # value + (0 or fill)
        pw = [t for t in expr.args if isinstance(t, sympy.Piecewise)]
        if len(pw) != 1:
            return None
        split = _fill_split(pw[0])
        if split is None or not any(a.expr == 0 for a in pw[0].args):
            return None
        return split[0], sympy.Add(*[t for t in expr.args if t is not pw[0]]) + split[1]
    if not isinstance(expr, sympy.Piecewise) or len(expr.args) != 2 or expr.args[1].cond is not sympy.true or \
            not _index_only(expr.args[0].cond):
        return None
    (e0, c0), (e1, _) = expr.args
    huge = [is_huge_fill(e0), is_huge_fill(e1)]
    if huge == [True, False]:
        return sympy.Not(c0), e1
    if huge == [False, True]:
        return c0, e0
    return None


@functools.lru_cache(maxsize=256)
def fills_as_masks(score_mod_text: str, nq: int, nk: int) -> str:
    """The score modification the kernels run for these lengths: `where(keep, value, fill)` with a huge
    fill (finfo.min, -1e9) under an index-only condition, or HF models' additive `value + where(keep, 0,
    finfo.min)` (the causal mask of GPT-2, LLaMA, Mistral), becomes `-inf` where every query row
    keeps a key (causal with Nq <= Nk, say). There the fill's probabilities are exactly 0 as with -inf, so
    the kernels skip the filled blocks and fold the value, and nothing changes. Where a row may be all
    fill (eager's uniform average and its gradient), or the keep condition is not made of linear bounds,
    the text comes back unchanged."""
    if nq <= 0 or nk <= 0:
        return score_mod_text
    split = _fill_split(sm.from_text(score_mod_text))
    if split is None:
        return score_mod_text
    keep, value = split
    if not never_huge_negative(value):
        return score_mod_text
    masked = sympy.Piecewise((NEG_INF, sympy.Not(keep)), (value, True))
    an = analyze(masked, 0)
    if an.keep_other is not sympy.true or not _rows_all_keep_a_key(an.bounds, nq, nk):
        return score_mod_text
    return sm.to_text(masked)


@functools.lru_cache(maxsize=256)
def neg_inf_rows(score_mod_text: str, nq: int, nk: int) -> str | None:
    """How a query row can have every score -inf, which eager's softmax turns into NaN (and its gradients
    with it, see op._eager_nans_of_empty_rows): "fill" by a -inf fill not proven to leave each row a key
    (the fill's own gradient is zero), "additive" by a float side tensor in the value that may hold -inf
    (its gradient passes the NaN on to the scores), None when no row can be. Where both could, "fill"."""
    expr = sm.from_text(score_mod_text)
    if expr.has(NEG_INF):
        an = analyze(expr, 0)
        if not (an.keep_other is sympy.true and not an.value.has(NEG_INF)
                and _rows_all_keep_a_key(an.bounds, nq, nk)):
            return "fill"
    return "additive" if _sides_in_value(expr) else None


@functools.lru_cache(maxsize=256)
def triangular(score_mod_text: str) -> bool:
    """The kept region is one causal triangle: a single upper bound kv <= q + c, perhaps cut by key counts
    (right padding: kv < key_count, a bound on kv alone), and no other index-only condition. Its programs
    differ in work block by block (triton_impl's launch order groups heads for it). Key counts only end some
    heads' rows early: session 16's dK/dV took +26 % with them when they turned the grouped order off."""
    expr = sm.from_text(score_mod_text)
    an = analyze(expr, 0, frozenset(sm.side_ids(f)[0] for f in expr.atoms(sm.key_count)))
    diagonal = [bd for bd in an.bounds if bd.alpha != 0]
    return (an.keep_other is sympy.true and len(diagonal) == 1 and diagonal[0].upper and diagonal[0].alpha == 1
            and all(bd.upper for bd in an.bounds))


def _interval(e: sympy.Basic):
    """Interval of a score-only expression (None when unbounded or not understood)."""
    if e.is_Number:
        return float(e), float(e)
    if e == sm.score:
        return None
    if isinstance(e, sympy.tanh):
        return -1.0, 1.0  # whatever the argument
    if isinstance(e, sympy.Add):
        lo = hi = 0.0
        for a in e.args:
            r = _interval(a)
            if r is None:
                return None
            lo, hi = lo + r[0], hi + r[1]
        return lo, hi
    if isinstance(e, sympy.Mul):
        coeff, rest = e.as_coeff_Mul()
        if coeff.is_Number and coeff != 1:
            r = _interval(rest)
            if r is None:
                return None
            a, b = float(coeff) * r[0], float(coeff) * r[1]
            return min(a, b), max(a, b)
    return None


def _static_max(value_exp2: sympy.Basic, fold: bool):
    """A bounded value (a soft cap c·tanh(s/c)) needs no online max: exp2(s - upper bound) cannot overflow,
    and when the range is under ~120 in exp2 units it cannot underflow a whole row either. That removes
    the row max, the rescale of the accumulator and one exp2 per row and key block."""
    if value_exp2.free_symbols - {sm.score}:
        return None
    r = _interval(value_exp2)
    if r is None:
        return None
    width = (r[1] - r[0]) * (1.0 if fold else 1.0 / math.log(2.0))
    return r[1] if width < 120.0 else None


# ---------------------------------------------------------------------------------------------------
# 2. printing
# ---------------------------------------------------------------------------------------------------

_NAMES = {"score": "qk", "q_idx": "q_idx", "kv_idx": "kv_idx", "b": "off_b", "h": "off_h",
          "Nq": "Nq", "Nk": "Nk"}
_REL_OPS = {sympy.StrictLessThan: "<", sympy.LessThan: "<=", sympy.StrictGreaterThan: ">",
            sympy.GreaterThan: ">=", sympy.Equality: "==", sympy.Unequality: "!="}
_FUNCS = {sympy.exp: "tl.exp", sympy.log: "tl.log", sympy.Abs: "tl.abs", sympy.sin: "tl.sin",
          sympy.cos: "tl.cos", sympy.floor: "tl.floor", sympy.ceiling: "tl.ceil", sympy.sqrt: "tl.sqrt",
          sympy.erf: "tl.erf", sympy.tanh: "_tanh"}


class UnsupportedExpression(NotImplementedError):
    pass


def print_triton(e: sympy.Basic, names: dict | None = None) -> str:
    names = names or {}

    def p(x) -> str:
        if x is sympy.true:
            return "True"
        if x is sympy.false:
            return "False"
        if x.is_Symbol:
            return names.get(x.name) or _NAMES.get(x.name) or x.name
        if x == sympy.oo:
            return 'float("inf")'
        if x == -sympy.oo:
            return 'float("-inf")'
        if x.is_Integer:
            return f"({int(x)})"
        if x.is_Number:
            v = float(x)
            if abs(v) > FP32_MAX and math.isfinite(v):
                v = math.copysign(FP32_MAX, v)
            return f"({v!r})"
        if isinstance(x, sympy.Add):  # in sm.add_terms_in_order's order: a huge mask sum before the score
            return "(" + " + ".join(p(a) for a in sm.add_terms_in_order(x)) + ")"
        if isinstance(x, sympy.Mul):
            num, den = [], []
            for a in x.args:
                if isinstance(a, sympy.Pow) and a.exp.is_Integer and a.exp < 0:
                    den.append(sympy.Pow(a.base, -a.exp))
                else:
                    num.append(a)
            s = " * ".join(p(a) for a in num) if num else "1.0"
            if den:
                s = f"({s}) / (" + " * ".join(p(a) for a in den) + ")"
            return "(" + s + ")"
        if isinstance(x, sympy.Pow):
            base, ex = x.args
            if x.is_number:  # e.g. 2**(1/3), left unevaluated by sympy
                return f"({float(x)!r})"
            if ex.is_Integer:
                n = int(ex)
                if n == 0:
                    return "(1.0)"
                body = " * ".join([p(base)] * abs(n))
                return f"({body})" if n > 0 else f"(1.0 / ({body}))"
            if ex == sympy.Rational(1, 2):
                return f"tl.sqrt(({p(base)}).to(tl.float32))"
            if ex == -sympy.Rational(1, 2):
                return f"tl.rsqrt(({p(base)}).to(tl.float32))"
            if base.is_number and base > 0:  # ALiBi slopes 2**(-h-1): a literal base has no .to()
                scale = "" if base == 2 else f" * {math.log2(float(base))!r}"
                return f"tl.math.exp2(({p(ex)}).to(tl.float32){scale})"
            return f"tl.exp({p(ex)} * tl.log(({p(base)}).to(tl.float32)))"
        if isinstance(x, sympy.Piecewise):
            out = None
            for value, cond in reversed(x.args):
                if out is None:
                    out = p(value) if cond is sympy.true else 'float("nan")'
                    if cond is sympy.true:
                        continue
                out = f"tl.where({p(cond)}, {p(value)}, {out})"
            return out
        if type(x) in _REL_OPS:
            return f"({p(x.lhs)} {_REL_OPS[type(x)]} {p(x.rhs)})"
        if isinstance(x, sympy.And):
            return "(" + " & ".join(p(a) for a in x.args) + ")"
        if isinstance(x, sympy.Or):
            return "(" + " | ".join(p(a) for a in x.args) + ")"
        if isinstance(x, sympy.Not):
            return f"(~{p(x.args[0])})"
        if isinstance(x, (sympy.Max, sympy.Min)):
            f = "tl.maximum" if isinstance(x, sympy.Max) else "tl.minimum"
            out = p(x.args[0])
            for a in x.args[1:]:
                out = f"{f}({out}, {p(a)})"
            return out
        if isinstance(x, sympy.sign):
            a = p(x.args[0])
            return f"tl.where({a} > 0, 1.0, tl.where({a} < 0, -1.0, 0.0))"
        if isinstance(x, sympy.Heaviside):
            a = p(x.args[0])
            return f"tl.where({a} > 0, 1.0, tl.where({a} < 0, 0.0, 0.5))"
        if isinstance(x, sympy.DiracDelta):
            return "(0.0)"
        if isinstance(x, sm.key_count):
            return p(x.args[0])
        fn = _FUNCS.get(type(x)) or _FUNCS.get(x.func)
        if fn is not None:
            return f"{fn}(({p(x.args[0])}).to(tl.float32))" if fn != "_tanh" else f"_tanh(({p(x.args[0])}).to(tl.float32), FAST_MATH)"
        raise UnsupportedExpression(f"cannot print {type(x).__name__}: {x}")

    return p(e)


def bounds_code(bounds: list, indent: str) -> str:
    """Per query block [m_lo, m_hi] (int scalars): kv ranges lo..hi (some kept), flo..fhi (all kept)."""
    zero = "(m_lo * 0)"  # an int32 scalar tensor
    lines = [f"{indent}kv_lo = {zero}", f"{indent}kv_hi = {zero} + Nk - 1", f"{indent}kv_flo = {zero}",
             f"{indent}kv_fhi = {zero} + Nk - 1"]
    for bd in bounds:
        at_lo = print_triton(bd.alpha * sm.q_idx + bd.beta, {"q_idx": "m_lo"})
        at_hi = print_triton(bd.alpha * sm.q_idx + bd.beta, {"q_idx": "m_hi"})
        lines.append(f"{indent}b_lo = {at_lo}")
        lines.append(f"{indent}b_hi = {at_hi}")
        if bd.upper:
            lines.append(f"{indent}kv_hi = tl.minimum(kv_hi, tl.maximum(b_lo, b_hi))")
            lines.append(f"{indent}kv_fhi = tl.minimum(kv_fhi, tl.minimum(b_lo, b_hi))")
        else:
            lines.append(f"{indent}kv_lo = tl.maximum(kv_lo, tl.minimum(b_lo, b_hi))")
            lines.append(f"{indent}kv_flo = tl.maximum(kv_flo, tl.maximum(b_lo, b_hi))")
    return "\n".join(lines)


def inverse_bounds_code(bounds: list, indent: str) -> str:
    """Per key block [n_lo, n_hi]: query ranges q_lo..q_hi (some kept), q_flo..q_fhi (all kept).
    Only bounds with alpha = ±1 invert exactly; others leave the range open and the full range empty. A bound
    on kv alone (a key count) narrows only the full range: key_block_cut_code empties a block it keeps none of."""
    zero = "(n_lo * 0)"
    lines = [f"{indent}q_lo = {zero}", f"{indent}q_hi = {zero} + Nq - 1", f"{indent}q_flo = {zero}",
             f"{indent}q_fhi = {zero} + Nq - 1"]
    for bd in bounds:
        if bd.alpha not in (1, -1, 0):
            lines.append(f"{indent}q_flo = Nq")
            continue
        if bd.alpha == 0:
            # a bound on kv alone (a key count): no restriction on q where some key of the block is kept,
            # full only where every key is; a block that keeps no key is emptied by key_block_cut_code
            beta = print_triton(bd.beta)
            full = f"(n_hi <= {beta})" if bd.upper else f"(n_lo >= {beta})"
            lines.append(f"{indent}q_flo = tl.where({full}, q_flo, Nq)")
            continue
        # kv <= alpha*q + beta  <=>  alpha*q >= kv - beta ; kv >= alpha*q + beta <=> alpha*q <= kv - beta
        beta = print_triton(bd.beta)
        t_lo, t_hi = f"(n_lo - {beta})", f"(n_hi - {beta})"
        if (bd.upper and bd.alpha == 1) or (not bd.upper and bd.alpha == -1):
            # q >= s*(kv - beta) with s = alpha: lower bound on q
            f_lo = t_lo if bd.alpha == 1 else f"(-{t_lo})"
            f_hi = t_hi if bd.alpha == 1 else f"(-{t_hi})"
            lines.append(f"{indent}q_lo = tl.maximum(q_lo, tl.minimum({f_lo}, {f_hi}))")
            lines.append(f"{indent}q_flo = tl.maximum(q_flo, tl.maximum({f_lo}, {f_hi}))")
        else:
            f_lo = t_lo if bd.alpha == 1 else f"(-{t_lo})"
            f_hi = t_hi if bd.alpha == 1 else f"(-{t_hi})"
            lines.append(f"{indent}q_hi = tl.minimum(q_hi, tl.maximum({f_lo}, {f_hi}))")
            lines.append(f"{indent}q_fhi = tl.minimum(q_fhi, tl.minimum({f_lo}, {f_hi}))")
    return "\n".join(lines)


def key_block_cut_code(bounds: list, indent: str) -> str:
    """After the dK/dV kernel's query range [start, end) is set: empty it for a key block that a key count
    (a bound on kv alone) keeps no key of. Cutting `end` to `start` here, rather than q_hi to -1 before, keeps
    what Triton can prove about the range: `end` stays a fold of Nq and `start`, so the loops that start at
    fs / fe (min / max with `end`) keep their 16-row alignment. Through q_hi, the select hid Nq - 1 + 1 = Nq
    from the folder and the unmasked loop's body grew by a third (sm_90 SASS, 262 -> 349 instructions per
    step at d64): key counts' dK/dV ran 26 % longer than causal alone (session 18)."""
    lines = []
    for bd in bounds:
        if bd.alpha == 0:
            beta = print_triton(bd.beta)
            some = f"(n_lo <= {beta})" if bd.upper else f"(n_hi >= {beta})"
            lines.append(f"{indent}end = tl.where({some}, end, start)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# 3. source generation
# ---------------------------------------------------------------------------------------------------

def _side_load(i: int, q_bcast: bool = False, kv_bcast: bool = False, q: str = "q_idx", kv: str = "kv_idx",
               name: str | None = None, convert: bool = True) -> str:
    """Load of side i for the tile: a scalar, a row, a column or the full tile, by its broadcast dims,
    so a per-head slope costs one load per tile, not BLOCK_M*BLOCK_N gathers of the same address.
    `q` / `kv`: the index expressions (the next block's, for a prefetch)."""
    base = f"side{i}_ptr + off_b.to(tl.int64) * side{i}_sb + off_h.to(tl.int64) * side{i}_sh"
    conv = ".to(tl.float32)" if convert else ""
    target = name or f"side{i}"
    if q_bcast and kv_bcast:
        return f"        {target} = tl.load({base}){conv}"
    if q_bcast:
        return f"        {target} = tl.load({base} + {kv} * side{i}_sn, mask={kv} < Nk, other=0){conv}"
    if kv_bcast:
        return f"        {target} = tl.load({base} + {q} * side{i}_sm, mask={q} < Nq, other=0){conv}"
    return (f"        {target} = tl.load({base} + {q} * side{i}_sm + {kv} * side{i}_sn,"
            f" mask=({q} < Nq) & ({kv} < Nk), other=0){conv}")


def side_prefetch_on() -> bool:
    """FLASHFUSE_ATTN_SIDE_PREFETCH=1: `side_loads` hoists and prefetches. Off by default: on the H100
    (session 13) the prefetched padding row made HF padded causal slower (0.285 -> 0.328 ms) and the hoisted
    ALiBi slope changed nothing (0.225 -> 0.228); kept for experiments on other GPUs."""
    return os.environ.get("FLASHFUSE_ATTN_SIDE_PREFETCH", "0") == "1"


def side_loads(ids, layout, walks_keys: bool) -> tuple[str, str, str]:
    """(before the loop, top of each step, after the QK dot) code loading sides `ids` in a loop over key
    blocks (`walks_keys`: forward and dQ, q_idx fixed) or query blocks (dK/dV, kv_idx fixed).
    By default every load sits after the QK dot. With `side_prefetch_on()`, a side that does not vary along
    the walked axis (a per-head slope, a per-key padding row in dK/dV) is loaded once before the loop, and a
    row or column that varies is loaded one block ahead and carried; full tiles stay in the loop. The idea
    was that the pipeliner leaves these small loads on the critical path; the H100 did not bear it out."""
    pre, nxt, tile = [], [], []
    block = "BLOCK_N" if walks_keys else "BLOCK_M"
    walked = "kv" if walks_keys else "q"  # the index keyword of _side_load that changes from step to step
    prefetch = side_prefetch_on()
    for i in ids:
        q_b, kv_b = layout[i]
        varies = not kv_b if walks_keys else not q_b
        if not prefetch or (varies and not (q_b or kv_b)):  # full tiles always load in the loop
            tile.append(_side_load(i, q_b, kv_b))
        elif not varies:
            pre.append(_side_load(i, q_b, kv_b))
        else:  # a row (walking keys) or a column (walking queries), one block ahead
            first = f"(start + tl.arange(0, {block}))[None, :]"  # the walked index is a row in both orientations
            pre.append(_side_load(i, q_b, kv_b, name=f"side{i}_nx", convert=False, **{walked: first}))
            nxt.append(f"        side{i} = side{i}_nx.to(tl.float32)")
            nxt.append(_side_load(i, q_b, kv_b, name=f"side{i}_nx", convert=False,
                                  **{walked: f"({walked}_idx + {block})"}))
    # the loads before the loop sit at function level: one indent less
    return "\n".join(line[4:] for line in pre), "\n".join(nxt), "\n".join(tile)


def _tile(e: sympy.Basic) -> str:
    """A value that is a full fp32 tile even when it does not involve the score."""
    text = print_triton(e)
    return text if sm.score in e.free_symbols else f"(qk * 0.0 + {text})"


def generate_source(score_mod_text: str, n_sides: int, n_scalars: int, side_grads: tuple,
                    side_layout: tuple = ()) -> str:
    """side_layout: per side (broadcast over queries, broadcast over keys); default: full tiles."""
    from flashfuse.kernels.attention import triton_templates as tt

    expr = sm.from_text(score_mod_text)
    layout = tuple(side_layout) or ((False, False),) * n_sides
    an = analyze(expr, n_sides, frozenset(i for i, (q_b, kv_b) in enumerate(layout) if q_b and kv_b))
    d_score = sm.real_diff(an.value, sm.score)
    d_sides = {i: sm.real_diff(an.value, sm.side(i)) for i, g in enumerate(side_grads) if g}

    def sides_of(*es):
        ids = set()
        for e in es:
            ids |= set(sm.side_ids(e))
        return sorted(ids)

    side_params = "".join(f"side{i}_ptr, side{i}_sb, side{i}_sh, side{i}_sm, side{i}_sn, " for i in range(n_sides))
    scalar_params = "".join(f"scalar{i}, " for i in range(n_scalars))
    dside_params = "".join(f"dside{i}_ptr, " for i in d_sides)
    keep_other = ("" if an.keep_other is sympy.true else
                  f"        s = tl.where({print_triton(an.keep_other)}, s, float(\"-inf\"))")
    keep_linear = print_triton(an.keep_linear)
    dside_stores = "\n".join(
        f"        g{i} = tl.where(dl == 0, 0.0, dl * ({print_triton(de)}))\n"
        f"        tl.store(dside{i}_ptr + off_bh.to(tl.int64) * Nq * Nk + q_idx * Nk + kv_idx, g{i},"
        f" mask=(q_idx < Nq) & (kv_idx < Nk))"
        for i, de in d_sides.items())

    # key counts (kv_len): one int per program, loaded before the bounds and at the top of each inner loop
    len_loads = [f"kvlen{j} = tl.load(side{j}_ptr + off_b.to(tl.int64) * side{j}_sb"
                 f" + off_h.to(tl.int64) * side{j}_sh).to(tl.int32)" for j in kv_len_ids(an.expr)]

    def lines_at(indent: str, extra: str = "") -> str:
        return "\n".join([indent + line for line in len_loads] + ([extra] if extra else []))

    def fill(template: str, load_ids) -> str:
        out = template
        pre, nxt, tile = side_loads(load_ids, layout, walks_keys=True)
        pre_q, nxt_q, tile_q = side_loads(load_ids, layout, walks_keys=False)
        pre, pre_q = lines_at("    ", pre), lines_at("    ", pre_q)
        if an.keep_linear is sympy.true:
            out = out.replace("@KEEP_LINEAR@ & ", "")
        reps = {
            "@SIDE_PARAMS@": side_params, "@SIDE_ARGS@": side_params,
            "@SCALAR_PARAMS@": scalar_params, "@SCALAR_ARGS@": scalar_params,
            "@DSIDE_PARAMS@": dside_params, "@DSIDE_ARGS@": dside_params,
            "@PRE_SIDES_Q@": pre_q, "@NEXT_SIDES_Q@": nxt_q, "@LOAD_SIDES_Q@": tile_q,
            "@PRE_SIDES@": pre, "@NEXT_SIDES@": nxt, "@LOAD_SIDES@": tile,
            "@VALUE@": _tile(an.value_exp2), "@KEEP_LINEAR@": keep_linear, "@KEEP_OTHER@": keep_other,
            "@BOUNDS@": lines_at("    ", bounds_code(an.bounds, "    ")),
            "@INV_BOUNDS@": lines_at("        ", inverse_bounds_code(an.bounds, "        ")),
            "@KEY_BLOCK_CUT@": key_block_cut_code(an.bounds, "        "),
            "@DSCORE@": print_triton(d_score), "@DSIDE_STORES@": dside_stores,
        }
        for k, v in reps.items():
            out = out.replace(k, v)
        return out

    header = tt.HEADER.replace("@EXPR_TEXT@", str(expr).replace("\n", " "))
    header = header.replace("@EXP_SCALE@", "1.0" if an.fold else repr(1.0 / math.log(2.0)))
    header = header.replace("@LSE_SCALE@", repr(1.0 / math.log(2.0)) if an.fold else "1.0")
    header = header.replace("@FOLDED@", str(an.fold))
    header = header.replace("@USE_STATIC_MAX@", str(an.static_max is not None))
    header = header.replace("@STATIC_MAX@", repr(float(an.static_max or 0.0)))
    fwd = fill(tt.FORWARD, sides_of(an.value))
    bwd = fill(tt.BACKWARD, sides_of(an.value, d_score, *d_sides.values()))
    return header + fwd + bwd
