"""Training-step throughput: the official eager fp32 iteration vs fastcgan's ``train_step``.

Every row runs in this process against the same baseline (``baselines/official_step.py``, the
official ``optimize_parameters`` restated: module-per-op networks, separate D backwards,
per-image Python pool) on a batch already on the device, and records images/s (one image = one
A and one B image, i.e. batch size x iterations/s), the ratio to the baseline, peak memory on a
GPU and MFU (1.9 TFLOP per image per iteration for ResNet-9 + PatchGAN at 256²: 1.879 counted by
``torch.utils.flop_counter.FlopCounterMode`` over one official iteration; against 989 TFLOP/s dense
bf16 on an H100 or H200).

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
and one more baseline: official-amp-compile, the official iteration with the switches any PyTorch
user can add (bf16 autocast, torch.compile of each network; GPU, CPU with
FASTCGAN_BENCH_CPU_COMPILE=1): what fastcgan adds beyond them is the ratio of its rows to this one.

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

TFLOP_PER_IMAGE = 1.9  # one iteration at batch 1, 256², ResNet-9 + 70x70 PatchGAN (FlopCounterMode: 1.879)
PEAK_BF16_TFLOPS = 989.0  # H100 SXM / H200 dense bf16

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
    cl = bool(cfg.run.channels_last)

    def augment(u8):
        return {d: augment_batch(u8[d], size, True, generator=state.aug_generator, channels_last=cl) for d in "AB"}

    return data_path_step(step, cfg, augment, device, host_u8, bank if on_gpu_data else None)


def data_path_step(step, cfg, augment, device, host_u8, bank):
    """``(one_step, warmup)`` of a built ``step``: each call takes the next uint8 batch from
    ``bank`` (the device image bank) or copies ``host_u8`` to the device, ``augment``s it and runs
    the step; ``warmup``: the untimed calls it needs first (compile, CUDA-graph capture)."""
    it = [0]

    def one_step():
        if bank is not None:
            u8 = bank.sample_batch(cfg.data.batch_size, it[0])
        else:
            u8 = {d: v.to(device, non_blocking=True) for d, v in host_u8.items()}
        it[0] += 1
        return step(augment(u8))

    # A captured step (CUDAGraphStep) runs ``warmup`` eager calls, then captures on the next.
    graph_warmup = getattr(step, "warmup", None)
    return one_step, (3 if cfg.run.compile else 0) + (graph_warmup + 1 if graph_warmup is not None else 0)


def steady_peak_mb(fn, device) -> tuple[float | None, float | None]:
    """(peak since the last reset, peak of one more call of ``fn``) in MiB; (None, None) on a CPU.

    Call after the warm-up: the first number then holds the warm-up's transients (cuDNN trying
    algorithms with large scratch buffers under --cudnn-benchmark, compilation), which a training
    run pays once; the second is what every step of a run needs (resident state, a CUDA graph's
    pool, the step's activations)."""
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize()
    warmup_peak = torch.cuda.max_memory_allocated() / 2**20
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return warmup_peak, torch.cuda.max_memory_allocated() / 2**20


def _run(record, device, size, batch, ngf, n_blocks, variants, warmup, iters, tag, rounds=1):
    """The official baseline and every variant. ``rounds`` == 1: each row built, warmed up,
    measured and freed in turn (a dedicated GPU: stable timings, each row's memory alone).
    ``rounds`` > 1: every row alive at once, taking turns round-robin, each row's time the
    median of its per-round medians (a shared CPU: a load change hits every row alike); memory
    is then not recorded."""
    import statistics

    torch.manual_seed(0)
    random.seed(0)
    data, host_u8, bank = make_inputs(device, batch, size)

    def build(name):
        """(one step, untimed calls it needs first) of row ``name``."""
        if name.startswith("official-"):
            switches = name == "official-amp-compile"  # bf16 autocast + torch.compile of each network
            official = OfficialCycleGAN(device, ngf=ngf, ndf=ngf, n_blocks=n_blocks, amp=switches, compile=switches)
            official.set_input(data["A"], data["B"])
            return official.optimize_parameters, 3 if switches else 0
        return make_fastcgan_step(
            {**VARIANTS, **DEFAULT_VARIANTS}[name], device, batch, size, ngf, n_blocks, host_u8, bank
        )

    names = ["official-eager-fp32", *variants]
    times: dict[str, list[float]] = {name: [] for name in names}
    memory: dict[str, tuple] = {}
    live = {}
    for name in names:
        _reset_mem(device)
        fn, extra = build(name)
        for _ in range(warmup + extra):
            fn()
        memory[name] = steady_peak_mb(fn, device) if rounds == 1 else (None, None)
        if rounds == 1:
            times[name].append(median_time(fn, device, warmup=0, iters=iters))
            fn = None  # free the networks before the next row
        else:
            live[name] = fn
    for _ in range(rounds if rounds > 1 else 0):
        for name, fn in live.items():
            times[name].append(median_time(fn, device, warmup=1, iters=iters))
    live.clear()
    t_base = statistics.median(times["official-eager-fp32"])
    for name in names:
        t = statistics.median(times[name])
        ips = batch / t
        warm_mem, mem = memory[name]
        mfu = ips * TFLOP_PER_IMAGE * (size / 256) ** 2 / PEAK_BF16_TFLOPS if device.type == "cuda" else None
        record(
            f"train_step/{tag}/{name}",
            device=str(device),
            size=size,
            batch=batch,
            ngf=ngf,
            n_blocks=n_blocks,
            seconds=t,
            seconds_min=min(times[name]),
            seconds_max=max(times[name]),
            rounds=rounds,
            threads=torch.get_num_threads(),
            images_per_s=ips,
            ratio_to_official=t_base / t,
            peak_memory_mb=mem,
            warmup_peak_memory_mb=warm_mem,
            mfu=mfu,
        )
        print(
            f"{tag:>18} {name:<22} {ips:9.2f} img/s  x{t_base / t:5.2f}"
            + (f"  (rounds {min(times[name]) * 1e3:.0f}-{max(times[name]) * 1e3:.0f} ms)" if rounds > 1 else "")
            + (f"  peak {mem:8.0f} MB (warm-up {warm_mem:8.0f})  MFU {100 * mfu:5.1f}%" if mem is not None else "")
        )


def test_train_step_cpu(bench_record):
    """CPU at a small size: 64x64, ngf 16, ResNet-9 + PatchGAN, batch 1, one thread
    (FASTCGAN_BENCH_THREADS to change), rows taking turns over 7 rounds: run one after another
    on a shared 2-core machine, three runs of this test gave auto-fp32 1.16x, 5.5x and 0.20x the
    official step."""
    variants = ["torch-fp32", "auto-fp32", "auto-amp", "auto-amp-cl", "default"]  # no CUDA graphs on a CPU
    if os.environ.get("FASTCGAN_BENCH_CPU_COMPILE") == "1":
        variants += ["official-amp-compile", "auto-fp32-cl-compile", "auto-amp-cl-compile"]
    n = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FASTCGAN_BENCH_THREADS", "1")))
    try:
        _run(bench_record, torch.device("cpu"), size=64, batch=1, ngf=16, n_blocks=9, variants=variants,
             warmup=2, iters=3, tag=f"cpu-64-b1-t{torch.get_num_threads()}", rounds=7)
    finally:
        torch.set_num_threads(n)


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
        variants=["official-amp-compile"] + [v for v in VARIANTS if v != "auto-fp32-cl-compile"] + ["default-amp"],
        warmup=5,
        iters=20,
        tag=f"gpu-256-b{batch}",
    )
