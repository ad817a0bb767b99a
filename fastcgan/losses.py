"""CycleGAN losses as pure functions: tensors in, a scalar tensor out. No ``.backward()``, no
``.item()`` (no host synchronisation), no module state; weights (lambda_A, lambda_identity ...)
are applied by the caller.

Reductions run in fp32 whatever the input dtype (bf16 discriminator scores under autocast are
upcast first), so a loss of many small terms does not lose precision.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GAN_MODES = ("lsgan", "vanilla", "nonsaturating", "hinge", "wgangp")


def _check_mode(mode: str) -> None:
    if mode not in GAN_MODES:
        raise ValueError(f"gan mode must be one of {GAN_MODES}, got {mode!r}")


def gan_loss(
    pred: Tensor, target_is_real: bool, mode: str = "lsgan", *, for_discriminator: bool = True
) -> Tensor:
    """The adversarial loss of discriminator scores ``pred`` against the label real/fake.

    * ``lsgan``: mean squared error to 1 (real) or 0 (fake);
    * ``vanilla``: binary cross-entropy with logits to 1 / 0; ``nonsaturating`` (the official CUT's
      ``softplus(-pred)`` / ``softplus(pred)``) is the same function;
    * ``hinge``: discriminator ``mean(relu(1 - pred))`` (real) / ``mean(relu(1 + pred))`` (fake);
      generator (``for_discriminator=False``, real target) ``-mean(pred)``;
    * ``wgangp``: ``-mean(pred)`` (real) / ``+mean(pred)`` (fake).
    """
    _check_mode(mode)
    p = pred.float()
    if mode == "lsgan":
        return F.mse_loss(p, torch.full_like(p, 1.0 if target_is_real else 0.0))
    if mode in ("vanilla", "nonsaturating"):
        return F.binary_cross_entropy_with_logits(p, torch.full_like(p, 1.0 if target_is_real else 0.0))
    if mode == "hinge":
        if not for_discriminator:
            if not target_is_real:
                raise ValueError("hinge generator loss is defined for target_is_real=True only")
            return -p.mean()
        return F.relu(1.0 - p).mean() if target_is_real else F.relu(1.0 + p).mean()
    return -p.mean() if target_is_real else p.mean()


def discriminator_loss(pred_real: Tensor, pred_fake: Tensor, mode: str = "lsgan") -> Tensor:
    """The official discriminator objective ``0.5 * (loss(real, 1) + loss(fake, 0))``; the fake
    scores must come from detached generator outputs (the caller's job)."""
    return 0.5 * (gan_loss(pred_real, True, mode) + gan_loss(pred_fake, False, mode))


def generator_gan_loss(pred_fake: Tensor, mode: str = "lsgan") -> Tensor:
    """The generator's adversarial loss: its fakes scored as real (``-mean`` for hinge/wgangp)."""
    return gan_loss(pred_fake, True, mode, for_discriminator=False)


def gradient_penalty(
    netD: nn.Module,
    real: Tensor,
    fake: Tensor,
    kind: str = "mixed",
    constant: float = 1.0,
    lambda_gp: float = 10.0,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """WGAN-GP: ``lambda_gp * mean((||grad_x D(x)||_2 - constant)^2)`` at ``x`` = ``real``,
    ``fake`` or (``mixed``) a per-sample uniform interpolation between them.

    The gradient is taken with ``create_graph=True`` so the penalty trains D. Every op backend
    supports that second differentiation (the kernel backends differentiate the reference there,
    :func:`fastcgan.ops.instance_norm_act`), so the ``torch`` backend for D only saves the
    recompute; the trainer builds WGAN-GP discriminators so."""
    if kind not in ("real", "fake", "mixed"):
        raise ValueError(f"gradient_penalty: kind must be 'real', 'fake' or 'mixed', got {kind!r}")
    if real.shape != fake.shape:
        raise ValueError(
            f"gradient_penalty: real {tuple(real.shape)} and fake {tuple(fake.shape)} differ in shape"
        )
    real, fake = real.detach(), fake.detach()
    if kind == "real":
        x = real
    elif kind == "fake":
        x = fake
    else:
        alpha = torch.rand(
            (real.shape[0],) + (1,) * (real.dim() - 1),
            device=real.device,
            dtype=real.dtype,
            generator=generator,
        )
        x = alpha * real + (1 - alpha) * fake
    x = x.clone().requires_grad_(True)
    out = netD(x)
    (grad,) = torch.autograd.grad(out, x, grad_outputs=torch.ones_like(out), create_graph=True)
    # 1e-16 keeps the norm's own gradient finite where D's input gradient is exactly zero.
    norm = (grad.float().flatten(1) + 1e-16).norm(2, dim=1)
    return lambda_gp * ((norm - constant) ** 2).mean()


def cycle_loss(rec: Tensor, real: Tensor, kind: str = "l1") -> Tensor:
    """Cycle-consistency ``||G_BA(G_AB(a)) - a||``: mean absolute (``l1``, official) or squared
    (``l2``) error."""
    if rec.shape != real.shape:
        raise ValueError(f"cycle_loss: rec {tuple(rec.shape)} and real {tuple(real.shape)} differ in shape")
    if kind == "l1":
        return F.l1_loss(rec.float(), real.float())
    if kind == "l2":
        return F.mse_loss(rec.float(), real.float())
    raise ValueError(f"cycle_loss: kind must be 'l1' or 'l2', got {kind!r}")


def identity_loss(same: Tensor, real: Tensor) -> Tensor:
    """Identity mapping loss ``||G_AB(b) - b||_1`` (mean absolute error, official)."""
    if same.shape != real.shape:
        raise ValueError(
            f"identity_loss: same {tuple(same.shape)} and real {tuple(real.shape)} differ in shape"
        )
    return F.l1_loss(same.float(), real.float())


# ------------------------------------------------------------------------------------------------
# pix2pix (paired): the conditional discriminator sees the input beside the output
# ------------------------------------------------------------------------------------------------
def conditional_input(real_A: Tensor, image_B: Tensor) -> Tensor:
    """The conditional discriminator's input ``cat([real_A, image_B], dim=1)``: input_nc +
    output_nc channels (6 for RGB -> RGB; build D with ``build_discriminator(netD, input_nc +
    output_nc)``). Pass ``fake_B.detach()`` for the discriminator's own update."""
    if real_A.dim() != 4 or image_B.dim() != 4 or real_A.shape[0] != image_B.shape[0] or (
        real_A.shape[2:] != image_B.shape[2:]
    ):
        raise ValueError(
            f"conditional_input: real_A {tuple(real_A.shape)} and image_B {tuple(image_B.shape)} must be "
            "(N, C, H, W) with the same N, H and W"
        )
    return torch.cat([real_A, image_B], 1)


def pix2pix_generator_loss(
    pred_fake: Tensor, fake_B: Tensor, real_B: Tensor, lambda_L1: float = 100.0, mode: str = "vanilla"
) -> tuple[Tensor, Tensor, Tensor]:
    """The official pix2pix generator objective, ``(total, gan, l1)`` with
    ``gan = gan_loss(D(cat(A, fake_B)), real)`` (``pred_fake``), ``l1 = lambda_L1 *
    mean|fake_B - real_B|`` (the official ``loss_G_L1``, already weighted) and ``total = gan + l1``."""
    if fake_B.shape != real_B.shape:
        raise ValueError(
            f"pix2pix_generator_loss: fake_B {tuple(fake_B.shape)} and real_B {tuple(real_B.shape)} "
            "differ in shape"
        )
    gan = generator_gan_loss(pred_fake, mode)
    l1 = F.l1_loss(fake_B.float(), real_B.float()) * lambda_L1
    return gan + l1, gan, l1


def pix2pix_discriminator_loss(
    pred_real: Tensor, pred_fake: Tensor, mode: str = "vanilla"
) -> tuple[Tensor, Tensor, Tensor]:
    """The official pix2pix discriminator objective, ``(total, real, fake)`` with ``real =
    gan_loss(D(cat(A, B)), real)``, ``fake = gan_loss(D(cat(A, fake_B.detach())), fake)`` and
    ``total = 0.5 * (real + fake)``. No image pool (the official pix2pix uses none)."""
    real = gan_loss(pred_real, True, mode)
    fake = gan_loss(pred_fake, False, mode)
    return 0.5 * (real + fake), real, fake
