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

Limits: the overlap must be less than half the tile (``2 * overlap < tile``; larger overlaps
only multiply the work), and one image is cut into at most :data:`MAX_TILES` tiles; both are
checked before any tile runs (:func:`check_tiling`, ``ValueError`` naming the numbers). Memory
beyond the image's own input and output buffers is bounded by the tile: the blend weights
depend only on which edges of a tile touch a neighbour (at most 16 distinct tiles of weights),
and tiles are cut, run and accumulated into the output ``batch_size`` at a time.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor

RAMPS = ("cosine", "linear")
MAX_TILES = 16384  # per image: e.g. a 9459 x 9459 (89 Mpx) image in 128-px tiles with a 32-px overlap
DEFAULT_TILE_OVERLAP = 32


def default_overlap(tile) -> int:
    """The overlap used when none is given: 32 px, or less than half of a smaller tile (a model
    exported with ``--static 32x32`` tiles at 32 px: 15)."""
    sizes = tuple(tile) if isinstance(tile, (tuple, list)) else (tile, tile)
    if not all(isinstance(t, int) for t in sizes):
        return DEFAULT_TILE_OVERLAP  # check_tile_args names the bad tile
    return min(DEFAULT_TILE_OVERLAP, max(0, (min(sizes) - 1) // 2))


def check_tile_args(tile, overlap, *, names: tuple[str, str] = ("tile", "tile_overlap")) -> None:
    """``tile`` >= 1 (an int or an (h, w) pair) and 0 <= ``overlap`` < tile / 2; ValueError naming
    the arguments (``names``, e.g. ``("--tile", "--tile-overlap")``) otherwise."""
    tn, on = names
    sizes = tuple(tile) if isinstance(tile, (tuple, list)) else (tile, tile)
    if len(sizes) != 2 or any(not isinstance(t, int) or isinstance(t, bool) or t < 1 for t in sizes):
        raise ValueError(f"{tn} must be a positive number of pixels, got {tile!r}")
    if not isinstance(overlap, int) or isinstance(overlap, bool) or overlap < 0:
        raise ValueError(f"{on} must be >= 0, got {overlap!r}")
    t = min(sizes)
    if 2 * overlap >= t:
        raise ValueError(f"{on} {overlap} must be less than half of {tn} {t} (at most {(t - 1) // 2}): "
                         "a larger overlap multiplies the number of tiles without improving the blend")


def count_tiles(h: int, w: int, tile, overlap: int) -> int:
    """How many tiles :func:`tiled_apply` cuts an ``h x w`` image into (1 when it fits one tile)."""
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    th, tw = min(th, h), min(tw, w)
    if th == h and tw == w:
        return 1
    return _axis_count(h, th, overlap) * _axis_count(w, tw, overlap)


def _axis_count(size: int, tile: int, overlap: int) -> int:
    return 1 if tile >= size else len(tile_starts(size, tile, overlap))


def check_tiling(h: int, w: int, tile, overlap: int, *, max_tiles: int = MAX_TILES,
                 names: tuple[str, str] = ("tile", "tile_overlap"), what: str = "the image") -> int:
    """:func:`check_tile_args`, then the tile count of an ``h x w`` image, at most ``max_tiles``
    (ValueError naming the arguments otherwise). Returns the count."""
    check_tile_args(tile, overlap, names=names)
    n = count_tiles(h, w, tile, overlap)
    if max_tiles and n > max_tiles:
        tn, on = names
        th, tw = (tile, tile) if isinstance(tile, int) else tile
        shown = th if th == tw else f"{th}x{tw}"
        raise ValueError(f"{tn} {shown} {on} {overlap} would cut {what} ({w}x{h}) into {n:,} tiles, more than "
                         f"the limit of {max_tiles:,}: use a larger {tn} (or a smaller {on})")
    return n


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
    max_tiles: int = MAX_TILES,
) -> Tensor:
    """``fn`` applied to ``x`` (B, C, H, W) tile by tile, blended; ``fn`` maps (N, C, th, tw) to
    (N, C_out, th, tw). Tiles of all images are batched ``batch_size`` at a time.

    ``overlap`` must be less than half the tile and the tile count at most ``max_tiles``
    (ValueError before any tile runs, see :func:`check_tiling`)."""
    if ramp not in RAMPS:
        raise ValueError(f"ramp must be one of {RAMPS}, got {ramp!r}")
    th, tw = (tile, tile) if isinstance(tile, int) else tile
    b, _, h, w = x.shape
    check_tiling(h, w, (th, tw), overlap, max_tiles=max_tiles)
    th, tw = min(th, h), min(tw, w)
    if th == h and tw == w:
        return fn(x)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    # A tile's weights depend only on which of its edges touch a neighbour (16 cases at most),
    # so they are cached by those flags, not stored per tile. The overlap actually used between
    # the last tile and its neighbour may exceed ``overlap`` (flush end), which only widens the
    # region where both contribute.
    cache: dict[tuple[bool, bool, bool, bool], Tensor] = {}

    def weight(y0: int, x0: int) -> Tensor:
        key = (y0 > 0, y0 + th < h, x0 > 0, x0 + tw < w)
        if key not in cache:
            cache[key] = blend_weights(th, tw, overlap, *key, kind=ramp, device=x.device)
        return cache[key]

    def boxes():
        for y0 in ys:
            for x0 in xs:
                yield y0, x0

    out = None
    wsum = torch.zeros(h, w, dtype=torch.float32, device=x.device)
    per_call = max(1, batch_size // max(1, b))
    it = boxes()
    while chunk := list(itertools.islice(it, per_call)):
        crops = torch.cat([x[:, :, y0:y0 + th, x0:x0 + tw] for y0, x0 in chunk], 0)
        ys_out = fn(crops)
        if out is None:
            out = torch.zeros(b, ys_out.shape[1], h, w, dtype=torch.float32, device=x.device)
        ys_out = ys_out.float().to(x.device)
        for j, (y0, x0) in enumerate(chunk):
            wt = weight(y0, x0)
            out[:, :, y0:y0 + th, x0:x0 + tw].addcmul_(ys_out[j * b:(j + 1) * b], wt)
            wsum[y0:y0 + th, x0:x0 + tw] += wt
        del crops, ys_out
    return out.div_(wsum).to(x.dtype if x.is_floating_point() else torch.float32)
