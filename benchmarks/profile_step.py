"""Where a training step's time goes (H100): torch.profiler over a few GPT-2 steps of benchmarks/train_gpt.py.

    python benchmarks/profile_step.py --mode flashfuse --b 8 --t 1024
Prints the wall time per step, the GPU-busy time per step, and the top kernels and CPU ops.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_gpt import make_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="flashfuse")
    ap.add_argument("--b", type=int, default=8)
    ap.add_argument("--t", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=18)
    args = ap.parse_args()
    step = make_step(args.mode, args.b, args.t)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    n = 5
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"{args.mode} b={args.b} t={args.t}: wall {wall * 1e3:.1f} ms/step (profiled), "
          f"GPU busy {gpu_us / n / 1e3:.1f} ms/step")
    print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))


if __name__ == "__main__":
    main()
