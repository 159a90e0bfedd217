"""Custom autograd.Functions kept whole through normalize's re-trace to ATen.

Dynamo captures `MyFunction.apply(x)` as the higher-order op `autograd_function_apply(fwd_graph, bwd_graph,
*args)`. make_fx would inline its forward under no_grad and drop its backward (HF BLOOM's GeLUFunction:
every gradient upstream came out wrong). So the re-trace records each such call as one opaque op,
`flashfuse::opaque_function(args, key)`, whose fake impl runs the forward graph for shapes, and afterwards
`restore` puts the original higher-order call back in its place: the passes work around it, and the
remainder (eager, or Inductor through aot_autograd) sees the Function exactly as Dynamo gave it.
"""
from __future__ import annotations

import itertools
import re

import torch
import torch.fx as fx
from torch._functorch.autograd_function import autograd_function_apply
from torch._higher_order_ops.wrap import tag_activation_checkpoint

from flashfuse.kernels.registration import define

_FUNCTIONS: dict[int, tuple] = {}  # key -> (forward graph, backward graph, kwargs of the call)
_WHERE: dict[int, str | None] = {}  # key -> the user's line that applied the Function (for the report)
_KEYS = itertools.count()


def _kernel(args, key):
    fwd, bwd, kwargs = _FUNCTIONS[key]
    return list(autograd_function_apply(fwd, bwd, *args, **kwargs))


def _fake(args, key):
    fwd, _, _ = _FUNCTIONS[key]
    output, _saved = fx.Interpreter(fwd).run(*args)
    return list(output)


_opaque = define("opaque_function", "(Tensor[] args, int key) -> Tensor[]", _kernel, _fake)

# Activation checkpointing (`torch.utils.checkpoint.checkpoint(f, ..., use_reentrant=False)`) reaches the
# backend as the higher-order op tag_activation_checkpoint(body, *args): kept whole the same way. Its body is a
# graph of its own, which the pipeline rewrites first (pipeline.rewrite_checkpoint_bodies): the attention inside
# a checkpointed block is fused there and recomputed in the backward like the rest of the block.
_CHECKPOINTS: dict[int, tuple] = {}  # key -> (body graph, kwargs of the call)


def _checkpoint_kernel(args, key):
    body, kwargs = _CHECKPOINTS[key]
    return list(tag_activation_checkpoint(body, *args, **kwargs))


def _checkpoint_fake(args, key):
    body, _ = _CHECKPOINTS[key]
    return list(fx.Interpreter(body).run(*args))


_opaque_checkpoint = define("opaque_checkpoint", "(Tensor[] args, int key) -> Tensor[]", _checkpoint_kernel,
                            _checkpoint_fake)


def _tensor_args(node: fx.Node, start: int) -> bool:
    return all(isinstance(a, fx.Node) and isinstance(a.meta.get("example_value", a.meta.get("val")), torch.Tensor)
               for a in node.args[start:])


def is_checkpoint(node: fx.Node) -> bool:
    """A tag_activation_checkpoint call whose body is a graph module attribute and whose inputs are tensors."""
    return node.op == "call_function" and node.target is tag_activation_checkpoint and bool(node.args) \
        and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr" and _tensor_args(node, 1)


def kept_whole(node: fx.Node) -> bool:
    """A custom autograd.Function call of a Dynamo graph whose inputs are all tensors, or a checkpointed
    region: the calls the re-trace keeps whole (normalize.to_aten refuses graphs with any other higher-order op)."""
    return (node.op == "call_function" and node.target is autograd_function_apply and _tensor_args(node, 2)) \
        or is_checkpoint(node)


class Tracer(fx.Interpreter):
    """Runs a Dynamo graph for make_fx, calling the opaque op where the graph applies a custom Function.

    An autocast region of the graph (`_enter_autocast` ... `_exit_autocast`) is entered for real while it is
    traced, as `with torch.autocast(...)` does under torch.export: the pre-dispatch graph records the region
    all the same, and the fake values inside it get autocast's dtypes. Called as plain functions, the two
    were only recorded, so `softmax(s, dtype=float32).to(q.dtype) @ v` met an fp32 v beside the bf16 cast
    and the re-trace failed (no fusion for the whole graph). `close()` leaves any region a failed trace left
    open."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.open_autocast: list = []

    def run_node(self, n: fx.Node):
        if n.op == "call_function" and n.target is torch.amp.autocast_mode._enter_autocast:
            region = torch.amp.autocast_mode._UnmanagedAutocast(*self.fetch_args_kwargs_from_env(n)[0])
            region.__enter__()
            self.open_autocast.append(region)
            return region
        if n.op == "call_function" and n.target is torch.amp.autocast_mode._exit_autocast:
            region = self.fetch_args_kwargs_from_env(n)[0][0]
            if isinstance(region, torch.amp.autocast_mode.autocast) and region in self.open_autocast:
                self.open_autocast.remove(region)
                region.__exit__(None, None, None)
                return None
        if not kept_whole(n):
            return super().run_node(n)
        if is_checkpoint(n):
            _, *tensors = self.fetch_args_kwargs_from_env(n)[0]
            key = next(_KEYS)
            _CHECKPOINTS[key] = (getattr(self.module, n.args[0].target), dict(n.kwargs))
            _WHERE[key] = n.meta.get("stack_trace")
            return tuple(_opaque_checkpoint(tensors, key))
        fwd, bwd, *tensors = self.fetch_args_kwargs_from_env(n)[0]
        key = next(_KEYS)
        _FUNCTIONS[key] = (fwd, bwd, dict(n.kwargs))
        _WHERE[key] = n.meta.get("stack_trace")
        return tuple(_opaque(tensors, key))

    def close(self) -> None:
        while self.open_autocast:
            self.open_autocast.pop().__exit__(None, None, None)


def restore(gm: fx.GraphModule) -> int:
    """Put every recorded custom Function and checkpointed region back as Dynamo's higher-order call; returns
    how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is _opaque_checkpoint:
            tensors, key = node.args
            body, kwargs = _CHECKPOINTS[key]
            name = f"_flashfuse_checkpoint_{key}_body"
            gm.add_submodule(name, body)
            with gm.graph.inserting_before(node):
                call = gm.graph.call_function(tag_activation_checkpoint, (gm.graph.get_attr(name), *tensors), kwargs)
        elif node.op == "call_function" and node.target is _opaque:
            tensors, key = node.args
            fwd, bwd, kwargs = _FUNCTIONS[key]
            names = []
            for part, module in (("fwd", fwd), ("bwd", bwd)):
                name = f"_flashfuse_function_{key}_{part}"
                gm.add_submodule(name, module)
                names.append(name)
            with gm.graph.inserting_before(node):
                f, b = (gm.graph.get_attr(n) for n in names)
                call = gm.graph.call_function(autograd_function_apply, (f, b, *tensors), kwargs)
        else:
            continue
        call.meta.update(node.meta)
        if _WHERE.get(key) and not call.meta.get("stack_trace"):
            call.meta["stack_trace"] = _WHERE[key]
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.recompile()
    return count


# what a Function's forward computes, by the names of its calls -> the fusion that would have taken it
# (a GELU Function is the bias_gelu pass's own case: it proves and fuses it, or says why not)
_HIDDEN = {"softmax": "attention",
           "_softmax": "attention", "scaled_dot_product_attention": "attention", "layer_norm": "layer_norm",
           "rsqrt": "rms_norm"}


def report_hidden(gm: fx.GraphModule, graph_report, enabled: list[str]) -> int:
    """A near-miss for each custom Function whose forward holds what a fusion looks for (a softmax, a
    norm): it stays whole, because its backward is the user's own code and flashfuse would have
    to prove that it is the forward's gradient before replacing both."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not autograd_function_apply \
                or not isinstance(node.args[0], fx.Node) or node.args[0].op != "get_attr":
            continue
        fwd = getattr(gm, node.args[0].target, None)
        if not isinstance(fwd, fx.GraphModule):
            continue
        found: dict[str, str] = {}
        for n in fwd.graph.nodes:
            name = getattr(n.target, "__name__", str(n.target)) if n.op == "call_function" else str(n.target)
            fusion = _HIDDEN.get(name.split(".")[-1])
            if fusion in enabled and fusion not in found:
                found[fusion] = name
        called = re.findall(r"(\w+)\.apply\(", node.meta.get("stack_trace") or "")
        who = f"the custom autograd.Function `{called[-1]}`" if called else "a custom autograd.Function"
        for fusion, op in found.items():
            graph_report.add_near_miss(fusion, node, f"`{op}` is inside {who}: kept whole, because its backward "
                                                     "is the user's own code (flashfuse does not replace a "
                                                     "hand-written backward)")
            count += 1
    return count
