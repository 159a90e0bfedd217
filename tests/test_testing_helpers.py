"""flashfuse.testing (assert_fused, assert_close_to_eager) and the pytest plugin's fixture."""
from __future__ import annotations

import os
import textwrap

import pytest
import torch
import torch.nn as nn

import flashfuse
import flashfuse_toy_pass as toy
from flashfuse.testing import UnknownFusionError, assert_close_to_eager, assert_fused

pytest_plugins = ["pytester"]

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
EXAMPLES_DIR = os.path.join(TESTS_DIR, os.pardir, "examples")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        y = torch.relu(self.lin(x)) * 2
        z = torch.relu(y) * 3
        return {"out": self.drop(z), "aux": [y.sum()]}


def test_assert_fused_passes_and_returns_the_report():
    report = assert_fused(Toy(), torch.randn(4, 8), options=toy.OPTIONS, relu_mul=1)
    assert report.count("relu_mul") == 1


def test_assert_fused_failure_lists_matches_and_near_misses():
    with pytest.raises(AssertionError) as info:
        assert_fused(Toy(), torch.randn(4, 8), options=toy.OPTIONS, relu_mul=2)
    message = str(info.value)
    assert message.splitlines()[0] == "flashfuse: expected relu_mul=2; got relu_mul=1"
    assert "relu_mul at test_testing_helpers.py:" in message
    assert "relu(x) * 2 as one op, 4x8" in message
    assert "not fused: the multiplier is 3, not 2" in message


def test_assert_fused_zero_is_checked_exactly():
    with pytest.raises(AssertionError, match="expected relu_mul=0; got relu_mul=1"):
        assert_fused(Toy(), torch.randn(4, 8), options=toy.OPTIONS, relu_mul=0)
    assert_fused(lambda x: x + 1, torch.randn(3), options=toy.OPTIONS, relu_mul=0)


def test_assert_fused_shows_why_passes_were_skipped():
    options = {"passes": ["relu_mul", "crashing"], "remainder": "eager"}
    with pytest.raises(AssertionError, match="the crashing test pass always raises"):
        assert_fused(Toy(), torch.randn(4, 8), options=options, relu_mul=1)


def test_assert_fused_unknown_fusion_name_is_a_clear_error():
    with pytest.raises(UnknownFusionError, match=r"'relu_mull' \(did you mean 'relu_mul'\?\)"):
        assert_fused(Toy(), torch.randn(4, 8), options=toy.OPTIONS, relu_mull=1)
    # it is an argument error, not a failed expectation
    assert issubclass(UnknownFusionError, TypeError) and issubclass(UnknownFusionError, ValueError)
    assert not issubclass(UnknownFusionError, AssertionError)


def test_assert_fused_rejects_bad_counts():
    with pytest.raises(TypeError, match="name at least one fusion"):
        assert_fused(Toy(), torch.randn(4, 8), options=toy.OPTIONS)
    with pytest.raises(TypeError, match="must be an int"):
        assert_fused(Toy(), torch.randn(4, 8), options=toy.OPTIONS, relu_mul=True)


def test_assert_close_to_eager_passes_and_leaves_the_model_alone():
    model = Toy()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 8)
    assert_close_to_eager(model, x, options=toy.OPTIONS)
    assert model.training  # compared in eval mode on a copy
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not x.requires_grad


def test_assert_close_to_eager_catches_a_wrong_output():
    options = {"passes": ["relu_mul_wrong_output"], "remainder": "eager"}
    with pytest.raises(AssertionError, match=r"flashfuse differs from eager in output\['out'\]"):
        assert_close_to_eager(Toy(), torch.randn(4, 8), options=options)


def test_assert_close_to_eager_catches_a_wrong_gradient():
    options = {"passes": ["relu_mul_wrong_grad"], "remainder": "eager"}
    assert_close_to_eager(Toy(), torch.randn(4, 8), options=options, grads=False)  # outputs agree
    with pytest.raises(AssertionError, match="flashfuse differs from eager in gradient of"):
        assert_close_to_eager(Toy(), torch.randn(4, 8), options=options)


class Box:
    """An output container pytree does not know (like a transformers KV cache)."""

    def __init__(self, tensors):
        self.tensors = tensors
        self.note = "kept"


def test_assert_close_to_eager_looks_into_plain_objects():
    def boxed(x):
        return Box([x + 1, torch.relu(x) * 2])

    assert_close_to_eager(boxed, torch.randn(4), options=toy.OPTIONS)
    options = {"passes": ["relu_mul_wrong_output"], "remainder": "eager"}
    with pytest.raises(AssertionError, match=r"differs from eager in output\.tensors\[1\]"):
        assert_close_to_eager(boxed, torch.randn(4), options=options)


def test_assert_close_to_eager_tolerance_is_the_callers():
    options = {"passes": ["relu_mul_wrong_output"], "remainder": "eager"}
    assert_close_to_eager(Toy(), torch.randn(4, 8), options=options, grads=False, rtol=1e-2, atol=5e-3)


def test_assert_close_to_eager_without_differentiable_outputs_says_so():
    with pytest.raises(AssertionError, match="pass grads=False"):
        assert_close_to_eager(lambda n: torch.relu(n) * 2, torch.arange(4), options=toy.OPTIONS)
    assert_close_to_eager(lambda n: torch.relu(n) * 2, torch.arange(4), options=toy.OPTIONS, grads=False)


def test_assert_close_to_eager_leaves_no_compiled_code():
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    assert_close_to_eager(Toy(), torch.randn(4, 8), options=toy.OPTIONS)
    assert _debug_get_cache_entry_list(Toy.forward) == []


def test_testing_is_exported():
    assert flashfuse.testing.assert_fused is assert_fused


def test_real_attention_pass_on_the_nanogpt_block():
    import importlib.util

    spec = importlib.util.spec_from_file_location("explain_toy_for_testing",
                                                  os.path.join(EXAMPLES_DIR, "explain_toy.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model, (x,) = example.make_block()
    assert_fused(model, x, options={"passes": ["attention"]}, attention=1)
    with pytest.raises(AssertionError, match="expected attention=2; got attention=1"):
        assert_fused(model, x, options={"passes": ["attention"]}, attention=2)
    assert_close_to_eager(model, x[:, :8], options={"passes": ["attention"], "remainder": "eager"})


def test_norm_counts_do_not_depend_on_the_machine():
    import importlib.util

    spec = importlib.util.spec_from_file_location("explain_toy_for_norms",
                                                  os.path.join(EXAMPLES_DIR, "explain_toy.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model, (x,) = example.make_block()
    options = {"passes": ["attention", "layer_norm"]}
    # norm_policy defaults to "always" in flashfuse.testing: both LayerNorms count, on CPU as on GPU
    assert_fused(model, x, options=options, attention=1, layer_norm=2)
    # "auto" is the backend's own choice: on a CPU graph under Inductor the norms are left to Inductor
    with pytest.raises(AssertionError) as info:
        assert_fused(model, x, options={**options, "norm_policy": "auto"}, attention=1, layer_norm=2)
    message = str(info.value)
    assert "expected attention=1, layer_norm=2; got attention=1, layer_norm=0" in message
    assert "'norm_policy': 'auto'" in message
    assert "not fused: norm_policy='auto'" in message


# ---- the pytest plugin ----

PLUGIN_TESTS = textwrap.dedent('''
    import pytest
    import torch
    import flashfuse_toy_pass as toy
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    def f(x):
        return torch.relu(x) * 2

    def test_passes(flashfuse_check):
        report = flashfuse_check.explain(f, torch.randn(3), options=toy.OPTIONS)
        assert report.count("relu_mul") == 1
        flashfuse_check.assert_fused(f, torch.randn(3), options=toy.OPTIONS, relu_mul=1)
        flashfuse_check.assert_close_to_eager(f, torch.randn(3), options=toy.OPTIONS)

    def test_fails_with_reasons(flashfuse_check):
        g = lambda x: torch.relu(x) * 3
        flashfuse_check.assert_fused(g, torch.randn(3), options=toy.OPTIONS, relu_mul=1)

    @pytest.mark.flashfuse(passes=["relu_mul"], remainder="eager")
    def test_marker_sets_default_options(flashfuse_check):
        assert flashfuse_check.options == {"passes": ["relu_mul"], "remainder": "eager"}
        flashfuse_check.assert_fused(f, torch.randn(3), relu_mul=1)

    def test_leaves_compiled_code(flashfuse_check):
        torch.compile(f, backend="eager")(torch.randn(3))
        assert len(_debug_get_cache_entry_list(f)) == 1

    def test_fixture_reset_dynamo_after_the_previous_test(flashfuse_check):
        assert _debug_get_cache_entry_list(f) == []
''')


def test_plugin_fixture(pytester):
    pytester.syspathinsert(TESTS_DIR)
    pytester.makepyfile(test_plugin_use=PLUGIN_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines([
        "*test_fails_with_reasons*",
        "*flashfuse: expected relu_mul=1; got relu_mul=0*",
        "*not fused: the multiplier is 3, not 2*",
    ])


def test_plugin_marker_rejects_positional_options(pytester):
    pytester.makepyfile(test_bad_marker=textwrap.dedent('''
        import pytest

        @pytest.mark.flashfuse("eager")
        def test_it(flashfuse_check):
            pass
    '''))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*takes backend options as keywords only*"])
