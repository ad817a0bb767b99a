"""Does training learn? The synthetic set has ground truth (testA_truth_B/): a small ResNet
generator must bring the test-set L1 to the truth clearly below both the untrained generator's
and the identity mapping's. And a short run on real photos (monet2photo_mini) writes its grids.

Identity loss is off here (``lambda_identity=0``): the synthetic translation is a colour
permutation, which an identity term (``G_AB(b) ~ b``) works against; with it the truth L1 barely
moves in a few hundred steps.

Training is bimodal at this budget (measured, 600 steps, ngf 16, four seeds / thread counts): in
about half the runs the generators find the palette map (truth L1 0.10-0.16); in the others they
hide the colour in the outlines instead (a known CycleGAN failure: cycle L1 is just as low, truth
L1 stays ~0.29-0.35, still far below the identity mapping's 0.63). Which mode a run lands in
changes with the seed and even the thread count, so the assertions hold in both: cycle L1 falls
well below the untrained generators', truth L1 well below the identity mapping's.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from fastcgan.data import ensure_synthetic_dataset
from fastcgan.evaluate import evaluate_generators
from fastcgan.train import TrainConfig, build_state, train
from fastcgan.train.cli import evaluate_run

pytestmark = pytest.mark.usefixtures("one_thread")


def _converge(tmp_path, steps, ngf, n_train):
    root = ensure_synthetic_dataset(str(tmp_path / "s64"), size=64, n_train=n_train, n_test=50)
    cfg = TrainConfig.from_preset(
        "cyclegan128",
        dataset="synthetic",
        dataroot=root,
        load_size=64,
        crop_size=64,
        ngf=ngf,
        ndf=ngf,
        lambda_identity=0.0,
        max_steps=steps,
        output_dir=str(tmp_path),
        name="run",
        log_every=50,
        sample_every=10_000,
        checkpoint_every=10_000,
        tensorboard=False,
        progress=False,
        device="cpu",
        synthetic_train=n_train,
        synthetic_test=50,
        eval_every=0,
    )
    torch.manual_seed(cfg.run.seed)  # train() seeds the same way: this is its initial state
    st = build_state(cfg)
    before = evaluate_generators(st.nets["G_AB"], st.nets["G_BA"], root)
    after = evaluate_run(train(cfg))
    return before, after


def _check(before, after, cycle_vs_untrained, truth_vs_identity):
    for d in ("AtoB", "BtoA"):
        b, a = before[d], after[d]
        assert a["cycle_l1"] < cycle_vs_untrained * b["cycle_l1"], (d, b["cycle_l1"], a["cycle_l1"])
        assert a["truth_l1"] < truth_vs_identity * a["identity_truth_l1"], (
            d,
            a["truth_l1"],
            a["identity_truth_l1"],
        )
        # the identity baseline is the untranslated input: its L1 must be the same before and after
        assert a["identity_truth_l1"] == b["identity_truth_l1"]


def test_synthetic_converges_trimmed(tmp_path):
    """150 steps, ngf 8 (~10 s on one core): cycle L1 0.33 -> ~0.12; truth L1 0.36 -> ~0.14 here
    (identity mapping: 0.63)."""
    before, after = _converge(tmp_path, steps=150, ngf=8, n_train=100)
    _check(before, after, cycle_vs_untrained=0.6, truth_vs_identity=0.65)


@pytest.mark.long
def test_synthetic_converges(tmp_path):
    """600 steps, ngf 16 (~1-2 min on one core): cycle L1 ~0.33 -> ~0.09; truth L1 ~0.36 ->
    0.12-0.16 (or ~0.3 in the outline-hiding mode)."""
    before, after = _converge(tmp_path, steps=600, ngf=16, n_train=200)
    _check(before, after, cycle_vs_untrained=0.45, truth_vs_identity=0.6)


def _monet(tmp_path, root, steps, size, ngf):
    cfg = TrainConfig.from_preset(
        "cyclegan128",
        dataroot=root,
        load_size=size + size // 8,
        crop_size=size,
        ngf=ngf,
        ndf=ngf,
        max_steps=steps,
        output_dir=str(tmp_path),
        name="monet",
        log_every=10,
        sample_every=steps // 2,
        checkpoint_every=steps,
        tensorboard=False,
        progress=False,
        device="cpu",
        num_workers=0,
        n_samples=2,
        eval_every=0,
    )
    s = train(cfg)
    run = tmp_path / "monet"
    samples = sorted(os.listdir(run / "samples"))
    assert samples == [f"step_{steps // 2:09d}.png", f"step_{steps:09d}.png"]
    assert s["step"] == steps and s["skipped_images"] == 0
    assert all(math.isfinite(v) for v in s["final_losses"].values())
    assert (run / "generator_AtoB.safetensors").is_file()
    return s


def test_monet2photo_mini_trimmed(tmp_path, monet2photo_mini):
    _monet(tmp_path, monet2photo_mini, steps=20, size=64, ngf=8)


@pytest.mark.long
def test_monet2photo_mini(tmp_path, monet2photo_mini):
    """300 steps at 128x128, ngf 16 (~2 min on one core): the cycle losses fall (~4.2/4.9 over
    the first 10 steps -> ~2.5/3.0 around step 300)."""
    import json

    _monet(tmp_path, monet2photo_mini, steps=300, size=128, ngf=16)
    lines = [json.loads(x) for x in (tmp_path / "monet" / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0], lines[-1]
    for k in ("cycle_A", "cycle_B"):
        assert last[k] < 0.8 * first[k], (k, first[k], last[k])
