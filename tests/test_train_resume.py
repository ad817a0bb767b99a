"""Runs that never lose work: exact resume, SIGTERM/SIGINT mid-training, bad checkpoints.

(Checkpoint-file mechanics -- atomic writes, SIGKILL during a write -- are in test_checkpoint.py.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_train_config

from fastcgan.data import ensure_synthetic_dataset
from fastcgan.train import latest_checkpoint, load_checkpoint, train
from fastcgan.train.cli import main as cli_main
from fastcgan.train import TrainConfig
from fastcgan.train.checkpoint import config_for_resume, training_field_conflicts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return ensure_synthetic_dataset(
        str(tmp_path_factory.mktemp("synth") / "s32"), size=32, n_train=8, n_test=2
    )


def cfg_for(root, out, name, **kw):
    base = dict(
        name=name,
        crop_size=28,
        log_every=2,
        n_samples=1,
        synthetic_test=2,
        pool_size=3,
        use_dropout=True,
        netD="n_layers",
        n_layers_D=2,
        epochs=1,
        epochs_decay=2,
    )
    return tiny_train_config(root, out, **{**base, **kw})


def _final(run_dir):
    return load_checkpoint(latest_checkpoint(str(run_dir)))


def _assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs (max {(a.double() - b.double()).abs().max().item():.3g})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.parametrize("data_on_gpu", [False, True], ids=["loader", "device-bank"])
def test_resume_is_exact(tmp_path, synth, data_on_gpu):
    """2N steps straight == N steps, resume, N steps: every weight, optimizer moment, pool image,
    LR and RNG state bitwise equal (N crosses an epoch boundary: 8 images, N = 5)."""
    n = 5
    straight = train(cfg_for(synth, tmp_path, "straight", max_steps=2 * n, data_on_gpu=data_on_gpu))
    first = train(cfg_for(synth, tmp_path, "split", max_steps=n, data_on_gpu=data_on_gpu))
    assert first["step"] == n
    second = train(cfg_for(synth, tmp_path, "split", max_steps=2 * n, data_on_gpu=data_on_gpu, resume="auto"))
    assert (straight["step"], second["start_step"], second["step"]) == (2 * n, n, 2 * n)
    a, b = _final(tmp_path / "straight"), _final(tmp_path / "split")
    for key in ("nets", "optimizers", "schedulers", "pools", "step", "epoch", "batch_in_epoch", "rng"):
        _assert_same(a[key], b[key], key)
    assert a["epoch"] == 1  # the boundary was crossed and the schedule stepped
    assert straight["final_losses"] == second["final_losses"]


@pytest.mark.parametrize("first, then", [(True, None), (True, False), (False, True)],
                         ids=["bank-then-auto", "bank-then-loader", "loader-then-bank"])
def test_resume_may_change_the_data_path(tmp_path, synth, capsys, first, then):
    """A --data-on-gpu run (the default on a GPU) resumed where the data path comes out otherwise
    (on a CPU, a smaller GPU, or --no-data-on-gpu because the set no longer fits) was refused
    ('data-path generators differ'): it continues, saying that its batches are no longer the
    uninterrupted run's; the path's new stream is seeded from (seed, step)."""
    train(cfg_for(synth, tmp_path, "run", max_steps=3, data_on_gpu=first))
    capsys.readouterr()
    s = train(cfg_for(synth, tmp_path, "run", max_steps=6, data_on_gpu=then, resume="auto"))
    assert (s["start_step"], s["step"]) == (3, 6)
    err = capsys.readouterr().err
    was, now = ("on", "off") if first else ("off", "on")
    assert f"--data-on-gpu was {was} when the checkpoint was written and is {now} now" in err, err
    bank = _final(tmp_path / "run")["rng"].get("data") or {}
    assert ("bank" in bank) == bool(then)


def test_auto_data_path_keeps_a_resumed_loader_run_on_the_loader():
    """On a GPU where the set fits, auto picks the device bank, but not for a run resumed from a
    loader checkpoint: keeping its data path keeps the resume exact."""
    from fastcgan.train import resolve_fast_path

    gpu, gib = torch.device("cuda"), 1 << 30
    cfg = tiny_train_config(compile=False, channels_last=False, cuda_graphs=False, cudnn_benchmark=False)
    for resumed, want in ((None, True), (True, True), (False, False)):
        r, _ = resolve_fast_path(cfg, gpu, dataset_nbytes=gib, free_memory=80 * gib, resumed_data_on_gpu=resumed)
        assert r.data.data_on_gpu is want, resumed


def test_resume_after_a_crash_keeps_one_metrics_history(tmp_path, synth, capsys):
    """A run killed past its last checkpoint logged steps that the resumed run logs again (and
    maybe half a line): metrics.jsonl is cut back to the checkpoint's step first, so it holds the
    uninterrupted run's steps once, in order."""
    import json

    straight = tmp_path / "straight" / "metrics.jsonl"
    train(cfg_for(synth, tmp_path, "straight", max_steps=8))
    train(cfg_for(synth, tmp_path, "split", max_steps=4))
    metrics = tmp_path / "split" / "metrics.jsonl"
    with open(metrics, "a") as f:  # what the killed run wrote after its step-4 checkpoint
        f.write(json.dumps({"step": 6, "epoch": 0, "G": 1.0}) + "\n" + '{"step": 7, "ep')
    capsys.readouterr()
    train(cfg_for(synth, tmp_path, "split", max_steps=8, resume="auto"))
    assert re.search(r"resumed \S+step_000000004.ckpt at step 4 \(\d of 3 epochs done\)", capsys.readouterr().err)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in straight.read_text().splitlines()] == [2, 4, 6, 8]
    assert json.loads(metrics.read_text().splitlines()[2])["G"] != 1.0


def test_cutting_back_metrics_streams_and_survives_foreign_lines(tmp_path):
    """The cut-back read the whole file (1.6x a 0.5 GB metrics.jsonl in memory on resume); a
    deeply nested line was a RecursionError and ``"step": "x"`` a TypeError, both tracebacks."""
    import json

    import fastcgan.train.logging as logging_mod

    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "G": 0.5}) + "\n" for s in (1, 2, 3)]
    path.write_text("".join(good))
    before = os.stat(path)
    logging_mod._drop_records_after(str(path), 3)
    assert path.read_text() == "".join(good) and os.stat(path).st_mtime_ns == before.st_mtime_ns  # untouched
    over_long = '{"G": ' + "1" * logging_mod._MAX_RECORD + "}\n"  # dropped, read in pieces
    foreign = ["[" * 50_000 + "\n", '{"step": "x"}\n', '{"step": true}\n', over_long, "7\n"]
    path.write_text(good[0] + "".join(foreign) + good[1] + json.dumps({"step": 9}) + "\n" + good[2][:-1])
    logging_mod._drop_records_after(str(path), 3)
    assert path.read_text() == good[0] + "7\n" + good[1] + good[2]


def _snapshot(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = (os.path.getmtime(p), hashlib.sha256(fh.read()).hexdigest())
    return out


def test_corrupt_checkpoint_is_a_clear_error_and_touches_nothing(tmp_path, synth, capsys):
    train(cfg_for(synth, tmp_path, "run", max_steps=2))
    run = tmp_path / "run"
    ckpt = latest_checkpoint(str(run))
    with open(ckpt, "rb") as f:
        data = f.read()
    with open(ckpt, "wb") as f:  # truncated, as by a full disk or an interrupted copy
        f.write(data[: len(data) // 2])
    before = _snapshot(run)
    args = [
        "--dataset",
        "synthetic",
        "--dataroot",
        synth,
        "--output-dir",
        str(tmp_path),
        "--name",
        "run",
        "--no-progress",
        "--num-workers",
        "0",
        "--max-steps",
        "4",
    ]
    assert cli_main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert ckpt in err and ("corrupt" in err or "truncated" in err)
    assert cli_main(args + ["--resume", ckpt]) == 2
    assert ckpt in capsys.readouterr().err
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    assert cli_main(args + ["--resume", str(garbage)]) == 2
    assert str(garbage) in capsys.readouterr().err
    # A generator file is not data loss: it says what to do instead.
    assert cli_main(args + ["--resume", str(run / "generator_AtoB.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "is an exported generator, not a training checkpoint" in err and "--init-generator AtoB=" in err
    assert _snapshot(run) == before


def test_resume_never_writes_over_files_or_newer_checkpoints(tmp_path, synth, capsys):
    """A checkpoint outside a run's layout, or an older checkpoint of a run, once continued in the
    checkpoint's own folder: the first replaced the user's files beside a copied checkpoint
    (config.json, summary.json), the second overwrote the run's newer checkpoints with a branch."""
    import shutil

    train(cfg_for(synth, tmp_path, "a", max_steps=3, checkpoint_every=1))
    a = tmp_path / "a"
    first = os.path.join(a, "checkpoints", "step_000000001.ckpt")
    loose = tmp_path / "downloads"
    loose.mkdir()
    shutil.copy(first, loose / "model.ckpt")
    (loose / "config.json").write_text("precious")
    (loose / "summary.json").write_text("precious")
    before_a, before_loose = _snapshot(a), _snapshot(loose)
    base = ["--dataset", "synthetic", "--dataroot", synth, "--output-dir", str(tmp_path), "--no-progress",
            "--num-workers", "0", "--max-steps", "2"]  # fmt: skip

    # An older checkpoint of run a, named, continued in a: refused (step 2 and 3 would be replaced).
    assert cli_main(base + ["--resume", first]) == 2
    err = capsys.readouterr().err
    assert "step_000000002.ckpt" in err and "step_000000003.ckpt" in err and "--name" in err
    # --name branches it into a new run; a loose file always starts one in OUTPUT_DIR/NAME.
    assert cli_main(base + ["--resume", first, "--name", "branch"]) == 0
    assert cli_main(base + ["--resume", str(loose / "model.ckpt"), "--name", "fromfile"]) == 0
    capsys.readouterr()
    for name in ("branch", "fromfile"):
        assert [os.path.basename(p) for p in _listing(tmp_path / name)] == ["step_000000002.ckpt"]
    s = train(cfg_for(synth, tmp_path, "lib", max_steps=2, resume=str(loose / "model.ckpt")))
    assert s["run_dir"] == str(tmp_path / "lib")
    assert _snapshot(a) == before_a and _snapshot(loose) == before_loose
    # A branch into a run that has checkpoints of its own is refused too.
    assert cli_main(base + ["--resume", first, "--name", "branch"]) == 2
    assert "already has checkpoints" in capsys.readouterr().err
    # Continuing run a itself (its newest, or the newest by name) still works.
    assert cli_main(base[:-1] + ["4", "--resume", os.path.join(a, "checkpoints", "step_000000003.ckpt")]) == 0
    assert os.path.exists(os.path.join(a, "checkpoints", "step_000000004.ckpt"))


def _listing(run):
    from fastcgan.train import list_checkpoints

    return list_checkpoints(str(run))


def test_resume_rejects_changed_training_flags(tmp_path, synth, capsys):
    train(cfg_for(synth, tmp_path, "run", max_steps=1))
    run = str(tmp_path / "run")
    assert (
        cli_main(
            ["--dataset", "synthetic", "--dataroot", synth, "--resume", run, "--ngf", "8", "--no-progress"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "ngf=8" in err and "checkpoint: 4" in err
    # run-control flags may change: more steps, other logging cadence
    s = train(cfg_for(synth, tmp_path, "run", max_steps=3, resume=run, log_every=1))
    assert (s["start_step"], s["step"]) == (1, 3)
    # and the schedule's length (the CLI passes what was typed as `requested`)
    assert cli_main(["--dataset", "synthetic", "--dataroot", synth, "--resume", run, "--epochs", "5",
                     "--max-steps", "4", "--no-progress"]) == 0
    assert "1+2 epochs to lr 0.0002, 5+2 epochs" in capsys.readouterr().err


def test_resume_keeps_the_seed_it_started_with(tmp_path, synth, capsys):
    """The seed orders every epoch's data: a resume without --seed took the default 0 and went on
    with other batches (weights 3.5e-3 off an uninterrupted run); another --seed was accepted."""
    train(cfg_for(synth, tmp_path, "run", max_steps=1, seed=2))
    run = str(tmp_path / "run")
    args = ["--dataset", "synthetic", "--dataroot", synth, "--resume", run, "--no-progress"]
    assert cli_main(args + ["--seed", "7"]) == 2
    assert "seed=7" in capsys.readouterr().err
    s = train(cfg_for(synth, tmp_path, "run", max_steps=2, resume=run))  # seed left at its default
    assert s["step"] == 2 and load_checkpoint(latest_checkpoint(run))["config"]["run"]["seed"] == 2


def test_resume_alone_trains_on_the_runs_own_data(tmp_path, synth, capsys, monkeypatch):
    """`--resume RUN` (what the SIGTERM message suggests) needed --dataroot / --dataset again, and a
    relative --dataroot was recorded as typed, so a resume from another folder could not find it."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth, data)  # a folder dataset of its own (the module's synthetic one is shared)
    monkeypatch.chdir(tmp_path)
    flags = ["--load-size", "32", "--crop-size", "28", "--ngf", "4", "--ndf", "4", "--n-layers-D", "2",
             "--num-workers", "0", "--no-progress", "--no-tensorboard", "--eval-every", "0"]
    assert cli_main(flags + ["--dataroot", "data", "--output-dir", "out", "--name", "run", "--max-steps", "1"]) == 0
    run = tmp_path / "out" / "run"
    assert load_checkpoint(latest_checkpoint(str(run)))["config"]["data"]["dataroot"] == str(data)  # absolute
    monkeypatch.chdir(synth)
    assert cli_main(["--resume", str(run), "--max-steps", "2", "--no-progress", "--no-tensorboard"]) == 0
    ckpt = load_checkpoint(latest_checkpoint(str(run)))
    assert ckpt["step"] == 2 and ckpt["config"]["data"]["dataroot"] == str(data)
    capsys.readouterr()
    # The data moved away: named, nothing written, and --dataroot is the way out.
    data.rename(tmp_path / "elsewhere")
    assert cli_main(["--resume", str(run), "--max-steps", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"trained on, {data}, is not a directory" in err and "give --dataroot" in err, err
    assert len(_listing(run)) == 2
    assert cli_main(["--resume", str(run), "--dataroot", str(tmp_path / "elsewhere"), "--max-steps", "3",
                     "--no-progress", "--no-tensorboard"]) == 0
    # Nothing to resume and no data named: a new run without data, refused before anything is written.
    assert cli_main(["--resume", "--name", "fresh", "--output-dir", str(tmp_path), "--no-progress"]) == 2
    assert "--dataroot is required: nothing to resume" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(SystemExit) as e:  # and without --resume, as before
        cli_main(["--name", "fresh", "--output-dir", str(tmp_path)])
    assert e.value.code == 2 and "--dataroot" in capsys.readouterr().err


def test_resume_may_change_the_schedule(tmp_path, synth, capsys):
    """Training longer, shorter or at another rate refused every --epochs / --epochs-decay / --lr
    on resume, although the official --continue_train takes new ones. Extended before the decay
    begins, the run is the run that had the longer schedule from the start, bit for bit; changed
    during the decay, the learning rate is the new schedule's at the resumed epoch (the schedulers'
    state used to keep the old lengths and base rate). The cosine policy's period (--epochs, the
    official T_max) stays fixed; its run length may change."""
    from fastcgan.train.config import ConfigError
    from fastcgan.train.state import LinearDecay

    # 8 images an epoch: 5 steps stay in epoch 0, 10 cross into epoch 1.
    straight = train(cfg_for(synth, tmp_path, "long", max_steps=10, epochs=3))
    train(cfg_for(synth, tmp_path, "extended", max_steps=5, epochs=2))
    second = train(cfg_for(synth, tmp_path, "extended", max_steps=10, epochs=3, resume="auto"),
                   requested={"epochs": 3})
    a, b = _final(tmp_path / "long"), _final(tmp_path / "extended")
    for key in ("nets", "optimizers", "schedulers", "pools", "step", "epoch", "rng"):
        _assert_same(a[key], b[key], key)
    assert straight["final_losses"] == second["final_losses"]
    assert "2+2 epochs to lr 0.0002, 3+2 epochs after epoch 0" in capsys.readouterr().err

    def lr_of(run):
        return _final(tmp_path / run)["optimizers"]["G"]["param_groups"][0]["lr"]

    lr0 = a["config"]["optim"]["lr"]
    # 1 + 2 epochs, updated at the start of each as the official train.py: 2/3, then 1/3 in epoch 1.
    train(cfg_for(synth, tmp_path, "decaying", max_steps=9, epochs=1))
    assert lr_of("decaying") == pytest.approx(lr0 * 1 / 3)
    train(cfg_for(synth, tmp_path, "decaying", max_steps=10, epochs=5, resume="auto"), requested={"epochs": 5})
    assert _final(tmp_path / "decaying")["config"]["optim"]["epochs"] == 5
    assert lr_of("decaying") == lr0 * LinearDecay(5, 2)(2) == lr0
    assert "the learning rate moves from 6.667e-05 to 0.0002" in capsys.readouterr().err
    train(cfg_for(synth, tmp_path, "decaying", max_steps=11, epochs=1, lr=1e-4, resume="auto"),
          requested={"epochs": 1, "lr": 1e-4})
    assert lr_of("decaying") == pytest.approx(1e-4 * 1 / 3)

    train(cfg_for(synth, tmp_path, "cosine", max_steps=5, lr_policy="cosine", epochs=2))  # in epoch 0: step 1
    with pytest.raises(ConfigError, match="cosine"):
        train(cfg_for(synth, tmp_path, "cosine", max_steps=6, lr_policy="cosine", epochs=4, resume="auto"),
              requested={"epochs": 4})
    train(cfg_for(synth, tmp_path, "cosine", max_steps=6, lr_policy="cosine", epochs=2, lr=1e-3, epochs_decay=5,
                  resume="auto"), requested={"lr": 1e-3, "epochs_decay": 5})  # the length, not the period
    assert lr_of("cosine") == pytest.approx(1e-3 * (1 + math.cos(math.pi * 1 / 2)) / 2)  # period: epochs (2)


@pytest.mark.parametrize("policy", ["linear", "step", "cosine", "plateau"])
def test_lr_factor_is_each_schedules_closed_form(policy):
    """use_schedule sets a changed schedule's LR from lr_factor: it must be what the scheduler
    itself reaches, step by step."""
    from fastcgan.train import TrainConfig
    from fastcgan.train.state import build_scheduler, lr_factor

    cfg = TrainConfig.from_preset("cyclegan128", dataset="synthetic", lr_policy=policy, epochs=3, epochs_decay=4,
                                  lr_decay_iters=2)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=cfg.optim.lr)
    sched = build_scheduler(opt, cfg)
    for _ in range(8):
        assert opt.param_groups[0]["lr"] == pytest.approx(cfg.optim.lr * lr_factor(cfg.optim, sched.last_epoch),
                                                          rel=1e-12)
        opt.step()
        sched.step()
    assert sched.last_epoch == 9  # CycleGAN's schedule takes its first step before the first epoch


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_and_exits_cleanly(tmp_path, synth, sig, code):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "fastcgan.train",
        "--dataset",
        "synthetic",
        "--dataroot",
        synth,
        "--preset",
        "cyclegan128",
        "--load-size",
        "32",
        "--crop-size",
        "28",
        "--ngf",
        "4",
        "--ndf",
        "4",
        "--max-steps",
        "100000",
        "--log-every",
        "1",
        "--checkpoint-every",
        "100000",
        "--output-dir",
        str(tmp_path),
        "--name",
        "run",
        "--num-workers",
        "0",
        "--no-progress",
        "--no-tensorboard",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()[1]
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == code, err
    assert f"received {signal.Signals(sig).name}" in err and "--resume" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] == signal.Signals(sig).name and summary["exit_code"] == code
    step = summary["step"]
    assert step >= 3
    ckpt = latest_checkpoint(str(run))
    assert ckpt.endswith(f"step_{step:09d}.ckpt") and load_checkpoint(ckpt)["step"] == step
    assert (run / "generator_AtoB.safetensors").is_file()
    s = train(
        cfg_for(
            synth,
            tmp_path,
            "run",
            max_steps=step + 1,
            resume="auto",
            use_dropout=False,
            pool_size=50,
            netD="basic",
            n_layers_D=3,
            epochs=100,
            epochs_decay=100,
        )
    )
    assert (s["start_step"], s["step"]) == (step, step + 1)


def _official_lr_per_epoch(policy: str, lr: float, n: int, d: int, decay_iters: int, at_start: bool,
                           epochs: int) -> list[float]:
    """The LR each epoch of an official run trains at: its get_scheduler (epoch_count 1), stepped by
    update_learning_rate() at the start of every epoch (CycleGAN / pix2pix train.py) or at the end
    (CUT's train.py). plateau's metric stays 0 there: no official model sets it."""
    sched_lr = torch.optim.lr_scheduler
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    if policy == "linear":
        sched = sched_lr.LambdaLR(opt, lambda e: 1.0 - max(0, e + 1 - n) / float(d + 1))
    elif policy == "step":
        sched = sched_lr.StepLR(opt, step_size=decay_iters, gamma=0.1)
    elif policy == "plateau":
        sched = sched_lr.ReduceLROnPlateau(opt, mode="min", factor=0.2, threshold=0.01, patience=5)
    else:
        sched = sched_lr.CosineAnnealingLR(opt, T_max=n, eta_min=0)

    def update():
        sched.step(0) if policy == "plateau" else sched.step()

    out = []
    for _ in range(epochs):
        if at_start:
            update()
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if not at_start:
            update()
    return out


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # no optimizer step here
@pytest.mark.parametrize("recipe,at_start", [("cyclegan", True), ("pix2pix", True), ("cut", False)])
@pytest.mark.parametrize("policy", ["linear", "step", "cosine", "plateau"])
def test_each_epoch_trains_at_the_official_lr(policy, recipe, at_start):
    """Epoch by epoch, a run's LR is the official one's: the CycleGAN repository updates it at the
    start of each epoch (epoch k at step k: the linear decay begins in the last of --epochs and
    the last epoch runs at 0), CUT's at the end (epoch k at step k - 1)."""
    from fastcgan.train import TrainConfig
    from fastcgan.train.state import build_state

    n, d, iters, lr = 3, 4, 2, 2e-4
    cfg = TrainConfig.from_preset(recipe, dataset="synthetic", lr_policy=policy, epochs=n, epochs_decay=d,
                                  lr_decay_iters=iters, lr=lr, device="cpu", ngf=4, ndf=4)
    st = build_state(cfg)
    ours = []
    for _ in range(20):
        ours.append(st.lr())
        st.end_epoch()
    official = _official_lr_per_epoch(policy, lr, n, d, iters, at_start, 20)
    assert ours == pytest.approx(official, rel=1e-9, abs=1e-20)
    assert len(set(official)) > 1  # the schedule moves


@pytest.mark.parametrize("lr", [2e-4, 1.0, 3e-8])
def test_plateau_is_the_official_plateau_as_it_runs(lr):
    """The official --lr_policy plateau steps ReduceLROnPlateau(factor 0.2, patience 5, threshold
    0.01) with a metric that stays 0, at the start of every epoch: ours must give its LR at every
    epoch (lr 3e-8: torch's eps stops the cuts early)."""
    from fastcgan.train import TrainConfig
    from fastcgan.train.state import build_scheduler

    cfg = TrainConfig.from_preset("cyclegan128", dataset="synthetic", lr_policy="plateau", lr=lr)
    ours_opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ours = build_scheduler(ours_opt, cfg)
    official = _official_lr_per_epoch("plateau", lr, 0, 0, 0, True, 90)
    for want in official:
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-9)
        ours_opt.step()
        ours.step()
    assert len(set(official)) > (2 if lr > 1e-7 else 1)  # it did cut
    if lr == 2e-4:
        assert official[5] == lr and official[6] == pytest.approx(lr * 0.2)  # epoch 7: the first cut one


def test_resumed_plateau_takes_a_new_lr():
    """use_schedule rebuilds a restored plateau schedule's factor for a new --lr (its cuts stop at
    an absolute eps, so the factor depends on the rate)."""
    from types import SimpleNamespace

    from fastcgan.train import TrainConfig
    from fastcgan.train.checkpoint import use_schedule
    from fastcgan.train.state import build_scheduler, lr_factor

    old = TrainConfig.from_preset("cyclegan128", dataset="synthetic", lr_policy="plateau", lr=2e-4)
    new = old.replace(lr=1e-7)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=2e-4)
    sched = build_scheduler(opt, old)
    for _ in range(19):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.Adam([p], lr=1e-7)
    restored = build_scheduler(opt2, old)
    restored.load_state_dict(state)
    assert restored.last_epoch == 20
    use_schedule(SimpleNamespace(schedulers={"G": restored}), new)
    assert lr_factor(new.optim, 20) != lr_factor(old.optim, 20)  # 1e-7 stops cutting earlier
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-7 * lr_factor(new.optim, 20), rel=1e-12)
    opt2.step()
    restored.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-7 * lr_factor(new.optim, 21), rel=1e-12)


def test_cosine_is_the_official_period():
    """The official cosine policy is CosineAnnealingLR(T_max=--n_epochs): at 0 after --epochs, back at
    the base rate after twice that (ours annealed over epochs + epochs_decay before)."""
    from fastcgan.train import TrainConfig
    from fastcgan.train.config import ConfigError
    from fastcgan.train.state import lr_factor

    o = TrainConfig.from_preset("cyclegan", dataset="synthetic", lr_policy="cosine").optim  # 100 + 100
    assert lr_factor(o, 50) == pytest.approx(0.5) and lr_factor(o, 100) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(o, 200) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="epochs.*cosine"):
        TrainConfig.from_preset("cyclegan", dataset="synthetic", lr_policy="cosine", epochs=0, epochs_decay=5)


def test_resumed_cosine_keeps_its_own_period():
    """A cosine run from before the official period (T_max = epochs + epochs_decay) resumed with a
    new --lr follows its own restored period, not the new one's closed form."""
    from types import SimpleNamespace

    from fastcgan.train import TrainConfig
    from fastcgan.train.checkpoint import use_schedule

    cfg = TrainConfig.from_preset("cyclegan128", dataset="synthetic", lr_policy="cosine", epochs=3, epochs_decay=4)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=cfg.optim.lr)
    old = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7)  # the former period
    for _ in range(2):
        opt.step()
        old.step()
    use_schedule(SimpleNamespace(schedulers={"G": old}), cfg.replace(lr=1e-3))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * (1 + math.cos(math.pi * 2 / 7)) / 2, rel=1e-12)


def test_a_run_begun_on_the_lagging_schedule_is_told_and_kept():
    """Runs begun before the official start-of-epoch LR update (their schedulers' last_epoch equals
    the finished epochs) continue exactly as they began, with a note; current runs get none."""
    from fastcgan.train import TrainConfig
    from fastcgan.train.checkpoint import _schedule_lag

    cyc = TrainConfig.from_preset("cyclegan128", dataset="synthetic")
    cut = TrainConfig.from_preset("cut", dataset="synthetic")

    def payload(epoch, last):
        return {"epoch": epoch, "schedulers": {"G": {"last_epoch": last}, "D": {"last_epoch": last}}}

    assert "one epoch behind the official" in _schedule_lag(cyc, payload(3, 3))
    assert _schedule_lag(cyc, payload(3, 4)) is None
    assert _schedule_lag(cut, payload(3, 3)) is None  # CUT's official schedule is the lagging one


def test_repeating_a_training_flag_with_the_checkpoints_value_is_no_conflict():
    """--resume with a training flag repeated at the value the run has (e.g. the same --ngf or
    --seed from a shell script) changes nothing: only a different value is a conflict."""
    ck = tiny_train_config()
    same = {"ngf": ck.model.ngf, "seed": ck.run.seed, "lr_policy": ck.optim.lr_policy, "pool_size": ck.loss.pool_size}
    assert training_field_conflicts(ck, same) == []
    assert len(training_field_conflicts(ck, {"ngf": ck.model.ngf * 2})) == 1
    # A field the run left unset (lambda_A follows --lambda-cycle) said "(checkpoint: None)".
    assert ck.loss.lambda_A is None
    assert training_field_conflicts(ck, {"lambda_A": 3.0}) == ["lambda_A=3.0 (checkpoint: unset, its default)"]


def test_resume_alone_keeps_a_synthetic_runs_dataset():
    """`--resume RUN` without --dataroot continues on the checkpoint's data: a --dataset synthetic
    run stays synthetic (not the CLI default 'folder' with the checkpoint's empty dataroot)."""
    ck = tiny_train_config()  # dataset synthetic, no dataroot
    cli = TrainConfig.from_preset("cyclegan", resume="auto")  # no data named
    new = config_for_resume(ck, cli, "/tmp/somewhere/run")
    assert new.data.dataset == "synthetic" and new.data.dataroot == ck.data.dataroot


def test_a_new_run_never_starts_over_a_run_with_checkpoints(tmp_path, synth, capsys):
    """Catches (mutation testing): a run without --resume started afresh in a run directory that has
    checkpoints (its new checkpoints would mix with, then rotate away, the old run's)."""
    train(cfg_for(synth, tmp_path, "a", max_steps=1))
    args = ["--dataset", "synthetic", "--dataroot", synth, "--output-dir", str(tmp_path), "--name", "a",
            "--no-progress", "--num-workers", "0", "--max-steps", "1"]
    before = _snapshot(tmp_path / "a")
    capsys.readouterr()
    assert cli_main(args) == 2
    assert "already has checkpoints; pass --resume to continue it" in capsys.readouterr().err
    assert _snapshot(tmp_path / "a") == before


def test_a_resume_with_nothing_left_to_train_is_refused_and_touches_nothing(tmp_path, synth):
    """--resume of a finished run, with --max-steps at or below the step reached, or with its
    schedule shrunk to the epochs done, trained 0 steps, exit 0 -- and rewrote the checkpoint and
    replaced the run's summary with an empty one (a shrunk schedule announced a negative LR)."""
    from fastcgan.train import ConfigError

    s = train(cfg_for(synth, tmp_path, "done", epochs=1, epochs_decay=1), install_signal_handlers=False)
    run, steps = s["run_dir"], s["step"]  # two epochs of the 8 images
    assert _final(run)["epoch"] == 2
    before = _snapshot(run)
    cases = [({}, "the run has done 2 epochs and its schedule (--epochs 1 + --epochs-decay 1) ends there"),
             ({"epochs": 1, "epochs_decay": 0}, "the run has done 2 epochs"),
             ({"epochs": 2, "epochs_decay": 1, "max_steps": steps}, f"at step {steps} and --max-steps is {steps}"),
             ({"epochs": 2, "epochs_decay": 1, "max_steps": 2}, "--max-steps is 2; raise --max-steps")]
    for kw, said in cases:
        with pytest.raises(ConfigError, match=re.escape(said)):
            train(cfg_for(synth, tmp_path, "done", resume="auto", **kw), requested=dict(kw),
                  install_signal_handlers=False)
    assert _snapshot(run) == before
    # A longer schedule continues it.
    more = {"epochs": 2, "epochs_decay": 1}
    s = train(cfg_for(synth, tmp_path, "done", resume="auto", **more), requested=more, install_signal_handlers=False)
    assert s["step"] == steps * 3 // 2


@pytest.mark.parametrize("kind", ["fifo", "folder", "dangling link"])
def test_a_run_file_that_is_not_a_regular_file_is_refused_by_name(tmp_path, synth, kind):
    """A FIFO at RUN/metrics.jsonl made --resume wait forever for a writer (holding the run's lock);
    a folder there was an IsADirectoryError traceback."""
    from fastcgan.train.runlock import RunDirError

    s = train(cfg_for(synth, tmp_path, "odd", max_steps=2), install_signal_handlers=False)
    metrics = os.path.join(s["run_dir"], "metrics.jsonl")
    os.remove(metrics)
    {"fifo": os.mkfifo, "folder": os.mkdir, "dangling link": lambda p: os.symlink(p + ".gone", p)}[kind](metrics)
    with pytest.raises(RunDirError, match=re.escape(f"{metrics} exists and is not a regular file")):
        train(cfg_for(synth, tmp_path, "odd", resume="auto", max_steps=3), requested={"max_steps": 3},
              install_signal_handlers=False)


def test_a_full_disk_while_logging_is_one_error_naming_metrics_jsonl(tmp_path, synth, monkeypatch, capsys):
    """No space left while appending to metrics.jsonl was two chained tracebacks (the write, then
    the close) that never named the file; now exit 1 with one line."""
    import builtins
    import errno

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f, self.closed = f, False

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.closed = True
            self.f.close()

    def opener(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Full(f) if str(path).endswith("metrics.jsonl") and "a" in mode else f

    monkeypatch.setattr(builtins, "open", opener)
    out = tmp_path / "full"
    rc = cli_main(["--dataset", "synthetic", "--dataroot", synth, "--output-dir", str(out), "--name", "r",
                   "--load-size", "32", "--crop-size", "28", "--ngf", "4", "--ndf", "4", "--max-steps", "2",
                   "--log-every", "1", "--device", "cpu", "--no-progress", "--no-tensorboard", "--num-workers", "0"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert f"could not write {out / 'r' / 'metrics.jsonl'}: no space left on the device" in err, err


def test_run_folders_that_cannot_be_written_are_found_before_training(tmp_path, synth, monkeypatch):
    """A checkpoints/ folder that could not be written was found at the first save, after training
    steps; RUN/samples as a file was a bare '[Errno 17] File exists'."""
    from fastcgan.train import runlock
    from fastcgan.train.runlock import RunDirError

    s = train(cfg_for(synth, tmp_path, "ro", max_steps=2), install_signal_handlers=False)
    ckpts, samples = os.path.join(s["run_dir"], "checkpoints"), os.path.join(s["run_dir"], "samples")
    real = runlock.output_folder_problem
    monkeypatch.setattr(runlock, "output_folder_problem", lambda p, what, names=(): (
        f"{what}: cannot write in {p} (Permission denied)" if p == ckpts else real(p, what, names)))
    resume = cfg_for(synth, tmp_path, "ro", resume="auto", max_steps=3)
    with pytest.raises(RunDirError, match=re.escape(f"run folder {ckpts}: cannot write in {ckpts}")):
        train(resume, requested={"max_steps": 3}, install_signal_handlers=False)
    monkeypatch.undo()
    import shutil

    shutil.rmtree(samples)
    open(samples, "w").close()
    with pytest.raises(RunDirError, match=re.escape(f"{samples} exists and is not a folder")):
        train(resume, requested={"max_steps": 3}, install_signal_handlers=False)
