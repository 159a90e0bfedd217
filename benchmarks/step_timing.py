"""Where a training step's time goes: host enqueue time, GPU time, and what else shares the CPU (issue 7).

    python benchmarks/step_timing.py [--out DIR] [--modes sdpa,flashfuse] [--b 8 --t 1024]
For each mode of train_gpt.py:
- back to back: ms per step of steps run as a training loop runs them;
- host: the time the host takes to enqueue one step (forward / backward / optimizer) while the GPU is held
  busy by a long sleep kernel queued in front of it, so nothing the host does waits on the GPU;
- gpu: CUDA-event time of that same step on the GPU, which then runs without gaps;
- syncs: warnings from torch.cuda.set_sync_debug_mode during one step (a hidden host<->device sync makes a
  step cost host + GPU instead of the larger of the two);
- cpu: over the back-to-back steps, CPU seconds per wall second of this process's threads (by thread name)
  and of the whole machine, and the step time again with sys.setswitchinterval at 1 s (fewer GIL hand-offs).
- calls: host µs per call, inside the real step, of the attention ops (dispatcher entry), of their
  triton_impl bodies, of mask recognition and of each CachedLaunch, and which launchers fell back to Triton's
  own path (wrappers cost ~1 µs per call).
- python_gauge_us: a fixed pure-Python workload, so that host times from different machines (the device
  hosts differ up to ~1.7x in Python speed) can be compared.
A step whose back-to-back time is near max(host, gpu) is bound by the larger; near host + gpu, serialised.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_gpt import make_step  # noqa: E402

SLEEP_CYCLES = int(2e9)  # ~1 s of GPU: longer than any step's host enqueue


def python_gauge_us(reps=5):
    """Best-of-`reps` µs of a fixed workload of dict lookups, tuple building and calls (what an op's host path
    does): the same on every machine, so a ratio of gauges compares two hosts."""
    table = {(i, i % 7): i for i in range(64)}

    def work():
        acc = 0
        for i in range(20000):
            key = (i & 63, (i & 63) % 7)
            acc += table.get(key, 0) + len((key, acc))
        return acc
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        work()
        best = min(best, (time.perf_counter() - t0) * 1e6)
    return best


def back_to_back(step, n=10):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def host_and_gpu(step, reps=3):
    rows = []
    for _ in range(reps):
        torch.cuda.synchronize()
        torch.cuda._sleep(SLEEP_CYCLES)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        marks = [time.perf_counter()]
        step(marks)
        marks.append(time.perf_counter())
        e.record()
        slept_until = time.perf_counter()
        torch.cuda.synchronize()
        gpu_wait = (time.perf_counter() - slept_until) * 1e3  # ~sleep left: the host never caught up
        f, b, o = (1e3 * (marks[i + 1] - marks[i]) for i in range(3))
        rows.append({"host_fwd": f, "host_bwd": b, "host_opt": o, "host": f + b + o,
                     "gpu": s.elapsed_time(e), "gpu_wait_after": gpu_wait})
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def sync_warnings(step):
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sorted({str(w.message).splitlines()[0][:160] for w in caught if "sync" in str(w.message).lower()})


def _thread_cpu():
    """{thread name or tid: CPU seconds} for this process, from /proc."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/comm") as fh:
                comm = fh.read().strip()
        except OSError:
            continue
        name = names.get(int(tid), f"{comm}:{tid}")
        out[name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _machine_busy():
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def cpu_share(step, n=10):
    th0, (b0, t0_all), w0 = _thread_cpu(), _machine_busy(), time.perf_counter()
    ms = back_to_back(step, n)
    th1, (b1, t1_all), w1 = _thread_cpu(), _machine_busy(), time.perf_counter()
    wall = w1 - w0
    threads = {k: round((th1[k] - th0.get(k, 0.0)) / wall, 3) for k in th1 if th1[k] - th0.get(k, 0.0) > 0}
    ncpu = os.cpu_count() or 1
    return {"ms": ms, "threads_cpu_per_wall_s": threads,
            "machine_busy_cores": round((b1 - b0) / max(1, t1_all - t0_all) * ncpu, 2)}


class _Timed:
    """Wraps `owner.name` (a function attribute) to sum its host time and count its calls."""

    def __init__(self, owner, name, label):
        self.owner, self.name, self.label = owner, name, label
        self.inner = getattr(owner, name)
        self.total, self.calls = 0.0, 0
        timed = self

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return timed.inner(*args, **kwargs)
            finally:
                timed.total += time.perf_counter() - t0
                timed.calls += 1
        setattr(owner, name, wrapper)

    def restore(self):
        setattr(self.owner, self.name, self.inner)


def call_timing(step, mode, n=5):
    """µs per call of the op-level functions inside `n` real steps (see the module docstring)."""
    from flashfuse.kernels import launch
    from flashfuse.kernels.attention import mask_recognition, triton_impl
    targets = [(torch.ops.aten._scaled_dot_product_flash_attention, "default", "sdpa flash fwd (dispatcher)"),
               (torch.ops.aten._scaled_dot_product_flash_attention_backward, "default",
                "sdpa flash bwd (dispatcher)")]
    if mode.startswith("flashfuse"):
        targets += [(torch.ops.flashfuse.attention, "default", "flashfuse fwd (dispatcher)"),
                    (torch.ops.flashfuse.attention_backward, "default", "flashfuse bwd (dispatcher)"),
                    (triton_impl, "attention_forward", "triton_impl.attention_forward"),
                    (triton_impl, "attention_backward", "triton_impl.attention_backward"),
                    (mask_recognition, "specialize", "mask_recognition.specialize"),
                    (launch.CachedLaunch, "__call__", "CachedLaunch.__call__"),
                    (launch.FixedLaunch, "__call__", "FixedLaunch.__call__")]
    timers = [_Timed(*t) for t in targets if hasattr(*t[:2])]
    try:
        torch.cuda.synchronize()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    finally:
        for t in timers:
            t.restore()
    rows = {t.label: {"us_per_call": round(t.total / t.calls * 1e6, 1), "calls_per_step": t.calls / n}
            for t in timers if t.calls}
    if mode.startswith("flashfuse"):
        rows["launchers"] = {getattr(lc.jit, "__name__", str(lc.jit)): {"enabled": lc.enabled,
                                                                       "entries": len(lc.entries),
                                                                       "fallback": lc.fallback_reason}
                             for lc in launch._LAUNCHERS.values()}
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--modes", default="sdpa,flashfuse")
    ap.add_argument("--b", type=int, default=8)
    ap.add_argument("--t", type=int, default=1024)
    args = ap.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "b": args.b, "t": args.t,
               "python_gauge_us": python_gauge_us()}
    print("python gauge:", results["python_gauge_us"], "us", flush=True)
    for mode in args.modes.split(","):
        step = make_step(mode, args.b, args.t)
        for _ in range(3):
            step()
        r = {"back_to_back_ms": back_to_back(step)}
        r.update(host_and_gpu(step))
        r["sync_warnings"] = sync_warnings(step)
        r["cpu"] = cpu_share(step)
        r["calls"] = call_timing(step, mode)
        old = sys.getswitchinterval()
        sys.setswitchinterval(1.0)
        r["back_to_back_ms_switch_1s"] = back_to_back(step)
        sys.setswitchinterval(old)
        results[mode] = r
        print(mode, json.dumps(r, indent=1), flush=True)
        del step
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "step_timing.json"), "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
