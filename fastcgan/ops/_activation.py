"""The activations the fused ops apply: one list for Python, Triton and C++.

Ops and layers take the lower-case name (``activation="leaky_relu"``) or the member
(``Activation.LEAKY_RELU``). The integer value is the code the kernels switch on: the Triton
``ACT`` constexpr and the C++ ``fastcgan::Activation`` (``csrc/instance_norm_act_kernels.h``),
whose names and values are the same; tests/test_native.py checks the C++ list against this one.

The helpers below are plain functions on names and members (no methods on members, no
``Activation[...]`` lookups) so that every torch.compile version this library supports traces
them without a graph break.
"""

from __future__ import annotations

import enum
from typing import Union

import torch.nn.functional as F
from torch import Tensor


class Activation(enum.IntEnum):
    NONE = 0
    RELU = 1
    LEAKY_RELU = 2

    @property
    def label(self) -> str:
        """The name the ops take and the C++ op schema parses: ``"none"``, ``"relu"``, ``"leaky_relu"``."""
        return self.name.lower()


_BY_LABEL = {a.label: a for a in Activation}
ACTIVATIONS = tuple(_BY_LABEL)  # ("none", "relu", "leaky_relu"): the names, in code order


def parse_activation(activation: Union[str, Activation]) -> Activation:
    """The member for a name or a member; a ``ValueError`` listing the valid names otherwise."""
    if isinstance(activation, Activation):
        return activation
    act = _BY_LABEL.get(activation) if isinstance(activation, str) else None
    if act is None:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return act


def activation_label(activation: Union[str, Activation]) -> str:
    """The validated name of an activation given by name or member (what the custom ops take)."""
    if isinstance(activation, Activation):
        return activation.name.lower()
    parse_activation(activation)
    return activation


def apply_activation(z: Tensor, activation: Union[str, Activation], negative_slope: float) -> Tensor:
    """The activation as standard torch ops (what the reference computes and ONNX export emits)."""
    act = parse_activation(activation)
    if act == Activation.RELU:
        return F.relu(z)
    if act == Activation.LEAKY_RELU:
        return F.leaky_relu(z, negative_slope)
    return z
