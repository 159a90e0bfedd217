"""pytest plugin (entry point `pytest11`, loaded automatically once flashfuse is installed).

    def test_block(flashfuse_check):
        model, x = Block(), torch.randn(2, 16, 64)
        flashfuse_check.assert_fused(model, x, attention=1)
        flashfuse_check.assert_close_to_eager(model, x)

    @pytest.mark.flashfuse(remainder="eager")     # default backend options for this test's checks
    def test_fast(flashfuse_check): ...

The fixture resets Dynamo before and after the test, so compiled code does not leak between tests.
This module imports torch only when the fixture is used: the plugin loads in every pytest run of an
environment that has flashfuse installed.
"""
from __future__ import annotations

from typing import Any, Mapping

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "flashfuse(**options): default flashfuse backend options for the flashfuse_check fixture")


class FlashfuseCheck:
    """What the `flashfuse_check` fixture gives: flashfuse.testing's assertions and explain, with this
    test's default backend options (from `@pytest.mark.flashfuse(...)`) merged under the call's."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options: dict[str, Any] = dict(options or {})

    def _options(self, options: Mapping[str, Any] | None) -> dict[str, Any]:
        return {**self.options, **dict(options or {})}

    def explain(self, model: Any, *args: Any, options: Mapping[str, Any] | None = None, **kwargs: Any):
        from flashfuse.explain import explain

        return explain(model, *args, options=self._options(options), **kwargs)

    def assert_fused(self, model: Any, *inputs: Any, options: Mapping[str, Any] | None = None,
                     **expected: int):
        from flashfuse.testing import assert_fused

        return assert_fused(model, *inputs, options=self._options(options), **expected)

    def assert_close_to_eager(self, model: Any, *inputs: Any, options: Mapping[str, Any] | None = None,
                              **kwargs: Any) -> None:
        from flashfuse.testing import assert_close_to_eager

        assert_close_to_eager(model, *inputs, options=self._options(options), **kwargs)

    def __repr__(self) -> str:
        return f"<flashfuse_check options={self.options}>"


@pytest.fixture
def flashfuse_check(request: pytest.FixtureRequest):
    """flashfuse's test helpers (`.assert_fused`, `.assert_close_to_eager`, `.explain`), with Dynamo
    reset around the test."""
    import torch._dynamo

    options: dict[str, Any] = {}
    for marker in reversed(list(request.node.iter_markers("flashfuse"))):  # closest marker wins
        if marker.args:
            raise pytest.UsageError("@pytest.mark.flashfuse takes backend options as keywords only, "
                                    f"e.g. @pytest.mark.flashfuse(remainder='eager'); got {marker.args}")
        options.update(marker.kwargs)
    torch._dynamo.reset()
    yield FlashfuseCheck(options)
    torch._dynamo.reset()
