"""Rewrite passes, one fusion per file. Each module registers itself with `register_pass`.

A pass is a function `run(gm, ctx) -> int` that rewrites `gm` (an ATen-level FX graph produced by
`normalize`) in place and returns how many subgraphs it replaced. It reports every match and every
near-miss into `ctx.graph_report`.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import torch.fx as fx

# name -> (module that defines it, whether it runs by default). Order here is the run order:
# attention first (it consumes the softmax chains), then norms and the pointwise fusions.
_PASS_MODULES: dict[str, tuple[str, bool]] = {
    "attention": ("flashfuse.passes.attention", True),
    "layer_norm": ("flashfuse.passes.layer_norm", True),
    "rms_norm": ("flashfuse.passes.rms_norm", True),
    "residual_norm": ("flashfuse.passes.residual_norm", True),
    "bias_gelu": ("flashfuse.passes.bias_gelu", True),
    "prelu": ("flashfuse.passes.prelu", True),
    "matmul_transpose": ("flashfuse.passes.matmul_transpose", True),
    "global_pool": ("flashfuse.passes.global_pool", True),
    "eltwise_chain": ("flashfuse.passes.eltwise_chain", True),  # last: the other pointwise fusions first
}


@dataclasses.dataclass
class PassContext:
    config: Any            # flashfuse.config.Config
    graph_report: Any      # flashfuse.report.GraphReport
    example_inputs: list   # fake or real example inputs of the graph
    is_cuda: bool          # whether the graph computes on a CUDA device
    cuda_graphs: bool = False  # whether the lowered graph will be captured in CUDA graphs (reduce-overhead)


PassFn = Callable[[fx.GraphModule, PassContext], int]
_REGISTRY: dict[str, PassFn] = {}


def register_pass(name: str) -> Callable[[PassFn], PassFn]:
    def deco(fn: PassFn) -> PassFn:
        _REGISTRY[name] = fn
        return fn
    return deco


def add_pass_module(name: str, module: str, default: bool = True) -> None:
    """Make a pass known (used by pass files that live outside this package, and by tests)."""
    _PASS_MODULES[name] = (module, default)


def known_pass_names() -> list[str]:
    return list(_PASS_MODULES)


def default_pass_names() -> list[str]:
    return [n for n, (_, default) in _PASS_MODULES.items() if default]


def get_pass(name: str) -> PassFn:
    if name not in _REGISTRY:
        module, _ = _PASS_MODULES[name]
        importlib.import_module(module)
    return _REGISTRY[name]
