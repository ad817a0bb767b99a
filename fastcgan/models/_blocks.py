"""Building blocks shared by the generators and discriminators.

``norm_act(norm, ...)`` is the one place a network picks its normalisation. Every block has
the same call signature ``block(x, residual=None)`` and the same meaning
``reflection_pad(act(norm(x)) + residual, pad)``:

* ``"instance"`` -> :class:`fastcgan.nn.InstanceNormAct` (the fused op seam, affine-free like the
  official ``InstanceNorm2d(affine=False, track_running_stats=False)``);
* ``"batch"``    -> :class:`BatchNormAct`, a plain ``nn.BatchNorm2d`` (affine, running stats) with
  the activation/residual/pad applied by standard torch ops;
* ``"none"``     -> :class:`ActPad`, no normalisation (the official ``Identity`` norm).
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from fastcgan.nn import InstanceNormAct

NORMS = ("instance", "batch", "none")


def _act(x: Tensor, activation: str, negative_slope: float) -> Tensor:
    if activation == "relu":
        return F.relu(x)
    if activation == "leaky_relu":
        return F.leaky_relu(x, negative_slope)
    return x


def _check_activation(activation: str) -> None:
    if activation not in ("relu", "leaky_relu", "none"):
        raise ValueError(f"activation must be 'relu', 'leaky_relu' or 'none', got {activation!r}")


class BatchNormAct(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (affine, running stats, so official state-dict entries line up)
    followed by activation, residual add and reflection pad, in plain torch."""

    def __init__(
        self, num_features: int, activation: str = "relu", *, negative_slope: float = 0.2, pad: int = 0
    ):
        super().__init__(num_features)
        _check_activation(activation)
        self.activation = activation
        self.negative_slope = negative_slope
        self.pad = pad

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:  # type: ignore[override]
        y = _act(super().forward(x), self.activation, self.negative_slope)
        if residual is not None:
            y = y + residual
        if self.pad > 0:
            y = F.pad(y, (self.pad,) * 4, mode="reflect")
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}, pad={self.pad}"


class ActPad(nn.Module):
    """No normalisation: activation, residual add and reflection pad only (no parameters)."""

    def __init__(
        self, num_features: int, activation: str = "relu", *, negative_slope: float = 0.2, pad: int = 0
    ):
        super().__init__()
        _check_activation(activation)
        self.num_features = num_features
        self.activation = activation
        self.negative_slope = negative_slope
        self.pad = pad

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        y = _act(x, self.activation, self.negative_slope)
        if residual is not None:
            y = y + residual
        if self.pad > 0:
            y = F.pad(y, (self.pad,) * 4, mode="reflect")
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, activation={self.activation}, pad={self.pad}"


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def norm_act(
    norm: str,
    num_features: int,
    activation: str = "relu",
    *,
    negative_slope: float = 0.2,
    pad: int = 0,
    backend: str = "auto",
) -> nn.Module:
    """The normalisation(+activation+pad) layer for ``norm`` (see the module docstring)."""
    check_norm(norm)
    if norm == "instance":
        return InstanceNormAct(
            num_features, activation, negative_slope=negative_slope, pad=pad, backend=backend
        )
    if norm == "batch":
        return BatchNormAct(num_features, activation, negative_slope=negative_slope, pad=pad)
    return ActPad(num_features, activation, negative_slope=negative_slope, pad=pad)


def conv_bias(norm: str) -> bool:
    """The official rule: convolutions followed by a norm carry a bias only for InstanceNorm
    (``use_bias = norm_layer is InstanceNorm2d``; so also no bias for ``norm='none'``)."""
    return norm == "instance"


class ConvNormAct(nn.Module):
    """``conv`` followed by ``norm`` (a :func:`norm_act` layer). State-dict keys: ``conv.*``, ``norm.*``."""

    def __init__(self, conv: nn.Module, norm: nn.Module):
        super().__init__()
        self.conv = conv
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


def init_weights(net: nn.Module, init_type: Optional[str] = "normal", init_gain: float = 0.02) -> nn.Module:
    """The official initialisation: conv / transposed-conv / linear weights from ``init_type``
    (``normal`` N(0, gain), ``xavier`` (normal, gain), ``kaiming`` (fan_in, a=0), ``orthogonal``
    (gain)), their biases 0; BatchNorm weights N(1, gain), biases 0. ``None`` keeps PyTorch's
    default initialisation."""
    if init_type is None:
        return net
    if init_type not in ("normal", "xavier", "kaiming", "orthogonal"):
        raise ValueError(f"init_type must be normal, xavier, kaiming or orthogonal, got {init_type!r}")
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if init_type == "normal":
                nn.init.normal_(m.weight, 0.0, init_gain)
            elif init_type == "xavier":
                nn.init.xavier_normal_(m.weight, gain=init_gain)
            elif init_type == "kaiming":
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            else:
                nn.init.orthogonal_(m.weight, gain=init_gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, init_gain)
            nn.init.zeros_(m.bias)
    return net
