"""Run-time recognition of mask tensors that are index patterns (a registered `tril` buffer, HF's causal
mask without padding), so they take the kernel's symbolic path: key blocks skipped, no mask loads. Position
vectors (`pos = torch.arange(n)` as a buffer, viewed as a row or a column: ALiBi's distances and masks) become
the query or key index the same way.

The pass cannot prove at compile time that a buffer *is* causal: Dynamo does not guard on tensor values
and a buffer can be changed in place later. So the op checks the actual tensor each time it changes
(cached on data pointer, `_version`, shape and strides): a side used only in conditions `side != 0` /
`side == 0` whose nonzero pattern equals a candidate index predicate is replaced by that predicate.
A mismatch (or any side needing a gradient) leaves the expression as it was: never a wrong number.

Two things keep the cache sound. A recognized entry holds the side's storage, so no other tensor can
be allocated at that address while the entry lives (a fresh mask of another batch landing on a freed
mask's address, with the same `_version` 0, would otherwise hit). An entry that recognized nothing holds
a weak reference to the storage instead and is a hit only while that storage is the one looked up (else a
tril buffer allocated where a freed padding mask was would never be recognized: slower, not wrong). And nothing is recognized while a
CUDA graph is being captured: the check reads the tensor (a host sync, illegal in capture), and a
replay runs the captured kernel without calling back here, whatever the mask holds by then; captured
calls take the general path, which loads the mask.
"""
from __future__ import annotations

import os
import weakref

import sympy
import torch

from flashfuse.kernels.attention import codegen
from flashfuse.kernels.attention import score_mod as sm

# Right padding as key counts (loop bounds) rather than a row of kept keys; FLASHFUSE_ATTN_KEY_COUNTS=0 for A/B.
KEY_COUNTS = os.environ.get("FLASHFUSE_ATTN_KEY_COUNTS", "1") != "0"

_CACHE: dict = {}     # per side tensor state -> recognized predicate (or False)
_RESULTS: dict = {}   # per (score_mod, side states, sizes) -> (new text, kept indices)
_MAX_CACHE = 64


def _candidates():
    """Keep-predicates tried, most common first."""
    return (
        sm.kv_idx <= sm.q_idx + sm.Nk - sm.Nq,   # causal, bottom-right aligned (== top-left when Nq == Nk)
        sm.kv_idx <= sm.q_idx,                   # causal, top-left aligned
        sympy.true,                              # nothing masked
    )


def side_conditions(expr, i):
    """The conditions in which side i appears; None if it appears anywhere else."""
    s = sm.side(i)
    conds = [a for a in expr.atoms(sympy.Eq, sympy.Ne) if a.has(s)]
    if any(not (c.args[0] == s and c.args[1] == 0) for c in conds):
        return None
    replaced = expr.xreplace({c: sympy.true for c in conds})
    if replaced.has(s):
        return None
    return conds


def _nonzero_pattern(t: torch.Tensor, nq: int, nk: int):
    """The (Nq, Nk) boolean pattern of t != 0 if it is the same for every batch and head, else None."""
    if t.dim() != 4 or t.shape[-2] != nq or t.shape[-1] != nk:
        return None
    nz = t != 0
    first = nz[:1, :1]
    if nz.shape[0] * nz.shape[1] > 1 and not bool((nz == first).all()):
        return None
    return first[0, 0]


def _key(t: torch.Tensor):
    return (t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device))


def _hold(t: torch.Tensor, recognized: bool):
    """What a cache entry keeps of its side: the storage itself when something was recognized (its address
    stays taken), else a weak reference to it."""
    storage = t.untyped_storage()
    if recognized:
        return storage
    try:
        return weakref.ref(storage)
    except TypeError:  # a storage without weak references: the key alone, as before
        return None


def _live(held, t: torch.Tensor) -> bool:
    """An entry is about this tensor's storage (not one freed at the same address)."""
    return not isinstance(held, weakref.ref) or held() is t.untyped_storage()


def specialize(score_mod: str, sides: list, nq: int, nk: int, needs_grad=None):
    """(score_mod, sides, kept) with recognized mask sides replaced by index predicates; `kept` lists the
    indices of the original sides that remain, in order."""
    if not sides:
        return score_mod, sides, []
    if sides[0].is_cuda and torch.cuda.is_current_stream_capturing():
        return score_mod, sides, list(range(len(sides)))
    # this runs on every call of the op: the common case must cost a dict lookup, not sympy work
    rkey = (score_mod, tuple(_key(t) for t in sides), nq, nk,
            tuple(needs_grad) if needs_grad is not None else None,
            tuple(t.requires_grad for t in sides))
    hit = _RESULTS.get(rkey)
    if hit is None or not all(_live(h, t) for h, t in zip(hit[2], sides)):
        if len(_RESULTS) > _MAX_CACHE:
            _RESULTS.clear()
        hit = _RESULTS[rkey] = _specialize(score_mod, sides, nq, nk, needs_grad)
    text, kept, _held, replaced = hit
    return text, [replaced.get(i, sides[i]) for i in kept], list(kept)


def _specialize(score_mod: str, sides: list, nq: int, nk: int, needs_grad):
    expr = sm.from_text(score_mod)
    keep_idx = list(range(len(sides)))
    changed = False
    replaced: dict = {}  # side index -> the tensor the kernels get instead (a causal & key-padding mask's keys)
    for i, t in enumerate(sides):
        if needs_grad is not None and needs_grad[i]:
            continue
        if t.is_floating_point() and t.requires_grad:
            continue
        index = _index_side(t, nq, nk)
        if index is not None:  # a position vector (ALiBi's `pos` buffer): the index itself, anywhere in expr
            expr = expr.xreplace({sm.side(i): index})
            keep_idx.remove(i)
            changed = True
            continue
        additive = _additive_key_padding(expr, i, t, nk)
        if additive is not None:  # BERT's (1 - mask) * finfo.min added to the scores, right padding
            expr, counts = additive
            replaced[i] = counts
            continue
        conds = side_conditions(expr, i)
        if not conds:
            continue
        keeps = _kept_where(expr, conds)  # which value of the side keeps a score (for key padding)
        key = (_key(t), nq, nk, keeps)
        pred = _CACHE.get(key)
        if pred is not None and not _live(pred[1], t):
            pred = None
        if pred is not None and pred[2] is not None:  # key padding (with or without causal), seen before
            expr = _wrap_causal(expr, conds, replaced, i, pred[2])
            continue
        if pred is None:
            pattern = _nonzero_pattern(t, nq, nk)
            pred = False
            if pattern is not None:
                qi = torch.arange(nq, device=t.device)[:, None]
                ki = torch.arange(nk, device=t.device)[None, :]
                for cand in _candidates():
                    env = {"q_idx": qi, "kv_idx": ki, "Nq": nq, "Nk": nk}
                    want = torch.as_tensor(sm.evaluate(cand, env), device=t.device).expand(nq, nk)
                    if bool((want == pattern).all()):
                        pred = cand
                        break
            padding = _key_padding(t, nq, nk, keeps) if pred is False and keeps is not None else None
            if len(_CACHE) > _MAX_CACHE:
                _CACHE.clear()
            _CACHE[key] = (pred, _hold(t, pred is not False or padding is not None), padding)
            if padding is not None:
                expr = _wrap_causal(expr, conds, replaced, i, padding)
                continue
        else:
            pred = pred[0]
        if pred is False:
            continue
        expr = expr.xreplace({c: (pred if isinstance(c, sympy.Ne) else sympy.Not(pred)) for c in conds})
        keep_idx.remove(i)
        changed = True
    # hold the recognized sides' storages (their addresses cannot be reused while this entry lives), weak
    # references to the others
    recognized = [i not in keep_idx or i in replaced for i in range(len(sides))]
    refs = tuple(_hold(t, r) for t, r in zip(sides, recognized))
    if not changed and not replaced:
        return score_mod, tuple(keep_idx), refs, {}
    mapping = {sm.side(old): sm.side(new) for new, old in enumerate(keep_idx)}
    expr = expr.xreplace(mapping)
    return sm.to_text(expr), tuple(keep_idx), refs, replaced


# ---- position vectors: a side that is arange along the query or the key axis ----
def _index_axis(t: torch.Tensor, nq: int, nk: int):
    """q_idx when t broadcasts to (B, H, Nq, Nk) as one column (varies along queries only), kv_idx as one
    row, else None (lengths 1 are left alone: there a row and a column are the same thing)."""
    if t.dim() == 0 or t.dim() > 4 or t.dtype == torch.bool or t.is_complex():
        return None
    shape = (1,) * (4 - t.dim()) + tuple(t.shape)
    if shape[:2] != (1, 1):
        return None
    if shape[2:] == (1, nk) and nk > 1:
        return sm.kv_idx
    if shape[2:] == (nq, 1) and nq > 1:
        return sm.q_idx
    return None


def _index_side(t: torch.Tensor, nq: int, nk: int):
    """The index symbol that t equals exactly (0, 1, ..., n - 1 along its axis), else None. Compared in
    float64, so a bf16 `arange` that rounds (2049 -> 2048) is not taken for the index. Cached like masks."""
    axis = _index_axis(t, nq, nk)
    if axis is None:
        return None
    key = ("index", _key(t))
    hit = _CACHE.get(key)
    if hit is None or not _live(hit[1], t):
        n = t.numel()
        equal = torch.equal(t.reshape(-1).to(torch.float64), torch.arange(n, dtype=torch.float64, device=t.device))
        if len(_CACHE) > _MAX_CACHE:
            _CACHE.clear()
        hit = _CACHE[key] = (equal, _hold(t, equal))
    return axis if hit[0] else None


# ---- key padding, alone (HF encoders) or with causal (HF causal LMs): one (B, 1, N, N) mask of both ----
_CAUSAL = sm.kv_idx <= sm.q_idx + sm.Nk - sm.Nq


def _on_off(expr, conds, keeps: bool = True):
    """(expr where the side keeps a score, expr where it does not); `keeps`: a nonzero side keeps."""
    on = expr.xreplace({c: sympy.true if isinstance(c, sympy.Ne) == keeps else sympy.false for c in conds})
    off = expr.xreplace({c: sympy.false if isinstance(c, sympy.Ne) == keeps else sympy.true for c in conds})
    return on, off


def _kept_where(expr, conds):
    """True when the scores are kept where the side is nonzero and a fill where it is 0 (HF's bool masks),
    False the other way round (`masked_fill(mask == 0, ...)`: the side is the padding), None when neither
    (a soft mask, or no fill)."""
    on, off = _on_off(expr, conds)
    if codegen.never_huge_negative(on) and _is_fill(off):
        return True
    if codegen.never_huge_negative(off) and _is_fill(on):
        return False
    return None


def _key_padding(t: torch.Tensor, nq: int, nk: int, keeps: bool = True):
    """(causal, kind, tensor, keeps) when the kept scores (`t != 0`, or `t == 0` when not `keeps`) are exactly
    `keep[b, h, kv]` (key padding: rows all alike, or t one row) or `causal & keep[b, h, kv]` (bottom-right
    causal: HF causal LMs with a padding mask), keep being t's last query row, and every query row keeps a
    key. kind "counts": (B', H', 1, 1) int32 numbers of kept keys, when each keep row is a prefix (right
    padding: the kernels bound their loops by it, codegen.kv_len); kind "row": the (B', H', 1, Nk) view of the last row, loaded per key block. None otherwise. Under causal,
    row 0 keeps the fewest keys (0 .. Nk - Nq), so it decides the second condition; left padding fails it."""
    if nq == 0 or nk == 0 or t.dim() != 4 or t.shape[-1] != nk or t.shape[-2] not in (1, nq):
        return None  # (B', H', Nq, Nk) as HF builds it, or a row of keys (B', H', 1, Nk) as people write it
    nz = (t != 0) if keeps else (t == 0)  # kept scores
    keep = nz[:, :, -1:, :]
    qi = torch.arange(nq, device=t.device)[:, None]
    ki = torch.arange(nk, device=t.device)[None, :]
    counts = keep.sum(-1, keepdim=True, dtype=torch.int32)
    checks = [(nz == keep).all(), (counts >= 1).all(), (keep == (ki < counts)).all()]
    if nk >= nq:
        checks += [(nz == ((ki <= qi + (nk - nq)) & keep)).all(), keep[..., : nk - nq + 1].any(-1).all()]
    flags = torch.stack(checks).tolist()  # one host sync
    plain, prefix = flags[0] and flags[1], flags[2]
    causal = len(flags) > 3 and flags[3] and flags[4]
    if not (plain or causal):
        return None
    if prefix and KEY_COUNTS:
        return causal and not plain, "counts", counts, keeps
    return causal and not plain, "row", t[:, :, -1:, :], keeps


# ---- additive key padding (BERT-style encoders: scores + (1 - mask) * finfo.min, one row per batch) ----
def _additive_key_padding(expr, i: int, t: torch.Tensor, nk: int):
    """(new expr, (B', H', 1, 1) int32 key counts) when the scores get a term g(side i) added, side i a row of
    keys (B', H', 1, Nk) (`scores + (1 - mask) * finfo.min` as encoders write it), and g is 0 on a prefix of
    at least one key and a fill (<= HUGE_FILL, -inf included) after it in every row; the rest of the sum is
    never a huge negative. Then `kv_idx >= key_count` is masked instead, a loop bound. Exact: kept scores add
    0, and a fill's probability is 0 either way when the row keeps a key. None otherwise."""
    s = sm.side(i)
    if not isinstance(expr, sympy.Add) or t.dim() > 4 or t.requires_grad:
        return None
    # g: the terms of the side and constants (sympy spreads (1 - m) * fill into fill - fill * m)
    in_g = [a.free_symbols <= {s} for a in expr.args]
    g = sympy.Add(*[a for a, y in zip(expr.args, in_g) if y])
    rest = sympy.Add(*[a for a, y in zip(expr.args, in_g) if not y])
    if g.free_symbols != {s} or not codegen.never_huge_negative(rest):
        return None
    shape = (1,) * (4 - t.dim()) + tuple(t.shape)
    if shape[2] != 1 or shape[3] != nk or nk == 0:
        return None
    key = ("additive", _key(t), nk, sm.to_text(g))
    hit = _CACHE.get(key)
    if hit is None or not _live(hit[1], t):
        ok = False
        if KEY_COUNTS:
            try:
                row = torch.as_tensor(sm.evaluate(g, {s.name: t.reshape(shape).double()})).expand(shape)
            except Exception:  # noqa: BLE001 (a term torch cannot evaluate: leave the side as it is)
                row = None
            if row is not None:
                keep = row == 0
                counts = keep.sum(-1, keepdim=True, dtype=torch.int32)
                ki = torch.arange(nk, device=t.device)
                ok = bool((keep | (row <= codegen.HUGE_FILL)).all() & (keep == (ki < counts)).all()
                          & (counts >= 1).all())  # one host sync
        if len(_CACHE) > _MAX_CACHE:
            _CACHE.clear()
        hit = _CACHE[key] = (counts if ok else None, _hold(t, ok))
    if hit[0] is None:
        return None
    return sympy.Piecewise((-sympy.oo, sympy.GreaterThan(sm.kv_idx, sm.key_count(s))), (rest, True)), hit[0]


def _is_fill(e) -> bool:
    """-inf, a huge constant fill, or a moderate value plus one (HF's additive form)."""
    if e == -sympy.oo or codegen.is_huge_fill(e):
        return True
    if isinstance(e, sympy.Add):
        fills = [a for a in e.args if codegen.is_huge_fill(a)]
        rest = sympy.Add(*[a for a in e.args if a not in fills])
        return len(fills) == 1 and codegen.never_huge_negative(rest)
    return False


def _wrap_causal(expr, conds, replaced: dict, i: int, padding):
    """expr with side i's mask split into the keys it keeps and, for causal & padding, `causal` (as -inf:
    key blocks above the diagonal skipped), every masked score -inf. `padding` from `_key_padding`: side i
    becomes the key counts (`kv_idx >= key_count(side i)` masked: a loop bound) or the mask's last row
    (loaded per key block, not per score). Exact when every row keeps a key (checked) and masked scores are a
    fill: their probabilities are 0 either way. Anything else (a soft mask, other sides or fills in the
    value) leaves expr as it is."""
    causal, kind, tensor, keeps = padding
    on, off = _on_off(expr, conds, keeps)
    if not codegen.never_huge_negative(on) or not _is_fill(off):
        return expr
    replaced[i] = tensor
    # the fill becomes -inf too (no row is all fill): no huge constant left, so the kernels fold the value
    # (nested: one Piecewise would merge the two -inf cases into one condition that is not index-only)
    if kind == "counts":
        padded = sympy.GreaterThan(sm.kv_idx, sm.key_count(sm.side(i)))
    else:
        padded = sympy.Eq(sm.side(i), 0) if keeps else sympy.Ne(sm.side(i), 0)
    inner = sympy.Piecewise((-sympy.oo, padded), (on, True))
    return sympy.Piecewise((-sympy.oo, sympy.Not(_CAUSAL)), (inner, True)) if causal else inner
