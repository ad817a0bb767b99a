"""Paired evaluation (pix2pix): a generator's outputs on ``dataroot/<phase>/`` pair images scored
against their targets.

    fastcgan-eval --checkpoint runs/facades --dataroot datasets/facades     # a pix2pix run

:func:`fastcgan.evaluate.evaluate` comes here when ``dataroot`` has the paired layout (a
``<phase>/`` folder and no ``<phase>A/``). The generator runs through the deploy runtime
(:func:`fastcgan.deploy.load`, the code that ships: padding to the size multiple, batching,
BatchNorm as the artifact records it). Which half is the input: ``direction`` when given, else the
run's own ``--direction`` (its ``config.json``), else AtoB (left half = input). A pix2pix run's
generator is always ``generator_AtoB.safetensors`` (input -> target, whatever the direction).

Metrics, under ``"AtoB"`` (the one generator), on [0, 1] intensities, averaged over images:

* ``l1``: mean absolute error to the target; ``psnr``: torchmetrics ``peak_signal_noise_ratio``
  (data range 1) per image; ``ssim``: torchmetrics ``structural_similarity_index_measure``
  (Gaussian 11x11, sigma 1.5, data range 1) per image;
* ``identity_l1`` / ``identity_psnr`` / ``identity_ssim``: the same for the untranslated input
  (the score of doing nothing), when input and target have the same shape;
* ``fid``, ``kid_mean`` / ``kid_std`` of the outputs against the targets, with ``fid=True`` and the
  metrics extra installed (:mod:`fastcgan.metrics`; skipped with the reason otherwise).

Images are evaluated at their own size, or resized to a square ``load_size`` first (bicubic,
rounded to uint8), inputs and targets alike.

Colorization generators (``color_space="lab"`` in the artifact's config): ``<phase>/`` holds plain
colour images, each its own target; the generator sees the image (and keeps only its lightness),
and the baseline is ``grey_l1`` / ``grey_psnr`` / ``grey_ssim``: the image with its colour removed
(a* = b* = 0), the score of not colorizing at all.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

__all__ = ["evaluate_paired", "is_paired_root", "load_pairs", "paired_metrics"]


def is_paired_root(dataroot: str, phase: str = "test") -> bool:
    """Whether ``dataroot`` holds pix2pix pairs for ``phase`` (``<phase>/``, no ``<phase>A/``)."""
    pairs = os.path.isdir(os.path.join(dataroot, phase))
    return pairs and not os.path.isdir(os.path.join(dataroot, phase + "A"))


def _run_direction(checkpoint: str) -> Optional[str]:
    try:
        with open(os.path.join(checkpoint, "config.json")) as f:
            return json.load(f)["data"].get("direction")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def load_pairs(
    dataroot: str,
    phase: str = "test",
    direction: str = "AtoB",
    input_nc: int = 3,
    output_nc: int = 3,
    size: Optional[int] = None,
    max_images: Optional[int] = None,
    self_paired: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str], list[str]]:
    """(uint8 inputs, uint8 targets, pair paths, skipped paths) of ``dataroot/<phase>/``, sorted;
    unreadable and odd-width files are skipped (as by :class:`fastcgan.data.AlignedDataset`).
    ``self_paired`` (colorization): every image is its own pair, input and target alike."""
    from fastcgan.data import make_dataset, split_pair
    from fastcgan.data.images import BadImageError, open_image, pil_to_tensor
    from fastcgan.evaluate import resize_uint8

    folder = os.path.join(dataroot, phase)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--dataroot {dataroot}: no {phase}/ folder of pair images")
    paths = make_dataset(folder)
    if max_images is not None:
        paths = paths[:max_images]
    inputs, targets, names, skipped = [], [], [], []
    for p in paths:
        try:
            img = open_image(p, 3)
            left, right = (img, img) if self_paired else split_pair(img, p)
        except BadImageError:
            skipped.append(p)
            continue
        a, b = (left, right) if direction == "AtoB" else (right, left)
        a, b = (a.convert("L") if input_nc == 1 else a), (b.convert("L") if output_nc == 1 else b)
        inputs.append(resize_uint8(pil_to_tensor(a), size))
        targets.append(resize_uint8(pil_to_tensor(b), size))
        names.append(p)
    if not inputs:
        raise FileNotFoundError(f"{folder}: no readable pair images")
    return inputs, targets, names, skipped


def _grey(x: torch.Tensor) -> torch.Tensor:
    """An RGB image in [-1, 1] with its colour removed (a* = b* = 0, L* kept), rounded to 8 bits as
    a saved output would be."""
    from fastcgan.color import decolorize

    return decolorize(x).add(1).mul(127.5).round().div(127.5).sub(1.0)


def paired_metrics(pred: list[torch.Tensor], target: list[torch.Tensor]) -> dict:
    """Mean per-image L1, PSNR and SSIM (torchmetrics) of float [-1, 1] images ``pred`` against
    ``target``; images of one size are scored together."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    l1s, psnrs, ssims = [], [], []
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(target):
        groups.setdefault(tuple(t.shape), []).append(i)
    for idx in groups.values():
        p = torch.stack([pred[i].float().cpu() for i in idx]).add(1).div(2).clamp(0, 1)
        t = torch.stack([target[i].float().cpu() for i in idx]).add(1).div(2).clamp(0, 1)
        l1s.append((p - t).abs().mean(dim=(1, 2, 3)))
        psnrs.append(peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3)))
        ssims.append(structural_similarity_index_measure(p, t, data_range=1.0, reduction="none"))
    return {
        "l1": torch.cat(l1s).mean().item(),
        "psnr": torch.cat(psnrs).mean().item(),
        "ssim": torch.cat(ssims).mean().item(),
    }


def evaluate_paired(
    checkpoint,
    dataroot: str,
    phase: str = "test",
    device="cpu",
    direction: Optional[str] = None,
    engine: Optional[str] = None,
    trust_artifact: bool = False,
    batch_size: int = 8,
    max_images: Optional[int] = None,
    load_size: Optional[int] = None,
    fid: bool = False,
    inception_weights_path: Optional[str] = None,
    amp_dtype: Optional[torch.dtype] = None,
    inception_dtype: Optional[torch.dtype] = None,
) -> dict:
    """``{"AtoB": {n, skipped, direction, l1, psnr, ssim, identity_*, [fid, kid_*]}}`` for the
    generator of ``checkpoint`` (a pix2pix run directory, any artifact :func:`fastcgan.deploy.load`
    accepts, or a loaded :class:`fastcgan.deploy.Translator`) on ``dataroot/<phase>/``."""
    from fastcgan.deploy import Translator, load
    from fastcgan.devices import resolve_device
    from fastcgan.evaluate import _inception_or_reason, translate_images

    dev = resolve_device(str(device))
    if isinstance(checkpoint, Translator):
        tr = checkpoint
    else:
        if direction is None and os.path.isdir(checkpoint):
            direction = _run_direction(checkpoint)
        tr = load(
            checkpoint, direction="AtoB", device=str(dev), engine=engine, batch_size=batch_size,
            bf16=amp_dtype == torch.bfloat16, fp16=amp_dtype == torch.float16, trust_artifact=trust_artifact,
        )
    direction = direction or "AtoB"
    if direction not in ("AtoB", "BtoA"):
        raise ValueError(f"direction must be AtoB or BtoA, got {direction!r}")
    colorizer = (tr.spec.config or {}).get("color_space") == "lab"
    inputs, targets, _, skipped = load_pairs(
        dataroot, phase, direction, tr.input_nc, tr.output_nc or tr.input_nc, load_size, max_images,
        self_paired=colorizer,
    )
    fake = translate_images(tr, inputs)
    real_in = [x.float().div(127.5).sub(1.0) for x in inputs]
    real_out = [x.float().div(127.5).sub(1.0) for x in targets]
    r: dict = {"n": len(inputs), "skipped": len(skipped), "direction": direction}
    r.update(paired_metrics(fake, real_out))
    if colorizer:  # the baseline: the input without its colour
        r.update({f"grey_{k}": v for k, v in paired_metrics([_grey(x) for x in real_in], real_out).items()})
    elif all(x.shape == t.shape for x, t in zip(real_in, real_out)):
        r.update({f"identity_{k}": v for k, v in paired_metrics(real_in, real_out).items()})
    results: dict = {}
    if fid:
        inception, why = _inception_or_reason(dev, inception_weights_path, inception_dtype)
        if inception is None:
            results["fid_status"] = why
        else:
            from fastcgan.metrics import NETWORK, fid_kid, to_uint8

            results["fid_network"] = NETWORK
            results["fid_inception_dtype"] = str(inception.dtype).replace("torch.", "")
            r.update(fid_kid([to_uint8(f) for f in fake], inception=inception,
                             real_features=inception.extract(targets)))
    results["AtoB"] = r
    return results
