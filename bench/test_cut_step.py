"""CUT / FastCUT training-step throughput and memory against the CycleGAN recipe, same data, size
and execution settings, all in this process.

The CUT authors report FastCUT "about 2x" faster than CycleGAN and using about half the memory
(one generator and one discriminator instead of two of each; FastCUT also skips the NCE-identity
pass). Each row: images/s (one image = one A and one B image, batch x iterations/s), the ratio to
the CycleGAN recipe, and memory -- on a GPU the step's peak allocated memory above the resident
state (eager rows), everywhere the peak bytes of tensors saved for backward alive at once (counted
once per storage: the activation memory, which is what differs between the recipes), plus the
bytes of parameters, gradients and Adam moments. The recipes are
built side by side and timed in interleaved rounds.

Recipes at their official settings (CycleGAN: lambda 10 / 0.5, pool 50; CUT: NCE identity,
256 patches on 5 layers, 256-wide heads; FastCUT: lambda_NCE 10, flip-equivariance), ResNet-9 +
70x70 PatchGAN, batch 1, random data already on the device.

    pytest bench/test_cut_step.py -s           # CPU rows (64², ngf 16); GPU rows on a CUDA machine
"""

from __future__ import annotations

import functools
import gc
import statistics
import weakref

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
    """Peak bytes of the tensors saved for backward that are alive at once during one eager step
    (unique storages; a tensor counts until the graph holding it -- or anything else -- drops it)."""
    alive: dict[int, list[int]] = {}  # storage address -> [references, bytes]
    cur, peak = [0], [0]

    def release(ptr):
        entry = alive[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            cur[0] -= entry[1]
            del alive[ptr]

    def pack(t):
        try:
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. wrapper subclasses)
            return t
        entry = alive.setdefault(ptr, [0, nbytes])
        if entry[0] == 0:
            cur[0] += nbytes
            peak[0] = max(peak[0], cur[0])
        entry[0] += 1
        weakref.finalize(t, release, ptr)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(batch)
    gc.collect()
    return peak[0]


def state_bytes(state) -> int:
    """Parameters + gradients + Adam moments (2 per parameter)."""
    n = sum(p.numel() * p.element_size() for net in state.nets.values() for p in net.parameters())
    return 4 * n


def _run(record, device, size, batch, ngf, tag, warmup, iters, **flags):
    """All three recipes built side by side, their steps timed in interleaved rounds (a load change
    on a shared machine hits every recipe alike), memory measured per recipe."""
    data = _batch(device, batch, size)
    steps = {p: make_step(p, device, batch, size, ngf, **flags) for p in RECIPES}
    mem = {}
    for preset, (state, step) in steps.items():
        extra = 3 + (getattr(step, "warmup", -1) + 1) if flags.get("compile") else 0
        for _ in range(warmup + extra):
            step(data)
        peak = None
        if device.type == "cuda" and not flags.get("cuda_graphs"):  # a replay allocates nothing
            torch.cuda.synchronize()
            gc.collect()
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(data)
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - resident) / 2**20
        # Compiled graphs keep their saved tensors out of the hooks: eager rows only.
        act = saved_bytes(step, data) / 2**20 if not flags.get("compile") else None
        mem[preset] = (peak, act, state_bytes(state) / 2**20)
    times: dict[str, list[float]] = {p: [] for p in RECIPES}
    for _ in range(iters):
        for preset, (_, step) in steps.items():
            times[preset].append(median_time(functools.partial(step, data), device, warmup=0, iters=1))
    t = {p: statistics.median(v) for p, v in times.items()}
    base_t, (base_peak, base_act, _) = t["cyclegan"], mem["cyclegan"]
    for preset in RECIPES:
        peak, act, st = mem[preset]
        ips = batch / t[preset]
        record(
            f"cut_step/{tag}/{preset}", device=str(device), size=size, batch=batch, ngf=ngf, n_blocks=9,
            seconds=t[preset], images_per_s=ips, speed_vs_cyclegan=base_t / t[preset], step_peak_mb=peak,
            step_peak_vs_cyclegan=(peak / base_peak) if peak is not None else None, saved_activations_mb=act,
            activations_vs_cyclegan=(act / base_act) if act is not None else None, state_mb=st, **flags,
        )  # fmt: skip
        print(
            f"{tag:>14} {preset:<9} {ips:8.2f} img/s  x{base_t / t[preset]:4.2f} vs CycleGAN"
            + (f"  saved activations {act:8.1f} MB (x{act / base_act:4.2f})" if act is not None else "")
            + (f"  step peak {peak:8.0f} MB (x{peak / base_peak:4.2f})" if peak is not None else "")
            + f"  params+grads+Adam {st:6.1f} MB"
        )


@pytest.mark.parametrize("size,ngf,iters", [(64, 16, 7), (128, 32, 3)], ids=["64", "128"])
def test_cut_step_cpu(bench_record, size, ngf, iters):
    """CPU: fp32 eager (the CPU default), batch 1, at 64² ngf 16 and 128² ngf 32. PatchNCE's cost
    does not grow with the image (256 patches per layer), so the larger row is closer to 256²."""
    _run(bench_record, torch.device("cpu"), size=size, batch=1, ngf=ngf, tag=f"cpu-{size}-fp32", warmup=1,
         iters=iters)  # fmt: skip


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
