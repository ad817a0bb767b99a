"""The op seam: every fused op's reference, dispatch and custom-op registration.

Layers call these functions; they never launch kernels themselves. ``backends()`` shows which
backends work on this machine and why the others don't.
"""

from fastcgan.ops._backends import BACKENDS, BackendStatus, available_backends, resolve
from fastcgan.ops.instance_norm_act import (
    instance_norm_act,
    instance_norm_act_ref,
    output_memory_format,
)

backends = available_backends

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "available_backends",
    "backends",
    "resolve",
    "instance_norm_act",
    "instance_norm_act_ref",
    "output_memory_format",
]
