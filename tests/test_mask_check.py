"""Device-side mask check (kernels/attention/mask_check.py, on unless FLASHFUSE_DEVICE_MASK_CHECK=0): calls
with recognize_masks=False (CUDA-graph captures) check a tril side on the device and launch both kernel
variants; exactly one runs. Interpreter on CPU here; the GPU tests of the CUDA-graph training steps cover
the compiled path (they pass on the H100 with the check on)."""
import os

import pytest
import sympy
import torch

from flashfuse.kernels.attention import mask_recognition, reference
from flashfuse.kernels.attention import score_mod as sm

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="needs the Triton interpreter or a GPU")


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _mc():
    from flashfuse.kernels.attention import mask_check
    return mask_check


def _ti():
    from flashfuse.kernels.attention import triton_impl
    return triton_impl


def _text(scale=0.25):
    return sm.to_text(sympy.Piecewise((-sympy.oo, sympy.Eq(sm.side(0), 0)), (scale * sm.score, True)))


def _qkv(n=19, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, n, d, generator=g).to(_dev()) for _ in range(3)]


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_causal_check_flags_a_tril_and_rejects_any_other_pattern(dtype):
    n = 21
    tril = torch.ones(1, 1, n, n).tril().to(dtype).to(_dev())
    assert _mc().causal_check(tril).item() == 1
    off = tril.clone()
    off[0, 0, 3, 17] = 1  # one element above the diagonal
    assert _mc().causal_check(off).item() == 0
    per_batch = tril.expand(2, 3, n, n).clone()
    per_batch[1, 2, n - 1, 0] = 0  # one batch/head differs below the diagonal
    assert _mc().causal_check(per_batch).item() == 0
    assert _mc().causal_check(tril.expand(2, 3, n, n)).item() == 1  # broadcast strides (0) are read as is


def test_candidate_needs_a_full_square_mask_without_gradient():
    tril = torch.ones(1, 1, 9, 9).tril()
    i, text, kept = _mc().candidate(_text(), [tril], 9, 9, [False])
    recognized, sides, _ = mask_recognition.specialize(_text(), [tril], 9, 9)
    assert (i, kept, sides) == (0, [], []) and sm.from_text(text).has(sm.kv_idx)
    s = torch.randn(1, 1, 9, 9)
    env = {"score": s, "q_idx": torch.arange(9)[:, None], "kv_idx": torch.arange(9)[None, :], "Nq": 9, "Nk": 9,
           "b": 0, "h": 0}
    assert torch.equal(sm.evaluate(sm.from_text(text), env), sm.evaluate(sm.from_text(recognized), env))
    assert _mc().candidate(_text(), [tril[:, :, :7]], 7, 9, [False]) is None  # Nq != Nk
    assert _mc().candidate(_text(), [tril], 9, 9, [True]) is None              # a side needs a gradient
    in_value = sm.to_text(0.25 * sm.score + sm.side(0))
    assert _mc().candidate(in_value, [tril], 9, 9, [False]) is None            # not a mask


def _op_run(q, k, v, sides, dropout_p=0.0, rng=None, recognize=False):
    from flashfuse.kernels.attention import op  # noqa: F401  (registers the op)
    q, k, v = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, _, _ = torch.ops.flashfuse.attention(q, k, v, sides, [], _text(), dropout_p, rng, "ieee", recognize)
    out.square().sum().backward()
    return [out.detach(), q.grad, k.grad, v.grad]


def _reference(q, k, v, side):
    q, k, v = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    s = (q @ k.transpose(-1, -2)) * 0.25
    s = s.masked_fill(side.expand_as(s) == 0, float("-inf"))
    out = torch.softmax(s, -1) @ v
    out.square().sum().backward()
    return [out.detach(), q.grad, k.grad, v.grad]


def test_op_under_the_device_check_matches_host_recognition_and_float64(monkeypatch):
    monkeypatch.setenv("FLASHFUSE_DEVICE_MASK_CHECK", "1")
    q, k, v = _qkv()
    tril = torch.ones(1, 1, 19, 19).tril().to(_dev())
    checked = _op_run(q, k, v, [tril])
    host = _op_run(q, k, v, [tril], recognize=True)
    for a, b, r in zip(checked, host, _reference(q, k, v, tril)):
        assert torch.equal(a, b)  # the same specialized kernel ran
        assert _rel(a, r) < 1e-5


def test_op_under_the_device_check_with_a_changed_mask_takes_the_general_kernel(monkeypatch):
    monkeypatch.setenv("FLASHFUSE_DEVICE_MASK_CHECK", "1")
    q, k, v = _qkv(seed=1)
    mask = torch.ones(1, 1, 19, 19).tril().to(_dev())
    mask[0, 0, 4, 11] = 1.0  # no longer causal: the causal kernel would give a wrong number here
    mask[0, 0, 9, 2] = 0.0
    for a, r in zip(_op_run(q, k, v, [mask]), _reference(q, k, v, mask)):
        assert _rel(a, r) < 1e-5


def test_op_under_the_device_check_with_dropout_draws_the_same_bits(monkeypatch):
    monkeypatch.setenv("FLASHFUSE_DEVICE_MASK_CHECK", "1")
    q, k, v = _qkv(seed=2)
    tril = torch.ones(1, 1, 19, 19).tril().to(_dev())
    rng = torch.tensor([1234, 56], dtype=torch.int64, device=_dev())
    for a, b in zip(_op_run(q, k, v, [tril], 0.2, rng), _op_run(q, k, v, [tril], 0.2, rng, recognize=True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("flag_value,want,runs", [(1, 1, True), (1, 0, False), (0, 0, True), (0, 1, False)])
def test_flag_want_runs_or_skips_each_kernel(flag_value, want, runs):
    """The forward, dK/dV and dQ kernels each write their outputs only when flag[0] == FLAG_WANT."""
    q, k, v = _qkv(n=13)
    text = sm.to_text(0.25 * sm.score)
    flag = torch.tensor([flag_value], dtype=torch.int32, device=_dev())
    out = torch.full((1, 2, 13, 16), 7.0, device=_dev())
    lse = torch.full((1, 2, 2, 13), 7.0, device=_dev())  # the row stats: max, log2 sum
    _ti().attention_forward(q, k, v, [], [], text, 0.0, None, "ieee", flag, want, into=(out, lse))
    ref_out, ref_lse, _ = reference.attention_forward(q, k, v, [], [], text, 0.0, None), None, None
    assert torch.allclose(out, ref_out[0], atol=1e-5) == runs
    assert bool((out == 7.0).all()) == (not runs)
    dout = torch.randn_like(ref_out[0])
    lse = ref_out[1].to(torch.float32).contiguous()
    fresh = [torch.full_like(t, 7.0) for t in (q, k, v)]
    delta = _ti().backward_preprocess(ref_out[0].contiguous(), dout, lse)
    _ti().attention_backward(dout, q, k, v, ref_out[0].contiguous(), lse, [], [], text, 0.0, None, [], "ieee",
                             flag, want, into=(*fresh, delta))
    for g in fresh:
        assert bool((g == 7.0).all()) == (not runs)


def _padding_masks(n=19):
    """(name, (B, 1, n, n) bool mask, flag the device check must give, kept-key counts)."""
    counts = torch.tensor([n, 11, 1])
    keep = torch.arange(n)[None, :] < counts[:, None]  # right padding
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    enc = keep[:, None, None, :].expand(3, 1, n, n).contiguous()
    dec = causal & keep[:, None, None, :]
    left = causal & keep.flip(-1)[:, None, None, :]  # left padding: row 0 of batch 1 keeps no key
    empty = enc.clone()
    empty[2] = False  # a batch that keeps nothing: eager's uniform average over the fills
    holes = dec.clone()
    holes[0, ..., 5] = False
    return [("causal_and_right_padding", dec, 2, counts), ("encoder_right_padding", enc, 3, counts),
            ("causal_per_batch", causal.expand(3, 1, n, n), 2, torch.full((3,), n)),
            ("left_padding", left, 0, None), ("a_batch_keeps_nothing", empty, 0, None), ("holes", holes, 0, None)]


@pytest.mark.parametrize("case", range(6), ids=[c[0] for c in _padding_masks()])
def test_padding_check_counts_keys_and_flags_only_right_padding(case):
    _, mask, want, counts = _padding_masks()[case]
    flag, got = _mc().padding_check(mask.to(_dev()))
    assert flag.item() == want
    if counts is not None:
        assert got.view(-1).tolist() == counts.tolist()


@pytest.mark.parametrize("case", [0, 1, 5], ids=["causal_and_right_padding", "encoder_right_padding", "holes"])
def test_op_under_the_device_check_with_padding_masks_matches_float64(case, monkeypatch):
    """HF-style per-batch masks under the device check (CUDA-graph captures): the key-count variants give the
    numbers of host recognition and of float64; a key row with holes takes the general kernel."""
    monkeypatch.setenv("FLASHFUSE_DEVICE_MASK_CHECK", "1")
    _, mask, _, _ = _padding_masks()[case]
    mask = mask.to(_dev())
    g = torch.Generator().manual_seed(case)
    q, k, v = [torch.randn(3, 2, 19, 16, generator=g).to(_dev()) for _ in range(3)]
    checked = _op_run(q, k, v, [mask])
    host = _op_run(q, k, v, [mask], recognize=True)
    for a, b, r in zip(checked, host, _reference(q, k, v, mask)):
        assert _rel(a, b) < 1e-6 and _rel(a, r) < 1e-5
