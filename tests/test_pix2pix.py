"""The pix2pix recipe (issue 14): config and CLI, the step against the official arithmetic, the
losses on known values, compiled == eager, convergence on paired synthetic data, exact resume,
the CLI end to end with its evaluation, and the trained generator through ONNX.

Networks are tiny (U-Net 128 at 128², ngf/ndf 4) and the data is the paired synthetic set."""

import contextlib
import copy
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_train_config
from torch import nn

from fastcgan.recipes import get_recipe
from fastcgan.train import TrainConfig, train
from fastcgan.train.checkpoint import latest_checkpoint, load_checkpoint
from fastcgan.train.cli import main as train_main
from fastcgan.train.cli import parse_config
from fastcgan.train.config import ConfigError
from fastcgan.train.execution import build_step
from fastcgan.train.state import build_state

pytestmark = pytest.mark.usefixtures("one_thread")


def p2p(out=None, **kw) -> TrainConfig:
    """The pix2pix preset on tiny nets: U-Net 128 at 128² (its 7 stride-2 levels need 128)."""
    base = dict(preset="pix2pix", netG="unet_128", load_size=128, crop_size=128, synthetic_train=8)
    return tiny_train_config(None, out, **{**base, **kw})


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """The paired synthetic set at 128² (8 train, 4 test pairs)."""
    from fastcgan.data import ensure_synthetic_aligned_dataset

    root = str(tmp_path_factory.mktemp("pairs") / "d")
    return ensure_synthetic_aligned_dataset(root, size=128, n_train=8, n_test=4)


def _batch(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = cfg.data.crop_size
    return {k: torch.rand(cfg.data.batch_size, 3, s, s, generator=g) * 2 - 1 for k in ("A", "B")}


# --------------------------------------------------------------------------------------------
# config and CLI
# --------------------------------------------------------------------------------------------
def test_model_pix2pix_selects_the_official_defaults():
    cfg, requested = parse_config(["--model", "pix2pix", "--dataset", "synthetic"])
    assert cfg.preset == "pix2pix" and requested == {"recipe": "pix2pix", "dataset": "synthetic"}
    m, d, o, lo = cfg.model, cfg.data, cfg.optim, cfg.loss
    assert (m.recipe, m.netG, m.netD, m.norm, m.use_dropout, m.ngf, m.ndf) == (
        "pix2pix", "unet_256", "basic", "batch", True, 64, 64)
    assert (lo.gan_mode, lo.lambda_L1, lo.pool_size) == ("vanilla", 100.0, 0)
    assert (d.load_size, d.crop_size, d.flip, d.batch_size, d.direction) == (286, 256, True, 1, "AtoB")
    assert (o.lr, o.beta1, o.beta2, o.epochs, o.epochs_decay, o.lr_policy) == (
        2e-4, 0.5, 0.999, 100, 100, "linear")
    # Flags override the preset; without --model the default stays CycleGAN.
    cfg, _ = parse_config(
        ["--model", "pix2pix", "--dataset", "synthetic", "--direction", "BtoA", "--lambda-L1", "10"]
    )
    assert (cfg.data.direction, cfg.loss.lambda_L1) == ("BtoA", 10.0)
    # The official --no_dropout turns pix2pix's dropout off (there was no flag for it).
    cfg, requested = parse_config(["--model", "pix2pix", "--dataset", "synthetic", "--no-dropout"])
    assert cfg.model.use_dropout is False and requested["use_dropout"] is False
    cfg, _ = parse_config(["--dataset", "synthetic"])
    assert (cfg.preset, cfg.model.recipe) == ("cyclegan", "cyclegan")
    cfg, _ = parse_config(["--preset", "pix2pix", "--dataset", "synthetic"])
    assert cfg.model.recipe == "pix2pix"


@pytest.mark.parametrize(
    "argv,flag", [(["--direction", "AB"], "--direction"), (["--lambda-L1", "-1"], "--lambda-L1")]
)
def test_bad_pix2pix_flags(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(["--model", "pix2pix", "--dataset", "synthetic", *argv])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_pix2pix_config_errors():
    with pytest.raises(ConfigError, match="wgangp"):
        TrainConfig.from_preset("pix2pix", dataset="synthetic", gan_mode="wgangp")
    with pytest.raises(ConfigError, match="direction"):
        TrainConfig.from_preset("pix2pix", dataset="synthetic", direction="both")


def test_networks_and_recipe_shape():
    cfg = p2p(ngf=4, ndf=4)
    recipe = get_recipe("pix2pix")
    torch.manual_seed(0)
    nets = recipe.networks(cfg)
    assert set(nets) == {"G", "D"} and recipe.exports == {"AtoB": "G"} and recipe.pools(cfg) == {}
    first_conv = next(m for m in nets["D"].modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 6  # the conditional D sees cat(input, image)
    assert nets["G"].config["bn_inference"] == "per_image"
    assert [p.name for p in recipe.phases] == ["forward", "discriminator", "generator"]
    assert recipe.loss_names(cfg) == ("G_GAN", "G_L1", "G", "D_real", "D_fake", "D")


# --------------------------------------------------------------------------------------------
# the step
# --------------------------------------------------------------------------------------------
def _official_step(G, D, opt_G, opt_D, A, B, lambda_L1):
    """The documented official pix2pix optimize_parameters, written out with plain torch calls:
    forward; D update (fake detached, then real; BCE-with-logits; x0.5); G update against the
    updated D with D's parameters frozen (BCE to real + lambda_L1 * L1)."""
    bce = nn.BCEWithLogitsLoss()
    fake = G(A)
    for p in D.parameters():
        p.requires_grad_(True)
    opt_D.zero_grad()
    pred_fake = D(torch.cat((A, fake), 1).detach())
    pred_real = D(torch.cat((A, B), 1))
    d_fake = bce(pred_fake, torch.zeros_like(pred_fake))
    d_real = bce(pred_real, torch.ones_like(pred_real))
    loss_D = (d_fake + d_real) * 0.5
    loss_D.backward()
    opt_D.step()
    for p in D.parameters():
        p.requires_grad_(False)
    opt_G.zero_grad()
    pred = D(torch.cat((A, fake), 1))
    g_gan = bce(pred, torch.ones_like(pred))
    g_l1 = F.l1_loss(fake, B) * lambda_L1
    loss_G = g_gan + g_l1
    loss_G.backward()
    opt_G.step()
    for p in D.parameters():
        p.requires_grad_(True)
    return {"G_GAN": g_gan, "G_L1": g_l1, "G": loss_G, "D_real": d_real, "D_fake": d_fake, "D": loss_D}


def test_step_matches_the_official_arithmetic():
    """Two steps of the recipe (official numerics: --faithful) == two official steps on copies of
    the same networks, the same dropout draws: losses, every weight, BatchNorm running stat and
    Adam moment, bit for bit."""
    cfg = p2p(ngf=4, ndf=4, faithful=True, kernels="torch")
    torch.manual_seed(0)
    st = build_state(cfg)
    G, D = copy.deepcopy(st.nets["G"]), copy.deepcopy(st.nets["D"])
    o = cfg.optim
    opt_G = torch.optim.Adam(G.parameters(), lr=o.lr, betas=(o.beta1, o.beta2))
    opt_D = torch.optim.Adam(D.parameters(), lr=o.lr, betas=(o.beta1, o.beta2))
    step = build_step(st, cfg)
    for seed in (1, 2):
        batch = _batch(cfg, seed)
        torch.manual_seed(10 + seed)  # the dropout draws
        ours = step(batch)
        torch.manual_seed(10 + seed)
        ref = _official_step(G, D, opt_G, opt_D, batch["A"], batch["B"], cfg.loss.lambda_L1)
        for k, v in ref.items():
            assert torch.equal(ours[k], v.detach()), k
    for name, ref_net in (("G", G), ("D", D)):
        sd, ref_sd = st.nets[name].state_dict(), ref_net.state_dict()
        assert sd.keys() == ref_sd.keys()
        for k in sd:
            assert torch.equal(sd[k], ref_sd[k]), f"{name}.{k}"
    for ours_opt, ref_opt in ((st.optimizers["G"], opt_G), (st.optimizers["D"], opt_D)):
        for a, b in zip(ours_opt.state.values(), ref_opt.state.values()):
            assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


class _Run:
    """A StepRun over given modules (eager, fp32, no pools)."""

    def __init__(self, nets):
        self.nets = nets

    def net(self, name):
        return self.nets[name]

    frozen = net

    def autocast(self):
        return contextlib.nullcontext()

    def fmt(self, x):
        return x


class _ZeroD(nn.Module):
    def forward(self, x):
        return x[:, :1, ::2, ::2] * 0


def test_phase_losses_on_known_values():
    """D scores every patch 0 (p = 1/2): each BCE term is ln 2; the fake is the target + 0.5
    everywhere: L1 = 0.5, weighted 100 -> 50."""
    recipe = get_recipe("pix2pix")
    cfg = p2p(ngf=4, ndf=4)
    A, B = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), -0.25)
    run = _Run({"G": lambda a: B + 0.5, "D": _ZeroD()})
    batch, carry, losses = {"A": A, "B": B}, {}, {}
    for ph in recipe.phases:
        loss, ls, carry = ph.forward(run, batch, carry, cfg)
        losses.update(ls)
    ln2 = math.log(2)
    expect = {"D_real": ln2, "D_fake": ln2, "D": ln2, "G_GAN": ln2, "G_L1": 50.0, "G": 50.0 + ln2}
    for k, v in expect.items():
        assert losses[k].item() == pytest.approx(v, rel=1e-6), k
    assert loss is losses["G"]


def test_compiled_step_matches_eager():
    """torch.compile (fullgraph, aot_eager) of each phase -- including the generator's backward
    through the fake that the separately compiled forward phase made -- gives the eager numbers:
    losses of two steps and every gradient (dropout and BatchNorm as in training)."""
    res = {}
    for comp in (False, True):
        cfg = p2p(ngf=4, ndf=4, compile=comp, compile_backend="aot_eager")
        torch.manual_seed(0)
        st = build_state(cfg)
        step = build_step(st, cfg)
        assert set(step.exe.compiled) == ({"forward", "discriminator", "generator"} if comp else set())
        torch.manual_seed(5)
        out = step(_batch(cfg))
        grads = {f"{n}.{k}": p.grad.clone() for n, net in st.nets.items() for k, p in net.named_parameters()}
        out2 = step(_batch(cfg, seed=2))
        res[comp] = (out, grads, out2, {k: v.clone() for k, v in st.nets["G"].state_dict().items()})
    for k in res[False][0]:
        torch.testing.assert_close(res[True][0][k], res[False][0][k], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res[True][2][k], res[False][2][k], rtol=1e-5, atol=1e-5)
    for k in res[False][1]:
        torch.testing.assert_close(res[True][1][k], res[False][1][k], rtol=1e-5, atol=1e-6)
    for k in res[False][3]:  # weights after two updates, BatchNorm running statistics included
        torch.testing.assert_close(res[True][3][k], res[False][3][k], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# training runs
# --------------------------------------------------------------------------------------------
def test_short_run_beats_doing_nothing(tmp_path):
    """300 steps (U-Net 128, ngf/ndf 8, 32 training pairs; ~25 s on one core) learn the A -> B
    rendering: the test-set L1 to the true target is a fraction of the input-as-output L1
    (measured: 0.071 vs 0.641, PSNR 17.5 vs 3.5 dB, SSIM 0.66 vs 0.30)."""
    from fastcgan.evaluate import evaluate

    cfg = p2p(tmp_path, ngf=8, ndf=8, max_steps=300, synthetic_train=32, synthetic_test=8, log_every=50)
    s = train(cfg)
    ev = evaluate(s["run_dir"], s["dataroot"], device="cpu")["AtoB"]
    assert ev["n"] == 8 and ev["direction"] == "AtoB"
    assert ev["l1"] < 0.25 * ev["identity_l1"], ev
    assert ev["psnr"] > ev["identity_psnr"] + 8 and ev["ssim"] > ev["identity_ssim"] + 0.2, ev


def _final(run_dir):
    return load_checkpoint(latest_checkpoint(str(run_dir)))


@pytest.mark.parametrize("data_on_gpu", [False, True], ids=["loader", "device-bank"])
def test_resume_is_exact(tmp_path, pairs, data_on_gpu):
    """2N steps straight == N steps, resume, N steps (N = 5 crosses the 8-pair epoch): weights,
    BatchNorm statistics, Adam moments, LR schedule, RNG (dropout) and data position bitwise."""
    n = 5

    def cfg(name, **kw):
        return p2p(tmp_path, ngf=4, ndf=4, dataset="folder", dataroot=pairs, name=name, epochs=1,
                   epochs_decay=2, data_on_gpu=data_on_gpu, **kw)

    straight = train(cfg("straight", max_steps=2 * n))
    train(cfg("split", max_steps=n))
    second = train(cfg("split", max_steps=2 * n, resume="auto"))
    assert (second["start_step"], second["step"]) == (n, 2 * n)
    a, b = _final(tmp_path / "straight"), _final(tmp_path / "split")
    for key in ("nets", "optimizers", "schedulers", "step", "epoch", "batch_in_epoch", "rng"):
        assert key in a
        _same(a[key], b[key], key)
    assert a["epoch"] == 1
    assert straight["final_losses"] == second["final_losses"]


def _same(a, b, path):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_data_helpers_for_pairs(pairs):
    from fastcgan.train.data import build_dataset, dataset_nbytes, sample_images

    cfg = p2p(ngf=4, ndf=4, dataset="folder", dataroot=pairs, n_samples=3)
    ds = build_dataset(cfg, pairs)
    assert len(ds) == 8 and dataset_nbytes(cfg, ds) == 8 * 6 * 128 * 128
    imgs = sample_images(cfg, pairs)
    assert imgs["A"].shape == imgs["B"].shape == (3, 3, 128, 128)
    # B is the target of A: the same test scene in the other rendering (light vs dark background).
    assert imgs["A"].float().mean() > imgs["B"].float().mean() + 50
    flipped = sample_images(cfg.replace(direction="BtoA"), pairs)
    assert torch.equal(flipped["A"], imgs["B"]) and torch.equal(flipped["B"], imgs["A"])
    # --max-dataset-size keeps the first pairs (sorted by path) for training, every test pair
    few = cfg.replace(max_dataset_size=5)
    assert build_dataset(few, pairs).AB_paths == ds.AB_paths[:5]
    assert len(build_dataset(few, pairs, "test")) == 4


def test_cli_end_to_end_with_evaluation_and_onnx(tmp_path, capsys):
    """`--model pix2pix` on the built-in paired data through fastcgan.train.cli.main: trains,
    writes the one generator, evaluates it on the test pairs (L1/PSNR/SSIM via the deploy
    runtime); fastcgan-eval reads the same; the exported ONNX model (per-image BatchNorm as
    InstanceNormalization) matches PyTorch and translates like the .safetensors file."""
    from fastcgan.deploy import load, onnx_export
    from fastcgan.deploy.runtime import OrtRunner
    from fastcgan.deploy.cli import main as export_main

    from fastcgan.evaluate import main as eval_main
    from fastcgan.models import load_generator

    out = tmp_path / "runs"
    rc = train_main([
        "--model", "pix2pix", "--dataset", "synthetic", "--netG", "unet_128", "--load-size", "128",
        "--crop-size", "128", "--ngf", "4", "--ndf", "4", "--max-steps", "3", "--output-dir", str(out),
        "--name", "p", "--device", "cpu", "--no-progress", "--no-tensorboard", "--eval-every", "0",
    ])
    err = capsys.readouterr().err
    assert rc == 0, err
    run = out / "p"
    assert sorted(f for f in os.listdir(run) if f.startswith("generator_")) == ["generator_AtoB.safetensors"]
    summary = json.loads((run / "summary.json").read_text())
    ev = summary["eval"]["AtoB"]
    assert {"l1", "psnr", "ssim", "identity_l1"} <= set(ev) and ev["n"] == 50
    assert "ssim=" in err and os.path.isdir(out / "synthetic_aligned_128" / "test")
    assert os.listdir(run / "samples")

    # fastcgan-eval on the run directory: the same numbers.
    assert eval_main(["--checkpoint", str(run), "--dataroot", summary["dataroot"], "--device", "cpu",
                      "--no-fid", "--json", str(tmp_path / "e.json")]) == 0
    again = json.loads((tmp_path / "e.json").read_text())["AtoB"]
    assert again["l1"] == pytest.approx(ev["l1"], rel=1e-6)
    assert again["ssim"] == pytest.approx(ev["ssim"], rel=1e-6)
    # The input half comes from the run's config.json (here AtoB); --direction BtoA reads the other
    # half as input: doing nothing scores the same, the generator differently.
    from fastcgan.evaluate import evaluate

    flipped = evaluate(str(run), summary["dataroot"], device="cpu", direction="BtoA", max_images=8)["AtoB"]
    straight = evaluate(str(run), summary["dataroot"], device="cpu", max_images=8)["AtoB"]
    assert (flipped["direction"], straight["direction"]) == ("BtoA", "AtoB")
    assert flipped["identity_l1"] == pytest.approx(straight["identity_l1"], rel=1e-6)
    assert flipped["l1"] != pytest.approx(straight["l1"], rel=1e-3)
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"]["direction"] = "BtoA"
    (run / "config.json").write_text(json.dumps(cfg))
    from_run = evaluate(str(run), summary["dataroot"], device="cpu", max_images=8)["AtoB"]
    assert from_run["direction"] == "BtoA" and from_run["l1"] == pytest.approx(flipped["l1"], rel=1e-6)

    # ONNX export of the trained generator, verified against PyTorch by the exporter and here.
    onnx_path = tmp_path / "g.onnx"
    assert export_main([str(run), "--onnx", str(onnx_path), "--verify-sizes", "1x128x128,2x128x128"]) == 0
    G = load_generator(str(run / "generator_AtoB.safetensors")).eval()
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        ref = G(x)
    torch.testing.assert_close(OrtRunner(str(onnx_path), torch.device("cpu"))(x), ref, atol=1e-4, rtol=1e-4)
    assert "InstanceNormalization" in onnx_export.op_types(str(onnx_path))
    # The generator file records the run's --direction; the export carries it (a pix2pix model
    # evaluated or translated on pairs from its ONNX file alone reads the right half).
    from fastcgan.models import read_pairs_direction

    assert read_pairs_direction(run / "generator_AtoB.safetensors") == "AtoB"
    assert load(str(onnx_path), device="cpu").spec.pairs_direction == "AtoB"
    y_onnx = load(str(onnx_path), device="cpu").translate_batch([x[:1]])[0]
    y_st = load(str(run), device="cpu").translate_batch([x[:1]])[0]
    torch.testing.assert_close(y_onnx, y_st, atol=1e-4, rtol=1e-4)
