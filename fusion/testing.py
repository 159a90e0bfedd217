"""Pin down in unit tests what flashfuse does to a model.

    from flashfuse.testing import assert_fused, assert_close_to_eager

    def test_block():
        model, x = Block(), torch.randn(2, 16, 64)
        assert_fused(model, x, attention=1, layer_norm=2)
        assert_close_to_eager(model, x)

A pytest fixture with the same functions is in `flashfuse.pytest_plugin` (`flashfuse_check`).
"""
from __future__ import annotations

import copy
import difflib
import importlib
from typing import Any, Mapping

import torch
import torch.utils._pytree as pytree

from flashfuse.report import Report

__all__ = ["assert_close_to_eager", "assert_fused", "known_fusion_names", "testing_options", "UnknownFusionError"]


# flashfuse.testing pins down what flashfuse *can* fuse, the same on every machine. Under the backend's
# default norm_policy="auto" the norm and pointwise passes decide by measured speed (left to Inductor on
# CPU, size-dependent on GPU), which would make a unit test pass on one machine and fail on another.
TESTING_DEFAULTS: dict[str, Any] = {"norm_policy": "always"}


def testing_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The backend options flashfuse.testing uses: TESTING_DEFAULTS under the caller's options."""
    return {**TESTING_DEFAULTS, **dict(options or {})}


class UnknownFusionError(TypeError, ValueError):
    """`assert_fused(..., atention=1)`: a keyword that names no fusion (a bad argument, not a failed
    assertion; a TypeError like any unexpected keyword, and a ValueError for a bad value)."""


def known_fusion_names() -> set[str]:
    """Every pass name, plus the fusion names a pass module declares in `FUSIONS` (for passes that
    report several fusions, e.g. a norm pass reporting "layer_norm" and "rms_norm")."""
    from flashfuse.passes import _PASS_MODULES, known_pass_names

    names = set(known_pass_names())
    for module_name, _ in _PASS_MODULES.values():
        try:
            module = importlib.import_module(module_name)
        except Exception:  # a pass that does not import yet declares nothing more
            continue
        names.update(getattr(module, "FUSIONS", ()))
    return names


def assert_fused(model: Any, *inputs: Any, options: Mapping[str, Any] | None = None,
                 **expected: int) -> Report:
    """Explain `model(*inputs)` and check the exact number of rewrites per fusion name, e.g.
    `assert_fused(model, x, attention=1, layer_norm=2)`. Fusions not named are not checked.

    `options` are backend options; `norm_policy` defaults to "always" here (see TESTING_DEFAULTS), so
    the counts do not depend on the machine. `options={"norm_policy": "auto"}` checks this machine's
    own decision, as `torch.compile(model, backend="flashfuse")` would make it.

    Raises AssertionError listing every fusion, near-miss (with its reason), note and graph break when
    a count differs; UnknownFusionError for a keyword that names no fusion. Returns the Report."""
    from flashfuse.explain import explain

    if not expected:
        raise TypeError("assert_fused: name at least one fusion and its expected count, e.g. attention=1")
    for name, count in expected.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise TypeError(f"assert_fused: {name}={count!r}: the expected count must be an int >= 0")
    options = testing_options(options)
    report = explain(model, *inputs, options=options)
    # after explain: a pass may report fusion names other than its own (seen in the report)
    _check_names(expected, known_fusion_names() | {m.fusion for m in report.matches}
                 | {n.fusion for n in report.near_misses})
    got = {name: report.count(name) for name in expected}
    if got != dict(expected):
        raise AssertionError(_mismatch_message(expected, got, report, options))
    return report


def _check_names(expected: Mapping[str, int], known: set[str]) -> None:
    unknown = [name for name in expected if name not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UnknownFusionError(f"assert_fused: unknown fusion name(s) {', '.join(hints)}; "
                                 f"known fusions: {sorted(known)}")


def _mismatch_message(expected: Mapping[str, int], got: Mapping[str, int], report: Report,
                      options: Mapping[str, Any]) -> str:
    def counts(d: Mapping[str, int]) -> str:
        return ", ".join(f"{k}={v}" for k, v in d.items())

    lines = [f"flashfuse: expected {counts(expected)}; got {counts(got)}",
             f"options: {dict(options)}"]
    lines.append("fused:" if report.matches else "fused: nothing")
    lines += [f"  graph {m.graph}: {m}" for m in report.matches]
    lines.append("near-misses:" if report.near_misses else "near-misses: none")
    lines += [f"  graph {n.graph}: {n}" for n in report.near_misses]
    if report.notes:
        lines.append("notes:")
        lines += [f"  {note}" for note in report.notes]
    if report.graph_breaks:
        lines.append("graph breaks:")
        lines += [f"  {b}" for b in report.graph_breaks]
    return "\n".join(lines)


# ---- numerics ----

# (rtol, atol) by dtype when not given. fp32 allows for a different summation order (online softmax);
# half precisions for rounding of the intermediate values a fused kernel keeps in fp32.
_TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}
# fp32 matmuls in TF32 (flashfuse's default fp32_precision on GPUs) have a 10-bit mantissa.
_TF32_TOLERANCE = (1e-2, 1e-2)


def assert_close_to_eager(model: Any, *inputs: Any, grads: bool = True, rtol: float | None = None,
                          atol: float | None = None, options: Mapping[str, Any] | None = None,
                          train: bool = False, seed: int = 0) -> None:
    """Compile `model` with flashfuse and check that its outputs (any pytree) and, with `grads=True`,
    the gradients of the floating-point inputs and of the parameters match eager PyTorch.

    `options` are backend options, with `norm_policy` defaulting to "always" as in assert_fused, so the
    numerics of every fusion assert_fused counts are checked.
    Both runs use copies of the model and the inputs: the caller's objects are not changed. A module
    is compared in eval mode unless `train=True`: dropout draws different random numbers in a fused
    kernel than in eager, so training-mode outputs of a model with dropout cannot match.
    Tolerances default by dtype (fp32 1e-4/1e-5, fp16 1e-2, bf16 2e-2, TF32 on CUDA 1e-2)."""
    from flashfuse.backend import Backend
    from flashfuse.explain import _leave_no_trace, uncompiled

    model = uncompiled(model)
    backend = Backend(**testing_options(options))
    eager_model, compiled_model = _copy_model(model, train), _copy_model(model, train)
    eager_inputs, compiled_inputs = _copy_inputs(inputs, grads), _copy_inputs(inputs, grads)

    with _leave_no_trace(backend, None):  # both runs use copies: only Dynamo's state and the RNG to restore
        torch.manual_seed(seed)
        expected = eager_model(*eager_inputs)
        torch.manual_seed(seed)
        actual = torch.compile(compiled_model, backend=backend)(*compiled_inputs)

    tf32 = backend.config.fp32_precision == "tf32"
    _compare("output", actual, expected, rtol, atol, tf32)
    if not grads:
        return
    expected_grads = _gradients(expected, eager_model, eager_inputs, seed)
    actual_grads = _gradients(actual, compiled_model, compiled_inputs, seed)
    if not expected_grads:
        raise AssertionError("assert_close_to_eager(grads=True): no output depends on a floating-point "
                             "input or parameter that requires grad; pass grads=False")
    for name, want in expected_grads.items():
        _compare(f"gradient of {name}", actual_grads.get(name), want, rtol, atol, tf32)


def _copy_model(model: Any, train: bool) -> Any:
    if not isinstance(model, torch.nn.Module):
        return model  # a function: nothing to copy
    copied = copy.deepcopy(model)
    copied.train(train)
    return copied


def _copy_inputs(inputs: tuple, grads: bool) -> tuple:
    def leaf(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return copy.deepcopy(x)
        y = x.detach().clone()
        if grads and (y.is_floating_point() or y.is_complex()):
            y.requires_grad_(True)
        return y

    return pytree.tree_map(leaf, inputs)


def _gradients(outputs: Any, model: Any, inputs: tuple, seed: int) -> dict[str, torch.Tensor | None]:
    """d(sum of outputs * fixed random weights) / d(inputs and parameters), by name."""
    leaves = [t for t in _tensors_in(outputs) if t.requires_grad]
    named: dict[str, torch.Tensor] = {}
    for path, x in pytree.tree_flatten_with_path(inputs)[0]:
        if isinstance(x, torch.Tensor) and x.requires_grad:
            named[f"input{pytree.keystr(path)}"] = x
    if isinstance(model, torch.nn.Module):
        named.update({f"parameter {n}": p for n, p in model.named_parameters() if p.requires_grad})
    if not leaves or not named:
        return {}
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.device, t.dtype)
               for t in leaves]
    loss = sum((t * w).sum() for t, w in zip(leaves, weights))
    found = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return dict(zip(named, found))


_MAX_OBJECT_DEPTH = 6  # how deep _compare looks into plain objects (a KV cache's layers' tensors)


def _compare(what: str, actual: Any, expected: Any, rtol: float | None, atol: float | None,
             tf32: bool, depth: int = 0) -> None:
    actual_leaves, actual_spec = pytree.tree_flatten_with_path(actual)
    expected_leaves, expected_spec = pytree.tree_flatten_with_path(expected)
    if actual_spec != expected_spec:
        raise AssertionError(f"{what}: structure differs from eager: {actual_spec} vs {expected_spec}")
    for (path, a), (_, e) in zip(actual_leaves, expected_leaves):
        where = f"{what}{pytree.keystr(path)}"
        if isinstance(e, torch.Tensor):
            _compare_tensors(where, a, e, rtol, atol, tf32)
        elif type(a) is not type(e):
            raise AssertionError(f"{where}: flashfuse gave a {type(a).__name__}, eager a {type(e).__name__}")
        elif _is_plain_object(e) and depth < _MAX_OBJECT_DEPTH:
            # an object pytree does not know (e.g. a transformers KV cache): compare its attributes
            a_attrs, e_attrs = _attributes(a), _attributes(e)
            if sorted(a_attrs) != sorted(e_attrs):
                raise AssertionError(f"{where}: attributes differ from eager: {sorted(a_attrs)} vs "
                                     f"{sorted(e_attrs)}")
            for name, value in e_attrs.items():
                _compare(f"{where}.{name}", a_attrs[name], value, rtol, atol, tf32, depth + 1)
        elif a != e:
            raise AssertionError(f"{where}: {a!r} (flashfuse) != {e!r} (eager)")


def _tensors_in(x: Any, depth: int = 0) -> list[torch.Tensor]:
    """Every tensor in a pytree, also inside plain objects (as _compare sees them), in a fixed order."""
    found: list[torch.Tensor] = []
    for leaf in pytree.tree_leaves(x):
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        elif _is_plain_object(leaf) and depth < _MAX_OBJECT_DEPTH:
            found += _tensors_in(list(_attributes(leaf).values()), depth + 1)
    return found


def _is_plain_object(x: Any) -> bool:
    return (hasattr(x, "__dict__") and not isinstance(x, (type, torch.nn.Module)) and not callable(x)
            and type(x).__eq__ is object.__eq__)  # identity equality: two runs never compare equal


def _attributes(x: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(x).items() if not k.startswith("__")}


def _compare_tensors(where: str, a: Any, e: torch.Tensor, rtol: float | None, atol: float | None,
                     tf32: bool) -> None:
    if not isinstance(a, torch.Tensor):
        raise AssertionError(f"{where}: flashfuse gave {type(a).__name__}, eager a tensor")
    r, t = _tolerance(e, rtol, atol, tf32)
    try:
        torch.testing.assert_close(a.detach(), e.detach(), rtol=r, atol=t)
    except AssertionError as exc:
        raise AssertionError(f"flashfuse differs from eager in {where} (rtol={r}, atol={t}):\n{exc}") from None


def _tolerance(expected: torch.Tensor, rtol: float | None, atol: float | None, tf32: bool) -> tuple[float, float]:
    if expected.dtype == torch.float32 and expected.is_cuda and tf32:
        default = _TF32_TOLERANCE
    else:
        default = _TOLERANCES.get(expected.dtype, (0.0, 0.0))  # integers and bools: exact
    return (default[0] if rtol is None else rtol, default[1] if atol is None else atol)
