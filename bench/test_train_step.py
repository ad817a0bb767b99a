"""Training-step throughput: the official eager fp32 iteration vs fastcgan's ``train_step``.

Every row runs in this process against the same baseline (``baselines/official_step.py``, the
official ``optimize_parameters`` restated: module-per-op networks, separate D backwards,
per-image Python pool) on a batch already on the device, and records images/s (one image = one
A and one B image, i.e. batch size x iterations/s), the ratio to the baseline, peak memory on a
GPU and MFU (1.9 TFLOP per image per iteration for ResNet-9 + PatchGAN at 256², DESIGN.md,
against 989 TFLOP/s dense bf16 on an H100).

fastcgan variants (cumulative where it makes sense):
    torch-fp32        eager, fp32, the pure-PyTorch reference kernels
    auto-fp32         eager, fp32, the fastest fused InstanceNorm kernels (--kernels auto)
    auto-amp          + bf16 autocast (--amp)
    auto-amp-cl       + channels_last
    auto-amp-cl-compile  + torch.compile of the networks (GPU; CPU only with FASTCGAN_BENCH_CPU_COMPILE=1)

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
    "auto-amp": dict(kernels="auto", amp=True),
    "auto-amp-cl": dict(kernels="auto", amp=True, channels_last=True),
    "auto-amp-cl-compile": dict(kernels="auto", amp=True, channels_last=True, compile=True),
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


def _run(record, device, size, batch, ngf, n_blocks, variants, warmup, iters, tag):
    from fastcgan.train import TrainConfig, build_state, train_step

    torch.manual_seed(0)
    random.seed(0)
    data = _batch(device, batch, size)
    netG = "resnet_9blocks" if n_blocks == 9 else "resnet_6blocks"

    _reset_mem(device)
    official = OfficialCycleGAN(device, ngf=ngf, ndf=ngf, n_blocks=n_blocks)
    official.set_input(data["A"], data["B"])
    t_base = median_time(official.optimize_parameters, device, warmup=warmup, iters=iters)
    base_ips = batch / t_base
    rows = [("official-eager-fp32", t_base, _peak_mb(device))]
    official = None

    for name in variants:
        flags = VARIANTS[name]
        cfg = TrainConfig.from_preset(
            "cyclegan",
            dataset="synthetic",
            netG=netG,
            ngf=ngf,
            ndf=ngf,
            load_size=size,
            crop_size=size,
            batch_size=batch,
            device=str(device),
            **flags,
        )
        _reset_mem(device)
        torch.manual_seed(0)
        state = build_state(cfg, device)
        b = {
            k: (v.contiguous(memory_format=torch.channels_last) if cfg.run.channels_last else v)
            for k, v in data.items()
        }
        t = median_time(
            lambda: train_step(state, b, cfg),
            device,
            warmup=warmup + (3 if cfg.run.compile else 0),
            iters=iters,
        )
        rows.append((name, t, _peak_mb(device)))
        state = None  # free the networks before the next variant
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
    variants = ["torch-fp32", "auto-fp32", "auto-amp", "auto-amp-cl"]
    if os.environ.get("FASTCGAN_BENCH_CPU_COMPILE") == "1":
        variants.append("auto-amp-cl-compile")
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
        variants=list(VARIANTS),
        warmup=5,
        iters=20,
        tag=f"gpu-256-b{batch}",
    )
