"""Image discovery and decoding into uint8 tensors.

Conversion rules (every input mode ends as 8-bit ``RGB`` or ``L``):

* EXIF orientation is applied first (:func:`decode_oriented`), so a portrait photo stored
  landscape with orientation 6 comes out portrait; the header checks (:func:`oriented_size`)
  read the same orientation.
* Transparency (``RGBA``, ``LA``, ``P``/``L``/``RGB`` with a ``transparency`` entry, ``PA``) is
  composited onto **white**, not dropped: dropping alpha exposes whatever colour the encoder
  left under transparent pixels (often black or garbage), white matches how the image is shown.
* 16-bit and 32-bit integer modes (``I;16*``, ``I``) are *scaled* from 0..65535 to 0..255
  (``round(v * 255 / 65535)``), never clipped; float mode ``F`` is taken as 0..1 when its maximum
  is <= 1, else as 0..255.
* ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``1`` go through Pillow's own conversion.
* Animated files give their first frame.

Anything that cannot be decoded completely (unknown format, zero bytes, truncated data) or is
larger than the pixel limit raises :class:`BadImageError`; the datasets catch it and skip the file.

The pixel limit (width x height, :data:`DEFAULT_MAX_IMAGE_PIXELS` = 89,478,485 -- Pillow's own
warning threshold, e.g. 9459 x 9459 -- unless changed) is checked against the size in the file's
header *before* any pixel is decoded: a 140 KB PNG that claims 12000 x 12000 costs a header read,
not 1.5 GB of memory. ``open_image(..., max_pixels=N)`` sets it per call; ``set_max_image_pixels(N)``
sets the process default (``0`` = no limit), which DataLoader worker processes inherit when they
are forked after the call.
"""

from __future__ import annotations

import math
import os
import re
import threading
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

# Lower-case, with the dot. The official loader's list (jpg, jpeg, png, ppm, bmp, tif, tiff) plus webp.
IMG_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".tif", ".tiff", ".webp"})
# What Pillow may open such a file as (it goes by the content, not the name): those formats (JPEG
# includes a phone's multi-picture MPO; GIF: a GIF named .png was always read, its first frame).
# Others are refused unread: some decode everything inside open(), before any size check (an ICO
# wrapping a 20000x20000 PNG took 2.3 GB in the header check from a 1.1 MB file).
IMAGE_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "TIFF", "WEBP", "GIF")

_WHITE = (255, 255, 255)


class BadImageError(OSError):
    """A file that cannot be decoded as an image. ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # survive pickling across DataLoader worker processes
        return (type(self), (self.path, self.reason))


# Pillow's default warning threshold (1024**3 // 4 // 3 pixels, ~ 89.5 Mpx, e.g. 9459 x 9459).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Images held at once by the tools that stream a folder (fastcgan-translate's windows, eval's
# chunks) besides their batch size: a chunk closes at this many pixels (one large image at least).
WINDOW_PIXELS = 64 * 2**20
# --load-size (fastcgan-eval, fastcgan-translate): every image resized to at most 4096² (50 MB as
# uint8, 200 MB in fp32).
MAX_LOAD_SIZE = 4096
_max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS
_PIL_LIMIT_LOCK = threading.Lock()
_PIL_DEFAULT = Image.MAX_IMAGE_PIXELS


def set_max_image_pixels(limit: int | None) -> None:
    """Set the process-wide pixel limit of :func:`open_image` (``0`` or ``None``: no limit).

    Pillow refuses on its own at twice ``PIL.Image.MAX_IMAGE_PIXELS``; a limit above that raises
    Pillow's threshold with it (the only global this changes), so the limit given here is the one
    in force."""
    global _max_image_pixels
    limit = int(limit or 0)
    if limit < 0:
        raise ValueError(f"the image pixel limit must be >= 0 (0 = no limit), got {limit}")
    _max_image_pixels = limit
    if limit == 0:
        Image.MAX_IMAGE_PIXELS = None
    elif _PIL_DEFAULT is not None:
        Image.MAX_IMAGE_PIXELS = max(_PIL_DEFAULT, limit // 2 + 1)


def get_max_image_pixels() -> int:
    """The process-wide pixel limit of :func:`open_image` (``0``: no limit)."""
    return _max_image_pixels


def check_image_pixels(path: str, size: tuple[int, int], max_pixels: int | None = None) -> None:
    """:class:`BadImageError` when ``size`` (width, height) is over the pixel limit."""
    limit = _max_image_pixels if max_pixels is None else int(max_pixels)
    w, h = size
    if limit > 0 and w * h > limit:
        raise BadImageError(
            path, f"{w}x{h} = {w * h:,} pixels is over the image pixel limit of {limit:,} "
            "(not decoded; raise the limit with --max-image-pixels, 0 = no limit)"
        )


def pixel_limit_problem(sized, max_pixels: int | None = None) -> str | None:
    """Why some of the images ``sized`` -- (path, (width, height) from its header, or None when
    unreadable) pairs -- cannot be decoded under the pixel limit (the process default when
    ``max_pixels`` is None): the first file over it and how many more; None when all are within
    it (unreadable ones are the decoder's to report). The commands that take a folder of images
    (translate, eval) refuse such a folder before any work."""
    limit = _max_image_pixels if max_pixels is None else int(max_pixels)
    if limit <= 0:
        return None
    over = [(p, wh) for p, wh in sized if wh is not None and wh[0] * wh[1] > limit]
    if not over:
        return None
    p, (w, h) = over[0]
    more = f" (and {len(over) - 1} more)" if len(over) > 1 else ""
    return (f"{p}: {w}x{h} = {w * h:,} pixels is over the image pixel limit of {limit:,}{more}; raise it with "
            "--max-image-pixels N (0 = no limit) if the machine has the memory")


# Pillow's open() reads every metadata segment before the pixels: real files hold a few dozen,
# but JPEG EXIF is appended segment by segment (quadratic: 320 k 17-byte segments, 6.5 MB, took
# 90 s), and millions of tiny PNG chunks or JPEG segments cost ~20x their size in memory. PPM's
# header is read byte by byte (50 MB of comments: 11 s). Refused past these, before open().
MAX_METADATA_SEGMENTS = 1024  # JPEG segments before the scan, PNG chunks other than the image data
MAX_STRAY_BYTES = 64 << 10  # bytes between JPEG segments (Pillow skips them one by one)
MAX_PPM_HEADER = 64 << 10
# PNG chunks of any kind: an image's data comes in chunks of 8-64 KiB (89 Mpx of RGB: ~33 k of
# them at libpng's 8 KiB); a walk over a million takes ~2 s.
MAX_PNG_CHUNKS = 1 << 20
_PNG_CHUNK_TYPE = re.compile(rb"\w{4}")  # what Pillow reads as a chunk (its is_cid); anything else ends its walk


def _jpeg_problem(f) -> str | None:
    """The JPEG marker walk of Pillow's open(), over the segment headers only: stray bytes and
    fill bytes between segments are skipped as Pillow skips them (so they cannot hide segments
    from the count), up to the start of scan."""
    def next_ff(pos: int) -> int:
        f.seek(pos)
        size = 16  # a marker is usually right there; stray bytes are searched in larger blocks
        while block := f.read(size):
            if (k := block.find(b"\xff")) >= 0:
                return pos + k
            pos, size = pos + len(block), 1 << 16
        return -1

    pos, segments, stray = 2, 0, 0
    while True:
        at = next_ff(pos)
        if at < 0:
            return None
        stray += at - pos
        f.seek(at + 1)
        c = f.read(1)
        if not c or c[0] == 0xDA:  # end of file (Pillow reports it) or the start of scan
            return None
        if c[0] in (0xFF, 0x00):  # a fill byte, or an escaped 0xFF: skipped
            stray, pos = stray + 1, at + 1
        elif 0xD0 <= c[0] <= 0xD8 or c[0] == 0x01:  # markers without a length
            segments, pos = segments + 1, at + 2
        else:
            n = f.read(2)
            if len(n) < 2 or int.from_bytes(n, "big") < 2:  # cut short or malformed: Pillow says so
                return None
            segments, pos = segments + 1, at + 2 + int.from_bytes(n, "big")
        if segments > MAX_METADATA_SEGMENTS:
            return f"more than {MAX_METADATA_SEGMENTS:,} JPEG segments before the image data"
        if stray > MAX_STRAY_BYTES:
            return f"more than {MAX_STRAY_BYTES:,} stray bytes between its JPEG segments"


def _png_problem(f) -> str | None:
    """Every chunk to IEND, not only those before the pixels: decoding reads the rest, and Pillow
    keeps each private chunk after the pixels (1 M empty ones, 12 MB: 600 MB and 4 s). The image
    data (IDAT; an APNG's fcTL / fdAT frames) is not metadata, but the walk stops somewhere."""
    metadata = 0
    for _ in range(MAX_PNG_CHUNKS):
        c = f.read(8)
        if len(c) < 8 or c[4:8] == b"IEND" or not _PNG_CHUNK_TYPE.fullmatch(c[4:8]):  # Pillow stops there too
            return None
        if c[4:8] not in (b"IDAT", b"fcTL", b"fdAT"):
            metadata += 1
            if metadata > MAX_METADATA_SEGMENTS:
                return f"more than {MAX_METADATA_SEGMENTS:,} PNG chunks besides the image data"
        f.seek(int.from_bytes(c[:4], "big") + 4, os.SEEK_CUR)  # the data and its CRC
    return f"more than {MAX_PNG_CHUNKS:,} PNG chunks"


def metadata_problem(path: str) -> str | None:
    """Why ``path``'s metadata is too much to hand to Pillow (see MAX_METADATA_SEGMENTS), from a
    walk over its segment headers (a few small reads); ``None`` when it is not (or when the layout
    is not one of these: Pillow then says what is wrong)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:2] == b"\xff\xd8":  # JPEG: marker segments up to the start of scan
            return _jpeg_problem(f)
        if head == b"\x89PNG\r\n\x1a\n":
            return _png_problem(f)
        if head[:1] == b"P" and head[1:2] in b"123456" and len(head) > 1:  # netpbm: magic, W, H[, maxval]
            f.seek(0)
            text = f.read(MAX_PPM_HEADER)
            wanted = 3 if head[1:2] in b"14" else 4
            tokens = re.sub(rb"#[^\n\r]*", b" ", text).split(None, wanted)
            if len(tokens) <= wanted and len(text) == MAX_PPM_HEADER:
                return f"a PPM header longer than {MAX_PPM_HEADER:,} bytes"
    return None


def _header(path: str, oriented: bool) -> tuple[int, int] | None:
    info = _header_info(path, oriented)
    return None if info is None else info[0]


def _header_info(path: str, oriented: bool) -> tuple[tuple[int, int], str] | None:
    """((width, height), PIL mode) from the header only, or None when it cannot be read (or is
    not a regular file: opening a FIFO named like an image waits for a writer forever)."""
    if not os.path.isfile(path):
        return None
    try:
        if metadata_problem(path):
            return None  # open_image names the problem
        with _PIL_LIMIT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Only the header is read here, so Pillow's own refusal (which hides the size) is
            # lifted for the open; open_image applies the limit before it decodes anything.
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                src = Image.open(os.fspath(path), formats=IMAGE_FORMATS)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
            with src:
                w, h = int(src.size[0]), int(src.size[1])
                if oriented and exif_orientation(src) in (5, 6, 7, 8) and not _reader_orients(src):
                    w, h = h, w  # rotated by 90 or 270 degrees
                return (w, h), src.mode
    except (OSError, SyntaxError, ValueError, EOFError):
        return None


_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image, as the header carries it: Pillow's base
    ``getexif`` reads the EXIF met so far, where PNG's own override decodes the whole image to
    look for an eXIf chunk after the pixels (a 1.8 MB file claiming 25000x25000 took 3 GB) -- such
    a late chunk, out of the PNG specification's order, is ignored by the header checks and the
    decoder alike. A malformed EXIF block (cameras write odd ones) reads as 1, the stored
    orientation: it never costs the pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns per damaged tag ("Truncated File Read"), at every decode
            value = Image.Image.getexif(img).get(0x0112, 1)
    except Exception:  # noqa: BLE001 - any parse error of the EXIF block: the stored orientation
        return 1
    return value if value in _TRANSPOSES else 1


def _reader_orients(src: Image.Image) -> bool:
    """Whether Pillow's reader applies the orientation itself: its TIFF reader reports the
    oriented size when it opens the file (not the stored width/height tags) and transposes the
    pixels in ``load()``."""
    tags = getattr(src, "tag_v2", None)
    return tags is not None and tuple(src.size) != (tags.get(256), tags.get(257))


def decode_oriented(src: Image.Image) -> Image.Image:
    """``src`` decoded, turned as its EXIF orientation says (``src`` itself when it is upright).
    The orientation is the header's (:func:`exif_orientation` before decoding, as
    :func:`oriented_size` reads it), applied here unless the reader applied it while decoding; no
    EXIF block is rewritten (``ImageOps.exif_transpose`` re-encodes it, and raises on blocks it
    cannot encode back)."""
    orientation = exif_orientation(src)
    src.load()
    if exif_orientation(src) != orientation:  # the reader turned the pixels and dropped the tag (TIFF)
        return src
    return src if orientation == 1 else src.transpose(_TRANSPOSES[orientation])


def image_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the file's header without decoding the pixels (EXIF rotation not
    applied); ``None`` when the header cannot be read (the decoder reports why later)."""
    return _header(path, oriented=False)


def oriented_size(path: str) -> tuple[int, int] | None:
    """:func:`image_size` after the EXIF orientation that :func:`open_image` applies (a portrait
    photo stored landscape is (h, w)); still header-only. ``None`` when the header is unreadable."""
    return _header(path, oriented=True)


# PIL modes that hold no colour (a palette image, "P", may be grey or not: not counted).
GREYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def is_greyscale_file(path: str) -> bool:
    """Whether the file stores a greyscale image (its header's mode; nothing decoded). An RGB file
    of grey pixels is not detected; an unreadable header is False (the decoder reports it)."""
    info = _header_info(path, oriented=False)
    return info is not None and info[1] in GREYSCALE_MODES


def is_image_file(name: str) -> bool:
    """True when ``name`` has an image extension (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMG_EXTENSIONS


def _walk(top: str):
    """``os.walk(top)`` (top-down: the caller may prune ``dirs``; linked folders listed, not entered)
    without recursion: Python 3.11's recurses once per level, so a folder nested ~1,000 deep was a
    RecursionError. A folder that cannot be listed raises its OSError (os.walk skips it silently)."""
    stack = [top]
    while stack:
        root = stack.pop()
        dirs, files, links = [], [], set()
        with os.scandir(root) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                (dirs if is_dir else files).append(entry.name)
                if is_dir and entry.is_symlink():
                    links.add(entry.name)
        yield root, dirs, files
        stack += [os.path.join(root, d) for d in reversed(dirs) if d not in links]


def make_dataset(directory: str, max_size: float = math.inf) -> list[str]:
    """Every image file under ``directory`` (recursive), sorted by path, at most ``max_size``.

    Hidden files and folders (names starting with ``.``, e.g. macOS ``._x.jpg`` resource forks or
    ``.ipynb_checkpoints``) are ignored, and so is anything that is not a regular file (a FIFO or
    device named like an image would block its reader). Sorting happens before truncation, so ``max_size`` always
    keeps the same files (the official loader truncates in ``os.walk`` order, then sorts).
    Image-named entries left out for not being regular files (a link to nowhere, a FIFO) and
    linked sub-folders (not followed, as the official loader) are named in one warning.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory")
    found, left_out = [], []

    for root, dirs, files in _walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        left_out += [os.path.join(root, d) + " (a linked folder, not followed)"
                     for d in dirs if os.path.islink(os.path.join(root, d))]
        for f in files:
            path = os.path.join(root, f)
            if not f.startswith(".") and is_image_file(f):
                if os.path.isfile(path):
                    found.append(path)
                else:
                    left_out.append(path + (" (a link to nowhere)" if os.path.islink(path) else
                                            " (not a regular file)"))
    if left_out:
        left_out.sort()
        msg = (f"{directory}: left out {len(left_out)} entr{'y' if len(left_out) == 1 else 'ies'}: "
               + ", ".join(left_out[:5]) + (" ..." if len(left_out) > 5 else ""))
        warnings.warn(msg, stacklevel=2)
    found.sort()
    if max_size < len(found):
        found = found[: int(max_size)]
    return found


def _scale_high_bit_depth(img: Image.Image) -> Image.Image:
    """``I;16*`` / ``I`` / ``F`` single-channel images to 8-bit ``L`` (:func:`_scaled_samples`);
    pixels of a tRNS colour key (16-bit grey PNG) composited on white, as other transparency."""
    out = _scaled_samples(img)
    key = img.info.get("transparency") if img.mode.startswith("I") else None
    if isinstance(key, int):  # a tRNS colour key (16-bit grey PNG): those pixels composited on white
        out = np.where(np.asarray(img) == key, 255, out)
    return Image.fromarray(out.astype(np.uint8), mode="L")


def _scaled_samples(img: Image.Image) -> np.ndarray:
    """Samples scaled to 0..255, not clipped: integer samples must lie in 0..65535 (else
    ValueError: signed or 32-bit data has no scale that is right for every file); float samples
    are [0, 1] when every finite one is, else 0..255 (NaN black, +inf white)."""
    arr = np.asarray(img)
    if img.mode == "F":
        a = arr.astype(np.float64)
        finite = a[np.isfinite(a)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        a = np.nan_to_num(a, nan=0.0, posinf=255.0 / scale, neginf=0.0)
        out = np.clip(np.rint(a * scale), 0, 255)
    else:
        # 16-bit samples (PNG/TIFF); mode "I" is 32-bit storage of the same 16-bit data in Pillow.
        a = arr.astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):  # signed or 32-bit data: no honest 8-bit scale
            raise ValueError(f"{img.mode} samples from {a.min()} to {a.max()} are outside the 16-bit range "
                             "0..65535 that is scaled to 8 bits; convert the image to 8 or 16 bits")
        out = (a * 255 + 32767) // 65535  # exact round-half-up of v*255/65535 in integers
    return out


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def open_image(path: str, channels: int = 3, max_pixels: int | None = None) -> Image.Image:
    """Decode ``path`` fully into an 8-bit ``RGB`` (``channels=3``) or ``L`` (``channels=1``) image.

    ``max_pixels`` (default: :func:`get_max_image_pixels`, ``0`` = no limit) is checked against
    the header's size before decoding; a larger image raises :class:`BadImageError`."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = os.fspath(path)
    try:
        if not os.path.isfile(path):  # a FIFO or device named like an image: reading it may never end
            raise BadImageError(path, "not a regular file")
        if os.path.getsize(path) == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        if problem := metadata_problem(path):
            raise BadImageError(path, problem + " (not decoded)")
        with warnings.catch_warnings():
            # Pillow's DecompressionBombWarning is replaced by our own limit, checked just below
            # on the header's size before load() decodes anything.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as src:
                check_image_pixels(path, src.size, max_pixels)
                img = decode_oriented(src)  # a full decode here: truncated data fails now, not in a worker later
                if img is src:  # detach from the file before it is closed
                    img = src.copy()
    except BadImageError:
        raise
    except UnidentifiedImageError:
        raise BadImageError(path, f"not an image in a format read here ({', '.join(IMAGE_FORMATS)})") from None
    except Image.DecompressionBombError as e:
        # Pillow's own backstop (twice PIL.Image.MAX_IMAGE_PIXELS), met before our check: report
        # our limit when it is the one exceeded, Pillow's when a per-call limit is above it.
        wh = image_size(path)
        limit = _max_image_pixels if max_pixels is None else int(max_pixels)
        if wh is not None and limit > 0 and wh[0] * wh[1] > limit:
            try:
                check_image_pixels(path, wh, limit)
            except BadImageError as ours:
                raise ours from None
        m = re.search(r"\((\d+) pixels\)", str(e))
        what = f"{int(m.group(1)):,} pixels" if m else "the image"
        raise BadImageError(path, f"{what} is over Pillow's decompression-bomb limit (not decoded; raise "
                            "the limit with --max-image-pixels / set_max_image_pixels, 0 = no limit)") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow's readers raise more than OSError on malformed files
        # (struct.error, or an AttributeError from the EXIF re-encoding inside the TIFF reader's load)
        raise BadImageError(path, f"cannot decode ({type(e).__name__}: {e})") from None
    try:
        return to_channels(img, channels)
    except ValueError as e:  # a mode with no conversion (LAB to RGB), 32-bit samples
        raise BadImageError(path, f"cannot convert its {img.mode} pixels: {e}") from None


def to_channels(img: Image.Image, channels: int = 3) -> Image.Image:
    """Any PIL image as 8-bit ``RGB`` (``channels=3``) or ``L`` (``1``): high bit depths scaled,
    transparency composited on white -- one conversion for files and for images handed to the
    deploy runtime, so both translate the same pixels."""
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
    """8-bit ``RGB``/``L`` PIL image to a contiguous, writable uint8 tensor (C,H,W)."""
    arr = np.asarray(img, dtype=np.uint8)  # read-only view of PIL's buffer
    if arr.ndim == 2:
        return torch.from_numpy(arr.copy())[None]
    # An explicit copy: ascontiguousarray returns the read-only view itself when the transpose is
    # already contiguous (1x1 images), and torch.from_numpy warns on read-only arrays.
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())  # HWC -> CHW


def resize_square(t: torch.Tensor, size: int | None) -> torch.Tensor:
    """uint8 (C, H, W) -> (C, size, size) with PIL's bicubic filter: what the official test.py does
    to every test image (``transforms.Resize([load_size, load_size])``, load_size = crop_size).
    Unchanged when ``size`` is None or the image is that size already."""
    if size is None or tuple(t.shape[-2:]) == (size, size):
        return t
    arr = np.ascontiguousarray(t.permute(1, 2, 0).numpy())
    img = Image.fromarray(arr[:, :, 0], "L") if t.shape[0] == 1 else Image.fromarray(arr, "RGB")
    return pil_to_tensor(img.resize((size, size), Image.BICUBIC))


def load_image(path: str, channels: int = 3, max_pixels: int | None = None) -> torch.Tensor:
    """Decode ``path`` into a uint8 tensor (channels, H, W); raises :class:`BadImageError`
    (``max_pixels`` as in :func:`open_image`)."""
    return pil_to_tensor(open_image(path, channels, max_pixels))
