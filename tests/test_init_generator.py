"""--init-generator DIRECTION=PATH: a run whose generators start from trained ones (fine-tuning a
released model, or another run), everything else initialised as a fresh run; checked before
anything is written; on resume the checkpoint decides."""

import os

import pytest
import torch
from conftest import tiny_train_config

from fastcgan.models import load_generator, save_generator
from fastcgan.train import train
from fastcgan.train.checkpoint import list_checkpoints, load_checkpoint
from fastcgan.train.cli import main as train_main
from fastcgan.train.config import ConfigError


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained tiny CycleGAN run (its generators differ from a fresh initialisation)."""
    out = tmp_path_factory.mktemp("init-source")
    train(tiny_train_config(out / "data", out, max_steps=3, checkpoint_every=3, seed=7), install_signal_handlers=False)
    return out


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generators_start_from_the_sources_and_the_rest_as_a_fresh_run(source, tmp_path):
    run = source / "run"
    ckpt = list_checkpoints(str(run))[-1]
    init = (f"AtoB={run}", f"BtoA={ckpt}")
    cfg = tiny_train_config(source / "data", tmp_path, max_steps=0, checkpoint_every=1, init_generators=init)
    train(cfg, install_signal_handlers=False)
    fresh_cfg = tiny_train_config(source / "data", tmp_path, max_steps=0, checkpoint_every=1, name="fresh")
    train(fresh_cfg, install_signal_handlers=False)
    nets = load_checkpoint(list_checkpoints(str(tmp_path / "run"))[-1])["nets"]
    fresh = load_checkpoint(list_checkpoints(str(tmp_path / "fresh"))[-1])["nets"]
    for d in ("AtoB", "BtoA"):
        assert _equal(load_generator(str(tmp_path / "run"), direction=d).state_dict(),
                      load_generator(str(run), direction=d).state_dict())
    for name in ("D_A", "D_B"):  # the discriminators: as without --init-generator (same seed, same draws)
        assert _equal(nets[name], fresh[name])
    assert not _equal(nets["G_AB"], fresh["G_AB"])


def test_cli_errors_name_the_flag_and_write_nothing(source, tmp_path, capsys):
    run = source / "run"
    base = ["--dataset", "synthetic", "--dataroot", str(source / "data"), "--load-size", "32", "--crop-size", "32",
            "--ngf", "4", "--ndf", "4", "--netG", "resnet_6blocks", "--device", "cpu", "--output-dir", str(tmp_path), "--max-steps", "1",
            "--no-tensorboard", "--no-progress", "--eval-every", "0"]
    pth = tmp_path / "latest_net_G_A.pth"
    pth.write_bytes(b"x")
    inside = tmp_path / "new"
    inside.mkdir()
    save_generator(load_generator(str(run)), inside / "g.safetensors")
    nan = load_generator(str(run))
    with torch.no_grad():
        next(nan.parameters())[0] = float("nan")
    save_generator(nan, tmp_path / "nan.safetensors")
    cases = [
        (["--ngf", "8", "--init-generator", f"AtoB={run}"], "another architecture than this run's generator: ngf=4 (this run: 8)"),
        (["--model", "cut", "--init-generator", f"BtoA={run}"], "--model cut trains only AtoB"),
        (["--init-generator", f"AtoB={tmp_path / 'nope'}"], "not found"),
        (["--init-generator", f"BtoA={run / 'samples'}"], "has no generator_BtoA.safetensors"),
        (["--init-generator", f"AtoB={pth}"], "not an official checkpoint of this run's generator"),
        (["--init-generator", f"AtoB={inside / 'g.safetensors'}"], "inside the run directory"),
        (["--init-generator", f"AtoB={tmp_path / 'nan.safetensors'}"], "non-finite weights"),
    ]
    for argv, words in cases:
        assert train_main(base + ["--name", "new"] + argv) == 2, argv
        err = capsys.readouterr().err
        assert "--init-generator" in err and words in err, (argv, err)
        assert os.listdir(inside) == ["g.safetensors"]  # nothing written
    for argv, words in ((["--init-generator", f"up={run}"], "DIRECTION=PATH"),
                        (["--init-generator", f"AtoB={run}", "--init-generator", f"AtoB={run}"],
                         "one PATH per direction")):
        with pytest.raises(SystemExit) as e:  # flag syntax: argparse's usage error
            train_main(base + ["--name", "new"] + argv)
        assert e.value.code == 2 and words in capsys.readouterr().err
    assert os.listdir(inside) == ["g.safetensors"]


def test_resume_keeps_the_recorded_source_and_refuses_another(source, tmp_path):
    run = source / "run"
    kw = dict(checkpoint_every=1, resume="auto")
    train(tiny_train_config(source / "data", tmp_path, max_steps=1, init_generators=(f"AtoB={run}",), **kw),
          install_signal_handlers=False)
    requested = {"init_generators": (f"AtoB={run}",)}  # the same flag again (a relaunched job): fine
    from fastcgan.train.cli import parse_config

    two = parse_config(["--dataset", "synthetic", "--init-generator", "BtoA=/y", "--init-generator", "AtoB=/x"])
    assert two[0].model.init_generators == two[1]["init_generators"] == ("AtoB=/x", "BtoA=/y")  # either order
    cfg = tiny_train_config(source / "data", tmp_path, max_steps=2, init_generators=(f"AtoB={run}",), **kw)
    assert train(cfg, install_signal_handlers=False, requested=requested)["step"] == 2
    s = train(tiny_train_config(source / "data", tmp_path, max_steps=3, **kw), install_signal_handlers=False)
    assert s["step"] == 3  # without it: the run's own record is kept
    cfg = load_checkpoint(list_checkpoints(str(tmp_path / "run"))[-1])["config"]
    assert tuple(cfg["model"]["init_generators"]) == (f"AtoB={run}",)
    other = (f"AtoB={list_checkpoints(str(run))[-1]}",)
    with pytest.raises(ConfigError, match="init_generators=.*cannot change|cannot change.*init_generators"):
        train(tiny_train_config(source / "data", tmp_path, max_steps=4, init_generators=other, **kw),
              install_signal_handlers=False, requested={"init_generators": other})


def test_a_colorization_generator_file_starts_a_colorization_run(tmp_path):
    """The deployed colorization generator (L*a*b* wrapper, keys ``net.*``) is what the file holds;
    it loads into the recipe's network through the same wrapper. A colour (RGB) generator does not."""
    from fastcgan.models import build_generator
    from fastcgan.recipes import get_recipe
    from fastcgan.train.state import build_state, initial_weights

    cfg = tiny_train_config(None, tmp_path, preset="colorization", netG="resnet_6blocks", ngf=4)
    lab = build_generator("resnet_6blocks", 1, 2, ngf=4, norm=cfg.model.norm, use_dropout=cfg.model.use_dropout,
                          color_space="lab")
    save_generator(lab, tmp_path / "lab.safetensors")
    recipe = get_recipe(cfg.model.recipe)
    init = initial_weights(cfg.replace(init_generators=(f"AtoB={tmp_path / 'lab.safetensors'}",)), recipe)
    state = build_state(cfg, torch.device("cpu"), recipe, init)
    assert _equal(recipe.deployed(state.nets["G"]).state_dict(), lab.state_dict())
    save_generator(build_generator("resnet_6blocks", ngf=4, norm=cfg.model.norm), tmp_path / "rgb.safetensors")
    with pytest.raises(ConfigError, match="color_space=None \\(this run: 'lab'\\)"):
        initial_weights(cfg.replace(init_generators=(f"AtoB={tmp_path / 'rgb.safetensors'}",)), recipe)


def test_an_official_checkpoint_starts_a_run_as_this_runs_generator(tmp_path):
    """``latest_net_G_A.pth`` of the official code (CycleGAN, or CUT's anti-aliased layout) is read
    with this run's arch / norm / resampling; a CUT file for a strided run is refused by its layout."""
    from fastcgan.models import build_generator, save_official_generator
    from fastcgan.recipes import get_recipe
    from fastcgan.train.state import build_state, initial_weights

    cfg = tiny_train_config(None, tmp_path, netG="resnet_6blocks", ngf=4)
    recipe = get_recipe(cfg.model.recipe)
    torch.manual_seed(5)
    g = build_generator("resnet_6blocks", ngf=4)
    save_official_generator(g, tmp_path / "latest_net_G_A.pth")
    init = initial_weights(cfg.replace(init_generators=(f"BtoA={tmp_path / 'latest_net_G_A.pth'}",)), recipe)
    assert _equal(build_state(cfg, torch.device("cpu"), recipe, init).nets["G_BA"].state_dict(), g.state_dict())
    save_official_generator(build_generator("resnet_6blocks", ngf=4, antialias=True, antialias_up=True),
                            tmp_path / "cut.pth")
    with pytest.raises(ConfigError, match="antialias=False but the checkpoint's layout says antialias=True"):
        initial_weights(cfg.replace(init_generators=(f"AtoB={tmp_path / 'cut.pth'}",)), recipe)
    cut = cfg.replace(recipe="cut", antialias=True, antialias_up=True)
    init = initial_weights(cut.replace(init_generators=(f"AtoB={tmp_path / 'cut.pth'}",)), get_recipe("cut"))
    assert set(init) == {"G"}


def test_a_folder_with_one_generator_starts_a_reversed_cut_run(tmp_path):
    """Fine-tuning a released labels -> photos CUT (its folder holds the generator as AtoB) as a
    --direction BtoA run (whose generator is BtoA): the folder's only generator is taken."""
    from fastcgan.models import build_generator
    from fastcgan.recipes import get_recipe
    from fastcgan.train.state import build_state, initial_weights

    cfg = tiny_train_config(None, tmp_path, preset="fastcut", netG="resnet_6blocks", direction="BtoA")
    recipe = get_recipe(cfg.model.recipe)
    want = build_state(cfg, torch.device("cpu"), recipe).nets["G"]
    released = tmp_path / "cityscapes_cut_pretrained"
    released.mkdir()
    torch.manual_seed(3)
    src = build_generator(**want.config)
    save_generator(src, released / "generator_AtoB.safetensors")
    init = initial_weights(cfg.replace(init_generators=(f"BtoA={released}",)), recipe)
    state = build_state(cfg, torch.device("cpu"), recipe, init)
    assert _equal(recipe.deployed(state.nets["G"]).state_dict(), src.state_dict())
