"""How flashfuse's ops are registered: a plain `torch.library.Library` (schema, CPU/CUDA kernels, fake) and,
for differentiable ops, an Autograd kernel that applies an `autograd.Function` only when a gradient is
needed.

Not `torch.library.custom_op`: its Python wrappers cost ~230 µs per call on the H100 host (the attention
forward: 336 µs through custom_op against 85 µs this way, benchmarks/host_time.py), which made the
GPT-2 step host-bound. Inside an aot_autograd-compiled graph grad mode is off, so the Autograd kernel
goes straight to the backend kernel.
"""
from __future__ import annotations

from typing import Callable

import torch

LIB = torch.library.Library("flashfuse", "FRAGMENT")


def define(name: str, schema: str, kernel: Callable, fake: Callable):
    """Define flashfuse::`name``schema` with `kernel` for CPU and CUDA tensors; returns the OpOverload."""
    LIB.define(f"{name}{schema}")
    for key in ("CPU", "CUDA"):
        LIB.impl(name, kernel, key)
    torch.library.register_fake(f"flashfuse::{name}", fake, lib=LIB)
    return getattr(torch.ops.flashfuse, name).default


def needs_grad(args) -> bool:
    """Grad mode is on and a tensor among `args` (or in a list among them) requires grad."""
    if not torch.is_grad_enabled():
        return False
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.requires_grad:
                return True
        elif isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.requires_grad for t in a):
            return True
    return False


def define_autograd(name: str, op, differentiable: Callable) -> None:
    """The Autograd kernel of flashfuse::`name`: `differentiable(*args)` (which applies an autograd.Function)
    when a gradient is needed, else the backend kernel of `op` directly."""
    def autograd_kernel(*args, **kwargs):
        if not needs_grad(args):
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args, **kwargs)
        return differentiable(*args, **kwargs)

    LIB.impl(name, autograd_kernel, "Autograd")
