"""The official CUT's anti-aliased resampling (its default; ``--no_antialias`` / ``--no_antialias_up``
off): fastcgan's ResNet generator and PatchGAN with ``antialias`` against a re-implementation of the
official modules, forward and the PatchNCE features, with the same weights."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastcgan.models import build_discriminator, build_generator, load_generator, save_generator


def _binomial(row, gain=1.0):
    k = torch.tensor(row, dtype=torch.float32)
    k = k[:, None] * k[None, :]
    return k * gain / k.sum()


class OfficialDownsample(nn.Module):  # reflection pad 1, depthwise [1 2 1] blur, stride 2
    def __init__(self, c):
        super().__init__()
        self.register_buffer("filt", _binomial([1, 2, 1])[None, None].repeat(c, 1, 1, 1))

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=x.shape[1])


class OfficialUpsample(nn.Module):  # replicate pad 1, transposed [1 3 3 1] x 4 blur, stride 2, crop
    def __init__(self, c):
        super().__init__()
        self.register_buffer("filt", _binomial([1, 3, 3, 1], 4.0)[None, None].repeat(c, 1, 1, 1))

    def forward(self, x):
        y = F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self.filt, stride=2, padding=2,
                               groups=x.shape[1])
        return y[:, :, 1:, 1:][:, :, :-1, :-1]


class OfficialBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.conv_block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(d, d, 3), nn.InstanceNorm2d(d), nn.ReLU(True),
                                        nn.ReflectionPad2d(1), nn.Conv2d(d, d, 3), nn.InstanceNorm2d(d))

    def forward(self, x):
        return x + self.conv_block(x)


def official_generator(ngf, n_blocks, antialias=True, antialias_up=True):
    m = [nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
    for c in (ngf, 2 * ngf):
        if antialias:
            m += [nn.Conv2d(c, 2 * c, 3, 1, 1), nn.InstanceNorm2d(2 * c), nn.ReLU(True), OfficialDownsample(2 * c)]
        else:
            m += [nn.Conv2d(c, 2 * c, 3, 2, 1), nn.InstanceNorm2d(2 * c), nn.ReLU(True)]
    m += [OfficialBlock(4 * ngf) for _ in range(n_blocks)]
    for c in (4 * ngf, 2 * ngf):
        if antialias_up:
            m += [OfficialUpsample(c), nn.Conv2d(c, c // 2, 3, 1, 1), nn.InstanceNorm2d(c // 2), nn.ReLU(True)]
        else:
            m += [nn.ConvTranspose2d(c, c // 2, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(c // 2), nn.ReLU(True)]
    m += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh()]
    return nn.Sequential(*m)


def official_discriminator(ndf, n_layers=3):
    m = [nn.Conv2d(3, ndf, 4, 1, 1), nn.LeakyReLU(0.2, True), OfficialDownsample(ndf)]
    mult = 1
    for n in range(1, n_layers):
        prev, mult = mult, min(2 ** n, 8)
        m += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1), nn.InstanceNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
              OfficialDownsample(ndf * mult)]
    prev, mult = mult, min(2 ** n_layers, 8)
    m += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1), nn.InstanceNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
          nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    return nn.Sequential(*m)


def _copy_convs(src: nn.Module, dst: nn.Module) -> None:
    """The official networks' convolution weights into ours, in forward order."""
    convs = [m for m in src.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    ours = [m for m in dst.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert [type(m) for m in convs] == [type(m) for m in ours]
    with torch.no_grad():
        for a, b in zip(convs, ours):
            b.weight.copy_(a.weight)
            if a.bias is not None:
                b.bias.copy_(a.bias)


def _official_features(net, x, layers):
    feats = []
    for i, layer in enumerate(net):
        x = layer(x)
        if i in layers:
            feats.append(x)
        if i == layers[-1]:
            return feats


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_blur_upsample_compiles_forward_and_backward(channels_last):
    """Inductor (fullgraph) on BlurUpsample + a conv, forward and backward, as the CUT step runs it:
    with F.pad's replicate mode the compiled backward failed an assert_size_stride (a
    channels-last gradient where a contiguous one was compiled for), so every CUT/FastCUT run
    with --compile (the default on a GPU) crashed at its first step on the CPU."""
    from fastcgan.models._blocks import BlurUpsample

    torch.manual_seed(0)
    up, conv = BlurUpsample(6), nn.Conv2d(6, 3, 3, padding=1)
    x = torch.randn(2, 6, 7, 9)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    x.requires_grad_()

    def f(t):
        return conv(up(t)).square().mean()

    want = F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), up.filt, stride=2, padding=2,
                              groups=6)[:, :, 1:-1, 1:-1]  # the official Upsample's formula
    torch.testing.assert_close(up(x), want, rtol=0, atol=0)
    g_eager = torch.autograd.grad(f(x), x)[0]
    torch._dynamo.reset()
    g_compiled = torch.autograd.grad(torch.compile(f, fullgraph=True, dynamic=False)(x), x)[0]
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("up", [True, False], ids=["antialias_up", "strided_up"])
def test_generator_matches_the_official_antialiased_one(up):
    torch.manual_seed(0)
    ref = official_generator(4, 6, antialias=True, antialias_up=up).eval()
    ours = build_generator("resnet_6blocks", ngf=4, backend="torch", antialias=True, antialias_up=up).eval()
    _copy_convs(ref, ours)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    x = torch.rand(2, 3, 36, 28) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
        names = ours.official_layer_names()
        assert names == [type(m).__name__.replace("Official", "").replace("InstanceNorm2d", "Norm")
                         .replace("LeakyReLU", "ReLU").replace("Block", "ResnetBlock") for m in ref]
        layers = (0, 4, 8, 12, 16)  # the official --nce_layers: padded input, the stride-1 convs, blocks 0 and 4
        want = _official_features(ref, x, layers)
        got = ours.encode(x, layers)
        assert [f.shape for f in got] == [f.shape for f in want]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        assert ours.feature_channels(layers) == [f.shape[1] for f in want]
        out, _ = ours.encode(x, (3, 7, 11), with_output=True)  # ReLU, Downsample indices
        torch.testing.assert_close(out, ref(x), atol=1e-5, rtol=1e-5)
        for g, w in zip(ours.encode(x, (3, 7, 11)), _official_features(ref, x, (3, 7, 11))):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_discriminator_matches_the_official_antialiased_one():
    torch.manual_seed(1)
    ref = official_discriminator(4)
    ours = build_discriminator("basic", ndf=4, backend="torch", antialias=True)
    _copy_convs(ref, ours)
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    strided = build_discriminator("basic", ndf=4, backend="torch")
    assert ours(x).shape == strided(x).shape  # the same score map
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


def test_antialiased_generator_files_and_export(tmp_path):
    """The setting travels in the generator file (an older file without it is the strided net),
    and exports to ONNX through standard ops."""
    torch.manual_seed(2)
    g = build_generator("resnet_6blocks", ngf=4, antialias=True, antialias_up=True).eval()
    assert g.config["antialias"] is True and "antialias" not in build_generator("resnet_6blocks", ngf=4).config
    save_generator(g, tmp_path / "g.safetensors")
    back = load_generator(tmp_path / "g.safetensors", backend="torch")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(back(x), g(x), atol=1e-5, rtol=1e-5)  # auto vs torch kernels
    from fastcgan.deploy import load
    from fastcgan.deploy.cli import main as export

    assert export([str(tmp_path / "g.safetensors"), "--onnx", str(tmp_path / "g.onnx"), "--verify-sizes",
                   "1x32x32,2x36x28"]) == 0
    onnx = load(str(tmp_path / "g.onnx"), device="cpu").translate_tensor(x)
    torch.testing.assert_close(onnx, load(str(tmp_path / "g.safetensors"), device="cpu").translate_tensor(x),
                               atol=1e-4, rtol=0)


class _OfficialCUTGenerator(nn.Module):  # the official ResnetGenerator keeps its layers in .model
    def __init__(self, ngf, n_blocks, antialias, antialias_up):
        super().__init__()
        self.model = official_generator(ngf, n_blocks, antialias, antialias_up)


@pytest.mark.parametrize("aa,up", [(True, True), (True, False), (False, True)],
                         ids=["cut_default", "no_antialias_up", "no_antialias"])
def test_official_cut_checkpoints_load_and_save(tmp_path, aa, up):
    """An official CUT ``latest_net_G.pth`` (keys of its flat nn.Sequential, the blur filters saved
    as ``filt`` buffers) loads with its resampling read from the layout, gives the official
    network's output, and writes back the same file's keys and values, which the official module
    loads strictly."""
    from fastcgan.models import load_official_generator, save_official_generator

    torch.manual_seed(3)
    ref = _OfficialCUTGenerator(4, 6, aa, up).eval()
    pth = tmp_path / "latest_net_G.pth"
    torch.save(ref.state_dict(), pth)
    assert any(k.endswith(".filt") for k in ref.state_dict())
    g = load_official_generator(pth, arch="resnet_6blocks", backend="torch")
    assert (g.antialias, g.antialias_up) == (aa, up)
    x = torch.rand(2, 3, 36, 28) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(g(x), ref.model(x), atol=1e-5, rtol=1e-5)
    save_official_generator(g, tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    want = ref.state_dict()
    assert list(back) == list(want)  # the official module order, filters included
    for k in want:
        assert torch.equal(back[k], want[k]), k
    _OfficialCUTGenerator(4, 6, aa, up).load_state_dict(back, strict=True)


def test_official_cut_checkpoint_errors(tmp_path):
    """A layout that contradicts the flags, or a blur filter that is not the official constant,
    is refused, naming the file and the key."""
    from fastcgan.models import load_official_generator

    sd = _OfficialCUTGenerator(4, 6, True, True).state_dict()
    pth = tmp_path / "latest_net_G.pth"
    torch.save(sd, pth)
    with pytest.raises(ValueError, match=r"antialias=False but .*layout says antialias=True"):
        load_official_generator(pth, arch="resnet_6blocks", antialias=False)
    with pytest.raises(ValueError, match=r"holds a ResNet generator with 6 blocks"):
        load_official_generator(pth, arch="resnet_9blocks")
    bad = dict(sd)
    bad["model.7.filt"] = torch.zeros_like(bad["model.7.filt"])
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"bad\.pth: model\.7\.filt is not the official blur filter"):
        load_official_generator(tmp_path / "bad.pth", arch="resnet_6blocks")
    stray = {k: v for k, v in sd.items() if k != "model.8.weight"}  # the second down conv gone
    with pytest.raises(ValueError, match="downsampling convolutions"):
        load_official_generator(stray, arch="resnet_6blocks")


def test_official_cut_checkpoint_exports(tmp_path):
    """``fastcgan-export --from-official`` takes an official CUT generator as it is (no flag: the
    layout says anti-aliased) and the ONNX model gives the official output."""
    from fastcgan.deploy import load
    from fastcgan.deploy.cli import main as export

    torch.manual_seed(4)
    ref = _OfficialCUTGenerator(4, 6, True, True).eval()
    pth = tmp_path / "latest_net_G.pth"
    torch.save(ref.state_dict(), pth)
    onnx = tmp_path / "g.onnx"
    assert export(["--from-official", str(pth), "--arch", "resnet_6blocks", "--onnx", str(onnx),
                   "--verify-sizes", "1x32x32"]) == 0
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(load(str(onnx), device="cpu").translate_tensor(x), ref.model(x),
                                   atol=1e-4, rtol=0)


def test_official_cut_checkpoint_loads_under_a_float64_default_dtype(tmp_path):
    """The blur filters were compared in the default dtype against the file's fp32 ones: under
    torch.set_default_dtype(torch.float64) every anti-aliased checkpoint was refused."""
    from fastcgan.models import load_official_generator

    pth = tmp_path / "latest_net_G.pth"
    torch.save(_OfficialCUTGenerator(4, 6, True, True).state_dict(), pth)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        g = load_official_generator(pth, arch="resnet_6blocks", backend="torch")
    finally:
        torch.set_default_dtype(before)
    assert (g.antialias, g.antialias_up) == (True, True)
