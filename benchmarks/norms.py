"""GB/s of flashfuse's norm kernels vs PyTorch eager, Inductor and hand-written eager (bf16, GPU).

    python benchmarks/norms.py --out benchmarks/results

Prints a table; writes <out>/norms.json and <out>/norms.png. Times are triton.testing.do_bench medians
after warm-up, on random inputs. Bytes counted are the minimum traffic of the operation, the same for every
implementation: forward reads x (and the residual) and writes y (and h); forward+backward adds reading x
(or h), dy (and dh) and writing dx. Weights are counted too (negligible).
The last block prints flashfuse/Inductor time ratios in the form of passes/norm_match.py's MEASURED_RATIO.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(16384, 1024), (16384, 4096), (4096, 8192)]
EPS = 1e-5


def hand_layer_norm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + EPS) * w + b


def llama_rms_norm(x, w):
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return w * xf.to(dtype)


def add_layer_norm_eager(x, r, w, b):
    h = x + r
    return F.layer_norm(h, (h.shape[-1],), w, b, EPS), h


def add_rms_norm_eager(x, r, w):
    h = x + r
    return llama_rms_norm(h, w), h


def implementations():
    ff = torch.ops.flashfuse
    bf = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    compiled = {}

    def inductor(fn):
        if fn not in compiled:
            compiled[fn] = torch.compile(fn, dynamic=False)
        return compiled[fn]

    return {
        "layer_norm": {
            "flashfuse": lambda x, r, w, b: ff.layer_norm(x, w, b, EPS, None, bf),
            "F.layer_norm eager": lambda x, r, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS),
            "F.layer_norm inductor": lambda x, r, w, b: inductor(F.layer_norm)(x, (x.shape[-1],), w, b, EPS),
            "hand-written eager": lambda x, r, w, b: hand_layer_norm(x, w, b),
        },
        "rms_norm": {
            "flashfuse": lambda x, r, w, b: ff.rms_norm(x, w, None, EPS, bf, bf),
            "F.rms_norm eager": lambda x, r, w, b: F.rms_norm(x, (x.shape[-1],), w, EPS),
            "hand-written eager": lambda x, r, w, b: llama_rms_norm(x, w),
            "hand-written inductor": lambda x, r, w, b: inductor(llama_rms_norm)(x, w),
        },
        "add_layer_norm": {
            "flashfuse": lambda x, r, w, b: ff.add_layer_norm(x, r, w, b, EPS, None, bf),
            "eager": lambda x, r, w, b: add_layer_norm_eager(x, r, w, b),
            "inductor": lambda x, r, w, b: inductor(add_layer_norm_eager)(x, r, w, b),
        },
        "add_rms_norm": {
            "flashfuse": lambda x, r, w, b: ff.add_rms_norm(x, r, w, None, EPS, bf, bf),
            "eager": lambda x, r, w, b: add_rms_norm_eager(x, r, w),
            "inductor": lambda x, r, w, b: inductor(add_rms_norm_eager)(x, r, w),
        },
    }


# the Inductor baseline each op's ratio is taken against
INDUCTOR_OF = {"layer_norm": "F.layer_norm inductor", "rms_norm": "hand-written inductor",
               "add_layer_norm": "inductor", "add_rms_norm": "inductor"}


def traffic(op: str, m: int, n: int, elem: int, backward: bool) -> int:
    res = op.startswith("add_")
    fwd = (2 + 2 * res) * m * n * elem
    bwd = (3 + res) * m * n * elem  # x|h, dy, (dh), dx (the residual's gradient is the same tensor)
    params = 2 * n * elem * (2 if backward else 1)
    return fwd + (bwd if backward else 0) + params


DEVICE = "cuda"


def do_bench(fn, warmup, rep, grad_to_none=None, return_mode="median"):
    from triton.testing import do_bench as triton_do_bench

    return triton_do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode=return_mode)


def _wall_clock_bench(fn, warmup, rep, grad_to_none=None, return_mode="median"):
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def bench_cudagraph(fn, x, r, w, b, backward: bool = False):
    """Kernel time: the step captured in a CUDA graph and replayed (no host work in the timing).
    The backward uses autograd.grad (fresh gradients, no accumulation into .grad inside the graph)."""
    from triton.testing import do_bench_cudagraph

    if not backward:
        with torch.no_grad():
            fn(x, r, w, b)
            return do_bench_cudagraph(lambda: fn(x, r, w, b), rep=100, return_mode="median")
    leaves = [t for t in (x, r, w, b) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    try:
        out = fn(x, r, w, b)
        outs = list(out) if isinstance(out, tuple) else [out]
        grads = [torch.randn_like(o) for o in outs]
        # drop the autograd graph of this call: its AccumulateGrad nodes belong to the default stream,
        # and reusing them inside the capture (on a side stream) invalidates it
        del out, outs

        def step():
            o = fn(x, r, w, b)
            # allow_unused: RMSNorm takes a bias argument it does not read
            torch.autograd.grad(list(o) if isinstance(o, tuple) else [o], leaves, grads, allow_unused=True)

        for _ in range(3):  # compile / autotune / lazy backward compilation outside the capture
            step()
        torch.cuda.synchronize()
        return do_bench_cudagraph(step, rep=100, return_mode="median")
    finally:
        for t in leaves:
            t.requires_grad_(False)
            t.grad = None


def bench_one(fn, x, r, w, b, backward: bool):
    if not backward:
        with torch.no_grad():
            fn(x, r, w, b)  # compile / autotune outside the timing
            return do_bench(lambda: fn(x, r, w, b), warmup=25, rep=100, return_mode="median")
    leaves = [t for t in (x, r, w, b) if t is not None]
    for t in leaves:
        t.requires_grad_(True)
    out = fn(x, r, w, b)
    outs = list(out) if isinstance(out, tuple) else [out]
    grads = [torch.randn_like(o) for o in outs]

    def step():
        o = fn(x, r, w, b)
        torch.autograd.backward(list(o) if isinstance(o, tuple) else [o], grads)

    step()
    t = do_bench(step, warmup=25, rep=100, grad_to_none=leaves, return_mode="median")
    for t_ in leaves:
        t_.requires_grad_(False)
        t_.grad = None
    return t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop starting new cases after this")
    ap.add_argument("--ops", default="layer_norm,rms_norm,add_layer_norm,add_rms_norm")
    ap.add_argument("--ratio-from-graphs", action="store_true",
                    help="fwd+bwd ratio from CUDA-graph replays (kernel time) instead of end-to-end steps")
    ap.add_argument("--shapes", help="only these shapes, e.g. 16384x1024,4096x8192")
    ap.add_argument("--cpu-smoke", action="store_true", help="check the script on CPU (tiny shapes, "
                    "TRITON_INTERPRET=1, wall-clock timer): the numbers mean nothing")
    args = ap.parse_args(argv)
    global DEVICE, SHAPES, do_bench
    if args.cpu_smoke:
        DEVICE, SHAPES, do_bench = "cpu", [(64, 33), (16, 100)], _wall_clock_bench
    if args.shapes and not args.cpu_smoke:
        SHAPES = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("norms benchmark: needs a CUDA GPU", file=sys.stderr)
        return 1
    import triton

    import flashfuse.kernels.norms  # noqa: F401

    torch._dynamo.config.cache_size_limit = 256
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    dev = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke test)"
    meta = {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "dtype": "bfloat16"}
    print(f"# {dev}, torch {torch.__version__}, triton {triton.__version__}, bf16")
    results = []
    impls = implementations()
    gen = torch.Generator(device=DEVICE).manual_seed(0)

    # device copy: the bandwidth roof
    for m, n in SHAPES:
        x = torch.randn(m, n, device=DEVICE, dtype=torch.bfloat16, generator=gen)
        ms = do_bench(lambda: x.clone(), warmup=25, rep=100, return_mode="median")
        gbs = 2 * x.numel() * 2 / ms / 1e6
        results.append(dict(op="copy", impl="x.clone()", m=m, n=n, mode="fwd", ms=ms, gbs=gbs))
        print(f"copy           {m:>6}x{n:<5} {'x.clone()':<24} {ms * 1e3:9.1f} us {gbs:8.0f} GB/s")

    stopped = False
    for op in args.ops.split(","):
        for m, n in SHAPES:
            dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32  # bf16: not in the interpreter
            x = torch.randn(m, n, device=DEVICE, generator=gen).to(dtype)
            r = torch.randn(m, n, device=DEVICE, generator=gen).to(dtype) if op.startswith("add_") else None
            w = (1 + 0.1 * torch.randn(n, device=DEVICE, generator=gen)).to(dtype)
            b = (0.1 * torch.randn(n, device=DEVICE, generator=gen)).to(dtype)
            for backward in (False, True):
                for name, fn in impls[op].items():
                    if time.time() - start > args.budget_s:
                        stopped = True
                        break
                    try:
                        ms = bench_one(fn, x, r, w, b, backward)
                    except Exception as exc:  # report, go on with the others
                        print(f"{op} {name} {m}x{n}: failed: {type(exc).__name__}: {exc}")
                        continue
                    gbs = traffic(op, m, n, 2, backward) / ms / 1e6
                    mode = "fwd+bwd" if backward else "fwd"
                    results.append(dict(op=op, impl=name, m=m, n=n, mode=mode, ms=ms, gbs=gbs))
                    print(f"{op:<14} {m:>6}x{n:<5} {mode:<8} {name:<24} {ms * 1e3:9.1f} us {gbs:8.0f} GB/s",
                          flush=True)
                    if DEVICE == "cuda" and name in ("flashfuse", INDUCTOR_OF[op]):
                        # the same step replayed from a CUDA graph: kernel time without the CPU side
                        try:
                            ms = bench_cudagraph(fn, x, r, w, b, backward)
                        except Exception as exc:
                            print(f"{op} {name} {m}x{n}: cuda graph failed: {type(exc).__name__}: {exc}")
                            continue
                        gbs = traffic(op, m, n, 2, backward) / ms / 1e6
                        results.append(dict(op=op, impl=name, m=m, n=n, mode=f"{mode} (cuda graph)", ms=ms,
                                            gbs=gbs))
                        print(f"{op:<14} {m:>6}x{n:<5} {mode + ' cg':<8} {name:<24} {ms * 1e3:9.1f} us "
                              f"{gbs:8.0f} GB/s", flush=True)
            _save(args.out, meta, results, stopped)
    ratios = {}
    for op, base in INDUCTOR_OF.items():
        for m, n in SHAPES:
            pair = []
            for mode in ("fwd (cuda graph)", "fwd+bwd (cuda graph)" if args.ratio_from_graphs else "fwd+bwd"):
                def pick(impl):
                    return [r_ for r_ in results
                            if (r_["op"], r_["impl"], r_["m"], r_["n"], r_["mode"]) == (op, impl, m, n, mode)]

                ff, ind = pick("flashfuse"), pick(base)
                if ff and ind:
                    pair.append(round(ff[0]["ms"] / ind[0]["ms"], 3))
            if len(pair) == 2:
                ratios[f"{op}|{n}"] = pair
    print("\n# MEASURED_RATIO (flashfuse time / Inductor time; fwd replayed from a CUDA graph, fwd+bwd "
          + ("replayed from a CUDA graph):" if args.ratio_from_graphs else "end to end):"))
    for k, v in ratios.items():
        op, n = k.split("|")
        print(f'    ("{op}", {n}): ({v[0]}, {v[1]}),')
    _save(args.out, meta, results, stopped, ratios)
    _plot(args.out, results)
    print(f"# done in {time.time() - start:.0f} s{' (budget reached: some cases skipped)' if stopped else ''}")
    return 0


def _save(out, meta, results, stopped, ratios=None):
    with open(os.path.join(out, "norms.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "incomplete": stopped, "ratio_flashfuse_over_inductor": ratios},
                  f, indent=1)


def _plot(out, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(op, mode) for op in ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")
              for mode in ("fwd", "fwd+bwd")]
    fig, axes = plt.subplots(len(panels) // 2, 2, figsize=(13, 3.2 * len(panels) // 2))
    copy = {(r["m"], r["n"]): r["gbs"] for r in results if r["op"] == "copy"}
    for ax, (op, mode) in zip(axes.flat, panels):
        rows = [r for r in results if r["op"] == op and r["mode"] == mode]
        names = list(dict.fromkeys(r["impl"] for r in rows))
        shapes = list(dict.fromkeys((r["m"], r["n"]) for r in rows))
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            vals = [next((r["gbs"] for r in rows if r["impl"] == name and (r["m"], r["n"]) == s), 0) for s in shapes]
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=name)
        for j, s in enumerate(shapes):
            if s in copy:
                ax.hlines(copy[s], j - width / 2, j + 0.8 - width / 2, colors="k", linestyles="dashed")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels([f"{m}x{n}" for m, n in shapes])
        ax.set_ylabel("GB/s")
        ax.set_title(f"{op} {mode} (bf16; dashed: device copy)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "norms.png"), dpi=110)


if __name__ == "__main__":
    sys.exit(main())
