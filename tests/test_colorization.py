"""Colorization (``--model colorization``): the L*a*b* conversions against skimage's numbers, the
deployable RGB -> RGB colorizer, the dataset and the recipe's device-side split, config errors,
a short run that beats the grey baseline, exact resume, and the generator through ONNX.

Reference values: ``skimage.color.rgb2lab`` / ``lab2rgb`` (scikit-image 0.25.2, what the official
colorization dataset and model call), printed to 6 decimals; fastcgan matched them to 6e-14 in
float64 when they were taken."""

import json
import os

import pytest
import torch
from conftest import tiny_train_config

from fastcgan.color import AB_SCALE, L_SCALE, decolorize, lab_to_rgb, lightness, model_to_lab, rgb_to_lab, rgb_to_model

pytestmark = pytest.mark.usefixtures("one_thread")

# sRGB in [0, 1] -> skimage.color.rgb2lab
RGB = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0], [0.5, 0.5, 0.5], [0.2, 0.4, 0.6],
       [0.9, 0.7, 0.1], [0.01, 0.02, 0.03], [0.04, 0.04045, 0.05], [0.3, 0.1, 0.8], [0.75, 0.5, 0.25]]
LAB_OF_RGB = [
    [53.240588, 80.092308, 67.202751], [87.735099, -86.18303, 83.179703], [32.295673, 79.185591, -107.8573],
    [100.0, -0.002455, 0.004653], [0.0, 0.0, 0.0], [53.388965, -0.001468, 0.002784],
    [42.008001, -0.154041, -32.842897], [75.36206, 6.233625, 74.406292], [1.300054, -0.31235, -1.199765],
    [2.873827, 0.338641, -1.014037], [30.954342, 63.377952, -80.832571], [58.7767, 18.584326, 43.798839],
]
# L*a*b* -> skimage.color.lab2rgb (out-of-gamut colours clipped; [10, 0, 100] and [5, -3, 50] clip z at 0)
LAB = [[50, 0, 0], [75, 20, -30], [30, 60, 40], [90, -50, 80], [10, 0, 100], [60, 120, -120], [0, 0, 0],
       [100, 0, 0], [5, -3, 50]]
RGB_OF_LAB = [
    [0.466328, 0.466324, 0.466344], [0.761825, 0.684545, 0.940807], [0.605132, 0.0, 0.04173],
    [0.675147, 0.973641, 0.186174], [0.179191, 0.099524, 0.0], [0.856282, 0.0, 1.0], [0.0, 0.0, 0.0],
    [1.0, 0.999995, 1.0], [0.132277, 0.062855, 0.0],
]


def _as_image(rows, dtype=torch.float64):
    """(N, 3) colour rows as an (N, 3, 1, 1) batch of 1x1 images."""
    return torch.tensor(rows, dtype=dtype)[:, :, None, None]


# --------------------------------------------------------------------------------------------
# the conversions
# --------------------------------------------------------------------------------------------
def test_rgb_to_lab_matches_skimage():
    got = rgb_to_lab(_as_image(RGB))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _as_image(LAB_OF_RGB), atol=2e-6, rtol=0)
    torch.testing.assert_close(lightness(_as_image(RGB)), got[:, :1], atol=1e-12, rtol=0)


def test_lab_to_rgb_matches_skimage_with_its_clipping():
    torch.testing.assert_close(lab_to_rgb(_as_image(LAB)), _as_image(RGB_OF_LAB), atol=2e-6, rtol=0)


def test_round_trip_and_working_precision():
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 17, 9, generator=g, dtype=torch.float64)
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-9, rtol=0)
    # Low-precision input is converted in float32 (L in bf16 would move in steps of 0.5).
    lab16 = rgb_to_lab(rgb.to(torch.bfloat16))
    assert lab16.dtype == torch.float32
    torch.testing.assert_close(lab16, rgb_to_lab(rgb.to(torch.bfloat16).float()), atol=0, rtol=0)
    # channels at dim -3, any leading shape
    assert rgb_to_lab(rgb[0]).shape == (3, 17, 9) and lab_to_rgb(rgb_to_lab(rgb[0])).shape == (3, 17, 9)


def test_grey_has_no_colour_and_model_scaling_round_trips():
    grey = torch.linspace(0, 1, 11, dtype=torch.float64)[:, None, None, None].expand(-1, 3, 2, 2)
    lab = rgb_to_lab(grey)
    assert lab[:, 1:].abs().max() < 0.006  # skimage's white: a -0.0025, b 0.0047 (matrix rounding)
    assert torch.all(lab[1:, 0] > lab[:-1, 0])  # lightness increases with the grey level
    l_in, ab = rgb_to_model(grey * 2 - 1)
    assert l_in.shape == (11, 1, 2, 2) and ab.shape == (11, 2, 2, 2)
    assert l_in.min() >= -1 and l_in.max() <= 1 + 1e-9
    torch.testing.assert_close(model_to_lab(l_in, ab), lab)
    assert (L_SCALE, AB_SCALE) == (50.0, 110.0)  # the official dataset's scaling
    # decolorize: any image -> its grey (a* = b* = 0), lightness kept
    rgb = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    grey_of = decolorize(rgb)
    torch.testing.assert_close(lightness((grey_of + 1) / 2), lightness((rgb + 1) / 2), atol=1e-9, rtol=0)
    assert rgb_to_lab((grey_of + 1) / 2)[:, 1:].abs().max() < 0.006
    assert decolorize(grey_of).sub(grey_of).abs().max() < 1e-9


@pytest.mark.parametrize("value", [0.0, 0.04045, 0.0031308, 1.0], ids=["black", "srgb-knee", "low", "white"])
def test_gradients_are_finite_at_the_branch_points(value):
    """torch.where differentiates both branches; pow of a clamped argument keeps NaN out."""
    rgb = torch.full((1, 3, 2, 2), value, dtype=torch.float64, requires_grad=True)
    rgb_to_lab(rgb).sum().backward()
    assert torch.isfinite(rgb.grad).all()
    lab = torch.tensor([[value * 100, -60.0, 120.0]], dtype=torch.float64)[:, :, None, None].requires_grad_()
    lab_to_rgb(lab).sum().backward()
    assert torch.isfinite(lab.grad).all()


# --------------------------------------------------------------------------------------------
# the deployable colorizer
# --------------------------------------------------------------------------------------------
class _ConstantAB(torch.nn.Module):
    """An L -> ab 'network' predicting one colour everywhere (no parameters)."""

    input_nc, output_nc = 1, 2

    def __init__(self, a: float, b: float):
        super().__init__()
        self.ab = (a / AB_SCALE, b / AB_SCALE)

    def forward(self, l_in):
        return torch.cat([torch.full_like(l_in, v) for v in self.ab], dim=1)


def test_colorizer_keeps_the_lightness_and_ignores_the_input_colour():
    from fastcgan.models import LabColorizer

    g = torch.Generator().manual_seed(1)
    rgb = torch.rand(2, 3, 8, 12, generator=g) * 2 - 1
    grey_net = LabColorizer(_ConstantAB(0.0, 0.0))
    out = grey_net(rgb)
    assert out.shape == rgb.shape and out.dtype == rgb.dtype
    # a = b = 0: the output is the input's grey, whose L* is the input's L*
    torch.testing.assert_close(lightness((out + 1) / 2), lightness((rgb + 1) / 2), atol=0.02, rtol=0)
    assert (out[:, 0] - out[:, 1]).abs().max() < 0.01
    # only L* reaches the network: a colour image and its grey version give the same colorization
    tinted = LabColorizer(_ConstantAB(20.0, -30.0))
    torch.testing.assert_close(tinted(rgb), tinted(out), atol=2e-3, rtol=0)
    lab = rgb_to_lab((tinted(rgb).double() + 1) / 2)
    assert (lab[:, 1].mean() - 20).abs() < 2 and (lab[:, 2].mean() + 30).abs() < 2
    with pytest.raises(ValueError, match="RGB input"):
        tinted(rgb[:, :1])
    with pytest.raises(ValueError, match="input_nc=1"):
        from fastcgan.models import build_generator

        LabColorizer(build_generator("resnet_6blocks", 3, 3, ngf=4))


def test_colorizer_generator_files_round_trip(tmp_path):
    from fastcgan.models import LabColorizer, build_generator, load_generator, read_generator_config, save_generator

    G = build_generator("unet_128", 1, 2, ngf=4, norm="batch", use_dropout=True, color_space="lab",
                        bn_inference="per_image")
    assert isinstance(G, LabColorizer) and (G.input_nc, G.output_nc) == (3, 3)
    path = str(tmp_path / "g.safetensors")
    save_generator(G, path)
    cfg = read_generator_config(path)
    assert (cfg["color_space"], cfg["input_nc"], cfg["output_nc"], cfg["bn_inference"]) == ("lab", 1, 2, "per_image")
    back = load_generator(path)
    assert isinstance(back, LabColorizer)
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    G.eval()
    torch.testing.assert_close(back(x), G(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="color_space"):
        build_generator("unet_128", 1, 2, ngf=4, color_space="xyz")
    with pytest.raises(ValueError, match="input_nc=1"):
        build_generator("unet_128", 3, 3, ngf=4, color_space="lab")


# --------------------------------------------------------------------------------------------
# data and recipe
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def colour_set(tmp_path_factory):
    from fastcgan.data import ensure_synthetic_color_dataset

    return ensure_synthetic_color_dataset(str(tmp_path_factory.mktemp("c") / "d"), size=128, n_train=8, n_test=4)


def col(out=None, **kw):
    base = dict(preset="colorization", netG="unet_128", load_size=128, crop_size=128, synthetic_train=8)
    return tiny_train_config(None, out, **{**base, **kw})


def test_synthetic_colours_follow_from_lightness():
    """The built-in set is learnable exactly: every palette colour has its own L* (>= 5 apart)."""
    from fastcgan.data.synthetic import OUTLINE_B, PALETTE_B

    cols = torch.cat([torch.tensor(PALETTE_B), torch.tensor(OUTLINE_B)[None]]).double() / 255
    L = lightness(cols[:, :, None, None]).flatten().sort().values
    assert (L[1:] - L[:-1]).min() > 5, L


def test_dataset_holds_each_image_once(colour_set, tmp_path):
    from fastcgan.data import ColorizationDataset, DatasetError, collate, preload_to_device
    from fastcgan.train.data import build_dataset, dataset_nbytes, sample_images

    cfg = col(dataset="folder", dataroot=colour_set, n_samples=3)
    ds = build_dataset(cfg, colour_set)
    assert isinstance(ds, ColorizationDataset) and len(ds) == 8
    item = ds[0]
    assert item["A"].shape == (3, 128, 128) and item["A"].dtype == torch.uint8 and item["B"].shape == (0, 128, 128)
    assert collate([ds[0], ds[1]])["B"].shape == (2, 0, 128, 128)
    bank = preload_to_device(ds, "cpu")
    assert bank.A.shape == (8, 3, 128, 128) and bank.B.numel() == 0
    assert dataset_nbytes(cfg, ds) == bank.nbytes == 8 * 3 * 128 * 128
    imgs = sample_images(cfg, colour_set)
    assert imgs["A"].shape == (3, 3, 128, 128) and torch.equal(imgs["A"], imgs["B"])
    assert len(build_dataset(cfg.replace(max_dataset_size=3), colour_set)) == 3
    assert len(build_dataset(cfg.replace(max_dataset_size=3), colour_set, "test")) == 4
    # The unpaired layout (trainA/ trainB/) is named, with what to do.
    os.makedirs(tmp_path / "unpaired" / "trainA")
    with pytest.raises(DatasetError, match="colour images in train/"):
        ColorizationDataset(str(tmp_path / "unpaired"))
    with pytest.raises(TypeError, match="direction"):
        ColorizationDataset(colour_set, direction="BtoA")


def test_greyscale_images_are_named_before_training(tmp_path, caplog, capsys, monkeypatch):
    """A folder of greyscale photos trained toward a*b* = 0 (grey output) without a word; some
    greyscale files among colour ones pull the colours toward grey, also silently."""
    from PIL import Image

    from fastcgan.data import ColorizationDataset, DatasetError
    from fastcgan.train.cli import main as train_main

    train = tmp_path / "data" / "train"
    train.mkdir(parents=True)
    for i in range(3):
        Image.new("L", (40, 40), 40 * i).save(train / f"g{i}.png")
    ds = ColorizationDataset(str(tmp_path / "data"), crop_size=32, load_size=36)
    with pytest.raises(DatasetError, match="all 3 images are greyscale"):
        ds.check_usable()
    out = tmp_path / "runs"
    rc = train_main(["--model", "colorization", "--netG", "resnet_6blocks", "--dataroot", str(tmp_path / "data"),
                     "--output-dir", str(out),
                     "--crop-size", "32", "--load-size", "36", "--max-steps", "1", "--no-progress"])
    assert rc == 2 and "greyscale" in capsys.readouterr().err and not out.exists()
    Image.new("RGB", (40, 40), (200, 30, 10)).save(train / "c.jpg")
    with caplog.at_level("WARNING", logger="fastcgan.data"):
        ColorizationDataset(str(tmp_path / "data"), crop_size=32, load_size=36).check_usable()
    assert "3 of 4 images" in caplog.text and "g0.png" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fastcgan.data"):  # large folders: evenly spaced headers
        monkeypatch.setattr(ColorizationDataset, "GREYSCALE_SAMPLE", 2)
        ColorizationDataset(str(tmp_path / "data"), crop_size=32, load_size=36).check_usable()
    assert "1 of 2 sampled (of 4) images" in caplog.text


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_augment_splits_lightness_and_colour_on_the_device(colour_set, channels_last):
    from fastcgan.data import augment_pair, collate
    from fastcgan.recipes import get_recipe

    recipe = get_recipe("colorization")
    cfg = col(dataset="folder", dataroot=colour_set, load_size=136)
    ds = recipe.build_dataset(cfg, colour_set)
    raw = collate([ds[i] for i in range(3)])
    kw = dict(ds.batch_augment, channels_last=channels_last)
    out = recipe.augment_batch(raw, generator=torch.Generator().manual_seed(5), **kw)
    assert out["A"].shape == (3, 1, 128, 128) and out["B"].shape == (3, 2, 128, 128)
    assert out["A"].dtype == out["B"].dtype == torch.float32
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out["A"].is_contiguous(memory_format=fmt) and out["B"].is_contiguous(memory_format=fmt)
    # the same crop/flip as augment_pair with the same generator, then the conversion
    rgb, _ = augment_pair(raw["A"], raw["B"], generator=torch.Generator().manual_seed(5), **kw)
    l_in, ab = rgb_to_model(rgb)
    torch.testing.assert_close(out["A"], l_in)
    torch.testing.assert_close(out["B"], ab)
    assert -1 <= out["A"].min() and out["A"].max() <= 1 and out["B"].abs().max() < 1


def test_config_and_cli(capsys):
    from fastcgan.train.cli import parse_config
    from fastcgan.train.config import ConfigError

    cfg, requested = parse_config(["--model", "colorization", "--dataset", "synthetic"])
    m, lo, d = cfg.model, cfg.loss, cfg.data
    assert cfg.preset == "colorization" and requested["recipe"] == "colorization"
    assert (m.netG, m.netD, m.norm, m.use_dropout) == ("unet_256", "basic", "batch", True)
    assert (m.input_nc, m.output_nc) == (3, 3)
    assert (lo.gan_mode, lo.lambda_L1, lo.pool_size, d.load_size, d.crop_size) == ("vanilla", 100.0, 0, 286, 256)
    for argv, flag in ((["--input-nc", "1"], "--input-nc"), (["--output-nc", "1"], "--output-nc"),
                       (["--direction", "BtoA"], "--direction"), (["--gan-mode", "wgangp"], "--gan-mode")):
        with pytest.raises(SystemExit) as e:
            parse_config(["--model", "colorization", "--dataset", "synthetic", *argv])
        assert e.value.code == 2 and flag in capsys.readouterr().err
    with pytest.raises(ConfigError, match="output_nc"):
        col(output_nc=1)


def test_networks_map_lightness_to_colour():
    from fastcgan.recipes import get_recipe

    recipe = get_recipe("colorization")
    nets = recipe.networks(col())
    assert (nets["G"].input_nc, nets["G"].output_nc) == (1, 2)
    assert next(nets["D"].parameters()).shape[1] == 3  # the conditional D sees cat(L, ab)
    assert recipe.deployed(nets["G"]).net is nets["G"]  # shares the trained parameters


# --------------------------------------------------------------------------------------------
# training, resume, deploy
# --------------------------------------------------------------------------------------------
def test_short_run_beats_the_grey_image_and_exports(tmp_path, capsys):
    """200 steps (U-Net 128, ngf/ndf 8, the built-in 200 images at 128², ~5 s) learn the synthetic
    palette: the test L1 to the true colours falls well below the grey image's (measured: 0.050 vs
    0.082, PSNR 19.5 vs 17.7 dB; 0.048 after 400 steps); fastcgan-eval on the ONNX export agrees
    and translate keeps each image's lightness."""
    from fastcgan.deploy.cli import main as export_main
    from fastcgan.evaluate import main as eval_main
    from fastcgan.train.cli import main as train_main
    from fastcgan.translate import main as translate_main

    out = tmp_path / "runs"
    rc = train_main([
        "--model", "colorization", "--dataset", "synthetic", "--netG", "unet_128", "--load-size", "128",
        "--crop-size", "128", "--ngf", "8", "--ndf", "8", "--max-steps", "200", "--output-dir", str(out),
        "--name", "c", "--device", "cpu", "--no-progress", "--no-tensorboard", "--eval-every", "0",
        "--sample-every", "200",
    ])
    err = capsys.readouterr().err
    assert rc == 0, err
    run = out / "c"
    ev = json.loads((run / "summary.json").read_text())["eval"]["AtoB"]
    assert ev["n"] == 50 and "identity_l1" not in ev
    assert ev["l1"] < 0.85 * ev["grey_l1"] and ev["psnr"] > ev["grey_psnr"] + 0.5, ev
    assert "grey_l1=" in err and os.listdir(run / "samples")
    data = str(out / "synthetic_color_128")

    onnx = str(tmp_path / "c.onnx")
    assert export_main([str(run), "--onnx", onnx]) == 0
    assert eval_main(["--checkpoint", onnx, "--dataroot", data, "--no-fid", "--json", str(tmp_path / "e.json")]) == 0
    again = json.loads((tmp_path / "e.json").read_text())["AtoB"]
    assert again["l1"] == pytest.approx(ev["l1"], abs=2e-4) and again["grey_l1"] == ev["grey_l1"]

    # translate: any image in, a colour image of its lightness out
    dst = tmp_path / "colour"
    assert translate_main(["--checkpoint", str(run), "--input", os.path.join(data, "test"), "--output", str(dst),
                           "--no-progress"]) == 0
    from fastcgan.data import load_image

    src = load_image(os.path.join(data, "test", "img_00000.png")).double() / 255
    res = load_image(str(dst / "img_00000.png")).double() / 255
    assert (lightness(res[None]) - lightness(src[None])).abs().mean() < 1.0  # L* 0..100


@pytest.mark.parametrize("data_on_gpu", [False, True], ids=["loader", "device-bank"])
def test_resume_is_exact(tmp_path, colour_set, data_on_gpu):
    """2N steps straight == N steps, resume, N steps (N = 5 crosses the 8-image epoch)."""
    from fastcgan.train import train
    from fastcgan.train.checkpoint import latest_checkpoint, load_checkpoint

    def cfg(name, **kw):
        return col(tmp_path, dataset="folder", dataroot=colour_set, name=name, epochs=1, epochs_decay=2,
                   data_on_gpu=data_on_gpu, **kw)

    straight = train(cfg("straight", max_steps=10))
    train(cfg("split", max_steps=5))
    second = train(cfg("split", max_steps=10, resume="auto"))
    assert second["start_step"] == 5 and straight["final_losses"] == second["final_losses"]
    a = load_checkpoint(latest_checkpoint(str(tmp_path / "straight")))
    b = load_checkpoint(latest_checkpoint(str(tmp_path / "split")))
    for name, sd in a["nets"].items():
        for k, v in sd.items():
            assert torch.equal(v, b["nets"][name][k]), (name, k)


def test_official_colorization_checkpoints_load_and_export(tmp_path, capsys):
    """An official ``--model colorization`` G (U-Net, BatchNorm, L -> ab) round-trips through the
    official key layout and exports as an RGB -> RGB colorizer (``fastcgan-export --colorization``)."""
    from fastcgan.deploy import load
    from fastcgan.deploy.cli import main as export_main
    from fastcgan.models import LabColorizer, build_generator, load_official_generator, save_official_generator

    G = build_generator("unet_128", 1, 2, ngf=4, norm="batch", use_dropout=True, color_space="lab",
                        bn_inference="per_image").eval()
    pth = str(tmp_path / "latest_net_G.pth")
    save_official_generator(G, pth)
    sd = torch.load(pth, weights_only=True)
    assert sd["model.model.0.weight"].shape[1] == 1  # the official network's first conv reads L
    back = load_official_generator(pth, arch="unet_128", ngf=4, norm="batch", color_space="lab")
    assert isinstance(back, LabColorizer)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    torch.testing.assert_close(back(x), G(x), atol=1e-6, rtol=1e-5)

    onnx = str(tmp_path / "c.onnx")
    assert export_main(["--from-official", pth, "--arch", "unet_128", "--ngf", "4", "--norm", "batch",
                        "--colorization", "--onnx", onnx]) == 0
    tr = load(onnx, device="cpu")
    assert (tr.input_nc, tr.spec.config["color_space"]) == (3, "lab")
    # --colorization only describes official checkpoints
    with pytest.raises(SystemExit) as e:
        export_main(["--colorization", str(tmp_path), "--onnx", onnx])
    assert e.value.code == 2 and "--colorization" in capsys.readouterr().err


def test_synthetic_colour_set_cli(tmp_path, capsys):
    from fastcgan.data.synthetic import main as synthetic_main

    out = str(tmp_path / "c")
    assert synthetic_main([out, "--color", "--size", "16", "--n-train", "3", "--n-test", "2"]) == 0
    assert sorted(os.listdir(os.path.join(out, "train"))) == ["img_00000.png", "img_00001.png", "img_00002.png"]
    assert len(os.listdir(os.path.join(out, "test"))) == 2
    with pytest.raises(SystemExit) as e:
        synthetic_main([str(tmp_path / "d"), "--color", "--aligned"])
    assert e.value.code == 2 and "pick one" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "d")


@pytest.mark.cuda
def test_device_paths_match_the_cpu_gpu(colour_set):
    """The recipe's device-side split (uint8 RGB -> L, ab) and the colorizer, on the GPU (fp32 and
    under bf16 autocast) against the CPU. No crop or flip: the CPU and CUDA generators draw differently."""
    from fastcgan.data import collate
    from fastcgan.models import build_generator
    from fastcgan.recipes import get_recipe

    recipe = get_recipe("colorization")
    ds = recipe.build_dataset(col(dataset="folder", dataroot=colour_set), colour_set)
    raw = collate([ds[i] for i in range(2)])
    kw = dict(crop_size=None, flip=False, channels_last=True)
    cpu = recipe.augment_batch(raw, generator=torch.Generator().manual_seed(0), **kw)
    gpu = recipe.augment_batch({k: raw[k].cuda() for k in ("A", "B")},
                               generator=torch.Generator("cuda").manual_seed(0), **kw)
    for k in ("A", "B"):
        torch.testing.assert_close(gpu[k].cpu(), cpu[k], atol=1e-5, rtol=1e-5)
    G = build_generator("unet_128", 1, 2, ngf=4, norm="batch", color_space="lab", bn_inference="per_image").eval()
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    want = G(x)
    Gc = G.cuda()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # fp32 convolutions, as the CPU's
        torch.testing.assert_close(Gc(x.cuda()).cpu(), want, atol=1e-4, rtol=0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = Gc(x.cuda())
    assert out.dtype == torch.float32 and (out.cpu() - want).abs().max() < 0.1


def test_colorizer_normalises_each_image_with_its_own_statistics():
    """The official test.py runs the colorization G with BatchNorm in training mode at batch 1 (each
    image's own statistics, no dropout here); the deployable colorizer must do the same at any batch
    size -- a freshly trained network's running statistics give other colours."""
    import copy

    from torch import nn

    from fastcgan.models import LabColorizer
    from fastcgan.recipes import get_recipe

    recipe = get_recipe("colorization")
    cfg = col()
    assert cfg.model.norm == "batch"
    torch.manual_seed(0)
    G = recipe.networks(cfg)["G"]
    official = copy.deepcopy(G).eval()  # test.py: dropout as at inference, BatchNorm on the batch
    for m in official.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want = torch.cat([LabColorizer(official)(x[i : i + 1]) for i in range(len(x))])
        got = recipe.deployed(G.eval())(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
