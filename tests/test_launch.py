"""CachedLaunch (kernels/launch.py): after the first launch of a specialization, later calls launch Triton's
compiled kernel directly, with the arguments in the kernel's signature order. A fake Triton stands in for
the GPU here; the real path is exercised by every GPU attention test."""
from types import SimpleNamespace

import pytest
import torch

from flashfuse.kernels import launch


class FakeCompiled:
    packed_metadata = "packed"
    function = "fn"

    def __init__(self):
        self.runs = []

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, gx, gy, gz, stream, function, packed, meta, enter, leave, *args):
        self.runs.append(((gx, gy, gz), stream, args))


class FakeKernel:
    """A JITFunction-like kernel(x_ptr, n, scale, BLOCK, FLAG) whose Triton path records its calls."""
    arg_names = ["x_ptr", "n", "scale", "BLOCK", "FLAG"]

    def __init__(self, best_config=None):
        self.slow_calls = []
        self.compiled = {}
        if best_config is not None:
            self.best_config = best_config

    def __getitem__(self, grid):
        def call(*args, **kw):
            self.slow_calls.append((args, kw))
            key = (launch.spec_key(args), tuple(sorted(kw.items())))
            return self.compiled.setdefault(key, FakeCompiled())
        return call


@pytest.fixture
def fake_runtime(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    driver = SimpleNamespace(active=SimpleNamespace(get_current_device=lambda: 0,
                                                    get_current_stream=lambda d: 1234))
    monkeypatch.setattr(launch, "_RUNTIME", (driver, lambda: (None, None)))


def test_second_call_launches_compiled_kernel_in_signature_order(fake_runtime):
    k = FakeKernel()
    cl = launch.CachedLaunch(k)
    x = torch.zeros(64)
    grid = lambda m: (100 // m["BLOCK"], 3)  # noqa: E731
    c1 = cl(grid, (x, 100, 0.5), {"BLOCK": 32, "FLAG": True})
    assert len(k.slow_calls) == 1 and c1.runs == []
    c2 = cl(grid, (x.clone(), 100, 0.5), {"BLOCK": 32, "FLAG": True})
    assert c2 is c1 and len(k.slow_calls) == 1
    (g, stream, args), = c1.runs
    assert g == (3, 3, 1) and stream == 1234
    assert args[1:] == (100, 0.5, 32, True) and isinstance(args[0], torch.Tensor)


@pytest.mark.parametrize("change", ["int", "dtype", "alignment", "constexpr"])
def test_a_new_specialization_takes_tritons_path(fake_runtime, change):
    k = FakeKernel()
    cl = launch.CachedLaunch(k)
    x = torch.zeros(64)
    cl((1,), (x, 16, 0.5), {"BLOCK": 32, "FLAG": True})
    args, consts = (x, 16, 0.5), {"BLOCK": 32, "FLAG": True}
    if change == "int":
        args = (x, 17, 0.5)  # divisibility by 16 is a Triton specialization
    elif change == "dtype":
        args = (x.half(), 16, 0.5)
    elif change == "alignment":
        args = (x[1:], 16, 0.5)  # 4 bytes off: no longer 16-byte aligned
    else:
        consts = {"BLOCK": 64, "FLAG": True}
    cl((1,), args, consts)
    assert len(k.slow_calls) == 2


def test_autotuned_constexprs_fill_the_signature(fake_runtime):
    k = FakeKernel(best_config=SimpleNamespace(kwargs={"BLOCK": 128}))
    cl = launch.CachedLaunch(k)
    x = torch.zeros(8)
    grid = lambda m: (1000 // m["BLOCK"],)  # noqa: E731
    cl(grid, (x, 1000, 1.0), {"FLAG": False})
    compiled = cl(grid, (x, 1000, 1.0), {"FLAG": False})
    (g, _, args), = compiled.runs
    assert g == (7, 1, 1) and args[3:] == (128, False)


def test_the_grid_is_recomputed_each_call(fake_runtime):
    """The grid may depend on sizes that are no argument (the batch): never cached with the kernel."""
    k = FakeKernel()
    cl = launch.CachedLaunch(k)
    x = torch.zeros(8)
    cl((1,), (x, 8, 1.0), {"BLOCK": 8, "FLAG": True})
    compiled = cl((5, 2), (x, 8, 1.0), {"BLOCK": 8, "FLAG": True})
    assert compiled.runs[0][0] == (5, 2, 1)


def test_unknown_signature_falls_back_for_good(fake_runtime):
    k = FakeKernel()
    cl = launch.CachedLaunch(k)
    x = torch.zeros(8)
    cl((1,), (x, 8, 1.0), {"BLOCK": 8})  # FLAG missing: cannot bind the signature
    cl((1,), (x, 8, 1.0), {"BLOCK": 8})
    assert not cl.enabled and len(k.slow_calls) == 2


def test_interpreter_always_takes_tritons_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    k = FakeKernel()
    cl = launch.CachedLaunch(k)
    for _ in range(2):
        cl((1,), (torch.zeros(8), 8, 1.0), {"BLOCK": 8, "FLAG": True})
    assert not cl.enabled and len(k.slow_calls) == 2


def test_a_plain_jit_function_is_launched_directly(fake_runtime):
    """A JITFunction has its own `.fn` (the Python function, no arg_names): the signature is the kernel's.
    Taking `.fn` as under an autotuner used to switch the direct launch off for every plain kernel."""
    k = FakeKernel()
    k.fn = lambda x_ptr, n, scale, BLOCK, FLAG: None  # noqa: E731
    cl = launch.CachedLaunch(k)
    x = torch.zeros(8)
    for _ in range(3):
        cl((2,), (x, 8, 1.0), {"BLOCK": 8, "FLAG": True})
    assert cl.enabled and len(k.slow_calls) == 1


def test_fixed_launch_reuses_the_first_calls_kernel_and_grid(fake_runtime, monkeypatch):
    monkeypatch.setattr(launch, "_current_stream", lambda driver: 99)
    k = FakeKernel(best_config=SimpleNamespace(kwargs={"BLOCK": 128}))
    fixed = launch.FixedLaunch(k, lambda m: (1000 // m["BLOCK"], 4), {"FLAG": True})
    x = torch.zeros(8)
    fixed((x, 1000, 1.0))
    assert len(k.slow_calls) == 1
    compiled = fixed.direct[0]
    y = torch.zeros(8)
    fixed((y, 1000, 1.0))
    fixed((x, 1000, 1.0))
    assert len(k.slow_calls) == 1
    assert [(r[0], r[1]) for r in compiled.runs] == [((7, 4, 1), 99)] * 2
    assert compiled.runs[0][2][0] is y and compiled.runs[0][2][3:] == (128, True)


def test_fixed_launch_under_the_interpreter_always_takes_tritons_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    k = FakeKernel()
    fixed = launch.FixedLaunch(k, (1,), {"BLOCK": 8, "FLAG": True})
    for _ in range(2):
        fixed((torch.zeros(8), 8, 1.0))
    assert fixed.direct is None and len(k.slow_calls) == 2


class FakeTuner(FakeKernel):
    """An autotuner-like kernel with three configs: `warmup` records whether Triton's AsyncCompileMode was on."""

    def __init__(self, fail=False):
        super().__init__(best_config=SimpleNamespace(kwargs={"BLOCK": 64}))
        self.configs = [SimpleNamespace(kwargs={"BLOCK": b}) for b in (32, 64, 128)]
        self.warmups = []
        self.fail = fail

    def warmup(self, *args, grid, **kw):
        from triton.runtime import _async_compile
        self.warmups.append((args, grid, kw, _async_compile.active_mode.get() is not None))
        if self.fail:
            raise TypeError("this Triton binds differently")


def test_a_tuners_configs_are_compiled_at_once_before_it_times_them(fake_runtime, monkeypatch):
    pytest.importorskip("triton.runtime._async_compile")
    monkeypatch.setattr(launch, "PARALLEL_COMPILE", True)
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 4)
    k = FakeTuner()
    cl = launch.CachedLaunch(k)
    x = torch.zeros(8)
    grid = lambda m: (8 // m["BLOCK"] + 1,)  # noqa: E731
    cl(grid, (x, 8, 1.0), {"FLAG": True})
    cl(grid, (x, 8, 1.0), {"FLAG": True})
    (args, g, kw, in_async_mode), = k.warmups  # once, on the first call of the specialization
    assert args[1:] == (8, 1.0) and g is grid and kw == {"FLAG": True} and in_async_mode
    assert len(k.slow_calls) == 1


@pytest.mark.parametrize("why", ["switched off", "it fails", "one CPU"])
def test_compiling_at_once_never_stands_in_the_way(fake_runtime, monkeypatch, why):
    """Off, failing (another Triton's binding) or pointless (one CPU): the launch goes on as before, and
    Triton's compile mode is left off for the next compile."""
    pytest.importorskip("triton.runtime._async_compile")
    from triton.runtime import _async_compile
    monkeypatch.setattr(launch, "PARALLEL_COMPILE", why != "switched off")
    monkeypatch.setattr(launch.os, "cpu_count", lambda: 1 if why == "one CPU" else 4)
    k = FakeTuner(fail=why == "it fails")
    c = launch.CachedLaunch(k)((1,), (torch.zeros(8), 8, 1.0), {"FLAG": True})
    assert isinstance(c, FakeCompiled) and len(k.slow_calls) == 1
    assert len(k.warmups) == (1 if why == "it fails" else 0)
    assert _async_compile.active_mode.get() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_configs_compiled_at_once_are_the_ones_the_tuner_launches():
    """On the GPU: all three configs are in the kernel's cache before the autotuner runs, and the launch
    through the tuner (and then directly) computes the right numbers."""
    import triton
    import triton.language as tl

    @triton.jit
    def scale_kernel(X, Y, n, s, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * s, mask=offs < n)

    tuner = triton.autotune([triton.Config({"BLOCK": b}, num_warps=4) for b in (64, 128, 256)], key=["n"])(
        scale_kernel)
    x = torch.randn(1000, device="cuda")
    y = torch.empty_like(x)
    grid = lambda m: (triton.cdiv(1000, m["BLOCK"]),)  # noqa: E731
    launch.compile_configs_at_once(tuner, grid, (x, y, 1000, 3.0), {})
    kernel_cache = scale_kernel.device_caches[torch.cuda.current_device()][0]
    assert len(kernel_cache) == 3
    cl = launch.CachedLaunch(tuner)
    for _ in range(2):
        y.zero_()
        cl(grid, (x, y, 1000, 3.0), {})
        torch.testing.assert_close(y, 3.0 * x)
    assert len(kernel_cache) == 3  # the tuner compiled nothing more


def test_autotuners_keep_their_timings_on_disk_unless_told_not_to(monkeypatch):
    """Both autotuned kernels (the attention kernels, the norm forward) are made by launch.autotune, which asks
    Triton to keep the timings on disk (FLASHFUSE_AUTOTUNE_CACHE=0: not)."""
    import triton

    from flashfuse.kernels.attention import triton_impl
    from flashfuse.kernels.norms import impl as norms

    made = []
    monkeypatch.setattr(triton, "autotune", lambda **kw: made.append(kw) or (lambda fn: ("tuned", fn)))
    assert launch.autotune("fn", ["cfg"], ["n"], reset_to_zero=["Y"]) == ("tuned", "fn")
    assert made[-1] == {"configs": ["cfg"], "key": ["n"], "cache_results": True, "reset_to_zero": ["Y"]}
    monkeypatch.setattr(launch, "AUTOTUNE_CACHE", False)
    launch.autotune("fn", ["cfg"], ["n"])
    assert made[-1]["cache_results"] is False
    monkeypatch.setattr(launch, "AUTOTUNE_CACHE", True)
    monkeypatch.setattr(triton_impl, "INTERPRET", False)
    monkeypatch.setattr(triton_impl, "_TUNED", {})
    monkeypatch.delenv("FLASHFUSE_ATTN_AUTOTUNE", raising=False)
    mod = type("Module", (), {"attn_fwd": "attn_fwd kernel"})
    assert triton_impl._kernel(mod, "attn_fwd", 64)[0] == ("tuned", "attn_fwd kernel")
    assert made[-1]["cache_results"] is True and made[-1]["key"] == ["Nq", "Nk", "D", "DV", "DROPOUT"]
    norms._tuned_fwd.cache_clear()
    try:
        assert norms._tuned_fwd()[1] is norms.norm_fwd_kernel
        assert made[-1]["cache_results"] is True and "prune_configs_by" in made[-1]
    finally:
        norms._tuned_fwd.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_a_later_autotuner_reads_the_timings_instead_of_timing(monkeypatch, tmp_path):
    """A second process's autotuner (a new Autotuner object here) finds the first one's timings in Triton's cache
    and picks the same config without timing any; the numbers are right."""
    import triton
    import triton.language as tl

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))

    @triton.jit
    def triple_kernel(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * 3.0, mask=offs < n)

    configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in (64, 256)]
    x = torch.randn(5000, device="cuda")
    y = torch.empty_like(x)
    grid = lambda m: (triton.cdiv(5000, m["BLOCK"]),)  # noqa: E731
    first = launch.autotune(triple_kernel, configs, ["n"])
    first[grid](x, y, 5000)
    assert list(tmp_path.rglob("*.autotune.json"))
    second = launch.autotune(triple_kernel, configs, ["n"])
    monkeypatch.setattr(second, "_bench", lambda *a, **kw: pytest.fail("timed a config again"))
    y.zero_()
    second[grid](x, y, 5000)
    assert second.best_config.kwargs == first.best_config.kwargs
    torch.testing.assert_close(y, 3.0 * x)
