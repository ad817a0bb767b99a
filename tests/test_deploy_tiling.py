"""Tiled inference: exact for per-pixel models, equal to whole-image inference away from tile
edges for local models, and seam-free for models whose output depends on the tile (InstanceNorm)."""

import pytest
import torch
from fastcgan.deploy import GeneratorSpec
from fastcgan.deploy.runtime import from_model
from fastcgan.deploy.tiling import blend_weights, tile_starts, tiled_apply
from torch import nn


class PerPixel(nn.Module):
    input_nc = output_nc = 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return torch.tanh(self.conv(x))


class Local(nn.Module):
    """Three zero-padded 3x3 convolutions: receptive-field radius 3."""

    input_nc = output_nc = 3

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(*[nn.Conv2d(3, 3, 3, padding=1) for _ in range(3)])

    def forward(self, x):
        return torch.tanh(self.net(x))


class PerTileShift(nn.Module):
    """Output depends on the whole tile (like InstanceNorm): x minus its own spatial mean."""

    input_nc = output_nc = 3

    def forward(self, x):
        return x - x.mean(dim=(2, 3), keepdim=True)


SPEC1 = GeneratorSpec(input_nc=3, output_nc=3, size_multiple=1, min_size=1)


def _image(h, w):
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, h, w, generator=g) * 2 - 1


@pytest.mark.parametrize("ramp", ["cosine", "linear"])
def test_weights_partition_of_unity(ramp):
    h, w, tile, ov = 70, 90, 32, 8
    total = torch.zeros(h, w)
    for y0 in tile_starts(h, tile, ov):
        for x0 in tile_starts(w, tile, ov):
            total[y0:y0 + tile, x0:x0 + tile] += blend_weights(
                tile, tile, ov, y0 > 0, y0 + tile < h, x0 > 0, x0 + tile < w, kind=ramp)
    assert total.min() > 0.05  # every pixel covered with positive weight
    assert tile_starts(70, 32, 8) == [0, 24, 38]
    assert tile_starts(20, 32, 8) == [0]


@pytest.mark.parametrize("shape", [(70, 90), (64, 64), (33, 100)])
def test_tiled_per_pixel_is_exact(shape):
    x = _image(*shape)
    tr = from_model(PerPixel().eval(), "cpu", spec=SPEC1, tile=32, tile_overlap=8, batch_size=3)
    with torch.no_grad():
        ref = PerPixel().eval()(x)
    torch.testing.assert_close(tr(x), ref, atol=1e-6, rtol=1e-6)


def test_tiled_local_model_matches_away_from_tile_edges():
    h, w, tile, ov, radius = 80, 100, 40, 16, 3
    x = _image(h, w)
    model = Local().eval()
    with torch.no_grad():
        ref = model(x)
        out = tiled_apply(model, x, tile, ov)
    # A tile's output is exact where the pixel is > radius from that tile's inner edges; the
    # blend is exact wherever every tile with weight there is exact.
    exact = torch.ones(h, w, dtype=torch.bool)
    for y0 in tile_starts(h, tile, ov):
        for x0 in tile_starts(w, tile, ov):
            ok = torch.zeros(tile, tile, dtype=torch.bool)
            top = radius if y0 > 0 else 0
            bot = radius if y0 + tile < h else 0
            left = radius if x0 > 0 else 0
            right = radius if x0 + tile < w else 0
            ok[top:tile - bot, left:tile - right] = True
            exact[y0:y0 + tile, x0:x0 + tile] &= ok
    assert exact.float().mean() > 0.7
    err = (out - ref).abs()
    assert err[..., exact].max() <= 1e-5
    # Near the edges the ramp weights keep the error small too.
    assert err.max() <= 0.05


def test_tiled_no_seams_for_tile_dependent_model():
    """A smooth image through a per-tile-statistics model: blended tiles leave no step edge."""
    h, w, tile, ov = 96, 128, 48, 23  # overlap < tile / 2 (the limit tiled_apply enforces)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    x = torch.stack([xx, yy, xx * yy])[None]
    model = PerTileShift()
    naive = torch.zeros_like(x)  # abutting tiles without overlap: visible seams
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            naive[..., y0:y0 + tile, x0:x0 + tile] = model(x[..., y0:y0 + tile, x0:x0 + tile])
    blended = tiled_apply(model, x, tile, ov)

    def max_step(img):
        return max(img.diff(dim=-1).abs().max().item(), img.diff(dim=-2).abs().max().item())

    smooth_step = max_step(x)  # the image's own largest neighbour difference
    assert max_step(naive) > 10 * smooth_step  # the seam the blend must remove
    assert max_step(blended) < 3 * smooth_step


@pytest.mark.parametrize("ramp", ["cosine", "linear"])
def test_neighbouring_ramps_cross_fade_with_weights_that_sum_to_one(ramp):
    """Where two tiles overlap by exactly ``overlap`` their ramps are complementary (a cross-fade
    whose weights add up to 1, no bump or dip before the division), and no weight of a tile is 0:
    every pixel a tile computes counts."""
    ov = 6
    rise = blend_weights(1, 16, ov, False, False, True, False, kind=ramp)[0]
    fall = blend_weights(1, 16, ov, False, False, False, True, kind=ramp)[0]
    assert rise.min() > 0 and fall.min() > 0
    torch.testing.assert_close(fall[-ov:] + rise[:ov], torch.ones(ov))
    torch.testing.assert_close(rise[ov:], torch.ones(16 - ov))


def test_a_tile_edge_on_the_image_border_keeps_full_weight():
    """Only edges shared with a neighbour ramp down; the last tile's edge on the image border keeps
    weight 1. A 36-px-wide image in 32-px tiles (starts 0 and 4), overlap 8, through a model whose
    output is its tile's mean: the blend is exactly the documented weighting."""
    x = torch.arange(36.0).expand(1, 1, 32, 36).contiguous()
    out = tiled_apply(lambda t: t.mean(dim=(2, 3), keepdim=True).expand_as(t), x, 32, 8, batch_size=1)
    m0, m1 = x[..., :32].mean(), x[..., 4:].mean()
    w0 = blend_weights(32, 32, 8, False, False, False, True)  # right edge shared with tile 1
    w1 = blend_weights(32, 32, 8, False, False, True, False)  # right edge on the image border
    num, den = torch.zeros(32, 36), torch.zeros(32, 36)
    num[:, :32] += m0 * w0
    den[:, :32] += w0
    num[:, 4:] += m1 * w1
    den[:, 4:] += w1
    torch.testing.assert_close(out[0, 0], num / den)
    torch.testing.assert_close(out[0, 0, :, 32:], m1.expand(32, 4))
