"""A test-only rewrite pass for the inspect/test tooling (explain, flashfuse.testing, CLI, logging).

"relu_mul" fuses `relu(x) * 2` into one op, `flashfuse_toy::relu_times_two`, and reports near-misses:
a multiplier other than 2, or a relu whose output has another user. Importing this module registers
the pass (not a default one: select it with options={"passes": ["relu_mul"]}).
Deliberately broken variants, for testing the tools that must catch them:
"relu_mul_wrong_output" (the fused op adds 1e-3), "relu_mul_wrong_grad" (its gradient is 3x, not 2x)
and "crashing" (raises inside the pass).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from flashfuse.passes import add_pass_module, register_pass

aten = torch.ops.aten
NAME = "relu_mul"


def _define_op(name: str, offset: float, grad_factor: float):
    @torch.library.custom_op(f"flashfuse_toy::{name}", mutates_args=())
    def op(x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(x) * 2
        return y + offset if offset else y  # keeps integer inputs integer

    @op.register_fake
    def _(x):
        return torch.empty_like(x)

    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * grad_factor * (x > 0).to(grad.dtype)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    op.register_autograd(backward, setup_context=setup_context)
    return getattr(torch.ops.flashfuse_toy, name).default


relu_times_two = _define_op("relu_times_two", 0.0, 2.0)
relu_times_two_wrong_output = _define_op("relu_times_two_wrong_output", 1e-3, 2.0)
relu_times_two_wrong_grad = _define_op("relu_times_two_wrong_grad", 0.0, 3.0)


def _scalar_factor(mul: fx.Node, relu: fx.Node):
    other = mul.args[1] if mul.args[0] is relu else mul.args[0]
    return other if isinstance(other, (int, float)) else None


def _make_pass(name: str, fused_op, recompile: bool = False):
    def fuse_relu_mul(gm: fx.GraphModule, ctx) -> int:
        rewrites = 0
        for relu in list(gm.graph.nodes):
            if relu.op != "call_function" or relu.target is not aten.relu.default:
                continue
            muls = [u for u in relu.users if u.target in (aten.mul.Tensor, aten.mul.Scalar)]
            if not muls:
                continue
            mul = muls[0]
            factor = _scalar_factor(mul, relu)
            if factor is None:
                ctx.graph_report.add_near_miss(name, mul, "the multiplier is a tensor, not the constant 2")
                continue
            if factor != 2:
                ctx.graph_report.add_near_miss(name, mul, f"the multiplier is {factor}, not 2")
                continue
            if len(relu.users) > 1:
                ctx.graph_report.add_near_miss(
                    name, mul, f"relu's output has {len(relu.users)} users; fusing would recompute it")
                continue
            with gm.graph.inserting_before(mul):
                fused = gm.graph.call_function(fused_op, (relu.args[0],))
            fused.meta.update(mul.meta)
            mul.replace_all_uses_with(fused)
            gm.graph.erase_node(mul)
            gm.graph.erase_node(relu)
            shape = "x".join(str(s) for s in fused.meta["val"].shape)
            ctx.graph_report.add_match(name, fused, f"relu(x) * 2 as one op, {shape}", factor=2, shape=shape)
            rewrites += 1
        if rewrites and recompile:
            gm.recompile()
        return rewrites

    register_pass(name)(fuse_relu_mul)
    add_pass_module(name, __name__, default=False)
    return fuse_relu_mul


fuse_relu_mul = _make_pass(NAME, relu_times_two)
_make_pass("relu_mul_recompiling", relu_times_two, recompile=True)  # regenerates gm.code itself
_make_pass("relu_mul_wrong_output", relu_times_two_wrong_output)
_make_pass("relu_mul_wrong_grad", relu_times_two_wrong_grad)


@register_pass("crashing")
def crashing_pass(gm: fx.GraphModule, ctx) -> int:
    raise RuntimeError("the crashing test pass always raises")


add_pass_module("crashing", __name__, default=False)

# explain/test with only the toy pass, running the rewritten graph op by op
OPTIONS = {"passes": [NAME], "remainder": "eager"}
