"""Device selection shared by the trainer, evaluation and the deploy runtimes."""

from __future__ import annotations

import contextlib
import os

import torch
from torch.amp import is_autocast_available

__all__ = ["DeviceUnavailableError", "autocast_off", "format_bytes", "free_memory", "host_available_bytes",
           "is_out_of_memory", "memory_to_check", "resolve_device"]


class DeviceUnavailableError(ValueError, RuntimeError):
    """The requested device does not exist on this machine (e.g. ``--device cuda`` without a GPU).

    A configuration error: the command-line tools report it in one line and exit with status 2.
    It is a ``ValueError`` (bad argument) and, for callers written against the earlier behaviour,
    still a ``RuntimeError``."""

    def __init__(self, spec: str, reason: str):
        super().__init__(f"device {spec!r} requested but {reason}")
        self.spec = spec
        self.reason = reason


def format_bytes(n: float) -> str:
    """A memory size for messages in the largest binary unit it fills (bytes below 1 KiB), one decimal."""
    for unit, power in (("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if n >= 1024 ** power:
            return f"{n / 1024 ** power:.1f} {unit}"
    return f"{int(n)} B"


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``: on a GPU what the driver has free plus what
    PyTorch's caching allocator holds unused; on a CPU :func:`host_available_bytes`. ``None``:
    unknown."""
    if device.type == "cuda":
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + unused
    return host_available_bytes() if device.type == "cpu" else None


# FASTCGAN_MEMORY_CHECK=0 turns the memory floors off (training and inference): for a machine whose
# free memory the process cannot see right (swap it means to use, a limit it does not know of).
# "off", "false" and "no" (any case, spaces around) say the same; any other value leaves them on.
MEMORY_CHECK_ENV = "FASTCGAN_MEMORY_CHECK"
_OFF_VALUES = frozenset({"0", "off", "false", "no"})
MEMORY_CHECK_OFF = f"{MEMORY_CHECK_ENV}=0 runs it anyway"


def memory_to_check(device: torch.device) -> int | None:
    """:func:`free_memory`, for the checks that refuse work that cannot fit; ``None`` (nothing is
    refused) when ``FASTCGAN_MEMORY_CHECK=0``."""
    off = os.environ.get(MEMORY_CHECK_ENV, "").strip().lower() in _OFF_VALUES
    return None if off else free_memory(device)


def autocast_off(device_type: str):
    """Autocast turned off, for code that must run in its inputs' dtype; nothing to turn off where
    autocast does not exist (``meta``: the trainer counts a step's memory there)."""
    if is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


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


# (limit, usage, stat, its reclaimable page-cache key) of the process's memory cgroup: v2, then v1.
CGROUP_MEMORY_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
)


def _cgroup_stat(path: str, key: str) -> int:
    """One counter of a cgroup's memory.stat (0 when it cannot be read)."""
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def host_available_bytes() -> int | None:
    """Memory this process can still allocate without swapping, the OOM killer or an allocation
    failure: the least of Linux's ``MemAvailable`` (free + reclaimable page cache), what the
    process's cgroup allows beyond its usage (a container's limit; MemAvailable shows the host's)
    and what ``RLIMIT_AS`` / ``RLIMIT_DATA`` leave; free physical pages elsewhere. ``None`` when
    nothing tells."""
    room = []
    try:
        with open("/proc/meminfo", "rb") as f:
            room += [int(line.split()[1]) * 1024 for line in f if line.startswith(b"MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    if not room:
        try:
            room.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, ValueError, OSError):
            pass
    for limit, usage, stat, cache in CGROUP_MEMORY_FILES:
        try:
            with open(limit) as f, open(usage) as g:
                lim = f.read().strip()
                if lim != "max" and int(lim) < 1 << 60:  # v1 writes a huge number for "no limit"
                    # The usage counts page cache (a dataset just read), which the kernel reclaims at
                    # the limit: its inactive part is room too (as kubelet counts a container's).
                    room.append(max(0, int(lim) - int(g.read().strip()) + _cgroup_stat(stat, cache)))
            break
        except (OSError, ValueError):
            continue
    try:
        import resource

        with open("/proc/self/status") as f:
            status = {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f)
                      if k in ("VmSize", "VmData")}
        for rlimit, used in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
            soft = resource.getrlimit(rlimit)[0]
            if soft != resource.RLIM_INFINITY and used in status:
                room.append(max(0, soft - status[used]))
    except (ImportError, OSError, ValueError):
        pass
    return min(room) if room else None


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure: Python's, torch's CPU allocator and CUDA's,
    onnxruntime's (each says it in its own words)."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return any(s in text for s in ("can't allocate memory", "out of memory", "failed to allocate memory",
                                   "bad_alloc"))
