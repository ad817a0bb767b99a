"""Timing helpers for the benchmarks: device-synchronised medians and the device's copy bandwidth."""

import functools
import statistics
import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, *, warmup: int = 3, iters: int = 20) -> float:
    """Median seconds per call of ``fn`` (synchronised before and after each call on a GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if torch.device(device).type == "cuda":
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device: str = "cuda", nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, warmup=3, iters=10)
    return 2 * nbytes / t
