"""Entry points of the generated Triton attention kernels: module generation and caching, autotuning,
launches. Called by `flashfuse::attention` / `flashfuse::attention_backward` (op.py) for CUDA tensors and
for CPU tensors under TRITON_INTERPRET=1.

One generated module per specialization (score_mod text, number of sides and scalars, which sides need
gradients); the source is written to `$FLASHFUSE_CACHE_DIR` (default ~/.cache/flashfuse)/attention/ under
the hash of its text, because @triton.jit needs a real source file, and imported with importlib. Head dim,
dtypes, dropout and precision are constexpr/type specializations that Triton compiles and caches itself.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import sys
import threading
import time
from pathlib import Path

import torch
import triton

from flashfuse.kernels.attention import codegen, dropout, triton_common
from flashfuse.kernels.attention.op import empty_bnhd
from flashfuse.kernels.launch import FixedLaunch, autotune, compile_at_once, since, submit, wait_for_builds
from flashfuse.kernels.launch import launcher as _launcher
from flashfuse.log import logger

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOCK = threading.Lock()
_MODULES: dict = {}
_TUNED: dict = {}


def cache_dir() -> Path:
    root = os.environ.get("FLASHFUSE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "flashfuse")
    path = Path(root) / "attention"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_module(score_mod: str, n_sides: int, n_scalars: int, side_grads: tuple = (), side_layout: tuple = ()):
    """The generated module of one specialization (generated, written and imported once).
    side_layout: per side, whether it broadcasts over queries and over keys (see `side_layout`)."""
    side_grads = tuple(bool(g) for g in side_grads) or (False,) * n_sides
    side_layout = tuple(side_layout) or ((False, False),) * n_sides
    # the side-prefetch switch changes the generated source (codegen.side_loads)
    key = (score_mod, n_sides, n_scalars, side_grads, side_layout, codegen.side_prefetch_on())
    mod = _MODULES.get(key)
    if mod is not None:
        return mod
    with _LOCK:
        mod = _MODULES.get(key)
        if mod is not None:
            return mod
        src = codegen.generate_source(score_mod, n_sides, n_scalars, side_grads, side_layout)
        digest = hashlib.sha256(src.encode()).hexdigest()[:24]
        name = f"flashfuse_attn_{digest}"
        path = cache_dir() / f"{name}.py"
        if not path.exists() or path.read_text() != src:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(src)
            os.replace(tmp, path)  # atomic: concurrent processes never import a half-written file
        mod = sys.modules.get(name)
        if mod is None:
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        _MODULES[key] = mod
        return mod


# ---- configurations ----
# (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M is the query tile, BLOCK_N the key tile.
# Chosen from benchmarks/attention_tune.py on an H100 (bf16; results/attention_tune.json): the first entry
# is also the fixed choice under FLASHFUSE_ATTN_AUTOTUNE=0. The last d = 64 entries of the forward and dK/dV
# lists were added from sm_90 builds on a CPU machine (benchmarks/sass_counts.py, docs/perf-notes.md
# "Session 5"), not yet timed: the forward that saves dropout bits spills at 128x64 and not at 128x32; the
# dK/dV kernel spills at both tuned tiles and not at 32x128 with 8 warps (no dropout). The d = 128 backward
# lists were re-tuned in session 19 (H100, d128 n1024 causal, results/session19/s19a/attention_tune_d128_causal
# .json; the tuning script had timed one plan over and over before): dK/dV at 32x64, 4 warps, 2 stages took
# 0.809 ms of the backward against 2.160 at the old first entry 16x128 (which spills). d = 64's 32x64 with 2
# stages: causal n2048's dK/dV in 378 us against the list's best 409 (s19a/row_stats_stages2.jsonl). dQ at
# 64x32 w4 s3 (s19c): d64 n1024 causal p 0.1's backward 1.242 ms against 1.314 at the old first entry 128x32;
# d128 causal 0.705 ms, the best of seven.
_FWD_CONFIGS = {
    64: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3)],
    128: [(128, 64, 8, 3), (64, 64, 4, 3)],
    256: [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
}
_DKDV_CONFIGS = {
    64: [(32, 64, 4, 3), (64, 64, 4, 3), (32, 128, 8, 3), (32, 64, 4, 2)],
    128: [(32, 64, 4, 2), (64, 64, 4, 2), (64, 128, 8, 3)],
    256: [(32, 64, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
}
# the dK/dV kernel that also adds dQ by atomics (DQ_ATOMIC): 128-key tiles halve the atomic traffic of 64.
# sm_90 builds (benchmarks/sass_counts.py): 16x128 with 8 warps is the only d64 tile that does not spill.
_FUSED_CONFIGS = {
    64: [(16, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 2)],
    128: [(16, 128, 8, 2), (32, 128, 8, 2), (16, 64, 4, 3)],
    256: [(16, 64, 4, 2), (32, 64, 4, 2)],
}
_DQ_CONFIGS = {
    64: [(64, 32, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
    128: [(64, 32, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)],
    256: [(64, 32, 4, 2), (64, 64, 8, 2), (32, 32, 4, 2)],
}
INTERPRET_BLOCK = 16


def _quiet():
    """The interpreter runs the kernels in numpy, which warns on the -inf/NaN arithmetic of masked rows
    (exp2(-inf), 0/0 for fully masked rows); that arithmetic is intended."""
    if not INTERPRET:
        return contextlib.nullcontext()
    import numpy as np
    return np.errstate(all="ignore")


def _dclass(block_d: int) -> int:
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


_TABLES = {"attn_fwd": _FWD_CONFIGS, "attn_bwd_dkdv": _DKDV_CONFIGS, "attn_bwd_dq": _DQ_CONFIGS,
           "attn_bwd_fused": _FUSED_CONFIGS}


def forced_config_env(table_name: str) -> str:
    """The variable that fixes a kernel's configuration ("bm,bn,warps,stages"): FLASHFUSE_ATTN_CFG_FWD,
    _BWD_DKDV, _BWD_DQ, _BWD_FUSED. Read when a launch plan is built: a process that changes it must also
    empty `_PLANS` (benchmarks/attention_tune.py does)."""
    return f"FLASHFUSE_ATTN_CFG_{table_name[len('attn_'):].upper()}"


def _kernel(mod, name: str, block_d: int, variant: str = ""):
    """The kernel, autotuned on GPUs (keyed on the sequence lengths), fixed 16x16 tiles in the interpreter.
    `variant` "attn_bwd_fused": the dK/dV kernel with its own configs, its dQ accumulator zeroed between the
    autotuner's trial runs."""
    fn = getattr(mod, name)
    if INTERPRET:
        return fn, {"BLOCK_M": INTERPRET_BLOCK, "BLOCK_N": INTERPRET_BLOCK}
    table_name = variant or name
    forced = os.environ.get(forced_config_env(table_name))  # "bm,bn,warps,stages"
    if forced:  # a fixed configuration (benchmarks/attention_tune.py)
        bm, bn, w, s = (int(x) for x in forced.split(","))
        return fn, {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
    if os.environ.get("FLASHFUSE_ATTN_AUTOTUNE", "1") == "0":  # first config only (fast test runs)
        bm, bn, w, s = _TABLES[table_name][_dclass(block_d)][0]
        return fn, {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}
    key = (id(mod), table_name, _dclass(block_d))
    tuned = _TUNED.get(key)
    if tuned is None:
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                   for bm, bn, w, s in _TABLES[table_name][_dclass(block_d)]]
        # the trial runs add into DQacc: the autotuner zeroes it after them (the preprocess zeroes it per call)
        reset = ["DQacc"] if variant == "attn_bwd_fused" else None
        tuned = autotune(fn, configs, ["Nq", "Nk", "D", "DV", "DROPOUT"], reset_to_zero=reset)
        _TUNED[key] = tuned
    return tuned, {}


# ---- argument plumbing ----

def _side_strides(sides, shape) -> list[tuple]:
    """The four broadcast strides (0 on size-1 dims) of each side, which the kernels take after its pointer:
    sides are never expanded in memory."""
    out = []
    for s in sides:
        if s.dim() < 4:
            s = s.reshape((1,) * (4 - s.dim()) + tuple(s.shape))
        if s.dim() != 4:
            raise ValueError(f"flashfuse attention: side tensor of shape {tuple(s.shape)} is not 4-D")
        for n, full in zip(s.shape, shape):
            if n not in (1, full):
                raise ValueError(f"flashfuse attention: side of shape {tuple(s.shape)} does not broadcast to {shape}")
        out.append(tuple(0 if n == 1 else st for n, st in zip(s.shape, s.stride())))
    return out


def side_layout(sides) -> tuple:
    """(broadcast over queries, broadcast over keys) of each side: part of the kernel specialization."""
    out = []
    for s in sides:
        shape4 = (1,) * (4 - s.dim()) + tuple(s.shape)
        out.append((shape4[2] == 1, shape4[3] == 1))
    return tuple(out)


# The helpers below run on every call: plain integer math and small caches keep the host time per launch
# low (a training step is host-bound when each of its attention calls costs tens of microseconds).

def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block_d(d: int) -> int:
    return max(16, 1 << (d - 1).bit_length())


# The order in which the forward, dK/dV and dQ programs of a causal triangle start (triton_common.block_order):
# groups of G heads block by block, heaviest blocks first; 0 each head's blocks in turn, as the grid reads.
# Other masks keep the grid's order: their programs carry equal work, and grouping heads only spreads L2 over
# more heads' K/V (non-causal n 8192 lost 4-10 %, docs/perf-notes.md "Session 12").
GROUP_HEADS = int(os.environ.get("FLASHFUSE_ATTN_GROUP_HEADS", "16"))


def _group_heads(score_mod: str) -> int:
    return GROUP_HEADS if codegen.triangular(score_mod) else 0


@functools.lru_cache(maxsize=256)
def _meta(dtype, d: int, dv: int, dropout: int, precision: str) -> dict:
    dot_prec = "ieee" if (dtype == torch.float32 and precision == "ieee") else "tf32"
    fast = (not INTERPRET) and dtype in (torch.float16, torch.bfloat16)
    return dict(D=d, DV=dv, BLOCK_D=_block_d(d), BLOCK_DV=_block_d(dv), DOT_PREC=dot_prec, DROPOUT=dropout,
                FAST_MATH=fast)


# the kernels' DROPOUT constexpr
DROPOUT_OFF, DROPOUT_DRAW, DROPOUT_DRAW_AND_SAVE, DROPOUT_FROM_SAVED = 0, 1, 2, 3


def _common_meta(q, v, dropout_p, rng, precision, bits_mode=DROPOUT_DRAW):
    """`bits_mode`: DRAW_AND_SAVE in a forward given keep bits to fill, FROM_SAVED in a backward given them."""
    mode = bits_mode if dropout_p > 0 and rng is not None else DROPOUT_OFF
    return _meta(q.dtype, q.shape[-1], v.shape[-1], mode, precision)


@functools.lru_cache(maxsize=64)
def _dropout_args(p: float) -> tuple:
    """(keep threshold, rescale factor) of the kernels' 16-bit dropout draws (dropout.py)."""
    return dropout.keep_threshold(p), dropout.keep_scale(p)


def _check_bits(bits, q, k):
    want = dropout.bits_shape(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if bits.dtype != torch.uint8 or tuple(bits.shape) != want or not bits.is_contiguous():
        raise ValueError(f"flashfuse attention: dropout bits must be contiguous uint8 of shape {want}, got "
                         f"{bits.dtype} {tuple(bits.shape)}")


def _check(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("flashfuse attention expects 4-D q, k, v")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"flashfuse attention: Hq={q.shape[1]} is not a multiple of Hkv={k.shape[1]}")
    if q.shape[-1] > 256 or v.shape[-1] > 256:
        raise ValueError("flashfuse attention: head dims above 256 are not supported")


# ---- per-shape launch plans ----
# A training step calls each attention op with the same shapes, layouts and arguments step after step.
# Everything derived from those (module, kernels, configs, strides, grids, constexprs) is worked out once per
# plan key; a call then costs the key, the output allocations and the launches (launch.FixedLaunch). In
# the GPT-2 step, the forward spent 138 µs and the backward 349 µs of host time per call before plans
# (benchmarks/step_timing.py, H100 host).
_PLANS: dict = {}
_MAX_PLANS = 256


def _tkey(t):
    """What a plan depends on in a tensor argument: sizes, strides, dtype, device, 16-byte alignment."""
    return (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15 == 0)


def _plan(key, build):
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = build()
    return plan


def _interleave(tensors, strides):
    """[t0, *strides0, t1, *strides1, ...]: the sides' launch arguments (pointer, then `_side_strides`)."""
    out = []
    for t, st in zip(tensors, strides):
        out.append(t)
        out.extend(st)
    return out


def attention_forward(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, flag=None, flag_want=-1,
                      into=None, bits=None, empty_rows_zero=False, warm_backward_too=False):
    """out and the row stats (B, H, 2, Nq) fp32 the backward reads (row max and log2 of the row sum,
    triton_templates.py). With `flag` (mask_check.py), the kernel runs only if flag[0] == `flag_want`; `into`
    = (out, stats) written in place, so two variants launched together share their outputs. `empty_rows_zero`:
    rows with nothing kept (log2 of the sum -inf) give 0, not NaN or the uniform average (the user zeroed the masked
    probabilities after the softmax). `bits`: a
    contiguous uint8 tensor of `dropout.bits_shape` that receives the keep flags of the dropout (the
    backward then reads them instead of drawing again); bytes of key blocks the mask skips stay unwritten.
    `warm_backward_too`: a new plan (the first call of these shapes) also starts the backward's builds
    (`warm_backward`)."""
    key = _forward_key(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, flag, flag_want, into, bits,
                       empty_rows_zero)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(key, lambda: _ForwardPlan(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision,
                                               flag_want, into, bits, empty_rows_zero))
        t = time.perf_counter()
        waited = wait_for_builds_ahead(backward=False)
        out, stats = plan(q, k, v, sides, rng, flag, into, bits)
        logger.info("attention forward: a new plan's first call at t=%.1f s: waited %.2f s for the builds ahead, "
                    "first launch (builds, autotuning) %.2f s", since(t), waited, time.perf_counter() - t - waited)
        if warm_backward_too and flag is None and into is None and ("bwd", key) not in _AHEAD:
            warm_backward(out, q, k, v, stats, sides, scalars, score_mod, dropout_p, rng, precision, bits)
        return out, stats
    return plan(q, k, v, sides, rng, flag, into, bits)


def _forward_key(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, flag, flag_want, into, bits,
                 empty_rows_zero) -> tuple:
    return ("fwd", score_mod, tuple(scalars), dropout_p, precision, flag_want, empty_rows_zero,
            None if rng is None else _tkey(rng), None if flag is None else _tkey(flag),
            None if into is None else (_tkey(into[0]), _tkey(into[1])), None if bits is None else _tkey(bits),
            _tkey(q), _tkey(k), _tkey(v), *[_tkey(s) for s in sides])


class _ForwardPlan:
    def __init__(self, q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, flag_want, into, bits,
                 empty_rows_zero=False):
        _check(q, k, v)
        bsz, hq, nq, _ = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        self.out_shape, self.stats_shape = (bsz, hq, nq, v.shape[-1]), (bsz, hq, 2, nq)
        out = into[0] if into is not None else empty_bnhd(self.out_shape, q)
        # checked once per plan: the plan key holds `into`'s shapes and strides
        if into is not None and (tuple(into[1].shape) != self.stats_shape or not into[1].is_contiguous()):
            raise ValueError(f"flashfuse attention: `into` row stats must be contiguous {self.stats_shape}, "
                             f"got {tuple(into[1].shape)}")
        self.empty = out.numel() == 0
        # no keys at all: eager's softmax over an empty dim is empty and P.V an empty sum, zeros (a row whose
        # keys are all masked is NaN instead, which is what the kernel gives when its key loop never runs)
        self.no_keys = nk == 0
        if self.empty or self.no_keys:
            return
        # a huge fill that leaves no row empty at these lengths runs as -inf (skipped blocks, folded)
        score_mod = codegen.fills_as_masks(score_mod, nq, nk)
        mod = load_module(score_mod, len(sides), len(scalars), (), side_layout(sides))
        if bits is not None:
            _check_bits(bits, q, k)
        meta = _common_meta(q, v, dropout_p, rng, precision,
                            DROPOUT_DRAW if bits is None else DROPOUT_DRAW_AND_SAVE)
        kernel, blocks = _kernel(mod, "attn_fwd", meta["BLOCK_D"])
        self.dropout = meta["DROPOUT"]
        self.strides = (*q.stride(), *k.stride(), *v.stride(), *out.stride())
        self.side_strides = _side_strides(sides, (bsz, hq, nq, nk))
        self.tail = (*[float(x) for x in scalars], hq, nq, nk, hq // hkv, *_dropout_args(dropout_p))
        self.launch = FixedLaunch(kernel, lambda m: (_cdiv(nq, m["BLOCK_M"]), bsz * hq),
                                  {**meta, **blocks, "FLAG_WANT": flag_want, "EMPTY_ROWS_ZERO": empty_rows_zero,
                                   "GROUP_HEADS": _group_heads(score_mod)})

    def _args(self, q, k, v, sides, rng, flag, bits, out, stats) -> tuple:
        return (q, k, v, out, stats, rng if self.dropout else stats, bits if bits is not None else stats,
                flag if flag is not None else stats, *self.strides, *_interleave(sides, self.side_strides), *self.tail)

    def _outputs(self, q):
        return empty_bnhd(self.out_shape, q), torch.empty(self.stats_shape, dtype=torch.float32, device=q.device)

    def standin_jobs(self, q, k, v, sides, rng, bits) -> tuple:
        """(compile jobs of the first call, out, row stats) for a call with tensors laid out like these, the
        outputs fresh stand-ins: what `build_ahead` compiles before the first call."""
        out, stats = self._outputs(q)
        if self.empty or self.no_keys:
            return [], out, stats
        f = self.launch
        return [(f.cached.kernel, f.grid, self._args(q, k, v, sides, rng, None, bits, out, stats), f.constexprs)], \
            out, stats

    def __call__(self, q, k, v, sides, rng, flag, into, bits):
        out, stats = into if into is not None else self._outputs(q)
        if self.empty:
            return out, stats
        if self.no_keys:  # the row stats only feed the backward, which returns zeros without keys
            return out.zero_(), stats.zero_()
        with _quiet():
            self.launch(self._args(q, k, v, sides, rng, flag, bits, out, stats))
        return out, stats


_PRE_BLOCK = INTERPRET_BLOCK if INTERPRET else 64  # query rows per program of the backward preprocess


def _preprocess_launch(out, zero_dq_d: int = 0):
    """(grid, constexprs) of `attn_bwd_preprocess` for an output of out's shape; `zero_dq_d`: the head dim
    of a dQ accumulator it also zeroes (0: none)."""
    bsz, hq, nq, dv = out.shape
    consts = dict(DV=dv, BLOCK_M=_PRE_BLOCK, BLOCK_DV=_block_d(dv))
    if zero_dq_d:
        consts.update(D=zero_dq_d, BLOCK_D=_block_d(zero_dq_d), ZERO_DQ=True)
    return (_cdiv(nq, _PRE_BLOCK), bsz * hq), consts


def _empty_delta(stats):
    bsz, hq, _, nq = stats.shape
    return torch.empty((bsz, hq, nq), dtype=torch.float32, device=stats.device)


def backward_preprocess(out, dout, stats):
    """Delta = rowsum(dO ∘ O) per query row (B, H, Nq) fp32, the first step of the backward."""
    delta = _empty_delta(stats)
    grid, consts = _preprocess_launch(out)
    _launcher(triton_common.attn_bwd_preprocess)(
        grid, (out, dout, stats, delta, delta, *out.stride(), *dout.stride(), out.shape[1], out.shape[2]), consts)
    return delta


# "split" (default): a dK/dV kernel and a dQ kernel. "fused" (opt-in until it is timed on the GPU; session 7
# could not get a device): one kernel computes dK, dV and dQ (dQ added by fp32 atomics, as FlashAttention-2
# does), so the scores and the dropout are computed once instead of twice. The fused
# kernel is not used where it cannot be: side gradients (stored by the dQ kernel), two variants sharing
# outputs (mask_check), torch.use_deterministic_algorithms (atomics add in any order).
BACKWARD_MODE = os.environ.get("FLASHFUSE_ATTN_BWD", "split")


def _use_fused_backward(side_grads, flag_want, into) -> bool:
    if BACKWARD_MODE not in ("fused", "split"):
        raise ValueError(f"FLASHFUSE_ATTN_BWD must be 'fused' or 'split', not {BACKWARD_MODE!r}")
    return (BACKWARD_MODE == "fused" and not any(side_grads) and flag_want < 0 and into is None
            and not torch.are_deterministic_algorithms_enabled())


# ---- kernels compiled ahead ----
# A training step's first call of each attention specialization compiled the forward's configurations, autotuned
# them, and its first backward did the same for dK/dV's and then dQ's: rounds of ~2-4 s of builds (sm_90, GPT-2's
# case) on the critical path of the warm-up. Two things move them off it, through launch.submit's background
# builder:
# - at compile time (`build_ahead`, called once the passes have rewritten a graph), the forward's and, in a
#   training graph, the backward's builds for tensors laid out like the graph's example values; they overlap
#   Inductor's compile of the rest of the graph;
# - at a forward plan's first call, when a backward is expected and was not built ahead (`warm_backward`), the
#   backward's builds; they overlap the rest of the forward and Inductor's compile of the backward graph.
# A plan's first call waits for the builds queued before it: a forward's for the forwards', a backward's for all.
_AHEAD: set = set()  # plan keys ("fwd", ...) and ("bwd", forward plan key) whose builds were queued at compile time


def wait_for_builds_ahead(backward: bool = True) -> float:
    """Wait for the builds queued so far (`backward` False: up to the last forward's), so that a first call does
    not compile the same kernels again. Returns the seconds waited."""
    return wait_for_builds(None if backward else "forward")


def forward_standin_jobs(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, bits,
                         empty_rows_zero=False) -> tuple:
    """(compile jobs, out, row stats) of the first call of a forward with tensors laid out like these."""
    plan = _ForwardPlan(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, -1, None, bits,
                        empty_rows_zero)
    return plan.standin_jobs(q, k, v, sides, rng, bits)


def backward_standin_jobs(out, q, k, v, stats, sides, scalars, score_mod, dropout_p, rng, precision, bits) -> list:
    """The compile jobs (compile_at_once) of the backward of a forward call that returned `out`, `stats`."""
    side_grads = (False,) * len(sides)
    plan = _BackwardPlan(out, q, k, v, out, stats, sides, scalars, score_mod, dropout_p, rng, side_grads, precision,
                         -1, None, bits, _use_fused_backward(side_grads, -1, None))
    return [] if plan.empty else plan.standin_jobs(out, q, k, v, stats, sides, rng, bits)


def ahead_jobs(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, bits, empty_rows_zero,
               backward: bool) -> tuple:
    """(forward jobs, backward jobs) that `build_ahead` queues for stand-ins q, k, v, ...: what the first forward
    call with tensors laid out like these would compile, and its backward's (empty when `backward` is off)."""
    fwd, out, stats = forward_standin_jobs(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, bits,
                                           empty_rows_zero)
    bwd = backward_standin_jobs(out, q, k, v, stats, sides, scalars, score_mod, dropout_p, rng, precision, bits) \
        if backward and fwd else []
    return fwd, bwd


def build_ahead(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, bits=None, empty_rows_zero=False,
                backward=False) -> bool:
    """At compile time: queue the builds of the forward (and, with `backward`, of its backward) that a first call
    with tensors laid out like the stand-ins q, k, v, ... (sides after mask recognition, op.build_ahead) will
    launch. Once per plan key; not under the interpreter, nor on CPU tensors. Returns whether builds were queued."""
    key = _forward_key(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, None, -1, None, bits,
                       empty_rows_zero)
    if INTERPRET or not q.is_cuda or key in _AHEAD or key in _PLANS:
        return False
    try:
        fwd, bwd = ahead_jobs(q, k, v, sides, scalars, score_mod, dropout_p, rng, precision, bits, empty_rows_zero,
                              backward)
    except Exception as exc:  # noqa: BLE001 (a speed-up must never fail the compile: the first calls build as before)
        logger.info("attention builds ahead skipped: %s: %s", type(exc).__name__, exc)
        return False
    if not fwd:
        return False
    _AHEAD.add(key)
    submit("forward", fwd, q.device, "attention forward, compile time")
    if bwd:
        _AHEAD.add(("bwd", key))
        submit("backward", bwd, q.device, "attention backward, compile time")
    return True


def warm_backward(out, q, k, v, stats, sides, scalars, score_mod, dropout_p, rng, precision, bits) -> bool:
    """Queue the builds of the backward of this forward call (same specialization: score_mod after mask
    recognition, the sides, dropout, saved bits). The sides are taken to need no gradient (a learned bias's
    backward is another module: its build then happens at the backward as before). Returns whether builds were
    queued (not under the interpreter, nor on CPU tensors)."""
    if INTERPRET or not q.is_cuda:
        return False
    try:
        jobs = backward_standin_jobs(out, q, k, v, stats, sides, scalars, score_mod, dropout_p, rng, precision, bits)
    except Exception as exc:  # noqa: BLE001 (a speed-up must never fail the forward: the backward builds as before)
        logger.info("attention backward builds ahead skipped: %s: %s", type(exc).__name__, exc)
        return False
    if not jobs:
        return False
    submit("backward", jobs, q.device, "attention backward, first forward call")
    return True


def attention_backward(dout, q, k, v, out, stats, sides, scalars, score_mod, dropout_p, rng, side_needs_grad,
                       precision, flag=None, flag_want=-1, into=None, bits=None):
    """dq, dk, dv and the gradient of each side (None where `side_needs_grad` is off). `flag`, `flag_want`
    as in attention_forward; `into` = (dq, dk, dv, delta) written in place / read (`backward_preprocess`),
    so two variants launched together share them. `bits`: the keep flags a forward saved (else the
    dropout is drawn again from `rng`)."""
    side_grads = tuple(bool(g) for g in side_needs_grad)
    fused = _use_fused_backward(side_grads, flag_want, into)
    key = ("bwd", fused, score_mod, tuple(scalars), dropout_p, precision, flag_want, side_grads,
           None if rng is None else _tkey(rng), None if flag is None else _tkey(flag),
           None if into is None else tuple(_tkey(t) for t in into), None if bits is None else _tkey(bits),
           _tkey(dout), _tkey(q), _tkey(k), _tkey(v), _tkey(out), _tkey(stats), *[_tkey(s) for s in sides])
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(key, lambda: _BackwardPlan(dout, q, k, v, out, stats, sides, scalars, score_mod, dropout_p, rng,
                                                side_grads, precision, flag_want, into, bits, fused))
    with _quiet():
        return plan(dout, q, k, v, out, stats, sides, rng, flag, into, bits)


class _BackwardPlan:
    def __init__(self, dout, q, k, v, out, stats, sides, scalars, score_mod, dropout_p, rng, side_grads,
                 precision, flag_want, into, bits, fused):
        _check(q, k, v)
        bsz, hq, nq, _ = q.shape
        self.fused = fused
        self.dq_acc_shape = (bsz, hq, nq, q.shape[-1])
        hkv, nk = k.shape[1], k.shape[2]
        self.side_grads = side_grads
        self.empty = q.numel() == 0 or k.numel() == 0
        if self.empty:
            return
        if tuple(stats.shape) != (bsz, hq, 2, nq) or stats.dtype != torch.float32 or not stats.is_contiguous():
            raise ValueError(f"flashfuse attention backward: row stats must be a contiguous fp32 (B, H, 2, Nq) = "
                             f"{(bsz, hq, 2, nq)} tensor from the forward, got {tuple(stats.shape)} {stats.dtype}")
        dq, dk, dv = into[:3] if into is not None else (empty_bnhd(t.shape, t) for t in (q, k, v))
        score_mod = codegen.fills_as_masks(score_mod, nq, nk)
        mod = load_module(score_mod, len(sides), len(scalars), side_grads, side_layout(sides))
        if bits is not None:
            _check_bits(bits, q, k)
        meta = _common_meta(q, v, dropout_p, rng, precision, DROPOUT_DRAW if bits is None else DROPOUT_FROM_SAVED)
        self.dropout = meta["DROPOUT"]
        self.side_strides = _side_strides(sides, (bsz, hq, nq, nk))
        self.dside_shape = (bsz, hq, nq, nk)
        scalar_args = tuple(float(x) for x in scalars)
        common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
        self.dkdv_strides = (*common, *dk.stride(), *dv.stride())
        self.dq_strides = (*common, *dq.stride())
        self.dkdv_tail = (*scalar_args, hq, hkv, nq, nk, hq // hkv, *_dropout_args(dropout_p))
        self.dq_scalars = scalar_args
        self.dq_tail = (hq, nq, nk, hq // hkv, *_dropout_args(dropout_p))
        consts = {**meta, "FLAG_WANT": flag_want, "GROUP_HEADS": _group_heads(score_mod)}
        kernel, blocks = _kernel(mod, "attn_bwd_dkdv", meta["BLOCK_D"], "attn_bwd_fused" if fused else "")
        self.dkdv = FixedLaunch(kernel, lambda m: (_cdiv(nk, m["BLOCK_N"]), bsz * hkv),
                                {**consts, **blocks, "DQ_ATOMIC": fused})
        if not fused:
            kernel, blocks = _kernel(mod, "attn_bwd_dq", meta["BLOCK_D"])
            self.dq = FixedLaunch(kernel, lambda m: (_cdiv(nq, m["BLOCK_M"]), bsz * hq), {**consts, **blocks})
        self.pre = FixedLaunch(triton_common.attn_bwd_preprocess,
                               *_preprocess_launch(out, q.shape[-1] if fused else 0))
        self.pre_tail = (*out.stride(), *dout.stride(), hq, nq)
        self.compiled = INTERPRET  # the interpreter compiles nothing

    def _args(self, dout, q, k, v, stats, sides, rng, flag, bits, dq, dk, dv, delta, dq_acc, dside_full):
        """The launch arguments of the dK/dV kernel and of the dQ kernel (None when fused)."""
        flag_arg = flag if flag is not None else stats
        rng_arg = rng if self.dropout else stats
        bits_arg = bits.view(torch.int32) if bits is not None else stats  # read as words (triton_common.saved_keep)
        side_args = _interleave(sides, self.side_strides)
        dkdv_args = (q, k, v, dout, stats, delta, dk, dv, rng_arg, bits_arg, flag_arg, dq_acc, *self.dkdv_strides,
                     *side_args, *self.dkdv_tail)
        if self.fused:
            return dkdv_args, None
        return dkdv_args, (q, k, v, dout, stats, delta, dq, rng_arg, bits_arg, flag_arg, *self.dq_strides, *side_args,
                           *self.dq_scalars, *[d for d in dside_full if d is not None], *self.dq_tail)

    def compile_jobs(self, dkdv_args, dq_args) -> list:
        """(kernel, grid, args, constexprs) of each kernel a first call launches through its autotuner."""
        jobs = [(self.dkdv, dkdv_args)] + ([] if self.fused else [(self.dq, dq_args)])
        return [(f.cached.kernel, f.grid, args, f.constexprs) for f, args in jobs]

    def standin_jobs(self, out, q, k, v, stats, sides, rng, bits) -> list:
        """compile_jobs for the backward of a forward call, before any backward runs: dO, dQ, dK, dV stand in as
        tensors of the forward's layout (empty_bnhd), delta as a fresh (B, H, Nq) fp32 tensor."""
        dq, dk, dv = (empty_bnhd(t.shape, t) for t in (q, k, v))
        dq_acc = torch.empty(self.dq_acc_shape, dtype=torch.float32, device=q.device) if self.fused else stats
        dside_full = [torch.empty(self.dside_shape, dtype=torch.float32, device=q.device) if g else None
                      for g in self.side_grads]
        return self.compile_jobs(*self._args(out, q, k, v, stats, sides, rng, None, bits, dq, dk, dv,
                                             _empty_delta(stats), dq_acc, dside_full))

    def __call__(self, dout, q, k, v, out, stats, sides, rng, flag, into, bits):
        side_grads = self.side_grads
        if into is not None:
            dq, dk, dv, delta = into
        else:
            dq, dk, dv = empty_bnhd(q.shape, q), empty_bnhd(k.shape, k), empty_bnhd(v.shape, v)
            delta = None
        if self.empty:
            return dq.zero_(), dk.zero_(), dv.zero_(), [torch.zeros_like(s) if g else None
                                                         for s, g in zip(sides, side_grads)]
        # the fused kernel's dQ, summed in fp32 (zeroed by the preprocess) and cast into dq at the end
        dq_acc = torch.empty(self.dq_acc_shape, dtype=torch.float32, device=q.device) if self.fused else stats
        if delta is None:
            delta = _empty_delta(stats)
            self.pre((out, dout, stats, delta, dq_acc, *self.pre_tail))
        # gradient of each side that needs one, per element of (B, Hq, Nq, Nk), reduced below
        dside_full = [torch.zeros(self.dside_shape, dtype=torch.float32, device=q.device) if g else None
                      for g in side_grads]
        dkdv_args, dq_args = self._args(dout, q, k, v, stats, sides, rng, flag, bits, dq, dk, dv, delta, dq_acc,
                                        dside_full)
        first = not self.compiled
        if first:  # dQ's configurations compile together with dK/dV's, not after them
            t0 = time.perf_counter()
            wait_for_builds_ahead()
            t1 = time.perf_counter()
            compile_at_once(self.compile_jobs(dkdv_args, dq_args))
            t2 = time.perf_counter()
            self.compiled = True
        self.dkdv(dkdv_args)
        if self.fused:
            return dq.copy_(dq_acc), dk, dv, [None] * len(sides)
        self.dq(dq_args)
        if first:
            logger.info("attention backward: a new plan's first call at t=%.1f s: waited %.2f s for the builds ahead, "
                        "compiled %.2f s, first launches (autotuning) %.2f s", since(t0), t1 - t0, t2 - t1,
                        time.perf_counter() - t2)
        if not any(side_grads):
            return dq, dk, dv, [None] * len(sides)
        dsides = []
        for s, full in zip(sides, dside_full):
            if full is None:
                dsides.append(None)
                continue
            shape4 = (1,) * (4 - s.dim()) + tuple(s.shape)
            dims = [d for d, n in enumerate(shape4) if n == 1 and full.shape[d] != 1]
            red = full.sum(dim=dims, keepdim=True) if dims else full
            dsides.append(red.reshape(s.shape).to(s.dtype))
        return dq, dk, dv, dsides


def dropout_mask(rng: torch.Tensor, B: int, H: int, Nq: int, Nk: int, p: float, device=None,
                 block: int = 0) -> torch.Tensor:
    """The keep mask (B, H, Nq, Nk) bool that the kernels draw for `rng` = [seed, offset] (same bits,
    whatever the tile size `block`, a multiple of 8)."""
    device = device if device is not None else rng.device
    rng = rng.to(device=device, dtype=torch.int64)
    mask = torch.empty(B, H, Nq, Nk, dtype=torch.int8, device=device)
    blk = block or (16 if INTERPRET else 64)
    if blk % dropout.KEYS_PER_DRAW:
        raise ValueError(f"dropout_mask: block={blk} is not a multiple of {dropout.KEYS_PER_DRAW}")
    triton_common.dropout_mask_kernel[(_cdiv(Nq, blk), _cdiv(Nk, blk), B * H)](
        mask, rng, H, Nq, Nk, dropout.keep_threshold(p), BLOCK_M=blk, BLOCK_N=blk)
    return mask.bool()
