"""Building blocks shared by the generators and discriminators.

``norm_act(norm, ...)`` is the one place a network picks its normalisation. Every block has
the same call signature ``block(x, residual=None)`` and the same meaning
``reflection_pad(act(norm(x)) + residual, pad)``:

* ``"instance"`` -> :class:`fastcgan.nn.InstanceNormAct` (the fused op seam, affine-free like the
  official ``InstanceNorm2d(affine=False, track_running_stats=False)``);
* ``"batch"``    -> :class:`BatchNormAct`, a plain ``nn.BatchNorm2d`` (affine, running stats) with
  the activation/residual/pad applied by standard torch ops; in eval mode it normalises with
  its running statistics (``inference="running"``, PyTorch's eval) or with each image's own
  statistics and the BN affine (``inference="per_image"``, see :data:`BN_INFERENCE_MODES`);
* ``"none"``     -> :class:`ActPad`, no normalisation (the official ``Identity`` norm).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcgan.nn import InstanceNormAct
from fastcgan.ops import activation_label, apply_activation, instance_norm_act

NORMS = ("instance", "batch", "none")

# What a BatchNorm layer computes at inference (eval mode); training always uses batch statistics.
# * "running":   the running mean/var (PyTorch's eval(); the official test.py with --eval).
# * "per_image": each image's own per-channel mean/var (biased, eps 1e-5) with the BN weight and
#   bias. The official test.py runs without --eval, i.e. BatchNorm in training mode on batches of
#   one image: per-image statistics exactly. This mode gives those outputs at any batch size
#   (each image normalised on its own, so results never depend on the batch), runs through the
#   fused instance_norm_act op, and exports to ONNX as InstanceNormalization(scale=weight, B=bias).
BN_INFERENCE_MODES = ("per_image", "running")


def check_bn_inference(mode: str) -> str:
    if mode not in BN_INFERENCE_MODES:
        raise ValueError(f"bn_inference must be one of {BN_INFERENCE_MODES}, got {mode!r}")
    return mode


def _act_residual_pad(
    y: Tensor, activation, negative_slope: float, residual: Optional[Tensor], pad: int
) -> Tensor:
    """What follows the normalisation, in the fused op's order: activation, residual add, reflection pad."""
    y = apply_activation(y, activation, negative_slope)
    if residual is not None:
        y = y + residual
    return F.pad(y, (pad,) * 4, mode="reflect") if pad > 0 else y


class BatchNormAct(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (affine, running stats, so official state-dict entries line up)
    followed by activation, residual add and reflection pad, in plain torch.

    ``inference`` (:data:`BN_INFERENCE_MODES`) picks the eval-mode statistics; ``"per_image"``
    runs as one fused :func:`fastcgan.ops.instance_norm_act` with the BN affine on ``backend``
    (changed by :func:`fastcgan.nn.set_backend` like every fused layer)."""

    uses_op_backend = True  # fastcgan.nn.set_backend points .backend at a kernel backend

    def __init__(
        self,
        num_features: int,
        activation: str = "relu",
        *,
        negative_slope: float = 0.2,
        pad: int = 0,
        inference: str = "running",
        backend: str = "auto",
    ):
        super().__init__(num_features)
        self.activation = activation_label(activation)
        self.negative_slope = negative_slope
        self.pad = pad
        self.inference = check_bn_inference(inference)
        self.backend = backend

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:  # type: ignore[override]
        if not self.training and self.inference == "per_image":
            return instance_norm_act(
                x, self.weight, self.bias, activation=self.activation, negative_slope=self.negative_slope,
                residual=residual, pad=self.pad, eps=self.eps, backend=self.backend,
            )
        return _act_residual_pad(super().forward(x), self.activation, self.negative_slope, residual, self.pad)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, activation={self.activation}, pad={self.pad}, "
            f"inference={self.inference}"
        )


class ActPad(nn.Module):
    """No normalisation: activation, residual add and reflection pad only (no parameters)."""

    def __init__(
        self, num_features: int, activation: str = "relu", *, negative_slope: float = 0.2, pad: int = 0
    ):
        super().__init__()
        self.num_features = num_features
        self.activation = activation_label(activation)
        self.negative_slope = negative_slope
        self.pad = pad

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return _act_residual_pad(x, self.activation, self.negative_slope, residual, self.pad)

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
        return BatchNormAct(num_features, activation, negative_slope=negative_slope, pad=pad, backend=backend)
    return ActPad(num_features, activation, negative_slope=negative_slope, pad=pad)


def set_bn_inference(net: nn.Module, mode: str) -> nn.Module:
    """Set the eval-mode statistics of every BatchNorm layer of ``net`` (:data:`BN_INFERENCE_MODES`)
    and record the mode in ``net.config`` (saved in generator files and export metadata) when the
    network has one and uses BatchNorm. Returns ``net``."""
    check_bn_inference(mode)
    net = getattr(net, "_orig_mod", net)  # a torch.compile wrapper: its module
    found = False
    for m in net.modules():
        if isinstance(m, BatchNormAct):
            m.inference = mode
            found = True
    cfg = getattr(net, "config", None)
    if found and isinstance(cfg, dict) and cfg.get("norm") == "batch":
        cfg["bn_inference"] = mode
    return net


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


def _binomial_filter(taps: int, channels: int, gain: float = 1.0) -> Tensor:
    """A normalised 2-D binomial filter (``[1 2 1]``, ``[1 3 3 1]`` outer products), one per channel."""
    row = {3: [1.0, 2.0, 1.0], 4: [1.0, 3.0, 3.0, 1.0]}[taps]
    k = torch.tensor(row)
    k = k[:, None] * k[None, :]
    return (k * gain / k.sum()).expand(channels, 1, taps, taps).contiguous()


class BlurDownsample(nn.Module):
    """Anti-aliased downsampling (the official CUT ``Downsample``): reflection pad 1, then a
    depthwise 3x3 ``[1 2 1]`` blur with stride 2 (H -> ceil(H/2)). ``padded=True``: the input
    already carries its reflection pad of 1 (written by the fused norm before it). No parameters:
    the filter is a constant buffer, not saved."""

    def __init__(self, channels: int, *, padded: bool = False):
        super().__init__()
        self.channels, self.padded = channels, padded
        self.register_buffer("filt", _binomial_filter(3, channels), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.padded:
            x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, self.filt.to(x.dtype), stride=2, groups=self.channels)

    def extra_repr(self) -> str:
        return f"{self.channels}, padded={self.padded}"


class BlurUpsample(nn.Module):
    """Anti-aliased 2x upsampling (the official CUT ``Upsample``): replicate pad 1, a depthwise
    transposed 4x4 ``[1 3 3 1]`` blur (gain 4) with stride 2, cropped to exactly 2H x 2W."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.register_buffer("filt", _binomial_filter(4, channels, gain=4.0), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        # The replicate pad as edge copies: under torch.compile (Inductor, CPU) F.pad's
        # replication_pad2d_backward was compiled for a contiguous gradient, while the depthwise
        # transposed conv's backward hands it a channels-last one (an assert_size_stride failure in
        # the first CUT backward). Slices and cat: the same values, a plain-add backward.
        x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], dim=2)
        x = torch.cat([x[..., :1], x, x[..., -1:]], dim=3)
        y = F.conv_transpose2d(x, self.filt.to(x.dtype), stride=2, padding=2, groups=self.channels)
        return y[:, :, 1:-1, 1:-1]

    def extra_repr(self) -> str:
        return str(self.channels)


class BlurDownStage(ConvNormAct):
    """The official CUT's anti-aliased downsampling stage: ``conv`` (stride 1), ``norm`` (which must
    write a reflection pad of 1: the blur's), :class:`BlurDownsample`; ``out_pad`` reflection-pads
    the result for a following padding-free conv."""

    def __init__(self, conv: nn.Module, norm: nn.Module, channels: int, *, out_pad: int = 0):
        super().__init__(conv, norm)
        if getattr(norm, "pad", None) != 1:
            raise ValueError("BlurDownStage: its norm must write the blur's reflection pad (pad=1)")
        self.blur = BlurDownsample(channels, padded=True)
        self.out_pad = out_pad

    def forward(self, x: Tensor) -> Tensor:
        y = self.blur(self.norm(self.conv(x)))
        return F.pad(y, (self.out_pad,) * 4, mode="reflect") if self.out_pad else y


class BlurUpStage(ConvNormAct):
    """The official CUT's anti-aliased upsampling stage: :class:`BlurUpsample`, ``conv`` (stride 1),
    ``norm``."""

    def __init__(self, channels: int, conv: nn.Module, norm: nn.Module):
        super().__init__(conv, norm)
        self.up = BlurUpsample(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(self.up(x)))


def convolution_input_elements(conv: nn.Module, x: Tensor, out: Tensor) -> int:
    """Elements of a convolution's input ``x`` that its backward keeps and its forward reads next to
    its output (the memory floors count them), without a padding done before it: a valid 7x7 after a
    3-pixel reflection pad reads 262² for 256² of image. At most what the output covers, stride²
    pixels per output pixel (a transposed convolution: its input)."""
    s_h, s_w = conv.stride
    pixels = min(x.shape[-2] * x.shape[-1], out.shape[-2] * out.shape[-1] * s_h * s_w)
    return x.shape[0] * x.shape[1] * pixels


def init_weights(net: nn.Module, init_type: Optional[str] = "normal", init_gain: float = 0.02,
                 order: Optional[list[nn.Module]] = None) -> nn.Module:
    """The official initialisation: conv / transposed-conv / linear weights from ``init_type``
    (``normal`` N(0, gain), ``xavier`` (normal, gain), ``kaiming`` (fan_in, a=0), ``orthogonal``
    (gain)), their biases 0; BatchNorm weights N(1, gain), biases 0. ``None`` keeps PyTorch's
    default initialisation. The weights are drawn module by module from the global RNG in
    ``order`` (default: ``net.modules()``): the official network's module order gives a seed's
    official initial weights."""
    if init_type is None:
        return net
    if init_type not in ("normal", "xavier", "kaiming", "orthogonal"):
        raise ValueError(f"init_type must be normal, xavier, kaiming or orthogonal, got {init_type!r}")
    modules = list(net.modules()) if order is None else [m for top in order for m in top.modules()]
    if order is not None and {id(m) for m in modules if list(m.parameters(recurse=False))} != {
            id(m) for m in net.modules() if list(m.parameters(recurse=False))}:
        raise ValueError("init_weights: order must hold every module with parameters")
    for m in modules:
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
