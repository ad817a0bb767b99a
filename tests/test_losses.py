import math

import pytest
import torch
import torch.nn.functional as F

from fastcgan.losses import (
    cycle_loss,
    discriminator_loss,
    gan_loss,
    generator_gan_loss,
    gradient_penalty,
    identity_loss,
)
from fastcgan.models import build_discriminator
from fastcgan.nn import set_backend

PRED = torch.tensor([[-1.0, 0.0], [0.5, 2.0]])  # mean 0.375


def test_lsgan_values():
    # real: ((-2)^2 + 1 + 0.25 + 1) / 4 ; fake: (1 + 0 + 0.25 + 4) / 4
    assert gan_loss(PRED, True, "lsgan").item() == pytest.approx(6.25 / 4)
    assert gan_loss(PRED, False, "lsgan").item() == pytest.approx(5.25 / 4)


def sp(z):
    return math.log1p(math.exp(z))  # softplus


def test_vanilla_values():
    vals = PRED.flatten().tolist()
    assert gan_loss(PRED, True, "vanilla").item() == pytest.approx(sum(sp(-v) for v in vals) / 4, rel=1e-6)
    assert gan_loss(PRED, False, "vanilla").item() == pytest.approx(sum(sp(v) for v in vals) / 4, rel=1e-6)


def test_hinge_values():
    # D real: relu(1 - p) = 2, 1, 0.5, 0 ; D fake: relu(1 + p) = 0, 1, 1.5, 3
    assert gan_loss(PRED, True, "hinge").item() == pytest.approx(3.5 / 4)
    assert gan_loss(PRED, False, "hinge").item() == pytest.approx(5.5 / 4)
    assert generator_gan_loss(PRED, "hinge").item() == pytest.approx(-0.375)
    with pytest.raises(ValueError, match="hinge"):
        gan_loss(PRED, False, "hinge", for_discriminator=False)


def test_wgangp_values():
    assert gan_loss(PRED, True, "wgangp").item() == pytest.approx(-0.375)
    assert gan_loss(PRED, False, "wgangp").item() == pytest.approx(0.375)
    assert generator_gan_loss(PRED, "wgangp").item() == pytest.approx(-0.375)


@pytest.mark.parametrize("mode", ["lsgan", "vanilla", "nonsaturating", "hinge", "wgangp"])
def test_discriminator_loss_is_official_half_sum(mode):
    real, fake = torch.randn(2, 1, 5, 5), torch.randn(2, 1, 5, 5)
    expect = 0.5 * (gan_loss(real, True, mode) + gan_loss(fake, False, mode))
    torch.testing.assert_close(discriminator_loss(real, fake, mode), expect)


def test_generator_loss_lsgan_vanilla_score_fakes_as_real():
    torch.testing.assert_close(generator_gan_loss(PRED, "lsgan"), gan_loss(PRED, True, "lsgan"))
    torch.testing.assert_close(generator_gan_loss(PRED, "vanilla"), gan_loss(PRED, True, "vanilla"))


def test_nonsaturating_is_the_official_cut_softplus_loss():
    """The official CUT's nonsaturating mode: softplus(-pred) for a real target, softplus(pred) for a
    fake one, per-sample means then the batch mean."""
    pred = torch.randn(3, 1, 5, 4)
    for real, want in ((True, F.softplus(-pred)), (False, F.softplus(pred))):
        torch.testing.assert_close(gan_loss(pred, real, "nonsaturating"), want.view(3, -1).mean(1).mean())
    torch.testing.assert_close(generator_gan_loss(pred, "nonsaturating"), F.softplus(-pred).mean())


def test_low_precision_input_reduced_in_fp32():
    p = PRED.to(torch.bfloat16)
    out = gan_loss(p, True, "lsgan")
    assert out.dtype == torch.float32 and out.item() == pytest.approx(6.25 / 4)


def test_unknown_mode():
    with pytest.raises(ValueError, match="gan mode"):
        gan_loss(PRED, True, "wgan")


def test_cycle_and_identity_values():
    a = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    b = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # |d| = 1, 2, 1, 2 ; d^2 = 1, 4, 1, 4
    assert cycle_loss(a, b).item() == pytest.approx(1.5)
    assert cycle_loss(a, b, "l2").item() == pytest.approx(2.5)
    assert identity_loss(a, b).item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match="kind"):
        cycle_loss(a, b, "l3")
    with pytest.raises(ValueError, match="shape"):
        cycle_loss(a, b[:1])


def test_losses_are_differentiable_pure_tensors():
    p = torch.randn(3, 1, 4, 4, requires_grad=True)
    for mode in ("lsgan", "vanilla", "hinge", "wgangp"):
        loss = discriminator_loss(p, p * 0.5, mode) + generator_gan_loss(p, mode)
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad
        (g,) = torch.autograd.grad(loss, p)
        assert torch.isfinite(g).all()


class Linear1(torch.nn.Module):
    """D(x) = sum(w * x): grad_x D = w for every sample, so the penalty is known in closed form."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)


@pytest.mark.parametrize("kind", ["real", "fake", "mixed"])
def test_gradient_penalty_closed_form(kind):
    w = torch.tensor([[[3.0, 0.0], [0.0, 4.0]]])  # ||w|| = 5
    d = Linear1(w)
    real, fake = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    gp = gradient_penalty(d, real, fake, kind=kind, constant=1.0, lambda_gp=10.0)
    assert gp.item() == pytest.approx(10.0 * (5.0 - 1.0) ** 2, rel=1e-5)
    # d(gp)/dw = lambda * 2 (||w|| - c) w / ||w||  (create_graph=True makes this reachable)
    (gw,) = torch.autograd.grad(gp, d.w)
    torch.testing.assert_close(gw, 10.0 * 2 * 4.0 * w / 5.0)


class Quadratic(torch.nn.Module):
    """D(x) = sum(x^2) / 2: grad_x D = x, so the penalty is taken where x is."""

    def forward(self, x):
        return (x * x).flatten(1).sum(1) / 2


def test_gradient_penalty_is_taken_where_it_says():
    """real / fake / mixed: the norm of grad_x D at the real images, the fakes, or each sample's
    uniform interpolation alpha * real + (1 - alpha) * fake (alpha from the generator given)."""
    real, fake = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)

    def penalty_at(x):  # lambda * mean((||x|| - 1)^2): Quadratic's gradient at x is x
        return 10.0 * ((x.flatten(1).norm(dim=1) - 1.0) ** 2).mean()

    assert gradient_penalty(Quadratic(), real, fake, kind="real").item() == pytest.approx(penalty_at(real).item())
    assert gradient_penalty(Quadratic(), real, fake, kind="fake").item() == pytest.approx(penalty_at(fake).item())
    alpha = torch.rand(3, 1, 1, 1, generator=torch.Generator().manual_seed(5))
    got = gradient_penalty(Quadratic(), real, fake, kind="mixed", generator=torch.Generator().manual_seed(5))
    assert got.item() == pytest.approx(penalty_at(alpha * real + (1 - alpha) * fake).item(), rel=1e-6)
    assert got.item() != pytest.approx(penalty_at(real).item(), rel=1e-3)


def test_gradient_penalty_changes_discriminator_gradients():
    torch.manual_seed(0)
    d = build_discriminator("basic", ndf=4, backend="torch")
    real, fake = torch.rand(2, 3, 35, 35) * 2 - 1, torch.rand(2, 3, 35, 35) * 2 - 1
    loss = discriminator_loss(d(real), d(fake), "wgangp")
    params = [p for p in d.parameters()]
    g0 = torch.autograd.grad(loss, params, retain_graph=True)
    gp = gradient_penalty(d, real, fake, generator=torch.Generator().manual_seed(0))
    assert gp.item() > 0
    g1 = torch.autograd.grad(loss + gp, params)
    gp_grads = torch.autograd.grad(
        gradient_penalty(d, real, fake, generator=torch.Generator().manual_seed(0)), params, allow_unused=True
    )
    # grad_x D does not depend on the last bias (nor, through InstanceNorm, on the biases before
    # it), but it does on every convolution weight.
    for p, a, b, c in zip(params, g0, g1, gp_grads):
        c = torch.zeros_like(p) if c is None else c
        torch.testing.assert_close(b, a + c, rtol=1e-4, atol=1e-6)
        if p.dim() == 4:
            assert not torch.allclose(a, b), "the penalty did not change a conv weight's gradient"
    # Inputs are detached: no gradient reaches the generator's outputs through the penalty.
    fake_g = fake.clone().requires_grad_(True)
    gp2 = gradient_penalty(d, real, fake_g)
    assert torch.autograd.grad(gp2, fake_g, allow_unused=True)[0] is None


def test_gradient_penalty_is_the_same_on_a_kernel_backend():
    """It refused any discriminator not on the torch backend (the kernels' backward had no
    graph); the op now differentiates the reference there, so the penalty and its gradients
    match the torch backend's."""
    torch.manual_seed(0)
    d = build_discriminator("basic", ndf=4, norm="instance", backend="torch").double()
    real, fake = torch.rand(2, 3, 35, 35, dtype=torch.float64), torch.rand(2, 3, 35, 35, dtype=torch.float64)
    got = {}
    for backend in ("torch", "cpp"):
        set_backend(d, backend)
        gp = gradient_penalty(d, real, fake, generator=torch.Generator().manual_seed(1))
        got[backend] = (gp, torch.autograd.grad(gp, list(d.parameters()), allow_unused=True))
    torch.testing.assert_close(got["cpp"][0], got["torch"][0], rtol=1e-9, atol=1e-12)
    assert sum(g is not None for g in got["torch"][1]) > 2
    for a, b in zip(got["cpp"][1], got["torch"][1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


@pytest.mark.cuda
def test_cuda_losses_never_synchronise():
    d = build_discriminator("basic", ndf=4, backend="torch").cuda()
    real, fake = torch.rand(2, 3, 35, 35, device="cuda"), torch.rand(2, 3, 35, 35, device="cuda")
    d(real)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mode in ("lsgan", "vanilla", "hinge", "wgangp"):
            loss = discriminator_loss(d(real), d(fake), mode) + generator_gan_loss(d(fake), mode)
        loss = loss + gradient_penalty(d, real, fake) + cycle_loss(real, fake) + identity_loss(real, fake)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def test_identity_loss_refuses_images_of_different_shapes():
    """G_AB(b) and b of different shapes (a generator that changes the size, a batch mix-up) must
    be an error naming the shapes, not a loss broadcast over the mismatch."""
    with pytest.raises(ValueError, match=r"identity_loss.*\(1, 3, 8, 8\).*\(2, 3, 8, 8\)"):
        identity_loss(torch.zeros(1, 3, 8, 8), torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="identity_loss"):
        identity_loss(torch.zeros(2, 1, 8, 8), torch.zeros(2, 3, 8, 8))
