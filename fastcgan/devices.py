"""Device selection shared by the trainer, evaluation and the deploy runtimes."""

from __future__ import annotations

import torch


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` -> CUDA when a GPU is visible, else CPU; an explicit CUDA device without a GPU
    is a clear error (queried here, on use, never at import time)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} requested but no CUDA GPU is visible to torch")
    return dev
