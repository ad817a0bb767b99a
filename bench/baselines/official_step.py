"""The official CycleGAN training iteration, restated for benchmarking (eager, fp32).

A re-statement of what ``CycleGANModel.optimize_parameters`` in the official
pytorch-CycleGAN-and-pix2pix repository does per iteration, written from its description, with
the costs that matter for speed kept as they are there:

* networks built from ``nn.ReflectionPad2d``, ``nn.Conv2d``, ``nn.InstanceNorm2d(affine=False)``,
  ``nn.ReLU(True)`` / ``nn.LeakyReLU(0.2, True)`` modules in ``nn.Sequential`` (every pad, norm and
  activation its own kernel(s));
* ``forward()`` (fake_B, rec_A, fake_A, rec_B), then the generators' loss with identity terms and
  one backward, ``opt_G.step()``;
* the image pool as a per-image Python loop (``random.uniform`` / ``random.randint`` on the host,
  ``torch.cat`` of the returned images);
* ``backward_D_A`` and ``backward_D_B``: two separate discriminator backward calls, each on
  ``D(real)`` and ``D(fake.detach())`` run separately, then ``opt_D.step()``;
* ``GANLoss`` building its target tensor with ``expand_as`` each call; Adam without fused/foreach
  flags (torch's default).

What is timed: :meth:`OfficialCycleGAN.optimize_parameters` on a batch already on the device. The
official loop additionally calls ``get_current_losses()`` (one ``.item()`` per loss) every
``print_freq`` = 100 iterations, i.e. amortised to nearly nothing, so it is *not* part of the timed
step here.
"""

from __future__ import annotations

import random

import torch
from torch import Tensor, nn


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, use_dropout: bool = False):
        super().__init__()
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=True),
            nn.InstanceNorm2d(dim),
            nn.ReLU(True),
        ]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=True), nn.InstanceNorm2d(dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv_block(x)


def resnet_generator(input_nc: int = 3, output_nc: int = 3, ngf: int = 64, n_blocks: int = 9) -> nn.Module:
    """The official ResnetGenerator with InstanceNorm (conv biases on, as the official code does
    for InstanceNorm)."""
    layers: list[nn.Module] = [
        nn.ReflectionPad2d(3),
        nn.Conv2d(input_nc, ngf, 7, bias=True),
        nn.InstanceNorm2d(ngf),
        nn.ReLU(True),
    ]
    for i in range(2):
        m = 2**i
        layers += [
            nn.Conv2d(ngf * m, ngf * m * 2, 3, stride=2, padding=1, bias=True),
            nn.InstanceNorm2d(ngf * m * 2),
            nn.ReLU(True),
        ]
    for _ in range(n_blocks):
        layers.append(ResnetBlock(ngf * 4))
    for i in range(2):
        m = 2 ** (2 - i)
        layers += [
            nn.ConvTranspose2d(ngf * m, ngf * m // 2, 3, stride=2, padding=1, output_padding=1, bias=True),
            nn.InstanceNorm2d(ngf * m // 2),
            nn.ReLU(True),
        ]
    layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7), nn.Tanh()]
    return nn.Sequential(*layers)


def nlayer_discriminator(input_nc: int = 3, ndf: int = 64, n_layers: int = 3) -> nn.Module:
    """The official 70x70 PatchGAN (``n_layers=3``) with InstanceNorm."""
    layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2**n, 8)
        stride = 2 if n < n_layers else 1
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=True),
            nn.InstanceNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
        ]
    layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
    return nn.Sequential(*layers)


def init_normal(net: nn.Module, gain: float = 0.02) -> nn.Module:
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


class ImagePool:
    """The per-image host-side loop of the official pool."""

    def __init__(self, pool_size: int = 50):
        self.pool_size = pool_size
        self.images: list[Tensor] = []

    def query(self, images: Tensor) -> Tensor:
        if self.pool_size == 0:
            return images
        out = []
        for image in images:
            image = torch.unsqueeze(image.data, 0)
            if len(self.images) < self.pool_size:
                self.images.append(image)
                out.append(image)
            elif random.uniform(0, 1) > 0.5:
                i = random.randint(0, self.pool_size - 1)
                old = self.images[i].clone()
                self.images[i] = image
                out.append(old)
            else:
                out.append(image)
        return torch.cat(out, 0)


class GANLoss(nn.Module):
    """LSGAN loss with a target tensor expanded to the prediction's shape each call."""

    def __init__(self):
        super().__init__()
        self.register_buffer("real_label", torch.tensor(1.0))
        self.register_buffer("fake_label", torch.tensor(0.0))
        self.loss = nn.MSELoss()

    def forward(self, pred: Tensor, target_is_real: bool) -> Tensor:
        target = (self.real_label if target_is_real else self.fake_label).expand_as(pred)
        return self.loss(pred, target)


class OfficialCycleGAN:
    """State and the iteration of the official CycleGAN model (``G_A``: A->B, ``D_A`` judges B)."""

    def __init__(
        self,
        device,
        input_nc: int = 3,
        ngf: int = 64,
        ndf: int = 64,
        n_blocks: int = 9,
        lr: float = 2e-4,
        lambda_A: float = 10.0,
        lambda_B: float = 10.0,
        lambda_idt: float = 0.5,
        pool_size: int = 50,
        amp: bool = False,
        compile: bool = False,
    ):
        """``amp`` / ``compile``: the switches any PyTorch user can add to the official code
        (bf16 autocast around the iteration, ``torch.compile`` of each network), to tell them
        apart from what fastcgan's own kernels, data path and step add."""
        self.netG_A = init_normal(resnet_generator(input_nc, input_nc, ngf, n_blocks)).to(device)
        self.netG_B = init_normal(resnet_generator(input_nc, input_nc, ngf, n_blocks)).to(device)
        self.netD_A = init_normal(nlayer_discriminator(input_nc, ndf)).to(device)
        self.netD_B = init_normal(nlayer_discriminator(input_nc, ndf)).to(device)
        self.device_type = torch.device(device).type
        self.amp = amp
        self._call = {name: getattr(self, name) for name in ("netG_A", "netG_B", "netD_A", "netD_B")}
        if compile:
            self._call = {name: torch.compile(net) for name, net in self._call.items()}
        self.criterionGAN = GANLoss().to(device)
        self.criterionCycle = nn.L1Loss()
        self.criterionIdt = nn.L1Loss()
        self.optimizer_G = torch.optim.Adam(
            list(self.netG_A.parameters()) + list(self.netG_B.parameters()), lr=lr, betas=(0.5, 0.999)
        )
        self.optimizer_D = torch.optim.Adam(
            list(self.netD_A.parameters()) + list(self.netD_B.parameters()), lr=lr, betas=(0.5, 0.999)
        )
        self.fake_A_pool = ImagePool(pool_size)
        self.fake_B_pool = ImagePool(pool_size)
        self.lambda_A, self.lambda_B, self.lambda_idt = lambda_A, lambda_B, lambda_idt

    def set_input(self, real_A: Tensor, real_B: Tensor) -> None:
        self.real_A, self.real_B = real_A, real_B

    @staticmethod
    def set_requires_grad(nets, requires_grad: bool) -> None:
        for net in nets:
            for p in net.parameters():
                p.requires_grad = requires_grad

    def forward(self) -> None:
        G_A, G_B = self._call["netG_A"], self._call["netG_B"]
        self.fake_B = G_A(self.real_A)
        self.rec_A = G_B(self.fake_B)
        self.fake_A = G_B(self.real_B)
        self.rec_B = G_A(self.fake_A)

    def backward_D_basic(self, netD: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
        loss_D_real = self.criterionGAN(netD(real), True)
        loss_D_fake = self.criterionGAN(netD(fake.detach()), False)
        loss_D = (loss_D_real + loss_D_fake) * 0.5
        loss_D.backward()
        return loss_D

    def backward_D_A(self) -> None:
        fake_B = self.fake_B_pool.query(self.fake_B)
        self.loss_D_A = self.backward_D_basic(self._call["netD_A"], self.real_B, fake_B)

    def backward_D_B(self) -> None:
        fake_A = self.fake_A_pool.query(self.fake_A)
        self.loss_D_B = self.backward_D_basic(self._call["netD_B"], self.real_A, fake_A)

    def backward_G(self) -> None:
        if self.lambda_idt > 0:
            self.idt_A = self._call["netG_A"](self.real_B)
            self.loss_idt_A = self.criterionIdt(self.idt_A, self.real_B) * self.lambda_B * self.lambda_idt
            self.idt_B = self._call["netG_B"](self.real_A)
            self.loss_idt_B = self.criterionIdt(self.idt_B, self.real_A) * self.lambda_A * self.lambda_idt
        else:
            self.loss_idt_A = self.loss_idt_B = 0
        self.loss_G_A = self.criterionGAN(self._call["netD_A"](self.fake_B), True)
        self.loss_G_B = self.criterionGAN(self._call["netD_B"](self.fake_A), True)
        self.loss_cycle_A = self.criterionCycle(self.rec_A, self.real_A) * self.lambda_A
        self.loss_cycle_B = self.criterionCycle(self.rec_B, self.real_B) * self.lambda_B
        self.loss_G = (
            self.loss_G_A
            + self.loss_G_B
            + self.loss_cycle_A
            + self.loss_cycle_B
            + self.loss_idt_A
            + self.loss_idt_B
        )
        self.loss_G.backward()

    def optimize_parameters(self) -> None:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.amp):
            self._iteration()

    def _iteration(self) -> None:
        self.forward()
        self.set_requires_grad([self.netD_A, self.netD_B], False)
        self.optimizer_G.zero_grad()
        self.backward_G()
        self.optimizer_G.step()
        self.set_requires_grad([self.netD_A, self.netD_B], True)
        self.optimizer_D.zero_grad()
        self.backward_D_A()
        self.backward_D_B()
        self.optimizer_D.step()


def train_official(A: Tensor, B: Tensor, steps: int, seed: int, **model_kw):
    """Train an :class:`OfficialCycleGAN` for ``steps`` iterations at batch 1 on the image tensors
    ``A`` / ``B`` ((N, 3, H, W) in [-1, 1]) the way the official loader feeds it: A shuffled each
    epoch, B drawn at random, each flipped left-right with probability 1/2; every draw from one
    generator seeded with ``seed`` (torch's and Python's global RNGs too: initialisation and the
    image pool). Returns ``(model, generators before training (copies), seconds)``."""
    import copy
    import time

    torch.manual_seed(seed)
    random.seed(seed)  # the official image pool draws from Python's random
    model = OfficialCycleGAN(A.device, **model_kw)
    before = (copy.deepcopy(model.netG_A), copy.deepcopy(model.netG_B))
    g = torch.Generator().manual_seed(seed)
    perm, k = torch.randperm(len(A), generator=g), 0
    t0 = time.perf_counter()
    for _ in range(steps):
        if k == len(perm):
            perm, k = torch.randperm(len(A), generator=g), 0
        a = A[perm[k] : perm[k] + 1]
        k += 1
        b = B[torch.randint(len(B), (1,), generator=g)]
        flips = torch.rand(2, generator=g) < 0.5
        model.set_input(a.flip(-1) if flips[0] else a, b.flip(-1) if flips[1] else b)
        model.optimize_parameters()
    return model, before, time.perf_counter() - t0
