"""The CycleGAN history buffer of generated images (Shrivastava et al.), fully on the device.

Official semantics, image by image in batch order: while the pool holds fewer than
``pool_size`` images, an image is stored and returned; once full, with probability 1/2 a
uniformly chosen stored image is returned and replaced by the new one, otherwise the new image
is returned. Here one query handles the whole batch with tensor ops: no per-image Python loop,
no ``.item()``, no Python branch on tensor values, so it never synchronises with the host and
traces under ``torch.compile(fullgraph=True)``. Images later in a batch see the images stored
earlier in the same batch, exactly as in the sequential loop.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class ImagePool(nn.Module):
    """``query(images) -> images`` with a pool of ``pool_size`` past images (0 = passthrough).

    The pool and its fill count are buffers, so they are saved in ``state_dict`` (a resumed
    run continues with the same history). The pool buffer is allocated at the first query with
    the images' shape, dtype and device (or by ``load_state_dict``); later queries must have the
    same per-image shape. Returned images are detached (they feed the discriminator only).
    ``generator``: optional ``torch.Generator`` on the images' device for the random draws
    (eager mode; under ``torch.compile`` leave it ``None`` and seed the global generator)."""

    images: Optional[Tensor]
    num_imgs: Tensor

    def __init__(self, pool_size: int = 50, generator: Optional[torch.Generator] = None):
        super().__init__()
        if not isinstance(pool_size, int) or pool_size < 0:
            raise ValueError(f"ImagePool: pool_size must be a non-negative int, got {pool_size!r}")
        self.pool_size = pool_size
        self.generator = generator
        self.register_buffer("images", None)
        self.register_buffer("num_imgs", torch.zeros((), dtype=torch.long))

    def allocate(self, like: Tensor) -> None:
        """Allocate the (empty) pool for images shaped like ``like[0]`` (done by the first query;
        call it before compiling ``query`` if the compiled region must not allocate)."""
        self.images = torch.zeros(
            (self.pool_size,) + tuple(like.shape[1:]), dtype=like.dtype, device=like.device
        )
        self.num_imgs = torch.zeros((), dtype=torch.long, device=like.device)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + "images"
        if self.images is None and key in state_dict:
            saved = state_dict[key]
            self.images = torch.empty_like(saved, device=self.num_imgs.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.query(images)

    def query(self, images: Tensor) -> Tensor:
        if images.dim() < 2:
            raise ValueError(
                f"ImagePool.query: expected a batch (B, C, H, W), got shape {tuple(images.shape)}"
            )
        images = images.detach()
        if self.pool_size == 0:
            return images
        if self.images is None:
            self.allocate(images)
        pool = self.images
        if pool.device != images.device:
            raise ValueError(
                f"ImagePool.query: images are on {images.device} but the pool is on {pool.device}; "
                "move the pool with .to(device)"
            )
        if images.shape[1:] != pool.shape[1:]:
            raise ValueError(
                f"ImagePool.query: images of shape {tuple(images.shape[1:])} do not match the pool's "
                f"{tuple(pool.shape[1:])}"
            )
        b, p, dev = images.shape[0], self.pool_size, images.device
        new = images.to(pool.dtype)
        idx = torch.arange(b, device=dev)
        n = self.num_imgs.to(dev)

        # Both draws are made for every image so the random stream does not depend on the fill.
        swap = torch.rand(b, device=dev, generator=self.generator) > 0.5
        rid = torch.randint(0, p, (b,), device=dev, generator=self.generator)
        pos = n + idx
        filling = pos < p
        swapping = ~filling & swap
        # The slot each image writes (filling: the next free slot; swapping: the chosen slot);
        # -1 for images that leave the pool alone.
        target = torch.where(filling, pos, torch.where(swapping, rid, torch.full_like(rid, -1)))

        # An image swapping slot s gets what the sequential loop would find there: the last
        # earlier image of this batch that wrote s, else the pool's content before the query.
        earlier = idx[None, :] < idx[:, None]  # [j, i]: i comes before j
        wrote = (target[None, :] == rid[:, None]) & earlier
        last = torch.where(wrote, idx[None, :], torch.full_like(wrote, -1, dtype=torch.long)).amax(1)
        from_batch = new[last.clamp(min=0)]
        from_pool = pool[rid]
        bshape = (b,) + (1,) * (images.dim() - 1)
        old = torch.where((last >= 0).view(bshape), from_batch, from_pool)
        out = torch.where(swapping.view(bshape), old, new)

        # Every image writes the *final* content of a slot (the last writer's image, or for images
        # that write nothing, their own slot ``rid``'s current content), so duplicate indices all
        # carry the same value and the in-place scatter is order-independent.
        slot = torch.where(target >= 0, target, rid)
        writes_slot = target[None, :] == slot[:, None]  # [j, i]: image i writes j's slot
        final_writer = torch.where(
            writes_slot, idx[None, :], torch.full_like(writes_slot, -1, dtype=torch.long)
        ).amax(1)
        value = torch.where((final_writer >= 0).view(bshape), new[final_writer.clamp(min=0)], pool[slot])
        pool.index_copy_(0, slot, value)
        self.num_imgs.copy_(torch.clamp(n + b, max=p))
        return out.to(images.dtype)

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}"
