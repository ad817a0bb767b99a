"""Everything a training run owns, in one plain object: four networks, two optimizers, their LR
schedules, the grad scaler, the two image pools and the data-position counters.

Naming (explicit, unlike the official ``G_A``/``D_A``): ``G_AB`` translates A -> B, ``G_BA``
B -> A; ``D_A`` scores domain-A images (real A vs ``G_BA`` fakes), ``D_B`` scores domain-B images.
``pool_A`` holds past fake A images (for ``D_A``), ``pool_B`` past fake B images. (The official
``D_A`` is our ``D_B``: it judges ``G_A(A)``, i.e. B images.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from fastcgan.devices import resolve_device
from fastcgan.image_pool import ImagePool
from fastcgan.models import build_discriminator, build_generator
from fastcgan.train.config import TrainConfig

NETS = ("G_AB", "G_BA", "D_A", "D_B")


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
    """The official ``linear`` policy as an LR factor per finished epoch: 1 for ``epochs`` epochs,
    then linearly down over ``epochs_decay`` (``1 - max(0, e + 1 - epochs) / (epochs_decay + 1)``,
    the official formula with ``epoch_count = 1``). A class, not a lambda, so LambdaLR's
    state_dict stores it."""

    def __init__(self, epochs: int, epochs_decay: int):
        self.epochs = epochs
        self.epochs_decay = epochs_decay

    def __call__(self, epoch: int) -> float:
        return 1.0 - max(0, epoch + 1 - self.epochs) / float(self.epochs_decay + 1)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    """Stepped once per finished epoch (as the official ``update_learning_rate``)."""
    o = cfg.optim
    if o.lr_policy == "linear":
        return torch.optim.lr_scheduler.LambdaLR(opt, LinearDecay(o.epochs, o.epochs_decay))
    if o.lr_policy == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=o.lr_decay_iters, gamma=0.1)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=o.epochs + o.epochs_decay, eta_min=0.0)


def build_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    kw: dict = {}
    if device.type == "cuda":
        # One fused kernel for the whole parameter list, and its step counters stay on the GPU
        # (the default path keeps them on the CPU and reads them with .item() each step).
        kw["fused"] = True
    else:
        kw["foreach"] = True
    return torch.optim.Adam(params, lr=o.lr, betas=(o.beta1, o.beta2), **kw)


@dataclass
class TrainState:
    G_AB: nn.Module
    G_BA: nn.Module
    D_A: nn.Module
    D_B: nn.Module
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    sched_G: object
    sched_D: object
    scaler: torch.amp.GradScaler
    pool_A: ImagePool
    pool_B: ImagePool
    device: torch.device
    amp_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    step: int = 0  # optimisation steps done
    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0  # batches of the current epoch already consumed (data position)
    # Device generator for the batch augmentation (crop offsets, flips); saved in checkpoints.
    aug_generator: Optional[torch.Generator] = None
    extra: dict = field(default_factory=dict)
    # Under torchrun: this process's place in the job and the DDP wrappers the step trains
    # through (the plain networks above stay what checkpoints, samples and exports use).
    dist: Optional[object] = None  # fastcgan.train.distributed.DistContext
    ddp: dict = field(default_factory=dict)
    # --compile: the compiled forward phases of the step (see fastcgan.train.step.compile_step).
    compiled: dict = field(default_factory=dict)
    autocast_cache: bool = True

    def nets(self) -> dict[str, nn.Module]:
        return {"G_AB": self.G_AB, "G_BA": self.G_BA, "D_A": self.D_A, "D_B": self.D_B}

    def train_net(self, name: str) -> nn.Module:
        """The module the step calls for network ``name``: its DDP wrapper when distributed."""
        return self.ddp.get(name) or getattr(self, name)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # Under CUDA-graph capture autocast must not cache weight casts across the region
        # (PyTorch's CUDA-graph notes): CUDAGraphStep turns the cache off.
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=self.autocast_cache)

    def lr(self) -> float:
        return float(self.opt_G.param_groups[0]["lr"])  # a device tensor under --cuda-graphs


def build_state(cfg: TrainConfig, device: Optional[torch.device] = None) -> TrainState:
    """Fresh networks (initialised from the global torch RNG: seed it first), optimizers, schedules,
    scaler and pools on ``device`` (default: ``cfg.run.device``)."""
    device = resolve_device(cfg.run.device) if device is None else device
    m = cfg.model
    kernels = cfg.run.kernels
    g_kw = dict(
        ngf=m.ngf,
        norm=m.norm,
        use_dropout=m.use_dropout,
        init_type=m.init_type,
        init_gain=m.init_gain,
        backend=kernels,
    )
    G_AB = build_generator(m.netG, m.input_nc, m.output_nc, **g_kw)
    G_BA = build_generator(m.netG, m.output_nc, m.input_nc, **g_kw)
    # WGAN-GP differentiates D's input gradient again: only the torch reference has a double
    # backward (the fused kernels' backward is not differentiable), so D uses it then.
    d_backend = "torch" if cfg.loss.gan_mode == "wgangp" else kernels
    d_kw = dict(
        ndf=m.ndf,
        n_layers=m.n_layers_D,
        norm=m.norm,
        init_type=m.init_type,
        init_gain=m.init_gain,
        backend=d_backend,
    )
    D_A = build_discriminator(m.netD, m.input_nc, **d_kw)
    D_B = build_discriminator(m.netD, m.output_nc, **d_kw)
    fmt = torch.channels_last if cfg.run.channels_last else torch.preserve_format
    nets = [n.to(device=device, memory_format=fmt) for n in (G_AB, G_BA, D_A, D_B)]
    G_AB, G_BA, D_A, D_B = nets
    for n in nets:
        n.train()
    opt_G = build_optimizer(list(G_AB.parameters()) + list(G_BA.parameters()), cfg, device)
    opt_D = build_optimizer(list(D_A.parameters()) + list(D_B.parameters()), cfg, device)
    amp_dtype = amp_dtype_for(device, cfg.run.amp)
    # Loss scaling only for fp16 (bf16 has fp32's exponent range). Note: an enabled GradScaler
    # reads its inf check back to the host in step(): the fp16 path syncs once per optimizer step.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    pool_A = ImagePool(cfg.loss.pool_size).to(device)
    pool_B = ImagePool(cfg.loss.pool_size).to(device)
    aug = torch.Generator(device=device)
    aug.manual_seed(cfg.run.seed + 1)
    state = TrainState(
        G_AB=G_AB,
        G_BA=G_BA,
        D_A=D_A,
        D_B=D_B,
        opt_G=opt_G,
        opt_D=opt_D,
        sched_G=build_scheduler(opt_G, cfg),
        sched_D=build_scheduler(opt_D, cfg),
        scaler=scaler,
        pool_A=pool_A,
        pool_B=pool_B,
        device=device,
        amp_dtype=amp_dtype,
        channels_last=cfg.run.channels_last,
        aug_generator=aug,
    )
    if cfg.run.compile:
        from fastcgan.train.step import compile_step

        compile_step(state, cfg)
    return state
