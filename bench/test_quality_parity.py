"""Does fastcgan train as well as the official step? Truth L1 over seeds, fastcgan vs official-style.

fastcgan promises the official results in less time. The FID table (``test_quality_fid.py``) cannot
settle that at its size (21 / 40 test images, one seed); the synthetic set can: its test images have
exact translations (``testA_truth_B/``, ``testB_truth_A/``), so every run gets a per-direction
ground-truth L1 (``truth_l1``, [0, 1] intensities) with little evaluation noise. What remains is
training noise, which this bench measures: for each seed, one fastcgan run (``fastcgan.train.train``,
fp32, default kernels) and one run of the official iteration restated
(``bench/baselines/official_step.py``: eager fp32, per-module pads and norms, the host image pool),
the same recipe -- the README demo's (``cyclegan128``: ResNet-6, 70x70 PatchGAN, LSGAN, lambda 10,
no identity term, pool 50, Adam 2e-4 (0.5, 0.999)) at 64x64, ngf/ndf 16, batch 1, N steps -- on
the same images fed the same way (A shuffled per epoch, B at random, random flips). Both are scored
by ``fastcgan.evaluate.evaluate_generators`` (fp32, the deploy runtime).

A CycleGAN run on this set lands in one of two modes (``tests/test_train_convergence.py``): it
finds the palette map (truth L1 ~0.10-0.16) or hides the colour in the outlines (~0.29-0.35), and
which one is chaotic in the seed and in every rounding. So the comparison is per mode: how often
each trainer finds the map (``found``: truth L1 < ``FOUND_L1`` in both directions) and the mean and
spread of the truth L1 of the runs that found it. Recorded and printed, not asserted (the
assertions: every run trains, i.e. beats the identity mapping).

    pytest bench/test_quality_parity.py -s                       # seeds 0-3, N = 600, one thread
    FASTCGAN_BENCH_PARITY_SEEDS=0,1,2,3,4,5 FASTCGAN_BENCH_PARITY_STEPS=600 pytest ...

Run time on the 2-core AMD EPYC (one thread): ~1 min per run at N = 600, i.e. ~8 min for 4 seeds.

Measured there (2026-11-28, seeds 0-17 in three sessions, N = 600, torch 2.14.1):

    trainer    found the map   truth L1 of those runs A->B / B->A   mean truth L1 of all 18 runs
    fastcgan   9 of 18         0.147 +- 0.023 / 0.148 +- 0.039       0.238 / 0.209
    official   9 of 18         0.138 +- 0.014 / 0.134 +- 0.037       0.237 / 0.200

The same frequency of finding the map, and differences among the runs that found it (0.009 /
0.014) of about one standard error of the difference (0.009 / 0.018): no quality difference
between the two trainers is visible at this size. A seed does not decide the mode for both: the
same seed lands in different modes in 6 of 18 cases (seeds 4, 5, 6, 11, 15, 17), as the two
trainers draw data and the pool from different random streams.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

SIZE = 64
NGF = NDF = 16
FOUND_L1 = 0.2  # a run "found the palette map" when both directions' truth L1 are below this
DIRECTIONS = ("AtoB", "BtoA")


def _seeds() -> list[int]:
    return [int(s) for s in os.environ.get("FASTCGAN_BENCH_PARITY_SEEDS", "0,1,2,3").split(",") if s.strip()]


def _fastcgan(root: str, out: str, seed: int, steps: int):
    from fastcgan.models import load_generator
    from fastcgan.train import TrainConfig, train

    cfg = TrainConfig.from_preset(
        "cyclegan128", dataset="synthetic", dataroot=root, load_size=SIZE, crop_size=SIZE, ngf=NGF, ndf=NDF,
        lambda_identity=0.0, seed=seed, max_steps=steps, device="cpu", output_dir=out, name=f"seed{seed}",
        tensorboard=False, progress=False, log_every=100, sample_every=10**9, checkpoint_every=10**9,
        eval_every=0, num_workers=0,
    )
    t0 = time.perf_counter()
    s = train(cfg, install_signal_handlers=False)
    assert s["steps"] == steps and s["exit_code"] == 0
    gens = [load_generator(s["run_dir"], d, map_location="cpu") for d in DIRECTIONS]
    return gens, time.perf_counter() - t0


def _official(root: str, seed: int, steps: int):
    sys.path.insert(0, os.path.dirname(__file__))
    from baselines.official_step import train_official

    from fastcgan.evaluate import load_domain

    A, B = (torch.stack(load_domain(root, "train", d, 3, SIZE)[0]).float().div_(127.5).sub_(1.0) for d in "AB")
    model, _, wall = train_official(A, B, steps, seed, ngf=NGF, ndf=NDF, n_blocks=6, lambda_idt=0.0)
    for g in (model.netG_A, model.netG_B):  # what the deploy runtime needs: arch (size multiple) and channels
        g.config = {"arch": "resnet_6blocks", "input_nc": 3, "output_nc": 3}
    return [model.netG_A, model.netG_B], wall


def _summary(rows: list[dict]) -> dict:
    found = [r for r in rows if r["found"]]
    out = {"runs": len(rows), "found": len(found)}
    for d in DIRECTIONS:
        vals = [r[f"truth_l1_{d}"] for r in found]
        out[f"found_mean_{d}"] = round(statistics.fmean(vals), 4) if vals else None
        out[f"found_std_{d}"] = round(statistics.stdev(vals), 4) if len(vals) > 1 else None
    return out


def test_truth_l1_over_seeds_fastcgan_vs_official(bench_record, tmp_path):
    from fastcgan.data import ensure_synthetic_dataset
    from fastcgan.evaluate import evaluate_generators

    steps = int(os.environ.get("FASTCGAN_BENCH_PARITY_STEPS", "600"))
    root = ensure_synthetic_dataset(str(tmp_path / "synthetic_64"), size=SIZE)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FASTCGAN_BENCH_PARITY_THREADS", "1")))
    rows: dict[str, list[dict]] = {"fastcgan": [], "official": []}
    try:
        for seed in _seeds():
            for name in rows:
                if name == "fastcgan":
                    gens, wall = _fastcgan(root, str(tmp_path / "runs"), seed, steps)
                else:
                    gens, wall = _official(root, seed, steps)
                ev = evaluate_generators(*gens, root, "test", "cpu")
                r = {"seed": seed, "seconds": round(wall, 1)}
                for d in DIRECTIONS:
                    r[f"truth_l1_{d}"] = round(ev[d]["truth_l1"], 4)
                    r[f"identity_l1_{d}"] = round(ev[d]["identity_truth_l1"], 4)
                r["found"] = all(r[f"truth_l1_{d}"] < FOUND_L1 for d in DIRECTIONS)
                rows[name].append(r)
                print(f"\n{name:9s} seed {seed}: truth L1 {r['truth_l1_AtoB']:.3f} / {r['truth_l1_BtoA']:.3f}"
                      f"  ({'found the map' if r['found'] else 'other mode'}, {wall:.0f} s)")
    finally:
        torch.set_num_threads(threads)

    print(f"\nsynthetic 64x64, ResNet-6 ngf/ndf 16, batch 1, N = {steps}, seeds {_seeds()}, CPU, one thread")
    print("| trainer | runs that found the map | truth L1 A→B (those runs) | truth L1 B→A (those runs) |")
    print("| --- | --- | --- | --- |")
    for name, rs in rows.items():
        s = _summary(rs)
        cells = [f"{s[f'found_mean_{d}']} ± {s[f'found_std_{d}']}" for d in DIRECTIONS]
        print(f"| {name} | {s['found']} of {s['runs']} | {cells[0]} | {cells[1]} |")
        bench_record(f"quality_parity/cpu-{SIZE}-synthetic/{name}", steps=steps, size=SIZE, ngf=NGF,
                     found_l1=FOUND_L1, per_seed=rs, **s)
    for rs in rows.values():
        for r in rs:  # every run trained: far below the identity mapping's L1 (~0.63)
            assert all(r[f"truth_l1_{d}"] < 0.75 * r[f"identity_l1_{d}"] for d in DIRECTIONS), r
