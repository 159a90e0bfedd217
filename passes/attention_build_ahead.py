"""After the passes: queue the Triton builds of each fused attention call while Inductor compiles the rest.

Not a rewrite. A training step's first attention call used to build and autotune the forward's kernel on the
warm-up's critical path (3.8-4.3 s, GPT-2 8 x 1024 on the H100 host, docs/perf-notes.md "Session 20"), and its
first backward the backward's. The graph already says what those calls will be: the shapes, strides and dtypes
of q, k, v (their example values), and the mask sides' values when they are graph inputs (a tril buffer, which
mask recognition reads as causal). So once the passes are done, each `flashfuse::attention` call whose
arguments are all known gets stand-in tensors laid out like them, and op.build_ahead queues the builds of its
forward (and, in a training graph, of its backward) on a background thread.

A stand-in only decides what is compiled, never what is computed: the call itself recognizes its masks and
picks its kernels as before, and a wrong prediction costs background work only. Calls are skipped (and the log
says why) when a shape is symbolic, or a side is computed in the graph (its values, hence the mask it
recognizes as, are not known before the call)."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from flashfuse.log import logger

aten = torch.ops.aten

# the ops the attention pass puts between its inputs' example values and the attention call (views, the
# autocast cast, GQA's expand), run on the stand-ins when a node it inserted has no example value
_REPLAYABLE = {aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten.expand.default,
               aten.transpose.int, aten.permute.default, aten.slice.Tensor, aten.select.int, aten.to.dtype,
               aten._to_copy.default, aten.clone.default, operator.getitem}


def start(gm: fx.GraphModule, example_inputs) -> int:
    """Queue the builds of every attention call of the rewritten graph `gm` whose arguments are known. Returns
    how many calls queued builds (0 on CPU without Triton's interpreter; calls of one specialization queue once)."""
    from flashfuse.kernels.attention import op as attention_op

    queued = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.flashfuse.attention.default:
            continue
        standins, why = _standin_args(gm, node, example_inputs)
        if standins is None:
            logger.info("attention builds ahead: not for %s: %s", node.name, why)
            continue
        if attention_op.build_ahead(*standins, backward=bool(node.meta.get("flashfuse_backward"))):
            queued += 1
    return queued


def _standin_args(gm: fx.GraphModule, node: fx.Node, example_inputs):
    """(the call's arguments with stand-in tensors, None) or (None, why not)."""
    from flashfuse.passes.attention import _concrete_side

    q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, *rest = node.args
    memo: dict = {}
    tensors = [_standin(n, memo) for n in (q, k, v)]
    if any(t is None for t in tensors):
        return None, "q, k or v has a symbolic shape or no example value"
    side_values = []
    for s in sides:
        t = _concrete_side(gm, s, example_inputs)
        if t is None:
            return None, f"side {s.name} is computed in the graph (its mask is recognized at the call)"
        side_values.append(t)
    rng_t = None
    if rng is not None:
        rng_t = torch.empty(2, dtype=torch.int64, device=tensors[0].device)
    return (*tensors, side_values, list(scalars), score_mod, dropout_p, rng_t, precision, *rest), None


def _static(t) -> bool:
    return isinstance(t, torch.Tensor) and all(isinstance(x, int) for x in (*t.shape, *t.stride(),
                                                                            t.storage_offset()))


def _standin(node, memo: dict, depth: int = 0):
    """An uninitialised tensor laid out like `node`'s value (shape, strides, storage offset, dtype, device), or
    None when that layout is not known."""
    if not isinstance(node, fx.Node):
        return None
    if node in memo:
        return memo[node]
    val = node.meta.get("val")
    out = None
    if _static(val):
        size = val.storage_offset() + 1 + sum((n - 1) * st for n, st in zip(val.shape, val.stride())) \
            if val.numel() else val.storage_offset()
        base = _storage(val, max(size, 1) * val.element_size(), memo)
        out = base.view(val.dtype).as_strided(tuple(val.shape), tuple(val.stride()), val.storage_offset())
    elif val is None and node.op == "call_function" and node.target in _REPLAYABLE and depth < 8:
        args = [_standin(a, memo, depth + 1) if isinstance(a, fx.Node) else a for a in node.args]
        if all(a is not None for a, n in zip(args, node.args) if isinstance(n, fx.Node)):
            out = node.target(*args, **node.kwargs)
            out = out if isinstance(out, torch.Tensor) else None
    memo[node] = out
    return out


def _storage(val, nbytes: int, memo: dict):
    """Uninitialised bytes for a stand-in of `val`, shared by the stand-ins of views of one storage (q, k and v
    split off one projection: one projection's memory, not three), at least `nbytes` long."""
    from torch.multiprocessing.reductions import StorageWeakRef

    try:
        storage = val.untyped_storage()
        key, total = ("storage", StorageWeakRef(storage)), storage.nbytes()
    except Exception:  # noqa: BLE001 (no storage to share: a base of its own)
        key, total = None, nbytes
    if not isinstance(total, int) or total < nbytes:
        key, total = None, nbytes
    base = memo.get(key) if key is not None else None
    if base is None:
        base = torch.empty(total, dtype=torch.uint8, device=val.device)
        if key is not None:
            memo[key] = base
    return base

