"""Discriminators: the official PatchGAN (``basic`` = 70x70, ``n_layers``), the 1x1 PixelGAN
(``pixel``) and the tutorial's 5-conv discriminator (``udacity``). They return raw scores
(logits); the loss decides what they mean (:mod:`fastcgan.losses`)."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from fastcgan.models._blocks import (
    BlurDownsample,
    BlurDownStage,
    ConvNormAct,
    check_norm,
    conv_bias,
    init_weights,
    norm_act,
)

DISCRIMINATOR_ARCHS = ("basic", "n_layers", "pixel", "udacity")


class NLayerDiscriminator(nn.Module):
    """The official PatchGAN: Conv4 (s2, p1)-LeakyReLU(0.2), ``n_layers - 1`` Conv4 (s2)-Norm-
    LeakyReLU, one Conv4 (s1)-Norm-LeakyReLU, Conv4 (s1) to 1 channel. Channels double from ``ndf``
    up to ``8 ndf``; ``n_layers=3`` is the 70x70 PatchGAN. Norm+LeakyReLU is one fused
    :class:`fastcgan.nn.InstanceNormAct` for ``norm="instance"``. Keys ``stem.*``,
    ``body.{i}.conv.*``, ``body.{i}.norm.*``, ``head.*``.

    ``antialias`` (the official CUT default, its ``--no_antialias`` off): every stride-2 Conv4 is a
    stride-1 Conv4 followed, after its activation, by a [1 2 1] blur-pool with stride 2 (the same
    parameters and output size)."""

    def __init__(
        self,
        input_nc: int = 3,
        ndf: int = 64,
        n_layers: int = 3,
        *,
        norm: str = "instance",
        backend: str = "auto",
        antialias: bool = False,
    ):
        super().__init__()
        check_norm(norm)
        if n_layers < 1:
            raise ValueError(f"NLayerDiscriminator: n_layers must be >= 1, got {n_layers}")
        bias = conv_bias(norm)
        self.antialias = antialias
        self.stem = nn.Conv2d(input_nc, ndf, 4, stride=1 if antialias else 2, padding=1, bias=True)
        self.stem_blur = BlurDownsample(ndf) if antialias else None
        body = []
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            down = n < n_layers
            conv = nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2 if down and not antialias else 1, padding=1,
                             bias=bias)
            if down and antialias:  # the norm writes the blur's reflection pad
                na = norm_act(norm, ndf * mult, "leaky_relu", negative_slope=0.2, pad=1, backend=backend)
                body.append(BlurDownStage(conv, na, ndf * mult))
            else:
                na = norm_act(norm, ndf * mult, "leaky_relu", negative_slope=0.2, backend=backend)
                body.append(ConvNormAct(conv, na))
        self.body = nn.ModuleList(body)
        self.head = nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        x = F.leaky_relu(self.stem(x), 0.2)
        if self.stem_blur is not None:
            x = self.stem_blur(x)
        for layer in self.body:
            x = layer(x)
        return self.head(x)


class PixelDiscriminator(nn.Module):
    """The official 1x1 PixelGAN: Conv1-LeakyReLU, Conv1-Norm-LeakyReLU, Conv1 to 1 channel."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, *, norm: str = "instance", backend: str = "auto"):
        super().__init__()
        check_norm(norm)
        bias = conv_bias(norm)
        self.stem = nn.Conv2d(input_nc, ndf, 1, bias=True)
        self.body = ConvNormAct(
            nn.Conv2d(ndf, 2 * ndf, 1, bias=bias),
            norm_act(norm, 2 * ndf, "leaky_relu", negative_slope=0.2, backend=backend),
        )
        self.head = nn.Conv2d(2 * ndf, 1, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(F.leaky_relu(self.stem(x), 0.2)))


class UdacityDiscriminator(nn.Module):
    """The tutorial's discriminator: Conv4 (s2, p1)-ReLU, three Conv4 (s2, p1)-Norm-ReLU
    (``2ndf``, ``4ndf``, ``8ndf``) and a Conv4 (s1, p1) to 1 channel; bias-free convolutions and
    ``norm="batch"`` as in the tutorial. A 128x128 input gives a 7x7 score map."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, *, norm: str = "batch", backend: str = "auto"):
        super().__init__()
        check_norm(norm)
        self.stem = nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1, bias=False)
        self.body = nn.ModuleList(
            [
                ConvNormAct(
                    nn.Conv2d(ndf * m, ndf * 2 * m, 4, stride=2, padding=1, bias=False),
                    norm_act(norm, ndf * 2 * m, "relu", backend=backend),
                )
                for m in (1, 2, 4)
            ]
        )
        self.head = nn.Conv2d(8 * ndf, 1, 4, stride=1, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        for layer in self.body:
            x = layer(x)
        return self.head(x)


def build_discriminator(
    arch: str,
    input_nc: int = 3,
    ndf: int = 64,
    n_layers: int = 3,
    norm: str = "instance",
    init_type: Optional[str] = "normal",
    init_gain: float = 0.02,
    backend: str = "auto",
    antialias: bool = False,
) -> nn.Module:
    """Build and initialise a discriminator by its official name: ``basic`` (70x70 PatchGAN,
    ``n_layers`` ignored = 3), ``n_layers`` (PatchGAN with ``n_layers``), ``pixel`` (1x1 PixelGAN),
    or ``udacity`` (the tutorial's). ``antialias``: the official CUT's blur-pool downsampling
    (the PatchGANs; the others have no downsampling to change, as there).

    For a WGAN-GP gradient penalty the discriminator needs double backward, which only the
    ``torch`` backend provides: build it with ``backend="torch"``."""
    check_norm(norm)
    if arch == "basic":
        net: nn.Module = NLayerDiscriminator(input_nc, ndf, 3, norm=norm, backend=backend, antialias=antialias)
    elif arch == "n_layers":
        net = NLayerDiscriminator(input_nc, ndf, n_layers, norm=norm, backend=backend, antialias=antialias)
    elif arch == "pixel":
        net = PixelDiscriminator(input_nc, ndf, norm=norm, backend=backend)
    elif arch == "udacity":
        net = UdacityDiscriminator(input_nc, ndf, norm=norm, backend=backend)
    else:
        raise ValueError(f"build_discriminator: unknown arch {arch!r}; choose from {DISCRIMINATOR_ARCHS}")
    init_weights(net, init_type, init_gain)
    net.config = dict(arch=arch, input_nc=input_nc, ndf=ndf, n_layers=n_layers, norm=norm)
    return net
