"""One optimisation step of any recipe, as one function of (execution, batch).

    losses = train_step(exe, {"A": real_A, "B": real_B}, recipe, cfg)   # detached fp32 scalars

The recipe's phases run in order; each is a forward function returning the loss its optimizer
minimises. Around it the step freezes the networks the phase only reads (their weight gradients
are skipped, the gradient still flows through them), runs backward and the optimizer update.
Nothing reads a value back to the host: losses come back as device tensors. The only host reads
are Adam's CPU step counters on the non-fused path (fused Adam on CUDA keeps them on the device)
and an fp16 GradScaler's inf check.
"""

from __future__ import annotations

from torch import Tensor

from fastcgan.recipes.base import Recipe, set_requires_grad


def train_step(exe, batch: dict[str, Tensor], recipe: Recipe, cfg) -> dict[str, Tensor]:
    """Run ``recipe.phases`` on ``batch`` (float in [-1, 1] on the device, the output of
    ``fastcgan.data.augment_batch``); returns ``{name: loss}`` for ``recipe.loss_names(cfg)``.
    With ``--compile`` each phase's forward is its compiled graph (``exe.compiled``)."""
    state = exe.state
    if exe.compiled and not exe.pools_allocated:
        exe.allocate_pools(recipe, cfg, batch)
    carry: dict = {}
    losses: dict[str, Tensor] = {}
    for phase in recipe.phases:
        forward = exe.compiled.get(phase.name, phase.forward)
        frozen = [state.nets[n] for n in phase.frozen]
        set_requires_grad(frozen, False)
        if phase.optimizer is None:  # forward only: later phases backpropagate through its carry
            _, phase_losses, carry = forward(exe, batch, carry, cfg)
        else:
            opt = state.optimizers[phase.optimizer]
            opt.zero_grad(set_to_none=True)
            loss, phase_losses, carry = forward(exe, batch, carry, cfg)
            state.scaler.scale(loss).backward()
            state.scaler.step(opt)
        set_requires_grad(frozen, True)
        losses.update(phase_losses)
    state.scaler.update()
    return {k: losses[k].detach() for k in recipe.loss_names(cfg)}
