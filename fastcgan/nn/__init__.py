"""Layers built on ``fastcgan.ops``. They hold parameters and call ops; they never launch kernels."""

from fastcgan.nn.layers import InstanceNormAct, ReflectionResidualBlock, set_backend

__all__ = ["InstanceNormAct", "ReflectionResidualBlock", "set_backend"]
