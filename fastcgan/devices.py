"""Device selection shared by the trainer, evaluation and the deploy runtimes."""

from __future__ import annotations

import torch

__all__ = ["DeviceUnavailableError", "host_available_bytes", "is_out_of_memory", "resolve_device"]


class DeviceUnavailableError(ValueError, RuntimeError):
    """The requested device does not exist on this machine (e.g. ``--device cuda`` without a GPU).

    A configuration error: the command-line tools report it in one line and exit with status 2.
    It is a ``ValueError`` (bad argument) and, for callers written against the earlier behaviour,
    still a ``RuntimeError``."""

    def __init__(self, spec: str, reason: str):
        super().__init__(f"device {spec!r} requested but {reason}")
        self.spec = spec
        self.reason = reason


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` -> CUDA when a GPU is visible, else CPU; an explicit CUDA device without a GPU
    (or with fewer GPUs than its index) raises :class:`DeviceUnavailableError` (queried here, on
    use, never at import time). A malformed spec (``"gpu"``), another device type (``"meta"``,
    ``"mps"``) or a CPU index (``"cpu:5"``) is a ``ValueError`` too."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {spec!r} is not a device name (use auto, cpu, cuda or cuda:N)") from e
    if dev.type not in ("cpu", "cuda"):  # meta, mps, xpu, ...: the kernels and the trainer know CPU and CUDA
        raise ValueError(f"device {spec!r} is not supported (use auto, cpu, cuda or cuda:N)")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise ValueError(f"device {spec!r}: there is one CPU device (use cpu)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(spec, "no CUDA GPU is visible to torch (use --device cpu or auto)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise DeviceUnavailableError(spec, f"only {n} CUDA GPU(s) are visible (cuda:0..cuda:{n - 1})")
    return dev


def host_available_bytes() -> int | None:
    """Memory a process can still allocate without swapping or the OOM killer: Linux's
    ``MemAvailable`` (free + reclaimable page cache), else free physical pages; ``None`` when
    the platform tells neither."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure: Python's, torch's CPU allocator and CUDA's,
    onnxruntime's (each says it in its own words)."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return any(s in text for s in ("can't allocate memory", "out of memory", "failed to allocate memory",
                                   "bad_alloc"))
