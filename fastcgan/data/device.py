"""``--data-on-gpu``: every training image resident on the device, batches drawn without the host.

A resized 286x286 RGB image is 245 KB in uint8, so horse2zebra (2,401 images) takes ~0.6 GB and
even monet2photo (7,338) ~1.8 GB: small beside an 80 GB GPU, and it removes decoding, the
DataLoader and the host->device copy from the step entirely.

Sampling follows the CPU loader path (``DataLoader(shuffle=not serial_batches)`` over an
:class:`~fastcgan.data.datasets.UnalignedDataset`): the stream of positions ``0, 1, 2, ...`` is cut
into epochs of ``len(dataset)`` positions, each epoch is a random permutation, position ``p`` reads
A image ``p % len(A)`` and a uniformly random B image. Every index is computed on the device from
the Python int ``step``, so :meth:`DeviceImageBank.sample_batch` never synchronises.
"""

from __future__ import annotations

import torch

from fastcgan.data.datasets import DatasetError, UnalignedDataset
from fastcgan.devices import is_out_of_memory
from fastcgan.data.images import pil_to_tensor

__all__ = ["DeviceImageBank", "preload_to_device"]


class DeviceImageBank:
    """All resized images of both domains as uint8 (N, C, H, W) tensors on one device."""

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        length: int,
        batch_augment: dict,
        shuffle: bool = True,
        serial_batches: bool = False,
        seed: int = 0,
        skipped: list[str] | None = None,
    ):
        if A.dtype != torch.uint8 or B.dtype != torch.uint8 or A.device != B.device:
            raise ValueError("A and B must be uint8 tensors on the same device")
        self.A, self.B = A, B
        self.length = int(length)
        self.batch_augment = dict(batch_augment)
        self.shuffle = bool(shuffle)
        self.serial_batches = bool(serial_batches)
        self.seed = int(seed)
        self.skipped = list(skipped or [])
        self.device = A.device
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        self._perm_cache: tuple[int, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        return self.A.numel() + self.B.numel()

    def __len__(self) -> int:
        return self.length

    def _perm(self, epoch: int) -> torch.Tensor:
        # One permutation per epoch from its own seeded generator: reproducible for any step
        # without replaying earlier epochs (resume from a checkpoint gets the same order).
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            g = torch.Generator(device=self.device).manual_seed(
                (self.seed * 1_000_003 + epoch) & 0x7FFF_FFFF_FFFF
            )
            self._perm_cache = (epoch, torch.randperm(self.length, generator=g, device=self.device))
        return self._perm_cache[1]

    def sample_batch(
        self,
        batch_size: int,
        step: int,
        generator: torch.Generator | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> dict:
        """uint8 batches ``{"A": (b,C,H,W), "B": (b,C,H,W)}`` for training step ``step``.

        ``shard=(rank, world)``: the global batch of ``batch_size`` is drawn (the same on every
        process) and process ``rank`` gets its ``batch_size / world`` consecutive images."""
        start = int(step) * int(batch_size)
        pos = torch.arange(start, start + batch_size, device=self.device)
        local = pos % self.length
        if self.shuffle:
            e0, e1 = start // self.length, (start + batch_size - 1) // self.length
            if e0 == e1:
                local = self._perm(e0)[local]
            else:
                epoch = pos // self.length
                out = torch.empty_like(local)
                for e in range(e0, e1 + 1):  # host-side loop over epoch numbers only (ints)
                    out = torch.where(epoch == e, self._perm(e)[local], out)
                local = out
        idx_a = local % self.A.shape[0]
        if self.serial_batches:
            idx_b = local % self.B.shape[0]
        else:
            gen = self.generator if generator is None else generator
            idx_b = torch.randint(0, self.B.shape[0], (batch_size,), device=self.device, generator=gen)
        rank, world = shard
        if world > 1:
            b = batch_size // world
            idx_a, idx_b = idx_a[rank * b : (rank + 1) * b], idx_b[rank * b : (rank + 1) * b]
        return {"A": self.A.index_select(0, idx_a), "B": self.B.index_select(0, idx_b)}


class BankStack:
    """The images of one domain written, as they are decoded, into one uint8 tensor allocated on
    the bank's device at the first image: the host holds one image at a time. (A list, then
    ``torch.stack``, then a pinned copy for the transfer held the set three times over in host
    memory, and the pinned block stayed cached by PyTorch for the rest of the run.)"""

    def __init__(self, capacity: int, device: torch.device):
        self.capacity, self.device, self.count = capacity, device, 0
        self.images: torch.Tensor | None = None

    def append(self, t: torch.Tensor) -> None:
        if self.images is None:
            try:
                self.images = torch.empty((self.capacity, *t.shape), dtype=torch.uint8, device=self.device)
            except (MemoryError, RuntimeError) as e:  # past the start-up check (memory taken since)
                if not is_out_of_memory(e):
                    raise
                gib = self.capacity * t.numel() / 1024**3
                raise DatasetError(f"--data-on-gpu: {self.capacity:,} images of {tuple(t.shape)} ({gib:.1f} GiB) do "
                                   f"not fit on {self.device}; use --no-data-on-gpu") from None
        self.images[self.count].copy_(t)  # a plain host-to-device copy per image (~250 KB), once
        self.count += 1

    def stacked(self) -> torch.Tensor:
        # Unreadable files leave the last slots unused: the view drops them (a skipped file
        # costs one image slot).
        return self.images[: self.count]


def _stack_domain(ds: UnalignedDataset, domain: str, device: torch.device) -> tuple[BankStack, list[str]]:
    paths = ds.A_paths if domain == "A" else ds.B_paths
    stack, skipped, first = BankStack(len(paths), device), [], None
    for i, p in enumerate(paths):
        if p in ds._bad:
            continue
        img, path, skip = ds.load_resized(domain, i)
        skipped.extend(skip)
        if path != p:  # p was unreadable and a later file stood in; that file is loaded on its own turn
            continue
        t = pil_to_tensor(img)
        if first is None:
            first = (p, tuple(t.shape))
        elif tuple(t.shape) != first[1]:
            raise DatasetError(
                f"--data-on-gpu needs one image size per domain: {p!r} is {tuple(t.shape)} after "
                f"preprocess={ds.preprocess!r} but {first[0]!r} is {first[1]}; use preprocess='resize_and_crop'"
            )
        stack.append(t)
    if not stack.count:
        raise DatasetError(f"no readable images for domain {domain} of {ds.root!r}")
    return stack, skipped


def preload_to_device(dataset: UnalignedDataset, device, shuffle: bool | None = None) -> DeviceImageBank:
    """Decode and resize every image of ``dataset`` once and keep them on ``device``.

    The crop (when ``preprocess`` has one) and flip then run per batch via ``augment_batch(...,
    **bank.batch_augment)``. ``shuffle`` defaults to ``not dataset.serial_batches``.
    An :class:`~fastcgan.data.aligned.AlignedDataset` gives a bank whose A and B are drawn
    together (see :func:`~fastcgan.data.aligned.preload_aligned_to_device`).
    """
    from fastcgan.data.aligned import AlignedDataset, preload_aligned_to_device  # imports this module

    if isinstance(dataset, AlignedDataset):
        return preload_aligned_to_device(dataset, device, shuffle)
    if dataset.preprocess not in ("resize_and_crop", "crop", "scale_width_and_crop", "scale_width", "none"):
        raise DatasetError(f"unsupported preprocess {dataset.preprocess!r}")
    device = torch.device(device)
    A, skip_a = _stack_domain(dataset, "A", device)
    B, skip_b = _stack_domain(dataset, "B", device)
    crop = dataset.crop_size if "crop" in dataset.preprocess else None
    for name, t in (("A", A.images), ("B", B.images)):
        if crop is not None and (t.shape[-1] < crop or t.shape[-2] < crop):
            raise DatasetError(
                f"domain {name} images are {tuple(t.shape[-2:])}, smaller than crop_size {crop}"
            )
    A, B = A.stacked(), B.stacked()
    return DeviceImageBank(
        A,
        B,
        length=max(A.shape[0], B.shape[0]),  # == len(dataset) unless unreadable files were dropped
        batch_augment={"crop_size": crop, "flip": dataset.flip},
        shuffle=(not dataset.serial_batches) if shuffle is None else shuffle,
        serial_batches=dataset.serial_batches,
        seed=dataset.seed,
        skipped=skip_a + skip_b,
    )
