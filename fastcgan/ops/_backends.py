"""The backend registry: which backends exist, whether each works on this machine and why (or
why not), and which one ``"auto"`` picks for a tensor.

Backends are shared by every op; what differs per op — which dtypes its kernels compute on each
backend, and the kernels themselves — lives in the op's own module (``fastcgan/ops/<op>.py``).

Nothing here touches CUDA, imports Triton or loads the native library at import time:
availability is probed on first use and cached, so ``import fastcgan`` stays cheap and never
fails for lack of a GPU, a compiler or the native extension.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Iterator, Mapping, Optional

import torch

BACKENDS = ("torch", "triton", "cuda", "cpp")

# "auto" tries these in order (the fastest first) and falls back to "torch". From the H200 kernel
# table (bench/results/nvidia-h200.json, 2026-11-27; instance_norm_act fwd+bwd, ResNet-9 256²
# shapes, batch 1 and 8):
# * called one at a time (eager; the host launch counts) the native CUDA kernels beat Triton in
#   every case, 3.95 ms against 8.15 ms over 12 cases: Triton's Python launch costs ~0.4 ms per
#   forward+backward;
# * replayed as a CUDA graph (the trainer's default on a GPU) only device time counts: Triton is
#   2.0x faster in bf16 (0.81 ms against 1.64 ms over 6 cases; the CUDA NHWC kernel keeps few
#   blocks busy at batch 1), CUDA 1.18x faster in fp32. fp16 was not measured: per-call order.
# On the CPU the Triton interpreter is for tests only, never picked.
AUTO_ORDER_CUDA = ("cuda", "triton")
AUTO_ORDER_CUDA_REPLAYED = {torch.bfloat16: ("triton", "cuda")}
AUTO_ORDER_CPU = ("cpp",)

_replayed = 0  # depth of cuda_graph_replayed() contexts


@contextlib.contextmanager
def cuda_graph_replayed() -> Iterator[None]:
    """Within this context ``"auto"`` picks for device time (:data:`AUTO_ORDER_CUDA_REPLAYED`):
    the calls made (or traced by ``torch.compile``) here will be captured and replayed as a CUDA
    graph, where no host launch cost remains. Also in effect while a stream is capturing."""
    global _replayed
    _replayed += 1
    try:
        yield
    finally:
        _replayed -= 1


def auto_order(x: torch.Tensor) -> tuple[str, ...]:
    """The backends ``"auto"`` tries for ``x``, fastest first."""
    if x.device.type != "cuda":
        return AUTO_ORDER_CPU
    # is_current_stream_capturing() is asked only outside torch.compile's tracing, which would
    # put the query into the graph; code traced for a replayed step runs in the context instead.
    if _replayed or (not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing()):
        return AUTO_ORDER_CUDA_REPLAYED.get(x.dtype, AUTO_ORDER_CUDA)
    return AUTO_ORDER_CUDA


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is (un)available, for humans
    devices: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# The native op library fastcgan._C (csrc/), loaded defensively on first use
# --------------------------------------------------------------------------------------------
_native_lib = None
_native_error: Optional[str] = None


def load_native() -> tuple[bool, str]:
    """Import ``fastcgan._C`` (which registers the ``fastcgan::*_native_*`` ops with their CPU and,
    when built with a CUDA toolkit, CUDA kernels). ``(False, reason)`` when it is missing or broken;
    never raises."""
    global _native_lib, _native_error
    if _native_lib is not None:
        return True, "loaded"
    if _native_error is not None:
        return False, _native_error
    try:
        from fastcgan import _C as lib  # noqa: PLC0415 - loaded on first use, never at import

        _native_lib = lib
        return True, "loaded"
    except Exception as e:  # ImportError, or an undefined symbol from a torch mismatch
        _native_error = (
            f"fastcgan._C is not available ({type(e).__name__}: {e}); "
            "rebuild with `pip install -e .` (FASTCGAN_BUILD_NATIVE=ON, the default)"
        )
        return False, _native_error


# --------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------
def _triton_interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter: Triton's own reading of TRITON_INTERPRET
    (which takes 1, true, on, yes), else the documented "1"."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:  # noqa: BLE001 - an older Triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _probe_triton() -> BackendStatus:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return BackendStatus("triton", False, f"triton cannot be imported: {e}")
    devices = []
    reasons = []
    if _triton_interpreting():
        devices.append("cpu")
        reasons.append("CPU tensors run under the Triton interpreter (TRITON_INTERPRET=1)")
    if torch.cuda.is_available():
        devices.append("cuda")
        reasons.append("CUDA GPU present")
    if not devices:
        return BackendStatus("triton", False, "no CUDA GPU and TRITON_INTERPRET is not set")
    return BackendStatus("triton", True, "; ".join(reasons), tuple(devices))


def _probe_native(name: str) -> BackendStatus:
    ok, reason = load_native()
    if not ok:
        return BackendStatus(name, False, reason)
    info = _native_lib.build_info()
    if name == "cpp":
        return BackendStatus("cpp", True, f"fastcgan._C loaded ({info})", ("cpu",))
    if not _native_lib.cuda_built():
        return BackendStatus("cuda", False, "fastcgan._C was built without CUDA (no toolkit at build time)")
    if not torch.cuda.is_available():
        return BackendStatus("cuda", False, "fastcgan._C has CUDA kernels but no CUDA GPU is visible")
    return BackendStatus("cuda", True, f"fastcgan._C loaded with CUDA kernels ({info})", ("cuda",))


_status_cache: dict[str, BackendStatus] = {}


def status(name: str) -> BackendStatus:
    if name not in _status_cache:
        if name == "torch":
            _status_cache[name] = BackendStatus("torch", True, "pure-PyTorch reference", ("cpu", "cuda"))
        elif name == "triton":
            _status_cache[name] = _probe_triton()
        elif name in ("cpp", "cuda"):
            _status_cache[name] = _probe_native(name)
        else:
            raise ValueError(f"unknown backend {name!r}; choose from {('auto',) + BACKENDS}")
    return _status_cache[name]


def available_backends() -> dict[str, BackendStatus]:
    """Every backend with whether it works here and why (or why not)."""
    return {name: status(name) for name in BACKENDS}


def _usable(name: str, x: torch.Tensor) -> Optional[str]:
    """None if backend ``name`` works here for ``x``'s device, else the reason it does not. The
    reference is plain PyTorch: it runs wherever x is (meta, mps, xpu), as "auto" falls back to."""
    if name == "torch":
        return None
    st = status(name)
    if not st.available:
        return st.reason
    if x.device.type not in st.devices:
        return f"backend {name!r} runs on {', '.join(st.devices)} tensors, not {x.device.type}"
    return None


def resolve(backend: str, x: torch.Tensor, op: str, dtypes: Mapping[str, tuple[torch.dtype, ...]]) -> str:
    """The backend ``op`` runs ``x`` on: ``"auto"`` made concrete (the first usable one of
    :func:`auto_order` for ``x``, else ``"torch"``), an
    explicit one checked. ``dtypes``: the dtypes the op's kernels compute on each backend."""

    def why_not(name: str) -> Optional[str]:
        reason = _usable(name, x)
        if reason is None and x.dtype not in dtypes[name]:
            reason = f"{op} on backend {name!r} does not support {x.dtype} (supports {dtypes[name]})"
        return reason

    if backend == "auto":
        for name in auto_order(x):
            if why_not(name) is None:
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {('auto',) + BACKENDS}")
    reason = why_not(backend)
    if reason is not None:
        raise RuntimeError(f"{op} backend {backend!r} is unavailable: {reason}")
    return backend


def is_exporting() -> bool:
    """True while ONNX export or torch.export traces: layers then use the reference."""
    if torch.onnx.is_in_onnx_export():
        return True
    fn = getattr(torch.compiler, "is_exporting", None)
    return bool(fn()) if fn is not None else False
