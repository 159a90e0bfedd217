"""Host (CPU) time of the attention op and of a whole training step (issue 7: the GPT-2 step is host-bound).

    python benchmarks/host_time.py [--out DIR] [--cprofile-steps 5]
1. Per call, with tensors so small that the GPU finishes first (so wall time per call = host time):
   flashfuse::attention forward and backward through the dispatcher, the same through triton_impl directly,
   and torch SDPA (flash) for scale. The spelling is GPT-2's: a tril mask side recognised at run time,
   dropout 0.1.
2. cProfile over a few compiled GPT-2 (8 x 1024) training steps: the functions with the most own time.
Prints both and writes DIR/host_time.json.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import sympy
import torch
import torch.nn.functional as F


def per_call_us(fn, n=300, reps=5):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def op_calls():
    from flashfuse.kernels.attention import mask_recognition, triton_impl
    from flashfuse.kernels.attention import score_mod as sm
    text = sm.to_text(sympy.Piecewise((-sympy.oo, sympy.Eq(sm.side(0), 0)), (sympy.Float(0.125) * sm.score, True)))
    b, h, n, d = 1, 2, 64, 64
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = torch.tril(torch.ones(n, n, device="cuda")).view(1, 1, n, n)  # side0; Eq(side0, 0) masks
    rng = torch.tensor([1, 0], dtype=torch.int64, device="cuda")
    args = (q, k, v, [mask], [], text, 0.1, rng, "tf32")
    out, lse, _ = torch.ops.flashfuse.attention(*args)
    dout = torch.randn_like(out)
    causal, sides, _ = mask_recognition.specialize(text, [mask], n, n)  # what recognition makes of the tril
    assert not sides, "tril mask not recognised"
    rows = {
        "op forward (dispatcher)": lambda: torch.ops.flashfuse.attention(*args),
        "op backward (dispatcher)": lambda: torch.ops.flashfuse.attention_backward(
            dout, q, k, v, out, lse, [mask], [], text, 0.1, rng, [False], "tf32"),
        "triton_impl forward (recognised causal)": lambda: triton_impl.attention_forward(
            q, k, v, [], [], causal, 0.1, rng, "tf32"),
        "triton_impl backward (recognised causal)": lambda: triton_impl.attention_backward(
            dout, q, k, v, out, lse, [], [], causal, 0.1, rng, [], "tf32"),
        "SDPA flash forward": lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True),
    }
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    o = F.scaled_dot_product_attention(qg, kg, vg, dropout_p=0.1, is_causal=True)
    rows["SDPA flash backward"] = lambda: torch.autograd.grad(o, (qg, kg, vg), dout, retain_graph=True)
    return {name: per_call_us(fn) for name, fn in rows.items()}


def step_profile(n_steps: int, b: int, t: int, mode: str = "flashfuse"):
    sys.path.insert(0, os.path.dirname(__file__))
    from train_gpt import make_step
    step = make_step(mode, b, t)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n_steps * 1e3
    import threading
    print(f"{mode}: Python threads during the steps: {[t.name for t in threading.enumerate()]}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n_steps):
        step()
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(30)
    torch._dynamo.reset()
    return wall, buf.getvalue()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--cprofile-steps", type=int, default=5)
    ap.add_argument("--b", type=int, default=8)
    ap.add_argument("--t", type=int, default=1024)
    ap.add_argument("--skip-step", action="store_true")
    ap.add_argument("--skip-calls", action="store_true")
    ap.add_argument("--modes", default="flashfuse", help="train_gpt modes whose step is profiled")
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval (s) for the run: tests whether GIL hand-offs cost step time")
    args = ap.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "switch_interval_s": sys.getswitchinterval()}
    if not args.skip_calls:
        calls = result["per_call_us"] = op_calls()
        for name, us in calls.items():
            print(f"{name:45s} {us:8.1f} us/call")
    if not args.skip_step:
        for mode in args.modes.split(","):
            wall, text = step_profile(args.cprofile_steps, args.b, args.t, mode)
            print(f"GPT-2 {args.b}x{args.t} {mode} step: {wall:.1f} ms (unprofiled, back to back)")
            print(text)
            result[f"step_ms_{mode}"] = wall
            result[f"cprofile_{mode}"] = text
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "host_time.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
