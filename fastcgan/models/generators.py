"""Generators: the official CycleGAN ResNet and U-Net generators, and the tutorial 128x128 one.

Names follow the official repository (``resnet_9blocks``, ``resnet_6blocks``, ``unet_128``,
``unet_256``) so recipes carry over; :mod:`fastcgan.models.official` converts their checkpoints.
Every InstanceNorm (+activation, +residual add, +reflection pad) runs through
:class:`fastcgan.nn.InstanceNormAct` / :class:`fastcgan.nn.ReflectionResidualBlock`, i.e. the
``fastcgan.ops.instance_norm_act`` seam; BatchNorm and "none" use plain torch modules.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastcgan.models._blocks import (
    BlurDownStage,
    BlurUpStage,
    ConvNormAct,
    check_bn_inference,
    check_norm,
    conv_bias,
    init_weights,
    norm_act,
    set_bn_inference,
)
from fastcgan.nn import GlobalBatchDropout, ReflectionResidualBlock

GENERATOR_ARCHS = ("resnet_9blocks", "resnet_6blocks", "unet_128", "unet_256", "udacity")


class PaddedResidualBlock(nn.Module):
    """The official ResnetBlock for ``norm="batch"``/``"none"`` with the same contract as
    :class:`fastcgan.nn.ReflectionResidualBlock`: input reflection-padded by 1, output
    ``x + block(x)`` padded by ``out_pad``. Keys ``conv1``/``norm1``/``conv2``/``norm2`` as there."""

    def __init__(self, dim: int, norm: str, *, dropout: float = 0.0, out_pad: int = 1):
        super().__init__()
        bias = conv_bias(norm)
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=0, bias=bias)
        # With dropout the pad must follow it (official order), so norm1 does not pad then.
        self.norm1 = norm_act(norm, dim, "relu", pad=0 if dropout > 0 else 1)
        self.dropout = GlobalBatchDropout(dropout) if dropout > 0 else None
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=0, bias=bias)
        self.norm2 = norm_act(norm, dim, "none", pad=out_pad)

    def forward(self, xp: Tensor) -> Tensor:
        x = xp[:, :, 1:-1, 1:-1]
        h = self.norm1(self.conv1(xp))
        if self.dropout is not None:
            h = F.pad(self.dropout(h), (1, 1, 1, 1), mode="reflect")
        return self.norm2(self.conv2(h), residual=x)


class ResnetGenerator(nn.Module):
    """The official CycleGAN ResNet generator (Johnson et al.): ReflPad3-Conv7-Norm-ReLU, two
    stride-2 Conv3-Norm-ReLU, ``n_blocks`` residual blocks, two ConvTranspose3 (s2, p1, op1)-Norm-
    ReLU, ReflPad3-Conv7-Tanh.

    Input H and W must be multiples of 4 and at least 8 (the two stride-2 convolutions must
    invert exactly under the transposed ones, and the trunk must be at least 2x2 for its
    reflection pad); use :func:`generator_size_multiple` to pad-and-crop other sizes.

    With ``norm="instance"`` the trunk runs on reflection-padded tensors: the second downsampling
    norm emits pad 1, every residual block takes the padded tensor and emits pad 1 (the last
    emits 0), and the last upsampling norm emits the final pad 3, so no ReflectionPad2d runs
    except the stem's pad of the raw image. Keys: ``stem.*``, ``down.{0,1}.*``, ``blocks.{i}.*``,
    ``up.{0,1}.*``, ``head.*``.

    ``antialias`` / ``antialias_up``: the official CUT default resampling (its ``--no_antialias`` /
    ``--no_antialias_up`` off): each downsampling stage is Conv3 (s1, p1)-Norm-ReLU and a [1 2 1]
    blur-pool (:class:`~fastcgan.models._blocks.BlurDownStage`; the norm writes the blur's pad),
    each upsampling stage a [1 3 3 1] blur upsampling then Conv3 (s1, p1)-Norm-ReLU
    (:class:`~fastcgan.models._blocks.BlurUpStage`). Same parameters and keys (the up convs are
    ``Conv2d`` instead of ``ConvTranspose2d``); 4x the down convs' and the up convs' compute.
    """

    def __init__(
        self,
        input_nc: int = 3,
        output_nc: int = 3,
        ngf: int = 64,
        *,
        n_blocks: int = 9,
        norm: str = "instance",
        use_dropout: bool = False,
        backend: str = "auto",
        antialias: bool = False,
        antialias_up: bool = False,
    ):
        super().__init__()
        check_norm(norm)
        if n_blocks < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_blocks}")
        self.input_nc, self.output_nc, self.ngf = input_nc, output_nc, ngf
        self.n_blocks, self.norm, self.use_dropout = n_blocks, norm, use_dropout
        self.antialias, self.antialias_up = antialias, antialias_up
        bias = conv_bias(norm)

        def na(c, pad=0):
            return norm_act(norm, c, "relu", pad=pad, backend=backend)

        self.stem = ConvNormAct(nn.Conv2d(input_nc, ngf, 7, padding=0, bias=bias), na(ngf))
        # The last downsampling stage pads for the first residual block (or, with no blocks, not).
        trunk_pad = 1 if n_blocks > 0 else 0
        if antialias:
            self.down = nn.ModuleList(
                [
                    BlurDownStage(nn.Conv2d(c, 2 * c, 3, stride=1, padding=1, bias=bias), na(2 * c, pad=1), 2 * c,
                                  out_pad=trunk_pad if c == 2 * ngf else 0)
                    for c in (ngf, 2 * ngf)
                ]
            )
        else:
            self.down = nn.ModuleList(
                [
                    ConvNormAct(nn.Conv2d(ngf, 2 * ngf, 3, stride=2, padding=1, bias=bias), na(2 * ngf)),
                    ConvNormAct(nn.Conv2d(2 * ngf, 4 * ngf, 3, stride=2, padding=1, bias=bias),
                                na(4 * ngf, pad=trunk_pad)),
                ]
            )
        dim, p = 4 * ngf, 0.5 if use_dropout else 0.0
        blocks = []
        for i in range(n_blocks):
            out_pad = 1 if i < n_blocks - 1 else 0
            if norm == "instance":
                blocks.append(ReflectionResidualBlock(dim, dropout=p, out_pad=out_pad, backend=backend))
            else:
                blocks.append(PaddedResidualBlock(dim, norm, dropout=p, out_pad=out_pad))
        self.blocks = nn.ModuleList(blocks)
        # The head's ReflectionPad2d(3) is written by the last upsampling norm.
        if antialias_up:
            self.up = nn.ModuleList(
                [
                    BlurUpStage(c, nn.Conv2d(c, c // 2, 3, stride=1, padding=1, bias=bias),
                                na(c // 2, pad=3 if c == 2 * ngf else 0))
                    for c in (4 * ngf, 2 * ngf)
                ]
            )
        else:
            up_conv = dict(kernel_size=3, stride=2, padding=1, output_padding=1, bias=bias)
            self.up = nn.ModuleList(
                [
                    ConvNormAct(nn.ConvTranspose2d(4 * ngf, 2 * ngf, **up_conv), na(2 * ngf)),
                    ConvNormAct(nn.ConvTranspose2d(2 * ngf, ngf, **up_conv), na(ngf, pad=3)),
                ]
            )
        self.head = nn.Conv2d(ngf, output_nc, 7, padding=0, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        _check_resnet_input(x)
        y = self.stem(F.pad(x, (3, 3, 3, 3), mode="reflect"))
        for layer in self.down:
            y = layer(y)
        for block in self.blocks:
            y = block(y)
        for layer in self.up:
            y = layer(y)
        return torch.tanh(self.head(y))

    # --- encoder features (CUT / PatchNCE) -------------------------------------------------------
    #
    # The official CUT code selects features by index into the official generator's flat
    # nn.Sequential (``--nce_layers 0,4,8,12,16``). Our modules fuse norm+ReLU(+pad), so the indices
    # are mapped here onto the tensors they denote. The official list for this architecture (CUT's
    # ``--no_antialias --no_antialias_up``, i.e. the CycleGAN ResNet with strided convolutions that
    # fastcgan builds; n = n_blocks) is:
    #
    #   0 ReflectionPad2d(3)   1 Conv7  2 Norm  3 ReLU       (stem)
    #   4 Conv3 s2  5 Norm  6 ReLU                           (down[0])
    #   7 Conv3 s2  8 Norm  9 ReLU                           (down[1])
    #   10 .. 9+n ResnetBlock                                (blocks[0 .. n-1])
    #   10+n ConvT  11+n Norm  12+n ReLU                     (up[0])
    #   13+n ConvT  14+n Norm  15+n ReLU                     (up[1])
    #   16+n ReflectionPad2d(3)  17+n Conv7  18+n Tanh       (head)
    #
    # Its ReLUs are in place, so the tensor it records at a Norm index has already been ReLU'd by
    # the next module: a Norm index and the ReLU index after it denote the same tensor, which is
    # our fused norm's output (interior, without the pad it emits for the next conv).

    def _official_layers(self) -> list[tuple[str, int]]:
        """(module class, output channels) at each index of the official ``nn.Sequential``: the
        table above, or with ``antialias`` a ``Downsample`` after each downsampling ReLU and with
        ``antialias_up`` ``Upsample``-Conv2d-Norm-ReLU upsampling stages (the official CUT default)."""
        ngf = self.ngf
        layers = [("ReflectionPad2d", self.input_nc)] + [(k, ngf) for k in ("Conv2d", "Norm", "ReLU")]
        for c in (2 * ngf, 4 * ngf):
            layers += [(k, c) for k in ("Conv2d", "Norm", "ReLU")] + ([("Downsample", c)] if self.antialias else [])
        layers += [("ResnetBlock", 4 * ngf)] * self.n_blocks
        for c in (2 * ngf, ngf):
            up = [("Upsample", 2 * c), ("Conv2d", c)] if self.antialias_up else [("ConvTranspose2d", c)]
            layers += up + [("Norm", c), ("ReLU", c)]
        return layers + [("ReflectionPad2d", ngf), ("Conv2d", self.output_nc), ("Tanh", self.output_nc)]

    def official_layer_names(self) -> list[str]:
        """The official ``nn.Sequential`` module class at each index (see the table above)."""
        return [name for name, _ in self._official_layers()]

    def feature_channels(self, layers: Sequence[int]) -> list[int]:
        """Channels of the features :meth:`encode` returns for official indices ``layers``
        (known up front, so projection heads need no data-dependent initialisation)."""
        chans = [c for _, c in self._official_layers()]
        return [chans[i] for i in self._check_layers(layers)]

    def _check_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        layers = tuple(int(i) for i in layers)
        n_official = len(self._official_layers())
        if any(b <= a for a, b in zip(layers, layers[1:])) or any(not 0 <= i < n_official for i in layers):
            raise ValueError(
                f"ResnetGenerator: layers must be strictly increasing official module indices in "
                f"[0, {n_official}), got {list(layers)}"
            )
        return layers

    def encode(self, x: Tensor, layers: Sequence[int] = (0, 4, 8, 12, 16), *, with_output: bool = False):
        """Features at the official CUT module indices ``layers`` (strictly increasing), in one pass.

        Returns the list of feature maps, or ``(output, features)`` with ``with_output=True`` (the
        output equals ``forward(x)``). Without the output, the pass stops after the last requested
        layer, so the decoder does not run. For ``resnet_9blocks`` and the official
        ``--nce_layers 0,4,8,12,16`` (256x256 input, ngf 64) the features are:

        * 0: the input reflection-padded by 3 (3 x 262 x 262);
        * 4: ``down[0].conv``'s output, before its norm (128 x 128 x 128);
        * 8: ``down[1]``'s InstanceNorm+ReLU output, interior of the padded tensor (256 x 64 x 64);
        * 12: ``blocks[2]``'s output (256 x 64 x 64);
        * 16: ``blocks[6]``'s output (256 x 64 x 64).

        With ``antialias`` (the official CUT default) the same indices are the padded input, the
        stride-1 Conv3 outputs of the two downsampling stages before their norms (128 x 256²,
        256 x 128²) and the outputs of blocks 0 and 4; channel counts, hence head sizes, are the same.

        Features are views of the tensors the forward computes (padded tensors are cropped by
        slicing, no copy); gradients flow through them to the generator.
        """
        _check_resnet_input(x)
        layers = self._check_layers(layers)
        if not layers and not with_output:
            return []
        want = set(layers)
        stop = -1 if with_output else layers[-1]
        feats: list[Tensor] = []

        def tap(i: int, t: Tensor, crop: int) -> bool:
            if i in want:
                feats.append(t[:, :, crop:-crop, crop:-crop] if crop else t)
            return i == stop

        y = F.pad(x, (3, 3, 3, 3), mode="reflect")
        if tap(0, y, 0):
            return feats
        i = 1
        for stage in (self.stem, *self.down, None, *self.up):
            if stage is None:  # the residual blocks, between the down and the up stages
                for block in self.blocks:
                    y = block(y)
                    if tap(i, y, block.norm2.pad):
                        return feats
                    i += 1
                continue
            if isinstance(stage, BlurUpStage):  # Upsample, then Conv2d-Norm-ReLU
                y = stage.up(y)
                if tap(i, y, 0):
                    return feats
                i += 1
            c = stage.conv(y)
            if tap(i, c, 0):
                return feats
            y = stage.norm(c)
            a, b = tap(i + 1, y, stage.norm.pad), tap(i + 2, y, stage.norm.pad)
            if a or b:
                return feats
            i += 3
            if isinstance(stage, BlurDownStage):  # Conv2d-Norm-ReLU, then Downsample
                y = stage.blur(y)
                if tap(i, y, 0):
                    return feats
                i += 1
                if stage.out_pad:
                    y = F.pad(y, (stage.out_pad,) * 4, mode="reflect")
        # The head's ReflectionPad2d(3) was emitted by up[1]'s norm: y is that padded tensor.
        if tap(i, y, 0):
            return feats
        h = self.head(y)
        if tap(i + 1, h, 0):
            return feats
        out = torch.tanh(h)
        tap(i + 2, out, 0)
        return (out, feats) if with_output else feats


def _check_resnet_input(x: Tensor) -> None:
    h, w = x.shape[-2], x.shape[-1]
    if h % 4 or w % 4 or h < 8 or w < 8:
        raise ValueError(
            f"ResnetGenerator: input height and width must be multiples of 4 and at least 8, got "
            f"{h}x{w}; pad-and-crop to a multiple of generator_size_multiple('resnet_9blocks') = 4"
        )


class _UnetLevel(nn.Module):
    """Parameter container for one level of the U-Net (no forward; the generator runs the levels)."""

    def __init__(self, down_conv, down_norm, up_conv, up_norm, dropout):
        super().__init__()
        self.down_conv = down_conv
        self.down_norm = down_norm
        self.up_conv = up_conv
        self.up_norm = up_norm
        self.dropout = dropout


class UnetGenerator(nn.Module):
    """The official U-Net generator (pix2pix / DiscoGAN-style): ``num_downs`` stride-2 Conv4 levels
    down to 1x1 at the bottleneck for an input of ``2**num_downs``, skip connections by channel
    concatenation, ConvTranspose4 (s2, p1) up, Tanh out. Levels are numbered from the outermost
    (0) to the innermost (``num_downs - 1``); keys ``levels.{k}.{down_conv,down_norm,up_conv,up_norm}``.

    Faithful to the official forward, including a detail of its in-place LeakyReLU: the skip
    connection of every inner level carries LeakyReLU(0.2) of the level's input, not the raw
    input. Down norms fuse that LeakyReLU; up norms fuse the ReLU the parent level applies to the
    concatenation. Dropout(0.5) follows the up norm of the ``ngf*8 -> ngf*8`` middle levels when
    ``use_dropout``. H and W must be multiples of ``2**num_downs``.
    """

    def __init__(
        self,
        input_nc: int = 3,
        output_nc: int = 3,
        num_downs: int = 8,
        ngf: int = 64,
        *,
        norm: str = "instance",
        use_dropout: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        check_norm(norm)
        if num_downs < 5:
            raise ValueError(f"UnetGenerator: num_downs must be >= 5, got {num_downs}")
        self.input_nc, self.output_nc, self.ngf = input_nc, output_nc, ngf
        self.num_downs, self.norm, self.use_dropout = num_downs, norm, use_dropout
        bias = conv_bias(norm)
        last = num_downs - 1
        levels = []
        for k in range(num_downs):
            outer = output_nc if k == 0 else ngf * min(2 ** (k - 1), 8)
            inner = ngf * min(2**k, 8)
            in_nc = input_nc if k == 0 else outer
            down_conv = nn.Conv2d(in_nc, inner, 4, stride=2, padding=1, bias=bias)
            # The middle levels' down norm; its LeakyReLU is the next level's (in-place) downrelu.
            down_norm = (
                norm_act(norm, inner, "leaky_relu", negative_slope=0.2, backend=backend)
                if 0 < k < last
                else None
            )
            up_in = inner if k == last else 2 * inner
            up_conv = nn.ConvTranspose2d(up_in, outer, 4, stride=2, padding=1, bias=True if k == 0 else bias)
            up_norm = norm_act(norm, outer, "relu", backend=backend) if k > 0 else None
            dropout = GlobalBatchDropout(0.5) if use_dropout and 4 <= k < last else None
            levels.append(_UnetLevel(down_conv, down_norm, up_conv, up_norm, dropout))
        self.levels = nn.ModuleList(levels)

    def forward(self, x: Tensor) -> Tensor:
        m = 2**self.num_downs
        h, w = x.shape[-2], x.shape[-1]
        if h % m or w % m:
            raise ValueError(
                f"UnetGenerator: input height and width must be multiples of 2**{self.num_downs} = {m}, "
                f"got {h}x{w}"
            )
        levels = self.levels
        last = self.num_downs - 1
        # a_k = LeakyReLU(input of level k): both the level's down path and its skip connection.
        a = F.leaky_relu(levels[0].down_conv(x), 0.2)
        skips = [a]
        for k in range(1, last):
            a = levels[k].down_norm(levels[k].down_conv(a))
            skips.append(a)
        u = levels[last].up_norm(levels[last].up_conv(F.relu(levels[last].down_conv(a))))
        for k in range(last - 1, 0, -1):
            # relu(cat([a, u])) with u already ReLU'd by its fused norm.
            u = levels[k].up_norm(levels[k].up_conv(torch.cat([F.relu(skips[k]), u], 1)))
            if levels[k].dropout is not None:
                u = levels[k].dropout(u)
        return torch.tanh(levels[0].up_conv(torch.cat([F.relu(skips[0]), u], 1)))


class _ZeroPadResidualBlock(nn.Module):
    """Conv3(p1)-Norm-ReLU-Conv3(p1)-Norm plus skip (zero padding, as in the tutorial)."""

    def __init__(self, dim: int, norm: str, backend: str):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.norm1 = norm_act(norm, dim, "relu", backend=backend)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.norm2 = norm_act(norm, dim, "none", backend=backend)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(self.conv2(self.norm1(self.conv1(x))), residual=x)


class UdacityGenerator(nn.Module):
    """The popular tutorial's 128x128 CycleGAN generator: three Conv4 (s2, p1)-Norm-ReLU encoder
    layers (``ngf``, ``2ngf``, ``4ngf``), ``n_blocks`` zero-padded residual blocks, two
    ConvTranspose4 (s2, p1)-Norm-ReLU decoder layers and a ConvTranspose4 to ``output_nc`` with
    Tanh. The tutorial uses ``norm="batch"`` and bias-free convolutions (kept here for every
    norm). H and W must be multiples of 8."""

    def __init__(
        self,
        input_nc: int = 3,
        output_nc: int = 3,
        ngf: int = 64,
        *,
        n_blocks: int = 6,
        norm: str = "batch",
        backend: str = "auto",
    ):
        super().__init__()
        check_norm(norm)
        self.input_nc, self.output_nc, self.ngf, self.norm = input_nc, output_nc, ngf, norm

        def down(i, o):
            return ConvNormAct(
                nn.Conv2d(i, o, 4, stride=2, padding=1, bias=False),
                norm_act(norm, o, "relu", backend=backend),
            )

        def up(i, o):
            return ConvNormAct(
                nn.ConvTranspose2d(i, o, 4, stride=2, padding=1, bias=False),
                norm_act(norm, o, "relu", backend=backend),
            )

        self.encoder = nn.ModuleList([down(input_nc, ngf), down(ngf, 2 * ngf), down(2 * ngf, 4 * ngf)])
        self.blocks = nn.ModuleList([_ZeroPadResidualBlock(4 * ngf, norm, backend) for _ in range(n_blocks)])
        self.decoder = nn.ModuleList([up(4 * ngf, 2 * ngf), up(2 * ngf, ngf)])
        self.head = nn.ConvTranspose2d(ngf, output_nc, 4, stride=2, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2], x.shape[-1]
        if h % 8 or w % 8:
            raise ValueError(f"UdacityGenerator: input height and width must be multiples of 8, got {h}x{w}")
        for layer in self.encoder:
            x = layer(x)
        for block in self.blocks:
            x = block(x)
        for layer in self.decoder:
            x = layer(x)
        return torch.tanh(self.head(x))


COLOR_SPACES = ("rgb", "lab")


class LabColorizer(nn.Module):
    """A colorization generator as a deployable image-to-image generator (``color_space="lab"``).

    ``net`` is what pix2pix trains for colorization (the official ``--model colorization``): it maps
    the lightness ``L/50 - 1`` (1 channel) to ``ab/110`` (2 channels). This module wraps it into an
    RGB -> RGB generator in [-1, 1], like every other fastcgan generator: it takes L* of the input
    image (a colour image loses its colour, a grey one is used as it is), predicts a*b* and converts
    L*a*b* back to sRGB. So translate, export (ONNX / TensorRT / AOTInductor), evaluation and the
    tiled runtime treat it as an ordinary 3 -> 3 generator, and the input's lightness is kept exactly
    (up to 8-bit rounding). The colour conversion runs in float32 (:mod:`fastcgan.color`) whatever
    the network's dtype. Keys: ``net.*``; ``config`` is the network's plus ``color_space="lab"``."""

    input_nc = 3
    output_nc = 3

    def __init__(self, net: nn.Module):
        super().__init__()
        if (getattr(net, "input_nc", None), getattr(net, "output_nc", None)) != (1, 2):
            raise ValueError(
                "LabColorizer: the network must map L (input_nc=1) to ab (output_nc=2), got "
                f"input_nc={getattr(net, 'input_nc', None)}, output_nc={getattr(net, 'output_nc', None)}"
            )
        self.net = net
        self.config = dict(getattr(net, "config", {}), color_space="lab")

    def forward(self, x: Tensor) -> Tensor:
        from fastcgan.color import L_SCALE, lab_to_rgb, lightness, model_to_lab

        if x.shape[-3] != 3:
            raise ValueError(f"LabColorizer: expected RGB input (3 channels), got shape {tuple(x.shape)}")
        l_in = lightness((x.float() + 1.0) * 0.5) / L_SCALE - 1.0  # the network's input scale, float32
        ab = self.net(l_in.to(x.dtype))
        return (lab_to_rgb(model_to_lab(l_in, ab)) * 2.0 - 1.0).to(x.dtype)


def generator_size_multiple(arch: str) -> int:
    """H and W of a generator's input must be multiples of this (pad-and-crop other sizes)."""
    if arch in ("resnet_9blocks", "resnet_6blocks"):
        return 4
    if arch == "unet_128":
        return 128
    if arch == "unet_256":
        return 256
    if arch == "udacity":
        return 8
    raise ValueError(f"unknown generator arch {arch!r}; choose from {GENERATOR_ARCHS}")


def build_generator(
    arch: str,
    input_nc: int = 3,
    output_nc: int = 3,
    ngf: int = 64,
    norm: str = "instance",
    use_dropout: bool = False,
    init_type: Optional[str] = "normal",
    init_gain: float = 0.02,
    backend: str = "auto",
    bn_inference: str = "running",
    color_space: str = "rgb",
    antialias: bool = False,
    antialias_up: bool = False,
) -> nn.Module:
    """Build and initialise a generator by its official name (``resnet_9blocks``, ``resnet_6blocks``,
    ``unet_128``, ``unet_256``) or ``udacity`` (the tutorial's; ``use_dropout`` not supported).

    ``backend`` is the InstanceNorm op backend (``auto``/``torch``/``triton``/``cuda``/``cpp``);
    change it later with :func:`fastcgan.nn.set_backend`. ``bn_inference`` (``norm="batch"``
    only): the eval-mode BatchNorm statistics, ``"running"`` or ``"per_image"`` (the official
    test.py's behaviour; see :data:`fastcgan.models.BN_INFERENCE_MODES`), changed later with
    :func:`fastcgan.models.set_bn_inference`. ``color_space="lab"`` (colorization): the network
    maps L (``input_nc=1``) to ab (``output_nc=2``) and is returned inside a :class:`LabColorizer`,
    an RGB -> RGB generator. ``antialias`` / ``antialias_up``: the official CUT's anti-aliased
    down/upsampling (:class:`ResnetGenerator`; the other archs have none, as there). The build
    arguments (without init and backend; with ``bn_inference`` for BatchNorm, ``color_space`` for
    colorization, ``antialias*`` when on) are kept on ``model.config`` for
    :func:`fastcgan.models.save_generator`."""
    check_norm(norm)
    check_bn_inference(bn_inference)
    if color_space not in COLOR_SPACES:
        raise ValueError(f"build_generator: color_space must be one of {COLOR_SPACES}, got {color_space!r}")
    if arch in ("resnet_9blocks", "resnet_6blocks"):
        net: nn.Module = ResnetGenerator(
            input_nc,
            output_nc,
            ngf,
            n_blocks=9 if arch == "resnet_9blocks" else 6,
            norm=norm,
            use_dropout=use_dropout,
            backend=backend,
            antialias=antialias,
            antialias_up=antialias_up,
        )
    elif arch in ("unet_128", "unet_256"):
        net = UnetGenerator(
            input_nc,
            output_nc,
            7 if arch == "unet_128" else 8,
            ngf,
            norm=norm,
            use_dropout=use_dropout,
            backend=backend,
        )
    elif arch == "udacity":
        if use_dropout:
            raise ValueError("build_generator: arch 'udacity' has no dropout; use_dropout must be False")
        net = UdacityGenerator(input_nc, output_nc, ngf, norm=norm, backend=backend)
    else:
        raise ValueError(f"build_generator: unknown arch {arch!r}; choose from {GENERATOR_ARCHS}")
    order = None
    if isinstance(net, UnetGenerator):  # the official draws them in its nested blocks' order
        from fastcgan.models.official import _module_map

        order = [net.get_submodule(ours) for ours, _ in _module_map(net)]
    init_weights(net, init_type, init_gain, order)
    net.config = dict(
        arch=arch, input_nc=input_nc, output_nc=output_nc, ngf=ngf, norm=norm, use_dropout=use_dropout
    )
    if isinstance(net, ResnetGenerator):  # recorded only when on: older generator files stay valid
        net.config.update({k: True for k, v in (("antialias", antialias), ("antialias_up", antialias_up)) if v})
    if norm == "batch":
        set_bn_inference(net, bn_inference)  # also records it in net.config
    return LabColorizer(net) if color_space == "lab" else net
