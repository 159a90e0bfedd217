"""Matcher helpers shared by the norm passes (layer_norm, rms_norm, residual_norm): recognising the
pieces of a hand-written norm in the ATen graph, the affine/cast tail after it, the policy under the
remainder compilers, and inserting the flashfuse op with its fake value."""
from __future__ import annotations

import dataclasses
import math
import operator

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from flashfuse.passes.normalize import requires_grad, val

aten = torch.ops.aten

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MAX_N = 16384  # = flashfuse.kernels.norms.triton_kernels.MAX_N (kept here so the pass imports no triton)


# ---------------------------------------------------------------------------------------------- small facts
def is_op(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def alias_root(node):
    """Skip casts to the dtype the value already has (`x.float()` on fp32 x): they are the same value."""
    while is_op(node, aten.to.dtype, aten._to_copy.default) and isinstance(node.args[0], fx.Node) \
            and val(node) is not None and val(node.args[0]) is not None \
            and val(node).dtype == val(node.args[0]).dtype and cast_dtype(node) is not None:
        node = node.args[0]
    return node


def same_value(a, b) -> bool:
    return isinstance(a, fx.Node) and isinstance(b, fx.Node) and alias_root(a) is alias_root(b)


def is_number(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def last_dim_size(node) -> int | None:
    v = val(node)
    if v is None or v.dim() == 0:
        return None
    n = v.shape[-1]
    return n if isinstance(n, int) else None


def var_mean_part(node, index: int):
    """For `getitem(var_mean(...), index)` the var_mean node (index 0: variance, 1: mean), else None."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem \
            and node.args[1] == index and is_op(node.args[0], aten.var_mean.dim, aten.var_mean.correction):
        return node.args[0]
    return None


def reduce_dims(node: fx.Node) -> tuple[list[int] | None, bool]:
    """(positive dims, keepdim) of mean.dim / var.dim / var.correction / var_mean (or a getitem of it);
    dims None when not a list of ints."""
    node = var_mean_part(node, 0) or var_mean_part(node, 1) or node
    x = node.args[0]
    rank = val(x).dim()
    if node.target in (aten.var.correction, aten.var_mean.correction):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.kwargs.get("keepdim", False)
    else:  # mean.dim(x, dims, keepdim=False, *, dtype) / var.dim(x, dims, unbiased=True, keepdim=False)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        k = 2 if node.target is aten.mean.dim else 3  # var.dim / var_mean.dim: (x, dims, unbiased, keepdim)
        keepdim = node.args[k] if len(node.args) > k else node.kwargs.get("keepdim", False)
    if dims is None or not all(isinstance(d, int) for d in dims):
        return None, bool(keepdim)
    return sorted({d % rank for d in dims}), bool(keepdim)


def dims_text(dims) -> str:
    return "dim " + ",".join(str(d) for d in dims) if dims else "all dims"


def per_feature(weight: fx.Node, n, out_shape) -> bool:
    """One value per normalized element. `n` is the last dim's size (shape (..., 1, n) exactly) or the
    normalized trailing shape (a tuple): then each of the weight's trailing dims is that size or 1 (broadcast
    inside the normalized block), its leading dims 1, and it does not widen the output."""
    v = val(weight)
    if v is None or v.dtype not in FLOATS or v.dim() == 0 or v.dim() > len(out_shape):
        return False
    if isinstance(n, tuple) and len(n) == 1:
        n = n[0]
    if not isinstance(n, tuple):
        return v.shape[-1] == n and all(s == 1 for s in v.shape[:-1])
    k = len(n)
    inner, outer = v.shape[max(0, v.dim() - k):], v.shape[:max(0, v.dim() - k)]
    return all(s == 1 for s in outer) and all(s in (f, 1) for s, f in zip(inner, n[k - len(inner):]))


def trailing_shape(x: fx.Node, dims) -> tuple | None:
    """The sizes of `dims` when they are x's trailing dims (one or more) of static size, else None."""
    v = val(x)
    if v is None or not dims:
        return None
    rank = v.dim()
    if list(dims) != list(range(rank - len(dims), rank)) or not all(isinstance(d, int) for d in v.shape[-len(dims):]):
        return None
    return tuple(v.shape[-len(dims):])


def strip_upcast(x: fx.Node) -> fx.Node:
    """`x.float()` before a norm: the kernel upcasts itself, so read the narrower tensor (exact)."""
    while is_op(x, aten.to.dtype, aten._to_copy.default) and isinstance(x.args[0], fx.Node):
        src, dst = val(x.args[0]), val(x)
        if src is None or dst is None or dst.dtype is not torch.float32 or src.dtype not in FLOATS:
            break
        if x.target is aten._to_copy.default and set(x.kwargs) - {"dtype"}:
            break
        x = x.args[0]
    return x


def cast_dtype(node: fx.Node) -> torch.dtype | None:
    """The target dtype of a plain dtype cast (to.dtype / _to_copy(dtype=)), else None."""
    if is_op(node, aten.to.dtype) and len(node.args) >= 2 and isinstance(node.args[1], torch.dtype):
        if not node.kwargs and len(node.args) == 2:
            return node.args[1]
    if is_op(node, aten._to_copy.default) and set(node.kwargs) == {"dtype"}:
        return node.kwargs["dtype"]
    if is_op(node, aten.type_as.default) and val(node) is not None:  # `out.type_as(x)`
        return val(node).dtype
    return None


def restore_keepdim(gm: fx.GraphModule) -> int:
    """`x.mean(-1).unsqueeze(-1)` (also `[..., None]`, and the same for var) is `x.mean(-1, keepdim=True)`:
    give each such unsqueeze the keepdim reduction in its place, so the matchers see one spelling. Same
    values; a reduction with other users stays for them. Returns how many were replaced."""
    count = 0
    for node in list(gm.graph.nodes):
        red = node.args[0] if is_op(node, aten.unsqueeze.default) else None
        if not is_op(red, aten.mean.dim, aten.var.dim, aten.var.correction) or val(node) is None \
                or val(red.args[0]) is None:
            continue
        dims, keepdim = reduce_dims(red)
        if keepdim or dims is None or len(dims) != 1 or node.args[1] % val(node).dim() != dims[0]:
            continue
        args, kwargs = list(red.args), dict(red.kwargs)
        if red.target is aten.var.correction:
            kwargs["keepdim"] = True
        else:  # mean.dim(x, dims, keepdim) / var.dim(x, dims, unbiased, keepdim)
            k = 2 if red.target is aten.mean.dim else 3
            if red.target is aten.var.dim and len(args) < 3:
                args.append(kwargs.pop("unbiased", True))
            kwargs.pop("keepdim", None)
            args = args[:k] + [True]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(red.target, tuple(args), kwargs)
        new.meta.update(red.meta)
        new.meta["val"] = node.meta["val"]  # the unsqueezed value is the keepdim reduction
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        if not red.users:
            gm.graph.erase_node(red)
        count += 1
    return count


def run_norm_pass(gm: fx.GraphModule, library_target, library_form, is_anchor, hand_written) -> int:
    """The loop LayerNorm and RMSNorm share: one spelling for the statistics first, then each library op
    (`library_form(node)`) and each hand-written anchor (`hand_written(node)`) tried once."""
    restore_keepdim(gm)  # `x.mean(-1).unsqueeze(-1)` -> `x.mean(-1, keepdim=True)`
    sum_as_mean(gm)  # `x.sum(-1, keepdim=True) / n` -> `x.mean(-1, keepdim=True)`
    count = 0
    for node in list(gm.graph.nodes):
        if node.graph is None or node.op != "call_function":
            continue
        if library_target is not None and node.target is library_target:
            count += library_form(node)
        elif is_anchor(node):
            count += hand_written(node)
    if count:
        gm.graph.eliminate_dead_code()  # the pipeline recompiles after each pass that rewrote
    return count


def sum_as_mean(gm: fx.GraphModule) -> int:
    """`x.sum(dims, keepdim) / n` (or `* (1/n)`) with n the number of summed elements is `x.mean(dims,
    keepdim)`: give the matchers that one spelling. Floating inputs only, outside autocast (there sum runs
    in fp32 and mean in the input dtype); a sum with other users stays. Returns how many were replaced."""
    from flashfuse.passes.eltwise_chain import autocast_nodes, in_autocast, known_equal

    regions = False  # looked up once, when a candidate needs it
    count = 0
    for node in list(gm.graph.nodes):
        if not is_op(node, aten.div.Tensor, aten.div.Scalar, aten.mul.Tensor, aten.mul.Scalar) or node.kwargs:
            continue
        red, n = node.args[0], node.args[1]
        if not is_op(red, aten.sum.dim_IntList) or red.kwargs or len(red.users) != 1 or len(red.args) < 2:
            continue
        x = red.args[0]
        if val(x) is None or not val(x).is_floating_point() or val(node) is None \
                or val(node).dtype != val(x).dtype or not is_number(n) or isinstance(n, bool):
            continue
        dims = red.args[1]
        if not dims or not all(isinstance(d, int) for d in dims):
            continue
        size = math.prod(val(x).shape[d] for d in dims)
        if node.target in (aten.div.Tensor, aten.div.Scalar):
            if not known_equal(n, size):
                continue
        elif not (isinstance(n, float) and isinstance(size, int) and abs(n * size - 1.0) < 1e-12):
            continue
        if regions is False:
            regions = autocast_nodes(gm)  # None: the whole graph runs under autocast
        if in_autocast(regions, [red, node]):
            continue
        keepdim = bool(red.args[2]) if len(red.args) > 2 else False
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(aten.mean.dim, (x, list(dims), keepdim))
        new.meta.update(red.meta)
        new.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        gm.graph.erase_node(red)
        count += 1
    return count


# ---------------------------------------------------------------------------------------------- rsqrt / eps
def is_runtime_scalar(a) -> bool:
    """A Python number only known at run time (`tensor.item()`, a SymFloat input under dynamic=True)."""
    return isinstance(a, fx.Node) and (is_op(a, aten.item.default) or
                                       isinstance(a.meta.get("val"), (torch.SymFloat, torch.SymInt)))


RUNTIME_EPS = ("eps is a run-time scalar (Dynamo made the float attribute a graph input, e.g. under "
               "dynamic=True); under the Inductor remainder the kernel takes eps only as a constant")


EPS_TENSOR = ("eps is a 0-d tensor (a registered buffer?), not a number: the norm kernels take eps as a "
              "constant; write it as a Python float")


def parse_eps_add(a: fx.Node):
    """`v + eps` -> (v, eps); anything else -> (a, 0.0). eps is an fx.Node when it is a run-time scalar.
    A 0-d tensor eps -> EPS_TENSOR (the reason it is not fused)."""
    if is_op(a, aten.add.Tensor, aten.add.Scalar) and not a.kwargs and len(a.args) == 2:
        lhs, rhs = a.args
        if isinstance(lhs, fx.Node) and (is_number(rhs) or is_runtime_scalar(rhs)):
            return lhs, (float(rhs) if is_number(rhs) else rhs)
        if isinstance(rhs, fx.Node) and (is_number(lhs) or is_runtime_scalar(lhs)):
            return rhs, (float(lhs) if is_number(lhs) else lhs)
        vals = [val(t) for t in (lhs, rhs)]
        if all(v is not None for v in vals) and sorted(v.dim() == 0 for v in vals) == [False, True] and \
                all(v.is_floating_point() for v in vals):
            return EPS_TENSOR
    return a, 0.0


def parse_scale(s) -> tuple[fx.Node, float] | None:
    """s = rsqrt(v + eps) (or pow(., -0.5), 1/sqrt(.)) -> (v, eps)."""
    if is_op(s, aten.mul.Tensor) and len(s.args) == 2 and not s.kwargs:
        # `1.0 / sqrt(.)` reaches ATen as `reciprocal(sqrt(.)) * 1.0`: a multiply by one scales nothing
        a, b = s.args
        if is_number(b) and b == 1:
            s = a
        elif is_number(a) and a == 1:
            s = b
    if is_op(s, aten.rsqrt.default):
        return parse_eps_add(s.args[0])
    if is_op(s, aten.pow.Tensor_Scalar) and s.args[1] == -0.5:
        return parse_eps_add(s.args[0])
    if is_op(s, aten.reciprocal.default) and is_op(s.args[0], aten.sqrt.default):
        return parse_eps_add(s.args[0].args[0])
    return None


def parse_denominator(d) -> tuple[fx.Node, float] | str | None:
    """d = sqrt(v + eps) -> (v, eps); eps outside the root, or a std, -> the reason why that is not a norm."""
    if is_op(d, aten.sqrt.default):
        return parse_eps_add(d.args[0])
    if is_op(d, aten.pow.Tensor_Scalar) and d.args[1] == 0.5:
        return parse_eps_add(d.args[0])
    std_ops = (aten.std.dim, aten.std.correction)
    if is_op(d, aten.add.Tensor) and not d.kwargs and len(d.args) == 2:
        root = [a for a in d.args if is_op(a, aten.sqrt.default, *std_ops)]
        if root and any(is_number(a) or is_runtime_scalar(a) for a in d.args):
            return ("eps is added outside the square root, x / (sqrt(var) + eps): a different function "
                    "from the norm (the kernel computes x * rsqrt(var + eps))")
    if is_op(d, *std_ops):
        return "divides by std(x) with no eps inside the root; write x / sqrt(var + eps) to get the kernel"
    return None


def aliases(x: fx.Node) -> list[fx.Node]:
    """x and every same-dtype cast of it (and of its root)."""
    root = alias_root(x)
    out, todo = [], [root]
    while todo:
        n = todo.pop()
        out.append(n)
        todo.extend(u for u in n.users if alias_root(u) is root and u is not n and u not in out)
    return out


def exact_copies(x: fx.Node) -> list[fx.Node]:
    """Every node holding x's values exactly: x's root before any upcast (`x.float()` of fp16/bf16 loses
    nothing) and every same-dtype or upcasting cast of it, however many times the user wrote `.float()`."""
    root = strip_upcast(alias_root(x))
    out, todo = [], [root]
    while todo:
        n = todo.pop()
        if n in out:
            continue
        out.append(n)
        todo.extend(u for u in n.users if cast_dtype(u) is not None and u.args[0] is n
                    and strip_upcast(alias_root(u)) is root)
    return out


def squared_input(sq, copies=exact_copies) -> fx.Node | None:
    """a when sq is a ** 2, square(a) or a * b with b among `copies(a)` in a's dtype; else None."""
    if is_op(sq, aten.pow.Tensor_Scalar) and sq.args[1] == 2:
        return sq.args[0]
    if is_op(sq, aten.mul.Tensor) and len(sq.args) == 2 and isinstance(sq.args[0], fx.Node) \
            and sq.args[1] in copies(sq.args[0]) and val(sq.args[0]).dtype == val(sq.args[1]).dtype:
        return sq.args[0]
    if is_op(sq, aten.square.default):
        return sq.args[0]
    return None


def scaled_by(x: fx.Node) -> list[tuple[fx.Node, str, object]]:
    """Users of x of the form x * s / s * x / x / d: [(user, 'mul'|'div', other)]."""
    out = []
    for u in x.users:
        if is_op(u, aten.mul.Tensor) and len(u.args) == 2 and not u.kwargs:
            a, b = u.args
            if a is x and b is not x:
                out.append((u, "mul", b))
            elif b is x and a is not x:
                out.append((u, "mul", a))
        elif is_op(u, aten.div.Tensor) and len(u.args) == 2 and not u.kwargs and u.args[0] is x:
            out.append((u, "div", u.args[1]))
    return out


def scaling_uses(c: fx.Node, x_shape, skip=(), features=None):
    """(user, 'mul'|'div', scale-or-divisor, weight applied first or None) for `c * s`, `c / d` and the
    weight-first spelling `w * c * s` / `w * c / d` (Python evaluates it as `(w * c) * s`). Users whose
    other operand is in `skip` are not scalings (LayerNorm: `(x - mu) * (x - mu)` is the square)."""
    n = features if features is not None else x_shape[-1]
    for user, how, other in scaled_by(c):
        if other in skip:
            continue
        yield user, how, other, None
        if how == "mul" and per_feature(other, n, x_shape) and tuple(val(user).shape) == tuple(x_shape):
            for user2, how2, other2 in scaled_by(user):
                if other2 is not c and other2 is not other:
                    yield user2, how2, other2, other


# ---------------------------------------------------------------------------------------------- the tail
@dataclasses.dataclass
class Tail:
    last: fx.Node                       # the node whose value the fused op produces
    weight: fx.Node | None = None
    bias: fx.Node | None = None
    mid_dtype: torch.dtype | None = None
    note: str = ""                      # why the tail stopped early, when that is worth saying
    features: tuple = ()                # the normalized trailing shape when it is more than one dim
    out_dtype: torch.dtype | None = None  # when the fake value's dtype is not the real one (autocast)


def match_tail(start: fx.Node, n: int, x_shape, have_weight=False, have_bias=False) -> Tail:
    """Absorb what follows the normalization: [cast] [* weight] [+ bias] [cast], each step only where the
    previous value has no other user. A cast before the weight is kept as an intermediate rounding."""
    tail = Tail(start)
    pending = None  # a cast before any weight/bias: becomes the intermediate rounding if more follows
    cur = start
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        dt = cast_dtype(u)
        if dt is not None and u.args[0] is cur:
            if dt not in FLOATS:
                break
            if pending is None and tail.weight is None and tail.bias is None:
                pending = tail.mid_dtype = dt
                cur = tail.last = u
                continue
            cur = tail.last = u  # a cast after the affine (or a second cast) is the output cast: stop
            break
        if is_op(u, aten.mul.Tensor) and len(u.args) == 2 and not u.kwargs and not have_weight \
                and tail.weight is None and tail.bias is None:
            other = u.args[1] if u.args[0] is cur else u.args[0]
            if not isinstance(other, fx.Node) or other is cur:
                break
            if not per_feature(other, n, x_shape) or tuple(val(u).shape) != tuple(x_shape):
                tail.note = (f"the multiply by a tensor of shape {tuple(val(other).shape)} is not one weight per "
                             f"normalized element (shape ({n},)); it stays outside the kernel")
                break
            tail.weight = other
        elif is_op(u, aten.add.Tensor) and len(u.args) == 2 and not u.kwargs and not have_bias \
                and tail.bias is None:
            other = u.args[1] if u.args[0] is cur else u.args[0]
            if not isinstance(other, fx.Node) or other is cur or not per_feature(other, n, x_shape) \
                    or tuple(val(u).shape) != tuple(x_shape):
                break
            tail.bias = other
        else:
            break
        cur = tail.last = u
    if tail.mid_dtype is torch.float32:
        tail.mid_dtype = None  # rounding to fp32 rounds nothing
    if tail.weight is None and tail.bias is None and val(tail.last).dtype == tail.mid_dtype:
        tail.mid_dtype = None  # the cast was the output cast
    return tail


# ---------------------------------------------------------------------------------------------- policy
# Measured on an H100 (torch 2.11, triton 3.6, bf16) by benchmarks/norms.py: flashfuse time / Inductor time per
# (op, row length) as (forward, forward+backward), both replayed from CUDA graphs (kernel time: inside a compiled
# training step the host cost of each op is shared with everything else, and CUDA graphs remove it). Row length
# 1024, all four ops, and add_* at 4096 / 8192: session 19 (the backward's partial sums reduced by column_sum_kernel;
# results/session19/s19b/norms1024.log, s19c/norms_add.log). LayerNorm and RMSNorm at 4096 / 8192: session 16, the
# backward's grid one wave of resident programs (results/session16_norms16/norms16.log, session16/rms16.log).
# Inputs are read from memory: see producer_inductor_fuses for norms whose input Inductor computes in the same
# kernel. "auto" under Inductor replaces a norm only where flashfuse was faster by more than AUTO_MARGIN at the
# nearest row length (log2 distance); everything else is left to Inductor.
MEASURED_RATIO: dict[tuple[str, int], tuple[float, float]] = {
    ("layer_norm", 1024): (0.999, 0.832),
    ("layer_norm", 4096): (0.881, 0.895),
    ("layer_norm", 8192): (1.008, 0.644),
    ("rms_norm", 1024): (1.01, 0.931),
    ("rms_norm", 4096): (0.993, 0.937),
    ("rms_norm", 8192): (1.0, 0.713),
    ("add_layer_norm", 1024): (1.0, 0.902),
    ("add_layer_norm", 4096): (0.989, 0.995),
    ("add_layer_norm", 8192): (0.984, 0.714),
    ("add_rms_norm", 1024): (1.014, 0.956),
    ("add_rms_norm", 4096): (0.981, 0.945),
    ("add_rms_norm", 8192): (0.993, 0.783),
}
AUTO_MARGIN = 0.95  # within 5% is measurement noise plus the extra host cost of an opaque op in Inductor


_DROPOUTS = (aten.dropout.default, aten.native_dropout.default)


def _fusable_producer(node) -> str | None:
    """The name of the op computing `node` if Inductor fuses it into the norm kernel that reads `node`: a
    pointwise op (torch.Tag.pointwise) or a dropout."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is operator.getitem and is_op(node.args[0], aten.native_dropout.default):
        return "native_dropout"
    if node.target in _DROPOUTS or torch.Tag.pointwise in getattr(node.target, "tags", ()):
        return str(node.target).split(".")[1] if str(node.target).startswith("aten.") else str(node.target)
    return None


def producer_inductor_fuses(x: fx.Node) -> str | None:
    """Why the standalone ratio does not hold for this norm under Inductor, or None. `MEASURED_RATIO` times
    norms whose inputs come from memory; Inductor also fuses the op that computes the input (GPT-2's residual
    dropout, add and LayerNorm are one Inductor kernel), which flashfuse's kernel cannot, so it would read
    back what Inductor never writes. For x = a + b (the residual pattern: flashfuse fuses the add, not what
    feeds it) the terms used by the add alone are checked, else x's own producer."""
    if is_op(x, aten.add.Tensor):
        for a in x.args:
            op = _fusable_producer(a)
            if op is not None and len(a.users) == 1:
                return f"a term of the residual add is computed by {op}"
        return None
    op = _fusable_producer(x)
    return None if op is None else f"its input is computed by {op}"


def choose(ctx, kind: str, n: int, training: bool, producer: str | None = None) -> tuple[bool, str]:
    """Whether to put flashfuse's kernel in, and the reason in words. `producer`: producer_inductor_fuses's
    answer for this norm (under Inductor a measured gain is then not claimed)."""
    cfg = ctx.config
    if cfg.remainder == "eager":
        return True, "eager remainder: flashfuse's kernel is always used"
    if cfg.norm_policy == "always":
        return True, "norm_policy='always'"
    if cfg.norm_policy == "never":
        return False, "norm_policy='never': left to Inductor"
    if not ctx.is_cuda:
        return False, ("norm_policy='auto' on a CPU graph under Inductor: left to Inductor "
                       "(flashfuse's norm kernels are only measured faster on the GPU)")
    rows = [(abs(math.log2(k[1]) - math.log2(n)), k[1], r) for k, r in MEASURED_RATIO.items() if k[0] == kind]
    if not rows:
        return False, f"norm_policy='auto': no GPU measurement for {kind}; left to Inductor"
    _, near, (fwd, fwd_bwd) = min(rows)
    ratio = fwd_bwd if training else fwd
    what = "forward+backward" if training else "forward"
    if ratio < AUTO_MARGIN:
        if producer is not None:
            return False, (f"norm_policy='auto': flashfuse's {what} measured {1 / ratio:.2f}x as fast as Inductor's "
                           f"at row length {near} on the H100 on inputs read from memory, but {producer}, which "
                           f"Inductor fuses into its own norm kernel; left to Inductor")
        return True, (f"norm_policy='auto': flashfuse's {what} measured {1 / ratio:.2f}x as fast as "
                      f"Inductor's at row length {near} on the H100")
    return False, (f"norm_policy='auto': flashfuse's {what} measured {ratio:.2f}x Inductor's time at row "
                   f"length {near} on the H100 (not faster by {1 - AUTO_MARGIN:.0%}); left to Inductor")


def needs_grad(*nodes) -> bool:
    return any(requires_grad(n) for n in nodes)


# ---------------------------------------------------------------------------------------------- rewriting
def fake_result(op, args):
    tensors = [val(a) for a in args if isinstance(a, fx.Node)]
    mode = detect_fake_mode(tensors)
    fargs = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in args]  # SymFloat eps too
    if mode is None:
        return None
    with mode:
        return op(*fargs)


def insert_call(graph: fx.Graph, before: fx.Node, op, args, like: fx.Node) -> fx.Node:
    with graph.inserting_before(before):
        new = graph.call_function(op, tuple(args))
    new.meta["val"] = fake_result(op, args)
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in like.meta:
            new.meta[key] = like.meta[key]
    return new


def insert_getitem(graph: fx.Graph, tup: fx.Node, i: int) -> fx.Node:
    with graph.inserting_after(tup):
        g = graph.call_function(operator.getitem, (tup, i))
    g.meta["val"] = tup.meta["val"][i] if tup.meta.get("val") is not None else None
    for key in ("stack_trace", "nn_module_stack"):
        if key in tup.meta:
            g.meta[key] = tup.meta[key]
    return g


def norm_op(kind: str):
    import flashfuse.kernels.norms  # noqa: F401  (registers the ops)

    return getattr(torch.ops.flashfuse, kind).default


def replace_norm(gm: fx.GraphModule, kind: str, x: fx.Node, tail: Tail, eps: float) -> fx.Node:
    """Insert flashfuse::<kind>(x, w, b, eps, mid, out_dtype) before tail.last and use it instead."""
    out_dtype = tail.out_dtype or val(tail.last).dtype
    args = [x, tail.weight, tail.bias, eps if isinstance(eps, fx.Node) else float(eps), tail.mid_dtype, out_dtype]
    new = insert_call(gm.graph, tail.last, norm_op(kind), args, tail.last)
    tail.last.replace_all_uses_with(new)
    return new


def _replace_flattened(gm: fx.GraphModule, kind: str, x: fx.Node, tail: Tail, eps) -> None:
    """A norm over k > 1 trailing dims is the same norm over one dim of their product: reshape x (and the
    affine, expanded to the block where it broadcasts inside it), run the kernel, view the result back."""
    feats, n = tail.features, math.prod(tail.features)
    k, graph = len(feats), gm.graph

    def call(op, *args):
        return insert_call(graph, tail.last, op, args, tail.last)

    def flat_param(p):
        if p is None:
            return None
        shape = tuple(val(p).shape)[-k:]
        if val(p).dim() > k:
            p = call(aten.reshape.default, p, list(shape))  # leading dims are all 1
        if (1,) * (k - len(shape)) + shape != feats:
            p = call(aten.expand.default, p, list(feats))
        return call(aten.reshape.default, p, [n])

    x2 = call(aten.reshape.default, x, [*val(x).shape[:-k], n])
    flat = dataclasses.replace(tail, weight=flat_param(tail.weight), bias=flat_param(tail.bias), features=())
    out_shape = list(val(tail.last).shape)
    new = replace_norm(gm, kind, x2, flat, eps)
    with graph.inserting_after(new):
        back = graph.call_function(aten.reshape.default, (new, out_shape))
    back.meta["val"] = fake_result(aten.reshape.default, (new, out_shape))
    for key in ("stack_trace", "nn_module_stack"):
        if key in new.meta:
            back.meta[key] = new.meta[key]
    new.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)


def describe(kind: str, x: fx.Node, tail: Tail, eps: float, spelling: str) -> str:
    eps_text = "eps read at run time" if isinstance(eps, fx.Node) else f"eps={eps:g}"
    where = (f"the last {len(tail.features)} dims ({'x'.join(map(str, tail.features))}, flattened)"
             if len(tail.features) > 1 else f"the last dim ({last_dim_size(x)})")
    parts = [f"{spelling} over {where}", eps_text]
    if tail.weight is not None:
        parts.append("weight")
    if tail.bias is not None:
        parts.append("bias")
    if tail.mid_dtype is not None:
        parts.append(f"rounded to {str(tail.mid_dtype).replace('torch.', '')} before the weight")
    xv, ov = val(x), val(tail.last)
    parts.append(f"{str(xv.dtype).replace('torch.', '')} -> {str(ov.dtype).replace('torch.', '')}")
    return f"flashfuse::{kind}: " + ", ".join(parts)


def check_size(x: fx.Node, n: int | None = None) -> str | None:
    """Why the kernel cannot take this input (rows of `n` elements, default its last dim), or None."""
    v = val(x)
    if v is None or v.dtype not in FLOATS:
        return f"input dtype {getattr(v, 'dtype', None)} is not fp16/bf16/fp32"
    n = last_dim_size(x) if n is None else n
    if n is None:
        return "the normalized size is symbolic (the kernel is specialized on it)"
    if n > MAX_N:
        return f"row length {n} > {MAX_N}, longer than the kernel keeps in registers"
    return None


def hand_written_tail(ctx, fusion: str, x, dims, keepdim: bool, normed, pre_weight, statistic: str):
    """The checks a hand-written norm shares (statistics over the trailing dims, with keepdim; the normalized
    value has x's shape) and the tail after it, or None (with a near-miss where it says something)."""
    rank = val(x).dim()
    feats = trailing_shape(x, dims)
    if feats is None:  # named first: the axis is what makes it another function (BatchNorm-like)
        ctx.graph_report.add_near_miss(fusion, normed, f"statistics over {dims_text(dims)} of a {rank}-d tensor, "
                                                       "not the last dim(s) the kernel normalizes")
        return None
    if not keepdim:
        ctx.graph_report.add_near_miss(fusion, normed, f"the {statistic} is reduced without keepdim")
        return None
    if tuple(val(normed).shape) != tuple(val(x).shape):
        return None
    if pre_weight is not None and not per_feature(pre_weight, feats, val(x).shape):
        return None
    tail = match_tail(normed, feats, val(x).shape, have_weight=pre_weight is not None)
    if pre_weight is not None:
        if tail.mid_dtype is not None:  # a rounding after the weight: the kernel rounds before it
            tail = Tail(normed)
        tail.weight = pre_weight
    tail.features = feats if len(feats) > 1 else ()
    return tail


AUTOCAST_NORM_NOTE = ("under autocast: eager's norm runs in autocast's dtype for its device (CUDA: LayerNorm in "
                      "fp32; CPU: the input's dtype; pow / rsqrt of a hand-written form in fp32), a policy per op and "
                      "device; only CUDA's aten.layer_norm with nothing after it is proven; left as is")


def _cuda_layer_norm_in_fp32(autocast_on: set, fusion: str, spelling: str, anchor: fx.Node, x, tail: Tail) -> bool:
    """CUDA autocast runs aten.layer_norm in fp32 (its fp32 op list): input, weight and bias cast to fp32, an
    fp32 output. That is what the fused op computes when its output dtype is fp32, whatever the run-time
    input dtype. The CPU runs it in the input's dtype, and other norms have no documented policy: those
    stay as they are. Sets the tail's output dtype; False when not proven."""
    if fusion != "layer_norm" or spelling != "aten.layer_norm" or tail.last is not anchor or tail.mid_dtype is not None:
        return False
    if autocast_on != {"cuda"} or val(x) is None or val(x).device.type != "cuda":
        return False
    tail.out_dtype = torch.float32
    return True


def apply_norm(gm, ctx, fusion: str, x, tail: Tail, eps, spelling: str, anchor: fx.Node) -> int:
    """Check the policy and preconditions for one matched norm, then replace it and report (both norm passes)."""
    if isinstance(eps, fx.Node) and ctx.config.remainder != "eager":
        ctx.graph_report.add_near_miss(fusion, anchor, RUNTIME_EPS)
        return 0
    from flashfuse.passes.eltwise_chain import autocast_state
    # autocast on at the norm (a region with enabled=False, as OLMo writes its statistics, is off)
    autocast_on = set(autocast_state(gm, anchor))
    if autocast_on and not _cuda_layer_norm_in_fp32(autocast_on, fusion, spelling, anchor, x, tail):
        ctx.graph_report.add_near_miss(fusion, anchor, AUTOCAST_NORM_NOTE)
        return 0
    x = strip_upcast(x)
    n = math.prod(tail.features) if tail.features else None
    why = check_size(x, n)
    if why is not None:
        ctx.graph_report.add_near_miss(fusion, anchor, why)
        return 0
    ok, reason = choose(ctx, fusion, n or val(x).shape[-1], needs_grad(x, tail.weight, tail.bias),
                        producer_inductor_fuses(x))
    if not ok:
        ctx.graph_report.add_near_miss(fusion, anchor, reason)
        return 0
    text = describe(fusion, x, tail, eps, spelling)
    if ctx.config.remainder != "eager":  # say why flashfuse's kernel and not Inductor's
        text += f" [{reason}]"
    if tail.features:
        _replace_flattened(gm, fusion, x, tail, eps)
    else:
        replace_norm(gm, fusion, x, tail, eps)
    ctx.graph_report.add_match(fusion, anchor, text, policy=reason,
                               eps=eps if not isinstance(eps, fx.Node) else "run-time",
                               weight=tail.weight is not None, bias=tail.bias is not None)
    if tail.note:
        ctx.graph_report.add_near_miss(fusion, anchor, tail.note)
    return 1
