"""Defensive loader for the native op library ``fastcgan._C`` (``csrc/``).

Importing ``fastcgan._C`` registers ``fastcgan::instance_norm_act_native_fwd`` / ``_bwd`` with
CPU (and, when built with a CUDA toolkit, CUDA) kernels. A missing or broken build makes the
``cpp``/``cuda`` backends report unavailable with the reason; it is never an import error.
"""

from __future__ import annotations

import torch

_C = None
_load_error: str | None = None


def load() -> tuple[bool, str]:
    global _C, _load_error
    if _C is not None:
        return True, "loaded"
    if _load_error is not None:
        return False, _load_error
    try:
        from fastcgan import _C as lib  # noqa: PLC0415 - loaded on first use, never at import

        _C = lib
        return True, "loaded"
    except Exception as e:  # ImportError, or an undefined symbol from a torch mismatch
        _load_error = (
            f"fastcgan._C is not available ({type(e).__name__}: {e}); "
            "rebuild with `pip install -e .` (FASTCGAN_BUILD_NATIVE=ON, the default)"
        )
        return False, _load_error


def cuda_built() -> bool:
    return bool(load()[0] and _C.cuda_built())


def build_info() -> str:
    return _C.build_info() if load()[0] else "not built"


def forward(x, weight, bias, residual, activation, negative_slope, pad, eps):
    return torch.ops.fastcgan.instance_norm_act_native_fwd(
        x, weight, bias, residual, activation, negative_slope, pad, eps
    )


def backward(dy, x, weight, bias, mean, rstd, activation, negative_slope, pad, has_residual):
    return torch.ops.fastcgan.instance_norm_act_native_bwd(
        dy, x, weight, bias, mean, rstd, activation, negative_slope, pad, has_residual
    )
