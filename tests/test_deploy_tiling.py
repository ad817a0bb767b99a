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
