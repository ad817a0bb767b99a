"""The official pix2pix training iteration, restated for benchmarking (eager, fp32).

A re-statement of what ``Pix2PixModel.optimize_parameters`` in the official
pytorch-CycleGAN-and-pix2pix repository does per iteration, written from its description, with
the costs that matter for speed kept as they are there:

* the U-Net generator as nested skip-connection blocks in ``nn.Sequential`` (each level: in-place
  ``LeakyReLU(0.2)``, stride-2 4x4 conv, ``BatchNorm2d``, the inner block, ``ReLU``, stride-2 4x4
  transposed conv, ``BatchNorm2d``, ``Dropout(0.5)`` on the innermost three non-innermost levels;
  the output concatenated with the level's input); no conv bias before a BatchNorm;
* the conditional 70x70 PatchGAN on ``cat(A, B)`` (6 channels) with BatchNorm;
* ``forward()`` (``fake_B = G(real_A)``); then the discriminator: ``D(cat(A, fake_B).detach())``
  and ``D(cat(A, B))`` as two calls, vanilla GAN loss (``BCEWithLogitsLoss`` against a target
  tensor expanded each call), ``x 0.5``, backward, ``opt_D.step()``; then the generator against
  the updated, frozen D: GAN + ``lambda_L1`` x L1, backward, ``opt_G.step()``;
* Adam without fused/foreach flags (torch's default).

What is timed: :meth:`OfficialPix2Pix.optimize_parameters` on a batch already on the device
(the official loop's ``get_current_losses()`` every ``print_freq`` iterations is left out, as in
``official_step.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from baselines.official_step import init_normal


class UnetBlock(nn.Module):
    """One level of the U-Net: ``cat([x, up(inner(down(x)))])`` (the outermost level returns the
    output alone)."""

    def __init__(self, outer_nc: int, inner_nc: int, input_nc: int | None = None, submodule=None,
                 outermost: bool = False, innermost: bool = False, use_dropout: bool = False):
        super().__init__()
        self.outermost = outermost
        input_nc = outer_nc if input_nc is None else input_nc
        downconv = nn.Conv2d(input_nc, inner_nc, 4, stride=2, padding=1, bias=False)
        downrelu, downnorm = nn.LeakyReLU(0.2, True), nn.BatchNorm2d(inner_nc)
        uprelu, upnorm = nn.ReLU(True), nn.BatchNorm2d(outer_nc)
        if outermost:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1)
            layers = [downconv, submodule, uprelu, upconv, nn.Tanh()]
        elif innermost:
            upconv = nn.ConvTranspose2d(inner_nc, outer_nc, 4, stride=2, padding=1, bias=False)
            layers = [downrelu, downconv, uprelu, upconv, upnorm]
        else:
            upconv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, 4, stride=2, padding=1, bias=False)
            layers = [downrelu, downconv, downnorm, submodule, uprelu, upconv, upnorm]
            if use_dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


def unet_generator(input_nc: int = 3, output_nc: int = 3, num_downs: int = 8, ngf: int = 64,
                   use_dropout: bool = True) -> nn.Module:
    """The official UnetGenerator with BatchNorm (``unet_256``: 8 levels, ``unet_128``: 7)."""
    block = UnetBlock(ngf * 8, ngf * 8, innermost=True)
    for _ in range(num_downs - 5):
        block = UnetBlock(ngf * 8, ngf * 8, submodule=block, use_dropout=use_dropout)
    block = UnetBlock(ngf * 4, ngf * 8, submodule=block)
    block = UnetBlock(ngf * 2, ngf * 4, submodule=block)
    block = UnetBlock(ngf, ngf * 2, submodule=block)
    return UnetBlock(output_nc, ngf, input_nc=input_nc, submodule=block, outermost=True)


def patchgan_batchnorm(input_nc: int = 6, ndf: int = 64, n_layers: int = 3) -> nn.Module:
    """The official 70x70 PatchGAN with BatchNorm (no conv bias before a norm)."""
    layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2**n, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2 if n < n_layers else 1, padding=1, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
        ]
    layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
    return nn.Sequential(*layers)


def _init(net: nn.Module) -> nn.Module:
    """The official ``normal`` init: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02)."""
    init_normal(net)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return net


class GANLoss(nn.Module):
    """Vanilla GAN loss with a target tensor expanded to the prediction's shape each call."""

    def __init__(self):
        super().__init__()
        self.register_buffer("real_label", torch.tensor(1.0))
        self.register_buffer("fake_label", torch.tensor(0.0))
        self.loss = nn.BCEWithLogitsLoss()

    def forward(self, pred: Tensor, target_is_real: bool) -> Tensor:
        return self.loss(pred, (self.real_label if target_is_real else self.fake_label).expand_as(pred))


class OfficialPix2Pix:
    """State and the iteration of the official pix2pix model."""

    def __init__(self, device, input_nc: int = 3, output_nc: int = 3, ngf: int = 64, ndf: int = 64,
                 num_downs: int = 8, lr: float = 2e-4, lambda_L1: float = 100.0):
        self.netG = _init(unet_generator(input_nc, output_nc, num_downs, ngf)).to(device)
        self.netD = _init(patchgan_batchnorm(input_nc + output_nc, ndf)).to(device)
        self.criterionGAN = GANLoss().to(device)
        self.criterionL1 = nn.L1Loss()
        self.optimizer_G = torch.optim.Adam(self.netG.parameters(), lr=lr, betas=(0.5, 0.999))
        self.optimizer_D = torch.optim.Adam(self.netD.parameters(), lr=lr, betas=(0.5, 0.999))
        self.lambda_L1 = lambda_L1

    def set_input(self, real_A: Tensor, real_B: Tensor) -> None:
        self.real_A, self.real_B = real_A, real_B

    @staticmethod
    def set_requires_grad(net: nn.Module, requires_grad: bool) -> None:
        for p in net.parameters():
            p.requires_grad = requires_grad

    def forward(self) -> None:
        self.fake_B = self.netG(self.real_A)

    def backward_D(self) -> None:
        fake_AB = torch.cat((self.real_A, self.fake_B), 1)
        self.loss_D_fake = self.criterionGAN(self.netD(fake_AB.detach()), False)
        real_AB = torch.cat((self.real_A, self.real_B), 1)
        self.loss_D_real = self.criterionGAN(self.netD(real_AB), True)
        self.loss_D = (self.loss_D_fake + self.loss_D_real) * 0.5
        self.loss_D.backward()

    def backward_G(self) -> None:
        fake_AB = torch.cat((self.real_A, self.fake_B), 1)
        self.loss_G_GAN = self.criterionGAN(self.netD(fake_AB), True)
        self.loss_G_L1 = self.criterionL1(self.fake_B, self.real_B) * self.lambda_L1
        self.loss_G = self.loss_G_GAN + self.loss_G_L1
        self.loss_G.backward()

    def optimize_parameters(self) -> None:
        self.forward()
        self.set_requires_grad(self.netD, True)
        self.optimizer_D.zero_grad()
        self.backward_D()
        self.optimizer_D.step()
        self.set_requires_grad(self.netD, False)
        self.optimizer_G.zero_grad()
        self.backward_G()
        self.optimizer_G.step()
