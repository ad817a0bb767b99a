"""--eval-every: FID/KID during training at the right steps, without changing what is trained."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import tiny_train_config

from fastcgan.data import DatasetError, ensure_synthetic_dataset
from fastcgan.metrics import metrics_available
from fastcgan.train import ConfigError, latest_checkpoint, load_checkpoint, train

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not metrics_available(), reason="the metrics extra (FID weights) is not installed"),
]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return ensure_synthetic_dataset(str(tmp_path_factory.mktemp("synth") / "s32"), size=32, n_train=8, n_test=4)


def _run(synth, out, eval_every):
    return train(tiny_train_config(synth, out, max_steps=4, eval_every=eval_every, eval_max_images=4,
                                   synthetic_test=4))  # fmt: skip


def test_eval_every_logs_fid_and_keeps_training_unchanged(tmp_path, synth):
    with_eval = _run(synth, tmp_path / "a", 2)
    without = _run(synth, tmp_path / "b", 0)
    run = tmp_path / "a" / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in lines if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert {"fid_AtoB", "fid_BtoA", "kid_AtoB_mean", "kid_BtoA_mean"} <= set(r["eval"])
        assert all(math.isfinite(v) and v >= -1e-3 for v in r["eval"].values())  # KID may dip below 0
        assert "Inception" in r["eval_network"] or "inception" in r["eval_network"].lower()
    means = {r["step"]: (r["eval"]["fid_AtoB"] + r["eval"]["fid_BtoA"]) / 2 for r in evals}
    assert with_eval["fid"]["step"] == 4
    assert with_eval["best_fid"] == {"step": min(means, key=means.get), "fid": pytest.approx(min(means.values()))}
    assert 0 < with_eval["eval_time_share"] < 1
    assert (run / "generator_AtoB_best.safetensors").is_file() and (run / "generator_BtoA_best.safetensors").is_file()
    # the weights, optimizer moments and RNG streams are those of the run without evaluation
    a = load_checkpoint(latest_checkpoint(str(run)))
    b = load_checkpoint(latest_checkpoint(str(tmp_path / "b" / "run")))
    for key in ("nets", "optimizers", "pools", "rng"):
        _assert_equal(a[key], b[key], key)
    assert without["fid"] is None and without["eval_time_s"] == 0


def _assert_equal(a, b, path):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_explicit_eval_without_a_test_split_is_a_config_error(tmp_path, synth):
    import shutil

    root = tmp_path / "data"
    for sub in ("trainA", "trainB"):
        shutil.copytree(f"{synth}/{sub}", root / sub)
    with pytest.raises(ConfigError, match="--eval-every"):
        train(tiny_train_config(str(root), tmp_path, dataset="folder", max_steps=1, eval_every=1))
    assert not (tmp_path / "run").exists()
    with pytest.raises(DatasetError, match="--dataroot .*missing: no such directory"):  # the first problem first
        train(tiny_train_config(str(tmp_path / "missing"), tmp_path, dataset="folder", max_steps=1, eval_every=1))
    if metrics_available():  # paired data: the error says how to score the run instead
        with pytest.raises(ConfigError, match=r"score the run's test split after training: fastcgan-eval --checkpoint"):
            train(tiny_train_config(None, tmp_path, recipe="pix2pix", preset="pix2pix", netG="resnet_6blocks",
                                    max_steps=1, eval_every=1))
        assert not (tmp_path / "run").exists()
        assert not list(tmp_path.glob("synthetic_*")), "refused before the built-in data was generated"


@pytest.mark.parametrize("recipe", ["cyclegan", "pix2pix", "colorization", "cut"])
def test_the_eval_plan_knows_which_synthetic_data_has_a_test_split(tmp_path, recipe, monkeypatch):
    """``eval_cadence`` decides before the built-in data exists whether it will have testA/ testB/:
    that guess must be what each recipe's generator writes."""
    import fastcgan.metrics
    from fastcgan.recipes import get_recipe
    from fastcgan.train.data import prepare_dataroot, synthetic_root
    from fastcgan.train.loop import eval_cadence

    monkeypatch.setattr(fastcgan.metrics, "metrics_status", lambda: (True, ""))
    preset = {"cyclegan": "cyclegan128", "cut": "cut"}.get(recipe, recipe)
    cfg = tiny_train_config(None, tmp_path, recipe=recipe, preset=preset, synthetic_train=2, synthetic_test=2,
                            eval_every=None, checkpoint_every=7, netG="resnet_6blocks")
    every, _ = eval_cadence(cfg, get_recipe(recipe))
    root = prepare_dataroot(cfg, get_recipe(recipe))
    assert root == synthetic_root(cfg, get_recipe(recipe))  # the folder the run directory is checked against
    assert (every == 7) == all(os.path.isdir(os.path.join(root, f"test{d}")) for d in "AB")


class _ScriptedEvaluator:
    """Stands in for TrainingEvaluator: the mean FID of each evaluation, in order."""

    fids: list[float] = []
    network = "scripted"

    def __init__(self, *a, **k):
        self.setup_seconds = 0.0

    def __call__(self, G_AB, G_BA, should_stop=None):
        f = type(self).fids.pop(0)
        return {"fid_AtoB": f, "fid_BtoA": f, "kid_AtoB_mean": 0.0, "kid_AtoB_std": 0.0, "kid_BtoA_mean": 0.0,
                "kid_BtoA_std": 0.0, "eval_seconds": 0.0}


@pytest.mark.parametrize("fids,best", [([5.0, 3.0, 4.0], 4), ([3.0, 5.0, 4.0], 2)])
def test_the_best_generators_are_the_lowest_fid_ones_across_a_resume(tmp_path, synth, monkeypatch, fids, best):
    """generator_<dir>_best.safetensors are the generators of the lowest mean FID so far, and a
    resumed run still knows that score (a worse one after the resume does not replace them)."""
    import fastcgan.metrics
    from safetensors.torch import load_file

    monkeypatch.setattr(fastcgan.metrics, "TrainingEvaluator", _ScriptedEvaluator)
    _ScriptedEvaluator.fids = list(fids)
    cfg = dict(eval_every=2, eval_max_images=4, synthetic_test=4, checkpoint_every=2)
    train(tiny_train_config(synth, tmp_path, max_steps=4, **cfg))
    run = tmp_path / "run"
    at_best = load_file(run / "generator_AtoB_best.safetensors")
    s = train(tiny_train_config(synth, tmp_path, max_steps=6, resume="auto", **cfg))
    assert _ScriptedEvaluator.fids == [] and s["best_fid"] == {"step": best, "fid": min(fids)}
    assert all(torch.equal(v, load_file(run / "generator_AtoB_best.safetensors")[k]) for k, v in at_best.items())
    final = load_file(run / "generator_AtoB.safetensors")
    assert any(not torch.equal(v, final[k]) for k, v in at_best.items())  # not simply the last generators


class _SignalledEvaluator(_ScriptedEvaluator):
    """A SIGTERM arrives while the first evaluation runs; the evaluator then stops as the real
    one does between chunks."""

    calls = 0

    def __call__(self, G_AB, G_BA, should_stop=None):
        import os
        import signal

        from fastcgan.metrics import EvaluationInterrupted

        type(self).calls += 1
        os.kill(os.getpid(), signal.SIGTERM)
        if should_stop is not None and should_stop():
            raise EvaluationInterrupted("stopped after 0 of 4 AtoB images")
        return super().__call__(G_AB, G_BA)


def test_a_stop_signal_during_an_evaluation_still_checkpoints_that_step(tmp_path, synth, monkeypatch, capsys):
    """SIGTERM while rank 0 evaluates: torchrun kills its workers 30 s after forwarding it, so the
    evaluation is abandoned and the step's checkpoint written at once (it was lost: evaluation
    ran to the end, then the kill came before the save)."""
    import fastcgan.metrics

    monkeypatch.setattr(fastcgan.metrics, "TrainingEvaluator", _SignalledEvaluator)
    _SignalledEvaluator.fids, _SignalledEvaluator.calls = [5.0, 4.0], 0
    s = train(tiny_train_config(synth, tmp_path, max_steps=6, eval_every=2, eval_max_images=4, synthetic_test=4,
                                checkpoint_every=2))
    assert s["interrupted"] == "SIGTERM" and s["exit_code"] == 143 and s["step"] == 2
    assert _SignalledEvaluator.calls == 1 and s["best_fid"] is None and s["fid"] is None
    assert s["checkpoint"].endswith("step_000000002.ckpt") and load_checkpoint(s["checkpoint"])["step"] == 2
    err = capsys.readouterr()
    assert "the evaluation of step 2 is abandoned (stopped after 0 of 4 AtoB images)" in err.out + err.err


class _FailingEvaluator(_ScriptedEvaluator):
    calls = 0

    def __call__(self, G_AB, G_BA, should_stop=None):
        type(self).calls += 1
        raise RuntimeError("CUDA out of memory (scripted)")


def test_a_failing_evaluation_is_reported_and_training_goes_on(tmp_path, synth, monkeypatch, capsys):
    import fastcgan.metrics

    monkeypatch.setattr(fastcgan.metrics, "TrainingEvaluator", _FailingEvaluator)
    _FailingEvaluator.calls = 0
    s = train(tiny_train_config(synth, tmp_path, max_steps=6, eval_every=2, eval_max_images=4, synthetic_test=4,
                                checkpoint_every=2), install_signal_handlers=False)
    assert s["step"] == 6 and s["exit_code"] == 0 and s["checkpoint"].endswith("step_000000006.ckpt")
    assert _FailingEvaluator.calls == 1  # off after the failure
    err = capsys.readouterr()
    assert "evaluation of step 2 failed (RuntimeError: CUDA out of memory (scripted))" in err.out + err.err


def test_the_evaluator_stops_between_chunks(synth):
    """The real evaluator asks should_stop before every chunk and raises EvaluationInterrupted."""
    from fastcgan.metrics import EvaluationInterrupted, TrainingEvaluator
    from fastcgan.models import build_generator

    ev = TrainingEvaluator(synth, "test", "cpu", image_size=32, max_images=4, batch_size=1, kid_subset_size=2)
    g = build_generator("resnet_6blocks", ngf=4).eval()
    whole = ev(g, g)  # 4 images a direction: one chunk
    ev.stop_check_images = 2
    asked = []
    chunked = ev(g, g, should_stop=lambda: asked.append(1) and False)
    assert len(asked) == 4  # two chunks of two images a direction
    assert {k: v for k, v in chunked.items() if k != "eval_seconds"} == {
        k: v for k, v in whole.items() if k != "eval_seconds"}  # the same batches, the same numbers
    with pytest.raises(EvaluationInterrupted, match="after 2 of 4 AtoB"):
        ev(g, g, should_stop=lambda: len(asked) > 4 or asked.append(1))


def test_the_start_says_when_samples_checkpoints_and_scores_come(tmp_path, synth, capsys):
    """A first sample can be many minutes away on a CPU: the start line gives the cadences, and
    why FID/KID is off when it is."""
    import shutil

    train(tiny_train_config(synth, tmp_path, max_steps=1, eval_every=None, checkpoint_every=5, sample_every=3))
    out = capsys.readouterr()
    assert ("a log line every 1 steps, a sample grid (RUN/samples/) every 3, a checkpoint every 5, "
            "FID/KID every 5") in out.out + out.err
    root = tmp_path / "no_test"
    for sub in ("trainA", "trainB"):
        shutil.copytree(f"{synth}/{sub}", root / sub)
    train(tiny_train_config(str(root), tmp_path, dataset="folder", name="r2", max_steps=1, eval_every=None))
    out = capsys.readouterr()
    assert f"(FID/KID off: {root} has no testA/ and testB/)" in out.out + out.err
