"""The trainer on CPU: presets, the step's numerics and host syncs, compile, the CLI's errors,
data problems, and what a run leaves behind."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import traceback

import pytest
import torch
from conftest import assert_grads_close, default_dtype, tiny_train_config, two_steps_in_lockstep

from fastcgan.data import ensure_synthetic_dataset
from fastcgan.recipes import get_recipe
from fastcgan.train import TrainConfig, build_state, build_step, resolve_fast_path, train
from fastcgan.train.cli import evaluate_run, parse_config
from fastcgan.train.config import ConfigError
from fastcgan.train.cli import main as cli_main
from fastcgan.train.config import MAX_POOL_SIZE

loss_names = get_recipe("cyclegan").loss_names

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth64(tmp_path_factory):
    return ensure_synthetic_dataset(
        str(tmp_path_factory.mktemp("synth") / "s64"), size=64, n_train=8, n_test=4
    )


def tiny(root, out, **kw):
    return tiny_train_config(root, out, **{"load_size": 64, "crop_size": 64, "max_steps": 2, **kw})


def _batch(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    b, s = cfg.data.batch_size, cfg.data.crop_size
    return {d: torch.rand(b, cfg.model.input_nc, s, s, generator=g) * 2 - 1 for d in "AB"}


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------
def test_config_roundtrip_and_presets():
    for name in ("cyclegan", "cyclegan128", "discogan", "udacity"):
        cfg = TrainConfig.from_preset(name, dataset="synthetic")
        assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    c = TrainConfig.from_preset("cyclegan", dataset="synthetic")
    assert (c.model.netG, c.model.netD, c.data.load_size, c.data.crop_size) == (
        "resnet_9blocks",
        "basic",
        286,
        256,
    )
    assert (c.loss.gan_mode, c.loss.lambda_cycle, c.loss.lambda_identity, c.loss.pool_size) == (
        "lsgan",
        10,
        0.5,
        50,
    )
    assert (c.optim.lr, c.optim.beta1, c.optim.beta2, c.optim.epochs, c.optim.epochs_decay) == (
        2e-4,
        0.5,
        0.999,
        100,
        100,
    )
    d = TrainConfig.from_preset("discogan", dataset="synthetic")
    assert (d.model.netG, d.loss.gan_mode, d.loss.cycle_kind, d.loss.lambda_identity) == (
        "unet_128",
        "vanilla",
        "l2",
        0,
    )
    assert TrainConfig.from_preset("cyclegan", name="x", dataset="synthetic").run.name == "x"
    with pytest.raises(ValueError, match="--batch-size"):
        TrainConfig.from_preset("cyclegan", dataset="synthetic", batch_size=0)
    with pytest.raises(ValueError, match="--dataroot"):
        TrainConfig.from_preset("cyclegan")
    with pytest.raises(ValueError, match="unknown config field"):
        TrainConfig.from_preset("cyclegan", dataset="synthetic", nfg=3)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_linear_schedule_matches_official():
    from fastcgan.train.state import LinearDecay

    f = LinearDecay(100, 100)
    assert f(0) == f(99) == 1.0 and f(100) == pytest.approx(1 - 1 / 101) and f(199) == pytest.approx(1 / 101)
    cfg = tiny("x", "y", epochs=2, epochs_decay=3)
    st = build_state(cfg)
    lrs = []
    for _ in range(5):
        lrs.append(st.lr())
        st.end_epoch()
    # As the official train.py: its first update comes before epoch 1, so the decay starts in the
    # last of --epochs and the last epoch runs at 0.
    assert lrs == pytest.approx([2e-4, 2e-4 * 3 / 4, 2e-4 * 2 / 4, 2e-4 * 1 / 4, 0.0])


# --------------------------------------------------------------------------------------------
# every preset trains
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
@pytest.mark.parametrize("preset", ["cyclegan", "cyclegan128", "discogan", "udacity"])
def test_preset_trains_two_steps(preset, amp, synth64, tmp_path):
    kw = {}
    root = synth64
    if preset == "discogan":  # unet_128 needs 128x128 inputs
        root = ensure_synthetic_dataset(str(tmp_path / "s128"), size=128, n_train=4, n_test=2)
        kw = dict(load_size=128, crop_size=128, synthetic_train=4, synthetic_test=2)
    if preset == "udacity":
        kw = dict(batch_size=2)
    cfg = tiny(root, tmp_path, preset=preset, amp=amp, **kw)
    s = train(cfg)
    assert s["step"] == 2 and s["exit_code"] == 0
    assert set(s["final_losses"]) == set(loss_names(cfg))
    assert all(math.isfinite(v) for v in s["final_losses"].values()), s["final_losses"]
    run = tmp_path / "run"
    for f in (
        "config.json",
        "generator_AtoB.safetensors",
        "generator_BtoA.safetensors",
        "metrics.jsonl",
        "summary.json",
    ):
        assert (run / f).is_file(), f
    resolved = resolve_fast_path(cfg, torch.device("cpu"))[0]  # "auto" flags as the run resolved them
    assert TrainConfig.from_dict(json.loads((run / "config.json").read_text())) == resolved


def test_wgangp_and_hinge_step(synth64):
    outs = {}
    for mode in ("wgangp", "hinge"):
        cfg = tiny(synth64, "unused", gan_mode=mode)
        torch.manual_seed(0)
        st = build_state(cfg)
        out = build_step(st, cfg)(_batch(cfg))
        assert set(out) == set(loss_names(cfg))
        assert all(torch.isfinite(v) for v in out.values())
        outs[mode] = out
    assert "gp_A" in outs["wgangp"] and "gp_A" not in outs["hinge"]


# --------------------------------------------------------------------------------------------
# the step itself
# --------------------------------------------------------------------------------------------
def _official_losses(st, batch, cfg):
    """The official forward/loss arithmetic, separate calls, on a copy of the state's networks."""
    import copy

    from fastcgan.losses import cycle_loss, discriminator_loss, generator_gan_loss, identity_loss

    G_AB, G_BA, D_A, D_B = (copy.deepcopy(st.nets[n]) for n in ("G_AB", "G_BA", "D_A", "D_B"))
    a, b = batch["A"], batch["B"]
    fake_B, fake_A = G_AB(a), G_BA(b)
    rec_A, rec_B = G_BA(fake_B), G_AB(fake_A)
    lc = cfg.loss
    lambda_A = lc.lambda_cycle if lc.lambda_A is None else lc.lambda_A  # official --lambda_A / --lambda_B
    lambda_B = lc.lambda_cycle if lc.lambda_B is None else lc.lambda_B
    G = (
        generator_gan_loss(D_B(fake_B))
        + generator_gan_loss(D_A(fake_A))
        + cycle_loss(rec_A, a) * lambda_A
        + cycle_loss(rec_B, b) * lambda_B
        + identity_loss(G_BA(a), a) * lambda_A * lc.lambda_identity
        + identity_loss(G_AB(b), b) * lambda_B * lc.lambda_identity
    )
    # With an empty pool the first query returns the fakes themselves.
    D = discriminator_loss(D_A(a), D_A(fake_A.detach())) + discriminator_loss(D_B(b), D_B(fake_B.detach()))
    return G, D


@pytest.mark.parametrize("lambdas", [{}, {"lambda_A": 3.0, "lambda_B": 17.0}], ids=["default", "lambda_A!=B"])
def test_step_matches_official_arithmetic(synth64, lambdas):
    """Batched G/D calls (cat of independent inputs) give the official separate-call losses, with
    the official --lambda_A / --lambda_B weighing each cycle and the identity loss of its domain."""
    cfg = tiny(synth64, "unused", kernels="torch", **lambdas)
    torch.manual_seed(0)
    st = build_state(cfg)
    batch = _batch(cfg)
    G, D = _official_losses(st, batch, cfg)
    out = build_step(st, cfg)(batch)
    torch.testing.assert_close(out["G"], G.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["D_A"] + out["D_B"], D.detach(), rtol=1e-5, atol=1e-5)


class _HostSync(RuntimeError):
    pass


def _forbid_host_reads(monkeypatch):
    """Make every tensor->host read raise, except inside torch.optim: the non-fused Adam keeps
    its step counters as CPU scalars and reads them (no device sync; fused Adam on CUDA does not)."""

    def guard(name, orig):
        def f(self, *a, **k):
            if not any(
                "torch/optim/" in fr.filename.replace(os.sep, "/") for fr in traceback.extract_stack()
            ):
                raise _HostSync(f"Tensor.{name} called in the train step")
            return orig(self, *a, **k)

        return f

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_step_has_no_host_sync(synth64, monkeypatch, amp):
    cfg = tiny(synth64, "unused", amp=amp, pool_size=3)
    torch.manual_seed(0)
    st = build_state(cfg)
    step = build_step(st, cfg)
    batch = _batch(cfg)
    step(batch)  # first step allocates the pools
    with monkeypatch.context() as m:
        _forbid_host_reads(m)
        for _ in range(3):  # past the pool's fill: the swap branch runs too
            out = step(batch)
    assert all(torch.isfinite(v) for v in out.values())
    # the guard is live: a read in the step would have raised
    with monkeypatch.context() as m:
        _forbid_host_reads(m)
        with pytest.raises(_HostSync):
            out["G"].item()


@pytest.mark.cuda
def test_step_has_no_host_sync_cuda():
    cfg = TrainConfig.from_preset(
        "cyclegan", dataset="synthetic", device="cuda", amp=True, ngf=16, ndf=16, load_size=64, crop_size=64
    )
    torch.manual_seed(0)
    st = build_state(cfg)
    step = build_step(st, cfg)
    batch = {k: v.cuda() for k, v in _batch(cfg).items()}
    step(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            out = step(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(v).item() for v in out.values())


def _compiled_vs_eager(synth64, backend, dtype=torch.float32, **kw):
    """:func:`two_steps_in_lockstep` of an eager and a compiled step built alike, in ``dtype``."""
    with default_dtype(dtype):
        states, steps = {}, {}
        for comp in (False, True):
            cfg = tiny(
                synth64,
                "unused",
                load_size=32,
                crop_size=32,
                netD="n_layers",
                n_layers_D=2,
                compile=comp,
                compile_backend=backend,
                **kw,
            )
            torch.manual_seed(0)
            states[comp] = build_state(cfg)
            steps[comp] = build_step(states[comp], cfg)
            # build_step compiled both forward phases with fullgraph=True: a graph break raises.
            assert set(steps[comp].exe.compiled) == ({"generator", "discriminator"} if comp else set())
        return two_steps_in_lockstep(states, steps, lambda seed: _batch(cfg, seed=seed))


def test_compiled_step_matches_eager(synth64):
    """fullgraph torch.compile of the step's two phases -- networks, fused-norm custom ops, losses,
    image pool -- (aot_eager: Dynamo + AOT autograd, without Inductor's C++ build) gives the eager
    numbers. In fp64: in fp32 torch 2.14 happens to match bit for bit, while torch 2.11's AOT
    autograd rounds differently (gradients ~5e-6 of their scale apart, conv-bias noise 1.4e-6)."""
    res = _compiled_vs_eager(synth64, "aot_eager", dtype=torch.float64)
    for k in res[False][0]:
        torch.testing.assert_close(res[True][0][k], res[False][0][k], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(res[True][2][k], res[False][2][k], rtol=1e-10, atol=1e-10)
    assert_grads_close(res[True][1], res[False][1], rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_compiled_step_matches_eager_inductor(synth64):
    """The same with Inductor (C++ codegen on CPU; ~1-2 minutes of compilation). init_gain 0.2:
    at the official 0.02 these 4-channel test networks are so ill-conditioned that Inductor's
    fp32 reduction order alone moves some gradients by ~6 % (in fp64 Inductor matches eager
    exactly, checked by hand), which would hide a real bug behind a loose tolerance."""
    res = _compiled_vs_eager(synth64, "inductor", init_gain=0.2)
    for k in res[False][0]:
        torch.testing.assert_close(res[True][0][k], res[False][0][k], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(res[True][2][k], res[False][2][k], rtol=1e-3, atol=1e-3)
    assert_grads_close(res[True][1], res[False][1], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("preprocess", ["none", "scale_width"])
def test_compiled_run_trains_at_the_images_own_size(synth64, tmp_path, preprocess):
    """--preprocess none / scale_width train at the images' size (64² here), not --crop-size (32):
    the compiled step's image pools were allocated at crop_size² before the first batch, and the
    first pool query failed (ImagePool: images of shape (3, 64, 64) do not match the pool's
    (3, 32, 32)) -- on a GPU, where --compile is the default, every such run."""
    cfg = tiny(synth64, str(tmp_path), preprocess=preprocess, load_size=64, crop_size=32, pool_size=3,
               compile=True, compile_backend="aot_eager")
    s = train(cfg)
    assert s["step"] == 2
    from fastcgan.train.checkpoint import load_checkpoint

    pools = {name: tuple(p["images"].shape) for name, p in load_checkpoint(s["checkpoint"])["pools"].items()}
    assert pools == {"pool_A": (3, 3, 64, 64), "pool_B": (3, 3, 64, 64)}, pools


def test_channels_last_step_matches(synth64):
    outs = []
    for cl in (False, True):
        cfg = tiny(synth64, "unused", channels_last=cl)
        torch.manual_seed(0)
        st = build_state(cfg)
        torch.manual_seed(3)
        outs.append(build_step(st, cfg)(_batch(cfg)))
    for k in outs[0]:
        torch.testing.assert_close(outs[1][k], outs[0][k], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# the CLI and bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--kernels", "fast"], "--kernels"),
        (["--gan-mode", "wgan"], "--gan-mode"),
        (["--lr", "-1"], "--lr"),
        (["--crop-size", "300", "--load-size", "286"], "--crop-size"),
        (["--max-dataset-size", "0"], "--max-dataset-size"),
        (["--max-dataset-size", "1e9"], "--max-dataset-size"),
        ([], "--dataroot"),
    ],
)
def test_cli_bad_flags(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_unavailable_kernels_fail_before_training(tmp_path, synth64, capsys):
    from fastcgan.ops import available_backends

    if available_backends()["cuda"].available:
        pytest.skip("the cuda backend is available here")
    assert (
        cli_main(
            [
                "--dataset",
                "synthetic",
                "--dataroot",
                synth64,
                "--kernels",
                "cuda",
                "--device",
                "cpu",
                "--output-dir",
                str(tmp_path),
                "--name",
                "k",
            ]
        )
        == 2
    )
    assert "--kernels" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


def test_cli_parses_into_config():
    cfg, req = parse_config(
        [
            "--dataset",
            "synthetic",
            "--preset",
            "cyclegan128",
            "--ngf",
            "16",
            "--amp",
            "--kernels",
            "torch",
            "--max-steps",
            "5",
            "--no-flip",
            "--netD",
            "pixel",
        ]
    )
    assert (cfg.model.ngf, cfg.run.amp, cfg.run.kernels, cfg.run.max_steps, cfg.data.flip) == (
        16,
        True,
        "torch",
        5,
        False,
    )
    assert cfg.model.netG == "resnet_6blocks" and cfg.model.netD == "pixel"
    assert req == {
        "dataset": "synthetic",
        "ngf": 16,
        "amp": True,
        "kernels": "torch",
        "max_steps": 5,
        "flip": False,
        "netD": "pixel",
        "preset": "cyclegan128",  # explicit: a resume refuses another than its checkpoint's
    }


def test_max_dataset_size_trains_on_the_first_images(tmp_path, synth64):
    """--max-dataset-size N (the official --max_dataset_size): the first N images of each domain
    by sorted path make the training set -- an epoch is N batch-1 steps -- and the test split
    keeps every image; in a config it must be an int >= 1."""
    from fastcgan.train.data import build_dataset

    cfg, _ = parse_config(["--dataroot", synth64, "--max-dataset-size", "3"])
    assert cfg.data.max_dataset_size == 3
    cfg = tiny(synth64, tmp_path, dataset="folder", max_dataset_size=3, max_steps=4, serial_batches=True)
    ds = build_dataset(cfg, synth64, "train")
    assert [os.path.basename(p) for p in ds.A_paths] == sorted(os.listdir(os.path.join(synth64, "trainA")))[:3]
    assert (ds.A_size, ds.B_size) == (3, 3)
    assert build_dataset(cfg, synth64, "test").A_size == 4
    assert train(cfg)["epoch"] == 1  # 4 steps over 3 images (all 8: still epoch 0)
    for bad in (0, -2, 2.5, "3"):
        with pytest.raises(ConfigError, match="max_dataset_size"):
            tiny(synth64, tmp_path, max_dataset_size=bad)


def test_bad_dataroot_fails_before_training(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "trainA").mkdir(parents=True)
    shutil.copy(
        os.path.join(ensure_synthetic_dataset(str(tmp_path / "s"), 64, 2, 1), "trainA", "a_00000.png"),
        root / "trainA",
    )
    out = tmp_path / "runs"
    args = [
        "--dataroot",
        str(root),
        "--output-dir",
        str(out),
        "--name",
        "r",
        "--num-workers",
        "0",
        "--no-progress",
    ]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "trainB" in err and "does not exist" in err
    assert not (out / "r").exists()  # nothing trained, nothing written
    (root / "trainB").mkdir()
    (root / "trainB" / "notes.txt").write_text("no images here")
    assert cli_main(args) == 2
    assert "contains no image files" in capsys.readouterr().err
    assert cli_main(["--dataroot", str(tmp_path / "nope"), "--output-dir", str(out)]) == 2
    assert "nope" in capsys.readouterr().err


def test_bad_images_skipped_and_counted(tmp_path, synth64, capsys):
    root = tmp_path / "data"
    for sub in ("trainA", "trainB"):
        shutil.copytree(os.path.join(synth64, sub), root / sub)
    (root / "trainA" / "a_00003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cfg = tiny(str(root), tmp_path, dataset="folder", max_steps=8, serial_batches=True, log_every=2)
    s = train(cfg)
    assert s["skipped_images"] == 1 and s["skipped"][0].endswith("a_00003.png")
    assert "skipped 1 image(s) (unreadable or too small)" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_images"] == 1


def test_run_outputs_samples_metrics_tensorboard(tmp_path, synth64):
    from PIL import Image

    cfg = tiny(synth64, tmp_path, max_steps=4, log_every=2, sample_every=2, tensorboard=True)
    s = train(cfg)
    run = tmp_path / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    assert {"lr", "images_per_s", "G", "D_A", "cycle_A", "data_wait_frac"} <= set(lines[0])
    assert all(0.0 <= r["data_wait_frac"] <= 1.0 for r in lines)
    samples = sorted(os.listdir(run / "samples"))
    assert samples == ["step_000000002.png", "step_000000004.png"]
    w, h = Image.open(run / "samples" / samples[-1]).size
    # 3 columns (real | fake | rec) and 2 rows per domain (n_samples=2) of 64px images + 2px padding
    assert (w, h) == (3 * 66 + 2, 4 * 66 + 2)
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run / "tb"))
    assert s["images_per_s"] > 0 and s["wall_time_s"] > 0
    # the synthetic run is evaluated on its test set (as the CLI does after training)
    ev = evaluate_run(s)
    assert ev["AtoB"]["n"] == 4 and "truth_l1" in ev["AtoB"]


def test_refuses_to_overwrite_a_run(tmp_path, synth64):
    from fastcgan.train import CheckpointError

    train(tiny(synth64, tmp_path, max_steps=1))
    with pytest.raises(CheckpointError, match="--resume"):
        train(tiny(synth64, tmp_path, max_steps=2))


def test_python_m_entry_point(tmp_path, synth64):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastcgan.train",
            "--dataset",
            "synthetic",
            "--dataroot",
            synth64,
            "--preset",
            "cyclegan128",
            "--load-size",
            "64",
            "--crop-size",
            "64",
            "--ngf",
            "4",
            "--ndf",
            "4",
            "--max-steps",
            "1",
            "--output-dir",
            str(tmp_path),
            "--name",
            "cli",
            "--num-workers",
            "0",
            "--no-progress",
            "--no-tensorboard",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["step"] == 1
    assert (tmp_path / "cli" / "generator_AtoB.safetensors").is_file()


def test_run_outline_names_networks_data_and_length():
    """The start line: the official networks' sizes (ResNet-9 11,378,179 and the 70x70 PatchGAN
    2,764,737 parameters, as the official prints them), the data and the schedule."""
    from types import SimpleNamespace

    from fastcgan.models import build_discriminator, build_generator
    from fastcgan.train import TrainConfig
    from fastcgan.train.loop import run_outline

    cfg = TrainConfig.from_preset("cyclegan", dataset="synthetic")
    nets = {"G_AB": build_generator("resnet_9blocks"), "D_A": build_discriminator("basic")}
    ds = SimpleNamespace(A_size=1067, B_size=1334)
    line = run_outline(cfg, nets, ds, 1334, 200 * 1334)
    assert line == ("fastcgan: cyclegan: G_AB 11.378 M, D_A 2.765 M parameters; 1,067 A + 1,334 B training images, "
                    "1,334 steps an epoch (batch 1) x 200 epochs")
    assert run_outline(cfg, nets, ds, 1334, 50).endswith("x 200 epochs, stopping at step 50 (--max-steps)")
    # --epochs-decay 0: the official rule's last epoch is at LR 0 (CycleGAN's start-of-epoch update): said.
    flat = cfg.replace(epochs=3, epochs_decay=0)
    assert run_outline(flat, nets, ds, 10, 30).endswith("runs the last epoch at learning rate 0 (--epochs-decay 0): "
                                                        "its weights do not change")
    assert "learning rate 0" not in run_outline(flat, nets, ds, 10, 20)  # stops before it
    assert "learning rate 0" not in run_outline(flat.replace(preset="cut", recipe="cut"), nets, ds, 10, 30)


def test_a_diverged_run_stops_with_the_step_and_the_loss(tmp_path, synth64, monkeypatch):
    """A loss that turns NaN stops training at the next log or checkpoint step with TrainingError
    naming the step and the loss (exit 1 from the CLI): it neither trains on nor saves the NaN
    weights as a checkpoint a resume would take."""
    from fastcgan.recipes import cyclegan
    from fastcgan.train import TrainingError, latest_checkpoint

    real = cyclegan.cycle_loss
    nan_from = {"step": 3, "calls": 0}

    def cycle_loss(*a, **k):  # two calls a step (cycle_A, cycle_B): NaN from step 3 on
        nan_from["calls"] += 1
        return real(*a, **k) * (float("nan") if nan_from["calls"] > 2 * (nan_from["step"] - 1) else 1.0)

    monkeypatch.setattr(cyclegan, "cycle_loss", cycle_loss)
    with pytest.raises(TrainingError, match=r"non-finite at step 3: .*cycle_A"):
        train(tiny(synth64, tmp_path, max_steps=8, log_every=4, checkpoint_every=3))
    assert latest_checkpoint(str(tmp_path / "run")) is None  # step 3's NaN weights were not saved


def test_optimizers_take_the_configured_betas_and_lr():
    """--beta1 / --beta2 / --lr reach every Adam (the official --beta1 0.5 default aside)."""
    cfg = tiny_train_config(beta1=0.9, beta2=0.95, lr=3e-4)
    st = build_state(cfg)
    for name, opt in st.optimizers.items():
        g = opt.param_groups[0]
        assert (g["betas"], g["lr"]) == ((0.9, 0.95), pytest.approx(3e-4)), name


def test_loss_accumulator_reads_the_mean_since_the_last_read():
    from fastcgan.train.logging import LossAccumulator

    acc = LossAccumulator(("G", "D"))
    assert acc.read() == {}
    for g, d in ((2.0, 1.0), (4.0, 3.0)):
        acc.add({"G": torch.tensor(g), "D": torch.tensor(d), "other": torch.tensor(9.0)})
    assert acc.read() == {"G": 3.0, "D": 2.0}
    acc.add({"G": torch.tensor(10.0), "D": torch.tensor(0.0)})
    assert acc.read() == {"G": 10.0, "D": 0.0}  # reset by the read


def test_generating_the_synthetic_data_is_said_once(tmp_path, capsys):
    """The built-in data was generated without a word (a pause, then files in an unexpected
    folder); a later run that reuses it says nothing."""
    root = tmp_path / "synthetic_32"
    train(tiny_train_config(root, tmp_path, name="a", max_steps=1), install_signal_handlers=False)
    assert f"generated the built-in synthetic data into {root}" in capsys.readouterr().err
    train(tiny_train_config(root, tmp_path, name="b", max_steps=1), install_signal_handlers=False)
    assert "generated the built-in" not in capsys.readouterr().err


def _cfg(**kw):
    return TrainConfig.from_preset("cyclegan128", dataset="synthetic", **kw)


@pytest.mark.parametrize("field, value, said", [
    ("beta1", 1.0, "beta1 (--beta1): must be in [0, 1)"),            # Adam divides by 1 - beta1**t
    ("beta2", 1.0, "beta2 (--beta2): must be in [0, 1)"),
    ("pool_size", MAX_POOL_SIZE + 1, "pool_size (--pool-size)"),
    ("batch_size", True, "batch_size (--batch-size): must be int"),  # a bool is not an int
    ("ngf", True, "ngf (--ngf): must be int"),
    ("lambda_cycle", float("inf"), "lambda_cycle (--lambda-cycle): must be a finite number"),
    ("lambda_identity", float("inf"), "lambda_identity (--lambda-identity): must be a finite number"),
    ("keep_last", 0, "keep_last (--keep-last): must be an int >= 1"),  # [:-0] would keep every checkpoint
    ("n_samples", 65, "n_samples (--n-samples): must be at most 64"),  # decoded and run at every sample step
    ("init_gain", 0.0, "init_gain (--init-gain): must be in (0,"),    # every weight would start at 0
    ("lr", 0.0, "lr (--lr): must be in (0,"),                        # a run that learns nothing
    ("beta1", -0.5, "beta1 (--beta1): must be in [0, 1)"),
    ("pool_size", -1, "pool_size (--pool-size): must be an int in [0,"),
    ("seed", -1, "seed (--seed): must be in [0, 2**32)"),              # numpy's seeds are unsigned 32-bit
    ("seed", 2**32, "seed (--seed): must be in [0, 2**32)"),
    ("max_image_pixels", -1, "max_image_pixels (--max-image-pixels)"),
    ("num_workers", -1, "num_workers (--num-workers): must be an int in [0,"),
    # Bytes that are not UTF-8 (kept as lone surrogates): the run trained, then could not be read
    # back (safetensors takes UTF-8 paths only) -- a traceback at the end of the run.
    ("name", "a\udcffb", "name (--name): must be valid UTF-8 text"),
    ("output_dir", "runs/\udcff", "output_dir (--output-dir): must be valid UTF-8 text"),
])
def test_config_bounds(field, value, said):
    with pytest.raises(ConfigError, match=re.escape(said)):
        _cfg(**{field: value})


def test_schedules_without_epochs_are_refused():
    with pytest.raises(ConfigError, match="epochs \\+ epochs_decay must be >= 1"):
        _cfg(epochs=0, epochs_decay=0)
    with pytest.raises(ConfigError, match="must be >= 1 with lr_policy cosine"):  # T_max 0: a division by 0
        _cfg(lr_policy="cosine", epochs=0, epochs_decay=5)


def test_config_bounds_accept_their_limits():
    assert _cfg(pool_size=MAX_POOL_SIZE).loss.pool_size == MAX_POOL_SIZE
    assert _cfg(pool_size=0).loss.pool_size == 0
    assert _cfg(beta1=0.0).optim.beta1 == 0.0
    assert _cfg(keep_last=1).run.keep_last == 1
    assert _cfg(n_samples=64).run.n_samples == 64
    assert _cfg(seed=0).run.seed == 0 and _cfg(seed=2**32 - 1).run.seed == 2**32 - 1
    assert _cfg(num_workers=0).data.num_workers == 0 and _cfg(max_image_pixels=0).data.max_image_pixels == 0


def test_step_schedule_needs_a_decay_interval():
    """--lr-policy step multiplies the LR by 0.1 every --lr-decay-iters epochs: 0 would divide by 0."""
    with pytest.raises(ConfigError, match=re.escape("lr_decay_iters (--lr-decay-iters)")):
        _cfg(lr_policy="step", lr_decay_iters=0)
    assert _cfg(lr_policy="step", lr_decay_iters=1).optim.lr_decay_iters == 1


def test_crop_must_give_the_basic_patchgan_one_score():
    """The 70x70 PatchGAN (3 stride-2 + 2 stride-1 4x4 convs) needs 24 px: 16 leaves no score."""
    with pytest.raises(ConfigError, match=r"netD basic needs images of at least 24²"):
        _cfg(load_size=16, crop_size=16, netG="resnet_6blocks")
    assert _cfg(load_size=24, crop_size=24).data.crop_size == 24


def test_config_from_dict_refuses_unknown_sections():
    d = _cfg().to_dict()
    d["extras"] = {"ngf": 8}
    with pytest.raises(ConfigError, match=r"unknown sections \['extras'\]"):
        TrainConfig.from_dict(d)
