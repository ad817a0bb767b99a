"""The least memory one training step can hold, known before anything is decoded or written.

``--crop-size 1024 --batch-size 4 --amp`` on a 24 GB CPU machine did not raise: Linux lends the
allocations and its OOM killer ended the process at 23 GB, without a message. So the trainer
checks a floor first (:func:`check_step_fits`, a :class:`~fastcgan.train.config.ConfigError`:
exit 2 before the run directory is written), counted on the ``meta`` device (shapes only, no
memory, ~0.25 s) by running the recipe's own phase forwards:

* every convolution of a network the phase updates keeps its input for the weight gradient --
  or, when a compiled graph recomputes the norm and activation in front of it, that norm's input,
  the previous convolution's output, of the same size. A padding done before the convolution
  (a valid 7x7 after a reflection pad) is not counted. A tensor fed to several networks is
  counted once. The fused kernels, the compiler's recomputation and frozen networks (no weight
  gradients) keep less than eager PyTorch, but not less than this. Under ``--amp`` 2 bytes an
  element (the convolutions' autocast copies);
* a forward-only phase's activations (pix2pix's generator) stay until the last backward;
* the trained networks' weights, gradients and Adam's two moments; the image pools (fp32).

The floor is 0.25-0.53 of the tensors a real CPU step keeps (every recipe, fused and reference
kernels, tested); ResNet-9 CycleGAN at 256², batch 1, fp32: 1.3 GB against a 2.6 GB peak. Only
requests that cannot fit are refused; a floor over half the room is a warning line at the start
(a CPU run killed later leaves no message of its own), and runs near the limit still meet the
out-of-memory message that names the flags which shrink a run.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import Tensor, nn

from fastcgan.devices import MEMORY_CHECK_OFF, format_bytes, memory_to_check
from fastcgan.models import convolution_input_elements
from fastcgan.recipes.base import Recipe, set_requires_grad
from fastcgan.train.config import ConfigError, TrainConfig

__all__ = ["STEP_OVER_FLOOR", "check_step_fits", "kept_activations", "smaller_run_flags", "step_memory_floor"]

_CONVOLUTIONS = (nn.Conv2d, nn.ConvTranspose2d)
# A real CPU step's peak over its floor: ResNet-9 CycleGAN 256² fp32, 2.6 GB against 1.3 GB (the
# activations alone: 2-4x). A floor that fits but this many times it does not is warned about.
STEP_OVER_FLOOR = 2


class _ShapeRun:
    """``fastcgan.recipes.base.StepRun`` on meta networks: no DDP, no autocast (the dtype is
    applied to the count), no pool (a pool returns as many images as it is given)."""

    def __init__(self, nets: dict[str, nn.Module]):
        self.nets = nets

    def net(self, name: str) -> nn.Module:
        return self.nets[name]

    frozen = net

    def pool_query(self, pool: str, fakes: Tensor) -> Tensor:
        return fakes.detach()

    def autocast(self):
        return contextlib.nullcontext()

    def fmt(self, x: Tensor) -> Tensor:
        return x


def _batch_channels(cfg: TrainConfig, recipe: Recipe) -> dict[str, int]:
    """Channels of the uint8 batch the loader gives the recipe's ``augment``: a reversed run's
    dataset (``--direction BtoA``) already reads ``{phase}B`` as "A", with ``input_nc`` channels."""
    if recipe.target_from_input:  # colorization: the RGB image in "A" ("B" empty), split into L and ab by augment
        return {"A": 3, "B": 0}
    return {"A": cfg.model.input_nc, "B": cfg.model.output_nc}


def step_memory_floor(cfg: TrainConfig, recipe: Recipe, size: tuple[int, int], batch: int) -> int:
    """Bytes one step of ``recipe`` must hold on its device at ``batch`` images (per process) of
    ``size`` (height, width) after preprocessing: see the module docstring for what is counted."""
    with torch.device("meta"):  # the reference kernels: the backends' own run on real devices only
        nets = recipe.networks(cfg.replace(kernels="torch"))
    activations = kept_activations(cfg, recipe, nets, size, batch)
    trained = {n for names in recipe.optimizers.values() for n in names}
    weights = sum(p.numel() * p.element_size() for n in trained for p in nets[n].parameters())
    pools = sum(n * c * size[0] * size[1] * 4 for n, c in recipe.pools(cfg).values())
    return activations + 4 * weights + pools  # weights, gradients, Adam's exp_avg and exp_avg_sq


def kept_activations(cfg: TrainConfig, recipe: Recipe, nets: dict[str, nn.Module], size: tuple[int, int],
                     batch: int) -> int:
    """Bytes of the activations the step's busiest phase keeps for its backward, at least (the
    module docstring), counted by running the phase forwards on the ``meta`` networks ``nets``."""
    h, w = size
    with torch.device("meta"):
        uint8 = {k: torch.empty(batch, c, h, w, dtype=torch.uint8)
                 for k, c in _batch_channels(cfg, recipe).items()}
        inputs = recipe.augment_batch(uint8, crop_size=None, flip=False)
    kept, seen = [0], []

    def count(module: nn.Module, args, out) -> None:
        x = args[0]
        if not (torch.is_grad_enabled() and module.weight.requires_grad) or any(x is t for t in seen):
            return
        seen.append(x)  # one tensor fed to several networks (real_A to G_AB and, for identity, G_BA) is kept once
        kept[0] += convolution_input_elements(module, x, out)

    hooks = [m.register_forward_hook(count) for net in nets.values() for m in net.modules()
             if isinstance(m, _CONVOLUTIONS)]
    run, carry, held, peak = _ShapeRun(nets), {}, 0, 0
    try:
        for phase in recipe.phases:
            kept[0], seen = 0, []
            frozen = [nets[n] for n in phase.frozen]
            set_requires_grad(frozen, False)
            try:
                _, _, carry = phase.forward(run, inputs, carry, cfg)
            finally:
                set_requires_grad(frozen, True)
            if phase.optimizer is None:  # its graph lives until the last backward through it
                held += kept[0]
            else:
                peak = max(peak, held + kept[0])
    finally:
        for hook in hooks:
            hook.remove()
    dtype = next(p for net in nets.values() for p in net.parameters()).dtype
    return peak * (2 if cfg.run.amp else dtype.itemsize)  # autocast: bf16 / fp16 copies of the inputs


def check_step_fits(cfg: TrainConfig, recipe: Recipe, device: torch.device, size: tuple[int, int],
                    world_size: int = 1, bank_bytes: int = 0, room: Optional[int] = None) -> Optional[str]:
    """A :class:`ConfigError` when :func:`step_memory_floor` (plus the data bank ``bank_bytes``
    on the same device) exceeds ``room``: :func:`~fastcgan.devices.memory_to_check` (on a CPU shared
    by the processes of its node). ``room=None``: queried (unknown or turned off: nothing is refused).
    Returns a warning line when the floor fits but a step of :data:`STEP_OVER_FLOOR` times it would not."""
    if room is None:
        room = memory_to_check(device)
        if device.type == "cpu":
            try:
                room = room and room // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            except ValueError:
                pass
    if room is None:
        return None
    per_process = max(1, cfg.data.batch_size // world_size)
    try:
        floor = step_memory_floor(cfg, recipe, size, per_process)
    except Exception:  # noqa: BLE001 - a recipe the meta count cannot run (tested for every one here): no estimate
        return None
    d = cfg.data
    where = f"{device} has {format_bytes(room)} free" if device.type == "cuda" else (
        f"this process may allocate {format_bytes(room)}")
    bank = f" besides the {format_bytes(bank_bytes)} of decoded images (--data-on-gpu)" if bank_bytes else ""
    what = f"training {per_process} image(s) of {size[1]}x{size[0]} (WxH) per step with --model {cfg.model.recipe}"
    smaller = ", ".join(smaller_run_flags(cfg))
    if floor + bank_bytes <= room:
        if STEP_OVER_FLOOR * floor + bank_bytes <= room:
            return None
        # A warning, not a refusal: the floor is what no step can do without, the rest depends on the engine.
        return (f"fastcgan: warning: {what} needs at least {format_bytes(floor)}{bank}, a real step more (a CPU "
                f"step measured: {STEP_OVER_FLOOR}x), and {where}: it may run out of memory (on a CPU Linux then "
                f"ends the process without a message); smaller: {smaller}")
    raise ConfigError(
        f"{what} needs at least {format_bytes(floor)}{bank} (activations kept for the backward, weights, gradients, "
        f"Adam's moments, image pools) and {where}; make it smaller: {smaller}"
        + (f" (--preprocess {d.preprocess} trains at the images' own size)" if "crop" not in d.preprocess else "")
        + f"; {MEMORY_CHECK_OFF}")


def smaller_run_flags(cfg: TrainConfig) -> list[str]:
    """The flags that make a training run take less memory, for the messages that say it does not fit."""
    d, r = cfg.data, cfg.run
    flags = ["--batch-size" if d.batch_size > 1 else None, "--crop-size / --load-size", None if r.amp else "--amp",
             "--no-data-on-gpu" if d.data_on_gpu else None]
    return [f for f in flags if f]
