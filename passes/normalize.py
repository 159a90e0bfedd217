"""Step 1 of the pipeline: one spelling per operation, shape/dtype meta on every node.

Dynamo's graph spells one operation many ways (`q @ k`, `torch.matmul`, `q.matmul`, `nn.Softmax`,
`F.softmax`, `x /= c`, ...). Re-tracing it to ATen at the *pre-dispatch* level maps all of them to one
ATen op each while keeping the composite ops the passes look for (`aten.matmul`, `aten.softmax`,
`aten.dropout`, `aten.einsum`, `aten.layer_norm`) instead of decomposing them. Every node then carries
its fake value in `node.meta["val"]`, and the user's stack trace is kept for the report.
In-place ops on temporaries (`att /= c`, `masked_fill_`) are turned into their functional form.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import make_fx

aten = torch.ops.aten

# ops whose output aliases their input: an in-place op on such a value writes through to its base
_VIEW_OPS = {
    aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default,
    aten.slice.Tensor, aten.select.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default,
    aten.squeeze.dims, aten.expand.default, aten.t.default, aten.mT.default, aten.alias.default,
    aten.unflatten.int, aten.flatten.using_ints, aten.unbind.int, aten.split.Tensor, aten.chunk.default,
    aten.diagonal.default, aten.as_strided.default, aten.narrow.default, aten.view_as.default,
    aten.movedim.int, aten.swapaxes.default, aten.swapdims.default,
}


def to_aten(gm: fx.GraphModule, example_inputs: list) -> fx.GraphModule:
    """Re-trace a Dynamo graph to a pre-dispatch ATen graph on fake tensors."""
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fakeify(x):
        if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
            return fake_mode.from_tensor(x)
        return x

    fake_inputs = [fakeify(x) for x in example_inputs]
    with torch.fx.traceback.preserve_node_meta(), fake_mode:
        traced = make_fx(fx.Interpreter(gm).run, pre_dispatch=True)(*fake_inputs)
    functionalize_inplace(traced)
    return traced


def functional_variant(op):
    """aten.mul_.Tensor -> aten.mul.Tensor (None when there is none)."""
    name = op._schema.name.split("::")[1]
    if not name.endswith("_") or name.startswith("_"):
        return None
    packet = getattr(aten, name[:-1], None)
    if packet is None:
        return None
    return getattr(packet, op._overloadname, None)


def functionalize_inplace(gm: fx.GraphModule) -> int:
    """Rewrite `y = x.op_(...)` to `y = op(x, ...)` where that is provably the same program:
    x is a temporary (not an input, not a view of anything) that nothing reads after the write."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        functional = functional_variant(node.target)
        if functional is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        base = node.args[0]
        if base.op != "call_function" or base.target in _VIEW_OPS:
            continue
        if any(order[u] > order[node] for u in base.users if u is not node):
            continue
        node.target = functional
        changed += 1
    if changed:
        gm.recompile()
    return changed


def val(node) -> torch.Tensor | None:
    """The fake tensor a node produces (None for non-tensor values)."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None
