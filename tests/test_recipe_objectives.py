"""What each recipe phase minimises, term by term: the losses a phase reports must be the ones its
optimizer steps on (a term logged but left out of the total, or detached, trains a different
model with the same logs)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import tiny_train_config

from fastcgan.recipes import cyclegan
from fastcgan.train import build_state


class _Run:
    """The StepRun view of a state, eager, with the pools answering ``fakes + 100`` (a value no
    fake can have): what D scores shows whether it scored the pool's answer."""

    def __init__(self, nets):
        self.nets = nets

    def net(self, name):
        return self.nets[name]

    frozen = net

    def pool_query(self, pool, fakes):
        return fakes.detach() + 100.0

    def autocast(self):
        return contextlib.nullcontext()

    def fmt(self, x):
        return x


def _setup(**kw):
    cfg = tiny_train_config(**kw)
    torch.manual_seed(0)
    st = build_state(cfg)
    g = torch.Generator().manual_seed(1)
    batch = {d: torch.rand(2, 3, 32, 32, generator=g) * 2 - 1 for d in "AB"}
    return cfg, st, batch


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_cyclegan_discriminators_score_the_pooled_fakes(norm):
    """D_A / D_B score the image pools' answers (past fakes half of the time, as the official
    ImagePool), never the fresh fakes directly."""
    cfg, st, batch = _setup(norm=norm, batch_size=2)
    run = _Run(st.nets)
    _, _, carry = cyclegan.generator_forward(run, batch, {}, cfg)
    seen = {}
    hooks = [st.nets[d].register_forward_pre_hook(lambda m, a, d=d: seen.setdefault(d, []).append(a[0]))
             for d in ("D_A", "D_B")]
    try:
        cyclegan.discriminator_forward(run, batch, carry, cfg)
    finally:
        for h in hooks:
            h.remove()
    for d, fake in (("D_A", carry["fake_A"]), ("D_B", carry["fake_B"])):
        fakes_scored = torch.cat(seen[d])[-2:]  # after the two real images
        assert torch.equal(fakes_scored, fake.detach() + 100.0), d


def test_wgangp_penalty_trains_the_discriminators():
    """--gan-mode wgangp: the gradient penalty is part of what D minimises (its gradient reaches D's
    weights), not only a logged number."""
    cfg, st, batch = _setup(gan_mode="wgangp", batch_size=2)
    run = _Run(st.nets)
    _, _, carry = cyclegan.generator_forward(run, batch, {}, cfg)
    loss_D, losses, _ = cyclegan.discriminator_forward(run, batch, carry, cfg)
    params = list(st.nets["D_A"].parameters()) + list(st.nets["D_B"].parameters())
    total = torch.autograd.grad(loss_D, params, retain_graph=True)
    without = torch.autograd.grad(losses["D_A"] + losses["D_B"], params, retain_graph=True)
    penalty = torch.autograd.grad(losses["gp_A"] + losses["gp_B"], params, retain_graph=True, allow_unused=True)
    penalty = [torch.zeros_like(p) if g is None else g for p, g in zip(params, penalty)]  # e.g. D's last bias
    assert loss_D.item() == pytest.approx(sum(losses[k].item() for k in ("D_A", "D_B", "gp_A", "gp_B")), rel=1e-6)
    diff = max((a - b).abs().max().item() for a, b in zip(total, without))
    assert diff > 1e-6  # the penalty moves D
    for t, w, p in zip(total, without, penalty):
        torch.testing.assert_close(t, w + p, rtol=1e-4, atol=1e-7)


def test_cyclegan_generator_loss_is_the_sum_of_its_terms():
    cfg, st, batch = _setup(batch_size=2, lambda_identity=0.5)
    loss_G, losses, _ = cyclegan.generator_forward(_Run(st.nets), batch, {}, cfg)
    terms = ("G_AB", "G_BA", "cycle_A", "cycle_B", "idt_A", "idt_B")
    assert all(losses[k].item() > 0 for k in terms)
    assert loss_G is losses["G"] and loss_G.item() == pytest.approx(sum(losses[k].item() for k in terms), rel=1e-6)
    grads = torch.autograd.grad(loss_G, list(st.nets["G_AB"].parameters()), retain_graph=True)
    want = torch.autograd.grad(sum(losses[k] for k in terms), list(st.nets["G_AB"].parameters()))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w)
