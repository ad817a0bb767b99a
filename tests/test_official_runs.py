"""Runs moving between the official repositories and fastcgan: their training networks (PatchGAN /
PixelGAN discriminators, CUT's PatchNCE heads, the generators) load into ours, ``--init-official DIR``
starts every network of a run from ``DIR/EPOCH_net_NAME.pth``, and ``fastcgan-export --official``
writes a generator the official code loads.

The official discriminators and ``PatchSampleF`` are re-stated here from their documented layer
order (``nn.Sequential`` of Conv2d, norm, LeakyReLU and, anti-aliased, ``Downsample``; the pixel
GAN keeps its layers in ``.net``; the heads are ``mlp_{i}`` = Linear-ReLU-Linear), so their keys
are genuine and their forward is the reference ours must reproduce with the loaded weights."""

import os

import pytest
import torch
from conftest import tiny_train_config
from test_antialias import OfficialDownsample, _OfficialCUTGenerator
from test_official_checkpoint import _norm_layer, official, randomise_bn
from torch import nn

from fastcgan.models import build_discriminator, load_official_state_dict, official_state_dict, set_bn_inference
from fastcgan.models.patchnce import PatchNCEHeads
from fastcgan.recipes import get_recipe
from fastcgan.train import train
from fastcgan.train.checkpoint import list_checkpoints, load_checkpoint
from fastcgan.train.cli import main as train_main
from fastcgan.train.config import ConfigError
from fastcgan.train.state import build_state, initial_weights

CPU = torch.device("cpu")


class OfficialNLayerDiscriminator(nn.Module):
    def __init__(self, input_nc, ndf, n_layers, norm, antialias):
        super().__init__()
        bias = norm == "instance"  # the official use_bias rule
        nl = _norm_layer(norm)
        m = [nn.Conv2d(input_nc, ndf, 4, 1 if antialias else 2, 1), nn.LeakyReLU(0.2, True)]
        m += [OfficialDownsample(ndf)] if antialias else []
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            m += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1 if antialias else 2, 1, bias=bias), nl(ndf * mult),
                  nn.LeakyReLU(0.2, True)]
            m += [OfficialDownsample(ndf * mult)] if antialias else []
        prev, mult = mult, min(2**n_layers, 8)
        m += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=bias), nl(ndf * mult), nn.LeakyReLU(0.2, True),
              nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.model = nn.Sequential(*m)

    def forward(self, x):
        return self.model(x)


class OfficialPixelDiscriminator(nn.Module):
    def __init__(self, input_nc, ndf, norm):
        super().__init__()
        bias = norm == "instance"
        self.net = nn.Sequential(nn.Conv2d(input_nc, ndf, 1), nn.LeakyReLU(0.2, True),
                                 nn.Conv2d(ndf, 2 * ndf, 1, bias=bias), _norm_layer(norm)(2 * ndf),
                                 nn.LeakyReLU(0.2, True), nn.Conv2d(2 * ndf, 1, 1, bias=bias))

    def forward(self, x):
        return self.net(x)


class OfficialPatchSampleF(nn.Module):  # after its data-dependent create_mlp
    def __init__(self, channels, nc):
        super().__init__()
        for i, c in enumerate(channels):
            setattr(self, f"mlp_{i}", nn.Sequential(nn.Linear(c, nc), nn.ReLU(), nn.Linear(nc, nc)))


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch,n_layers,norm,antialias", [
    ("basic", 3, "instance", False), ("basic", 3, "instance", True), ("n_layers", 1, "batch", False),
    ("n_layers", 4, "batch", True), ("n_layers", 2, "none", False), ("pixel", 3, "instance", False),
    ("pixel", 3, "batch", False),
], ids=lambda v: str(v))
def test_official_discriminators_load_and_save(arch, n_layers, norm, antialias, tmp_path):
    torch.manual_seed(0)
    if arch == "pixel":
        ref = OfficialPixelDiscriminator(5, 4, norm)
    else:
        ref = OfficialNLayerDiscriminator(5, 4, 3 if arch == "basic" else n_layers, norm, antialias)
    randomise_bn(ref)
    torch.save(ref.state_dict(), tmp_path / "latest_net_D.pth")
    with torch.device("meta"):  # the check needs no memory: the meta network says what the file must hold
        meta = build_discriminator(arch, 5, ndf=4, n_layers=n_layers, norm=norm, antialias=antialias)
    sd = load_official_state_dict(tmp_path / "latest_net_D.pth", meta, norm=norm)
    ours = build_discriminator(arch, 5, ndf=4, n_layers=n_layers, norm=norm, antialias=antialias, backend="torch")
    ours.load_state_dict(sd, strict=True)
    x = torch.rand(2, 5, 72, 68) * 2 - 1
    for mode in ("train", "eval"):  # batch statistics, then the running ones
        getattr(ref, mode)(), getattr(ours, mode)()
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    back = official_state_dict(ours)  # and back, in the official key order (its strict load takes it)
    assert list(back) == list(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


def test_official_patchnce_heads_load_and_save():
    torch.manual_seed(1)
    ref = OfficialPatchSampleF((3, 8, 16, 16, 16), 32)
    with torch.device("meta"):
        meta = PatchNCEHeads((3, 8, 16, 16, 16), 32)
    ours = PatchNCEHeads((3, 8, 16, 16, 16), 32)
    ours.load_state_dict(load_official_state_dict(ref.state_dict(), meta), strict=True)
    for i, mlp in enumerate(ours.mlps):
        x = torch.randn(7, mlp[0].in_features)
        torch.testing.assert_close(mlp(x), getattr(ref, f"mlp_{i}")(x))
    assert _equal(official_state_dict(ours), ref.state_dict())
    with pytest.raises(ValueError, match="mlp_1.0.weight has shape"):
        load_official_state_dict(OfficialPatchSampleF((3, 9, 16, 16, 16), 32).state_dict(), meta)
    with pytest.raises(ValueError, match="missing \\['mlp_4.0.weight'"):
        load_official_state_dict(OfficialPatchSampleF((3, 8, 16, 16), 32).state_dict(), meta)


def test_official_discriminator_errors_name_the_key():
    with torch.device("meta"):
        meta = build_discriminator("basic", 3, ndf=4, antialias=True)
    ref = OfficialNLayerDiscriminator(3, 4, 3, "instance", True).state_dict()
    strided = OfficialNLayerDiscriminator(3, 4, 3, "instance", False).state_dict()
    with pytest.raises(ValueError, match="not an official NLayerDiscriminator \\(basic, norm='instance'\\)"):
        load_official_state_dict(strided, meta)
    bad = dict(ref, **{"model.6.filt": ref["model.6.filt"] * 2})
    with pytest.raises(ValueError, match="model.6.filt is not the official blur filter"):
        load_official_state_dict(bad, meta)
    with pytest.raises(TypeError, match="not for UdacityDiscriminator"):
        load_official_state_dict(ref, build_discriminator("udacity", 3, ndf=4))


def _official_cyclegan_folder(folder, input_nc, output_nc, epoch="latest", ngf=4, ndf=4):
    """What an official CycleGAN run saves: G_A (A -> B), G_B (B -> A), D_A (judges domain B: G_A's
    output, ``define_D(output_nc)``), D_B (judges domain A)."""
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(3)
    nets = {
        "G_A": official("resnet_6blocks", ngf, input_nc=input_nc, output_nc=output_nc),
        "G_B": official("resnet_6blocks", ngf, input_nc=output_nc, output_nc=input_nc),
        "D_A": OfficialNLayerDiscriminator(output_nc, ndf, 3, "instance", False),
        "D_B": OfficialNLayerDiscriminator(input_nc, ndf, 3, "instance", False),
    }
    for name, net in nets.items():
        torch.save(net.state_dict(), os.path.join(folder, f"{epoch}_net_{name}.pth"))
    return nets


def test_cyclegan_networks_start_from_the_official_run(tmp_path):
    """Grey A (1 channel), colour B: the official D_A has 3 input channels, so it can only be our D_B
    (which judges domain B) -- a swapped mapping fails on its shapes, not only its values."""
    ref = _official_cyclegan_folder(tmp_path / "official", 1, 3, epoch="15")
    cfg = tiny_train_config(None, tmp_path, input_nc=1, output_nc=3, lambda_identity=0.0,
                            init_official=str(tmp_path / "official"), init_official_epoch="15")
    recipe = get_recipe("cyclegan")
    state = build_state(cfg, CPU, recipe, initial_weights(cfg, recipe))
    x_a, x_b = torch.rand(2, 1, 32, 28) * 2 - 1, torch.rand(2, 3, 32, 28) * 2 - 1
    with torch.no_grad():
        pairs = (("G_AB", "G_A", x_a), ("G_BA", "G_B", x_b), ("D_B", "D_A", x_b), ("D_A", "D_B", x_a))
        for ours, official_name, x in pairs:
            torch.testing.assert_close(state.nets[ours].eval()(x), ref[official_name].eval()(x), atol=1e-5,
                                       rtol=1e-5, msg=f"{ours} vs official {official_name}")
    assert all(not s for opt in state.optimizers.values() for s in opt.state.values())  # fresh optimizers


def test_cut_and_pix2pix_networks_start_from_the_official_run(tmp_path):
    torch.manual_seed(4)
    cut = tiny_train_config(None, tmp_path, preset="cut", netG="resnet_6blocks", ngf=4, ndf=4, netF_nc=16,
                            init_official=str(tmp_path / "cut"))
    os.makedirs(tmp_path / "cut")
    ref = {"G": _OfficialCUTGenerator(4, 6, True, True), "D": OfficialNLayerDiscriminator(3, 4, 3, "instance", True),
           "F": OfficialPatchSampleF((3, 8, 16, 16, 16), 16)}
    for name, net in ref.items():
        torch.save(net.state_dict(), tmp_path / "cut" / f"latest_net_{name}.pth")
    recipe = get_recipe("cut")
    state = build_state(cut, CPU, recipe, initial_weights(cut, recipe))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(state.nets["G"].eval()(x), ref["G"].model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state.nets["D"].eval()(x), ref["D"](x), atol=1e-5, rtol=1e-5)
    assert _equal(official_state_dict(state.nets["F"]), ref["F"].state_dict())

    os.makedirs(tmp_path / "p2p")  # pix2pix: a U-Net and a conditional (6-channel) BatchNorm PatchGAN
    p2p = tiny_train_config(None, tmp_path, preset="pix2pix", netG="unet_128", ngf=2, ndf=4, load_size=128,
                            crop_size=128, init_official=str(tmp_path / "p2p"))
    ref = {"G": official("unet_128", 2, norm="batch", use_dropout=True),
           "D": randomise_bn(OfficialNLayerDiscriminator(6, 4, 3, "batch", False))}
    for name, net in ref.items():
        torch.save(net.state_dict(), tmp_path / "p2p" / f"latest_net_{name}.pth")
    recipe = get_recipe("pix2pix")
    state = build_state(p2p, CPU, recipe, initial_weights(p2p, recipe))
    x = torch.rand(2, 6, 128, 128) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(state.nets["D"].eval()(x), ref["D"].eval()(x), atol=1e-5, rtol=1e-5)
        g = set_bn_inference(state.nets["G"].eval(), "running")  # the run's G: per-image statistics
        torch.testing.assert_close(g(x[:, :3]), ref["G"].eval()(x[:, :3]), atol=1e-5, rtol=1e-5)


def _base(tmp_path, *more):
    return ["--dataset", "synthetic", "--dataroot", str(tmp_path / "data"), "--load-size", "32", "--crop-size", "32",
            "--ngf", "4", "--ndf", "4", "--netG", "resnet_6blocks", "--device", "cpu", "--output-dir",
            str(tmp_path / "out"), "--max-steps", "1", "--no-tensorboard", "--no-progress", "--eval-every", "0",
            "--name", "new", *more]


def test_cli_continues_an_official_run_and_resume_keeps_it(tmp_path, capsys):
    ref = _official_cyclegan_folder(tmp_path / "official", 3, 3)
    argv = _base(tmp_path, "--init-official", str(tmp_path / "official"), "--checkpoint-every", "1")
    assert train_main(argv) == 0
    out = capsys.readouterr().err
    assert "continuing the official run" in out and "D_B <- latest_net_D_A.pth" in out
    ckpt = load_checkpoint(list_checkpoints(str(tmp_path / "out" / "new"))[-1])
    assert ckpt["config"]["model"]["init_official"] == str(tmp_path / "official")
    assert not _equal(ckpt["nets"]["D_B"], ref["D_A"].state_dict())  # one step trained from it
    # A relaunch repeating the flags resumes; another folder is refused (the checkpoint decides).
    assert train_main(argv[:argv.index("--max-steps")] + ["--max-steps", "2"]
                      + argv[argv.index("--max-steps") + 2:] + ["--resume", "auto"]) == 0
    capsys.readouterr()
    _official_cyclegan_folder(tmp_path / "other", 3, 3)
    assert train_main(_base(tmp_path, "--init-official", str(tmp_path / "other"), "--resume", "auto")) == 2
    assert "init_official" in capsys.readouterr().err


def test_cli_errors_name_the_flag_and_write_nothing(tmp_path, capsys):
    folder = tmp_path / "official"
    _official_cyclegan_folder(folder, 3, 3)
    nan_dir = tmp_path / "nan"
    _official_cyclegan_folder(nan_dir, 3, 3)
    sd = torch.load(nan_dir / "latest_net_D_B.pth")
    sd["model.0.weight"][0] = float("nan")
    torch.save(sd, nan_dir / "latest_net_D_B.pth")
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "out" / "new").mkdir(parents=True)
    inside = tmp_path / "out" / "new" / "official"
    _official_cyclegan_folder(inside, 3, 3)
    cases = [
        (["--init-official", str(folder), "--init-official-epoch", "7"],
         "no file 7_net_G_A.pth, 7_net_G_B.pth, 7_net_D_A.pth, 7_net_D_B.pth"),
        (["--init-official", str(folder), "--model", "pix2pix", "--netG", "resnet_6blocks"],
         "no file latest_net_G.pth, latest_net_D.pth (--model pix2pix trains G, D"),
        (["--init-official", str(folder), "--norm", "batch"], "not the official G_A of this run's options"),
        (["--init-official", str(folder), "--n-layers-D", "2", "--netD", "n_layers"],
         "latest_net_D_A.pth: not the official D_A"),
        (["--init-official", str(folder), "--netD", "udacity"], "not for UdacityDiscriminator"),
        (["--init-official", str(tmp_path / "file")], "not a folder"),
        (["--init-official", str(tmp_path / "nope")], "not a folder"),
        (["--init-official", str(nan_dir)], "non-finite weights"),
        (["--init-official", str(inside)], "inside the run directory"),
        (["--init-official", str(folder), "--init-generator", f"AtoB={tmp_path}"], "or --init-generator, not both"),
        (["--init-official", str(folder), "--init-official-epoch", "../x"], "latest, an epoch number or iter_N"),
        (["--init-official-epoch", "5"], "which is not given"),
    ]
    for argv, words in cases:
        assert _exit_code(_base(tmp_path, *argv)) == 2, argv
        err = capsys.readouterr().err
        assert "--init-official" in err and words in err, (argv, err)
        assert os.listdir(tmp_path / "out" / "new") == ["official"]  # nothing written
        assert not os.path.exists(tmp_path / "data"), argv  # not even the built-in data


def _exit_code(argv):
    """The CLI's exit status: config errors found while starting return 2, flag errors (argparse,
    config validation) exit with 2."""
    try:
        return train_main(argv)
    except SystemExit as e:
        return e.code


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="init_official_epoch"):
        tiny_train_config(init_official="/x", init_official_epoch="latest/../../y")
    with pytest.raises(ConfigError, match="init_official .*must be a folder"):
        tiny_train_config(init_official="")
    assert tiny_train_config(init_official="/x", init_official_epoch="iter_2000").model.init_official == "/x"


@pytest.mark.parametrize("at_start", [True, False], ids=["cyclegan", "cut"])
@pytest.mark.parametrize("done", [0, 30, 98, 99, 100, 101, 150, 199])
def test_the_documented_schedule_continues_an_official_one(done, at_start):
    """docs/from-official.md: an official linear run (n + d epochs) continued after ``done`` epochs
    (its ``--epoch_count done+1``) is ``--epochs n-done --epochs-decay d`` while done < n, else
    ``--epochs 1 --epochs-decay n+d-done-1 --lr lr*(n+d-done)/(d+1)``: the same LR every epoch and as
    many epochs, whether the schedule steps at the start of each epoch (the CycleGAN repository: its
    epoch e of the continuation runs at lambda_rule(e + 1)) or at the end (CUT's: lambda_rule(e))."""
    from fastcgan.train.state import LinearDecay

    n, d, lr, k = 100, 100, 2e-4, int(at_start)
    official = [lr * (1 - max(0, e + k + done + 1 - n) / (d + 1)) for e in range(n + d - done)]  # its lambda_rule
    if done < n:
        epochs, decay, lr2 = n - done, d, lr
    else:
        epochs, decay, lr2 = 1, n + d - done - 1, lr * (n + d - done) / (d + 1)
    ours = [lr2 * LinearDecay(epochs, decay)(e + k) for e in range(epochs + decay)]
    assert len(ours) == len(official)
    assert ours == pytest.approx(official, rel=1e-12, abs=1e-18)


def test_compressed_torch_archives_are_refused_before_loading(tmp_path):
    """torch.load inflates deflated zip members in memory: a few KB would claim MBs (GBs from MBs)
    before any shape is checked. torch.save never compresses; such files are refused unread, as
    official networks, training checkpoints and --init-official folders."""
    import zipfile

    from fastcgan.models import load_official_generator
    from fastcgan.train.checkpoint import CheckpointError, checkpoint_config

    def deflate(src, dst):
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for info in zin.infolist():
                z.writestr(info.filename, zin.read(info.filename))

    ref = _official_cyclegan_folder(tmp_path / "official", 3, 3)
    deflate(tmp_path / "official" / "latest_net_G_A.pth", tmp_path / "g.pth")
    assert torch.load(tmp_path / "g.pth", weights_only=True).keys() == ref["G_A"].state_dict().keys()  # torch: fine
    with pytest.raises(ValueError, match="compressed member"):
        load_official_generator(tmp_path / "g.pth", arch="resnet_6blocks")
    os.replace(tmp_path / "g.pth", tmp_path / "official" / "latest_net_G_A.pth")
    cfg = tiny_train_config(None, tmp_path, init_official=str(tmp_path / "official"))
    with pytest.raises(ConfigError, match="G_A.pth: not an archive torch.save writes \\(compressed member"):
        initial_weights(cfg, get_recipe("cyclegan"))
    train(tiny_train_config(tmp_path / "data", tmp_path, max_steps=1, checkpoint_every=1),
          install_signal_handlers=False)
    ckpt = list_checkpoints(str(tmp_path / "run"))[-1]
    deflate(ckpt, tmp_path / "c.ckpt")
    for read in (load_checkpoint, checkpoint_config):
        with pytest.raises(CheckpointError, match="compressed member"):
            read(str(tmp_path / "c.ckpt"))


@pytest.mark.parametrize("case", ["resnet_instance", "unet_batch", "cut_antialiased", "colorization"])
def test_export_official_is_what_the_official_network_loads(case, tmp_path, capsys):
    """``fastcgan-export RUN --official latest_net_G.pth``: the official module (re-stated) takes the
    file with its strict load_state_dict and computes our generator's output."""
    from fastcgan.deploy.cli import main as export_main
    from fastcgan.models import build_generator, save_generator

    torch.manual_seed(6)
    if case == "resnet_instance":
        ours, ref = build_generator("resnet_6blocks", ngf=4), official("resnet_6blocks", 4)
    elif case == "unet_batch":
        ours = build_generator("unet_128", ngf=2, norm="batch", use_dropout=True, bn_inference="running")
        ref = official("unet_128", 2, norm="batch", use_dropout=True)
        randomise_bn(ours)
    elif case == "cut_antialiased":
        ours, ref = build_generator("resnet_6blocks", ngf=4, antialias=True, antialias_up=True), \
            _OfficialCUTGenerator(4, 6, True, True)
    else:
        ours = build_generator("resnet_6blocks", 1, 2, ngf=4, color_space="lab")
        ref = official("resnet_6blocks", 4, input_nc=1, output_nc=2)
    save_generator(ours, tmp_path / "g.safetensors")
    out = tmp_path / "official" / "latest_net_G.pth"
    assert export_main([str(tmp_path / "g.safetensors"), "--official", str(out), "--verify-sizes", "1x128x128"]) == 0
    assert "official: wrote" in capsys.readouterr().out
    ref.load_state_dict(torch.load(out, weights_only=True), strict=True)
    ref.eval()
    x = torch.rand(2, 1 if case == "colorization" else 3, 128, 128) * 2 - 1
    with torch.no_grad():
        got = ours.eval().net(x) if case == "colorization" else ours.eval()(x)
        want = ref.model(x) if case == "cut_antialiased" else ref(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # an existing file is kept without --overwrite; a generator the official code lacks is refused
    assert export_main([str(tmp_path / "g.safetensors"), "--official", str(out)]) == 2
    save_generator(build_generator("udacity", ngf=4), tmp_path / "u.safetensors")
    assert export_main([str(tmp_path / "u.safetensors"), "--official", str(tmp_path / "u" / "g.pth")]) == 2
    assert "no udacity generator" in capsys.readouterr().err and not os.path.exists(tmp_path / "u")
    with pytest.raises(SystemExit):
        export_main([str(tmp_path / "g.safetensors"), "--official", str(tmp_path / "g.onnx")])


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's about quantized / sparse tensors
def test_weights_no_network_has_are_refused(tmp_path):
    """Complex, quantized or sparse tensors are no network's weights; a float64 that is finite but
    overflows the network's float32 is non-finite there (checked as the network will hold it)."""
    ref = _official_cyclegan_folder(tmp_path / "official", 3, 3)
    sd = ref["D_B"].state_dict()
    for what, bad in (("complex64", sd["model.0.weight"].to(torch.complex64)),
                      ("qint8", torch.quantize_per_tensor(sd["model.0.weight"], 0.1, 0, torch.qint8)),
                      ("sparse_coo", sd["model.0.weight"].to_sparse())):
        torch.save(dict(sd, **{"model.0.weight": bad}), tmp_path / "d.pth")
        with pytest.raises(ValueError, match="structure names torch"):  # the file: refused before loading
            load_official_state_dict(tmp_path / "d.pth", build_discriminator("basic", 3, ndf=4))
        with pytest.raises(ValueError, match=f"holds torch.{what}|holds .*{what}"):  # a state dict in memory
            load_official_state_dict(dict(sd, **{"model.0.weight": bad}), build_discriminator("basic", 3, ndf=4))
    huge = sd["model.0.weight"].double()
    huge[0, 0, 0, 0] = 1e300
    torch.save(dict(sd, **{"model.0.weight": huge}), tmp_path / "official" / "latest_net_D_B.pth")
    cfg = tiny_train_config(None, tmp_path, init_official=str(tmp_path / "official"))
    with pytest.raises(ConfigError, match="latest_net_D_B.pth: non-finite weights in \\['stem.weight'\\] "
                                          "\\(as torch.float32\\)"):
        initial_weights(cfg, get_recipe("cyclegan"))


@pytest.mark.parametrize("aa,up,words", [(True, True, "the official CUT's layout)"),
                                         (True, False, "with no_antialias_up"), (False, True, "with no_antialias)")])
def test_export_official_names_the_cut_layout(aa, up, words, tmp_path, capsys):
    from fastcgan.deploy.cli import main as export_main
    from fastcgan.models import build_generator, save_generator

    save_generator(build_generator("resnet_6blocks", ngf=4, antialias=aa, antialias_up=up), tmp_path / "g.safetensors")
    assert export_main([str(tmp_path / "g.safetensors"), "--official", str(tmp_path / "g.pth"),
                        "--verify-sizes", "1x32x32"]) == 0
    assert words in capsys.readouterr().out


def test_checkpoints_that_are_not_trees_or_hold_large_pickles_are_refused(tmp_path):
    """A container referenced twice per level makes every walk over the payload exponential
    (``L = [L, L]`` nested 23 deep, 1.7 KB on disk, took 4.6 GB and 139 s) and a cyclic one recurse
    forever; a pickle of MBs builds GBs of objects. Refused before anything walks or unpickles them;
    a container shared a few times (pickle keeps sharing) is fine."""
    from fastcgan.models.torch_files import MAX_PICKLE_BYTES, torch_file_problem
    from fastcgan.train.checkpoint import CheckpointError

    train(tiny_train_config(tmp_path / "data", tmp_path, max_steps=1, checkpoint_every=1),
          install_signal_handlers=False)
    payload = torch.load(list_checkpoints(str(tmp_path / "run"))[-1], weights_only=True)
    shared = []
    for _ in range(30):
        shared = [shared, shared]
    cyclic = []
    cyclic.append(cyclic)
    for extra in (shared, cyclic):
        torch.save(dict(payload, extra={"x": extra}), tmp_path / "bad.ckpt")
        with pytest.raises(CheckpointError, match="nested deeper than 64 .* or over 1,000,000 containers"):
            load_checkpoint(str(tmp_path / "bad.ckpt"))
    common = {"betas": [0.5, 0.999]}
    torch.save(dict(payload, extra={"a": common, "b": common}), tmp_path / "shared.ckpt")
    with pytest.raises(CheckpointError, match="metadata"):  # past the structure checks, to the digest
        load_checkpoint(str(tmp_path / "shared.ckpt"))
    torch.save({"x": list(range(MAX_PICKLE_BYTES // 4))}, tmp_path / "big.pth")
    assert "its structure" in torch_file_problem(tmp_path / "big.pth")
