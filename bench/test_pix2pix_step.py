"""pix2pix training-step throughput: the official eager fp32 iteration vs fastcgan's recipe step.

The baseline is ``baselines/official_pix2pix_step.py`` (the official ``optimize_parameters``
restated: nested U-Net blocks, two separate D calls, expanded-target BCE, default Adam) on a
float batch already on the device. Every fastcgan row also times its data path: a uint8 pair
batch (pinned host memory) copied to the device and cropped/flipped jointly there
(``augment_pair``), or with ``-gpudata`` drawn from the device-resident bank -- so the ratios
are conservative. Variants as in ``test_train_step.py`` (cumulative): ``torch-fp32`` (eager,
reference kernels), ``auto-fp32`` (fused kernels where the network has them: per-image BN only
at inference, so training BatchNorm stays cuDNN/ATen), then bf16 autocast, channels_last,
compile of the three phases, CUDA graphs (GPU rows).

    pytest bench/test_pix2pix_step.py -s      # CPU rows here; GPU rows on a CUDA machine
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from _timing import median_time
from baselines.official_pix2pix_step import OfficialPix2Pix
from test_train_step import VARIANTS, _peak_mb, _reset_mem, data_path_step, make_inputs


def make_pix2pix_step(flags, device, batch, size, ngf, host_u8, bank):
    """``(one_step, warmup)``: a fresh seeded pix2pix state (U-Net ``unet_<size>``, BatchNorm,
    dropout, conditional PatchGAN) and a closure running one step including the data path."""
    from fastcgan.data import augment_pair
    from fastcgan.train import TrainConfig, build_state, build_step

    flags = dict(flags)
    on_gpu_data = flags.pop("data_on_gpu", False)
    cfg = TrainConfig.from_preset(
        "pix2pix", dataset="synthetic", netG=f"unet_{size}", ngf=ngf, ndf=ngf, load_size=size + size // 8,
        crop_size=size, batch_size=batch, device=str(device), **flags,
    )
    torch.manual_seed(0)
    state = build_state(cfg, device)
    step = build_step(state, cfg)
    cl = bool(cfg.run.channels_last)

    def augment(u8):
        a, b = augment_pair(u8["A"], u8["B"], size, True, generator=state.aug_generator, channels_last=cl)
        return {"A": a, "B": b}

    return data_path_step(step, cfg, augment, device, host_u8, bank if on_gpu_data else None)


def _run(record, device, size, batch, ngf, variants, warmup, iters, tag, rounds=1):
    """Time the baseline and every variant; with ``rounds`` > 1 they take turns (round-robin, the
    median of each one's per-round medians), so a shared machine's load hits all rows alike."""
    import statistics

    torch.manual_seed(0)
    random.seed(0)
    data, host_u8, bank = make_inputs(device, batch, size)
    _reset_mem(device)
    torch.manual_seed(0)
    official = OfficialPix2Pix(device, ngf=ngf, ndf=ngf, num_downs=7 if size == 128 else 8)
    official.set_input(data["A"], data["B"])
    steps = {"official-eager-fp32": (official.optimize_parameters, 0)}
    for name in variants:
        steps[name] = make_pix2pix_step(VARIANTS[name], device, batch, size, ngf, host_u8, bank)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name, (fn, extra) in steps.items():
            times[name].append(median_time(fn, device, warmup=(warmup + extra) if r == 0 else 1, iters=iters))
    mem = _peak_mb(device)  # all rows alive at once: the peak of the whole set
    t_base = statistics.median(times["official-eager-fp32"])
    for name, ts in times.items():
        t = statistics.median(ts)
        ips = batch / t
        record(f"pix2pix_step/{tag}/{name}", device=str(device), size=size, batch=batch, ngf=ngf,
               netG=f"unet_{size}", seconds=t, images_per_s=ips, ratio_to_official=t_base / t,
               peak_memory_mb_all_rows=mem, rounds=rounds)
        print(f"{tag:>18} {name:<22} {ips:9.2f} img/s  x{t_base / t:5.2f}")


def test_pix2pix_step_cpu(bench_record):
    """CPU at a small size: 128x128 (unet_128, the smallest official U-Net), ngf 16, batch 1, one
    thread (FASTCGAN_BENCH_THREADS to change: on a shared 2-core machine two threads per process
    made every row several times slower and noisier), rows taking turns over 7 rounds."""
    variants = ["torch-fp32", "auto-fp32"]
    if os.environ.get("FASTCGAN_BENCH_CPU_COMPILE") == "1":
        variants += ["auto-fp32-cl-compile"]
    n = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FASTCGAN_BENCH_THREADS", "1")))
    try:
        _run(bench_record, torch.device("cpu"), size=128, batch=1, ngf=16, variants=variants, warmup=2,
             iters=3, tag=f"cpu-128-b1-t{torch.get_num_threads()}", rounds=7)
    finally:
        torch.set_num_threads(n)


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 8])
def test_pix2pix_step_gpu(bench_record, batch):
    """GPU at the official size: 256x256, unet_256 (ngf 64) + conditional PatchGAN, batch 1 and 8."""
    torch.backends.cudnn.benchmark = True
    variants = [v for v in VARIANTS if v != "auto-fp32-cl-compile"]
    _run(bench_record, torch.device("cuda"), size=256, batch=batch, ngf=64, variants=variants, warmup=5,
         iters=20, tag=f"gpu-256-b{batch}")
