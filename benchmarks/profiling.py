"""GPU time per kernel of a callable, from torch.profiler (shared by the benchmark scripts)."""
import torch


def kernel_times(fn, calls: int = 20, warmup: int = 1, width: int = 70) -> dict:
    """Mean GPU time per call of each kernel `fn` launches, in microseconds (names cut to `width`)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
            times[e.key[:width]] = e.self_device_time_total / calls
    return times
