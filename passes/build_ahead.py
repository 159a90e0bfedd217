"""After the passes: queue the Triton builds of the fused calls while Inductor compiles the rest of the graph.

Not a rewrite. A training step's first attention call used to build and autotune the forward's kernel on the
warm-up's critical path (3.8-4.3 s, GPT-2 8 x 1024 on the H100 host, docs/perf-notes.md "Session 20"), and its
first backward the backward's; a norm's first call its forward's configurations. The graph already says what
those calls will be: the shapes, strides and dtypes of their tensors (their example values), and, for attention,
the values of the mask sides, which mask recognition reads: a graph input (a tril buffer, read as causal), or
computed from inputs by cheap, pure ops (HF's padding and causal masks, built from `attention_mask` and
`arange`s), which `_Values` evaluates on the example inputs, the first call's own arguments. So once the passes
are done, each `flashfuse::attention` call whose arguments are all known gets stand-in tensors laid out like
them, and op.build_ahead queues the builds of its forward (and, in a training graph, of its backward) on the
background builder (kernels/launch.py); each norm call (`flashfuse::layer_norm`, `rms_norm` and their `add_`
forms) queues its forward's, and in a training graph its backward's (norms/impl.build_ahead).

A stand-in only decides what is compiled, never what is computed: the call itself recognizes its masks and
picks its kernels as before, and a wrong prediction costs background work only. Attention calls are skipped (the
log says how many, and why) when a shape is symbolic, or a side's value is not known before the call (computed
from activations or anything that requires grad, by random draws, in place, or too large to compute twice).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from flashfuse.log import logger

aten = torch.ops.aten

# matrix products: a side computed by one is computed from activations, not an input's mask
_HEAVY = {aten.mm, aten.bmm, aten.addmm, aten.baddbmm, aten.matmul, aten.convolution, aten.linear}
# the ops the attention pass puts between its inputs' example values and the attention call (views, the
# autocast cast, GQA's expand), run on the stand-ins when a node it inserted has no example value
_REPLAYABLE = {aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten.expand.default,
               aten.transpose.int, aten.permute.default, aten.slice.Tensor, aten.select.int, aten.to.dtype,
               aten._to_copy.default, aten.clone.default, operator.getitem}


# the norm ops (flashfuse::<name>, flashfuse::add_<name>) -> is_rms
_NORMS = {"layer_norm": False, "rms_norm": True}


def start(gm: fx.GraphModule, example_inputs, timing: bool = True) -> int:
    """Queue the builds of every attention and norm call of the rewritten graph `gm` whose arguments are known
    (`timing` off: their autotuners are not timed ahead, launch.tune_ahead). Returns how many calls queued builds
    (none on CPU: only CUDA builds are queued; calls of one specialization queue once)."""
    return _start_attention(gm, example_inputs) + _start_norms(gm, timing)


def _norm_calls(gm: fx.GraphModule):
    """(node, is_rms, with a residual) of each norm call."""
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or \
                target.namespace != "flashfuse":
            continue
        name = target._schema.name.split("::", 1)[1]
        residual = name.startswith("add_")
        is_rms = _NORMS.get(name[4:] if residual else name)
        if is_rms is not None:
            yield node, is_rms, residual


def _start_norms(gm: fx.GraphModule, timing: bool = True) -> int:
    calls = list(_norm_calls(gm))
    if not calls or not any(_runs_triton(node.args[0], _attention_op()) for node, *_ in calls):
        return 0
    from flashfuse.kernels.norms import impl as norms  # imports triton: only for graphs that need it

    queued, memo = 0, {}
    for node, is_rms, residual in calls:
        x, *rest = node.args
        r, (weight, bias, eps, mid_dtype, out_dtype) = (rest[0], rest[1:]) if residual else (None, rest)
        tensors = [_standin(t, memo) if isinstance(t, fx.Node) else None for t in (x, r, weight, bias)]
        if tensors[0] is None or any(t is None for t, n in zip(tensors, (x, r, weight, bias)) if n is not None):
            continue  # a symbolic shape
        if norms.build_ahead(*tensors, eps, is_rms, mid_dtype, out_dtype, backward=_trains(x, r),
                             has_dh=residual and _h_used(node), tune=timing):
            queued += 1
    return queued


def _trains(*inputs) -> bool:
    """Whether a norm's input requires grad when the graph runs: a training graph, whose backward will run the
    norm's backward. (Its parameters require grad under no_grad too: they do not tell.)"""
    from flashfuse.passes.normalize import requires_grad

    return any(requires_grad(n) for n in inputs if isinstance(n, fx.Node))


def _h_used(node: fx.Node) -> bool:
    """Whether the residual form's second output (h = x + residual) is read: its gradient then reaches the
    backward (HAS_DH)."""
    return any(u.target is operator.getitem and u.args[1] == 1 and u.users for u in node.users)


def _start_attention(gm: fx.GraphModule, example_inputs) -> int:
    from flashfuse.kernels.attention import op as attention_op

    # only calls that will run the Triton kernels (CUDA, or the interpreter's CPU tensors) and recognize masks on
    # the host (not under CUDA graphs): nothing to build for the others
    calls = [n for n in gm.graph.nodes
             if n.op == "call_function" and n.target == torch.ops.flashfuse.attention.default
             and _runs_triton(n.args[0], attention_op) and (len(n.args) < 10 or n.args[9])]
    queued, skipped, values = 0, [], _Values(gm, example_inputs)
    for node in calls:
        standins, why = _standin_args(node, values)
        if standins is None:
            skipped.append(why)
            continue
        if attention_op.build_ahead(*standins, backward=bool(node.meta.get("flashfuse_backward"))):
            queued += 1
    if skipped:
        logger.info("attention builds ahead: %d of %d calls skipped (%s)", len(skipped), len(calls), skipped[0])
    return queued


def _attention_op():
    from flashfuse.kernels.attention import op

    return op


def _runs_triton(q: fx.Node, attention_op) -> bool:
    """Whether the call's q lives where the Triton kernels run; q may be a cast the pass inserted without an example
    value: its input's device then."""
    for _ in range(8):
        val = q.meta.get("val")
        if isinstance(val, torch.Tensor):
            return attention_op.use_triton(val)
        if q.op != "call_function" or not q.args or not isinstance(q.args[0], fx.Node):
            return False
        q = q.args[0]
    return False


def _standin_args(node: fx.Node, values: "_Values"):
    """(the call's arguments with stand-in tensors, None) or (None, why not)."""
    q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, *rest = node.args
    memo: dict = {}
    tensors = [_standin(n, memo) for n in (q, k, v)]
    if any(t is None for t in tensors):
        return None, "q, k or v has a symbolic shape or no example value"
    side_values = []
    for s in sides:
        t = values.of(s)
        if t is None:
            return None, f"side {s.name}: {values.why}"
        side_values.append(t)
    rng_t = None
    if rng is not None:
        rng_t = torch.empty(2, dtype=torch.int64, device=tensors[0].device)
    return (*tensors, side_values, list(scalars), score_mod, dropout_p, rng_t, precision, *rest), None


class _Values:
    """The values that nodes of the graph take at its first call, computed at compile time from the example
    inputs (the first call's own arguments) where that is cheap and safe: a mask side and what it is computed from
    (HF's padding and causal masks, built from `attention_mask` and `arange`s), never anything that requires grad,
    draws random numbers or writes in place."""

    LIMIT = 400  # nodes evaluated per graph, at most
    MAX_NUMEL = 1 << 26  # elements of any one value (a (8, 1, 1024, 1024) mask is 1 << 23)

    def __init__(self, gm: fx.GraphModule, example_inputs):
        self.gm = gm
        self.inputs = {p: x for p, x in zip((n for n in gm.graph.nodes if n.op == "placeholder"), example_inputs)}
        self.done: dict = {}
        self.evaluated = 0
        self.why = ""

    def of(self, node):
        """The node's value, or None with the reason in `why`."""
        try:
            return self._value(node)
        except _Unknown as exc:
            self.why = str(exc)
        except Exception as exc:  # noqa: BLE001 (an op that does not run on these values: not known, then)
            self.why = f"evaluating it failed: {type(exc).__name__}: {exc}"
        return None

    def _value(self, node):
        if not isinstance(node, fx.Node):
            return node
        if node not in self.done:
            try:
                self.done[node] = self._compute(node)
            except _Unknown as exc:
                self.done[node] = exc  # the other layers' calls, reading the same mask, do not walk it again
        out = self.done[node]
        if isinstance(out, _Unknown):
            raise out
        return out

    def _compute(self, node):
        from torch._subclasses.fake_tensor import FakeTensor

        if node.op in ("placeholder", "get_attr"):
            x = self.inputs.get(node) if node.op == "placeholder" else getattr(self.gm, node.target, None)
            if isinstance(x, (int, float, bool)):
                return x
            if not isinstance(x, torch.Tensor) or isinstance(x, FakeTensor):
                raise _Unknown("its graph input has no real example value")
            if x.requires_grad:
                raise _Unknown("it is computed from a tensor that requires grad (activations, a learned bias)")
            return x
        if node.op != "call_function":
            raise _Unknown(f"computed by {node.op} {node.target}")
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            if torch.Tag.nondeterministic_seeded in target.tags:
                raise _Unknown(f"computed by {target}, which draws random numbers")
            if target._schema.is_mutable:
                raise _Unknown(f"computed by {target}, which writes in place")
            if target.namespace != "aten" or target.overloadpacket in _HEAVY:
                raise _Unknown(f"computed by {target}, not a cheap, pure op")
        elif target is not operator.getitem:
            raise _Unknown(f"computed by {target}")
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and not _is_view(target) and \
                not (isinstance(val.numel(), int) and val.numel() <= self.MAX_NUMEL):
            raise _Unknown(f"{node.name} is too large to compute at compile time")
        self.evaluated += 1
        if self.evaluated > self.LIMIT:
            raise _Unknown(f"more than {self.LIMIT} nodes to evaluate")
        args = fx.node.map_arg(node.args, self._value)
        kwargs = fx.node.map_arg(node.kwargs, self._value)
        with torch.no_grad():
            return target(*args, **kwargs)


class _Unknown(Exception):
    pass


def _is_view(target) -> bool:
    """A view allocates nothing (a slice of a 65536² tril buffer): no size bound."""
    return isinstance(target, torch._ops.OpOverload) and any(r.alias_info is not None for r in target._schema.returns)


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

