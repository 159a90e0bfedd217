"""normalize -> rewrite passes -> lower. The one direction data flows through flashfuse."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.fx as fx

from flashfuse.config import Config
from flashfuse.log import logger
from flashfuse.passes import PassContext, get_pass
from flashfuse.report import current_report


def _graph_is_cuda(example_inputs: list) -> bool:
    return any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)


def _uses_cuda_graphs(config: Config, mode: str | None) -> bool:
    """Whether Inductor will capture the lowered graph in CUDA graphs (mode="reduce-overhead", or its
    config set by hand): ops must then behave the same in every call, capture and replays included."""
    if config.remainder != "inductor":
        return False
    if mode and mode != "default" and torch._inductor.list_mode_options(mode).get("triton.cudagraphs"):
        return True
    return bool(torch._inductor.config.triton.cudagraphs)


def compile_graph(gm: fx.GraphModule, example_inputs: list, config: Config,
                  mode: str | None = None) -> Callable:
    report = current_report()
    graph_report = report.new_graph()
    graph_report.code_before = gm.code
    graph_report.graph_before = gm

    cuda_graphs = _uses_cuda_graphs(config, mode)
    rewritten = rewrite(gm, example_inputs, config, graph_report, cuda_graphs)

    # With nothing rewritten, lower the graph exactly as Dynamo gave it.
    final = rewritten if rewritten is not None else gm
    graph_report.code_after = final.code
    graph_report.graph_after = final
    for m in graph_report.matches:
        logger.info("fused %s", m)
    for nm in graph_report.near_misses:
        logger.info("near-miss %s", nm)
    return lower(final, example_inputs, config, mode)


def rewrite(gm: fx.GraphModule, example_inputs: list, config: Config, graph_report, cuda_graphs: bool):
    """The passes on one Dynamo graph: the rewritten ATen graph, or None when nothing was fused there (the
    bodies of its checkpointed regions may still have been rewritten in place, see below). A failure
    leaves the graph as Dynamo gave it, with the reason in the report."""
    rewrite_checkpoint_bodies(gm, example_inputs, config, graph_report, cuda_graphs)
    kept = len(graph_report.matches)  # the bodies' fusions stand whatever happens to this graph
    try:
        from flashfuse.passes.normalize import to_aten

        aten_gm = to_aten(gm, example_inputs)
        if logger.isEnabledFor(10):
            logger.debug("graph %d after normalize:\n%s", graph_report.index, aten_gm.code)
        ctx = PassContext(config, graph_report, example_inputs, _graph_is_cuda(example_inputs), cuda_graphs)
        from flashfuse.passes import grad_mode, opaque_functions

        boundaries = grad_mode.insert(aten_gm)
        if boundaries:
            graph_report.notes.append(grad_mode.describe(boundaries))
        opaque_functions.report_hidden(aten_gm, graph_report, config.enabled_passes())
        total = 0
        for name in config.enabled_passes():
            n = get_pass(name)(aten_gm, ctx)
            total += n
            if n:
                aten_gm.recompile()  # passes edit the graph; the next pass and the logs read the code
            if n and logger.isEnabledFor(10):
                logger.debug("graph %d after pass %s (%d rewrites):\n%s", graph_report.index, name, n,
                             aten_gm.code)
        if total:
            grad_mode.remove(aten_gm)
            aten_gm.graph.eliminate_dead_code()
            aten_gm.graph.lint()
            aten_gm.recompile()
            _build_ahead(aten_gm, example_inputs, timing=not cuda_graphs)
            return aten_gm
    except Exception as exc:  # never let a pass failure change the user's program: compile it as is
        graph_report.notes.append(f"passes skipped for this graph: {type(exc).__name__}: {exc}")
        logger.warning("flashfuse: passes skipped for graph %d: %s: %s",
                       graph_report.index, type(exc).__name__, exc)
        del graph_report.matches[kept:]
    return None


def _build_ahead(gm: fx.GraphModule, example_inputs: list, timing: bool = True) -> None:
    """Queue the Triton builds of the graph's fused attention and norm calls, which then overlap Inductor's
    compile of the rest (passes/build_ahead.py); `timing` off: no autotuner timed ahead (graphs captured in CUDA
    graphs: no kernel of ours runs beside a capture). A speed-up only: nothing it does can fail the compile."""
    try:
        from flashfuse.passes import build_ahead

        build_ahead.start(gm, example_inputs, timing)
    except Exception as exc:  # noqa: BLE001
        logger.info("builds ahead skipped for this graph: %s: %s", type(exc).__name__, exc)


def rewrite_checkpoint_bodies(gm: fx.GraphModule, example_inputs: list, config: Config, graph_report,
                              cuda_graphs: bool) -> int:
    """Each checkpointed region's body (`checkpoint(f, ..., use_reentrant=False)`: Dynamo's
    tag_activation_checkpoint) is a graph of its own: rewrite it like any graph, on the fake values of the
    region's inputs, and put the result in its place. The region stays a checkpoint: its forward, fused ops
    included, is recomputed in the backward. Returns how many bodies were rewritten."""
    from flashfuse.passes.opaque_functions import is_checkpoint

    count = 0
    for node in list(gm.graph.nodes):
        if not is_checkpoint(node):
            continue
        body = getattr(gm, node.args[0].target, None)
        if not isinstance(body, fx.GraphModule):
            continue
        new = rewrite(body, _region_inputs(gm, node, example_inputs), config, graph_report, cuda_graphs)
        if new is not None:
            new.meta.update(body.meta)  # a selective-checkpoint policy (context_fn) rides on the body's meta
            setattr(gm, node.args[0].target, new)
            count += 1
    return count


def _region_inputs(gm: fx.GraphModule, node: fx.Node, example_inputs: list) -> list:
    """Example inputs of a checkpointed region: the graph's own example input where the region reads a graph
    input (a buffer's values stay visible), else a fake tensor like Dynamo's value, in the fake mode of this
    compile (Dynamo traced with another one: tensors of the two must not meet)."""
    from torch._guards import detect_fake_mode

    given = {n: x for n, x in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs)}
    mode = detect_fake_mode(example_inputs)
    out = []
    for a in node.args[1:]:
        if a in given:
            out.append(given[a])
            continue
        v = a.meta.get("example_value", a.meta.get("val"))
        with mode if mode is not None else contextlib.nullcontext():
            t = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
        out.append(t.requires_grad_(v.requires_grad))
    return out


def lower(gm: fx.GraphModule, example_inputs: list, config: Config, mode: str | None) -> Callable:
    if config.remainder == "eager":
        # Pure mode: run the (rewritten) graph op by op; autograd goes through the ops' formulas.
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    patches = {}
    if mode and mode != "default":
        patches = dict(torch._inductor.list_mode_options(mode))
    if torch._inductor.config.post_grad_custom_post_pass is None:
        patches["post_grad_custom_post_pass"] = _ops_version_pass()
    return compile_fx(gm, example_inputs, config_patches=patches)


_OPS_VERSION = None


def _ops_version_pass():
    """Inductor's FX graph cache keys on the graph, not on the fake impls of the custom ops in it: after
    an upgrade that changes an op's output strides, a cached graph would assert the old ones. A no-op
    post-grad pass whose uuid hashes flashfuse's op sources puts that version into the cache key."""
    global _OPS_VERSION
    if _OPS_VERSION is None:
        import hashlib
        from pathlib import Path

        from torch._inductor.custom_graph_pass import CustomGraphPass

        import flashfuse.kernels

        digest = hashlib.sha256()
        for path in sorted(Path(flashfuse.kernels.__file__).parent.rglob("*.py")):
            digest.update(path.read_bytes())

        class FlashfuseOpsVersion(CustomGraphPass):
            def __call__(self, graph):  # changes nothing
                return None

            def uuid(self):
                return "flashfuse-ops-" + digest.hexdigest()[:16]

        _OPS_VERSION = FlashfuseOpsVersion()
    return _OPS_VERSION
