"""normalize -> rewrite passes -> lower. The one direction data flows through flashfuse."""
from __future__ import annotations

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

    rewritten = None
    try:
        from flashfuse.passes.normalize import to_aten

        aten_gm = to_aten(gm, example_inputs)
        if logger.isEnabledFor(10):
            logger.debug("graph %d after normalize:\n%s", graph_report.index, aten_gm.code)
        ctx = PassContext(config, graph_report, example_inputs, _graph_is_cuda(example_inputs),
                          _uses_cuda_graphs(config, mode))
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
            rewritten = aten_gm
    except Exception as exc:  # never let a pass failure change the user's program: compile it as is
        graph_report.notes.append(f"passes skipped for this graph: {type(exc).__name__}: {exc}")
        logger.warning("flashfuse: passes skipped for graph %d: %s: %s",
                       graph_report.index, type(exc).__name__, exc)
        graph_report.matches.clear()

    # With nothing rewritten, lower the graph exactly as Dynamo gave it.
    final = rewritten if rewritten is not None else gm
    graph_report.code_after = final.code
    graph_report.graph_after = final
    for m in graph_report.matches:
        logger.info("fused %s", m)
    for nm in graph_report.near_misses:
        logger.info("near-miss %s", nm)
    return lower(final, example_inputs, config, mode)


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
