"""Colorization (``--model colorization``): the official repository's pix2pix on L*a*b* images.

The official ``colorization`` model is pix2pix with a dataset that turns each colour image into a
pair: the input is its lightness ``L/50 - 1`` (one channel), the target its colour ``ab/110`` (two
channels); G maps 1 -> 2 channels and the conditional D scores ``cat(L, ab)`` (3 channels). This
recipe is exactly that: pix2pix's networks, losses and three-phase step (:mod:`fastcgan.recipes.pix2pix`),
with its own data and sample grid:

* data: :class:`fastcgan.data.ColorizationDataset`, the colour images of ``root/<phase>/`` (as the
  official, which uses skimage: sRGB, D65); the Lab conversion runs on the device after the random
  crop and flip, in float32 (:func:`fastcgan.color.rgb_to_model`), so the loader moves RGB uint8
  images only and ``--data-on-gpu`` holds each image once;
* the deployable generator ``generator_AtoB.safetensors`` is G inside a
  :class:`fastcgan.models.LabColorizer`: RGB (or grey) image in, RGB out, the input's lightness kept,
  so ``fastcgan-translate`` / ``-export`` / ``-eval`` use it like any other generator;
* sample grid rows: the grey input | the colorization | the original.

``--input-nc`` / ``--output-nc`` describe the images (RGB in, RGB out) and stay 3; the networks'
1 -> 2 channels follow from the recipe.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastcgan.recipes import pix2pix
from fastcgan.recipes.base import StepRun, discriminator_options, generator_options, max_dataset_size

L_CHANNELS, AB_CHANNELS = 1, 2


def networks(cfg) -> dict:
    from fastcgan.models import build_discriminator, build_generator

    m = cfg.model
    G = build_generator(m.netG, L_CHANNELS, AB_CHANNELS, **generator_options(cfg, bn_inference="per_image"))
    D = build_discriminator(m.netD, L_CHANNELS + AB_CHANNELS, **discriminator_options(cfg))
    return {"G": G, "D": D}


def deployable(net: nn.Module) -> nn.Module:
    """The trained L -> ab network as the RGB -> RGB generator that is saved, scored and exported."""
    from fastcgan.models import LabColorizer

    return LabColorizer(getattr(net, "_orig_mod", net))


def sample_rows(run: StepRun, images: dict) -> list[list]:
    """One row per image: the grey input | the colorization | the original (all RGB in [-1, 1])."""
    from fastcgan.color import decolorize

    rgb = images["A"]
    grey = decolorize(rgb)
    out = deployable(run.frozen("G")).forward(rgb)
    return [[g, o, a] for g, o, a in zip(grey, out, rgb)]


def dataset(cfg, root: str, phase: str = "train"):
    from fastcgan.data import ColorizationDataset

    d = cfg.data
    return ColorizationDataset(
        root, phase, preprocess=d.preprocess, load_size=d.load_size, crop_size=d.crop_size, flip=d.flip,
        serial_batches=d.serial_batches, seed=cfg.run.seed, max_size=max_dataset_size(cfg, phase),
    )


def synthetic(cfg, root: str) -> str:
    """The built-in colour set (synthetic scenes whose colours follow from their lightness); without
    ``--dataroot`` beside the other built-in sets (``OUTPUT_DIR/synthetic_color_<size>``)."""
    from fastcgan.data import ensure_synthetic_color_dataset

    d = cfg.data
    return ensure_synthetic_color_dataset(root, size=d.load_size, n_train=d.synthetic_train, n_test=d.synthetic_test)


def augment(batch, crop_size=None, flip=False, generator=None, channels_last=False, shard=(0, 1), **kw):
    """Crop and flip the RGB images (one draw per image, as pix2pix's pairs), then split each into
    the input ``L/50 - 1`` and the target ``ab/110`` (float32, on the device)."""
    from fastcgan.color import rgb_to_model
    from fastcgan.data import augment_pair

    rgb, _ = augment_pair(
        batch["A"], batch["B"], crop_size, flip, generator=generator, channels_last=channels_last, shard=shard
    )
    l_in, ab = rgb_to_model(rgb)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {"A": l_in.contiguous(memory_format=fmt), "B": ab.contiguous(memory_format=fmt)}


# pix2pix with its own networks' channels, data, grid and deployable generator; the rest (optimizers,
# pools, the three-phase step, losses, progress keys, exports) is pix2pix's, unchanged.
RECIPE = dataclasses.replace(
    pix2pix.RECIPE,
    name="colorization",
    networks=networks,
    sample_rows=sample_rows,
    dataset=dataset,
    synthetic=synthetic,
    synthetic_folder="synthetic_color",
    target_from_input=True,
    augment=augment,
    deployable=deployable,
)
