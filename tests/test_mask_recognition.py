"""A mask tensor that is an index pattern takes the symbolic path, re-checked whenever it changes."""
import sympy
import torch

from flashfuse.kernels.attention import mask_recognition, score_mod as sm


def _text():
    return sm.to_text(sympy.Piecewise((-sympy.oo, sympy.Eq(sm.side(0), 0)), (0.25 * sm.score + sm.side(1), True)))


def test_tril_buffer_becomes_causal_and_is_rechecked_after_change():
    buf = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
    bias = torch.randn(1, 2, 1, 9)
    text, sides, kept = mask_recognition.specialize(_text(), [buf[:, :, :9, :9], bias], 9, 9)
    assert kept == [1] and sides[0] is bias
    expr = sm.from_text(text)
    assert sm.side_ids(expr) == [0] and expr.has(sm.kv_idx) and expr.has(sm.q_idx)
    # same values as the original expression on a grid
    s = torch.randn(1, 2, 9, 9)
    env = {"score": s, "q_idx": torch.arange(9)[:, None], "kv_idx": torch.arange(9)[None, :], "Nq": 9, "Nk": 9,
           "b": 0, "h": torch.arange(2)[:, None, None]}
    a = sm.evaluate(expr, {**env, "side0": bias})
    b = sm.evaluate(sm.from_text(_text()), {**env, "side0": buf[:, :, :9, :9], "side1": bias})
    assert torch.equal(a, b)
    # an in-place change of the buffer (version bump) is seen: no longer causal, the side stays
    buf[0, 0, 0, 5] = 1.0
    text2, sides2, kept2 = mask_recognition.specialize(_text(), [buf[:, :, :9, :9], bias], 9, 9)
    assert kept2 == [0, 1] and text2 == _text()


def test_padding_mask_differs_per_batch_is_kept():
    m = torch.ones(2, 1, 7, 7, dtype=torch.bool).tril()
    m[1, :, :, -2:] = False
    text = sm.to_text(sympy.Piecewise((-sympy.oo, sympy.Not(sympy.Ne(sm.side(0), 0))), (sm.score, True)))
    _, sides, kept = mask_recognition.specialize(text, [m], 7, 7)
    assert kept == [0]


def test_bottom_right_causal_cross():
    m = torch.ones(5, 11, dtype=torch.bool).tril(diagonal=6).view(1, 1, 5, 11)
    text = sm.to_text(sympy.Piecewise((-sympy.oo, sympy.Eq(sm.side(0), 0)), (sm.score, True)))
    new, sides, kept = mask_recognition.specialize(text, [m], 5, 11)
    assert kept == [] and sides == [] and "Nk" in new


def test_a_recognized_mask_keeps_its_address_taken():
    """A per-call mask (version 0) allocated where a recognized one used to live would hit its cache
    entry; the entry holds the storage, so that address cannot be handed out while it is cached."""
    text = sm.to_text(sympy.Piecewise((-sympy.oo, sympy.Eq(sm.side(0), 0)), (sm.score, True)))
    causal = torch.ones(1, 1, 8, 8).tril()
    _, _, kept = mask_recognition.specialize(text, [causal], 8, 8)
    assert kept == []
    ref = causal.untyped_storage()._weak_ref()
    del causal
    try:
        assert not torch.UntypedStorage._expired(ref)
    finally:
        torch.UntypedStorage._free_weak_ref(ref)
    padded = torch.ones(1, 1, 8, 8).tril()
    padded[..., -3:] = 0.0
    _, _, kept = mask_recognition.specialize(text, [padded], 8, 8)
    assert kept == [0]
