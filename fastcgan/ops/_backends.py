"""The backend registry: which backends exist, whether each works on this machine and why (or
why not), and which one ``"auto"`` picks for a tensor.

Backends are shared by every op; what differs per op — which dtypes its kernels compute on each
backend, and the kernels themselves — lives in the op's own module (``fastcgan/ops/<op>.py``).

Nothing here touches CUDA, imports Triton or loads the native library at import time:
availability is probed on first use and cached, so ``import fastcgan`` stays cheap and never
fails for lack of a GPU, a compiler or the native extension.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Optional

import torch

BACKENDS = ("torch", "triton", "cuda", "cpp")

# "auto" tries these in order (set from bench/results: the fastest first) and falls back to
# "torch". No GPU table exists yet: the native CUDA kernels go first on a GPU (no JIT compile on
# first call, fp64 too), Triton second; bench/test_instance_norm_act.py prints which is faster
# per shape on an H100. On the CPU the Triton interpreter is for tests only, never picked.
AUTO_ORDER_CUDA = ("cuda", "triton")
AUTO_ORDER_CPU = ("cpp",)


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
def _probe_triton() -> BackendStatus:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return BackendStatus("triton", False, f"triton cannot be imported: {e}")
    devices = []
    reasons = []
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
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
    """None if backend ``name`` works here for ``x``'s device, else the reason it does not."""
    st = status(name)
    if not st.available:
        return st.reason
    if x.device.type not in st.devices:
        return f"backend {name!r} runs on {', '.join(st.devices)} tensors, not {x.device.type}"
    return None


def resolve(backend: str, x: torch.Tensor, op: str, dtypes: Mapping[str, tuple[torch.dtype, ...]]) -> str:
    """The backend ``op`` runs ``x`` on: ``"auto"`` made concrete (the first usable one of
    :data:`AUTO_ORDER_CUDA` / :data:`AUTO_ORDER_CPU` for ``x``'s device, else ``"torch"``), an
    explicit one checked. ``dtypes``: the dtypes the op's kernels compute on each backend."""

    def why_not(name: str) -> Optional[str]:
        reason = _usable(name, x)
        if reason is None and x.dtype not in dtypes[name]:
            reason = f"{op} on backend {name!r} does not support {x.dtype} (supports {dtypes[name]})"
        return reason

    if backend == "auto":
        for name in AUTO_ORDER_CUDA if x.device.type == "cuda" else AUTO_ORDER_CPU:
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
