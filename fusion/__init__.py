"""flashfuse: a torch.compile backend that finds hand-written attention (and norms) in the FX graph
and replaces each with one generated Triton kernel.

    model = torch.compile(model, backend="flashfuse")
    report = flashfuse.explain(model, x)
"""
from flashfuse import log as _log  # noqa: F401  (FLASHFUSE_LOG)
from flashfuse.backend import Backend, backend, flashfuse_backend
from flashfuse.config import Config
from flashfuse.report import Report

__all__ = ["Backend", "Config", "Report", "backend", "explain", "flashfuse_backend"]
__version__ = "0.1.0"


def explain(model_or_fn, *args, **kwargs) -> Report:
    """Compile `model_or_fn` with flashfuse on these inputs and return what was fused and why not."""
    from flashfuse.explain import explain as _explain

    return _explain(model_or_fn, *args, **kwargs)
