"""Official pytorch-CycleGAN-and-pix2pix checkpoints <-> our generators.

The official networks are re-stated here from their documented module order (nn.Sequential of
ReflectionPad2d, Conv2d, norm, ReLU, ResnetBlock(conv_block) ..., nested U-Net skip blocks with
the in-place LeakyReLU), so their state-dict keys are genuine and their forward is the
torch-only reference our fused generators must reproduce."""

import os

import pytest
import torch
from tolerances import tol
from torch import nn

from fastcgan.models import (
    build_generator,
    load_official_generator,
    official_state_dict,
    save_official_generator,
)


# ------------------------------------------------------------------------------------------------
# Official layout, re-stated
# ------------------------------------------------------------------------------------------------
def _norm_layer(norm):
    if norm == "instance":
        return lambda c: nn.InstanceNorm2d(c, affine=False, track_running_stats=False)
    if norm == "batch":
        return lambda c: nn.BatchNorm2d(c, affine=True)
    return lambda c: nn.Identity()


class OfficialResnetBlock(nn.Module):
    def __init__(self, dim, norm, use_dropout):
        super().__init__()
        nl, bias = _norm_layer(norm), norm == "instance"
        layers = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), nl(dim), nn.ReLU(True)]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), nl(dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv_block(x)


class OfficialResnetGenerator(nn.Module):
    def __init__(self, input_nc, output_nc, ngf, norm, use_dropout, n_blocks):
        super().__init__()
        nl, bias = _norm_layer(norm), norm == "instance"
        m = [nn.ReflectionPad2d(3), nn.Conv2d(input_nc, ngf, 7, bias=bias), nl(ngf), nn.ReLU(True)]
        for i in range(2):
            c = ngf * 2**i
            m += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=bias), nl(2 * c), nn.ReLU(True)]
        m += [OfficialResnetBlock(4 * ngf, norm, use_dropout) for _ in range(n_blocks)]
        for i in range(2):
            c = ngf * 2 ** (2 - i)
            m += [
                nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                nl(c // 2),
                nn.ReLU(True),
            ]
        m += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
        self.model = nn.Sequential(*m)

    def forward(self, x):
        return self.model(x)


class OfficialUnetBlock(nn.Module):
    def __init__(
        self,
        outer,
        inner,
        input_nc=None,
        sub=None,
        outermost=False,
        innermost=False,
        norm="instance",
        use_dropout=False,
    ):
        super().__init__()
        self.outermost = outermost
        nl, bias = _norm_layer(norm), norm == "instance"
        input_nc = outer if input_nc is None else input_nc
        downconv = nn.Conv2d(input_nc, inner, 4, stride=2, padding=1, bias=bias)
        if outermost:
            model = [downconv, sub, nn.ReLU(True), nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1), nn.Tanh()]
        elif innermost:
            model = [
                nn.LeakyReLU(0.2, True),
                downconv,
                nn.ReLU(True),
                nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=bias),
                nl(outer),
            ]
        else:
            model = [
                nn.LeakyReLU(0.2, True),
                downconv,
                nl(inner),
                sub,
                nn.ReLU(True),
                nn.ConvTranspose2d(2 * inner, outer, 4, 2, 1, bias=bias),
                nl(outer),
            ]
            if use_dropout:
                model.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*model)

    def forward(self, x):
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)  # x was LeakyReLU'd in place by self.model


class OfficialUnetGenerator(nn.Module):
    def __init__(self, input_nc, output_nc, num_downs, ngf, norm, use_dropout):
        super().__init__()
        b = OfficialUnetBlock(8 * ngf, 8 * ngf, innermost=True, norm=norm)
        for _ in range(num_downs - 5):
            b = OfficialUnetBlock(8 * ngf, 8 * ngf, sub=b, norm=norm, use_dropout=use_dropout)
        b = OfficialUnetBlock(4 * ngf, 8 * ngf, sub=b, norm=norm)
        b = OfficialUnetBlock(2 * ngf, 4 * ngf, sub=b, norm=norm)
        b = OfficialUnetBlock(ngf, 2 * ngf, sub=b, norm=norm)
        self.model = OfficialUnetBlock(output_nc, ngf, input_nc=input_nc, sub=b, outermost=True, norm=norm)

    def forward(self, x):
        return self.model(x)


def official(arch, ngf, norm="instance", use_dropout=False, input_nc=3, output_nc=3):
    if arch.startswith("resnet"):
        net = OfficialResnetGenerator(input_nc, output_nc, ngf, norm, use_dropout, 9 if "9" in arch else 6)
    else:
        net = OfficialUnetGenerator(
            input_nc, output_nc, 7 if arch == "unet_128" else 8, ngf, norm, use_dropout
        )
    return randomise_bn(net)


def randomise_bn(net):
    """Non-trivial BatchNorm statistics and affine parameters (of the official and of our BN layers)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return net


CASES = [  # (arch, ngf, norm, use_dropout, input H, W)
    ("resnet_6blocks", 8, "instance", False, 36, 44),
    ("resnet_9blocks", 8, "instance", True, 32, 28),
    ("resnet_6blocks", 8, "batch", False, 24, 20),
    ("resnet_6blocks", 8, "none", True, 20, 24),
    ("unet_128", 4, "instance", False, 128, 128),
    ("unet_128", 4, "batch", True, 128, 256),
    ("unet_256", 2, "instance", True, 256, 256),
]


def _ids(c):
    return f"{c[0]}-ngf{c[1]}-{c[2]}{'-dropout' if c[3] else ''}"


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_load_gives_official_outputs(case, backend):
    """``torch``: the same arithmetic as the official network (fused pads move values, they do
    not compute), so equal to fp32 rounding; ``auto``: whatever kernel backend runs here.
    BatchNorm: the eval-mode (running statistics) behaviour; the default per-image statistics
    are tested against the official train-mode forward in test_pix2pix_models.py."""
    arch, ngf, norm, dropout, h, w = case
    torch.manual_seed(0)
    ref = official(arch, ngf, norm, dropout).eval()
    ours = load_official_generator(
        ref.state_dict(),
        arch,
        ngf=ngf,
        norm=norm,
        use_dropout=None if arch.startswith("resnet") else dropout,
        backend=backend,
        bn_inference="running",
    )
    assert not ours.training
    if arch.startswith("resnet"):
        assert ours.use_dropout == dropout  # read from the keys
    x = torch.rand(2, 3, h, w) * 2 - 1
    t = dict(atol=1e-6, rtol=1e-6) if backend == "torch" else tol(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), **t)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("arch,ngf,size", [("resnet_9blocks", 16, 64), ("unet_256", 4, 256)])
def test_cuda_matches_official(arch, ngf, size, backend):
    torch.manual_seed(0)
    ref = official(arch, ngf).cuda().eval()
    ours = load_official_generator(ref.state_dict(), arch, ngf=ngf, backend=backend).cuda()
    x = torch.rand(2, 3, size, size, device="cuda") * 2 - 1
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # same fp32 convolutions on both sides
    try:
        with torch.no_grad():
            torch.testing.assert_close(ours(x), ref(x), **tol(torch.float32))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y16, r16 = ours(x), ref(x)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    torch.testing.assert_close(y16.float(), r16.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("case", [c for c in CASES if c[3] and c[2] != "batch"], ids=_ids)
def test_training_mode_dropout_matches_official(case):
    """Same seed, same dropout masks: our dropout draws one mask of the official shape in the
    official order (the ResNet block's mask is reflection-padded with the activation)."""
    arch, ngf, norm, _, h, w = case
    torch.manual_seed(0)
    ref = official(arch, ngf, norm, True).train()
    ours = load_official_generator(
        ref.state_dict(), arch, ngf=ngf, norm=norm, use_dropout=True, backend="torch"
    ).train()
    x = torch.rand(1, 3, h, w) * 2 - 1
    torch.manual_seed(123)
    y_ref = ref(x)
    torch.manual_seed(123)
    y = ours(x)
    torch.testing.assert_close(y, y_ref, **tol(torch.float32))
    torch.manual_seed(124)
    assert not torch.allclose(ours(x), y, atol=1e-3), "dropout had no effect in training mode"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_save_round_trip_official_keys(case, tmp_path):
    arch, ngf, norm, dropout, _, _ = case
    torch.manual_seed(1)
    ours = build_generator(arch, ngf=ngf, norm=norm, use_dropout=dropout, backend="torch")
    path = tmp_path / "latest_net_G_A.pth"
    save_official_generator(ours, path)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    ref = official(arch, ngf, norm, dropout)
    assert list(saved.keys()) == list(ref.state_dict().keys())
    ref.load_state_dict(saved, strict=True)
    for k, v in official_state_dict(ours).items():
        assert torch.equal(saved[k], v), k
    back = load_official_generator(str(path), arch, ngf=ngf, norm=norm, use_dropout=dropout, backend="torch")
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1


def test_dataparallel_prefix_metadata_and_stale_instance_stats():
    torch.manual_seed(2)
    ref = official("resnet_6blocks", 8).eval()
    sd = {f"module.{k}": v for k, v in ref.state_dict().items()}
    sd["__metadata"] = torch.zeros(1)
    # Checkpoints from PyTorch 0.4 kept running stats in affine-free InstanceNorm layers.
    sd["module.model.2.running_mean"] = torch.zeros(8)
    sd["module.model.10.conv_block.2.running_var"] = torch.ones(32)
    sd["module.model.10.conv_block.2.num_batches_tracked"] = torch.tensor(3)
    ours = load_official_generator(sd, "resnet_6blocks", ngf=8, backend="torch")
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), **tol(torch.float32))


def test_load_from_file(tmp_path):
    torch.manual_seed(3)
    ref = official("unet_128", 4, "instance").eval()
    path = tmp_path / "net.pth"
    torch.save(ref.state_dict(), path)
    ours = load_official_generator(path, "unet_128", ngf=4, backend="torch")
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), **tol(torch.float32))


def test_clear_errors(tmp_path):
    sd = official("resnet_6blocks", 8).state_dict()
    with pytest.raises(ValueError, match="6 blocks"):
        load_official_generator(sd, "resnet_9blocks", ngf=8)
    with pytest.raises(ValueError, match="model.1.weight has shape"):
        load_official_generator(sd, "resnet_6blocks", ngf=16)
    with pytest.raises(ValueError, match="use_dropout"):
        load_official_generator(sd, "resnet_6blocks", ngf=8, use_dropout=True)
    with pytest.raises(ValueError, match="not an official"):
        load_official_generator(sd, "resnet_6blocks", ngf=8, norm="batch")
    with pytest.raises(ValueError, match="U-Net with 7 levels"):
        load_official_generator(official("unet_128", 2).state_dict(), "unet_256", ngf=2)
    with pytest.raises(ValueError, match="conv_block"):
        load_official_generator(official("unet_128", 2).state_dict(), "resnet_9blocks", ngf=2)
    missing = os.path.join(tmp_path, "nope.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_official_generator(missing)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        load_official_generator(bad)
    with pytest.raises(TypeError, match="UdacityGenerator"):
        official_state_dict(build_generator("udacity", ngf=4))


@pytest.mark.parametrize("saved, asked", [("instance", "none"), ("batch", "none"), ("none", "batch")])
def test_another_norm_than_the_files_names_the_keys(tmp_path, saved, asked):
    """--norm none on an instance- or batch-norm checkpoint was a KeyError ('stem.conv.bias',
    'stem.norm.weight') from fastcgan-export; it is a ValueError naming the keys, as other mismatches."""
    from fastcgan.models import build_generator, save_official_generator
    from fastcgan.models.official import load_official_generator

    pth = tmp_path / "latest_net_G.pth"
    save_official_generator(build_generator("resnet_6blocks", ngf=4, norm=saved), pth)
    with pytest.raises(ValueError, match=r"not an official resnet_6blocks \(norm='" + asked + r"'.*unexpected keys"):
        load_official_generator(str(pth), arch="resnet_6blocks", norm=asked)
