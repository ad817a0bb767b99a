"""Unaligned (A, B) training data and single-folder inference data, both yielding uint8 tensors.

Where each part of the official preprocessing runs:

=====================  ==============================================  ============================
``preprocess``         in the Dataset (CPU, PIL bicubic)               on the batch (``augment_batch``)
=====================  ==============================================  ============================
resize_and_crop        resize to load_size x load_size                 random crop_size crop, flip
crop                   random crop_size crop                           flip
scale_width            width -> load_size, height keeps the aspect     flip
                       ratio but is at least crop_size (no crop)
scale_width_and_crop   the same, then random crop_size crop            flip
none                   round H and W to the nearest multiple of 4      flip
=====================  ==============================================  ============================

Only ``resize_and_crop`` guarantees one image size before the crop, so only there can the crop be
batched on the device; in the other modes the per-image size may vary (non-square images), so the
crop runs here on the CPU. ``ds.batch_augment`` holds the arguments for :func:`augment_batch`.
``scale_width`` and ``none`` keep per-image sizes. The official loop takes mixed sizes at batch 1;
fastcgan's step runs both domains through one call and pools past fakes in fixed-shape buffers,
so training needs every image to come out at one size (:meth:`FolderDataset.check_one_size`,
on the headers, before the run writes anything).

Randomness (the B partner and CPU crop offsets) comes from ``numpy.random.default_rng((seed,
epoch, index))``: identical in every DataLoader worker layout, and different every epoch once the
trainer calls :meth:`UnalignedDataset.set_epoch`.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fastcgan.data.images import (
    IMG_EXTENSIONS,
    BadImageError,
    get_max_image_pixels,
    oriented_size,
    make_dataset,
    open_image,
    pil_to_tensor,
)

__all__ = [
    "PREPROCESS_MODES",
    "DatasetError",
    "FolderDataset",
    "SingleImageDataset",
    "SkippedImageWarning",
    "UnalignedDataset",
    "collate",
    "resize_deterministic",
    "resized_size",
]

PREPROCESS_MODES = ("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none")

logger = logging.getLogger("fastcgan.data")


class DatasetError(ValueError):
    """The dataset cannot be used as configured (missing/empty folder, bad arguments)."""


class SkippedImageWarning(UserWarning):
    """An unreadable image file was skipped."""


def warn_skipped_image(err: BadImageError) -> None:
    msg = f"skipping image {err.path!r}: {err.reason}"  # unreadable, or smaller than the crop
    logger.warning(msg)
    warnings.warn(msg, SkippedImageWarning, stacklevel=3)


def resized_size(size: tuple[int, int], preprocess: str, load_size: int, crop_size: int) -> tuple[int, int]:
    """(width, height) that :func:`resize_deterministic` gives an image of ``size``."""
    ow, oh = size
    if preprocess == "resize_and_crop":
        return load_size, load_size
    if preprocess in ("scale_width", "scale_width_and_crop"):
        if ow == load_size and oh >= crop_size:
            return ow, oh
        return load_size, int(max(load_size * oh / ow, crop_size))
    if preprocess == "none":  # each side to the nearest multiple of 4 (at least 4)
        return max(4, round(ow / 4) * 4), max(4, round(oh / 4) * 4)
    return ow, oh  # "crop": no resize


def _make_multiple(img: Image.Image) -> Image.Image:
    w, h = resized_size(img.size, "none", 0, 0)
    return img if (w, h) == img.size else img.resize((w, h), Image.BICUBIC)


def _scale_width(img: Image.Image, target_width: int, min_height: int, path: str) -> Image.Image:
    ow, oh = img.size
    _, h = resized_size(img.size, "scale_width", target_width, min_height)
    if (target_width, h) == (ow, oh):
        return img
    # The height follows the aspect ratio: a 1x80000 image (400 bytes, 80 k pixels) would become
    # 286 x 22.9 M pixels. The result is held to the same pixel limit as decoded files.
    limit = get_max_image_pixels()
    if limit > 0 and target_width * h > limit:
        raise BadImageError(path, f"{ow}x{oh} scaled to width {target_width} would be {target_width}x{h} = "
                                  f"{target_width * h:,} pixels, over the image pixel limit of {limit:,} (--max-image-pixels)")
    return img.resize((target_width, h), Image.BICUBIC)


def resize_deterministic(
    img: Image.Image, preprocess: str, load_size: int, crop_size: int, path: str = "<image>"
) -> Image.Image:
    """The deterministic (non-random) resize of ``preprocess`` applied to a PIL image (``path``
    names it in a :class:`BadImageError` when the result would exceed the pixel limit)."""
    if preprocess == "resize_and_crop":
        if img.size != (load_size, load_size):
            img = img.resize((load_size, load_size), Image.BICUBIC)
        return img
    if preprocess in ("scale_width", "scale_width_and_crop"):
        return _scale_width(img, load_size, crop_size, path)
    if preprocess == "none":
        return _make_multiple(img)
    return img  # "crop": no resize


def _check_common_args(preprocess, load_size, crop_size, channel_args):
    if preprocess not in PREPROCESS_MODES:
        raise DatasetError(f"preprocess={preprocess!r} is not one of {', '.join(PREPROCESS_MODES)}")
    if not (isinstance(load_size, int) and load_size > 0):
        raise DatasetError(f"load_size must be a positive int, got {load_size!r}")
    if not (isinstance(crop_size, int) and crop_size > 0):
        raise DatasetError(f"crop_size must be a positive int, got {crop_size!r}")
    if preprocess == "resize_and_crop" and crop_size > load_size:
        raise DatasetError(f"crop_size ({crop_size}) is larger than load_size ({load_size})")
    for name, v in channel_args.items():
        if v not in (1, 3):
            raise DatasetError(f"{name} must be 1 (grayscale) or 3 (RGB), got {v!r}")


def _list_domain(folder: str, max_size: float) -> list[str]:
    if not os.path.isdir(folder):
        parent = os.path.dirname(os.path.normpath(folder))
        try:
            found = sorted(n + "/" for n in os.listdir(parent) if os.path.isdir(os.path.join(parent, n)))
        except OSError:  # no such parent, or unreadable: the message names the folder alone
            found = []
        holds = f" ({parent} holds {', '.join(found[:8])}{' ...' if len(found) > 8 else ''})" if found else ""
        raise DatasetError(f"dataset folder {folder!r} does not exist{holds}")
    try:
        paths = make_dataset(folder, max_size)
    except OSError as e:
        raise DatasetError(f"dataset folder {folder!r}: cannot list {e.filename or folder!r}: {e.strerror or e}") from None
    if not paths:
        exts = ", ".join(sorted(IMG_EXTENSIONS))
        raise DatasetError(f"dataset folder {folder!r} contains no image files ({exts})")
    return paths


class FolderDataset(Dataset):
    """What the training-folder datasets share: their options (checked), the epoch that seeds
    their CPU crops and random partners, the crop window, the device augmentation they need, and
    the bad files met: ``skipped`` (in order, each once, merged with what DataLoader workers
    report in their batches); ``_skip_noun`` names a bad item in the log."""

    _skip_noun = "unreadable image"

    def _init_options(self, root, phase, preprocess, load_size, crop_size, flip, input_nc, output_nc,
                      serial_batches, seed) -> None:
        _check_common_args(preprocess, load_size, crop_size, {"input_nc": input_nc, "output_nc": output_nc})
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise DatasetError(f"dataset root {root!r} does not exist or is not a directory")
        self.root, self.phase, self.preprocess = root, phase, preprocess
        self.load_size, self.crop_size, self.flip = load_size, crop_size, bool(flip)
        self.input_nc, self.output_nc = input_nc, output_nc
        self.serial_batches, self.seed, self.epoch = bool(serial_batches), int(seed), 0
        self.skipped: list[str] = []
        self._bad: set[str] = set()
        self._one_size: tuple[int, int] | None = None  # set by check_one_size

    def _record(self, path: str) -> bool:
        if path in self._bad:
            return False
        self._bad.add(path)
        self.skipped.append(path)
        return True

    def record_skipped(self, batch: dict) -> list[str]:
        """Merge the paths a (worker-side) batch reports as skipped; returns the new ones."""
        new = [p for p in batch.get("skipped", ()) if self._record(p)]
        for p in new:
            logger.warning("skipped %s %r (reported by a loader worker)", self._skip_noun, p)
        return new

    @property
    def batch_augment(self) -> dict:
        """Keyword arguments for :func:`augment_batch` / ``augment_pair`` matching ``preprocess``:
        ``resize_and_crop`` crops on the device, the other modes crop (or not) on the CPU."""
        crop = self.crop_size if self.preprocess == "resize_and_crop" else None
        return {"crop_size": crop, "flip": self.flip}

    def set_epoch(self, epoch: int) -> None:
        """New random draws (CPU crops, unpaired B partners) for a new epoch: call before creating
        the epoch's iterator (DataLoader workers copy the dataset then, so ``persistent_workers``
        must be off)."""
        self.epoch = int(epoch)

    @property
    def _crops_on_cpu(self) -> bool:
        return self.preprocess in ("crop", "scale_width_and_crop")

    def _check_decoded_size(self, img: Image.Image, path: str, what: str = "") -> None:
        """:class:`BadImageError` when a CPU-cropped mode meets an image smaller than the crop, or
        when an image decodes to another size than the one size :meth:`check_one_size` read from
        the headers (a batch of two sizes would fail the step; the file is skipped instead)."""
        w, h = img.size
        if self._crops_on_cpu and (w < self.crop_size or h < self.crop_size):
            raise BadImageError(path, f"{what}{w}x{h} is smaller than crop_size {self.crop_size}")
        one = self._one_size
        if one is not None and (w, h) != one:
            raise BadImageError(path, f"{what}{w}x{h} after --preprocess {self.preprocess}, not the {one[0]}x{one[1]} "
                                "its header promised and every image must have")

    # -- checks before training (nothing is written until they pass) -------------------------
    def _item_sizes(self) -> Iterator[tuple[str, tuple[int, int] | None]]:
        """(path, size of the image the model sees, from the header only) of every training image."""
        raise NotImplementedError

    def check_one_size(self) -> tuple[int, int] | None:
        """``--preprocess none`` / ``scale_width`` keep each image's size, but the training step
        runs the two domains through one network call and keeps past fakes in a fixed-shape pool,
        so every image must come out at one size: checked on the file headers (nothing decoded),
        naming two files that differ. (The official loop, image by image, allows mixed sizes at
        batch 1.) Unreadable headers are left to the decoder, which skips such files. Returns
        that (width, height), or ``None`` in the cropping modes."""
        if self.preprocess not in ("none", "scale_width"):
            return None
        first = None
        for path, wh in self._item_sizes():
            if wh is None:
                continue
            size = resized_size(wh, self.preprocess, self.load_size, self.crop_size)
            if first is None:
                first = (path, size)
            elif size != first[1]:
                raise DatasetError(
                    f"--preprocess {self.preprocess}: {path!r} comes out {size[0]}x{size[1]} but {first[0]!r} "
                    f"{first[1][0]}x{first[1][1]}; fastcgan trains on one image size (the step batches both "
                    "domains and pools past fakes): use --preprocess resize_and_crop or scale_width_and_crop"
                )
        self._one_size = None if first is None else first[1]
        return self._one_size

    def check_usable(self) -> None:
        """Decode until one usable image per domain is found: a dataset whose files are all
        unusable is a :class:`DatasetError` before the run writes anything."""
        raise NotImplementedError

    def _crop_box(self, img: Image.Image, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
        """The random CPU crop window of ``img`` (None: this mode crops on the device or not at all)."""
        if not self._crops_on_cpu:
            return None
        w, h = img.size
        x = int(rng.integers(0, w - self.crop_size + 1))
        y = int(rng.integers(0, h - self.crop_size + 1))
        return (x, y, x + self.crop_size, y + self.crop_size)


class UnalignedDataset(FolderDataset):
    """Unpaired images from ``root/{phase}A`` and ``root/{phase}B`` (the official CycleGAN layout).

    Item ``i`` pairs ``A_paths[i % len(A)]`` with a random B image (``B_paths[i % len(B)]`` when
    ``serial_batches``); ``len`` is ``max(len(A), len(B))``. Images are uint8 (C, h, w) after the
    Dataset's share of ``preprocess`` (see module docstring); the trainer finishes with
    ``augment_batch(batch["A"], **ds.batch_augment)``.

    Files are not decoded at construction (that would be slow for big datasets) unless
    ``validate=True``. An unreadable file met later is warned about (naming it), recorded in
    ``skipped`` and replaced by the next readable file of its domain, deterministically.
    ``reverse=True`` swaps the folders: ``{phase}B`` is domain "A" (the official ``--direction BtoA``).
    """

    def __init__(
        self,
        root: str,
        phase: str = "train",
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
        reverse: bool = False,
    ):
        self._init_options(root, phase, preprocess, load_size, crop_size, flip, input_nc, output_nc,
                           serial_batches, seed)
        # reverse (--direction BtoA, one-way recipes): {phase}B is the input domain "A" (input_nc).
        first, second = ("B", "A") if reverse else ("A", "B")
        self.dir_A = os.path.join(self.root, phase + first)
        self.dir_B = os.path.join(self.root, phase + second)
        self.A_paths = _list_domain(self.dir_A, max_size)
        self.B_paths = _list_domain(self.dir_B, max_size)
        if validate:
            self.validate()

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def A_size(self) -> int:
        return len(self.A_paths)

    @property
    def B_size(self) -> int:
        return len(self.B_paths)

    def __len__(self) -> int:
        return max(len(self.A_paths), len(self.B_paths))

    def _item_sizes(self):
        for p in self.A_paths + self.B_paths:
            yield p, oriented_size(p)

    def decoded_nbytes(self) -> int:
        """uint8 bytes of every training image after the deterministic resize (what the
        ``--data-on-gpu`` bank holds), from the file headers: nothing is decoded; a file whose
        header is unreadable counts nothing (the decoder skips it)."""
        total = 0
        for paths, nc in ((self.A_paths, self.input_nc), (self.B_paths, self.output_nc)):
            for p in paths:
                wh = oriented_size(p)
                if wh is not None:
                    w, h = resized_size(wh, self.preprocess, self.load_size, self.crop_size)
                    total += w * h * nc
        return total

    def check_usable(self) -> None:
        self.load_resized("A", 0)
        self.load_resized("B", 0)

    def validate(self) -> list[str]:
        """Decode every file now; drop and record unreadable ones. Returns the skipped paths."""
        before = len(self.skipped)
        for attr, folder, nc in (
            ("A_paths", self.dir_A, self.input_nc),
            ("B_paths", self.dir_B, self.output_nc),
        ):
            good = []
            for p in getattr(self, attr):
                try:
                    open_image(p, nc)
                    good.append(p)
                except BadImageError as e:
                    warn_skipped_image(e)
                    self._record(p)
            if not good:
                raise DatasetError(f"dataset folder {folder!r} has no readable images")
            setattr(self, attr, good)
        return self.skipped[before:]

    # -- loading -----------------------------------------------------------------------------
    def load_resized(self, domain: str, index: int) -> tuple[Image.Image, str, tuple[str, ...]]:
        """The deterministic part for image ``index`` of ``domain`` ("A"/"B"), substituting the
        next readable image for an unreadable one. Returns (PIL image, path, skipped paths)."""
        paths = self.A_paths if domain == "A" else self.B_paths
        nc = self.input_nc if domain == "A" else self.output_nc
        n = len(paths)
        skipped = []
        for k in range(n):
            p = paths[(index + k) % n]
            if p in self._bad:
                continue
            try:
                img = resize_deterministic(open_image(p, nc), self.preprocess, self.load_size, self.crop_size, p)
                self._check_decoded_size(img, p)
            except BadImageError as e:
                warn_skipped_image(e)
                self._record(p)
                skipped.append(p)
                continue
            return img, p, tuple(skipped)
        folder = self.dir_A if domain == "A" else self.dir_B
        raise DatasetError(f"dataset folder {folder!r} has no usable images (all {n} files skipped: unreadable, "
                           "or smaller than --crop-size)")

    def _cpu_crop(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        box = self._crop_box(img, rng)
        return img if box is None else img.crop(box)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = np.random.default_rng((self.seed, self.epoch, int(index)))
        a_idx = index % len(self.A_paths)
        b_idx = index % len(self.B_paths) if self.serial_batches else int(rng.integers(len(self.B_paths)))
        img_a, path_a, skip_a = self.load_resized("A", a_idx)
        img_b, path_b, skip_b = self.load_resized("B", b_idx)
        return {
            "A": pil_to_tensor(self._cpu_crop(img_a, rng)),
            "B": pil_to_tensor(self._cpu_crop(img_b, rng)),
            "A_path": path_a,
            "B_path": path_b,
            "skipped": skip_a + skip_b,
        }

    def __repr__(self) -> str:
        return (
            f"UnalignedDataset(root={self.root!r}, phase={self.phase!r}, A={self.A_size}, B={self.B_size}, "
            f"preprocess={self.preprocess!r}, load_size={self.load_size}, crop_size={self.crop_size})"
        )


class SingleImageDataset(Dataset):
    """One image file, or every image under a folder (recursive, sorted), for inference.

    Items are ``{"image": uint8 (C,H,W), "path", "size": (H, W), "skipped": ()}`` at the file's own
    size (no crop or resize; the translator pads to the generator's multiple). An unreadable
    file gives ``{"image": None, "path": p, "size": None, "skipped": (p,)}`` after a warning, so no
    output is ever written under the wrong name; :func:`collate` drops such items.
    """

    def __init__(self, path_or_dir: str, channels: int = 3, max_size: float = math.inf):
        _check_common_args("none", 1, 1, {"channels": channels})
        path = os.fspath(path_or_dir)
        if os.path.isdir(path):
            self.paths = _list_domain(path, max_size)
        elif os.path.isfile(path):
            self.paths = [path]
        else:
            raise DatasetError(f"input {path!r} does not exist")
        self.channels = channels
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        p = self.paths[index]
        try:
            img = pil_to_tensor(open_image(p, self.channels))
        except BadImageError as e:
            warn_skipped_image(e)
            if p not in self.skipped:
                self.skipped.append(p)
            return {"image": None, "path": p, "size": None, "skipped": (p,)}
        return {"image": img, "path": p, "size": (img.shape[1], img.shape[2]), "skipped": ()}


def collate(items: Sequence[dict]) -> dict:
    """Stack the tensors of a list of dataset items; strings and sizes become lists.

    ``"skipped"`` is flattened into one list; items whose ``"image"`` is None (unreadable files of
    a :class:`SingleImageDataset`) are dropped, leaving ``"image": None`` if none is left.
    """
    skipped = [p for it in items for p in it.get("skipped", ())]
    if items and "image" in items[0]:
        items = [it for it in items if it["image"] is not None]
        if not items:
            return {"image": None, "path": [], "size": [], "skipped": skipped}
    out: dict = {}
    for key in items[0]:
        if key == "skipped":
            continue
        vals = [it[key] for it in items]
        if isinstance(vals[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in vals}
            if len(shapes) > 1:
                raise DatasetError(
                    f"cannot batch {key!r}: images have different sizes {sorted(shapes)}; use batch size 1 "
                    "or a preprocess mode that crops (resize_and_crop, crop, scale_width_and_crop)"
                )
            out[key] = torch.stack(vals)
        else:
            out[key] = vals
    out["skipped"] = skipped
    return out
