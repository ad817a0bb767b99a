"""Layers built on ``fastcgan.ops``. They hold parameters and call ops; they never launch kernels."""

from fastcgan.nn.layers import (
    GlobalBatchDropout,
    InstanceNormAct,
    ReflectionResidualBlock,
    set_backend,
    set_batch_shard,
)

__all__ = ["GlobalBatchDropout", "InstanceNormAct", "ReflectionResidualBlock", "set_backend", "set_batch_shard"]
