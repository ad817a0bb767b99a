"""Convert generator checkpoints of the official pytorch-CycleGAN-and-pix2pix repository.

The official networks are ``nn.Sequential`` stacks, so their state-dict keys are positional:

* ResNet (``n`` blocks): ``model.1`` stem conv (``model.2`` its norm), ``model.4``/``model.7`` the
  stride-2 convs (norms ``.5``/``.8``), ``model.{10+i}.conv_block.{1,5}`` the block convs (norms
  ``.2``/``.6``; with dropout the second conv and norm shift to ``.6``/``.7``), ``model.{10+n}``/
  ``model.{13+n}`` the transposed convs (norms ``+1``), ``model.{17+n}`` the final conv.
* U-Net: nested ``UnetSkipConnectionBlock``\\ s, ``model.model.`` for the outermost level and one more
  ``1.model.`` (outermost's submodule index) then ``3.model.`` per inner level; inside a level the
  down conv/norm are ``1``/``2`` and the up conv/norm ``5``/``6`` (outermost ``0``/``3``, innermost
  ``1`` and ``3``/``4``).

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

from fastcgan.models.generators import (
    COLOR_SPACES,
    LabColorizer,
    ResnetGenerator,
    UnetGenerator,
    build_generator,
)
from fastcgan.models.io import MAX_WIDTH

_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _resnet_module_map(n_blocks: int, use_dropout: bool) -> list[tuple[str, str]]:
    """(our module path, official module path) for every conv/norm of the ResNet generator."""
    pairs = [
        ("stem.conv", "model.1"),
        ("stem.norm", "model.2"),
        ("down.0.conv", "model.4"),
        ("down.0.norm", "model.5"),
        ("down.1.conv", "model.7"),
        ("down.1.norm", "model.8"),
    ]
    d = 1 if use_dropout else 0
    for i in range(n_blocks):
        blk = f"model.{10 + i}.conv_block"
        pairs += [
            (f"blocks.{i}.conv1", f"{blk}.1"),
            (f"blocks.{i}.norm1", f"{blk}.2"),
            (f"blocks.{i}.conv2", f"{blk}.{5 + d}"),
            (f"blocks.{i}.norm2", f"{blk}.{6 + d}"),
        ]
    n = n_blocks
    pairs += [
        ("up.0.conv", f"model.{10 + n}"),
        ("up.0.norm", f"model.{11 + n}"),
        ("up.1.conv", f"model.{13 + n}"),
        ("up.1.norm", f"model.{14 + n}"),
        ("head", f"model.{17 + n}"),
    ]
    return pairs


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


def _module_map(model: nn.Module) -> list[tuple[str, str]]:
    if isinstance(model, ResnetGenerator) and (model.antialias or model.antialias_up):
        raise TypeError("official checkpoint keys are mapped for the CycleGAN (strided) ResNet generator, not "
                        "the anti-aliased CUT one (antialias / antialias_up)")
    if isinstance(model, ResnetGenerator):
        return _resnet_module_map(model.n_blocks, model.use_dropout)
    if isinstance(model, UnetGenerator):
        return _unet_module_map(model.num_downs)
    raise TypeError(
        f"official checkpoints exist for ResnetGenerator and UnetGenerator only, got {type(model).__name__}"
    )


def _load_state_dict(src: Union[str, os.PathLike, Mapping]) -> tuple[dict[str, Tensor], str]:
    if isinstance(src, Mapping):
        return dict(src), "<state dict>"
    path = os.fspath(src)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"official checkpoint not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        from fastcgan.models.io import describe_load_error

        raise ValueError(f"cannot read {path} as a PyTorch state dict: {describe_load_error(e)}") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path} does not hold a state dict (found {type(sd).__name__})")
    return dict(sd), path


def _clean(sd: dict, norm: str) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        if "metadata" in k or not isinstance(v, Tensor):
            continue  # __metadata-style entries
        while k.startswith("module."):
            k = k[len("module.") :]  # DataParallel
        out[k] = v
    if norm == "instance":
        # Old official checkpoints kept InstanceNorm running stats; unused with track_running_stats=False.
        out = {k: v for k, v in out.items() if k.rsplit(".", 1)[-1] not in _NORM_BUFFERS}
    return out


def _detect_resnet(sd: dict, where: str) -> tuple[int, bool]:
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"model\.(\d+)\.conv_block\.", k))}
    if not blocks:
        raise ValueError(f"{where}: no 'model.N.conv_block.*' keys, not an official ResNet generator")
    n_blocks = len(blocks)
    if sorted(blocks) != list(range(10, 10 + n_blocks)):
        raise ValueError(f"{where}: residual blocks at unexpected positions {sorted(blocks)}")
    w5, w6 = sd.get("model.10.conv_block.5.weight"), sd.get("model.10.conv_block.6.weight")
    if w5 is not None and w5.dim() == 4:
        return n_blocks, False
    if w6 is not None and w6.dim() == 4:
        return n_blocks, True
    raise ValueError(f"{where}: cannot find the residual block's second conv (conv_block.5 or .6)")


def _detect_unet_depth(sd: dict) -> int:
    depth = 0
    while any(k.startswith(_unet_prefix(depth)) for k in sd):
        depth += 1
    return depth


def _official_dims(sd: dict, arch: str, where: str) -> tuple[int, int, int]:
    """(input_nc, output_nc, ngf) from the first and the last convolution's weight, bounded
    before anything is built from them (a tiny file claiming a huge width must not allocate it)."""
    if arch.startswith("resnet"):
        n_blocks = 9 if arch == "resnet_9blocks" else 6
        first, last, out_dim = "model.1.weight", f"model.{17 + n_blocks}.weight", 0  # Conv2d: (out, in, kh, kw)
    else:
        first, last, out_dim = "model.model.0.weight", "model.model.3.weight", 1  # ConvTranspose2d: (in, out, ...)
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
) -> nn.Module:
    """Load a generator state dict saved by the official repository (``latest_net_G_A.pth``,
    the released ``horse2zebra.pth`` ...) into our generator, in eval mode; its outputs equal the
    official network's with those weights (same convolutions; norms to fp32 rounding).

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
    sd = _clean(raw, norm)
    if arch in ("resnet_9blocks", "resnet_6blocks"):
        n_blocks, dropout_in_keys = _detect_resnet(sd, where)
        want = 9 if arch == "resnet_9blocks" else 6
        if n_blocks != want:
            raise ValueError(f"{where}: holds a ResNet generator with {n_blocks} blocks, but arch={arch!r}")
        if use_dropout is None:
            use_dropout = dropout_in_keys
        elif use_dropout != dropout_in_keys:
            raise ValueError(
                f"{where}: use_dropout={use_dropout} but the checkpoint's block layout says "
                f"use_dropout={dropout_in_keys}"
            )
    elif arch in ("unet_128", "unet_256"):
        depth, want = _detect_unet_depth(sd), (7 if arch == "unet_128" else 8)
        if depth != want:
            raise ValueError(f"{where}: holds a U-Net with {depth} levels, but arch={arch!r} has {want}")
        use_dropout = bool(use_dropout)
    else:
        raise ValueError(
            f"load_official_generator: arch must be resnet_9blocks, resnet_6blocks, unet_128 or "
            f"unet_256, got {arch!r}"
        )
    file_in, file_out, file_ngf = _official_dims(sd, arch, where)
    input_nc = file_in if input_nc is None else input_nc
    output_nc = file_out if output_nc is None else output_nc
    ngf = file_ngf if ngf is None else ngf

    model = build_generator(
        arch, input_nc, output_nc, ngf, norm=norm, use_dropout=use_dropout, init_type=None, backend=backend,
        bn_inference=bn_inference,
    )
    ours_to_official = dict(_module_map(model))
    official_to_ours = {v: k for k, v in ours_to_official.items()}
    converted, unknown = {}, []
    for k, v in sd.items():
        mod, _, name = k.rpartition(".")
        if mod in official_to_ours:
            converted[f"{official_to_ours[mod]}.{name}"] = v
        else:
            unknown.append(k)
    expected = model.state_dict()
    missing = [k for k in expected if k not in converted]

    def official_key(k: str) -> str:
        mod, _, name = k.rpartition(".")
        return f"{ours_to_official.get(mod, mod)}.{name}"

    if unknown or missing:
        raise ValueError(
            f"{where}: not an official {arch} (norm={norm!r}, use_dropout={use_dropout}) state dict; "
            f"unexpected keys {unknown[:8]}{'...' if len(unknown) > 8 else ''}, "
            f"missing {[official_key(k) for k in missing[:8]]}"
        )
    for k, v in converted.items():
        if v.shape != expected[k].shape:
            raise ValueError(
                f"{where}: {official_key(k)} has shape "
                f"{tuple(v.shape)}, expected {tuple(expected[k].shape)} for input_nc={input_nc}, "
                f"output_nc={output_nc}, ngf={ngf}"
            )
    model.load_state_dict(converted, strict=True)
    return (LabColorizer(model) if color_space == "lab" else model).eval()


def official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict under the official repository's keys (CPU, contiguous tensors)."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    if isinstance(model, LabColorizer):  # the official colorization G is the L -> ab network
        model = model.net
    pairs = _module_map(model)
    mapped = {ours for ours, _ in pairs}
    ours_sd = model.state_dict()
    unmapped = [k for k in ours_sd if k.rpartition(".")[0] not in mapped]
    if unmapped:
        raise ValueError(f"no official key for {unmapped[:8]} (norm={getattr(model, 'norm', '?')!r})")
    out = {}
    for ours_mod, official_mod in pairs:  # the official module order
        for k, v in ours_sd.items():
            mod, _, name = k.rpartition(".")
            if mod == ours_mod:
                out[f"{official_mod}.{name}"] = v.detach().cpu().contiguous()
    return out


def save_official_generator(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write ``model`` (a ResNet or U-Net generator) as an official-layout ``torch.save`` state
    dict, loadable by the official repository's ``--netG`` of the same arch, norm and dropout."""
    from fastcgan.fileio import atomic_writer

    with atomic_writer(os.fspath(path)) as f:  # never a half-written file under the final name
        torch.save(official_state_dict(model), f)
