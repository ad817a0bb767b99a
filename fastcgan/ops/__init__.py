"""The op seam: every fused op's reference, kernels table and dispatch, one module per op.

Layers call these functions; they never launch kernels themselves. ``backends()`` shows which
backends work on this machine and why the others don't; ``resolve(backend, x)`` which one
``instance_norm_act`` runs ``x`` on.
"""

from fastcgan.ops._activation import ACTIVATIONS, Activation, activation_label, apply_activation
from fastcgan.ops._backends import BACKENDS, BackendStatus, available_backends
from fastcgan.ops.instance_norm_act import (
    instance_norm_act,
    instance_norm_act_ref,
    output_memory_format,
)
from fastcgan.ops.instance_norm_act import resolve_backend as resolve

backends = available_backends

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "activation_label",
    "apply_activation",
    "BACKENDS",
    "BackendStatus",
    "available_backends",
    "backends",
    "resolve",
    "instance_norm_act",
    "instance_norm_act_ref",
    "output_memory_format",
]
