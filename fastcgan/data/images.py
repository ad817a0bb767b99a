"""Image discovery and decoding into uint8 tensors.

Conversion rules (every input mode ends as 8-bit ``RGB`` or ``L``):

* EXIF orientation is applied first (``ImageOps.exif_transpose``), so a portrait photo stored
  landscape with orientation 6 comes out portrait.
* Transparency (``RGBA``, ``LA``, ``P``/``L``/``RGB`` with a ``transparency`` entry, ``PA``) is
  composited onto **white**, not dropped: dropping alpha exposes whatever colour the encoder
  left under transparent pixels (often black or garbage), white matches how the image is shown.
* 16-bit and 32-bit integer modes (``I;16*``, ``I``) are *scaled* from 0..65535 to 0..255
  (``round(v * 255 / 65535)``), never clipped; float mode ``F`` is taken as 0..1 when its maximum
  is <= 1, else as 0..255.
* ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``1`` go through Pillow's own conversion.
* Animated files give their first frame.

Anything that cannot be decoded completely (unknown format, zero bytes, truncated data,
decompression bomb) raises :class:`BadImageError`; the datasets catch it and skip the file.
"""

from __future__ import annotations

import logging
import math
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Lower-case, with the dot. The official loader's list (jpg, jpeg, png, ppm, bmp, tif, tiff) plus webp.
IMG_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp"})

_WHITE = (255, 255, 255)
logger = logging.getLogger("fastcgan.data")


class BadImageError(OSError):
    """A file that cannot be decoded as an image. ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # survive pickling across DataLoader worker processes
        return (type(self), (self.path, self.reason))


def is_image_file(name: str) -> bool:
    """True when ``name`` has an image extension (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMG_EXTENSIONS


def make_dataset(directory: str, max_size: float = math.inf) -> list[str]:
    """Every image file under ``directory`` (recursive), sorted by path, at most ``max_size``.

    Hidden files and folders (names starting with ``.``, e.g. macOS ``._x.jpg`` resource forks or
    ``.ipynb_checkpoints``) are ignored. Sorting happens before truncation, so ``max_size`` always
    keeps the same files (the official loader truncates in ``os.walk`` order, then sorts).
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory")
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if not f.startswith(".") and is_image_file(f):
                found.append(os.path.join(root, f))
    found.sort()
    if max_size < len(found):
        found = found[: int(max_size)]
    return found


def _scale_high_bit_depth(img: Image.Image) -> Image.Image:
    """``I;16*`` / ``I`` / ``F`` single-channel images to 8-bit ``L`` by scaling, not clipping."""
    arr = np.asarray(img)
    if img.mode == "F":
        a = arr.astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if a.size and a.max() <= 1.0 else 1.0
        out = np.clip(np.rint(a * scale), 0, 255)
    else:
        # 16-bit samples (PNG/TIFF); mode "I" is 32-bit storage of the same 16-bit data in Pillow.
        a = np.clip(arr.astype(np.int64), 0, 65535)
        out = (a * 255 + 32767) // 65535  # exact round-half-up of v*255/65535 in integers
    return Image.fromarray(out.astype(np.uint8), mode="L")


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def open_image(path: str, channels: int = 3) -> Image.Image:
    """Decode ``path`` fully into an 8-bit ``RGB`` (``channels=3``) or ``L`` (``channels=1``) image."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            # Pillow warns (DecompressionBombWarning) before it errors; the error is what we act on.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as src:
                src.load()  # force a full decode here: truncated data fails now, not in a worker later
                img = src
                try:
                    img = ImageOps.exif_transpose(src)
                except (OSError, ValueError, KeyError, TypeError, SyntaxError) as e:
                    # A malformed EXIF block should not cost the pixels: keep the stored orientation.
                    logger.debug("%s: ignoring unreadable EXIF orientation (%s)", path, e)
                if img is src:  # detach from the file before it is closed
                    img = src.copy()
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(path, "not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise BadImageError(path, f"refused: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImageError(path, f"cannot decode ({type(e).__name__}: {e})") from None

    mode = img.mode
    if mode.startswith("I") or mode == "F":
        img = _scale_high_bit_depth(img)
    elif mode == "1":
        img = img.convert("L")
    elif _has_transparency(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    if channels == 3 and img.mode != "RGB":
        img = img.convert("RGB")
    elif channels == 1 and img.mode != "L":
        img = img.convert("L")
    return img


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit ``RGB``/``L`` PIL image to a contiguous uint8 tensor (C,H,W)."""
    arr = np.asarray(img, dtype=np.uint8)  # read-only view of PIL's buffer
    if arr.ndim == 2:
        return torch.from_numpy(arr.copy())[None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # HWC -> CHW copy


def load_image(path: str, channels: int = 3) -> torch.Tensor:
    """Decode ``path`` into a uint8 tensor (channels, H, W); raises :class:`BadImageError`."""
    return pil_to_tensor(open_image(path, channels))
