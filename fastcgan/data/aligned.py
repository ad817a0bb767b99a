"""Paired (aligned) training data for pix2pix: the official ``train/ val/ test/`` layout.

Each image file of ``root/<phase>/`` holds a pair side by side, A on the left and B on the right,
split at half the width (``facades/train/1.jpg`` is 512x256: two 256x256 images). ``direction``
``"BtoA"`` swaps the halves, so an item's ``"A"`` is always the generator's input and ``"B"`` its
target (the official dataset also swaps ``input_nc``/``output_nc`` for BtoA; here ``input_nc``
always belongs to the input side).

Preprocessing is the official one, applied **identically to both halves**: the deterministic
resize runs here (CPU, PIL bicubic, per half, exactly like :class:`UnalignedDataset`), the random
crop and flip run per batch on the device with :func:`augment_pair`, which augments the channel-
concatenated pair with one :func:`augment_batch` call so A and B get the same offsets and flip.
In the CPU-crop modes (``crop``, ``scale_width_and_crop``) one random draw crops both halves.

Bad files are handled like unpaired data: an unreadable file, a pair image with an odd width
(its halves cannot be equal) or one narrower than 2 px is warned about (naming the file),
recorded in ``skipped`` and replaced by the next usable file, deterministically.

    ds = AlignedDataset("datasets/facades", phase="train", direction="BtoA")
    batch = collate([ds[i] for i in range(4)])                         # or a DataLoader
    real_A, real_B = augment_pair(batch["A"].to(dev), batch["B"].to(dev), **ds.batch_augment,
                                  generator=g)
    bank = preload_aligned_to_device(ds, "cuda")                     # --data-on-gpu
    raw = bank.sample_batch(batch_size, step)                        # raw["A"][i] pairs raw["B"][i]
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import torch
from PIL import Image

from fastcgan.data.augment import augment_batch
from fastcgan.data.datasets import (
    DatasetError,
    FolderDataset,
    _list_domain,
    warn_skipped_image,
    resize_deterministic,
    resized_size,
)
from fastcgan.data.device import BankStack, DeviceImageBank
from fastcgan.data.images import BadImageError, is_greyscale_file, open_image, oriented_size, pil_to_tensor

__all__ = [
    "ALIGNED_DIRECTIONS",
    "AlignedDataset",
    "ColorizationDataset",
    "augment_pair",
    "preload_aligned_to_device",
    "split_pair",
]

ALIGNED_DIRECTIONS = ("AtoB", "BtoA")
logger = logging.getLogger("fastcgan.data")


def split_pair(img: Image.Image, path: str = "<image>") -> tuple[Image.Image, Image.Image]:
    """(left half, right half) of a side-by-side pair image; :class:`BadImageError` when the width
    is odd or below 2 (the halves would differ in size, so the pair is not aligned pixel for
    pixel; the official loader silently gives B one column more)."""
    w, h = img.size
    if w < 2 or w % 2:
        raise BadImageError(
            path, f"width {w} is {'odd' if w % 2 else 'too small'}: a pair image holds A and B side by side, "
            "so its width must be even (two equal halves)"
        )
    half = w // 2
    return img.crop((0, 0, half, h)), img.crop((half, 0, w, h))


def augment_pair(
    A: torch.Tensor,
    B: torch.Tensor,
    crop_size: int | None,
    flip: bool,
    generator: torch.Generator | None = None,
    channels_last: bool = False,
    return_params: bool = False,
    shard: tuple[int, int] = (0, 1),
):
    """:func:`augment_batch` with the **same** random crop and flip for every pair ``(A[i], B[i])``.

    ``A`` (B, Ca, H, W) and ``B`` (B, Cb, H, W) uint8 on one device. The pair is concatenated along
    channels and augmented in one call (one parameter draw, one gather), then split, so the
    random stream consumed equals one ``augment_batch`` call on a batch of the same size (resume
    and DDP sharding behave exactly as for unpaired data). Returns float32 ``(A', B')`` in
    [-1, 1] (plus the parameters with ``return_params``)."""
    if A.dim() != 4 or B.dim() != 4:
        raise ValueError(
            f"augment_pair expects (B, C, H, W) tensors, got {tuple(A.shape)} and {tuple(B.shape)}"
        )
    if A.shape[0] != B.shape[0] or A.shape[2:] != B.shape[2:] or A.device != B.device:
        raise ValueError(
            f"augment_pair: A {tuple(A.shape)} on {A.device} and B {tuple(B.shape)} on {B.device} must have "
            "the same batch size, height, width and device"
        )
    ca = A.shape[1]
    res = augment_batch(
        torch.cat([A, B], 1),
        crop_size,
        flip,
        generator=generator,
        channels_last=channels_last,
        return_params=return_params,
        shard=shard,
    )
    out, params = res if return_params else (res, None)
    a, b = out[:, :ca], out[:, ca:]
    if channels_last:
        # A channel slice of an NHWC tensor is strided; make each half a dense NHWC tensor.
        a = a.contiguous(memory_format=torch.channels_last)
        b = b.contiguous(memory_format=torch.channels_last)
    if return_params:
        return a, b, params
    return a, b


class AlignedDataset(FolderDataset):
    """Pairs from ``root/<phase>/`` (A|B side by side; see the module docstring).

    ``ds[i] -> {"A": uint8 (input_nc,h,w), "B": uint8 (output_nc,h,w), "A_path": p, "B_path": p,
    "skipped": tuple}`` with ``p`` the pair file (both keys, so code written for
    :class:`UnalignedDataset` batches work unchanged). ``len(ds)`` is the number of pair files.
    ``ds.batch_augment`` holds the :func:`augment_pair` arguments; ``set_epoch``,
    ``record_skipped``, ``validate`` and ``skipped`` work as in :class:`UnalignedDataset`.
    """

    _skip_noun = "unusable pair image"
    # True: the target is computed from the input image on the device (colorization), so items
    # carry an empty (0, h, w) "B" and the image is held once, in the loader and the device bank.
    target_from_input = False

    def __init__(
        self,
        root: str,
        phase: str = "train",
        direction: str = "AtoB",
        preprocess: str = "resize_and_crop",
        load_size: int = 286,
        crop_size: int = 256,
        flip: bool = True,
        input_nc: int = 3,
        output_nc: int = 3,
        serial_batches: bool = False,
        seed: int = 0,
        max_size: float = math.inf,
        validate: bool = False,
    ):
        if direction not in ALIGNED_DIRECTIONS:
            raise DatasetError(f"direction must be one of {ALIGNED_DIRECTIONS}, got {direction!r}")
        self._init_options(root, phase, preprocess, load_size, crop_size, flip, input_nc, output_nc,
                           serial_batches, seed)
        self.direction = direction
        self.dir_AB = os.path.join(self.root, phase)
        if not os.path.isdir(self.dir_AB) and os.path.isdir(os.path.join(self.root, phase + "A")):
            raise DatasetError(
                f"{self.root!r} has the unpaired layout ({phase}A/, {phase}B/), not {self._layout_hint(phase)}"
            )
        self.AB_paths = _list_domain(self.dir_AB, max_size)
        if validate:
            self.validate()

    @staticmethod
    def _layout_hint(phase: str) -> str:
        return (f"A|B pair images in {phase}/: unpaired data trains with --model cyclegan or cut (in Python: "
                "UnalignedDataset); pairs matched by file name are built with "
                f"`python -m fastcgan.data.combine ROOT/{phase}A ROOT/{phase}B ROOT_PAIRS/{phase}`")

    # -- bookkeeping (as UnalignedDataset) ---------------------------------------------------
    def __len__(self) -> int:
        return len(self.AB_paths)

    def _input_size(self, wh: tuple[int, int]) -> tuple[int, int] | None:
        """Size of the input image within a file of size ``wh`` (a pair: its half; odd: unusable)."""
        w, h = wh
        return (w // 2, h) if w >= 2 and w % 2 == 0 else None

    def _item_sizes(self):
        for p in self.AB_paths:
            wh = oriented_size(p)
            yield p, None if wh is None else self._input_size(wh)

    def decoded_nbytes(self) -> int:
        """As :meth:`UnalignedDataset.decoded_nbytes`: both halves of every pair (one RGB image
        when the target comes from the input), after the resize, from the headers."""
        channels = 3 if self.target_from_input else self.input_nc + self.output_nc
        total = 0
        for _, wh in self._item_sizes():
            if wh is not None:
                w, h = resized_size(wh, self.preprocess, self.load_size, self.crop_size)
                total += w * h * channels
        return total

    def check_usable(self) -> None:
        self.load_resized(0)

    def validate(self) -> list[str]:
        """Decode and split every file now; drop and record unusable ones. Returns the skipped paths."""
        before = len(self.skipped)
        good = []
        for p in self.AB_paths:
            try:
                self._open_pair(p)
                good.append(p)
            except BadImageError as e:
                warn_skipped_image(e)
                self._record(p)
        if not good:
            raise DatasetError(f"dataset folder {self.dir_AB!r} has no usable pair images")
        self.AB_paths = good
        return self.skipped[before:]

    # -- loading -----------------------------------------------------------------------------
    def _open_pair(self, path: str) -> tuple[Image.Image, Image.Image]:
        """(input half, target half) at full resolution, in the requested channel counts."""
        left, right = split_pair(open_image(path, 3), path)
        a, b = (left, right) if self.direction == "AtoB" else (right, left)
        if self.input_nc == 1:
            a = a.convert("L")
        if self.output_nc == 1:
            b = b.convert("L")
        return a, b

    def load_resized(self, index: int) -> tuple[Image.Image, Image.Image, str, tuple[str, ...]]:
        """The deterministic part for pair ``index``, substituting the next usable file for an
        unusable one. Returns (input PIL image, target PIL image, path, skipped paths)."""
        n = len(self.AB_paths)
        skipped = []
        for k in range(n):
            p = self.AB_paths[(index + k) % n]
            if p in self._bad:
                continue
            try:
                a0, b0 = self._open_pair(p)
                a = resize_deterministic(a0, self.preprocess, self.load_size, self.crop_size, p)
                b = a if b0 is a0 else resize_deterministic(b0, self.preprocess, self.load_size, self.crop_size, p)
                self._check_decoded_size(a, p, "halves of ")
            except BadImageError as e:
                warn_skipped_image(e)
                self._record(p)
                skipped.append(p)
                continue
            return a, b, p, tuple(skipped)
        raise DatasetError(f"dataset folder {self.dir_AB!r} has no usable pair images (all {n} files skipped)")

    def _cpu_crop(self, a: Image.Image, b: Image.Image, rng: np.random.Generator):
        box = self._crop_box(a, rng)
        return (a, b) if box is None else (a.crop(box), b.crop(box))  # one draw: the same window in both halves

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        a, b, path, skipped = self.load_resized(index)
        a, b = self._cpu_crop(a, b, np.random.default_rng((self.seed, self.epoch, int(index))))
        ta = pil_to_tensor(a)
        return {
            "A": ta,
            "B": ta[:0] if self.target_from_input else pil_to_tensor(b),
            "A_path": path,
            "B_path": path,
            "skipped": skipped,
        }

    def __repr__(self) -> str:
        return (
            f"AlignedDataset(root={self.root!r}, phase={self.phase!r}, pairs={len(self)}, "
            f"direction={self.direction!r}, preprocess={self.preprocess!r}, load_size={self.load_size}, "
            f"crop_size={self.crop_size})"
        )


def preload_aligned_to_device(
    dataset: AlignedDataset, device, shuffle: bool | None = None
) -> DeviceImageBank:
    """Decode, split and resize every pair of ``dataset`` once and keep both halves on ``device``.

    Returns a :class:`DeviceImageBank` whose ``A[i]`` and ``B[i]`` are the two halves of pair
    ``i`` and which draws them together (``serial_batches=True``: B index == A index; the epoch
    permutation, ``shuffle`` by default, reorders the pairs). Finish every batch with
    ``augment_pair(raw["A"], raw["B"], **bank.batch_augment, generator=...)``."""
    if not isinstance(dataset, AlignedDataset):
        raise TypeError(f"preload_aligned_to_device needs an AlignedDataset, got {type(dataset).__name__}")
    device = torch.device(device)
    n = len(dataset.AB_paths)
    As, Bs, skipped, first = BankStack(n, device), BankStack(n, device), [], None
    for i, p in enumerate(dataset.AB_paths):
        if p in dataset._bad:
            continue
        a, b, path, skip = dataset.load_resized(i)
        skipped.extend(skip)
        if path != p:  # p was unusable and a later file stood in; that file is loaded on its own turn
            continue
        ta = pil_to_tensor(a)
        tb = ta[:0] if dataset.target_from_input else pil_to_tensor(b)
        if first is None:
            first = (p, tuple(ta.shape))
        elif tuple(ta.shape) != first[1]:
            raise DatasetError(
                f"--data-on-gpu needs one image size: the halves of {p!r} are {tuple(ta.shape)} after "
                f"preprocess={dataset.preprocess!r} but those of {first[0]!r} are {first[1]}; use "
                "preprocess='resize_and_crop'"
            )
        As.append(ta)
        Bs.append(tb)
    if not As.count:
        raise DatasetError(f"no usable pair images in {dataset.dir_AB!r}")
    crop = dataset.crop_size if "crop" in dataset.preprocess else None
    if crop is not None and (As.images.shape[-1] < crop or As.images.shape[-2] < crop):
        raise DatasetError(f"pair halves are {tuple(As.images.shape[-2:])}, smaller than crop_size {crop}")
    A, B = As.stacked(), Bs.stacked()
    return DeviceImageBank(
        A,
        B,
        length=A.shape[0],
        batch_augment={"crop_size": crop, "flip": dataset.flip},
        shuffle=(not dataset.serial_batches) if shuffle is None else shuffle,
        serial_batches=True,  # B index == A index: the pairs stay pairs
        seed=dataset.seed,
        skipped=skipped,
    )


class ColorizationDataset(AlignedDataset):
    """Colour images for colorization (the official ``--dataset_mode colorization``): the files of
    ``root/<phase>/`` are plain RGB images, each its own pair -- the input (L*) and the target
    (a*b*) are both computed from it on the device by the recipe (:func:`fastcgan.color.rgb_to_model`),
    after the random crop and flip. Items hold the RGB image as ``"A"`` and an empty ``(0, h, w)``
    ``"B"`` (``target_from_input``); everything else (layout checks, bad files, resize, CPU crops,
    ``max_size``, the device bank) is :class:`AlignedDataset`'s."""

    _skip_noun = "unusable image"
    target_from_input = True

    def __init__(self, root: str, phase: str = "train", **kw):
        for k in ("direction", "input_nc", "output_nc"):
            if k in kw:
                raise TypeError(f"ColorizationDataset takes no {k!r}: it reads RGB images, L -> ab")
        super().__init__(root, phase, direction="AtoB", input_nc=3, output_nc=3, **kw)

    @staticmethod
    def _layout_hint(phase: str) -> str:
        return (f"colour images in {phase}/: colorization learns from one folder of images per split "
                f"(e.g. a {phase}/ beside them that is a link to {phase}B/)")

    def _open_pair(self, path: str) -> tuple[Image.Image, Image.Image]:
        img = open_image(path, 3)
        return img, img  # the same object: resized once (load_resized)

    def _input_size(self, wh: tuple[int, int]) -> tuple[int, int]:
        return wh

    # Headers read by check_usable's greyscale count: all of them up to this many, else this many
    # evenly spaced (a million-image folder would take minutes to start).
    GREYSCALE_SAMPLE = 4096

    def check_usable(self) -> None:
        """Also: greyscale files (judged on the headers) teach a*b* = 0. All of them is a
        :class:`DatasetError` (nothing to learn colour from); some, a warning naming how many
        (the official trains on them silently)."""
        super().check_usable()
        n = len(self.AB_paths)
        step = max(1, -(-n // self.GREYSCALE_SAMPLE))
        looked = self.AB_paths[::step]
        grey = [p for p in looked if is_greyscale_file(p)]
        of = f"{len(looked)}" if step == 1 else f"{len(looked)} sampled (of {n})"
        if grey and len(grey) == len(looked):
            raise DatasetError(f"{self.dir_AB!r}: all {of} images are greyscale (e.g. {grey[0]!r}); "
                               "colorization learns colour from colour images")
        if grey:
            logger.warning("%d of %s images in %r are greyscale (e.g. %r): colorization learns a*b* = 0 "
                           "(no colour) from them; remove them for more colourful results",
                           len(grey), of, self.dir_AB, grey[0])

    def __repr__(self) -> str:
        return (
            f"ColorizationDataset(root={self.root!r}, phase={self.phase!r}, images={len(self)}, "
            f"preprocess={self.preprocess!r}, load_size={self.load_size}, crop_size={self.crop_size})"
        )
