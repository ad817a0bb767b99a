"""Which backends exist here, why the others don't, and which one ``"auto"`` picks.

Nothing here touches CUDA or imports Triton at import time: availability is probed on first
use and cached, so ``import fastcgan`` stays cheap and never fails for lack of a GPU, a
compiler or the native extension.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Optional

import torch

BACKENDS = ("torch", "triton", "cuda", "cpp")

# dtypes each kernel backend computes (statistics are fp32 in all of them).
SUPPORTED_DTYPES = {
    "torch": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "triton": (torch.float16, torch.bfloat16, torch.float32),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "cpp": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}

# "auto" on a GPU tries these in order (set from bench/results: the fastest first). No GPU
# table exists yet: the native CUDA kernels go first (no JIT compile on first call, fp64 too),
# Triton second; bench/test_instance_norm_act.py prints which is faster per shape on an H100.
AUTO_ORDER_CUDA = ("cuda", "triton")


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is (un)available, for humans
    devices: tuple[str, ...] = ()


_status_cache: dict[str, BackendStatus] = {}


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
    try:
        # Defines the @triton.jit kernels (no compilation, no CUDA query); a Triton too old for
        # the language features used there shows up here rather than at the first call.
        importlib.import_module("fastcgan.kernels.instance_norm")
    except Exception as e:  # pragma: no cover - depends on the install
        return BackendStatus(
            "triton", False, f"fastcgan.kernels.instance_norm cannot be imported ({type(e).__name__}: {e})"
        )
    return BackendStatus("triton", True, "; ".join(reasons), tuple(devices))


def _probe_native(name: str) -> BackendStatus:
    from fastcgan.ops import _native

    ok, reason = _native.load()
    if not ok:
        return BackendStatus(name, False, reason)
    if name == "cpp":
        return BackendStatus("cpp", True, f"fastcgan._C loaded ({_native.build_info()})", ("cpu",))
    if not _native.cuda_built():
        return BackendStatus("cuda", False, "fastcgan._C was built without CUDA (no toolkit at build time)")
    if not torch.cuda.is_available():
        return BackendStatus("cuda", False, "fastcgan._C has CUDA kernels but no CUDA GPU is visible")
    return BackendStatus("cuda", True, f"fastcgan._C loaded with CUDA kernels ({_native.build_info()})", ("cuda",))


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
    """None if ``name`` can run ``x``, else the reason it cannot."""
    st = status(name)
    if not st.available:
        return st.reason
    if x.device.type not in st.devices:
        return f"backend {name!r} runs on {', '.join(st.devices)} tensors, not {x.device.type}"
    if x.dtype not in SUPPORTED_DTYPES[name]:
        return f"backend {name!r} does not support {x.dtype} (supports {SUPPORTED_DTYPES[name]})"
    return None


def resolve(backend: str, x: torch.Tensor) -> str:
    """Turn ``"auto"`` into a concrete backend for ``x``; check an explicit one can run it."""
    if backend == "auto":
        order = AUTO_ORDER_CUDA if x.device.type == "cuda" else ("cpp",)
        for name in order:
            if _usable(name, x) is None:
                return name
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {('auto',) + BACKENDS}")
    why_not = _usable(backend, x)
    if why_not is not None:
        raise RuntimeError(f"instance_norm_act backend {backend!r} is unavailable: {why_not}")
    return backend


_impl_cache: dict = {}


def kernel_impl(backend: str):
    """The module implementing ``forward``/``backward`` for a kernel backend (cached: this is
    on the per-call path)."""
    impl = _impl_cache.get(backend)
    if impl is None:
        impl = _impl_cache[backend] = _load_impl(backend)
    return impl


def _load_impl(backend: str):
    if backend == "triton":
        return importlib.import_module("fastcgan.kernels.instance_norm")
    if backend in ("cpp", "cuda"):
        from fastcgan.ops import _native

        return _native
    if backend == "torch":
        from fastcgan.ops import _torch_impl

        return _torch_impl
    raise ValueError(f"unknown kernel backend {backend!r}")


def is_exporting() -> bool:
    """True while ONNX export or torch.export traces: layers then use the reference."""
    if torch.onnx.is_in_onnx_export():
        return True
    fn = getattr(torch.compiler, "is_exporting", None)
    return bool(fn()) if fn is not None else False
