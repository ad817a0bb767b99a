"""Timing helpers for the benchmarks: device-synchronised medians and the device's copy bandwidth."""

import functools
import statistics
import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@functools.cache
def _l2_flush_buffer(device_index: int) -> torch.Tensor:
    """Twice the GPU's L2 cache in bytes (zeroing it evicts whatever a timed call left there)."""
    l2 = getattr(torch.cuda.get_device_properties(device_index), "L2_cache_size", 0) or (64 << 20)
    return torch.empty(2 * l2, dtype=torch.uint8, device=f"cuda:{device_index}")


def median_time(fn, device, *, warmup: int = 3, iters: int = 20, flush_l2: bool = False) -> float:
    """Median seconds per call of ``fn`` (synchronised before and after each call on a GPU).

    ``flush_l2`` (GPU): the L2 cache is overwritten before each timed call, outside the timed
    region. A kernel timed on the same tensors call after call otherwise reads them from L2 (an
    H200's ~60 MB holds a batch-1 ResNet-9 plane's x, y, dy and dx), which a training step's
    backward, reading activations saved long before, does not."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if torch.device(device).type == "cuda":
        flush = _l2_flush_buffer(torch.device(device).index or 0) if flush_l2 else None
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if flush is not None:
                flush.zero_()
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


@functools.cache
def copy_bandwidth(device: str = "cuda", nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, warmup=3, iters=10)
    return 2 * nbytes / t
