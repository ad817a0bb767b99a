"""CUT / FastCUT training-step throughput and memory against the CycleGAN recipe, same data, size
and execution settings, all in this process.

The CUT authors report FastCUT "about 2x" faster than CycleGAN and using about half the memory
(one generator and one discriminator instead of two of each; FastCUT also skips the NCE-identity
pass). Each row: images/s (one image = one A and one B image, batch x iterations/s), the ratio to
the CycleGAN recipe, and memory -- on a GPU the peak allocated memory of the step, everywhere the
bytes the step's autograd graph keeps for its backwards (every tensor saved for backward, counted
once per storage: the activation memory, which is what differs between the recipes) plus the
bytes of parameters, gradients and Adam moments.

Recipes at their official settings (CycleGAN: lambda 10 / 0.5, pool 50; CUT: NCE identity,
256 patches on 5 layers, 256-wide heads; FastCUT: lambda_NCE 10, flip-equivariance), ResNet-9 +
70x70 PatchGAN, batch 1, random data already on the device.

    pytest bench/test_cut_step.py -s           # CPU rows (64², ngf 16); GPU rows on a CUDA machine
"""

from __future__ import annotations

import functools
import gc

import pytest
import torch
from _timing import median_time

RECIPES = ("cyclegan", "cut", "fastcut")


def _batch(device, b, size):
    g = torch.Generator().manual_seed(0)
    return {d: (torch.rand(b, 3, size, size, generator=g) * 2 - 1).to(device) for d in "AB"}


def make_step(preset, device, batch, size, ngf, **flags):
    """``(state, step)`` of ``preset`` at ``size`` with ``ngf`` = ``ndf``, seeded."""
    from fastcgan.train import TrainConfig, build_state, build_step

    cfg = TrainConfig.from_preset(
        preset, dataset="synthetic", netG="resnet_9blocks", ngf=ngf, ndf=ngf, load_size=size,
        crop_size=size, batch_size=batch, device=str(device), **flags,
    )  # fmt: skip
    torch.manual_seed(0)
    state = build_state(cfg, device)
    return state, build_step(state, cfg)


def saved_bytes(step, batch) -> int:
    """Bytes of the tensors the step saves for its backwards (unique storages), one eager step."""
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. wrapper subclasses)
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(batch)
    return sum(seen.values())


def state_bytes(state) -> int:
    """Parameters + gradients + Adam moments (2 per parameter)."""
    n = sum(p.numel() * p.element_size() for net in state.nets.values() for p in net.parameters())
    return 4 * n


def _run(record, device, size, batch, ngf, tag, warmup, iters, **flags):
    data = _batch(device, batch, size)
    rows = []
    for preset in RECIPES:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        state, step = make_step(preset, device, batch, size, ngf, **flags)
        extra = 3 + (getattr(step, "warmup", -1) + 1) if flags.get("compile") else 0
        t = median_time(functools.partial(step, data), device, warmup=warmup + extra, iters=iters)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        # Compiled graphs keep their saved tensors out of the hooks: eager rows only.
        act = saved_bytes(step, data) / 2**20 if not flags.get("compile") else None
        rows.append((preset, t, peak, act, state_bytes(state) / 2**20))
        state = step = None
    base_t = rows[0][1]
    base_act = rows[0][3]
    base_peak = rows[0][2]
    for preset, t, peak, act, st in rows:
        ips = batch / t
        record(
            f"cut_step/{tag}/{preset}", device=str(device), size=size, batch=batch, ngf=ngf, n_blocks=9,
            seconds=t, images_per_s=ips, speed_vs_cyclegan=base_t / t, peak_memory_mb=peak,
            peak_vs_cyclegan=(peak / base_peak) if peak is not None else None, saved_activations_mb=act,
            activations_vs_cyclegan=(act / base_act) if act is not None else None, state_mb=st, **flags,
        )  # fmt: skip
        print(
            f"{tag:>14} {preset:<9} {ips:8.2f} img/s  x{base_t / t:4.2f} vs CycleGAN"
            + (f"  saved activations {act:8.1f} MB (x{act / base_act:4.2f})" if act is not None else "")
            + (f"  peak {peak:8.0f} MB (x{peak / base_peak:4.2f})" if peak is not None else "")
            + f"  params+grads+Adam {st:6.1f} MB"
        )


def test_cut_step_cpu(bench_record):
    """CPU: 64², ngf 16, fp32 eager (the CPU default), batch 1."""
    _run(bench_record, torch.device("cpu"), size=64, batch=1, ngf=16, tag="cpu-64-fp32", warmup=2, iters=7)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "tag,flags",
    [
        ("gpu-256-amp", {"amp": True, "channels_last": True, "compile": False, "cuda_graphs": False}),
        ("gpu-256-fast", {"amp": True, "channels_last": True, "compile": True, "cuda_graphs": True}),
    ],
)
def test_cut_step_gpu(bench_record, tag, flags):
    """GPU: the official 256², ngf 64, batch 1; bf16 eager, and the default fast path (compile +
    CUDA graphs)."""
    _run(bench_record, torch.device("cuda"), size=256, batch=1, ngf=64, tag=tag, warmup=3, iters=20, **flags)
