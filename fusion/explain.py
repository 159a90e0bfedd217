"""flashfuse.explain: compile with the flashfuse backend and return the Report."""
from __future__ import annotations

from typing import Any

import torch

from flashfuse.backend import Backend
from flashfuse.report import Report, _active


def explain(model_or_fn: Any, *args: Any, options: dict | None = None, **kwargs: Any) -> Report:
    """Compile `model_or_fn` with flashfuse (eager remainder: nothing heavy is compiled), run it once on
    `args`/`kwargs`, and return the Report of every captured graph."""
    report = Report()
    opts = {"remainder": "eager", **(options or {})}
    compiled = torch.compile(model_or_fn, backend=Backend(**opts))
    _active.append(report)
    try:
        with torch.no_grad():
            compiled(*args, **kwargs)
    finally:
        _active.pop()
    return report
