"""One CycleGAN optimisation step as one function of (state, batch, config).

    losses = train_step(state, {"A": real_A, "B": real_B}, cfg)   # dict of detached fp32 scalars

The order is the official ``optimize_parameters``: the generators' update with the
discriminators frozen, then both discriminators on real images and pooled, detached fakes
(the fakes made *before* the generator update). Differences, none of which change the maths:

* one backward for both discriminators (their losses are independent, so the sum's gradient is
  the same) instead of one per discriminator;
* with InstanceNorm (or no norm) a network's independent inputs go through it as one batch:
  ``G_AB([real_A; real_B])`` gives fake B and the identity image at once, ``D([real; fake])`` both
  score maps. Instance normalisation is per sample, so this equals separate calls; BatchNorm would
  mix the statistics, so with ``norm="batch"`` every call stays separate;
* nothing reads a value back to the host: losses come back as device tensors, the image pool is
  tensorised (``fastcgan.image_pool``). The only host reads are Adam's CPU step counters on the
  non-fused path (fused Adam on CUDA keeps them on the device) and an fp16 GradScaler's inf check.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from fastcgan.losses import (
    cycle_loss,
    discriminator_loss,
    generator_gan_loss,
    gradient_penalty,
    identity_loss,
)
from fastcgan.train.config import TrainConfig
from fastcgan.train.state import TrainState

LOSS_NAMES = ("G_AB", "G_BA", "cycle_A", "cycle_B", "idt_A", "idt_B", "G", "D_A", "D_B")
GP_NAMES = ("gp_A", "gp_B")


def loss_names(cfg: TrainConfig) -> tuple[str, ...]:
    """Keys of the dict :func:`train_step` returns, in order."""
    return LOSS_NAMES + (GP_NAMES if cfg.loss.gan_mode == "wgangp" else ())


def set_requires_grad(nets: Iterable[nn.Module], flag: bool) -> None:
    for net in nets:
        for p in net.parameters():
            p.requires_grad_(flag)


def _fmt(x: Tensor, channels_last: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def generator_forward(
    state: TrainState, real_A: Tensor, real_B: Tensor, cfg: TrainConfig
) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """The generators' losses (forward only): ``(loss_G, losses, fake_A, fake_B)``.

    The discriminators must be frozen (``requires_grad=False``) by the caller; they are called
    unwrapped (no DDP): their parameters get no gradient here, only the fakes do."""
    G_AB, G_BA = state.train_net("G_AB"), state.train_net("G_BA")
    D_A, D_B = state.D_A, state.D_B
    lc = cfg.loss
    b = real_A.shape[0]
    use_idt = lc.lambda_identity > 0
    with state.autocast():
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
    losses: dict[str, Tensor] = {
        "G_AB": generator_gan_loss(pred_fake_B, lc.gan_mode),
        "G_BA": generator_gan_loss(pred_fake_A, lc.gan_mode),
        "cycle_A": cycle_loss(rec_A, real_A, lc.cycle_kind) * lc.lambda_cycle,
        "cycle_B": cycle_loss(rec_B, real_B, lc.cycle_kind) * lc.lambda_cycle,
    }
    if use_idt:
        w = lc.lambda_cycle * lc.lambda_identity  # official: lambda_A * lambda_identity
        losses["idt_A"] = identity_loss(idt_A, real_A) * w
        losses["idt_B"] = identity_loss(idt_B, real_B) * w
    else:
        zero = real_A.new_zeros((), dtype=torch.float32)
        losses["idt_A"] = losses["idt_B"] = zero
    loss_G = (
        losses["G_AB"]
        + losses["G_BA"]
        + losses["cycle_A"]
        + losses["cycle_B"]
        + losses["idt_A"]
        + losses["idt_B"]
    )
    losses["G"] = loss_G
    return loss_G, losses, fake_A, fake_B


def _pool_query(state: TrainState, pool, fake: Tensor) -> Tensor:
    """Pooled fakes for this process's batch. Under DDP the pool sees the global batch (the fakes
    of every process, in rank order) with the same random draws on every process, so all
    processes hold the pool that one process training the global batch would hold."""
    fake = fake.detach().float()  # the pools keep fp32 images whatever the autocast dtype
    ctx = state.dist
    if ctx is None or not ctx.enabled:
        return _fmt(pool.query(fake), state.channels_last)
    pooled = pool.query(ctx.all_gather_batch(fake))
    return _fmt(pooled[ctx.shard(pooled.shape[0])], state.channels_last)


def discriminator_forward(
    state: TrainState, real_A: Tensor, real_B: Tensor, fake_A: Tensor, fake_B: Tensor, cfg: TrainConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """The discriminators' losses on real images and pooled fakes: ``(loss_D, losses)``."""
    D_A, D_B = state.train_net("D_A"), state.train_net("D_B")
    mode = cfg.loss.gan_mode
    b = real_A.shape[0]
    pooled_B = _pool_query(state, state.pool_B, fake_B)
    pooled_A = _pool_query(state, state.pool_A, fake_A)
    with state.autocast():
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
    return loss_D, losses


def train_step(state: TrainState, batch: dict[str, Tensor], cfg: TrainConfig) -> dict[str, Tensor]:
    """One generator update and one discriminator update.

    ``batch``: ``{"A": real_A, "B": real_B}``, float in [-1, 1] on ``state.device`` (the output of
    ``fastcgan.data.augment_batch``). Returns the losses as detached fp32 device scalars (see
    :func:`loss_names`): ``G_AB``/``G_BA`` adversarial, ``cycle_A`` (A->B->A), ``cycle_B``,
    ``idt_A`` (``|G_BA(a) - a|``), ``idt_B``, each already weighted, their sum ``G``, and the
    discriminator losses ``D_A``/``D_B`` (``0.5 (real + fake)``, plus ``gp_A``/``gp_B`` for wgangp).
    With ``--compile`` the two forward phases are the compiled ones (:func:`compile_step`).
    """
    real_A, real_B = batch["A"], batch["B"]
    g_forward = state.compiled.get("generator", generator_forward)
    d_forward = state.compiled.get("discriminator", discriminator_forward)

    # D's parameters need no gradient in the generator phase; freezing them skips their
    # weight-gradient kernels (the gradient still flows through D to the fakes).
    set_requires_grad((state.D_A, state.D_B), False)
    state.opt_G.zero_grad(set_to_none=True)
    loss_G, losses, fake_A, fake_B = g_forward(state, real_A, real_B, cfg)
    state.scaler.scale(loss_G).backward()
    state.scaler.step(state.opt_G)

    set_requires_grad((state.D_A, state.D_B), True)
    state.opt_D.zero_grad(set_to_none=True)
    # The fakes made *before* the generator update (the official order).
    loss_D, d_losses = d_forward(state, real_A, real_B, fake_A, fake_B, cfg)
    losses.update(d_losses)
    state.scaler.scale(loss_D).backward()
    state.scaler.step(state.opt_D)
    state.scaler.update()
    return {k: losses[k].detach() for k in loss_names(cfg)}


def compile_step(state: TrainState, cfg: TrainConfig) -> None:
    """``torch.compile`` the step's two forward phases, each one graph (``fullgraph=True``: the
    networks, the fused-norm custom ops, the losses and the image pool, no graph break); AOT
    autograd compiles their backward. The optimizer step is not in these graphs: torch.optim
    breaks the graph around ``step()`` on purpose, and fused Adam on CUDA is already one
    multi-tensor kernel (CUDA graphs capture it, see :mod:`fastcgan.train.cuda_graphs`).

    The networks themselves stay uncompiled modules (checkpoints and sample grids use them as
    they are). Under DDP (a process group is initialised) each network is compiled instead. Under WGAN-GP the discriminator phase stays eager: compiled graphs have no double
    backward. The pools are allocated first so the compiled region never allocates them."""
    s = cfg.data.crop_size
    for pool, nc in ((state.pool_A, cfg.model.input_nc), (state.pool_B, cfg.model.output_nc)):
        if pool.pool_size and pool.images is None:
            pool.allocate(torch.empty(1, nc, s, s, device=state.device))
    from fastcgan.ops import available_backends

    available_backends()  # probe the kernel backends (loads fastcgan._C) outside traced code
    opts = dict(backend=cfg.run.compile_backend, fullgraph=True, dynamic=False)
    compile_d = cfg.loss.gan_mode != "wgangp"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Under DDP the phases call DDP wrappers, whose forward Dynamo cannot trace in one graph;
        # compile each plain network instead (DDP then wraps the compiled modules).
        for name in ("G_AB", "G_BA") + (("D_A", "D_B") if compile_d else ()):
            getattr(state, name).compile(**opts)
        return
    state.compiled["generator"] = torch.compile(generator_forward, **opts)
    if compile_d:
        state.compiled["discriminator"] = torch.compile(discriminator_forward, **opts)
