"""Launch a Triton kernel without Triton's per-call argument binding.

`kernel[grid](*args, **constexprs)` binds and re-specializes every argument on every call, and an
`autotune` wrapper adds its own layer: for the attention kernels' 30-60 arguments that is tens of
microseconds of host time per launch on the H100 host (benchmarks/host_time.py), and a training step
launches them four times per layer. A model calls each kernel with the same sizes step after step, so
`CachedLaunch` lets the first call of each specialization go through Triton (compiling and autotuning as
usual), keeps the compiled kernel it returns, and later calls launch that directly.

The cache key holds everything Triton specializes a compiled kernel on: each tensor's dtype and 16-byte
alignment, each integer's exact value (Triton specializes on == 1, divisibility by 16 and the integer
width), the floats and the constexprs. The grid is computed on every call (it may depend on sizes that are
not arguments, such as the batch). Autotune configs must not use pre-hooks (`reset_to_zero`,
`restore_value`): the direct launch does not run them. Under Triton's interpreter, or when anything does not
look as expected, calls take Triton's own path.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time

import torch

from flashfuse.log import logger

_MAX_ENTRIES = 256
_RUNTIME = None


def _runtime():
    """(driver, a function returning Triton's launch hooks), looked up once. Profilers such as proton set
    the hooks; `triton.knobs` is Triton >= 3.4, older versions keep them on CompiledKernel."""
    global _RUNTIME
    if _RUNTIME is None:
        from triton.runtime import driver
        try:
            from triton import knobs
            knobs.runtime.launch_enter_hook  # noqa: B018 (present?)

            def hooks():
                return knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        except (ImportError, AttributeError):
            from triton.compiler.compiler import CompiledKernel

            def hooks():
                return (getattr(CompiledKernel, "launch_enter_hook", None),
                        getattr(CompiledKernel, "launch_exit_hook", None))
        _RUNTIME = (driver, hooks)
    return _RUNTIME


_PLAIN = frozenset({int, float, bool, str, type(None)})


def _non_plain_key(a):
    return (a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, torch.Tensor) else a


def spec_key(args) -> tuple:
    """What Triton would specialize on, for positional launch arguments. Runs on every launch: a class
    test per argument (most are ints) instead of isinstance, 2.5x faster for 40-50 arguments."""
    return tuple([a if a.__class__ in _PLAIN else _non_plain_key(a) for a in args])


class CachedLaunch:
    """`CachedLaunch(kernel)(grid, args, constexprs)` == `kernel[grid](*args, **constexprs)`.

    `kernel` is a JITFunction or a `triton.autotune` wrapper of one; `grid` takes the constexprs
    (including the autotuned config's) and returns the launch grid."""

    def __init__(self, kernel):
        self.kernel = kernel
        # the JITFunction: the kernel itself, or the one under an autotuner (a JITFunction's own `.fn` is
        # the plain Python function, which has no arg_names)
        self.jit = kernel if hasattr(kernel, "arg_names") else getattr(kernel, "fn", kernel)
        self.enabled = (os.environ.get("TRITON_INTERPRET") != "1"
                        and os.environ.get("FLASHFUSE_CACHED_LAUNCH", "1") != "0"
                        and hasattr(self.jit, "arg_names"))
        self.entries: dict = {}
        self.fallback_reason = None if self.enabled else "interpreter, FLASHFUSE_CACHED_LAUNCH=0 or no arg_names"

    def __call__(self, grid, args, constexprs: dict):
        if not self.enabled:
            return self.kernel[grid](*args, **constexprs)
        driver, hooks = _runtime()
        device = driver.active.get_current_device()
        key = (device, spec_key(args), tuple(constexprs.items()))
        entry = self.entries.get(key)
        if entry is not None:
            compiled, chosen, tail = entry
            g = grid(chosen) if callable(grid) else grid
            grid_xyz = (g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1)
            bound = (*args, *tail)
            stream = driver.active.get_current_stream(device)
            enter, leave = hooks()
            meta = compiled.launch_metadata(grid_xyz, stream, *bound)
            compiled.run(*grid_xyz, stream, compiled.function, compiled.packed_metadata, meta, enter, leave, *bound)
            return compiled
        if _PENDING:  # a build ahead of this kernel may be under way: a second build of it would be wasted
            wait_for_builds(kernel=self.kernel)
        if len(getattr(self.kernel, "configs", ())) > 1 and PARALLEL_COMPILE:
            compile_configs_at_once(self.kernel, grid, args, constexprs)
        compiled = self.kernel[grid](*args, **constexprs)  # Triton's own path: compiles, autotunes, launches
        self._remember(key, compiled, args, constexprs)
        return compiled

    def entry(self, args, constexprs: dict):
        """(compiled kernel, chosen constexprs, constexprs in signature order) of this specialization, once a
        call has gone through; None before, or when the direct launch is off."""
        if not self.enabled:
            return None
        driver, _ = _runtime()
        return self.entries.get((driver.active.get_current_device(), spec_key(args), tuple(constexprs.items())))

    def _remember(self, key, compiled, args, constexprs):
        config = getattr(self.kernel, "best_config", None)
        chosen = {**constexprs, **(config.kwargs if config is not None else {})}
        names = self.jit.arg_names
        missing = [n for n in names[len(args):] if n not in chosen]
        if compiled is None or not hasattr(compiled, "packed_metadata") or len(args) > len(names) or missing:
            self.enabled = False  # not the Triton we know: keep Triton's path for good
            self.fallback_reason = (f"compiled={type(compiled).__name__}, {len(args)} args for {len(names)} "
                                    f"parameters, constexprs not given: {missing}")
            return
        tail = tuple(chosen[n] for n in names[len(args):])  # the constexprs, in signature order
        if len(self.entries) >= _MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = (compiled, chosen, tail)


_LAUNCHERS: dict = {}

# An autotuner compiles its configs one after another as it times them. Triton's compiler releases the GIL
# for most of its work: three dK/dV configs (sm_90, dropout) took 6.4 s one by one and 3.8 s in three threads
# on a 2-core machine. FLASHFUSE_PARALLEL_COMPILE=0 turns it off.
PARALLEL_COMPILE = os.environ.get("FLASHFUSE_PARALLEL_COMPILE", "1") != "0"


# Autotuners keep their timings on disk (Triton's cache, keyed on the kernel's source, the GPU target, the
# tuning key and the configs): a later process of the same program skips the autotuning its first calls did
# (GPT-2: ~0.5 s for the forward, ~1.8 s for the backward's kernels, session 20 log), as its builds are
# already skipped by Triton's cache. FLASHFUSE_AUTOTUNE_CACHE=0 times the configs in every process.
AUTOTUNE_CACHE = os.environ.get("FLASHFUSE_AUTOTUNE_CACHE", "1") != "0"


def autotune(fn, configs, key, **kwargs):
    """`triton.autotune(configs=configs, key=key, **kwargs)(fn)`, its timings cached on disk (AUTOTUNE_CACHE)."""
    import triton

    return triton.autotune(configs=configs, key=key, cache_results=AUTOTUNE_CACHE, **kwargs)(fn)


def compile_configs_at_once(tuner, grid, args, constexprs: dict) -> None:
    """Compile every config `tuner` (a triton.autotune wrapper) would time for these arguments, in threads,
    through Triton's AsyncCompileMode (Triton >= 3.4); the autotuner then finds them compiled. Best effort: a
    config that fails here is compiled, and fails, again on the autotuner's own path."""
    workers = min(len(tuner.configs), os.cpu_count() or 1)
    if workers < 2:
        return
    try:
        from concurrent.futures import ThreadPoolExecutor

        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:
        return
    with ThreadPoolExecutor(workers) as pool:
        try:
            with AsyncCompileMode(pool, ignore_errors=True):
                tuner.warmup(*args, grid=grid, **constexprs)
        except Exception:  # noqa: BLE001 (pruning or binding differs in this Triton: its own path compiles)
            pass


def compile_ahead(kernel, grid, args, constexprs: dict) -> None:
    """Compile what the first launch of `kernel` (a JITFunction or an autotuned one) with these arguments would
    compile, without launching it: every config of an autotuner (at once), or the one kernel."""
    if len(getattr(kernel, "configs", ())) > 1:
        if PARALLEL_COMPILE:
            compile_configs_at_once(kernel, grid, args, constexprs)
        return
    kernel.warmup(*args, grid=grid, **constexprs)


def launcher(kernel) -> CachedLaunch:
    """The CachedLaunch of `kernel` (a JITFunction or an autotuned one), one per kernel object."""
    launch = _LAUNCHERS.get(id(kernel))
    if launch is None:
        launch = _LAUNCHERS[id(kernel)] = CachedLaunch(kernel)  # holds `kernel`, so its id stays unique
    return launch


class FixedLaunch:
    """One launch site whose arguments keep one specialization call after call, which the caller
    guarantees with a cache key of its own that covers everything `spec_key` looks at (the attention ops'
    per-shape plans). The first call goes through CachedLaunch (compiling and autotuning as usual); later
    calls skip the key too and go straight to the compiled kernel with the grid of that first call."""

    __slots__ = ("cached", "grid", "constexprs", "direct")

    def __init__(self, kernel, grid, constexprs: dict):
        self.cached = launcher(kernel)
        self.grid = grid
        self.constexprs = constexprs
        self.direct = None

    def __call__(self, args):
        direct = self.direct
        if direct is None:
            self.cached(self.grid, args, self.constexprs)
            entry = self.cached.entry(args, self.constexprs)
            if entry is not None:
                compiled, chosen, tail = entry
                g = self.grid(chosen) if callable(self.grid) else self.grid
                self.direct = (compiled, (g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1), tail)
            return
        compiled, grid_xyz, tail = direct
        driver, hooks = _runtime()
        stream = _current_stream(driver)
        enter, leave = hooks()
        bound = (*args, *tail)
        meta = compiled.launch_metadata(grid_xyz, stream, *bound) if enter is not None else None
        compiled.run(*grid_xyz, stream, compiled.function, compiled.packed_metadata, meta, enter, leave, *bound)


def _current_stream(driver):
    """The current stream of the current device, as Triton's driver gives it, by torch's own C call on CUDA
    (what the driver does, without its two Python layers)."""
    get_raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if get_raw is not None and torch.version.hip is None:
        return get_raw(torch._C._cuda_getDevice())
    return driver.active.get_current_stream(driver.active.get_current_device())


# ---- builds ahead: one background builder ----
# Kernels whose first call can be predicted (the attention ops' at compile time, from the graph's example values:
# passes/build_ahead.py) are compiled by one daemon thread, job list after job list, each list's kernels
# (and their configurations) in parallel; fewer builds at once beside Inductor's own work, and no two threads
# compiling one kernel (Triton caches a build only once it is done). A launch that compiles (CachedLaunch's first
# call of a specialization) first waits for the queued lists holding its kernel. On CUDA the builder then times the
# autotuners (TUNE_AHEAD below). The jobs' stand-in tensors are dropped on the main thread, once their builds are
# done.
_T0 = time.perf_counter()  # the warm-up's log lines say when, from here
_PENDING: list = []  # [kind, done event, jobs] in queue order
_QUEUE = None


def since(t: float | None = None) -> float:
    """Seconds from this module's import to `t` (now by default): the warm-up's log lines."""
    return (time.perf_counter() if t is None else t) - _T0


def compile_at_once(jobs) -> None:
    """Compile each job's (kernel, grid, args, constexprs) configurations (compile_ahead), the jobs in parallel."""
    if len(jobs) == 1:
        compile_ahead(*jobs[0])
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(jobs)) as pool:
        for f in [pool.submit(compile_ahead, *job) for job in jobs]:
            f.result()


# The builder also times the autotuners' configurations, once their builds are done, as their first launch would:
# that launch then finds its pick in the tuner's cache (GPT-2's first calls timed ~0.5 s for the forward and
# ~1.8 s for the backward's kernels on the warm-up's critical path, session 20 log). The GPU is otherwise idle while
# Inductor compiles. FLASHFUSE_TUNE_AHEAD=0 leaves the timing to the first launch.
TUNE_AHEAD = os.environ.get("FLASHFUSE_TUNE_AHEAD", "1") != "0"


def _tunes(device) -> bool:
    return TUNE_AHEAD and device.type == "cuda"


def tune_ahead(jobs) -> int:
    """Time the configurations of each job's autotuner (one after another: timings must not overlap) on its
    stand-in arguments, and launch its pick once, as a first launch does: the stand-in outputs are written (a
    forward's row stats then feed its backward's timings). The stand-ins hold no data a kernel indexes with: the
    sides (masks, their key counts) are the call's own values. Returns how many autotuners were timed."""
    timed = 0
    for kernel, grid, args, constexprs in jobs:
        if len(getattr(kernel, "configs", ())) > 1:
            kernel[grid](*args, **constexprs)
            timed += 1
    return timed


def _builder(queue) -> None:
    while True:
        jobs, device, what, tune, done = queue.get()
        t = time.perf_counter()
        try:
            with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                compile_at_once(jobs)
                built = time.perf_counter()
                timed = tune_ahead(jobs) if tune and _tunes(device) else 0
            logger.info("%s builds ahead: %d kernels in %.2f s%s, done at t=%.1f s", what, len(jobs), built - t,
                        f", {timed} autotuned in {time.perf_counter() - built:.2f} s" if timed else "", since())
        except Exception as exc:  # noqa: BLE001 (best effort: the first call compiles what is missing)
            logger.info("%s builds ahead failed: %s: %s", what, type(exc).__name__, exc)
        finally:
            del jobs  # the main thread holds the stand-ins until it sees `done` (`_sweep`)
            done.set()


def submit(kind: str, jobs: list, device, what: str, tune: bool = True) -> None:
    """Queue `jobs` ([(kernel, grid, args, constexprs)], compile_at_once) for the background builder, which on CUDA
    also times their autotuners unless `tune` is off (tune_ahead). `kind` names them for `wait_for_builds`
    ("forward", "backward"), `what` for the log."""
    global _QUEUE
    if _QUEUE is None:
        import queue
        _QUEUE = queue.SimpleQueue()
        threading.Thread(target=_builder, args=(_QUEUE,), name="flashfuse-builds-ahead", daemon=True).start()
    _sweep()
    done = threading.Event()
    _PENDING.append([kind, done, jobs])
    _QUEUE.put((jobs, device, what, tune, done))


def _sweep() -> None:
    """Forget the builds that are done (their stand-in tensors are freed here, on the main thread)."""
    _PENDING[:] = [e for e in _PENDING if not e[1].is_set()]


def wait_for_builds(kind: str | None = None, kernel=None) -> float:
    """Wait for the queued builds: all of them, those of `kind`, or those that compile `kernel` (the queue builds
    in order: up to the last such list). Returns the seconds waited."""
    _sweep()
    last = 0
    for i, (k, _done, jobs) in enumerate(_PENDING):
        if (kind is None or k == kind) and (kernel is None or any(job[0] is kernel for job in jobs)):
            last = i + 1
    if not last:
        return 0.0
    t = time.perf_counter()
    _PENDING[last - 1][1].wait()
    _sweep()
    return time.perf_counter() - t
