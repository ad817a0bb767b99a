"""Training quality under bf16 autocast: does ``--amp`` train as well as fp32?

Bench target (issue): *bf16 training matches fp32 training quality on the synthetic dataset's
ground-truth L1 within a stated tolerance after the same number of steps.*

Two runs in this process on the built-in synthetic set (``--dataset synthetic``, whose test split
has the true translation of every image in ``testA_truth_B/`` and ``testB_truth_A/``), identical
in everything (config, seed, data order, augmentation, initial weights) except ``amp``: fp32 vs
``amp=True`` (bf16 autocast; on a GPU without bf16 it would be fp16, the row says which). Each
records steps, wall seconds, images/s and, from the after-training evaluation (``evaluate_run``)
(the saved generators through the deploy runtime), per
direction the ground-truth L1 (``truth_l1``, mean |.| on [0, 1] intensities), its PSNR, the cycle
L1 and the identity-mapping baseline ``identity_truth_l1`` (the score of not translating at all).
The amp run is also re-evaluated in fp32 (``truth_l1_fp32_eval``) to tell the training from the
inference precision. The bf16 row carries ``delta_truth_l1_*`` = bf16 - fp32 and ``target_met``.

Tolerance: ``TOLERANCE_L1`` = 0.03 absolute on each direction's truth L1 (about 5% of the
identity mapping's ~0.63). Chosen from measurements on CPU with the demo recipe (600 steps, ngf 16,
64x64, seed 2, one thread, torch 2.14.1):

    fp32 (kernels auto)            truth L1 AtoB 0.1580  BtoA 0.1638   (identity 0.635 / 0.631)
    fp32 (kernels torch)           truth L1 AtoB 0.1589  BtoA 0.1677   <- fp32 noise floor: the same
                                   run with another summation order moves by 0.001 / 0.004
    bf16 autocast (kernels auto)   truth L1 AtoB 0.1515  BtoA 0.1699   (fp32 eval of the same
                                   generators: 0.1516 / 0.1699, so inference precision is not it)
    bf16 - fp32                    AtoB -0.0065  BtoA +0.0060

The bf16 run diverges bit-wise from the first step, so its difference to fp32 is training
noise (measured ~0.006, vs 0.001-0.004 between two fp32 runs) plus any real loss. 0.03 is ~5x
the measured difference, i.e. room for the noise at other seeds, sizes and longer runs, yet a
fifth of the gap between a run that found the palette map and one that did not, so a real bf16
quality loss fails it. What it cannot absorb is the bimodality documented in
``tests/test_train_convergence.py``: at this budget a run either finds the palette map (truth L1
~0.10-0.16) or hides the colour in the outlines (~0.29-0.35), and which one can flip with any
numerical perturbation, bf16 included. A miss by ~0.15 with the two runs in different modes
(the printout shows both runs' L1s and cycle L1s) is that, not a bf16 defect; rerun with another
seed before reading it as one.

The target is recorded (``target_met``) and printed, not asserted: the assertions are only that
both runs trained (truth L1 far below the identity mapping's in both directions).

    pytest bench/test_train_quality.py -s       # CPU: 2 x 600 steps; GPU (cuda mark): 256x256
                                                # ResNet-9 ngf 64, 2 x 2000 steps

Run time on CPU: the fp32 run takes ~1.5 min on one thread, but bf16 autocast is ~10x slower on a
CPU without native bf16 (AVX2-only, no AVX512-BF16/AMX: 0.78 vs 7.4 img/s measured here), so the
pair takes ~15 min there; ``FASTCGAN_BENCH_QUALITY_STEPS=N`` shortens both runs (the rows record
the steps run; the tolerance was chosen at 600).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

TOLERANCE_L1 = 0.03  # |truth_l1(bf16) - truth_l1(fp32)| per direction, absolute, [0, 1] intensities
SANITY_VS_IDENTITY = 0.6  # both runs must reach truth L1 < 0.6 x the identity mapping's
DIRECTIONS = ("AtoB", "BtoA")

# The Makefile's demo recipe (a known-good synthetic run): 64x64, ResNet-6, ngf/ndf 16, no identity
# loss (the synthetic translation is a colour permutation, which an identity term works against).
CPU_RECIPE = dict(
    preset="cyclegan128",
    load_size=64,
    crop_size=64,
    ngf=16,
    ndf=16,
    lambda_identity=0.0,
    seed=2,
    max_steps=600,
    kernels="auto",
)
# The real size on a GPU: 256x256, ResNet-9, ngf/ndf 64 (the official architecture), fused kernels.
GPU_RECIPE = dict(
    preset="cyclegan",
    netG="resnet_9blocks",
    load_size=256,
    crop_size=256,
    ngf=64,
    ndf=64,
    lambda_identity=0.0,
    seed=2,
    max_steps=2000,
    kernels="auto",
)


@pytest.fixture
def threads_from_env():
    """Honour OMP_NUM_THREADS for torch's intra-op pool (e.g. 1 on a shared machine); otherwise
    leave torch's default alone."""
    n = torch.get_num_threads()
    want = os.environ.get("OMP_NUM_THREADS")
    if want and want.isdigit() and int(want) >= 1:
        torch.set_num_threads(int(want))
    yield
    torch.set_num_threads(n)


def _train(tmp_path, device: str, recipe: dict, amp: bool) -> dict:
    from fastcgan.evaluate import evaluate
    from fastcgan.train import TrainConfig, train
    from fastcgan.train.cli import evaluate_run

    r = dict(recipe)
    preset = r.pop("preset")
    cfg = TrainConfig.from_preset(
        preset,
        dataset="synthetic",
        output_dir=str(tmp_path),  # both runs share tmp_path/synthetic_<size>, generated once
        name="bf16" if amp else "fp32",
        amp=amp,
        device=device,
        log_every=100,
        sample_every=1_000_000,
        checkpoint_every=1_000_000,
        keep_last=1,
        tensorboard=False,
        progress=False,
        **r,
    )
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    s = train(cfg, install_signal_handlers=False)
    total = time.perf_counter() - t0
    assert s["steps"] == cfg.run.max_steps and s["exit_code"] == 0
    ev = evaluate_run(s)  # the test-set evaluation the CLI runs after training
    out = {
        "steps": s["steps"],
        "wall_s": s["wall_time_s"],
        "wall_s_incl_eval": round(total, 3),
        "images_per_s": s["images_per_s"],
        "eval": ev,
        "final_losses": s["final_losses"],
    }
    if amp:  # the same generators without autocast: training precision vs inference precision
        root = os.path.join(cfg.run.output_dir, f"synthetic_{cfg.data.load_size}")
        out["eval_fp32"] = evaluate(s["run_dir"], root, device=device)
    return out


def _run(record, tmp_path, device: str, recipe: dict, tag: str) -> None:
    from fastcgan.train.state import amp_dtype_for

    amp_dtype = str(amp_dtype_for(torch.device(device), True)).replace("torch.", "")
    runs = {"fp32": _train(tmp_path, device, recipe, amp=False)}
    runs[amp_dtype] = _train(tmp_path, device, recipe, amp=True)
    ref, low = runs["fp32"], runs[amp_dtype]

    deltas = {d: low["eval"][d]["truth_l1"] - ref["eval"][d]["truth_l1"] for d in DIRECTIONS}
    target_met = all(abs(v) <= TOLERANCE_L1 for v in deltas.values())

    for name, r in runs.items():
        ev = r["eval"]
        row = dict(
            device=device,
            precision=name,
            size=recipe["crop_size"],
            netG=recipe.get("netG", "resnet_6blocks"),
            ngf=recipe["ngf"],
            seed=recipe["seed"],
            kernels=recipe["kernels"],
            steps=r["steps"],
            seconds=r["wall_s"],
            seconds_incl_eval=r["wall_s_incl_eval"],
            images_per_s=r["images_per_s"],
            final_losses=r["final_losses"],
        )
        for d in DIRECTIONS:
            row[f"truth_l1_{d}"] = ev[d]["truth_l1"]
            row[f"truth_psnr_{d}"] = ev[d]["truth_psnr"]
            row[f"cycle_l1_{d}"] = ev[d]["cycle_l1"]
            row[f"identity_truth_l1_{d}"] = ev[d].get("identity_truth_l1")
            if "eval_fp32" in r:
                row[f"truth_l1_fp32_eval_{d}"] = r["eval_fp32"][d]["truth_l1"]
        if name != "fp32":
            row.update({f"delta_truth_l1_{d}": deltas[d] for d in DIRECTIONS})
            row.update(tolerance_l1=TOLERANCE_L1, target_met=target_met)
        record(f"train_quality/{tag}/{name}", **row)

    print()
    for name, r in runs.items():
        ev = r["eval"]
        print(
            f"{tag} {name:>8}: {r['steps']} steps in {r['wall_s']:.1f} s ({r['images_per_s']:.2f} img/s)  "
            + "  ".join(
                f"{d} truth L1 {ev[d]['truth_l1']:.4f} "
                f"(identity {ev[d].get('identity_truth_l1', float('nan')):.4f}, "
                f"cycle {ev[d]['cycle_l1']:.4f})"
                for d in DIRECTIONS
            )
            + (
                "  [fp32 eval: "
                + ", ".join(f"{d} {r['eval_fp32'][d]['truth_l1']:.4f}" for d in DIRECTIONS)
                + "]"
                if "eval_fp32" in r
                else ""
            )
        )
    print(
        f"{tag} {amp_dtype} - fp32 truth L1: "
        + ", ".join(f"{d} {deltas[d]:+.4f}" for d in DIRECTIONS)
        + f"  tolerance |d| <= {TOLERANCE_L1}  target_met={target_met}"
    )

    # Sanity only (training happened in both runs); the tolerance is the recorded bench target.
    for name, r in runs.items():
        for d in DIRECTIONS:
            e = r["eval"][d]
            assert e["truth_l1"] < SANITY_VS_IDENTITY * e["identity_truth_l1"], (
                name,
                d,
                e["truth_l1"],
                e["identity_truth_l1"],
            )


@pytest.mark.usefixtures("threads_from_env")
def test_train_quality_cpu(bench_record, tmp_path):
    """CPU, the demo recipe: 64x64, ResNet-6 ngf 16, 600 steps, fp32 vs bf16 autocast
    (``FASTCGAN_BENCH_QUALITY_STEPS=N`` shortens it; the row records the steps run)."""
    steps = int(os.environ.get("FASTCGAN_BENCH_QUALITY_STEPS", CPU_RECIPE["max_steps"]))
    _run(bench_record, tmp_path, "cpu", dict(CPU_RECIPE, max_steps=steps), tag="cpu-64-demo")


@pytest.mark.cuda
def test_train_quality_gpu(bench_record, tmp_path):
    """GPU at the real size: 256x256, ResNet-9 ngf 64, 2000 steps, fp32 vs bf16 autocast."""
    torch.backends.cudnn.benchmark = True
    _run(bench_record, tmp_path, "cuda", GPU_RECIPE, tag="cuda-256-r9")
