"""CycleGAN (Zhu et al. 2017), the official recipe; DiscoGAN and the Udacity tutorial network are
its presets (``fastcgan.train.config.PRESETS``).

Naming (explicit, unlike the official ``G_A``/``D_A``): ``G_AB`` translates A -> B, ``G_BA``
B -> A; ``D_A`` scores domain-A images (real A vs ``G_BA`` fakes), ``D_B`` domain-B images.
``pool_A`` holds past fake A images (for ``D_A``), ``pool_B`` past fake B images. (The official
``D_A`` is our ``D_B``: it judges ``G_A(A)``, i.e. B images.)

The step is the official ``optimize_parameters``: the generators' update with the discriminators
frozen, then both discriminators on real images and pooled, detached fakes (the fakes made
*before* the generator update). Differences, none of which change the maths:

* one backward for both discriminators (their losses are independent, so the sum's gradient is
  the same) instead of one per discriminator;
* with InstanceNorm (or no norm) a network's independent inputs go through it as one batch:
  ``G_AB([real_A; real_B])`` gives fake B and the identity image at once, ``D([real; fake])`` both
  score maps. Instance normalisation is per sample, so this equals separate calls; BatchNorm would
  mix the statistics, so with ``norm="batch"`` every call stays separate;
* nothing reads a value back to the host: losses are device tensors, the image pool is
  tensorised (``fastcgan.image_pool``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastcgan.losses import (
    cycle_loss,
    discriminator_loss,
    generator_gan_loss,
    gradient_penalty,
    identity_loss,
)
from fastcgan.recipes.base import Phase, Recipe, StepRun, discriminator_options, generator_options, zero_loss

LOSS_NAMES = ("G_AB", "G_BA", "cycle_A", "cycle_B", "idt_A", "idt_B", "G", "D_A", "D_B")
GP_NAMES = ("gp_A", "gp_B")


def loss_names(cfg) -> tuple[str, ...]:
    return LOSS_NAMES + (GP_NAMES if cfg.loss.gan_mode == "wgangp" else ())


def networks(cfg) -> dict:
    from fastcgan.models import build_discriminator, build_generator

    m = cfg.model
    # A BatchNorm generator (--norm batch, the udacity preset) normalises each test image with its
    # own statistics, as the official test.py without --eval (the running ones: --bn-inference).
    g_kw = generator_options(cfg, bn_inference="per_image")
    # WGAN-GP differentiates D's input gradient again: only the torch reference has a double
    # backward (the fused kernels' backward is not differentiable), so D uses it then.
    d_kw = discriminator_options(cfg, **({"backend": "torch"} if cfg.loss.gan_mode == "wgangp" else {}))
    # Built in this order: the global RNG draws of the initialisation define the run's weights.
    return {
        "G_AB": build_generator(m.netG, m.input_nc, m.output_nc, **g_kw),
        "G_BA": build_generator(m.netG, m.output_nc, m.input_nc, **g_kw),
        "D_A": build_discriminator(m.netD, m.input_nc, **d_kw),
        "D_B": build_discriminator(m.netD, m.output_nc, **d_kw),
    }


def pools(cfg) -> dict[str, tuple[int, int]]:
    return {"pool_A": (cfg.loss.pool_size, cfg.model.input_nc), "pool_B": (cfg.loss.pool_size, cfg.model.output_nc)}


def generator_forward(run: StepRun, batch, carry: dict, cfg) -> tuple[Tensor, dict, dict]:
    """The generators' losses. The discriminators are frozen: called unwrapped (no DDP), their
    parameters get no gradient here, only the fakes do."""
    real_A, real_B = batch["A"], batch["B"]
    G_AB, G_BA = run.net("G_AB"), run.net("G_BA")
    D_A, D_B = run.frozen("D_A"), run.frozen("D_B")
    lc = cfg.loss
    lambda_A = lc.lambda_cycle if lc.lambda_A is None else lc.lambda_A
    lambda_B = lc.lambda_cycle if lc.lambda_B is None else lc.lambda_B
    b = real_A.shape[0]
    use_idt = lc.lambda_identity > 0
    with run.autocast():
        if use_idt and cfg.model.norm != "batch":
            fake_B, idt_B = G_AB(torch.cat([real_A, real_B])).split(b)
            fake_A, idt_A = G_BA(torch.cat([real_B, real_A])).split(b)
        else:
            fake_B, fake_A = G_AB(real_A), G_BA(real_B)
            idt_B = G_AB(real_B) if use_idt else None
            idt_A = G_BA(real_A) if use_idt else None
        rec_A = G_BA(fake_B)
        rec_B = G_AB(fake_A)
        pred_fake_B = D_B(fake_B)
        pred_fake_A = D_A(fake_A)
    # Loss functions upcast to fp32 before reducing.
    losses = {
        "G_AB": generator_gan_loss(pred_fake_B, lc.gan_mode),
        "G_BA": generator_gan_loss(pred_fake_A, lc.gan_mode),
        "cycle_A": cycle_loss(rec_A, real_A, lc.cycle_kind) * lambda_A,
        "cycle_B": cycle_loss(rec_B, real_B, lc.cycle_kind) * lambda_B,
    }
    if use_idt:  # official: G_BA(A) ~ A weighs lambda_A * lambda_identity, G_AB(B) ~ B lambda_B * ...
        losses["idt_A"] = identity_loss(idt_A, real_A) * (lambda_A * lc.lambda_identity)
        losses["idt_B"] = identity_loss(idt_B, real_B) * (lambda_B * lc.lambda_identity)
    else:
        losses["idt_A"] = losses["idt_B"] = zero_loss(real_A)
    loss_G = sum(losses[k] for k in ("G_AB", "G_BA", "cycle_A", "cycle_B", "idt_A", "idt_B"))
    losses["G"] = loss_G
    return loss_G, losses, {"fake_A": fake_A, "fake_B": fake_B}


def discriminator_forward(run: StepRun, batch, carry: dict, cfg) -> tuple[Tensor, dict, dict]:
    """The discriminators' losses on real images and pooled fakes (made before the G update)."""
    real_A, real_B = batch["A"], batch["B"]
    D_A, D_B = run.net("D_A"), run.net("D_B")
    mode = cfg.loss.gan_mode
    b = real_A.shape[0]
    pooled_B = run.pool_query("pool_B", carry["fake_B"])
    pooled_A = run.pool_query("pool_A", carry["fake_A"])
    with run.autocast():
        if cfg.model.norm != "batch":
            pr_B, pf_B = D_B(torch.cat([real_B, pooled_B])).split(b)
            pr_A, pf_A = D_A(torch.cat([real_A, pooled_A])).split(b)
        else:
            pr_B, pf_B = D_B(real_B), D_B(pooled_B)
            pr_A, pf_A = D_A(real_A), D_A(pooled_A)
    losses = {"D_A": discriminator_loss(pr_A, pf_A, mode), "D_B": discriminator_loss(pr_B, pf_B, mode)}
    loss_D = losses["D_A"] + losses["D_B"]
    if mode == "wgangp":
        # Outside autocast: the penalty differentiates D twice, in fp32.
        lgp = cfg.loss.lambda_gp
        losses["gp_A"] = gradient_penalty(D_A, real_A, pooled_A, lambda_gp=lgp)
        losses["gp_B"] = gradient_penalty(D_B, real_B, pooled_B, lambda_gp=lgp)
        loss_D = loss_D + losses["gp_A"] + losses["gp_B"]
    return loss_D, losses, carry


def sample_rows(run: StepRun, images: dict[str, Tensor]) -> list[list[Tensor]]:
    """One row per image: real A | fake B | rec A, then real B | fake A | rec B (plain
    ``forward``: eager even when the networks are compiled)."""
    rows = []
    for src, g1, g2 in (("A", "G_AB", "G_BA"), ("B", "G_BA", "G_AB")):
        real = images[src]
        fake = run.frozen(g1).forward(real)
        rec = run.frozen(g2).forward(fake)
        rows.extend([r, f, c] for r, f, c in zip(real, fake, rec))
    return rows


RECIPE = Recipe(
    name="cyclegan",
    networks=networks,
    optimizers={"G": ("G_AB", "G_BA"), "D": ("D_A", "D_B")},
    pools=pools,
    phases=(
        Phase("generator", "G", generator_forward, frozen=("D_A", "D_B")),
        # No compiled double backward: WGAN-GP's discriminator phase stays eager.
        Phase("discriminator", "D", discriminator_forward, compilable=lambda cfg: cfg.loss.gan_mode != "wgangp"),
    ),
    loss_names=loss_names,
    sample_rows=sample_rows,
    exports={"AtoB": "G_AB", "BtoA": "G_BA"},
    progress_keys=("G", "cycle_A", "cycle_B", "D_A", "D_B"),
    # The official D_A judges G_A's output (domain B): it is our D_B, and its D_B our D_A.
    official_networks={"G_A": "G_AB", "G_B": "G_BA", "D_A": "D_B", "D_B": "D_A"},
)
