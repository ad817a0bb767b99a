"""Networks: exact official parameter counts, every arch forward/backward on the smallest and odd
sizes it supports, the fused ResNet trunk layout, backend switching, initialisation, and the
self-describing generator files. Equality with the official torch-only networks (same weights)
is in test_official_checkpoint.py."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fastcgan.models import (
    DISCRIMINATOR_ARCHS,
    GENERATOR_ARCHS,
    BatchNormAct,
    build_discriminator,
    build_generator,
    generator_size_multiple,
    load_generator,
    read_generator_config,
    save_generator,
)
from fastcgan.nn import InstanceNormAct, ReflectionResidualBlock, set_backend
from fastcgan.nn.layers import reflected_dropout


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_official_parameter_counts():
    assert n_params(build_generator("resnet_9blocks")) == 11_378_179
    assert n_params(build_generator("resnet_6blocks")) == 7_837_699
    assert n_params(build_discriminator("basic")) == 2_764_737
    # pix2pix's defaults (U-Net 256 and a 6-channel PatchGAN, BatchNorm): 54.414 M and 2.769 M.
    assert n_params(build_discriminator("basic", input_nc=6, norm="batch")) == 2_768_705


# (arch, ngf, H, W): the smallest / odd sizes each generator supports.
GEN_CASES = [
    ("resnet_9blocks", 4, 36, 44),  # trunk 9x11
    ("resnet_6blocks", 4, 8, 12),  # trunk 2x3, the smallest the reflection pads allow
    ("unet_128", 2, 128, 128),
    ("unet_256", 2, 256, 256),
    ("udacity", 4, 24, 40),
]


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
@pytest.mark.parametrize("arch,ngf,h,w", GEN_CASES, ids=[c[0] for c in GEN_CASES])
def test_generator_forward_backward(arch, ngf, h, w, norm):
    torch.manual_seed(0)
    g = build_generator(arch, ngf=ngf, norm=norm, use_dropout=(arch != "udacity"))
    x = torch.rand(2, 3, h, w) * 2 - 1
    y = g(x)
    assert y.shape == (2, 3, h, w)
    assert y.abs().max() <= 1.0  # tanh
    y.square().mean().backward()
    for name, p in g.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for p in g.parameters() if p.dim() == 4)


def test_generator_other_channel_counts():
    g = build_generator("resnet_6blocks", input_nc=1, output_nc=4, ngf=4)
    assert g(torch.rand(1, 1, 12, 16)).shape == (1, 4, 12, 16)


@pytest.mark.parametrize(
    "arch,h,w",
    [("resnet_9blocks", 34, 44), ("resnet_6blocks", 4, 8), ("unet_128", 64, 128), ("udacity", 20, 24)],
)
def test_generator_rejects_unsupported_sizes(arch, h, w):
    g = build_generator(arch, ngf=2)
    with pytest.raises(ValueError, match="multiples of"):
        g(torch.zeros(1, 3, h, w))


def test_generator_size_multiple():
    assert [generator_size_multiple(a) for a in GENERATOR_ARCHS] == [4, 4, 128, 256, 8]
    with pytest.raises(ValueError, match="unknown generator arch"):
        generator_size_multiple("resnet_12blocks")


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
@pytest.mark.parametrize("arch", DISCRIMINATOR_ARCHS)
def test_discriminator_forward_backward(arch, norm):
    torch.manual_seed(0)
    d = build_discriminator(arch, ndf=4, n_layers=2, norm=norm)
    h, w = (35, 47) if arch != "udacity" else (37, 49)
    out = d(torch.rand(2, 3, h, w) * 2 - 1)
    expect = {"basic": (2, 3), "n_layers": (6, 9), "pixel": (35, 47), "udacity": (1, 2)}[arch]
    assert out.shape == (2, 1) + expect
    out.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())


def test_unknown_arch_and_norm():
    with pytest.raises(ValueError, match="unknown arch"):
        build_generator("resnet_12blocks")
    with pytest.raises(ValueError, match="unknown arch"):
        build_discriminator("stylegan")
    with pytest.raises(ValueError, match="norm must be one of"):
        build_generator("resnet_6blocks", norm="group")
    with pytest.raises(ValueError, match="init_type"):
        build_generator("resnet_6blocks", ngf=2, init_type="uniform")
    with pytest.raises(ValueError, match="dropout"):
        build_generator("udacity", use_dropout=True)


def test_resnet_trunk_is_pad_fused():
    g = build_generator("resnet_9blocks", ngf=4)
    assert not any(isinstance(m, nn.ReflectionPad2d) for m in g.modules())
    blocks = list(g.blocks)
    assert len(blocks) == 9 and all(isinstance(b, ReflectionResidualBlock) for b in blocks)
    assert [b.norm2.pad for b in blocks] == [1] * 8 + [0]
    assert g.down[1].norm.pad == 1 and g.up[1].norm.pad == 3
    norms = [m for m in g.modules() if isinstance(m, InstanceNormAct)]
    assert len(norms) == 1 + 2 + 2 * 9 + 2
    assert all(m.weight is None for m in norms)  # affine-free, like the official InstanceNorm
    # Official use_bias rule: conv biases with InstanceNorm, none with BatchNorm or no norm.
    assert all(m.bias is not None for m in g.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
    gb = build_generator("resnet_9blocks", ngf=4, norm="batch")
    assert sum(isinstance(m, BatchNormAct) for m in gb.modules()) == 23
    convs = [m for m in gb.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert [m.bias is not None for m in convs] == [False] * (len(convs) - 1) + [True]


def test_state_dict_keys_readable():
    keys = list(build_generator("resnet_6blocks", ngf=2).state_dict())
    assert keys[:2] == ["stem.conv.weight", "stem.conv.bias"]
    assert "blocks.5.conv2.weight" in keys and keys[-2:] == ["head.weight", "head.bias"]
    assert "levels.6.up_conv.weight" in build_generator("unet_128", ngf=2).state_dict()
    assert "body.2.conv.weight" in build_discriminator("basic", ndf=2).state_dict()


def test_backend_switch_reaches_every_norm():
    g = build_generator("resnet_6blocks", ngf=2, backend="torch")
    d = build_discriminator("basic", ndf=2, backend="torch")
    for net in (g, d):
        norms = [m for m in net.modules() if isinstance(m, InstanceNormAct)]
        assert norms and all(m.backend == "torch" for m in norms)
        set_backend(net, "triton")
        assert all(m.backend == "triton" for m in norms)


def test_backend_is_used_in_forward(monkeypatch):
    from fastcgan.nn import layers

    seen = []
    real = layers.instance_norm_act

    def spy(*a, **k):
        seen.append(k["backend"])
        return real(*a, **{**k, "backend": "torch"})

    monkeypatch.setattr("fastcgan.nn.layers.instance_norm_act", spy)
    g = build_generator("unet_128", ngf=2, backend="cpp")
    g(torch.rand(1, 3, 128, 128))
    assert seen and set(seen) == {"cpp"}
    seen.clear()
    set_backend(g, "torch")
    g(torch.rand(1, 3, 128, 128))
    assert set(seen) == {"torch"}


def test_official_initialisation():
    torch.manual_seed(0)
    g = build_generator("resnet_6blocks", ngf=16, norm="batch")
    w = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    bn = torch.cat([m.weight for m in g.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(bn.mean().item() - 1.0) < 5e-3 and 0.015 < bn.std().item() < 0.025
    assert all((m.bias == 0).all() for m in g.modules() if isinstance(m, nn.BatchNorm2d))
    gi = build_generator("resnet_6blocks", ngf=8)
    assert all((m.bias == 0).all() for m in gi.modules() if isinstance(m, nn.Conv2d))
    gx = build_generator("resnet_6blocks", ngf=8, init_type="xavier", init_gain=1.0)
    assert gx.head.weight.std() > 0.01


def test_reflected_dropout_mirrors_the_interior_mask():
    torch.manual_seed(0)
    h = torch.nn.functional.pad(torch.rand(2, 3, 5, 6) + 1, (1, 1, 1, 1), mode="reflect")
    y = reflected_dropout(h, 0.5, pad=1)
    kept = y != 0
    torch.testing.assert_close(
        kept.float(), torch.nn.functional.pad(kept[..., 1:-1, 1:-1].float(), (1,) * 4, mode="reflect")
    )
    torch.testing.assert_close(y[kept], 2 * h[kept])
    frac = kept[..., 1:-1, 1:-1].float().mean().item()
    assert 0.3 < frac < 0.7
    blk = ReflectionResidualBlock(4, dropout=0.5, out_pad=0, backend="torch").eval()
    xp = torch.nn.functional.pad(torch.rand(1, 4, 6, 6), (1,) * 4, mode="reflect")
    torch.testing.assert_close(blk(xp), blk(xp))  # no dropout in eval


def test_channels_last_input():
    g = build_generator("resnet_6blocks", ngf=4, backend="torch").eval()
    x = torch.rand(1, 3, 16, 20)
    with torch.no_grad():
        torch.testing.assert_close(
            g(x.contiguous(memory_format=torch.channels_last)), g(x), atol=1e-5, rtol=1e-5
        )


def test_resnet_traces_fullgraph():
    torch._dynamo.reset()
    g = build_generator("resnet_6blocks", ngf=2, backend="torch").eval()
    x = torch.rand(1, 3, 12, 16)
    compiled = torch.compile(g, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), g(x))


# ------------------------------------------------------------------------------------------------
# Self-describing generator files
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,norm,size",
    [("resnet_6blocks", "instance", 16), ("unet_128", "batch", 128), ("udacity", "batch", 16)],
)
def test_save_load_generator(arch, norm, size, tmp_path):
    torch.manual_seed(0)
    g = build_generator(arch, ngf=4, norm=norm, backend="torch").eval()
    path = tmp_path / "g.safetensors"
    save_generator(g, path)  # config from build_generator
    cfg = read_generator_config(path)
    bn = {"bn_inference": "running"} if norm == "batch" else {}  # BatchNorm records its eval statistics
    assert cfg == dict(arch=arch, input_nc=3, output_nc=3, ngf=4, norm=norm, use_dropout=False, **bn)
    back = load_generator(path, backend="torch")
    assert not back.training
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(back(x), g(x), rtol=0, atol=0)
    for (k1, v1), (k2, v2) in zip(g.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_load_generator_from_run_directory(tmp_path):
    ga = build_generator("resnet_6blocks", ngf=2)
    gb = build_generator("resnet_6blocks", ngf=2, output_nc=1)
    save_generator(ga, tmp_path / "generator_AtoB.safetensors", ga.config)
    save_generator(gb, tmp_path / "generator_BtoA.safetensors")
    assert load_generator(tmp_path).head.out_channels == 3
    assert load_generator(tmp_path, direction="BtoA").head.out_channels == 1
    assert not list(tmp_path.glob("*.tmp*"))  # atomic write left nothing behind
    # A torch.compile wrapper is saved under its module's keys and config.
    save_generator(torch.compile(ga), tmp_path / "compiled.safetensors")
    assert read_generator_config(tmp_path / "compiled.safetensors") == ga.config
    assert set(load_generator(tmp_path / "compiled.safetensors").state_dict()) == set(ga.state_dict())


def test_load_generator_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_generator(tmp_path / "nothing.safetensors")
    with pytest.raises(FileNotFoundError, match="generator_AtoB.safetensors"):
        load_generator(tmp_path)
    with pytest.raises(ValueError, match="direction"):
        load_generator(tmp_path, direction="AtoA")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="foreign.safetensors.*not a fastcgan generator"):
        load_generator(foreign)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_generator(junk)
    # Weights that do not fit the stored config.
    g = build_generator("resnet_6blocks", ngf=2)
    bad = tmp_path / "mismatch.safetensors"
    save_file(
        {k: v.contiguous() for k, v in g.state_dict().items()},
        bad,
        metadata={
            "format": "fastcgan.generator",
            "format_version": "1",
            "config": json.dumps(dict(g.config, arch="resnet_9blocks")),
        },
    )
    with pytest.raises(ValueError, match="mismatch.safetensors.*do not match"):
        load_generator(bad)
    with pytest.raises(ValueError, match="config"):
        save_generator(g, tmp_path / "x.safetensors", {"arch": "resnet_6blocks"})
    with pytest.raises(ValueError, match="pass config"):
        save_generator(nn.Conv2d(1, 1, 1), tmp_path / "y.safetensors")
