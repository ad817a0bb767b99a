"""Batched random crop + horizontal flip + scaling to [-1, 1], on whatever device the batch is on.

The dataset hands over uint8 images that are already resized (deterministic work, done once on
the CPU with PIL); the random part runs here on the whole batch at once: one ``randint`` for all
parameters, one gather, one cast (about ten small kernels whatever the batch size). Nothing reads
a value back to the host, so on a GPU this never synchronises with the CPU.
"""

from __future__ import annotations

import torch

__all__ = ["augment_batch", "to_model_range", "to_uint8"]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 -1..1 (``x / 127.5 - 1``: 0 -> -1 and 255 -> +1 exactly)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects uint8 images, got {images.dtype}")
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float -1..1 -> uint8 0..255, clamped and rounded to nearest (inverse of :func:`to_model_range`)."""
    x = images.detach().to(torch.float32)
    return x.add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def augment_batch(
    images: torch.Tensor,
    crop_size: int | None,
    flip: bool,
    generator: torch.Generator | None = None,
    channels_last: bool = False,
    return_params: bool = False,
    shard: tuple[int, int] = (0, 1),
):
    """Random ``crop_size`` square crop and random horizontal flip per image, then scale to [-1, 1].

    ``images``: uint8 (B, C, H, W) on any device; ``crop_size=None`` keeps the full H x W.
    ``generator`` must live on ``images.device`` (``None`` uses that device's default generator).
    Offsets are uniform over every valid window (``0..H-crop`` inclusive; modulo bias < 1e-4),
    each image flips with probability 1/2. ``shard=(rank, world)``: ``images`` is process
    ``rank``'s slice of a global batch of ``world * B`` images; the parameters are drawn for the
    whole global batch (the same draws on every process) and this slice's are used, so N processes
    augment exactly as one process would. Returns float32 (B, C, crop, crop), NCHW-contiguous or channels_last; with
    ``return_params`` also ``{"top", "left", "flip"}`` (each shape (B,)) for inspection.
    """
    if images.dim() != 4:
        raise ValueError(f"augment_batch expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise TypeError(f"augment_batch expects uint8 images, got {images.dtype}")
    b, c, h, w = images.shape
    ch, cw = (h, w) if crop_size is None else (int(crop_size), int(crop_size))
    if ch > h or cw > w or ch < 1:
        raise ValueError(f"crop_size {crop_size} does not fit images of size {h}x{w}")
    grids, mod = _index_tables(images.device, h, w, ch, cw, bool(flip))
    # One draw for all parameters: rows (top, left, flip) of 24-bit integers reduced modulo
    # (H-ch+1, W-cw+1, 2 or 1). The modulo bias is below n / 2**24 (< 1e-4 for any real size).
    rank, world = shard
    prm = torch.randint(0, 1 << 24, (3, b * world), device=images.device, generator=generator) % mod
    if world > 1:
        prm = prm[:, rank * b : (rank + 1) * b]
    top, left, flips = prm[0], prm[1], prm[2]
    # Flat source index of every output pixel: window origin + the (optionally mirrored) offset
    # grid. A flip is just the other grid, so mirroring costs nothing beyond the crop's gather.
    idx = grids.index_select(0, flips).add_((top * w + left)[:, None])  # (B, ch*cw)
    if channels_last:
        # Gather whole pixels (C contiguous values) so the result is NHWC in memory.
        src = images.permute(0, 2, 3, 1).reshape(b, h * w, c)
        out = src.gather(1, idx[:, :, None].expand(b, ch * cw, c)).view(b, ch, cw, c).permute(0, 3, 1, 2)
    else:
        src = images.reshape(b, c, h * w)
        out = src.gather(2, idx[:, None, :].expand(b, c, ch * cw)).view(b, c, ch, cw)
    out = to_model_range(out)  # .to() keeps the strides: NHWC stays channels_last
    if return_params:
        return out, {"top": top, "left": left, "flip": flips.bool()}
    return out


# (device, h, w, ch, cw, flip) -> (offset grids (2, ch*cw), moduli (3, 1)). Built once per shape so
# a step launches no host->device copies (a pageable copy would stall the host on the GPU).
_TABLES: dict = {}


def _index_tables(device: torch.device, h: int, w: int, ch: int, cw: int, flip: bool):
    key = (device, h, w, ch, cw, flip)
    hit = _TABLES.get(key)
    if hit is None:
        rows = torch.arange(ch)[:, None] * w
        cols = torch.arange(cw)[None, :]
        grids = torch.stack([(rows + cols).reshape(-1), (rows + (cw - 1 - cols)).reshape(-1)])
        mod = torch.tensor([[h - ch + 1], [w - cw + 1], [2 if flip else 1]])
        hit = (grids.to(device), mod.to(device))
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = hit
    return hit
