"""Convert generator checkpoints of the official pytorch-CycleGAN-and-pix2pix and CUT repositories.

The official networks are ``nn.Sequential`` stacks, so their state-dict keys are positional:

* ResNet (``n`` blocks): ``model.1`` stem conv (``model.2`` its norm), ``model.4``/``model.7`` the
  stride-2 convs (norms ``.5``/``.8``), ``model.{10+i}.conv_block.{1,5}`` the block convs (norms
  ``.2``/``.6``; with dropout the second conv and norm shift to ``.6``/``.7``), ``model.{10+n}``/
  ``model.{13+n}`` the transposed convs (norms ``+1``), ``model.{17+n}`` the final conv.
* The official CUT's ResNet (its default resampling) adds a ``Downsample`` after each downsampling
  ReLU (stride-1 convs at ``model.4``/``model.8``, blurs ``.7``/``.11``, blocks from ``model.12``)
  and upsamples with ``Upsample``, Conv2d, Norm, ReLU (``model.{12+n}``/``{16+n}`` the blurs, the
  convs one after; final conv ``model.{21+n}``); each blur saves its constant filter as ``filt``.
* U-Net: nested ``UnetSkipConnectionBlock``\\ s, ``model.model.`` for the outermost level and one more
  ``1.model.`` (outermost's submodule index) then ``3.model.`` per inner level; inside a level the
  down conv/norm are ``1``/``2`` and the up conv/norm ``5``/``6`` (outermost ``0``/``3``, innermost
  ``1`` and ``3``/``4``).

The training networks (to continue an official run, :func:`load_official_state_dict`):

* PatchGAN (``NLayerDiscriminator``, ``n`` layers): ``model.0`` the first conv, then per layer its conv
  and norm at ``model.{2+3i}``/``{3+3i}`` and the last conv at ``model.{2+3n}``; anti-aliased (the CUT
  default) a ``Downsample`` follows each downsampling LeakyReLU (``model.2``, then convs at
  ``model.{3+4i}``, norms one after, blurs at ``{6+4i}``, the last conv at ``model.{4n+2}``).
* PixelGAN: ``net.0``, ``net.2`` (norm ``net.3``), ``net.5``.
* CUT's ``PatchSampleF`` (``mlp_sample``): ``mlp_{l}.0`` / ``mlp_{l}.2``, the two Linear layers per NCE layer.

Only layers with parameters or buffers appear (InstanceNorm without affine has none; old
checkpoints saved with ``track_running_stats=True`` carry InstanceNorm running stats, which the
official loader deletes and so do we). The mapping is module path to module path; the tensor
names (``weight``, ``bias``, ``running_mean`` ...) are unchanged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Optional, Union

import torch
from torch import Tensor, nn

from fastcgan.models._blocks import BlurDownsample, BlurUpsample
from fastcgan.models.discriminators import NLayerDiscriminator, PixelDiscriminator
from fastcgan.models.generators import (
    COLOR_SPACES,
    LabColorizer,
    ResnetGenerator,
    UnetGenerator,
    build_generator,
)
from fastcgan.models.io import MAX_WIDTH

_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _resnet_module_map(
    n_blocks: int, use_dropout: bool, antialias: bool = False, antialias_up: bool = False
) -> list[tuple[str, str]]:
    """(our module path, official module path) for every conv/norm (and blur) of the ResNet
    generator, in the official order."""
    pairs = [("stem.conv", "model.1"), ("stem.norm", "model.2")]
    down = 4 if antialias else 3  # Conv-Norm-ReLU(-Downsample) per downsampling stage
    for i in range(2):
        at = 4 + i * down
        pairs += [(f"down.{i}.conv", f"model.{at}"), (f"down.{i}.norm", f"model.{at + 1}")]
        if antialias:
            pairs.append((f"down.{i}.blur", f"model.{at + 3}"))
    first_block = 4 + 2 * down
    d = 1 if use_dropout else 0
    for i in range(n_blocks):
        blk = f"model.{first_block + i}.conv_block"
        pairs += [
            (f"blocks.{i}.conv1", f"{blk}.1"),
            (f"blocks.{i}.norm1", f"{blk}.2"),
            (f"blocks.{i}.conv2", f"{blk}.{5 + d}"),
            (f"blocks.{i}.norm2", f"{blk}.{6 + d}"),
        ]
    up = 4 if antialias_up else 3  # (Upsample-)Conv-Norm-ReLU per upsampling stage
    for i in range(2):
        at = first_block + n_blocks + i * up
        if antialias_up:
            pairs.append((f"up.{i}.up", f"model.{at}"))
            at += 1
        pairs += [(f"up.{i}.conv", f"model.{at}"), (f"up.{i}.norm", f"model.{at + 1}")]
    return pairs + [("head", f"model.{first_block + n_blocks + 2 * up + 1}")]  # after ReflectionPad2d(3)


def _unet_prefix(k: int) -> str:
    prefix = "model.model."
    for j in range(1, k + 1):
        prefix += "1.model." if j == 1 else "3.model."
    return prefix


def _unet_module_map(num_downs: int) -> list[tuple[str, str]]:
    """In the official nesting order (down path outermost-first, then up path innermost-first)."""
    last = num_downs - 1
    down, up = [], []
    for k in range(num_downs):
        p, q = f"levels.{k}.", _unet_prefix(k)
        if k == 0:
            down += [(p + "down_conv", q + "0")]
            up += [(p + "up_conv", q + "3")]
        elif k == last:
            down += [(p + "down_conv", q + "1")]
            up += [(p + "up_conv", q + "3"), (p + "up_norm", q + "4")]
        else:
            down += [(p + "down_conv", q + "1"), (p + "down_norm", q + "2")]
            up += [(p + "up_conv", q + "5"), (p + "up_norm", q + "6")]
    return down + [
        pair for k in range(num_downs - 1, -1, -1) for pair in up if pair[0].startswith(f"levels.{k}.")
    ]


def _nlayer_module_map(n_layers: int, antialias: bool) -> list[tuple[str, str]]:
    """The PatchGAN's conv/norm (and blur) modules, in the official order."""
    pairs = [("stem", "model.0")]
    if not antialias:  # Conv-LeakyReLU, then Conv-Norm-LeakyReLU per layer
        for i in range(n_layers):
            pairs += [(f"body.{i}.conv", f"model.{2 + 3 * i}"), (f"body.{i}.norm", f"model.{3 + 3 * i}")]
        return pairs + [("head", f"model.{2 + 3 * n_layers}")]
    pairs.append(("stem_blur", "model.2"))  # Conv-LeakyReLU-Downsample, then Conv-Norm-LeakyReLU-Downsample
    for i in range(n_layers):
        pairs += [(f"body.{i}.conv", f"model.{3 + 4 * i}"), (f"body.{i}.norm", f"model.{4 + 4 * i}")]
        if i < n_layers - 1:  # the last layer (stride 1) has no blur
            pairs.append((f"body.{i}.blur", f"model.{6 + 4 * i}"))
    return pairs + [("head", f"model.{4 * n_layers + 2}")]


def _module_map(model: nn.Module) -> list[tuple[str, str]]:
    """(our module path, official module path) of every module of ``model`` that has weights or an
    official constant buffer, in the official order."""
    if isinstance(model, LabColorizer):  # the official colorization G is the L -> ab network
        return [(f"net.{ours}", official) for ours, official in _module_map(model.net)]
    if isinstance(model, ResnetGenerator):
        return _resnet_module_map(model.n_blocks, model.use_dropout, model.antialias, model.antialias_up)
    if isinstance(model, UnetGenerator):
        return _unet_module_map(model.num_downs)
    if isinstance(model, NLayerDiscriminator):
        return _nlayer_module_map(len(model.body), model.antialias)
    if isinstance(model, PixelDiscriminator):
        return [("stem", "net.0"), ("body.conv", "net.2"), ("body.norm", "net.3"), ("head", "net.5")]
    from fastcgan.models.patchnce import PatchNCEHeads

    if isinstance(model, PatchNCEHeads):
        return [(f"mlps.{i}.{j}", f"mlp_{i}.{j}") for i in range(len(model.mlps)) for j in (0, 2)]
    raise TypeError(
        "official checkpoints exist for the ResNet and U-Net generators, the PatchGAN and PixelGAN "
        f"discriminators and CUT's PatchNCE heads, not for {type(model).__name__}"
    )


def _load_state_dict(src: Union[str, os.PathLike, Mapping]) -> tuple[dict[str, Tensor], str]:
    from fastcgan.models.torch_files import foreign_tensors

    sd, where = (dict(src), "<state dict>") if isinstance(src, Mapping) else _read_state_dict(os.fspath(src))
    foreign = foreign_tensors(sd.values())
    if foreign:  # complex, quantized, sparse ...: no network's weights (files naming them are refused unread)
        raise ValueError(f"{where}: holds {foreign[0]} tensors: not a saved network")
    return sd, where


def _read_state_dict(path: str) -> tuple[dict[str, Tensor], str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    from fastcgan.models.torch_files import (TorchFileRefused, describe_load_error, load_torch_file,
                                             unbacked_tensor_bytes)

    try:
        sd = load_torch_file(path)
    except TorchFileRefused:
        raise
    except Exception as e:
        raise ValueError(f"cannot read {path} as a PyTorch state dict: {describe_load_error(e)}") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} does not hold a state dict (found {type(sd).__name__})")
    extra = unbacked_tensor_bytes(sd.values())
    if extra:  # shapes are trusted below (the network is built from them)
        raise ValueError(f"{path}: its tensors claim {extra:,} bytes more than they hold (stride-0 or shared "
                         "views): not a saved state dict")
    return dict(sd), path


def _clean(sd: dict, norm: str, where: str) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise ValueError(f"{where}: key {k!r} is not a name: not a state dict")
        if "metadata" in k or not isinstance(v, Tensor):
            continue  # __metadata-style entries
        while k.startswith("module."):
            k = k[len("module.") :]  # DataParallel
        out[k] = v
    if norm == "instance":
        # Old official checkpoints kept InstanceNorm running stats; unused with track_running_stats=False.
        out = {k: v for k, v in out.items() if k.rsplit(".", 1)[-1] not in _NORM_BUFFERS}
    return out


def _is_conv(sd: dict, module: str) -> bool:
    w = sd.get(f"{module}.weight")
    return isinstance(w, Tensor) and w.dim() == 4


def _detect_resnet(sd: dict, where: str) -> tuple[int, bool, bool, bool]:
    """(n_blocks, use_dropout, antialias, antialias_up) from where the official ``nn.Sequential``
    has its convolutions: the CycleGAN (strided) layout has its residual blocks from ``model.10``,
    the anti-aliased CUT one (a ``Downsample`` after each downsampling stage) from ``model.12``;
    after the blocks comes a ``ConvTranspose2d`` or (anti-aliased up) an ``Upsample`` and a Conv2d."""
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"model\.(\d+)\.conv_block\.", k))}
    if not blocks:
        raise ValueError(f"{where}: no 'model.N.conv_block.*' keys, not an official ResNet generator")
    first, n_blocks = min(blocks), len(blocks)
    if first not in (10, 12) or sorted(blocks) != list(range(first, first + n_blocks)):
        raise ValueError(f"{where}: residual blocks at unexpected positions {sorted(blocks)}")
    antialias = first == 12
    if not (_is_conv(sd, "model.4") and _is_conv(sd, "model.8" if antialias else "model.7")):
        raise ValueError(f"{where}: the downsampling convolutions are not where blocks from model.{first} put them")
    after = first + n_blocks
    if _is_conv(sd, f"model.{after}"):
        antialias_up = False
    elif _is_conv(sd, f"model.{after + 1}"):
        antialias_up = True
    else:
        raise ValueError(f"{where}: no upsampling convolution at model.{after} or model.{after + 1}")
    blk = f"model.{first}.conv_block"
    if _is_conv(sd, f"{blk}.5"):
        return n_blocks, False, antialias, antialias_up
    if _is_conv(sd, f"{blk}.6"):
        return n_blocks, True, antialias, antialias_up
    raise ValueError(f"{where}: cannot find the residual block's second conv (conv_block.5 or .6)")


def _detect_unet_depth(sd: dict) -> int:
    depth = 0
    while any(k.startswith(_unet_prefix(depth)) for k in sd):
        depth += 1
    return depth


def _official_dims(sd: dict, arch: str, where: str, head: str) -> tuple[int, int, int]:
    """(input_nc, output_nc, ngf) from the first and the last (``head``) convolution's weight, bounded
    before anything is built from them (a tiny file claiming a huge width must not allocate it)."""
    if arch.startswith("resnet"):
        first, out_dim = "model.1.weight", 0  # Conv2d: (out, in, kh, kw)
    else:
        first, out_dim = "model.model.0.weight", 1  # ConvTranspose2d: (in, out, ...)
    last = f"{head}.weight"
    w_first, w_last = sd.get(first), sd.get(last)
    if not (isinstance(w_first, Tensor) and w_first.dim() == 4 and isinstance(w_last, Tensor) and w_last.dim() == 4):
        raise ValueError(f"{where}: no 4-D '{first}' and '{last}' weights, not an official {arch} generator")
    ngf, input_nc, output_nc = int(w_first.shape[0]), int(w_first.shape[1]), int(w_last.shape[out_dim])
    for what, v, hi in (("input_nc", input_nc, 4), ("output_nc", output_nc, 4), ("ngf", ngf, MAX_WIDTH)):
        if not 1 <= v <= hi:
            raise ValueError(f"{where}: its weights say {what}={v}, outside [1, {hi}]")
    return input_nc, output_nc, ngf


def load_official_generator(
    path_or_state_dict: Union[str, os.PathLike, Mapping],
    arch: str = "resnet_9blocks",
    input_nc: Optional[int] = None,
    output_nc: Optional[int] = None,
    ngf: Optional[int] = None,
    norm: str = "instance",
    use_dropout: Optional[bool] = None,
    backend: str = "auto",
    bn_inference: str = "per_image",
    color_space: str = "rgb",
    antialias: Optional[bool] = None,
    antialias_up: Optional[bool] = None,
) -> nn.Module:
    """Load a generator state dict saved by the official repository (``latest_net_G_A.pth``,
    the released ``horse2zebra.pth`` ...) or by the official CUT repository (its ResNet generator,
    anti-aliased by default) into our generator, in eval mode; its outputs equal the official
    network's with those weights (same convolutions; norms to fp32 rounding).

    ``antialias`` / ``antialias_up`` (ResNet): the official CUT resampling (``Downsample`` after
    each downsampling stage / ``Upsample`` before each upsampling conv); ``None`` reads each from
    where the file has its convolutions, given they must match it. The blur filters the file
    carries (``filt`` buffers) must be the official constant ones; ours are built, not loaded.

    BatchNorm generators (``norm="batch"``, e.g. pix2pix's ``unet_256``): ``bn_inference``
    picks which official behaviour eval mode reproduces. ``"per_image"`` (default): the official
    ``test.py`` as run by default (no ``--eval``: BatchNorm in training mode, i.e. batch
    statistics, at its batch size of 1) -- each image normalised with its own statistics and the
    BN affine, equal to ``test.py`` at batch 1 and per image at any batch. ``"running"``: the
    stored running statistics (``test.py --eval``, PyTorch's ``eval()``). Dropout is off in eval
    mode either way (``test.py`` without ``--eval`` also keeps pix2pix's dropout on, which makes
    its outputs random; call ``.train()`` for that, at the price of batch statistics).

    ``input_nc``, ``output_nc`` and ``ngf`` default to what the first and last convolutions hold
    (the released models: 3, 3, 64); given, they must match.

    Accepts a path or a state dict; strips ``module.`` prefixes, skips metadata entries and, for
    ``norm="instance"``, stale InstanceNorm running stats. ``use_dropout=None`` reads it from the
    keys (ResNet); U-Net keys do not show dropout (it is appended after the last indexed layer),
    so ``None`` means False there - irrelevant in eval mode.

    ``color_space="lab"``: the official ``--model colorization`` generator (L -> ab, so
    ``input_nc``/``output_nc`` are taken as 1 and 2), returned inside a
    :class:`fastcgan.models.LabColorizer` (RGB -> RGB)."""
    if color_space not in COLOR_SPACES:
        raise ValueError(f"load_official_generator: color_space must be one of {COLOR_SPACES}, got {color_space!r}")
    if color_space == "lab":
        input_nc, output_nc = 1, 2
    raw, where = _load_state_dict(path_or_state_dict)
    sd = _clean(raw, norm, where)
    resampling = {}
    if arch in ("resnet_9blocks", "resnet_6blocks"):
        n_blocks, *in_keys = _detect_resnet(sd, where)
        want = 9 if arch == "resnet_9blocks" else 6
        if n_blocks != want:
            raise ValueError(f"{where}: holds a ResNet generator with {n_blocks} blocks, but arch={arch!r}")
        given = {"use_dropout": use_dropout, "antialias": antialias, "antialias_up": antialias_up}
        for (flag, value), found in zip(given.items(), in_keys):
            if value is not None and bool(value) != found:
                raise ValueError(f"{where}: {flag}={value} but the checkpoint's layout says {flag}={found}")
        use_dropout, antialias, antialias_up = in_keys
        resampling = {"antialias": antialias, "antialias_up": antialias_up}
    elif arch in ("unet_128", "unet_256"):
        depth, want = _detect_unet_depth(sd), (7 if arch == "unet_128" else 8)
        if depth != want:
            raise ValueError(f"{where}: holds a U-Net with {depth} levels, but arch={arch!r} has {want}")
        if antialias or antialias_up:
            raise ValueError("load_official_generator: antialias / antialias_up describe ResNet generators")
        use_dropout = bool(use_dropout)
    else:
        raise ValueError(
            f"load_official_generator: arch must be resnet_9blocks, resnet_6blocks, unet_128 or "
            f"unet_256, got {arch!r}"
        )
    if arch.startswith("resnet"):
        head = _resnet_module_map(n_blocks, use_dropout, antialias, antialias_up)[-1][1]
    else:
        head = "model.model.3"
    file_in, file_out, file_ngf = _official_dims(sd, arch, where, head)
    input_nc = file_in if input_nc is None else input_nc
    output_nc = file_out if output_nc is None else output_nc
    ngf = file_ngf if ngf is None else ngf

    def build() -> nn.Module:
        return build_generator(
            arch, input_nc, output_nc, ngf, norm=norm, use_dropout=use_dropout, init_type=None, backend=backend,
            bn_inference=bn_inference, **resampling,
        )

    # Keys and shapes are checked against the network built on the meta device (no memory): a small
    # file whose first weight claims a wide network is refused before that network is allocated.
    with torch.device("meta"):
        model = build()
    converted = _convert(sd, model, where, f"{arch} (norm={norm!r}, use_dropout={use_dropout})",
                         f"input_nc={input_nc}, output_nc={output_nc}, ngf={ngf}")
    model = build()
    model.load_state_dict(converted, strict=True)
    return (LabColorizer(model) if color_space == "lab" else model).eval()


def _convert(sd: dict[str, Tensor], model: nn.Module, where: str, what: str, dims: str) -> dict[str, Tensor]:
    """Official ``sd`` (cleaned) under ``model``'s keys: every key maps, none is missing, every shape
    is ``model``'s (which may be on the meta device) and the blur filters are the official constants
    (ours are rebuilt, so they are checked, not loaded)."""
    ours_to_official = dict(_module_map(model))
    official_to_ours = {v: k for k, v in ours_to_official.items()}
    filter_shapes = {k: f.shape for k, f in _blur_filters(model).items()}
    converted, filters, unknown = {}, {}, []
    for k, v in sd.items():
        mod, _, name = k.rpartition(".")
        if k in filter_shapes:
            filters[k] = v
        elif mod in official_to_ours:
            converted[f"{official_to_ours[mod]}.{name}"] = v
        else:
            unknown.append(k)
    expected = model.state_dict()
    missing = [k for k in expected if k not in converted]

    def official_key(k: str) -> str:
        mod, _, name = k.rpartition(".")
        return f"{ours_to_official.get(mod, mod)}.{name}"

    # A known layer with a tensor this network's layer lacks (a conv bias, a norm's affine or running
    # stats: another --norm than the file's) is unexpected too, not a KeyError further down.
    unknown += [official_key(k) for k in converted if k not in expected]

    if unknown or missing:
        raise ValueError(
            f"{where}: not an official {what} state dict; "
            f"unexpected keys {unknown[:8]}{'...' if len(unknown) > 8 else ''}, "
            f"missing {[official_key(k) for k in missing[:8]]}"
        )
    for k, v in converted.items():
        if v.shape != expected[k].shape:
            raise ValueError(
                f"{where}: {official_key(k)} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)} for {dims}"
            )
    for k, v in filters.items():
        blur = model.get_submodule(official_to_ours[k.rpartition(".")[0]])
        _check_blur_filter(v, _official_filter(blur), k, where)
    return converted


def load_official_state_dict(
    path_or_state_dict: Union[str, os.PathLike, Mapping], model: nn.Module, norm: str = "instance"
) -> dict[str, Tensor]:
    """An official training network's state dict (``latest_net_D_A.pth``, CUT's ``latest_net_F.pth``,
    a generator's) as ``model``'s state dict, for ``model.load_state_dict``. ``model`` -- one of
    ours, built with the official run's settings, possibly on the meta device -- says what the file
    must hold: every official key maps to one of its keys, none is missing, every shape matches (a
    ValueError names the first that does not). ``norm="instance"`` drops stale InstanceNorm running
    stats, as the official loader does.

    Unlike :func:`load_official_generator` this reads no architecture from the file; the caller
    knows it (continuing an official run with its options)."""
    raw, where = _load_state_dict(path_or_state_dict)
    cfg = getattr(model, "config", {})
    what = type(getattr(model, "net", model)).__name__ + (f" ({cfg.get('arch')}, norm={norm!r})" if cfg else "")
    shape = ", ".join(f"{k}={v}" for k, v in cfg.items() if k in ("input_nc", "output_nc", "ngf", "ndf", "n_layers"))
    return _convert(_clean(raw, norm, where), model, where, what, shape or "this network")


def _blur_filters(model: nn.Module) -> dict[str, Tensor]:
    """Official key -> filter for each blur module (the official ``Downsample`` / ``Upsample`` save
    their constant filters as buffers; ours are not saved: they are rebuilt, never learned)."""
    return {
        f"{official}.filt": model.get_submodule(ours).filt
        for ours, official in _module_map(model)
        if isinstance(model.get_submodule(ours), (BlurDownsample, BlurUpsample))
    }


def _official_filter(blur: nn.Module) -> Tensor:
    """The constant filter of ``blur`` (built on the CPU: ``blur`` may be on the meta device)."""
    with torch.device("cpu"):
        return type(blur)(blur.channels).filt


def _check_blur_filter(v: Tensor, want: Tensor, key: str, where: str) -> None:
    if not (isinstance(v, Tensor) and v.shape == want.shape and v.is_floating_point()
            and torch.allclose(v.float(), want.float(), rtol=0, atol=1e-6)):
        raise ValueError(f"{where}: {key} is not the official blur filter of shape {tuple(want.shape)}")


def official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict under the official repository's keys (CPU, contiguous tensors)."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    pairs = _module_map(model)
    mapped = {ours for ours, _ in pairs}
    ours_sd = model.state_dict()
    unmapped = [k for k in ours_sd if k.rpartition(".")[0] not in mapped]
    if unmapped:
        raise ValueError(f"no official key for {unmapped[:8]} (norm={getattr(model, 'norm', '?')!r})")
    blur_filters = _blur_filters(model)
    out = {}
    for ours_mod, official_mod in pairs:  # the official module order
        if f"{official_mod}.filt" in blur_filters:  # the official strict load_state_dict wants them
            out[f"{official_mod}.filt"] = blur_filters[f"{official_mod}.filt"].detach().cpu().float().contiguous()
        for k, v in ours_sd.items():
            mod, _, name = k.rpartition(".")
            if mod == ours_mod:
                out[f"{official_mod}.{name}"] = v.detach().cpu().contiguous()
    return out


def save_official_generator(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write ``model`` (a ResNet or U-Net generator) as an official-layout ``torch.save`` state
    dict, loadable by the official repository's ``--netG`` of the same arch, norm and dropout (an
    anti-aliased ResNet: by the official CUT repository's, without ``--no_antialias(_up)``)."""
    from fastcgan.fileio import atomic_writer

    with atomic_writer(os.fspath(path)) as f:  # never a half-written file under the final name
        torch.save(official_state_dict(model), f)
