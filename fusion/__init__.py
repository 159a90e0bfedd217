"""flashfuse: a torch.compile backend that finds hand-written attention (and norms) in the FX graph
and replaces each with one generated Triton kernel.

    model = torch.compile(model, backend="flashfuse")
    report = flashfuse.explain(model, x)
"""
from flashfuse import log as _log  # noqa: F401  (FLASHFUSE_LOG)
from flashfuse.backend import Backend, backend, flashfuse_backend
from flashfuse.config import Config
from flashfuse.report import Report

# Bound eagerly: a lazy `from flashfuse.explain import ...` inside a wrapper would, on first use,
# set the attribute `flashfuse.explain` to the submodule and shadow the function.
from flashfuse.explain import explain
from flashfuse import testing  # noqa: E402  (flashfuse.testing.assert_fused, ...)

__all__ = ["Backend", "Config", "Report", "backend", "explain", "flashfuse_backend", "testing"]
__version__ = "0.1.0"
