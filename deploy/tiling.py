"""Tiled inference with overlap blending, for images larger than a tile.

Tiles of ``tile x tile`` (the last row/column shifted back to end at the image border, so all
tiles have one size and batch together) overlap by ``overlap`` pixels. Each tile's output is
weighted by a separable ramp that rises from ~0 at an edge shared with another tile to 1 over
``overlap`` pixels (edges on the image border keep weight 1); the weighted sum is divided by
the summed weights. So the blend is a partition of unity: a per-pixel model is reproduced
exactly, and in the overlap the output fades smoothly from one tile to the next instead of
jumping at a seam.

Generators with InstanceNorm compute statistics per tile, so a tiled result differs from the
whole-image result by how much the tile statistics differ from the image's; use tiles of at
least 512 px where memory allows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

RAMPS = ("cosine", "linear")


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: stride ``tile - overlap``, the last one flush with the end."""
    if tile >= size:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile={tile}), got {overlap}")
    stride = tile - overlap
    n = math.ceil((size - tile) / stride) + 1
    starts = [min(i * stride, size - tile) for i in range(n)]
    return sorted(set(starts))


def _ramp(n: int, overlap: int, rise: bool, fall: bool, kind: str, dtype, device) -> Tensor:
    """1-D weights of length ``n``: ramps of ``overlap`` samples at the flagged ends, 1 elsewhere.

    Samples sit at (i + 0.5) / overlap, so no weight is exactly 0 (every pixel is covered by a
    positive weight even where only one tile reaches)."""
    w = torch.ones(n, dtype=dtype, device=device)
    if overlap <= 0:
        return w
    k = min(overlap, n)
    t = (torch.arange(k, dtype=dtype, device=device) + 0.5) / overlap
    r = 0.5 - 0.5 * torch.cos(math.pi * t) if kind == "cosine" else t
    if rise:
        w[:k] = torch.minimum(w[:k], r)
    if fall:
        w[n - k:] = torch.minimum(w[n - k:], r.flip(0))
    return w


def blend_weights(h: int, w: int, overlap: int, top: bool, bottom: bool, left: bool, right: bool,
                  kind: str = "cosine", dtype=torch.float32, device="cpu") -> Tensor:
    """(h, w) weights for one tile; a flag is True where that edge touches a neighbouring tile."""
    wy = _ramp(h, overlap, top, bottom, kind, dtype, device)
    wx = _ramp(w, overlap, left, right, kind, dtype, device)
    return wy[:, None] * wx[None, :]


def tiled_apply(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    tile: int | tuple[int, int],
    overlap: int = 32,
    *,
    batch_size: int = 8,
    ramp: str = "cosine",
) -> Tensor:
    """``fn`` applied to ``x`` (B, C, H, W) tile by tile, blended; ``fn`` maps (N, C, th, tw) to
    (N, C_out, th, tw). Tiles of all images are batched ``batch_size`` at a time."""
    if ramp not in RAMPS:
        raise ValueError(f"ramp must be one of {RAMPS}, got {ramp!r}")
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    b, _, h, w = x.shape
    th, tw = min(th, h), min(tw, w)
    if th == h and tw == w:
        return fn(x)
    overlap = max(0, min(overlap, th - 1, tw - 1))
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    boxes = [(y0, x0) for y0 in ys for x0 in xs]
    out = None
    wsum = torch.zeros(h, w, dtype=torch.float32, device=x.device)
    # Tile weights depend on the tile's position only; the overlap actually used between the
    # last tile and its neighbour may exceed ``overlap`` (flush end), which only widens the
    # region where both contribute.
    weights = {}
    for y0, x0 in boxes:
        weights[(y0, x0)] = blend_weights(
            th, tw, overlap, top=y0 > 0, bottom=y0 + th < h, left=x0 > 0, right=x0 + tw < w,
            kind=ramp, device=x.device,
        )
        wsum[y0:y0 + th, x0:x0 + tw] += weights[(y0, x0)]
    per_call = max(1, batch_size // max(1, b))
    for i in range(0, len(boxes), per_call):
        chunk = boxes[i:i + per_call]
        crops = torch.cat([x[:, :, y0:y0 + th, x0:x0 + tw] for y0, x0 in chunk], 0)
        ys_out = fn(crops)
        if out is None:
            out = torch.zeros(b, ys_out.shape[1], h, w, dtype=torch.float32, device=x.device)
        ys_out = ys_out.float().to(x.device)
        for j, (y0, x0) in enumerate(chunk):
            out[:, :, y0:y0 + th, x0:x0 + tw] += ys_out[j * b:(j + 1) * b] * weights[(y0, x0)]
    return (out / wsum).to(x.dtype if x.is_floating_point() else torch.float32)
