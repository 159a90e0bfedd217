"""flashfuse.explain: what flashfuse would do to a model, without compiling anything heavy.

How it works (see docs/decisions.md, "explain"):
- Dynamo captures the program exactly as `torch.compile(model, backend="flashfuse")` would, and every
  captured graph goes through flashfuse's own pipeline with the user's Config (the same normalization,
  the same passes, the same remainder setting, so the same decisions) on the real example inputs:
  a pass may look at constant values (a `tril` mask buffer), which fake tensors would hide.
- Lowering is skipped: each captured graph runs as Dynamo captured it, op by op (no Inductor, no
  flashfuse kernels), so the run costs one eager forward. `fake=True` runs a fake copy of the model on
  fake inputs instead: nothing computed, no memory used.
- Afterwards the Dynamo cache entries made for explain are removed, automatic-dynamic shape history is
  restored, and the model's buffers and the RNG state are put back, so a later `torch.compile` of the
  same model behaves as if explain had never run.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.fx as fx

from flashfuse.config import Config
from flashfuse.log import logger
from flashfuse.report import GraphBreak, Report, _active

_lowering_lock = threading.Lock()


def explain(model_or_fn: Any, *args: Any, options: Mapping[str, Any] | None = None, fake: bool = False,
            **kwargs: Any) -> Report:
    """Capture `model_or_fn(*args, **kwargs)` with Dynamo, run flashfuse's passes on every captured graph
    and return the Report: fusions with the user's source line and the specialization in words,
    near-misses with their reason, graph breaks, and each graph's code before and after the passes.

    `options` are flashfuse's backend options (`remainder`, `passes`, `disable`, ...), as for
    `torch.compile(model, backend="flashfuse", options=...)`. A model already wrapped by torch.compile
    is explained as the original module.

    By default the captured graphs run once, op by op, on the real inputs (one eager forward). With
    `fake=True` a fake copy of the model runs on fake inputs: nothing is computed and no memory is
    used, for models too big to run here. A pass that looks at constant values (a mask buffer) sees
    none then; where the fake run fails (Python code that reads tensor values between graphs),
    explain warns and runs on the real inputs."""
    config = Config.from_options(options)
    target = uncompiled(model_or_fn)
    if fake:
        try:
            return _explain_once(config, target, args, kwargs, fake=True)
        except Exception as exc:
            logger.warning("explain(fake=True) failed (%s: %s); explaining on the real inputs",
                           type(exc).__name__, exc)
    return _explain_once(config, target, args, kwargs, fake=False)


def _explain_once(config: Config, target: Any, args: tuple, kwargs: dict, fake: bool) -> Report:
    report = Report()
    report.config = dataclasses.asdict(config)
    backend = _ExplainBackend(config, report, fake=fake)
    breaks_seen = _graph_break_log()
    first_break = len(breaks_seen) if breaks_seen is not None else 0
    # On fake inputs nothing can change the caller's tensors, and saving them would cost memory.
    with _leave_no_trace(backend, target, inputs=None if fake else (args, kwargs)):
        run_in: Any = contextlib.nullcontext()
        if fake:
            run_in, (target, args, kwargs) = _fake_copies(target, args, kwargs)
        compiled = torch.compile(target, backend=backend)
        _active.append(report)
        try:
            with run_in:
                compiled(*args, **kwargs)
        finally:
            _active.remove(report)
    if breaks_seen is not None:
        # Every break, also those with no graph before them (Dynamo compiles nothing there, so
        # the backend never sees them), in the order Dynamo met them.
        report.graph_breaks = [_graph_break(reason, backend.graph_of_break.get(id(reason)))
                               for reason in breaks_seen[first_break:]]
    if logger.isEnabledFor(10):  # the pipeline already logs each fusion at info
        logger.debug("explain:\n%s", report.format())
    return report


def uncompiled(model_or_fn: Any) -> Any:
    """The module or function under a torch.compile wrapper (itself if not wrapped)."""
    if isinstance(model_or_fn, torch._dynamo.eval_frame.OptimizedModule):
        return model_or_fn._orig_mod
    inner = getattr(model_or_fn, "_torchdynamo_orig_callable", None)
    return inner if inner is not None else model_or_fn


class _ExplainBackend:
    """A Dynamo backend that runs flashfuse's pipeline for its report and then returns the captured
    graph to run as is. Compared by identity, so Dynamo never mixes its cache entries with the user's."""

    __name__ = "flashfuse_explain"

    def __init__(self, config: Config, report: Report, fake: bool = False) -> None:
        self.config = config
        self.report = report
        self.fake = fake
        self.graph_of_break: dict[int, int] = {}  # id(GraphCompileReason) -> the graph it ended

    def __call__(self, gm: fx.GraphModule, example_inputs: list, **_: Any) -> Callable:
        import flashfuse.kernels  # noqa: F401  (registers the flashfuse:: ops the passes emit)
        from flashfuse import pipeline

        with contextlib.ExitStack() as stack:
            if self.fake:
                example_inputs = _in_tracing_fake_mode(example_inputs)
                # the passes trace in Dynamo's fake mode, not under the user-level one explain runs in
                from torch._subclasses.fake_tensor import unset_fake_temporarily

                stack.enter_context(unset_fake_temporarily())
            with _lowering_skipped(pipeline):
                pipeline.compile_graph(gm, example_inputs, self.config)
            graph_report = self.report.graphs[-1]
            if graph_report.matches:
                _record_normalized_graph(graph_report, gm, example_inputs)
        reason = getattr(gm, "compile_subgraph_reason", None)
        if reason is not None and getattr(reason, "graph_break", False):
            self.graph_of_break[id(reason)] = graph_report.index
            self.report.graph_breaks.append(_graph_break(reason, graph_report.index))
        return gm.forward


def _fake_copies(target: Any, args: tuple, kwargs: dict) -> tuple[Any, tuple[Any, tuple, dict]]:
    """A fake tensor mode, and in it a copy of the model (parameters and buffers fake) and the inputs."""
    from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode
    from torch.utils._pytree import tree_map_only

    mode = FakeTensorMode(allow_non_fake_inputs=True)  # tensors a function closes over stay real
    if isinstance(target, torch.nn.Module):
        with FakeCopyMode(mode):
            target = copy.deepcopy(target)
    args, kwargs = tree_map_only(torch.Tensor, mode.from_tensor, (args, kwargs))
    return mode, (target, args, kwargs)


def _in_tracing_fake_mode(example_inputs: list) -> list:
    """Dynamo hands the backend fake inputs of explain's own fake mode; the passes' tracing must use
    Dynamo's (mixing two fake modes is an error)."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    mode = detect_fake_mode()
    if mode is None:
        return example_inputs
    with unset_fake_temporarily():
        return [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]


@contextlib.contextmanager
def _lowering_skipped(pipeline: Any) -> Iterator[None]:
    """Make compile_graph stop after the passes: explain runs the captured graph itself. Dynamo compiles
    one frame at a time, so the lock only guards against another thread's explain."""
    def no_lowering(gm: fx.GraphModule, example_inputs: list, config: Config, mode: Any) -> Callable:
        return gm.forward

    with _lowering_lock:
        real_lower = pipeline.lower
        pipeline.lower = no_lowering
        try:
            yield
        finally:
            pipeline.lower = real_lower


def _record_normalized_graph(graph_report: Any, gm: fx.GraphModule, example_inputs: list) -> None:
    """The ATen graph the passes started from (the same tracing as in the pipeline), for Report.draw."""
    try:
        from flashfuse.passes.normalize import to_aten

        graph_report.graph_normalized = to_aten(gm, example_inputs)
    except Exception as exc:  # only the picture loses precision; the report is complete without it
        logger.debug("explain: could not re-normalize graph %d for drawing: %s", graph_report.index, exc)


def _graph_break_log() -> list | None:
    """Dynamo's list of every graph-break reason of this process (None if this torch has none)."""
    try:
        from torch._dynamo.output_graph import graph_break_reasons
    except ImportError:
        return None
    return graph_break_reasons if isinstance(graph_break_reasons, list) else None


def _graph_break(reason: Any, graph_index: int | None) -> GraphBreak:
    stack = list(getattr(reason, "user_stack", None) or [])
    frame = stack[-1] if stack else None
    source = f"{frame.filename}:{frame.lineno}" if frame is not None else ""
    code = (frame.line or "").strip() if frame is not None else ""
    return GraphBreak(str(reason.reason), source, code, graph_index)


# ---- leaving no trace in Dynamo, the model and the RNG ----

@contextlib.contextmanager
def _leave_no_trace(backend: Any, target: Any, inputs: Any = None) -> Iterator[None]:
    """Around a compile-and-run for inspection: afterwards remove `backend`'s compiled code, restore
    Dynamo's shape history, the RNG, and the values of the model's buffers and of the `inputs`
    tensors (a forward may update BatchNorm statistics or write into an input)."""
    pgo_state = _save_pgo_state()
    buffers = _save_tensors(target, inputs)
    codes_before = _codes_with_entries()
    cuda_devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        try:
            forget_compiled_code(backend, codes_before)
        except Exception as exc:  # Dynamo internals differ across torch versions: say so, do not fail
            logger.warning("flashfuse: could not remove the code Dynamo compiled for this check (%s: %s); "
                           "torch._dynamo.reset() clears it", type(exc).__name__, exc)
        _restore_pgo_state(pgo_state)
        _restore_tensors(buffers)


def _seen_codes() -> list:
    from torch._dynamo import convert_frame

    seen = {}
    for ref in list(convert_frame.input_codes.seen) + list(convert_frame.output_codes.seen):
        code = ref()
        if code is not None:
            seen[id(code)] = code
    return list(seen.values())


def _codes_with_entries() -> set[int] | None:
    """ids of the code objects that hold compiled code now (None if this torch cannot tell)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return {id(code) for code in _seen_codes() if _debug_get_cache_entry_list(code)}
    except Exception:
        return None


def forget_compiled_code(backend: Any, codes_before: set[int] | None = None) -> int:
    """Remove the Dynamo cache entries compiled with `backend` (compared by identity). Returns how many.

    A code object whose entries are all `backend`'s is reset; one that also holds entries of another
    backend (the user compiled the model before) keeps those, and ours are invalidated (they then never
    match, but stay in the list until Dynamo frees the code). On a torch whose cache entries do not
    record their backend, only code objects that held nothing before (`codes_before`) are reset."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    removed = 0
    for code in _seen_codes():
        entries = _debug_get_cache_entry_list(code)
        if not entries:
            continue
        if not all(hasattr(e, "backend") for e in entries):
            if codes_before is not None and id(code) not in codes_before:
                torch._C._dynamo.eval_frame.reset_code(code)
                removed += len(entries)
            continue
        ours = [e for e in entries if _entry_backend(e) is backend]
        if not ours:
            continue
        removed += len(ours)
        if len(ours) == len(entries):
            torch._C._dynamo.eval_frame.reset_code(code)
        else:
            from torch._dynamo.guards import DeletedGuardManagerWrapper

            for entry in ours:
                entry.guard_manager.extra_state.invalidate(
                    entry, DeletedGuardManagerWrapper("flashfuse.explain entry removed"))
    return removed


def _entry_backend(entry: Any) -> Any:
    backend = getattr(entry, "backend", None)
    # torch.compile wraps the backend in a _TorchCompileWrapper that keeps it as `compiler_fn`
    return getattr(backend, "compiler_fn", backend)


def _save_pgo_state() -> Any:
    """Dynamo's automatic-dynamic memory (which sizes changed between calls), per code object."""
    try:
        from torch._dynamo import pgo

        return copy.deepcopy((pgo._CODE_STATE, pgo._INIT_CODE_STATE))
    except Exception:  # an older/newer torch without this state: nothing to restore
        return None


def _restore_pgo_state(state: Any) -> None:
    if state is None:
        return
    from torch._dynamo import pgo

    pgo._CODE_STATE, pgo._INIT_CODE_STATE = state


def _save_tensors(target: Any, inputs: Any) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(tensor, version, copy) of the model's buffers and the input tensors, to put back afterwards."""
    tensors: dict[int, torch.Tensor] = {}
    if isinstance(target, torch.nn.Module):
        tensors.update((id(b), b) for b in target.buffers())
    if inputs is not None:
        from torch.utils._pytree import tree_leaves

        tensors.update((id(t), t) for t in tree_leaves(inputs) if isinstance(t, torch.Tensor))
    return [(t, t._version, t.detach().clone()) for t in tensors.values()
            if type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter)]


def _restore_tensors(saved: list[tuple[torch.Tensor, int, torch.Tensor]]) -> None:
    # Only what changed is written back: a write bumps the version counter, and autograd refuses a
    # backward through a tensor saved for it whose version moved. The values are compared too, because
    # some kernels update a buffer without bumping its version (batch_norm's running statistics).
    with torch.no_grad():
        for tensor, version, value in saved:
            if tensor.shape != value.shape:
                continue
            if tensor._version != version or not _same_values(tensor, value):
                tensor.copy_(value)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if torch.equal(a, b):
        return True
    return bool(((a == b) | (a.isnan() & b.isnan())).all()) if a.is_floating_point() else False
