"""Build pix2pix pair images (A | B side by side) from two folders matched by file name.

    python -m fastcgan.data.combine A_DIR B_DIR OUT [--use-AB] [--skip-bad] [--png]

The job of the official ``combine_A_and_B.py``, with its layout: when ``A_DIR`` holds split
folders (``train/ val/ test/``) each split ``A_DIR/<s>`` is paired with ``B_DIR/<s>`` into
``OUT/<s>``; when ``A_DIR`` holds the images directly, ``A_DIR`` is paired with ``B_DIR`` into
``OUT``. ``A_DIR/x.jpg`` pairs with ``B_DIR/x.jpg`` (``--use-AB``: ``x_A.jpg`` with ``x_B.jpg``
in the same folders, written as ``x.jpg``, as the official ``--use_AB``).

Every input is checked before anything is written: every file without a partner (on either
side), every pair whose two images differ in size (the dataset splits at half the width, so A
and B must be equal) and every unreadable file is named, and the command exits with status 2
having written nothing -- unless ``--skip-bad``, which writes the good pairs and still names
the rest. Output files are written atomically (:func:`fastcgan.fileio.atomic_writer`); an output
path that is one of the inputs, or an ``OUT`` inside ``A_DIR``/``B_DIR``, is refused. Pairs are
saved in the format of their file name (official behaviour; JPEG at quality 95), or as PNG with
``--png`` (lossless, no second JPEG generation).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
from PIL import Image

from fastcgan._cli import Parser, interruptible
from fastcgan.data.images import (DEFAULT_MAX_IMAGE_PIXELS, BadImageError, get_max_image_pixels, is_image_file,
                                  open_image, set_max_image_pixels)
from fastcgan.fileio import WriteError, atomic_writer, output_folder_problem, path_inside

__all__ = ["CombineError", "CombineReport", "combine_folders", "main"]


class CombineError(ValueError):
    """The inputs cannot be combined; ``problems`` lists every offending file with the reason."""

    def __init__(self, problems: list[str], summary: str = "bad input"):
        self.problems = list(problems)
        lines = "\n  ".join(self.problems)
        super().__init__(f"{summary} ({len(self.problems)} problem(s)):\n  {lines}")


@dataclasses.dataclass
class CombineReport:
    written: list[str]  # output files, in order
    problems: list[str]  # files skipped (only non-empty with skip_bad)
    splits: dict  # split name ("" for a flat folder) -> number of pairs written


def _images(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith(".") and is_image_file(n)
                  and os.path.isfile(os.path.join(folder, n)))


def _splits(a_dir: str, b_dir: str) -> tuple[list[str], list[str]]:
    """Split folder names ([""] for a flat layout) and layout problems."""
    if _images(a_dir):
        return [""], []
    subs = sorted(
        d for d in os.listdir(a_dir) if not d.startswith(".") and os.path.isdir(os.path.join(a_dir, d))
    )
    if not subs:
        raise CombineError(
            [f"{a_dir}: no image files and no split folders (train/ val/ test/)"], "nothing to combine"
        )
    problems = [
        f"{os.path.join(b_dir, s)}: split folder missing (A has {os.path.join(a_dir, s)})"
        for s in subs
        if not os.path.isdir(os.path.join(b_dir, s))
    ]
    extra = sorted(
        d for d in os.listdir(b_dir)
        if not d.startswith(".") and os.path.isdir(os.path.join(b_dir, d)) and d not in subs
    )
    problems += [f"{os.path.join(b_dir, d)}: split folder has no counterpart in {a_dir}" for d in extra]
    return subs, problems


def _match(a_folder: str, b_folder: str, use_AB: bool) -> tuple[list[tuple[str, str, str]], list[str]]:
    """[(path A, path B, output name)] and the unmatched files."""
    a_names = _images(a_folder)
    b_names = set(_images(b_folder))
    pairs, problems, used = [], [], set()
    for n in a_names:
        if use_AB:
            if "_A." not in n:
                continue  # the official --use_AB reads only the *_A.* files of the folder
            partner, out = n.replace("_A.", "_B."), n.replace("_A.", ".")
        else:
            partner, out = n, n
        if partner in b_names:
            pairs.append((os.path.join(a_folder, n), os.path.join(b_folder, partner), out))
            used.add(partner)
        else:
            problems.append(f"{os.path.join(a_folder, n)}: no matching {os.path.join(b_folder, partner)}")
    for n in sorted(b_names - used):
        if use_AB and "_B." not in n:
            continue
        expect = n.replace("_B.", "_A.") if use_AB else n
        problems.append(f"{os.path.join(b_folder, n)}: no matching {os.path.join(a_folder, expect)}")
    return pairs, problems


# The largest side an output format can encode (a pair is twice its halves' width): two 8192-wide
# WebP halves made a 16384-wide pair, one over WebP's limit, found at its write.
_FORMAT_MAX_SIDE = {"WEBP": 16383, "JPEG": 65500, "GIF": 65535}


def _format_of(path: str) -> str | None:
    return Image.registered_extensions().get(os.path.splitext(path)[1].lower())


def _save_pair(path: str, pair: np.ndarray) -> None:
    ext = os.path.splitext(path)[1].lower()
    fmt = _format_of(path)
    if fmt is None:
        raise WriteError(f"could not write {path}: no image format for extension {ext!r}")
    kw = {"quality": 95} if fmt == "JPEG" else {}
    with atomic_writer(path) as f:
        try:
            Image.fromarray(pair).save(f, format=fmt, **kw)
        except ValueError as e:  # an encoder's refusal (a size it cannot hold): the file is not replaced
            raise WriteError(f"could not write {path}: {e}") from None


def combine_folders(
    a_dir: str,
    b_dir: str,
    out_dir: str,
    *,
    use_AB: bool = False,
    skip_bad: bool = False,
    png: bool = False,
    max_images: int | None = None,
    overwrite: bool = False,
    progress=None,
) -> CombineReport:
    """Write the A|B pairs of ``a_dir`` and ``b_dir`` into ``out_dir`` (see the module docstring).

    Raises :class:`CombineError` (listing every problem) before writing anything when a file is
    unmatched, unreadable or size-mismatched, unless ``skip_bad``; :class:`FileNotFoundError`
    for a missing folder; :class:`fastcgan.fileio.WriteError` when an output cannot be written.
    ``max_images`` caps the pairs per split (first by name, like the official ``--num_imgs``).
    Existing files at output paths are replaced only with ``overwrite`` (never an input)."""
    a_dir, b_dir, out_dir = (os.fspath(p) for p in (a_dir, b_dir, out_dir))
    for name, d in (("A_DIR", a_dir), ("B_DIR", b_dir)):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{name} {d!r} is not a directory")
    for name, d in (("A_DIR", a_dir), ("B_DIR", b_dir)):
        if path_inside(out_dir, d):
            raise CombineError(
                [f"OUT {out_dir!r} is inside {name} {d!r}"], "refusing to write into an input folder"
            )
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CombineError([f"OUT {out_dir!r} exists and is not a directory"], "bad output folder")

    splits, problems = _splits(a_dir, b_dir)
    jobs: list[tuple[str, str, str, str]] = []  # (split, path A, path B, output path)
    inputs = set()
    for s in splits:
        a_f, b_f = os.path.join(a_dir, s) if s else a_dir, os.path.join(b_dir, s) if s else b_dir
        if not os.path.isdir(b_f):
            continue  # already reported
        pairs, unmatched = _match(a_f, b_f, use_AB)
        problems += unmatched
        if max_images is not None:
            pairs = pairs[: int(max_images)]
        for pa, pb, out in pairs:
            if png:
                out = os.path.splitext(out)[0] + ".png"
            jobs.append((s, pa, pb, os.path.join(out_dir, s, out) if s else os.path.join(out_dir, out)))
            inputs.update((os.path.realpath(pa), os.path.realpath(pb)))
    if not jobs and not problems:
        raise CombineError([f"{a_dir}: no image files to pair"], "nothing to combine")

    # Check every pair before writing any: readable, same size, and never written over an input.
    good = []
    seen_out: dict[str, str] = {}
    for s, pa, pb, po in jobs:
        if os.path.realpath(po) in inputs:
            problems.append(f"{po}: output would overwrite an input file")
            continue
        if po in seen_out:
            problems.append(f"{pa}: output name {po} clashes with {seen_out[po]}")
            continue
        try:
            sa, sb = open_image(pa, 3).size, open_image(pb, 3).size
        except BadImageError as e:
            problems.append(f"{e.path}: unreadable ({e.reason})")
            continue
        if sa != sb:
            problems.append(
                f"{pa} is {sa[0]}x{sa[1]} but {pb} is {sb[0]}x{sb[1]}: the two halves of a pair must "
                "have the same size"
            )
            continue
        fmt = _format_of(po)
        side = _FORMAT_MAX_SIDE.get(fmt)
        if side and (2 * sa[0] > side or sa[1] > side):
            problems.append(f"{po}: the pair would be {2 * sa[0]}x{sa[1]}, over {fmt}'s {side:,} pixels a side "
                            "(--png writes every pair as PNG)")
            continue
        seen_out[po] = pa
        good.append((s, pa, pb, po))
    # A folder, FIFO or device at an output name cannot be replaced, --overwrite or not: found now,
    # not at the write after the pairs before it were written.
    blocked = [po for *_, po in good if os.path.lexists(po) and not os.path.isfile(po)]
    if blocked:
        raise CombineError([f"{po}: exists and is not a regular file" for po in blocked[:5]],
                           f"cannot write {len(blocked)} of the outputs in OUT {out_dir!r}; nothing was written")
    for folder in sorted({os.path.dirname(po) for *_, po in good}):  # each split folder, made or not
        why = output_folder_problem(folder, f"OUT {out_dir}",
                                    [os.path.basename(po) for *_, po in good if os.path.dirname(po) == folder])
        if why:
            raise CombineError([why], "nothing was written")
    existing = [po for *_, po in good if os.path.lexists(po)]
    if existing and not overwrite:
        raise CombineError(existing[:5] + ([f"... {len(existing) - 5} more"] if len(existing) > 5 else []),
                           f"OUT {out_dir!r} already holds {len(existing)} of the outputs; pass --overwrite "
                           "to replace them; nothing was written")
    if problems and not skip_bad:
        raise CombineError(problems, "cannot combine; nothing was written")
    if not good:
        raise CombineError(problems or [f"{a_dir}: no pairs"], "no usable pairs; nothing was written")

    written, counts = [], {s: 0 for s in splits}
    for i, (s, pa, pb, po) in enumerate(good):
        pair = np.concatenate([np.asarray(open_image(pa, 3)), np.asarray(open_image(pb, 3))], axis=1)
        _save_pair(po, pair)
        written.append(po)
        counts[s] += 1
        if progress is not None:
            progress(i + 1, len(good))
    return CombineReport(written=written, problems=problems, splits=counts)


@interruptible("python -m fastcgan.data.combine")
def main(argv: list[str] | None = None) -> int:
    ap = Parser(
        prog="python -m fastcgan.data.combine",
        description="Combine two folders of matching images into pix2pix A|B pair images.",
    )
    ap.add_argument("a_dir", metavar="A_DIR", help="A images (or split folders train/ val/ test/ of them)")
    ap.add_argument("b_dir", metavar="B_DIR", help="B images with the same file names (and split folders)")
    ap.add_argument("out", metavar="OUT", help="output folder (created)")
    ap.add_argument("--use-AB", action="store_true", help="pair x_A.ext with x_B.ext inside the folders")
    ap.add_argument(
        "--skip-bad",
        action="store_true",
        help="write the good pairs and skip (naming them) unmatched, unreadable or size-mismatched files",
    )
    ap.add_argument("--png", action="store_true", help="write every pair as .png (lossless)")
    ap.add_argument("--max-images", type=int, default=None, help="at most this many pairs per split")
    ap.add_argument("--overwrite", action="store_true", help="replace pair files that already exist in OUT")
    ap.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                    help=f"refuse images with more than N pixels, checked on the file header before decoding "
                    f"(default {DEFAULT_MAX_IMAGE_PIXELS:,}, Pillow's threshold; 0 = no limit)")
    a = ap.parse_args(argv)
    if a.max_images is not None and a.max_images < 1:
        ap.error(f"--max-images must be >= 1, got {a.max_images}")
    if a.max_image_pixels < 0:
        ap.error(f"--max-image-pixels must be >= 0 (0 = no limit), got {a.max_image_pixels}")
    saved_limit = get_max_image_pixels()
    set_max_image_pixels(a.max_image_pixels)
    try:
        report = combine_folders(a.a_dir, a.b_dir, a.out, use_AB=a.use_AB, skip_bad=a.skip_bad, png=a.png,
                                 max_images=a.max_images, overwrite=a.overwrite)
    except (CombineError, FileNotFoundError) as e:
        print(f"combine: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a failed write (WriteError names the file); earlier outputs are complete files
        print(f"combine: error: {e}", file=sys.stderr)
        return 1
    finally:
        set_max_image_pixels(saved_limit)
    for p in report.problems:
        print(f"combine: skipped {p}", file=sys.stderr)
    for s, n in report.splits.items():
        print(f"{os.path.join(a.out, s) if s else a.out}: {n} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
