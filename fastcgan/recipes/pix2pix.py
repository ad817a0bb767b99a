"""pix2pix (Isola et al. 2017), the paired recipe of the official repository (``--model pix2pix``).

Networks: ``G`` maps the input image to the target (official ``unet_256``, BatchNorm, dropout 0.5);
``D`` is the conditional 70x70 PatchGAN: it scores ``cat(input, image)`` (``input_nc +
output_nc`` channels), so it judges whether an output fits its input, not only whether it looks
real. Losses: vanilla GAN + ``lambda_L1`` (100) x L1 to the target; no image pool.

The step is the official ``optimize_parameters`` -- one forward of G, the discriminator's update on
that fake (detached), then the generator's update against the *updated* discriminator through the
same fake -- as three phases:

* ``forward`` (no optimizer): ``fake_B = G(real_A)``, with G's graph kept for the last phase;
* ``discriminator``: ``0.5 * (gan(D(A, B), real) + gan(D(A, fake_B.detach()), fake))``;
* ``generator`` (D frozen): ``gan(D(A, fake_B), real) + lambda_L1 * |fake_B - B|``, whose backward
  runs through the carried ``fake_B`` into G.

G therefore runs once per step (one dropout draw, one BatchNorm running-stat update, as the
official). The forward is a phase of its own so that ``--compile`` can compile every phase as one
graph: a compiled function is one autograd node, so a fake made inside the discriminator's
compiled phase would have its graph freed by the discriminator's backward (the generator's backward
would then fail). BatchNorm at batch 1 in training mode is the official behaviour (per-image
statistics); with BatchNorm every network call stays separate (batching real and fake through D
would mix their statistics), with InstanceNorm D scores real and fake in one batch.

Inference: G is built with ``bn_inference="per_image"`` -- what the official ``test.py`` computes
(BatchNorm in training mode at batch 1) at any batch size; dropout is off at inference.

Data: :class:`fastcgan.data.AlignedDataset` (``root/train/`` images holding A|B side by side),
``--direction BtoA`` swaps the halves. The deployable generator is always saved as
``generator_AtoB.safetensors``: it maps the *input* half to the *target* half, i.e. for a
``--direction BtoA`` run it translates B images into A images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastcgan.losses import conditional_input, pix2pix_discriminator_loss, pix2pix_generator_loss
from fastcgan.recipes.base import (
    Phase,
    Recipe,
    StepRun,
    discriminator_options,
    generator_options,
    max_dataset_size,
)

LOSS_NAMES = ("G_GAN", "G_L1", "G", "D_real", "D_fake", "D")


def loss_names(cfg) -> tuple[str, ...]:
    return LOSS_NAMES


def networks(cfg) -> dict:
    from fastcgan.models import build_discriminator, build_generator

    m = cfg.model
    # Built in the official order (G, then D): the global RNG draws of the initialisation.
    G = build_generator(m.netG, m.input_nc, m.output_nc, **generator_options(cfg, bn_inference="per_image"))
    D = build_discriminator(m.netD, m.input_nc + m.output_nc, **discriminator_options(cfg))
    return {"G": G, "D": D}


def pools(cfg) -> dict[str, tuple[int, int]]:
    return {}  # the official pix2pix uses no image pool


def generate_forward(run: StepRun, batch, carry: dict, cfg) -> tuple[None, dict, dict]:
    """``fake_B = G(real_A)`` with G's graph kept: the generator phase backpropagates through it."""
    with run.autocast():
        fake_B = run.net("G")(batch["A"])
    return None, {}, {"fake_B": fake_B}


def _scores(run: StepRun, D, real_A: Tensor, images: tuple[Tensor, ...], cfg) -> tuple[Tensor, ...]:
    """D's score maps of ``cat(real_A, image)`` for each image, in order (one batch unless BatchNorm)."""
    xs = [run.fmt(conditional_input(real_A, im)) for im in images]
    if cfg.model.norm == "batch" or len(xs) == 1:
        return tuple(D(x) for x in xs)
    return D(torch.cat(xs)).split(real_A.shape[0])


def discriminator_forward(run: StepRun, batch, carry: dict, cfg) -> tuple[Tensor, dict, dict]:
    """The conditional discriminator on (input, fake) -- detached -- and (input, target); fake
    first, as the official ``backward_D`` (the order of BatchNorm's running-stat updates)."""
    real_A, real_B = batch["A"], batch["B"]
    with run.autocast():
        pred_fake, pred_real = _scores(run, run.net("D"), real_A, (carry["fake_B"].detach(), real_B), cfg)
    loss_D, real, fake = pix2pix_discriminator_loss(pred_real, pred_fake, cfg.loss.gan_mode)
    return loss_D, {"D_real": real, "D_fake": fake, "D": loss_D}, carry


def generator_forward(run: StepRun, batch, carry: dict, cfg) -> tuple[Tensor, dict, dict]:
    """GAN loss against the updated, frozen D plus lambda_L1 x L1 to the target, on the carried fake."""
    real_A, real_B, fake_B = batch["A"], batch["B"], carry["fake_B"]
    with run.autocast():
        (pred_fake,) = _scores(run, run.frozen("D"), real_A, (fake_B,), cfg)
    loss_G, gan, l1 = pix2pix_generator_loss(pred_fake, fake_B, real_B, cfg.loss.lambda_L1, cfg.loss.gan_mode)
    return loss_G, {"G_GAN": gan, "G_L1": l1, "G": loss_G}, carry


def sample_rows(run: StepRun, images: dict[str, Tensor]) -> list[list[Tensor]]:
    """One row per pair: input | output | target (plain ``forward``, eval mode: per-image BN)."""
    out = run.frozen("G").forward(images["A"])
    return [[a, o, b] for a, o, b in zip(images["A"], out, images["B"])]


# -- data -----------------------------------------------------------------------------------------
def dataset(cfg, root: str, phase: str = "train"):
    from fastcgan.data import AlignedDataset

    d, m = cfg.data, cfg.model
    return AlignedDataset(
        root, phase, direction=d.direction, preprocess=d.preprocess, load_size=d.load_size,
        crop_size=d.crop_size, flip=d.flip, input_nc=m.input_nc, output_nc=m.output_nc,
        serial_batches=d.serial_batches, seed=cfg.run.seed, max_size=max_dataset_size(cfg, phase),
    )


def synthetic(cfg, root: str) -> str:
    """The paired synthetic set (a scene's two renderings side by side). Without ``--dataroot``
    it goes beside the unpaired one (``OUTPUT_DIR/synthetic_aligned_<size>``, the recipe's
    ``synthetic_folder``): the two layouts cannot share a folder."""
    from fastcgan.data import ensure_synthetic_aligned_dataset

    d = cfg.data
    return ensure_synthetic_aligned_dataset(
        root, size=d.load_size, n_train=d.synthetic_train, n_test=d.synthetic_test
    )


def augment(batch, crop_size=None, flip=False, generator=None, channels_last=False, shard=(0, 1), **kw):
    """The same random crop and flip for both halves of every pair (one draw per pair)."""
    from fastcgan.data import augment_pair

    a, b = augment_pair(
        batch["A"], batch["B"], crop_size, flip, generator=generator, channels_last=channels_last, shard=shard
    )
    return {"A": a, "B": b}


RECIPE = Recipe(
    name="pix2pix",
    networks=networks,
    optimizers={"G": ("G",), "D": ("D",)},
    pools=pools,
    phases=(
        Phase("forward", None, generate_forward),
        Phase("discriminator", "D", discriminator_forward),
        Phase("generator", "G", generator_forward, frozen=("D",)),
    ),
    loss_names=loss_names,
    sample_rows=sample_rows,
    exports={"AtoB": "G"},
    progress_keys=("G", "G_L1", "D"),
    official_networks={"G": "G", "D": "D"},
    dataset=dataset,
    synthetic=synthetic,
    synthetic_folder="synthetic_aligned",
    augment=augment,
)
