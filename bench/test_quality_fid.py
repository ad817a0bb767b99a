"""FID/KID quality table on real data: before training, fastcgan fp32, fastcgan ``--amp`` and the
official-style eager step, the same number of steps each.

Data: ``../shared/data/monet2photo_mini`` (100 Monet / 210 photo training images, 21 / 40 test
images), read in place. Every run: the ``cyclegan128`` recipe (ResNet-6 generator, 70x70 PatchGAN,
LSGAN, lambda 10 / identity 0.5, pool 50, Adam 2e-4) at 64x64 (resize to 64, random flip), ngf/ndf 16,
batch 1, seed 0, ``N`` steps:

* ``before``: the official-style model's freshly initialised generators (N(0, 0.02) weights; the
  start of every run);
* ``fastcgan fp32`` / ``fastcgan --amp``: ``fastcgan.train.train`` (the public API), default
  kernels; ``--amp`` is bf16 autocast;
* ``official eager``: ``bench/baselines/official_step.py`` (the official iteration restated:
  eager fp32, per-module pads/norms, host-side image pool), fed the same images the same way
  (shuffled A each epoch, random B, random horizontal flip) from a seeded generator;
* ``identity``: no translation at all -- the test images of one domain scored against the other
  (what "doing nothing" scores here).

Every row is scored by one :class:`fastcgan.metrics.TrainingEvaluator` (real-image features
computed once): A->B translations of ``testA`` against the real ``testB`` and B->A of ``testB``
against the real ``testA``, all at 64x64, generators run in fp32 (the same inference precision for
every row), FID and KID (subset = all images, so ``kid_std`` is 0) from the packaged FID Inception
network. With 21 and 40 test images the FIDs carry a large small-sample bias: compare rows of this
table with each other, not with published FIDs (which use thousands of images at 256x256).

    pytest bench/test_quality_fid.py -s              # N = 1000, one thread
    FASTCGAN_BENCH_FID_STEPS=300 pytest bench/test_quality_fid.py -s
    FASTCGAN_BENCH_FID_IDENTITY=1 ...                # also score the untranslated test sets
    FASTCGAN_BENCH_FID_SEEDS=0,1,2,3 FASTCGAN_BENCH_FID_AMP=0 ...   # the seed-to-seed spread: fastcgan
                                                     # fp32 and official rows per seed, then mean ± sd

Measured on the 2-core AMD EPYC (AVX512-BF16) of the development machines, one thread: N = 1000
took 10.0 min wall / 8.0 min CPU (training 3 x 2-3 min, each evaluation ~20-25 s); N = 300 3.9 min
CPU. With one thread bf16 autocast trained *faster* than fp32 there (8.0 vs 5.4 img/s); with two
threads on the loaded machine it measured 4x slower (1.0 vs 4.2 img/s), and on AVX2-only CPUs it
is ~9x slower -- lower N there.
"""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch
from torch import nn

DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "monet2photo_mini"))
SIZE = 64
NGF = NDF = 16
SEED = 0
DEFAULT_STEPS = 1000
DIRECTIONS = ("AtoB", "BtoA")


def _fastcgan_run(tmp_path, steps: int, amp: bool, seed: int = SEED) -> tuple[dict, nn.Module, nn.Module]:
    from fastcgan.models import load_generator
    from fastcgan.train import TrainConfig, train

    kw = {
        "dataroot": DATA,
        "load_size": SIZE,
        "crop_size": SIZE,
        "ngf": NGF,
        "ndf": NDF,
        "max_steps": steps,
        "seed": seed,
        "amp": amp,
        "device": "cpu",
        "output_dir": str(tmp_path),
        "name": f"{'amp' if amp else 'fp32'}-seed{seed}",
        "tensorboard": False,
        "progress": False,
        "log_every": 50,
        "sample_every": 10**9,
        "checkpoint_every": 10**9,
        "num_workers": 0,
    }
    try:
        cfg = TrainConfig.from_preset("cyclegan128", eval_every=0, **kw)  # FID is scored here, after
    except ValueError:  # ConfigError: a trainer without --eval-every
        cfg = TrainConfig.from_preset("cyclegan128", **kw)
    t0 = time.perf_counter()
    s = train(cfg, install_signal_handlers=False)
    wall = time.perf_counter() - t0
    assert s["steps"] == steps and s["exit_code"] == 0
    gens = [load_generator(s["run_dir"], d, map_location="cpu") for d in DIRECTIONS]
    return {"seconds": round(wall, 1), "images_per_s": s["images_per_s"]}, gens[0], gens[1]


def _load_train(domain: str) -> torch.Tensor:
    from fastcgan.evaluate import load_domain

    imgs = load_domain(DATA, "train", domain, 3, SIZE)[0]
    return torch.stack(imgs).float().div_(127.5).sub_(1.0)  # (N, 3, 64, 64) in [-1, 1]


def _official_run(steps: int, seed: int = SEED):
    sys.path.insert(0, os.path.dirname(__file__))
    from baselines.official_step import train_official

    model, before, wall = train_official(_load_train("A"), _load_train("B"), steps, seed, ngf=NGF, ndf=NDF,
                                         n_blocks=6)
    stats = {"seconds": round(wall, 1), "images_per_s": round(steps / wall, 3)}
    return stats, [_as_generator(g) for g in before], _as_generator(model.netG_A), _as_generator(model.netG_B)


def _as_generator(net: nn.Module) -> nn.Module:
    # What the deploy runtime needs to pad inputs: the arch (size multiple 4) and channels.
    net.config = {"arch": "resnet_6blocks", "input_nc": 3, "output_nc": 3}
    return net


def _seed_spread(rows: list[tuple[str, dict, dict]]) -> None:
    """Mean ± sample standard deviation over the seeds of each kind of row: whether a gap between
    two rows of one seed is larger than the seed-to-seed spread."""
    import statistics

    kinds: dict[str, list[dict]] = {}
    for name, _, m in rows:
        if ", seed " in name:
            kinds.setdefault(name.split(", seed ")[0], []).append(m)
    print("| run | seeds | FID A→B | KID A→B | FID B→A | KID B→A |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, ms in kinds.items():
        cells = []
        for key, fmt in (("fid_AtoB", ".1f"), ("kid_AtoB_mean", ".3f"), ("fid_BtoA", ".1f"), ("kid_BtoA_mean", ".3f")):
            v = [m[key] for m in ms]
            cells.append(f"{statistics.mean(v):{fmt}} ± {statistics.stdev(v):{fmt}}")
        print(f"| {kind} | {len(ms)} | {' | '.join(cells)} |")


class _Identity(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = {"arch": "resnet_6blocks", "input_nc": 3, "output_nc": 3}

    def forward(self, x):
        return x


def test_fid_quality_table_cpu(bench_record, tmp_path):
    import fastcgan.metrics as fm

    if not fm.metrics_available():
        pytest.skip(fm.metrics_status()[1])
    if not os.path.isdir(DATA):
        pytest.skip(f"shared data not found at {DATA}")
    steps = int(os.environ.get("FASTCGAN_BENCH_FID_STEPS", DEFAULT_STEPS))
    threads = torch.get_num_threads()
    # One thread: on a shared 2-core machine a second OpenMP thread mostly spins (CPU time without
    # progress); CPU time then equals the work done.
    torch.set_num_threads(int(os.environ.get("FASTCGAN_BENCH_FID_THREADS", "1")))
    try:
        _table(bench_record, fm, steps, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _table(bench_record, fm, steps: int, tmp_path) -> None:
    t_all, cpu_all = time.perf_counter(), time.process_time()
    ev = fm.TrainingEvaluator(DATA, phase="test", device="cpu", image_size=SIZE, batch_size=8)
    print(f"\nreal-image features ({ev.num_images}) in {ev.setup_seconds:.1f} s")

    seeds = [int(v) for v in os.environ.get("FASTCGAN_BENCH_FID_SEEDS", str(SEED)).split(",")]
    amp_rows = os.environ.get("FASTCGAN_BENCH_FID_AMP", "1") == "1"
    rows: list[tuple[str, dict, dict]] = []
    if os.environ.get("FASTCGAN_BENCH_FID_IDENTITY", "0") == "1":  # one more evaluation (~30 s)
        rows.append(("identity (no translation)", {}, ev(_Identity(), _Identity())))
    for seed in seeds:
        tag = f", seed {seed}" if len(seeds) > 1 else ""
        off_stats, before, off_AB, off_BA = _official_run(steps, seed)
        rows.append((f"before training (init){tag}", {}, ev(*before)))
        for amp in (False, True) if amp_rows else (False,):
            stats, G_AB, G_BA = _fastcgan_run(tmp_path, steps, amp, seed)
            rows.append((f"fastcgan {'--amp (bf16)' if amp else 'fp32'}{tag}", stats, ev(G_AB, G_BA)))
        rows.append((f"official-style eager fp32{tag}", off_stats, ev(off_AB, off_BA)))
    total, cpu_total = time.perf_counter() - t_all, time.process_time() - cpu_all

    print(
        f"\nmonet2photo_mini, 64x64, ResNet-6 ngf/ndf 16, batch 1, N = {steps} steps, CPU, "
        f"{torch.get_num_threads()} thread(s): {total / 60:.1f} min wall, {cpu_total / 60:.1f} min CPU"
    )
    print("| run | steps | train s | img/s | FID A→B | KID A→B | FID B→A | KID B→A | eval s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, st, m in rows:
        n = steps if st else 0
        print(
            f"| {name} | {n} | {st.get('seconds', '-')} | {st.get('images_per_s', '-')} | "
            f"{m['fid_AtoB']:.1f} | {m['kid_AtoB_mean']:.3f} | {m['fid_BtoA']:.1f} | {m['kid_BtoA_mean']:.3f} | "
            f"{m['eval_seconds']:.0f} |"
        )
        bench_record(
            f"quality_fid/cpu-{SIZE}-monet2photo_mini/{name}",
            steps=n,
            size=SIZE,
            ngf=NGF,
            n_test={"A": ev.num_images["A"], "B": ev.num_images["B"]},
            network=fm.NETWORK,
            threads=torch.get_num_threads(),
            total_wall_s=round(total, 1),
            total_cpu_s=round(cpu_total, 1),
            **st,
            **m,
        )
    print(f"network: {fm.NETWORK}")
    if len(seeds) > 1:
        _seed_spread(rows)
    for name, _, m in rows:
        assert all(torch.isfinite(torch.tensor(v)) for v in m.values()), name
