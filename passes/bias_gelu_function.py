"""Bias + GELU written as a custom autograd.Function: Megatron's `bias_gelu_impl(input, bias)` and HF BLOOM's
`GeLUFunction` (training mode) spell GELU's forward and its derivative by hand.

Replacing such a Function also replaces the user's backward with ours, so both halves are proven first:
- every op in the forward and backward graphs is arithmetic, tanh / erf / gelu, or a grad-mode switch, so
  both compute analytic functions of their inputs, elementwise (no comparisons, no randomness, no shapes
  changed);
- evaluated in float64 on random inputs, the forward equals GELU(input + bias) (tanh or erf form) and the
  backward returns grad * GELU'(input + bias) for each input. Two different analytic functions do not
  agree on random points, and the tolerance (1e-5 relative) admits only rounded constants
  (0.79788456 for sqrt(2/pi), 0.1070322243 for 3 * 0.044715 * sqrt(2/pi)).
Megatron returns the full-shaped gradient for the bias too (autograd sums it to the bias's shape, as our
op does); a backward that sums it itself is not elementwise and stays whole. Anything else stays whole,
with the reason in the report.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._functorch.autograd_function import autograd_function_apply

from flashfuse.passes.normalize import val

# the calls a GELU Function's graphs may make (Dynamo graphs: torch functions, operators, tensor methods)
_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
              torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.tanh, torch.erf,
              torch.special.erf, torch.exp, torch.nn.functional.gelu, torch._C._set_grad_enabled, torch.ones_like}
_METHODS = {"add", "sub", "mul", "div", "neg", "pow", "tanh", "erf", "exp", "to", "type_as", "__add__", "__mul__",
            "__sub__", "__truediv__", "__radd__", "__rmul__", "__rsub__"}
REL_TOL = 1e-5
SAMPLES = 4096  # random points per check (the graphs are elementwise, so a flat vector stands for any shape)


def _only_elementwise(g: fx.GraphModule) -> str | None:
    for n in g.graph.nodes:
        if n.op == "call_function" and n.target not in _FUNCTIONS:
            return f"its graph calls `{getattr(n.target, '__name__', n.target)}`"
        if n.op == "call_method" and n.target not in _METHODS:
            return f"its graph calls `.{n.target}()`"
        if n.op in ("call_module", "get_attr"):
            return "its graph holds modules or attributes"
    return None


def _gelu(u: torch.Tensor, kind: str) -> torch.Tensor:
    return torch.nn.functional.gelu(u, approximate=kind)


def _gelu_grad(u: torch.Tensor, kind: str) -> torch.Tensor:
    u = u.detach().requires_grad_(True)
    (d,) = torch.autograd.grad(_gelu(u, kind).sum(), u)
    return d


def _close(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and a.shape == b.shape
            and bool(((a - b).abs() <= REL_TOL * b.abs() + 1e-12).all()))


def match(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node | None, str] | str | None:
    """For an `autograd_function_apply` call: (input, bias or None, "none"|"tanh") when the Function is
    provably bias + GELU with GELU's gradient as its backward; a reason when it looks like a GELU Function
    but is not proven; None when it is something else."""
    if node.op != "call_function" or node.target is not autograd_function_apply:
        return None
    fwd_attr, bwd_attr, *inputs = node.args
    fwd = getattr(gm, fwd_attr.target, None) if isinstance(fwd_attr, fx.Node) else None
    bwd = getattr(gm, bwd_attr.target, None) if isinstance(bwd_attr, fx.Node) else None
    if not isinstance(fwd, fx.GraphModule) or not isinstance(bwd, fx.GraphModule):
        return None
    names = {getattr(n.target, "__name__", str(n.target)) for n in fwd.graph.nodes if n.op in ("call_function",
                                                                                            "call_method")}
    if not names & {"tanh", "erf", "gelu"}:
        return None  # not a GELU Function: report_hidden speaks for the others
    if set(node.kwargs) - {"non_differentiable_idx", "saved_for_backward_idx"} or node.kwargs.get(
            "non_differentiable_idx"):
        return "the Function marks outputs non-differentiable or takes other arguments"
    users = list(node.users)
    if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in users):
        return "the Function has more than one output"
    out = val(users[0]) if users else None
    vals = [val(a) if isinstance(a, fx.Node) else None for a in inputs]
    if out is None or any(v is None for v in vals) or not 1 <= len(inputs) <= 2:
        return "the Function takes other than one or two tensors"
    full = [i for i, v in enumerate(vals) if v.shape == out.shape and v.dtype == out.dtype]
    if not full:
        return "no input has the output's shape and dtype"
    x_at = full[0]
    bias_at = 1 - x_at if len(inputs) == 2 else None
    if bias_at is not None:
        b = vals[bias_at]
        if not (b.dtype == out.dtype and 1 <= b.dim() <= out.dim() and b.shape[-1] == out.shape[-1]
                and all(s == 1 for s in b.shape[:-1])):
            return "the second input is not a bias along the last dim"
    for part, g in (("forward", fwd), ("backward", bwd)):
        reason = _only_elementwise(g)
        if reason is not None:
            return f"the {part} is not provably elementwise: {reason}"
    return _prove(fwd, bwd, inputs, vals, x_at, bias_at)


def _prove(fwd, bwd, inputs, vals, x_at, bias_at):
    gen = torch.Generator().manual_seed(0)
    n = SAMPLES
    # x spread wide enough to reach tanh's and erf's saturation; the bias as its own vector
    samples = [3 * torch.randn(n, generator=gen, dtype=torch.float64) for _ in inputs]
    if bias_at is not None:
        samples[bias_at] = samples[bias_at] / 3
    u = samples[x_at] + (samples[bias_at] if bias_at is not None else 0)
    try:
        with torch.no_grad():
            outs, saved = fx.Interpreter(fwd).run(*samples)
    except Exception as exc:  # a graph written for its real shapes (a view) does not take a flat vector
        return f"its forward could not be evaluated apart ({type(exc).__name__})"
    if not isinstance(outs, tuple) or len(outs) != 1:
        return "the Function has more than one output"
    kind = next((k for k in ("tanh", "none") if _close(outs[0], _gelu(u, k))), None)
    if kind is None:
        return "its forward is not GELU(input + bias) on random inputs"
    grad = torch.randn(n, generator=gen, dtype=torch.float64)
    try:
        with torch.no_grad():
            grads = fx.Interpreter(bwd).run(grad, *saved)
    except Exception as exc:
        return f"its backward could not be evaluated apart ({type(exc).__name__})"
    grads = grads if isinstance(grads, tuple) else (grads,)
    want = grad * _gelu_grad(u, kind)
    if len(grads) != len(inputs) or not all(_close(gr, want) for gr in grads):
        return "its backward is not GELU's derivative times the incoming gradient (a hand-written backward " \
               "that differs from the forward's gradient is kept)"
    return inputs[x_at], (inputs[bias_at] if bias_at is not None else None), kind
