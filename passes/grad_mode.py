"""Grad-mode boundaries: no fusion may pull ops across a `torch.no_grad()` / `enable_grad()` switch.

The pre-dispatch ATen graph keeps `with torch.no_grad():` as `torch._C._set_grad_enabled(False)` ...
`_set_grad_enabled(True)` nodes, and each op runs in the grad mode of its position. A fused op sits at one
position: had it absorbed the `mean` computed under no_grad together with the `x - mu` after it, its
gradient would flow through the statistics, where eager's does not (a DetachNorm would train as a
LayerNorm). Rather than teach every pass about grad mode, `insert` puts an opaque identity node on every
edge whose producer and consumer run in different grad modes: a pattern only matches through the ops it
knows, so no match can contain such an edge, and every pass's matches lie inside one grad mode (a match is
connected to its root through its own edges). `remove` takes the boundaries out after the passes and checks
that every op still runs in the grad mode it had; if one does not, the graph is refused (the pipeline then
compiles it as Dynamo gave it).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from flashfuse.passes.normalize import val

_MODE = "flashfuse_grad_enabled"  # node.meta key: the grad mode the op ran in before the passes


def grad_mode_boundary(x: torch.Tensor) -> torch.Tensor:
    """The value of `x`, as a node no pass recognises (removed again before lowering)."""
    return x


def _switch(node: fx.Node) -> bool | None:
    """The grad mode a `_set_grad_enabled(mode)` node sets, None for any other node."""
    if node.op == "call_function" and node.target is torch._C._set_grad_enabled and node.args:
        return bool(node.args[0])
    return None


def modes(gm: fx.GraphModule, enabled: bool) -> dict[fx.Node, bool]:
    """The grad mode each node runs in, starting from `enabled` (the mode the compiled call runs in,
    which Dynamo guards on)."""
    out = {}
    for node in gm.graph.nodes:
        switched = _switch(node)
        if switched is not None:
            enabled = switched
        out[node] = enabled
    return out


def is_boundary(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is grad_mode_boundary


def insert(gm: fx.GraphModule) -> list[tuple[fx.Node, bool]]:
    """Put a boundary on every edge that crosses a grad-mode switch. Returns (boundary, consumer's mode)
    pairs; none when the graph has no switch. Graph inputs and parameters are not ops and belong to no
    mode: their uses need no boundary."""
    if not any(_switch(n) is not None for n in gm.graph.nodes):
        return []
    mode = modes(gm, torch.is_grad_enabled())
    for node, enabled in mode.items():
        node.meta[_MODE] = enabled
    added: list[tuple[fx.Node, bool]] = []
    for producer in list(gm.graph.nodes):
        if producer.op != "call_function" or _switch(producer) is not None or val(producer) is None:
            continue
        # one boundary per consumer mode, shared by all consumers in that mode
        crossing = [u for u in producer.users if u.op != "output" and mode[u] != mode[producer]]
        if not crossing:
            continue
        with gm.graph.inserting_after(producer):
            boundary = gm.graph.call_function(grad_mode_boundary, (producer,))
        boundary.meta.update({k: v for k, v in producer.meta.items() if k in ("val", "stack_trace", "tensor_meta")})
        boundary.meta[_MODE] = not mode[producer]
        for user in crossing:
            user.replace_input_with(producer, boundary)
        added.append((boundary, not mode[producer]))
    gm.recompile()
    return added


def describe(added: list[tuple[fx.Node, bool]]) -> str:
    """The report's note for the boundaries `insert` put in, naming the first crossing value."""
    from flashfuse.report import at_source

    boundary, consumer_mode = added[0]
    producer = boundary.args[0]
    consumer = next(iter(boundary.users), None)
    before, after = ("disabled", "enabled") if consumer_mode else ("enabled", "disabled")
    first = (f"`{producer.name}`{at_source(producer)} is computed with grad {before} and used with grad {after}"
             + (f" by `{consumer.name}`{at_source(consumer)}" if consumer is not None else ""))
    return (f"{len(added)} value(s) cross a torch.no_grad() / enable_grad() switch, e.g. {first}: no fusion "
            "includes ops from both sides")


class GradModeMoved(Exception):
    """A pass moved an op across a grad-mode switch: the rewritten graph is not the user's program."""


def remove(gm: fx.GraphModule) -> None:
    """Replace every boundary by its input, then check that each op of the original graph still runs in
    the grad mode it ran in, and each op a pass inserted (a fused kernel) in the mode of what it reads: the
    mode of an original op it consumes, or the consumer side of a boundary it consumes."""
    reads: dict[fx.Node, set[bool]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and _MODE not in node.meta:
            reads[node] = {a.meta[_MODE] for a in node.all_input_nodes
                           if a.op == "call_function" and _MODE in a.meta}
    for node in list(gm.graph.nodes):
        if is_boundary(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for node, enabled in modes(gm, torch.is_grad_enabled()).items():
        if node.op != "call_function" or _switch(node) is not None:
            continue
        if node.meta.get(_MODE, enabled) != enabled:
            raise GradModeMoved(f"{node.name} was moved across a torch.no_grad() / enable_grad() switch")
        if reads.get(node, set()) - {enabled}:
            raise GradModeMoved(f"{node.name} (inserted by a pass) runs with grad "
                                f"{'enabled' if enabled else 'disabled'} but reads values computed in the other mode "
                                "without a boundary")
    gm.recompile()
