"""Where the norm backward's time goes (GPU): the backward kernel alone over its launch choices, then the
kernels of one whole forward+backward step, flashfuse against Inductor.

    python benchmarks/norm_bwd_sweep.py --shapes 16384x1024 --out results.jsonl

Part 1 launches `norm_bwd_kernel` directly for each (PAIRED, PREFETCH, num_warps, programs per SM) and times
it from a CUDA graph (kernel time, no host), printing registers per thread and how many programs of that
size fit on one SM at once (the launch makes `programs per SM` of them: more than fit leaves a second, partial
wave). Part 2 runs torch.profiler over fwd+bwd steps of `flashfuse::layer_norm` / `rms_norm` and of Inductor's
compiled F.layer_norm / LLaMA RMSNorm, and lists each kernel's time per step. Part 3 (`--parts colsum`) times
the reduction of the backward's partial sums, torch's sum(0) against `column_sum_kernel` over its configs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

EPS = 1e-5


def resident_per_sm(n_regs: int, warps: int) -> int:
    """Programs of `warps` warps one SM holds at once by registers and warp slots (what the launch now sizes
    the grid by: flashfuse.kernels.norms.impl.resident_per_sm)."""
    from flashfuse.kernels.norms.impl import resident_per_sm as fit
    return fit(n_regs, 0, warps, torch.cuda.get_device_properties(0))


def sweep(kind: str, m: int, n: int, rows: list, prefetches=(False, True)):
    import triton
    from triton.testing import do_bench_cudagraph

    from flashfuse.kernels.norms.triton_kernels import norm_bwd_kernel

    dev = "cuda"
    x = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    dx = torch.empty_like(x)
    w = torch.randn(n, device=dev, dtype=torch.bfloat16)
    is_rms = kind == "rms_norm"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    block_n = triton.next_power_of_2(n)
    warp_choices = (4, 8, 16) if block_n <= 2048 else (8, 16)
    for paired in (False, True):
        for prefetch in prefetches:
            for warps in warp_choices:
                for per_sm in (2, 4, 6, 8, 12, 16):
                    programs = min(m, sms * per_sm)
                    rpp = triton.cdiv(m, programs)
                    programs = triton.cdiv(m, rpp)
                    dw = torch.empty(programs, n, device=dev, dtype=torch.float32)
                    db = torch.empty_like(dw)

                    def launch():
                        return norm_bwd_kernel[(programs,)](
                            dy, x, w, dy, dx, dw, db, m, n, rpp, dy.stride(0), x.stride(0), dy.stride(0),
                            dx.stride(0), n, EPS, IS_RMS=is_rms, HAS_W=True, HAS_B=not is_rms, HAS_DH=False, MID=0,
                            BLOCK_N=block_n, PREFETCH=prefetch, PAIRED=paired, num_warps=warps)

                    compiled = launch()
                    torch.cuda.synchronize()
                    us = do_bench_cudagraph(launch, rep=50, return_mode="median") * 1e3
                    regs = getattr(compiled, "n_regs", 0)
                    row = dict(part="kernel", kind=kind, shape=f"{m}x{n}", paired=paired, prefetch=prefetch,
                               warps=warps, per_sm=per_sm, programs=programs, us=round(us, 2),
                               gbps=round(3 * m * n * 2 / us / 1e3, 1), regs=regs,
                               spills=getattr(compiled, "n_spills", 0), fit=resident_per_sm(regs, warps))
                    rows.append(row)
                    print(json.dumps(row), flush=True)


def llama_rms_norm(x, w):
    xf = x.to(torch.float32)
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def profile(kind: str, m: int, n: int, rows: list, steps: int = 20):
    from profiling import kernel_times  # benchmarks/profiling.py (this script's folder is on sys.path)

    import flashfuse.kernels.norms  # noqa: F401  (registers the ops)

    ff = torch.ops.flashfuse
    bf = torch.bfloat16
    x = torch.randn(m, n, device="cuda", dtype=bf, requires_grad=True)
    w = torch.randn(n, device="cuda", dtype=bf, requires_grad=True)
    b = torch.randn(n, device="cuda", dtype=bf, requires_grad=True)
    if kind == "layer_norm":
        impls = {"flashfuse": lambda: ff.layer_norm(x, w, b, EPS, None, bf),
                 "inductor": (lambda f: lambda: f(x, (n,), w, b, EPS))(torch.compile(F.layer_norm))}
        leaves = [x, w, b]
    else:
        impls = {"flashfuse": lambda: ff.rms_norm(x, w, None, EPS, bf, bf),
                 "inductor": (lambda f: lambda: f(x, w))(torch.compile(llama_rms_norm))}
        leaves = [x, w]
    dy = torch.randn(m, n, device="cuda", dtype=bf)
    for name, fn in impls.items():
        def step():
            torch.autograd.grad([fn()], leaves, [dy])
        per_kernel = kernel_times(step, steps, warmup=5)
        total = sum(per_kernel.values())
        row = dict(part="profile", kind=kind, shape=f"{m}x{n}", impl=name, total_us=round(total, 1),
                   kernels={k: round(v, 1) for k, v in sorted(per_kernel.items(), key=lambda kv: -kv[1])})
        rows.append(row)
        print(json.dumps(row), flush=True)


def colsum(rows: list, sizes=((1024, 1024), (781, 2048), (264, 8192), (132, 16384))):
    """The partial sums' reduction alone, (programs, width) fp32 -> (width,): torch's sum(0) against
    column_sum_kernel over its configs (FLASHFUSE_NORM_COLSUM), kernel time from CUDA graphs."""
    from triton.testing import do_bench_cudagraph

    from flashfuse.kernels.norms import impl
    for p, w in sizes:
        part = torch.randn(p, w, device="cuda")
        variants = {"torch_sum0": lambda: part.sum(0), "default": lambda: impl.column_sums(part)}
        for bp in (128, 256, 512):
            for bw in (16, 32):
                for warps in (4, 8):
                    variants[f"{bp},{bw},{warps}"] = (lambda c: lambda: _forced(impl, c, part))(f"{bp},{bw},{warps}")
        for name, fn in variants.items():
            fn()
            torch.cuda.synchronize()
            us = do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3
            row = dict(part="colsum", shape=f"{p}x{w}", variant=name, us=round(us, 2),
                       gbps=round(p * w * 4 / us / 1e3, 1))
            if name == "default":
                row["config"] = impl.column_sum_config(p, w)
            rows.append(row)
            print(json.dumps(row), flush=True)


def _forced(impl, config: str, part):
    os.environ["FLASHFUSE_NORM_COLSUM"] = config
    try:
        return impl.column_sums(part)
    finally:
        os.environ.pop("FLASHFUSE_NORM_COLSUM", None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="16384x1024")
    ap.add_argument("--kinds", default="layer_norm,rms_norm")
    ap.add_argument("--parts", default="kernel,profile", help="kernel, profile and / or colsum")
    ap.add_argument("--prefetch", default="0,1", help="PREFETCH values to sweep")
    ap.add_argument("--out", help="append the rows to this JSON-lines file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    rows: list = []
    if "colsum" in args.parts:
        colsum(rows)
    for shape in args.shapes.split(","):
        m, n = (int(v) for v in shape.split("x"))
        for kind in args.kinds.split(","):
            if "kernel" in args.parts:
                sweep(kind, m, n, rows, tuple(bool(int(p)) for p in args.prefetch.split(",")))
            if "profile" in args.parts:
                profile(kind, m, n, rows)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
