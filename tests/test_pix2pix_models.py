"""pix2pix networks: the official unet_256 BatchNorm generator at test time, the conditional
PatchGAN and the pix2pix losses.

The official checkpoint is built here from the documented layout of the official
``UnetGenerator`` (nested ``UnetSkipConnectionBlock``\\ s, each an ``nn.Sequential``: outermost
``[downconv, sub, uprelu, upconv, tanh]``, innermost ``[downrelu, downconv, uprelu, upconv,
upnorm]``, the others ``[downrelu, downconv, downnorm, sub, uprelu, upconv, upnorm(, dropout)]``;
BatchNorm means bias-free convolutions except the outermost transposed one), and its forward is
re-stated *functionally* over that state dict (F.conv2d / F.batch_norm), independently of both
fastcgan's modules and the module re-statement in test_official_checkpoint.py. The official
in-place LeakyReLU makes each inner level's skip connection carry LeakyReLU(input)."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tolerances import tol

from fastcgan.losses import conditional_input, pix2pix_discriminator_loss, pix2pix_generator_loss
from fastcgan.models import (
    BN_INFERENCE_MODES,
    build_discriminator,
    build_generator,
    load_generator,
    load_official_generator,
    read_generator_config,
    save_generator,
    set_bn_inference,
)
from fastcgan.ops import available_backends

NGF = 2


# ------------------------------------------------------------------------------------------------
# The official layout, re-stated as keys and a functional forward
# ------------------------------------------------------------------------------------------------
def _prefix(k):
    return "model.model." + "".join("1.model." if j == 1 else "3.model." for j in range(1, k + 1))


def official_unet_state_dict(num_downs=8, input_nc=3, output_nc=3, ngf=NGF, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(key, shape):
        fan_in = shape[1] * shape[2] * shape[3]
        sd[key] = torch.randn(shape, generator=g) * (1.5 / math.sqrt(fan_in))

    def bn(key, c):
        sd[key + ".weight"] = torch.rand(c, generator=g) + 0.5
        sd[key + ".bias"] = torch.rand(c, generator=g) * 0.4 - 0.2
        sd[key + ".running_mean"] = torch.rand(c, generator=g) * 0.2 - 0.1
        sd[key + ".running_var"] = torch.rand(c, generator=g) * 1.5 + 0.5
        sd[key + ".num_batches_tracked"] = torch.tensor(100)

    last = num_downs - 1
    for k in range(num_downs):
        p = _prefix(k)
        outer = output_nc if k == 0 else ngf * min(2 ** (k - 1), 8)
        inner = ngf * min(2**k, 8)
        in_nc = input_nc if k == 0 else outer
        if k == 0:
            conv(p + "0.weight", (inner, in_nc, 4, 4))
            conv(p + "3.weight", (2 * inner, outer, 4, 4))  # ConvTranspose2d: (in, out, kh, kw)
            sd[p + "3.bias"] = torch.rand(outer, generator=g) * 0.2 - 0.1
        elif k == last:
            conv(p + "1.weight", (inner, in_nc, 4, 4))
            conv(p + "3.weight", (inner, outer, 4, 4))
            bn(p + "4", outer)
        else:
            conv(p + "1.weight", (inner, in_nc, 4, 4))
            bn(p + "2", inner)
            conv(p + "5.weight", (2 * inner, outer, 4, 4))
            bn(p + "6", outer)
    return sd


def official_unet_forward(sd, x, num_downs=8, bn_train=True):
    """The official forward: ``bn_train`` = BatchNorm in training mode (batch statistics, what
    test.py runs without --eval), else running statistics (--eval). Dropout off."""
    last = num_downs - 1

    def bn(key, t):
        return F.batch_norm(
            t, sd[key + ".running_mean"].clone(), sd[key + ".running_var"].clone(), sd[key + ".weight"],
            sd[key + ".bias"], training=bn_train, momentum=0.1, eps=1e-5,
        )

    def level(k, t):
        p = _prefix(k)
        if k == 0:
            s = level(1, F.conv2d(t, sd[p + "0.weight"], stride=2, padding=1))
            return torch.tanh(F.conv_transpose2d(F.relu(s), sd[p + "3.weight"], sd[p + "3.bias"], 2, 1))
        t = F.leaky_relu(t, 0.2)  # in place in the official network: the skip below sees it
        if k == last:
            d = F.conv2d(t, sd[p + "1.weight"], stride=2, padding=1)
            u = bn(p + "4", F.conv_transpose2d(F.relu(d), sd[p + "3.weight"], None, 2, 1))
        else:
            d = bn(p + "2", F.conv2d(t, sd[p + "1.weight"], stride=2, padding=1))
            u = bn(p + "6", F.conv_transpose2d(F.relu(level(k + 1, d)), sd[p + "5.weight"], None, 2, 1))
        return torch.cat([t, u], 1)

    with torch.no_grad():
        return level(0, x)


def _official_per_image(sd, x):
    """test.py at batch 1, image by image."""
    return torch.cat([official_unet_forward(sd, x[i : i + 1], bn_train=True) for i in range(len(x))])


@pytest.fixture(scope="module")
def official_sd():
    return official_unet_state_dict()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 3, 256, 256, generator=g) * 2 - 1


# ------------------------------------------------------------------------------------------------
# BatchNorm at test time
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_official_unet256_per_image_statistics_match_test_py(official_sd, images, backend):
    ours = load_official_generator(official_sd, "unet_256", ngf=NGF, norm="batch", use_dropout=True,
                                   backend=backend)
    assert not ours.training and ours.config["bn_inference"] == "per_image"  # the default
    t = dict(atol=2e-5, rtol=1e-5) if backend == "torch" else tol(torch.float32)
    ref1 = official_unet_forward(official_sd, images[:1], bn_train=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(images[:1]), ref1, **t)  # = test.py at batch 1
        # Per image at any batch: each output is that image's test.py output, whatever its neighbours.
        torch.testing.assert_close(ours(images), _official_per_image(official_sd, images), **t)
    # ... and it differs from running statistics (so the test can tell the modes apart).
    ref_eval = official_unet_forward(official_sd, images[:1], bn_train=False)
    assert (ref1 - ref_eval).abs().max() > 1e-2


def test_official_unet256_running_statistics_match_eval(official_sd, images):
    ours = load_official_generator(official_sd, "unet_256", ngf=NGF, norm="batch", bn_inference="running",
                                   backend="torch")
    assert ours.config["bn_inference"] == "running"
    with torch.no_grad():
        torch.testing.assert_close(
            ours(images[:2]), official_unet_forward(official_sd, images[:2], bn_train=False), atol=2e-5, rtol=1e-5
        )


def test_training_mode_is_batch_statistics(official_sd, images):
    """In training mode BatchNorm uses batch statistics in both modes: at batch 1 that is the
    per-image eval output (no dropout in this checkpoint)."""
    ours = load_official_generator(official_sd, "unet_256", ngf=NGF, norm="batch", bn_inference="running",
                                   backend="torch").train()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(images[:1]), official_unet_forward(official_sd, images[:1], bn_train=True), atol=2e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            ours(images[:2]), official_unet_forward(official_sd, images[:2], bn_train=True), atol=2e-5, rtol=1e-5
        )


def test_mode_round_trips_through_safetensors(official_sd, images, tmp_path):
    ours = load_official_generator(official_sd, "unet_256", ngf=NGF, norm="batch", backend="torch")
    path = tmp_path / "g.safetensors"
    save_generator(ours, path)
    assert read_generator_config(path)["bn_inference"] == "per_image"
    back = load_generator(path, backend="torch")
    assert back.config["bn_inference"] == "per_image"
    with torch.no_grad():
        torch.testing.assert_close(back(images[:2]), ours(images[:2]), atol=0, rtol=0)
    # Switching the mode on a loaded model, and files that predate the key (running statistics).
    set_bn_inference(back, "running")
    assert back.config["bn_inference"] == "running"
    legacy = {k: v for k, v in back.config.items() if k != "bn_inference"}
    save_generator(back, tmp_path / "old.safetensors", config=legacy)
    old = load_generator(tmp_path / "old.safetensors", backend="torch")
    assert old.config["bn_inference"] == "running"
    with torch.no_grad():
        torch.testing.assert_close(
            old(images[:1]), official_unet_forward(official_sd, images[:1], bn_train=False), atol=2e-5, rtol=1e-5
        )
    with pytest.raises(ValueError, match="bn_inference"):
        build_generator("unet_128", ngf=2, norm="batch", bn_inference="batch")
    assert BN_INFERENCE_MODES == ("per_image", "running")
    g = build_generator("unet_128", ngf=2, norm="instance")
    assert "bn_inference" not in g.config  # only BatchNorm generators carry the key


def test_export_from_official_and_translate_match_the_official_network(official_sd, tmp_path, capsys,
                                                                        monet2photo_mini):
    """fastcgan-export --from-official (per-image BatchNorm) -> ONNX with InstanceNormalization,
    verified against onnxruntime; fastcgan-translate on the ONNX file and on a saved .safetensors
    reproduces the official test.py output of a real photo (to uint8 rounding)."""
    import onnx

    from fastcgan.deploy import onnx_export
    from fastcgan.deploy.runtime import OrtRunner
    from fastcgan.deploy.cli import main as export_main
    from fastcgan.translate import main as translate_main

    pth = tmp_path / "latest_net_G.pth"
    torch.save(official_sd, pth)
    onnx_path = tmp_path / "g.onnx"
    rc = export_main(["--from-official", str(pth), "--arch", "unet_256", "--ngf", str(NGF), "--norm", "batch",
                      "--onnx", str(onnx_path), "--verify-sizes", "1x256x256,2x256x256"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "batchnorm at inference: per_image" in out and "OVER" not in out
    ops = onnx_export.op_types(str(onnx_path))
    assert "InstanceNormalization" in ops and "BatchNormalization" not in ops
    spec = onnx_export.read_spec(str(onnx_path))
    assert spec.config["bn_inference"] == "per_image" and spec.size_multiple == 256
    assert onnx.load(str(onnx_path)).producer_name == "fastcgan"

    # onnxruntime against the official forward, image by image and batched.
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(7)) * 2 - 1
    y = OrtRunner(str(onnx_path), torch.device("cpu"))(x)
    torch.testing.assert_close(y, _official_per_image(official_sd, x), atol=1e-4, rtol=1e-4)

    # A real 256x256 photo through fastcgan-translate (ONNX and safetensors artifacts).
    src = os.path.join(monet2photo_mini, "testB", sorted(os.listdir(os.path.join(monet2photo_mini, "testB")))[0])
    img = np.array(Image.open(src).convert("RGB"))
    assert img.shape == (256, 256, 3)
    xin = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
    want = ((official_unet_forward(official_sd, xin, bn_train=True)[0] + 1) * 127.5).round().clamp(0, 255)
    want = want.permute(1, 2, 0).numpy()
    st = tmp_path / "g.safetensors"
    save_generator(load_official_generator(str(pth), "unet_256", ngf=NGF, norm="batch", backend="torch"), st)
    for ckpt in (onnx_path, st):
        outdir = tmp_path / f"out_{ckpt.suffix[1:]}"
        rc = translate_main(["--checkpoint", str(ckpt), "--input", src, "--output", str(outdir), "--device", "cpu",
                             "--no-progress"])
        assert rc == 0
        got = np.asarray(Image.open(outdir / (os.path.splitext(os.path.basename(src))[0] + ".png")))
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, ckpt


def test_export_running_mode_matches_eval(official_sd, tmp_path, capsys):
    from fastcgan.deploy import onnx_export
    from fastcgan.deploy.runtime import OrtRunner
    from fastcgan.deploy.cli import main as export_main

    pth = tmp_path / "latest_net_G.pth"
    torch.save(official_sd, pth)
    rc = export_main(["--from-official", str(pth), "--arch", "unet_256", "--ngf", str(NGF), "--norm", "batch",
                      "--bn-inference", "running", "--onnx", str(tmp_path / "r.onnx"), "--no-verify"])
    assert rc == 0 and "batchnorm at inference: running" in capsys.readouterr().out
    assert onnx_export.read_spec(str(tmp_path / "r.onnx")).config["bn_inference"] == "running"
    x = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(8)) * 2 - 1
    y = OrtRunner(str(tmp_path / "r.onnx"), torch.device("cpu"))(x)
    torch.testing.assert_close(y, official_unet_forward(official_sd, x, bn_train=False), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# The conditional PatchGAN
# ------------------------------------------------------------------------------------------------
_KERNEL_BACKENDS = [b for b, s in available_backends().items() if s.available and b != "torch" and "cpu" in s.devices]


@pytest.mark.parametrize("norm,backend", [("instance", b) for b in _KERNEL_BACKENDS] + [("batch", "auto")])
def test_conditional_patchgan_sees_six_channels(norm, backend):
    torch.manual_seed(0)
    d_ref = build_discriminator("basic", 3 + 3, ndf=4, norm=norm, backend="torch")
    d = build_discriminator("basic", 3 + 3, ndf=4, norm=norm, backend=backend)
    d.load_state_dict(d_ref.state_dict())
    assert d.stem.in_channels == 6 and d.config["input_nc"] == 6
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    b = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    x = conditional_input(a, b)
    assert x.shape == (2, 6, 32, 32) and torch.equal(x[:, :3], a) and torch.equal(x[:, 3:], b)
    out, ref = d(x), d_ref(conditional_input(a, b))
    assert out.shape == (2, 1, 2, 2)
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    (g,) = torch.autograd.grad(out.sum(), b)
    (g_ref,) = torch.autograd.grad(ref.sum(), b)
    torch.testing.assert_close(g, g_ref, **tol(torch.float32))
    assert g.abs().sum() > 0
    # The score depends on the condition, not only on the image judged.
    with torch.no_grad():
        assert (d(conditional_input(-a, b)) - out).abs().max() > 1e-4
    with pytest.raises(ValueError, match="same N, H and W"):
        conditional_input(a, b[:, :, :16])


# ------------------------------------------------------------------------------------------------
# Losses on known values
# ------------------------------------------------------------------------------------------------
def test_pix2pix_losses_known_values():
    log2 = math.log(2.0)
    fake_B = torch.full((2, 3, 4, 4), 0.3)
    real_B = torch.full((2, 3, 4, 4), 0.2)
    real_B[0, 0, 0, 0] = 0.3 + 0.1 * 95  # one pixel far off: mean |d| = (95 * 0.1 ... )
    l1_mean = float((fake_B - real_B).abs().mean())
    total, gan, l1 = pix2pix_generator_loss(torch.zeros(2, 1, 3, 3), fake_B, real_B)
    assert math.isclose(float(gan), log2, rel_tol=1e-6)  # BCE(sigmoid(0), 1) = log 2
    assert math.isclose(float(l1), 100 * l1_mean, rel_tol=1e-5)
    assert math.isclose(float(total), log2 + 100 * l1_mean, rel_tol=1e-5)
    _, _, l1_10 = pix2pix_generator_loss(torch.zeros(1, 1, 1, 1), fake_B, real_B, lambda_L1=10.0)
    assert math.isclose(float(l1_10), 10 * l1_mean, rel_tol=1e-5)
    # A confident "real" score costs the generator softplus(-s).
    _, gan3, _ = pix2pix_generator_loss(torch.full((1, 1, 2, 2), 3.0), fake_B, fake_B)
    assert math.isclose(float(gan3), math.log1p(math.exp(-3.0)), rel_tol=1e-6)

    d_total, d_real, d_fake = pix2pix_discriminator_loss(torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), -1.0))
    assert math.isclose(float(d_real), math.log1p(math.exp(-2.0)), rel_tol=1e-6)
    assert math.isclose(float(d_fake), math.log1p(math.exp(-1.0)), rel_tol=1e-6)  # BCE(sigmoid(-1), 0)
    assert math.isclose(float(d_total), 0.5 * (float(d_real) + float(d_fake)), rel_tol=1e-6)
    t0, _, _ = pix2pix_discriminator_loss(torch.zeros(3), torch.zeros(3))
    assert math.isclose(float(t0), log2, rel_tol=1e-6)
    # bf16 scores are reduced in fp32; the L1 term too.
    tb, _, _ = pix2pix_generator_loss(torch.zeros(2, 1, 3, 3, dtype=torch.bfloat16), fake_B.bfloat16(), real_B)
    assert tb.dtype == torch.float32
    with pytest.raises(ValueError, match="differ in shape"):
        pix2pix_generator_loss(torch.zeros(1), fake_B, real_B[:1])


def test_pix2pix_step_gradients_flow_where_they_should():
    """The official wiring with these pieces: D's loss on detached fakes leaves G untouched; G's
    loss reaches G through both the conditional D and the L1 term."""
    torch.manual_seed(0)
    G = build_generator("unet_128", ngf=2, norm="batch", use_dropout=True, backend="torch", bn_inference="per_image")
    D = build_discriminator("basic", 6, ndf=4, norm="batch", backend="torch")
    real_A, real_B = torch.rand(1, 3, 128, 128) * 2 - 1, torch.rand(1, 3, 128, 128) * 2 - 1
    fake_B = G(real_A)
    loss_D, _, _ = pix2pix_discriminator_loss(D(conditional_input(real_A, real_B)),
                                              D(conditional_input(real_A, fake_B.detach())))
    loss_D.backward()
    assert all(p.grad is None for p in G.parameters())
    assert all(p.grad is not None for p in D.parameters())
    D.zero_grad(set_to_none=True)
    loss_G, _, _ = pix2pix_generator_loss(D(conditional_input(real_A, fake_B)), fake_B, real_B)
    loss_G.backward()
    assert all(p.grad is not None for p in G.parameters())


@pytest.mark.parametrize("preset,kw", [("udacity", {}), ("cyclegan128", {"norm": "batch"})])
def test_cyclegan_batchnorm_generators_infer_per_image(preset, kw):
    """The official test.py (without --eval) normalises each test image with its own statistics: a
    CycleGAN run's BatchNorm generators save that mode, as pix2pix's do (they said 'running')."""
    from fastcgan.recipes import get_recipe
    from fastcgan.train import TrainConfig

    cfg = TrainConfig.from_preset(preset, dataset="synthetic", device="cpu", **kw)
    with torch.device("meta"):
        nets = get_recipe("cyclegan").networks(cfg)
    assert nets["G_AB"].config["bn_inference"] == nets["G_BA"].config["bn_inference"] == "per_image"


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_unet_initial_weights_are_the_official_draws(norm, monkeypatch):
    """The official init_weights (net.apply) draws each module's weights in its nested blocks'
    order -- down convs and norms outside-in, then up convs and norms inside-out: the order of its
    state dict. A seed gives the official initial U-Net (ours drew level by level before)."""
    from fastcgan.models import generators
    from fastcgan.models.official import official_state_dict

    before = {}
    real = generators.init_weights

    def init_weights(net, *a, **k):  # the RNG state the initialisation starts from
        before["rng"] = torch.get_rng_state()
        return real(net, *a, **k)

    monkeypatch.setattr(generators, "init_weights", init_weights)
    torch.manual_seed(0)
    sd = official_state_dict(build_generator("unet_128", ngf=2, norm=norm, use_dropout=True))
    torch.set_rng_state(before["rng"])
    n = 0
    for key, v in sd.items():
        if key.endswith(".weight"):  # a conv's N(0, 0.02), a BatchNorm's N(1, 0.02), in this order
            want = torch.empty(v.shape).normal_(1.0 if v.dim() == 1 else 0.0, 0.02)
            assert torch.equal(v, want), key
            n += 1
    assert n == (14 + 11 if norm == "batch" else 14)  # 7 down + 7 up convs; 5 down + 6 up norms
