"""Training-step throughput: the official eager fp32 iteration vs fastcgan's ``train_step``.

Every row runs in this process against the same baseline (``baselines/official_step.py``, the
official ``optimize_parameters`` restated: module-per-op networks, separate D backwards,
per-image Python pool) on a batch already on the device, and records images/s (one image = one
A and one B image, i.e. batch size x iterations/s), the ratio to the baseline, peak memory on a
GPU and MFU (1.9 TFLOP per image per iteration for ResNet-9 + PatchGAN at 256², DESIGN.md,
against 989 TFLOP/s dense bf16 on an H100).

fastcgan variants, each optimisation switched on in turn (cumulative). Every fastcgan row times
the data path too: a uint8 batch (pinned host memory) copied to the device and augmented (random
crop + flip) there, or with --data-on-gpu drawn from the device-resident bank -- the baseline
gets its float batch for free, so the ratios are conservative.
    torch-fp32              eager, fp32, the pure-PyTorch reference kernels
    auto-fp32               + the fastest fused InstanceNorm kernels (--kernels auto)
    auto-fp32-cl-compile    fp32 + channels_last + compile (CPU rows only: for CPUs without bf16)
    auto-amp                + bf16 autocast (--amp)
    auto-amp-cl             + channels_last
    auto-amp-cl-compile     + torch.compile of the step's phases (GPU; CPU only with
                              FASTCGAN_BENCH_CPU_COMPILE=1)
    ...-graphs              + CUDA graphs of the whole step (GPU only)
    ...-graphs-gpudata      + --data-on-gpu (GPU only)
    default / default-amp   the bare command / `--amp` alone, every speed flag left to the
                              trainer's defaults (must match the best hand-flagged row)

    pytest bench/test_train_step.py -s            # CPU rows here; GPU rows on a CUDA machine
"""

from __future__ import annotations

import gc
import os
import random

import pytest
import torch
from _timing import median_time
from baselines.official_step import OfficialCycleGAN

TFLOP_PER_IMAGE = 1.9  # one iteration at batch 1, 256², ResNet-9 + 70x70 PatchGAN (DESIGN.md)
PEAK_BF16_TFLOPS = 989.0  # H100 SXM dense bf16

VARIANTS = {
    "torch-fp32": dict(kernels="torch"),
    "auto-fp32": dict(kernels="auto"),
    "auto-fp32-cl-compile": dict(kernels="auto", channels_last=True, compile=True),  # CPUs without bf16
    "auto-amp": dict(kernels="auto", amp=True),
    "auto-amp-cl": dict(kernels="auto", amp=True, channels_last=True),
    # cuda_graphs=False: with --amp --compile on a GPU the trainer captures the step by default.
    "auto-amp-cl-compile": dict(
        kernels="auto", amp=True, channels_last=True, compile=True, cuda_graphs=False
    ),
    "auto-amp-cl-compile-graphs": dict(
        kernels="auto", amp=True, channels_last=True, compile=True, cuda_graphs=True
    ),
    "auto-amp-cl-compile-graphs-gpudata": dict(
        kernels="auto", amp=True, channels_last=True, compile=True, cuda_graphs=True, data_on_gpu=True
    ),
    # The same with the native CUDA kernels forced: "auto" picks Triton for a replayed bf16 step
    # (the H200 kernel table); this row checks that choice on the whole step.
    "cuda-amp-cl-compile-graphs-gpudata": dict(
        kernels="cuda", amp=True, channels_last=True, compile=True, cuda_graphs=True, data_on_gpu=True
    ),
}
# What the product's own commands give with no speed flag: every "auto" flag resolved by
# fastcgan.train.execution.resolve_fast_path for the device (they must match the best
# hand-flagged row: on a GPU auto-amp-cl-compile-graphs-gpudata, on a CPU auto-fp32).
DEFAULT_VARIANTS = {
    "default": dict(resolve_defaults=True),  # python -m fastcgan.train
    "default-amp": dict(resolve_defaults=True, amp=True),  # python -m fastcgan.train --amp
}


def _batch(device, b, size):
    g = torch.Generator().manual_seed(0)
    return {d: (torch.rand(b, 3, size, size, generator=g) * 2 - 1).to(device) for d in "AB"}


def _reset_mem(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device):
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def make_inputs(device, batch, size):
    """(float batch for the baseline, pinned uint8 host batch at load size, device image bank):
    the data every row of one (batch, size) is timed on, built from fixed seeds."""
    from fastcgan.data.device import DeviceImageBank

    data = _batch(device, batch, size)
    # uint8 images at load size (crop to ``size``), as the dataset/bank hands them over.
    load = size + size // 8
    g = torch.Generator().manual_seed(1)
    host_u8 = {d: torch.randint(0, 256, (batch, 3, load, load), dtype=torch.uint8, generator=g) for d in "AB"}
    if device.type == "cuda":
        host_u8 = {d: v.pin_memory() for d, v in host_u8.items()}
    bank = DeviceImageBank(
        torch.randint(0, 256, (64, 3, load, load), dtype=torch.uint8, generator=g).to(device),
        torch.randint(0, 256, (64, 3, load, load), dtype=torch.uint8, generator=g).to(device),
        length=64,
        batch_augment={"crop_size": size, "flip": True},
    )
    return data, host_u8, bank


def make_fastcgan_step(flags, device, batch, size, ngf, n_blocks, host_u8, bank):
    """``(one_step, warmup)`` for fastcgan configured by ``flags`` (a ``VARIANTS`` value, plus any
    ``RunConfig`` override such as ``compile_backend``): a fresh seeded state and a closure that
    runs one training step *including the data path*, and how many untimed calls it needs first
    (compile, CUDA-graph capture). The only place the benchmarks touch ``fastcgan.train``
    internals (``bench/gpu_check.py`` uses it too): adapt it here when they change."""
    from fastcgan.data import augment_batch
    from fastcgan.train import TrainConfig, build_state, build_step

    from fastcgan.train import resolve_fast_path

    flags = dict(flags)
    resolve_defaults = flags.pop("resolve_defaults", False)
    on_gpu_data = flags.pop("data_on_gpu", False)
    load = size + size // 8
    cfg = TrainConfig.from_preset(
        "cyclegan",
        dataset="synthetic",
        netG="resnet_9blocks" if n_blocks == 9 else "resnet_6blocks",
        ngf=ngf,
        ndf=ngf,
        load_size=load,
        crop_size=size,
        batch_size=batch,
        device=str(device),
        **flags,
    )
    if resolve_defaults:  # the trainer's own choice for this device (the bank's 64 images fit anywhere)
        cfg = resolve_fast_path(cfg, device, dataset_nbytes=bank.nbytes)[0]
        on_gpu_data = bool(cfg.data.data_on_gpu)
    torch.manual_seed(0)
    state = build_state(cfg, device)
    step = build_step(state, cfg)  # flags left None ("auto") stay off unless resolved above
    it = [0]
    cl = bool(cfg.run.channels_last)

    def one_step():
        if on_gpu_data:
            u8 = bank.sample_batch(batch, it[0])
        else:
            u8 = {d: v.to(device, non_blocking=True) for d, v in host_u8.items()}
        it[0] += 1
        gen = state.aug_generator
        real = {d: augment_batch(u8[d], size, True, generator=gen, channels_last=cl) for d in "AB"}
        return step(real)

    # A captured step (CUDAGraphStep) runs ``warmup`` eager calls, then captures on the next.
    graph_warmup = getattr(step, "warmup", None)
    return one_step, (3 if cfg.run.compile else 0) + (graph_warmup + 1 if graph_warmup is not None else 0)


def _run(record, device, size, batch, ngf, n_blocks, variants, warmup, iters, tag):
    torch.manual_seed(0)
    random.seed(0)
    data, host_u8, bank = make_inputs(device, batch, size)

    _reset_mem(device)
    official = OfficialCycleGAN(device, ngf=ngf, ndf=ngf, n_blocks=n_blocks)
    official.set_input(data["A"], data["B"])
    t_base = median_time(official.optimize_parameters, device, warmup=warmup, iters=iters)
    base_ips = batch / t_base
    rows = [("official-eager-fp32", t_base, _peak_mb(device))]
    official = None

    for name in variants:
        _reset_mem(device)
        one_step, extra_warmup = make_fastcgan_step(
            {**VARIANTS, **DEFAULT_VARIANTS}[name], device, batch, size, ngf, n_blocks, host_u8, bank
        )
        t = median_time(one_step, device, warmup=warmup + extra_warmup, iters=iters)
        rows.append((name, t, _peak_mb(device)))
        one_step = None  # free the networks before the next variant
    for name, t, mem in rows:
        ips = batch / t
        mfu = ips * TFLOP_PER_IMAGE * (size / 256) ** 2 / PEAK_BF16_TFLOPS if device.type == "cuda" else None
        record(
            f"train_step/{tag}/{name}",
            device=str(device),
            size=size,
            batch=batch,
            ngf=ngf,
            n_blocks=n_blocks,
            seconds=t,
            images_per_s=ips,
            ratio_to_official=ips / base_ips,
            peak_memory_mb=mem,
            mfu=mfu,
        )
        print(
            f"{tag:>18} {name:<22} {ips:9.2f} img/s  x{ips / base_ips:5.2f}"
            + (f"  peak {mem:8.0f} MB  MFU {100 * mfu:5.1f}%" if mem is not None else "")
        )


def test_train_step_cpu(bench_record):
    """CPU at a small size: 64x64, ngf 16, ResNet-9 + PatchGAN, batch 1."""
    variants = ["torch-fp32", "auto-fp32", "auto-amp", "auto-amp-cl", "default"]  # no CUDA graphs on a CPU
    if os.environ.get("FASTCGAN_BENCH_CPU_COMPILE") == "1":
        variants += ["auto-fp32-cl-compile", "auto-amp-cl-compile"]
    _run(
        bench_record,
        torch.device("cpu"),
        size=64,
        batch=1,
        ngf=16,
        n_blocks=9,
        variants=variants,
        warmup=2,
        iters=5,
        tag="cpu-64-b1",
    )


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 8])
def test_train_step_gpu(bench_record, batch):
    """GPU at the real size: 256x256, ResNet-9 (ngf 64) + 70x70 PatchGAN, batch 1 and 8."""
    torch.backends.cudnn.benchmark = True
    _run(
        bench_record,
        torch.device("cuda"),
        size=256,
        batch=batch,
        ngf=64,
        n_blocks=9,
        variants=[v for v in VARIANTS if v != "auto-fp32-cl-compile"] + ["default-amp"],
        warmup=5,
        iters=20,
        tag=f"gpu-256-b{batch}",
    )
