"""Everything a training run owns, in one plain object -- exactly what a checkpoint holds: the
recipe's networks, optimizers, LR schedules, grad scaler, image pools and data position."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fastcgan.devices import resolve_device
from fastcgan.image_pool import ImagePool
from fastcgan.train.config import TrainConfig


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). Without it bf16 autocast is
    emulated: measured 9x slower than fp32 for a training step on a 2-core AVX2 AMD EPYC."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch: assume yes (no warning)
        return True


def amp_dtype_for(device: torch.device, amp: bool) -> Optional[torch.dtype]:
    """bf16 where the device computes it (Ampere+ GPUs, CPUs), else fp16 (with a GradScaler)."""
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


class LinearDecay:
    """The official ``linear`` policy as an LR factor after ``e`` scheduler steps:
    ``1 - max(0, e + 1 - epochs) / (epochs_decay + 1)``, its ``lambda_rule`` with ``epoch_count = 1``
    (which epoch runs at which step: :func:`build_scheduler`). A class, not a lambda, so LambdaLR's
    state_dict stores it."""

    def __init__(self, epochs: int, epochs_decay: int):
        self.epochs = epochs
        self.epochs_decay = epochs_decay

    def __call__(self, epoch: int) -> float:
        return 1.0 - max(0, epoch + 1 - self.epochs) / float(self.epochs_decay + 1)


class OfficialPlateau:
    """The official ``plateau`` policy as it runs there, as an LR factor after ``epoch`` scheduler
    steps. The official code steps ``ReduceLROnPlateau(mode="min", factor=0.2, threshold=0.01,
    patience=5)`` with ``self.metric``, which no official model ever sets from its initial 0: the
    first step makes 0 the best value and no later 0 improves on it, so the LR is cut by 5 at the
    7th step and every 6th after -- a fixed schedule, kept to the scheduler's ``eps`` (a cut smaller
    than 1e-8 is skipped, which needs the base ``lr``)."""

    FACTOR, FIRST, EVERY, EPS = 0.2, 7, 6, 1e-8

    def __init__(self, lr: float):
        self.lr = lr

    def __call__(self, epoch: int) -> float:
        cuts = 0 if epoch < self.FIRST else (epoch - self.FIRST) // self.EVERY + 1
        f = 1.0
        for _ in range(cuts):  # at most ~20: a cut of lr <= 1 is below EPS after that
            if self.lr * f - self.lr * f * self.FACTOR <= self.EPS:
                break
            f *= self.FACTOR
        return f


def lr_lambda(o):
    """The LambdaLR factor of the ``linear`` and ``plateau`` policies (None for the others)."""
    if o.lr_policy == "linear":
        return LinearDecay(o.epochs, o.epochs_decay)
    if o.lr_policy == "plateau":
        return OfficialPlateau(o.lr)
    return None


def lr_factor(o, steps: int) -> float:
    """The LR, as a multiple of ``o.lr``, of optimizer config ``o`` after ``steps`` scheduler steps
    (a scheduler's ``last_epoch``): the closed form of :func:`build_scheduler`'s schedule."""
    if (f := lr_lambda(o)) is not None:
        return f(steps)
    if o.lr_policy == "step":
        return 0.1 ** (steps // o.lr_decay_iters)
    return (1 + math.cos(math.pi * steps / o.epochs)) / 2  # periodic, as CosineAnnealingLR


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    """Stepped once per finished epoch (:meth:`TrainState.end_epoch`), and once more before the
    first epoch when the recipe's official script updates the LR at the start of every epoch
    (``Recipe.lr_update_at_epoch_start``: CycleGAN, pix2pix, colorization): epoch k then runs at
    the schedule's k-th step, as there; CUT's epoch k runs at step k - 1."""
    from fastcgan.recipes import get_recipe

    o = cfg.optim
    if (f := lr_lambda(o)) is not None:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    elif o.lr_policy == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=o.lr_decay_iters, gamma=0.1)
    else:
        # The official T_max is --n_epochs: at 0 after --epochs, back up over the next --epochs (a
        # run of --epochs E --epochs-decay 0 is one half-period to 0).
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=o.epochs, eta_min=0.0)
    if get_recipe(cfg.model.recipe).lr_update_at_epoch_start:
        with warnings.catch_warnings():  # "step() before optimizer.step()": intended, as the official order
            warnings.simplefilter("ignore", UserWarning)
            sched.step()
    return sched


def build_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    kw: dict = {}
    if cfg.run.faithful:
        pass  # torch's default Adam implementation, as the official code
    elif device.type == "cuda":
        # One fused kernel for the whole parameter list, and its step counters stay on the GPU
        # (the default path keeps them on the CPU and reads them with .item() each step).
        kw["fused"] = True
    else:
        kw["foreach"] = True
    return torch.optim.Adam(params, lr=o.lr, betas=(o.beta1, o.beta2), **kw)


@dataclass
class TrainState:
    """Exactly what a checkpoint holds: the recipe's networks, optimizers and their LR schedules,
    the grad scaler, the image pools, the augmentation generator and the data position. How the
    step executes (compiled phases, DDP wrappers, CUDA graph, autocast) is not here: see
    :func:`fastcgan.train.execution.build_step`."""

    nets: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, object]
    scaler: torch.amp.GradScaler
    pools: dict[str, ImagePool]
    # Device generator for the batch augmentation (crop offsets, flips).
    aug_generator: torch.Generator
    step: int = 0  # optimisation steps done
    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0  # batches of the current epoch already consumed (data position)

    @property
    def device(self) -> torch.device:
        return self.aug_generator.device

    def lr(self) -> float:
        """The current learning rate (of the first optimizer; all share one schedule)."""
        return float(next(iter(self.optimizers.values())).param_groups[0]["lr"])

    def end_epoch(self) -> None:
        """The data position moves to the next epoch; the LR schedules step once per epoch (as the
        official ``update_learning_rate``)."""
        self.epoch += 1
        self.batch_in_epoch = 0
        for sched in self.schedulers.values():
            sched.step()


# Build settings that make two generators the same network; bn_inference is an inference mode only.
_NOT_ARCHITECTURE = ("bn_inference", "backend")


def initial_weights(cfg: TrainConfig, recipe) -> dict[str, dict[str, torch.Tensor]]:
    """``--init-generator`` / ``--init-official``: the state dict each named network starts from
    (verified, finite tensors on the CPU), read and checked against this run's network before anything
    is written. This run's networks are built for the comparison on the meta device (no memory, no
    RNG draw)."""
    from fastcgan.train.config import ConfigError

    m = cfg.model
    if not (m.init_generators or m.init_official):
        return {}
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        nets = recipe.networks(cfg)
    out = _official_weights(cfg, recipe, nets) if m.init_official else _generator_weights(cfg, recipe, nets)
    for name, (where, sd) in out.items():
        # As the network will hold them (load_state_dict casts): a float64 1e300 is an fp32 inf.
        want = nets[name].state_dict()
        bad = [k for k, v in sd.items()
               if want[k].is_floating_point() and not torch.isfinite(v.to(want[k].dtype)).all()]
        if bad:  # training would fail at once, blaming the learning rate
            raise ConfigError(f"{where}: non-finite weights in {bad[:4]} (as {want[bad[0]].dtype})")
    return {name: {k: v.detach().cpu() for k, v in sd.items()} for name, (_, sd) in out.items()}


def _inside_run_dir(cfg: TrainConfig, path: str, where: str) -> None:
    from fastcgan.train.config import ConfigError

    real, run_dir = os.path.realpath(path), os.path.realpath(cfg.run_dir)
    if real == run_dir or real.startswith(run_dir + os.sep):  # the run writes its networks there
        raise ConfigError(f"{where}: inside the run directory {cfg.run_dir}, which this run writes; "
                          "start from a copy elsewhere")


def _network_weights(deployed: nn.Module, net: nn.Module, sd: dict) -> dict:
    """``sd`` of ``deployed`` (``net`` itself, or a wrapper around it) as ``net``'s state dict."""
    if deployed is net:
        return sd
    prefix = next(n for n, mod in deployed.named_modules() if mod is net) + "."
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _source_generator(path: str, direction: str) -> str:
    """Which generator of a folder starts this run's ``direction``: its namesake, or a folder's
    only one (a released model's folder holds its generator as AtoB; a CUT run trained
    --direction BtoA, as BtoA): fine-tuning the released labels -> photos CUT as a BtoA run."""
    from fastcgan.evaluate import run_generators

    if not os.path.isdir(path):
        return direction
    present = run_generators(path)
    return present[0] if direction not in present and len(present) == 1 else direction


def _generator_weights(cfg: TrainConfig, recipe, nets: dict) -> dict[str, tuple[str, dict]]:
    """``--init-generator DIRECTION=PATH``: a fastcgan generator (file, run or pretrained folder,
    training checkpoint) or an official ``latest_net_G*.pth`` read as this run's generator."""
    from fastcgan.models import load_generator
    from fastcgan.train.checkpoint import CheckpointError, check_network
    from fastcgan.train.config import ConfigError

    ours = {d: recipe.deployed(nets[n]) for d, n in recipe.exports_for(cfg).items()}
    out = {}
    for entry in cfg.model.init_generators:
        direction, _, path = entry.partition("=")
        where = f"--init-generator {direction}={path}"
        if direction not in ours:
            raise ConfigError(f"{where}: --model {cfg.model.recipe} trains only {', '.join(ours)}")
        _inside_run_dir(cfg, path, where)
        want = ours[direction].config
        official = path.lower().endswith((".pth", ".pt"))
        try:
            if official:  # the official repositories' latest_net_G*.pth, read as this run's generator
                from fastcgan.models import load_official_generator

                src = load_official_generator(
                    path, arch=want["arch"], norm=want["norm"], use_dropout=want["use_dropout"], backend="torch",
                    color_space=want.get("color_space", "rgb"), antialias=want.get("antialias", False),
                    antialias_up=want.get("antialias_up", False))
            elif path.lower().endswith(".ckpt"):
                from fastcgan.train.checkpoint import checkpoint_generator

                src = checkpoint_generator(path, direction)
            else:
                src = load_generator(path, direction=_source_generator(path, direction), backend="torch")
        except (OSError, ValueError, KeyError, RuntimeError) as e:  # CheckpointError is a RuntimeError
            kind = "an official checkpoint of this run's generator" if official else "a fastcgan generator"
            raise ConfigError(f"{where}: not {kind}: {e}") from None
        got = getattr(src, "config", {})
        diff = [f"{k}={got.get(k)!r} (this run: {want.get(k)!r})" for k in sorted(set(want) | set(got))
                if k not in _NOT_ARCHITECTURE and got.get(k) != want.get(k)]
        if diff:
            raise ConfigError(f"{where}: another architecture than this run's generator: {'; '.join(diff)}")
        sd = src.state_dict()
        try:  # keys and shapes, now rather than mid-start
            check_network(path, direction, ours[direction], sd)
        except CheckpointError as e:
            raise ConfigError(f"{where}: its weights do not fit this run's generator: {e}") from None
        name = recipe.exports_for(cfg)[direction]
        out[name] = (where, _network_weights(ours[direction], nets[name], sd))
    return out


def _official_weights(cfg: TrainConfig, recipe, nets: dict) -> dict[str, tuple[str, dict]]:
    """``--init-official DIR``: ``DIR/EPOCH_net_NAME.pth`` for each of the recipe's official networks,
    read as this run's network of that name (the file's keys and shapes must be its)."""
    from fastcgan.models import load_official_state_dict
    from fastcgan.train.config import ConfigError

    folder, epoch = cfg.model.init_official, cfg.model.init_official_epoch
    if not recipe.official_networks:
        raise ConfigError(f"--init-official: --model {cfg.model.recipe} has no official counterpart")
    if not os.path.isdir(folder):
        raise ConfigError(f"--init-official {folder}: not a folder (the official checkpoints/NAME)")
    _inside_run_dir(cfg, folder, f"--init-official {folder}")
    files = {official: os.path.join(folder, f"{epoch}_net_{official}.pth") for official in recipe.official_networks}
    missing = [os.path.basename(f) for f in files.values() if not os.path.isfile(f)]
    if missing:
        there = sorted(n for n in os.listdir(folder) if n.endswith(".pth") and os.path.isfile(os.path.join(folder, n)))
        raise ConfigError(f"--init-official {folder}: no file {', '.join(missing)} (--model {cfg.model.recipe} trains "
                          f"{', '.join(recipe.official_networks)}; --init-official-epoch {epoch}); the folder has "
                          f"{there[:12] or 'no .pth file'}")
    out = {}
    for official, name in recipe.official_networks.items():
        path, net = files[official], nets[name]
        where = f"--init-official: {path}"
        try:
            sd = load_official_state_dict(path, net, norm=cfg.model.norm)
        except TypeError as e:  # a network kind the official repository does not have (--netD udacity)
            raise ConfigError(f"{where}: {e}") from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{where}: not the official {official} of this run's options (--model "
                              f"{cfg.model.recipe}, --netG {cfg.model.netG}, --netD {cfg.model.netD}, --norm "
                              f"{cfg.model.norm}, ...): {e}") from None
        out[name] = (where, sd)
    return out


def build_state(cfg: TrainConfig, device: Optional[torch.device] = None, recipe=None,
                init: Optional[dict[str, dict[str, torch.Tensor]]] = None) -> TrainState:
    """Fresh networks (initialised from the global torch RNG: seed it first), optimizers, schedules,
    scaler and pools of ``recipe`` (default: ``cfg.model.recipe``) on ``device`` (default:
    ``cfg.run.device``). ``init``: {network: state dict} (:func:`initial_weights`), loaded over
    those networks' initialisation (which still draws from the RNG, so every other
    network starts as it would without). Builds nothing about execution (no compile, no DDP)."""
    from fastcgan.recipes import get_recipe

    recipe = recipe or get_recipe(cfg.model.recipe)
    device = resolve_device(cfg.run.device) if device is None else device
    fmt = torch.channels_last if cfg.run.channels_last else torch.preserve_format
    nets = recipe.networks(cfg)
    for name, sd in (init or {}).items():
        nets[name].load_state_dict(sd, strict=True)
    nets = {name: net.to(device=device, memory_format=fmt).train() for name, net in nets.items()}
    optimizers = {
        name: build_optimizer([p for n in members for p in nets[n].parameters()], cfg, device)
        for name, members in recipe.optimizers.items()
    }
    # Loss scaling only for fp16 (bf16 has fp32's exponent range). Note: an enabled GradScaler
    # reads its inf check back to the host in step(): the fp16 path syncs once per optimizer step.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype_for(device, cfg.run.amp) == torch.float16)
    aug = torch.Generator(device=device)
    aug.manual_seed(cfg.run.seed + 1)
    return TrainState(
        nets=nets,
        optimizers=optimizers,
        schedulers={name: build_scheduler(opt, cfg) for name, opt in optimizers.items()},
        scaler=scaler,
        pools={name: ImagePool(size).to(device) for name, (size, _) in recipe.pools(cfg).items()},
        aug_generator=aug,
    )
