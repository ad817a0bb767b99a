"""A training checkpoint is an artifact: translate / export / eval take RUN/checkpoints/*.ckpt and
run the generator as it was at that step (the official test.py --epoch N)."""

import os

import numpy as np
import pytest
import torch
from conftest import tiny_train_config
from fastcgan.deploy import ArtifactError, load
from PIL import Image

from fastcgan.train import train
from fastcgan.train.checkpoint import checkpoint_directions, checkpoint_generator, list_checkpoints


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt-artifact")
    cfg = tiny_train_config(out / "data", out, max_steps=4, checkpoint_every=2, keep_last=5)
    train(cfg, install_signal_handlers=False)
    return out / "run"


def _x():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_the_last_checkpoint_is_the_saved_generator_and_an_earlier_one_is_not(run):
    ckpts = list_checkpoints(str(run))
    assert [os.path.basename(c) for c in ckpts] == ["step_000000002.ckpt", "step_000000004.ckpt"]
    saved = load(str(run), direction="BtoA", device="cpu")
    x = _x()
    rng = torch.get_rng_state()
    at_end = load(ckpts[-1], direction="BtoA", device="cpu")
    assert torch.equal(torch.get_rng_state(), rng)  # building the networks drew nothing from the global RNG
    assert at_end.engine == "torch" and at_end.trust == "data artifact (no code)"
    torch.testing.assert_close(at_end.translate_tensor(x), saved.translate_tensor(x), rtol=0, atol=0)
    earlier = load(ckpts[0], direction="BtoA", device="cpu").translate_tensor(x)
    assert (earlier - saved.translate_tensor(x)).abs().max() > 1e-4  # two optimizer steps before
    assert checkpoint_directions(ckpts[0]) == ("AtoB", "BtoA")


def test_translate_export_and_eval_take_a_checkpoint(run, tmp_path, capsys):
    from fastcgan.deploy.cli import main as export

    from fastcgan.evaluate import main as evaluate
    from fastcgan.translate import main as translate

    ckpt = list_checkpoints(str(run))[0]
    # Not a constant image: its planes have zero variance, and the norm's output is rounding noise.
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert translate(["--checkpoint", ckpt, "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "o"),
                      "--no-progress"]) == 0
    assert checkpoint_generator(ckpt, "AtoB").training is False
    got = np.array(Image.open(tmp_path / "o" / "a.png")).astype(int)
    ref = load(ckpt, device="cpu")(np.array(Image.open(tmp_path / "a.png"))).astype(int)
    assert np.abs(got - ref).max() <= 1  # rounding ties: the CLI and the array API scale uint8 differently

    assert export([ckpt, "--onnx", str(tmp_path / "g.onnx"), "--verify-sizes", "1x32x32"]) == 0
    x = _x()
    onnx = load(str(tmp_path / "g.onnx"), device="cpu").translate_tensor(x)
    torch.testing.assert_close(onnx, load(ckpt, device="cpu").translate_tensor(x), atol=1e-4, rtol=0)
    with pytest.raises(SystemExit) as e:  # never over the checkpoint it reads
        export([ckpt, "--onnx", ckpt])
    assert e.value.code == 2 and checkpoint_directions(ckpt) == ("AtoB", "BtoA")

    capsys.readouterr()
    assert evaluate(["--checkpoint", ckpt, "--dataroot", str(run.parent / "data"), "--no-fid"]) == 0
    out = capsys.readouterr().out
    assert "AtoB:" in out and "BtoA:" in out  # both generators of the run at that step


def test_bad_checkpoints_are_named_errors(run, tmp_path, capsys):
    from fastcgan.translate import main as translate

    ckpt = list_checkpoints(str(run))[0]
    bad = tmp_path / "step_000000002.ckpt"
    data = bytearray(open(ckpt, "rb").read())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="step_000000002.ckpt"):
        load(str(bad), device="cpu")
    (tmp_path / "x.ckpt").write_bytes(b"not a checkpoint")
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    assert translate(["--checkpoint", str(tmp_path / "x.ckpt"), "--input", str(tmp_path / "a.png"), "--output",
                      str(tmp_path / "o"), "--no-progress"]) == 2
    assert "x.ckpt" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_pix2pix_checkpoint_reads_its_direction(tmp_path, capsys):
    """A pix2pix run trained BtoA has one generator (AtoB: input half -> target half); given its
    checkpoint, translate --pairs and eval read the direction from it, as from the run directory."""
    from fastcgan.evaluate import main as evaluate
    from fastcgan.evaluate_paired import run_direction
    from fastcgan.recipes import get_recipe
    from fastcgan.train.data import prepare_dataroot
    from fastcgan.translate import main as translate

    cfg = tiny_train_config(None, tmp_path, preset="pix2pix", netG="unet_128", load_size=128, crop_size=128,
                            synthetic_train=4, synthetic_test=2, direction="BtoA", max_steps=1, checkpoint_every=1)
    train(cfg, install_signal_handlers=False)
    ckpt = list_checkpoints(str(tmp_path / "run"))[-1]
    assert checkpoint_directions(ckpt) == ("AtoB",) and run_direction(ckpt) == "BtoA"
    with pytest.raises(ArtifactError, match="has no BtoA generator"):
        load(ckpt, direction="BtoA", device="cpu")
    root = prepare_dataroot(cfg, get_recipe("pix2pix"))  # the synthetic pairs the run trained on
    capsys.readouterr()
    assert evaluate(["--checkpoint", ckpt, "--dataroot", root, "--no-fid"]) == 0
    assert "direction=BtoA" in capsys.readouterr().out
    assert translate(["--checkpoint", ckpt, "--input", os.path.join(root, "test"), "--output", str(tmp_path / "o"),
                      "--pairs", "--html", "--no-progress"]) == 0
    assert "BtoA, pairs" in (tmp_path / "o" / "index.html").read_text()


def test_a_config_claiming_larger_networks_than_the_file_holds_is_refused_unbuilt(run, tmp_path, resnet_builds):
    """A digest-consistent checkpoint whose config says ngf / ndf 512 (its tensors are ngf 4): the
    networks are compared on the meta device, so neither export nor resume allocates them."""
    from fastcgan.train.checkpoint import CheckpointError, load_checkpoint, payload_digest, restore_state
    from fastcgan.train.config import TrainConfig

    payload = load_checkpoint(list_checkpoints(str(run))[0])
    payload["config"]["model"].update(ngf=512, ndf=512)
    payload["digest"] = payload_digest(payload)
    crafted = tmp_path / "step_000000002.ckpt"
    torch.save(payload, crafted)
    with pytest.raises(CheckpointError, match="network G_AB does not match the configured model"):
        checkpoint_generator(str(crafted), "AtoB")
    cfg = TrainConfig.from_dict(payload["config"])
    with pytest.raises(CheckpointError, match="does not match the configured model"):
        restore_state(payload, cfg, torch.device("cpu"), path=str(crafted))
    # The same claim with tensors of the claimed shapes that are stride-0 views of one element each
    # (torch.save keeps views: a small file): refused for what they claim beyond what they hold.
    from fastcgan.recipes import get_recipe

    with torch.device("meta"):
        nets = get_recipe(cfg.model.recipe).networks(cfg)
    payload["nets"] = {n: {k: torch.zeros(1, dtype=v.dtype).expand(v.shape) for k, v in net.state_dict().items()}
                       for n, net in nets.items()}
    payload["digest"] = payload_digest(payload)
    torch.save(payload, crafted)
    assert crafted.stat().st_size < 10 << 20
    with pytest.raises(CheckpointError, match="claim .* bytes more than they hold"):
        checkpoint_generator(str(crafted), "AtoB")
    with pytest.raises(CheckpointError, match="claim .* bytes more than they hold"):
        restore_state(load_checkpoint(str(crafted)), cfg, torch.device("cpu"), path=str(crafted))
    # Any tensor of the file, e.g. one the digest would hash as a contiguous copy (2 GiB claimed).
    honest = load_checkpoint(list_checkpoints(str(run))[0])
    honest["extra"]["junk"] = torch.zeros(1).expand(1 << 29)
    honest["digest"] = payload_digest(honest)
    torch.save(honest, crafted)
    with pytest.raises(CheckpointError, match="claim .* bytes more than they hold"):
        load_checkpoint(str(crafted))
    assert resnet_builds and set(resnet_builds) == {"meta"}  # compared unbuilt, never allocated


@pytest.mark.parametrize("what", ["moment", "pool", "count"])
def test_optimizer_and_pool_state_must_fit_the_run(run, what):
    """Fully stored tensors of the wrong shape: refused when resuming, before anything is written
    (they failed mid-step, after the run directory was written)."""
    from fastcgan.train.checkpoint import CheckpointError, load_checkpoint, restore_state
    from fastcgan.train.config import TrainConfig

    payload = load_checkpoint(list_checkpoints(str(run))[0])
    if what == "moment":
        state = next(iter(payload["optimizers"].values()))["state"]
        next(iter(state.values()))["exp_avg"] = torch.zeros(7)
        match = "exp_avg of parameter 0 has shape"
    else:
        pool = payload["pools"]["pool_A"]
        if what == "pool":
            pool["images"] = torch.zeros(3, 3, 16, 16)
            match = "image pool pool_A holds images"
        else:
            pool["num_imgs"] = torch.tensor(10**6)
            match = "impossible count"
    with pytest.raises(CheckpointError, match=match):
        restore_state(payload, TrainConfig.from_dict(payload["config"]), torch.device("cpu"), path="x.ckpt")
