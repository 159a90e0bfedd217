"""Step 1 of the pipeline: one spelling per operation, shape/dtype meta on every node.

Dynamo's graph spells one operation many ways (`q @ k`, `torch.matmul`, `q.matmul`, `nn.Softmax`,
`F.softmax`, `x /= c`, ...). Re-tracing it to ATen at the *pre-dispatch* level maps all of them to one
ATen op each while keeping the composite ops the passes look for (`aten.matmul`, `aten.softmax`,
`aten.dropout`, `aten.einsum`, `aten.layer_norm`) instead of decomposing them. Every node then carries
its fake value in `node.meta["val"]`, and the user's stack trace is kept for the report.
In-place ops on temporaries (`att /= c`, `masked_fill_`) are turned into their functional form, and a 0-d
constant computed from literals (`np.sqrt(2 / np.pi)` traced by Dynamo) becomes a Python number where it
multiplies, divides, adds to or subtracts from a tensor, so the passes see the number they match on.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import make_fx

aten = torch.ops.aten

# ops whose output aliases their input: an in-place op on such a value writes through to its base
def _makes_fresh_tensor(node: fx.Node) -> bool:
    """Whether `node` allocates its result (no alias of another tensor), read from the op's schema: a
    list of known view ops would miss one (`x.T` is aten.numpy_T) and turn a write to an input into a
    write to a copy. `getitem` asks the op that produced the tuple (split's pieces are views)."""
    if node.op != "call_function":
        return False
    target, src = node.target, node
    if target is operator.getitem and isinstance(node.args[0], fx.Node):
        src = node.args[0]
        target = src.target if src.op == "call_function" else None
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return all(r.alias_info is None for r in target._schema.returns)


def _sole_view_of_temporary(node: fx.Node) -> bool:
    """`node` views a fresh temporary that nothing else reads: writing through it writes memory no one sees."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) or not node.args:
        return False
    src = node.args[0]
    aliases = any(r.alias_info is not None for r in node.target._schema.returns)
    return aliases and isinstance(src, fx.Node) and _makes_fresh_tensor(src) and list(src.users) == [node]


class NotRetraceable(Exception):
    """The graph cannot be re-traced to ATen without changing what it computes."""


def to_aten(gm: fx.GraphModule, example_inputs: list) -> fx.GraphModule:
    """Re-trace a Dynamo graph to a pre-dispatch ATen graph on fake tensors.

    A custom autograd.Function (Dynamo's `autograd_function_apply`) and a checkpointed region are kept whole
    (opaque_functions.py).
    Any other higher-order op is refused (NotRetraceable, so the pipeline compiles the graph as Dynamo gave
    it): re-tracing inlines such ops and can drop what they mean for autograd (a Function's own backward
    dropped this way made every gradient upstream of HF BLOOM's GeLUFunction wrong)."""
    from flashfuse.passes import opaque_functions

    hops = sorted({getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
                   if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator)
                   and not opaque_functions.kept_whole(n)})
    if hops:
        raise NotRetraceable(f"the graph calls {', '.join(hops)} (control flow, a custom autograd.Function with "
                             "non-tensor inputs, ...): re-tracing it to ATen would drop what the op means for autograd")
    if any(n.op == "call_function" and getattr(n.target, "__name__", "") == "_enter_inference_mode"
           for n in gm.graph.nodes):
        # make_fx records no trace of inference_mode: its ops would run with grad in the re-traced graph
        raise NotRetraceable("the graph enters torch.inference_mode(): re-tracing it to ATen would drop the mode "
                             "and give its values gradients")
    fake_mode = detect_fake_mode(example_inputs)
    if fake_mode is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fakeify(x):
        if isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
            return fake_mode.from_tensor(x)
        return x

    fake_inputs = [fakeify(x) for x in example_inputs]
    tracer = opaque_functions.Tracer(gm)
    try:
        with torch.fx.traceback.preserve_node_meta(), fake_mode:
            traced = make_fx(tracer.run, pre_dispatch=True)(*fake_inputs)
    finally:
        tracer.close()
    opaque_functions.restore(traced)
    mark_requires_grad(traced, example_inputs)
    functionalize_inplace(traced)
    fold_scalar_constants(traced)
    type_as_to_dtype(traced)
    squared_norm_to_sum_of_squares(traced)
    return traced


def type_as_to_dtype(gm: fx.GraphModule) -> int:
    """`a.type_as(b)` -> `a.to(b.dtype)`: type_as reads only b's dtype, but as an argument b looks like a use of
    its values (fairseq's `softmax(w, dtype=float32).type_as(w)` made the scores `w` look used twice)."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.type_as.default and len(node.args) == 2:
            other = val(node.args[1])
            if other is None:
                continue
            node.target = aten.to.dtype
            node.args = (node.args[0], other.dtype)
            changed += 1
    if changed:
        gm.recompile()  # a `b` left unused goes with the attention pass's and the pipeline's dead-code elimination
    return changed


def squared_norm_to_sum_of_squares(gm: fx.GraphModule) -> int:
    """`vector_norm(x, 2, dims, keepdim) ** 2` -> `sum(x * x, dims, keepdim)` when the norm has no other use:
    the same value without the square root and its square (which also round). The norm passes then read
    `... / d` as a mean of squares (an RMSNorm written with `vector_norm(x)**2 / d`)."""
    from flashfuse.passes.eltwise_chain import insert_call  # imported on use: it registers a pass on import

    changed = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target == aten.pow.Tensor_Scalar and node.args[1] == 2):
            continue
        norm = node.args[0]
        if not (isinstance(norm, fx.Node) and norm.op == "call_function"
                and norm.target == aten.linalg_vector_norm.default and len(norm.users) == 1):
            continue
        x, order, dims, keepdim = (list(norm.args) + [2, None, False][len(norm.args) - 1:])[:4]
        if order != 2 or norm.kwargs.get("dtype") is not None or dims is None or val(x) is None \
                or not val(x).is_floating_point():
            continue
        square = insert_call(gm, node, aten.mul.Tensor, (x, x), like=node)
        total = insert_call(gm, node, aten.sum.dim_IntList, (square, list(dims), bool(keepdim)), like=node)
        node.replace_all_uses_with(total)
        gm.graph.erase_node(node)
        gm.graph.erase_node(norm)
        changed += 1
    if changed:
        gm.recompile()
    return changed


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
    x is a temporary (not an input, not a view of anything) that nothing reads after the write, or the only
    view of such a temporary (open_clip: `attn = attn.view(-1, L, L); attn += mask`)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        functional = functional_variant(node.target)
        if functional is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        base = node.args[0]
        if not (_makes_fresh_tensor(base) or _sole_view_of_temporary(base)):
            continue
        if any(order[u] > order[node] for u in base.users if u is not node):
            continue
        node.target = functional
        changed += 1
    if changed:
        gm.recompile()
    return changed


# pure ops evaluated on 0-d constants (real tensors held by the graph module), and where the result goes
_CONST_OPS = {aten.lift_fresh_copy.default, aten.sqrt.default, aten.rsqrt.default, aten.reciprocal.default,
              aten.neg.default, aten.exp.default, aten.log.default, aten.pow.Tensor_Scalar, aten.mul.Tensor,
              aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.clone.default, aten.detach.default,
              aten._to_copy.default}
_ARITH = {aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor}


def fold_scalar_constants(gm: fx.GraphModule) -> int:
    """Replace a floating 0-d constant by its Python value where it is the second operand of mul/div/add/sub
    (or either operand of mul/add) with a floating tensor of rank >= 1: the same result dtype (a 0-d tensor
    does not promote a dimensioned one of its category), the same number. Also where it is masked_fill's value
    (the fill is cast to the filled tensor's dtype either way)."""
    consts: dict = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = getattr(gm, node.target, None)
            if isinstance(t, torch.Tensor) and t.dim() == 0 and not isinstance(t, FakeTensor) and not t.requires_grad:
                consts[node] = t.detach()
        elif node.op == "call_function" and node.target in _CONST_OPS:
            if not any(a in consts for a in node.args if isinstance(a, fx.Node)):
                continue
            if not all(a in consts for a in node.all_input_nodes):
                continue
            try:
                args = [consts[a] if isinstance(a, fx.Node) else a for a in node.args]
                out = node.target(*args, **node.kwargs)
            except Exception:  # anything unexpected: leave the node alone
                continue
            if isinstance(out, torch.Tensor) and out.dim() == 0:
                consts[node] = out
    changed = 0
    for node, value in consts.items():
        if not value.is_floating_point():
            continue
        for user in list(node.users):
            if user.op == "call_function" and user.target is aten.masked_fill.Tensor and len(user.args) == 3 \
                    and user.args[2] is node and user.args[0] is not node and not user.kwargs:
                # `x.masked_fill(m, torch.tensor(finfo.min))` (DeBERTa's XSoftmax): the same fill as the number
                user.target = aten.masked_fill.Scalar
                user.args = (user.args[0], user.args[1], float(value))
                changed += 1
                continue
            if user.op != "call_function" or user.target not in _ARITH or user in consts or len(user.args) != 2:
                continue
            a, b = user.args
            other = a if b is node else b
            ov = val(other)
            if ov is None or not ov.is_floating_point() or ov.dim() == 0 or a is b:
                continue
            if b is node:
                user.args = (a, float(value))
            elif user.target in (aten.mul.Tensor, aten.add.Tensor) and "alpha" not in user.kwargs:
                user.args = (b, float(value))
            else:
                continue
            changed += 1
    if changed:
        gm.recompile()  # the constants left unused go with the pipeline's dead-code elimination
    return changed


_REQUIRES_GRAD = "flashfuse_requires_grad"
# ops whose result never requires grad whatever their inputs (eager: `torch.ones_like(p).requires_grad` is False)
_NO_GRAD_OPS = {aten.detach.default, aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
                aten.full_like.default, aten.rand_like.default, aten.randn_like.default, aten.randint_like.default,
                aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default,
                aten.bernoulli.p, aten.lift_fresh_copy.default}


def mark_requires_grad(gm: fx.GraphModule, example_inputs: list) -> None:
    """Record in each node's meta whether its value requires grad in the real run. The fake values of the
    re-traced graph all say False (make_fx traces below autograd), but passes need the truth: a training graph
    takes other policies than an inference one, and some rewrites are exact only without a gradient. A graph
    input takes its example input's flag; an op's floating result requires grad when grad mode is on at its
    position and any input requires grad (detach and the *_like factories never)."""
    from flashfuse.passes.grad_mode import modes

    enabled = modes(gm, torch.is_grad_enabled())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, example in zip(placeholders, example_inputs):
        node.meta[_REQUIRES_GRAD] = bool(isinstance(example, torch.Tensor) and example.requires_grad)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            t = getattr(gm, node.target, None)
            node.meta[_REQUIRES_GRAD] = bool(isinstance(t, torch.Tensor) and t.requires_grad)
        elif node.op == "call_function":
            node.meta[_REQUIRES_GRAD] = _computes_grad(node, enabled[node])


def _computes_grad(node: fx.Node, grad_enabled: bool) -> bool:
    v = node.meta.get("val")
    floating = isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())
    if isinstance(v, (tuple, list)):  # var_mean, max.dim: the getitems check their own dtype
        floating = any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in v)
    if not (grad_enabled and floating) or node.target in _NO_GRAD_OPS:
        return False
    return any(requires_grad(a) for a in node.all_input_nodes)


def traced(node: fx.Node) -> bool:
    """A node the re-trace computed (marked by mark_requires_grad): its fake value, strides included, is the
    op's own, where a node a pass inserted may carry another node's value."""
    return _REQUIRES_GRAD in node.meta


def requires_grad(node) -> bool:
    """Whether `node`'s value requires grad when the graph runs (see mark_requires_grad). A node a pass
    inserted since has no mark: it is computed from its inputs, assuming grad mode on (the safe answer)."""
    if not isinstance(node, fx.Node):
        return False
    if _REQUIRES_GRAD in node.meta:
        return node.meta[_REQUIRES_GRAD]
    if node.op != "call_function":
        return bool(val(node) is not None and val(node).requires_grad)
    return _computes_grad(node, True)


def val(node) -> torch.Tensor | None:
    """The fake tensor a node produces (None for non-tensor values)."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("val")
    return v if isinstance(v, torch.Tensor) else None
