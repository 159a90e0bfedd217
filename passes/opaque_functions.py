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


def kept_whole(node: fx.Node) -> bool:
    """A custom autograd.Function call of a Dynamo graph whose inputs are all tensors: the calls the
    re-trace keeps whole (normalize.to_aten refuses graphs with any other higher-order op)."""
    return node.op == "call_function" and node.target is autograd_function_apply and all(
        isinstance(a, fx.Node) and isinstance(a.meta.get("example_value", a.meta.get("val")), torch.Tensor)
        for a in node.args[2:])


class Tracer(fx.Interpreter):
    """Runs a Dynamo graph for make_fx, calling the opaque op where the graph applies a custom Function."""

    def run_node(self, n: fx.Node):
        if not kept_whole(n):
            return super().run_node(n)
        fwd, bwd, *tensors = self.fetch_args_kwargs_from_env(n)[0]
        key = next(_KEYS)
        _FUNCTIONS[key] = (fwd, bwd, dict(n.kwargs))
        _WHERE[key] = n.meta.get("stack_trace")
        return tuple(_opaque(tensors, key))


def restore(gm: fx.GraphModule) -> int:
    """Put every recorded custom Function back as Dynamo's higher-order call; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _opaque:
            continue
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
