"""``fastcgan-translate``: run a trained generator (any artifact) over images of any size.

    fastcgan-translate --checkpoint runs/h2z --input photos/ --output out/
    fastcgan-translate --checkpoint g.onnx --input photo.jpg --output out/ --tile 512

Outputs are PNG files with the input's size (N x N with ``--load-size N``) and file name
(``a.jpg`` -> ``a.png``; sub-folders of an input directory are kept), marked with a
``Software: fastcgan-translate`` text chunk. Images of the same size are batched together.
Unreadable images are skipped with a warning and counted, like the data loader does.

Nothing is lost and nothing unexpected runs. Before anything is written (exit status 2, naming
the files): an output that is, or would write over, an input file is refused (symlinks and
hard links resolved; ``--output`` equal to ``--input`` included); existing outputs are refused
unless ``--overwrite``; images over ``--max-image-pixels`` (default 89,478,485, read from the
file header, not decoded) are refused; ``--tile-overlap`` must be less than half of ``--tile``
and no image may need more than 16,384 tiles. AOTInductor ``.pt2`` packages and TensorRT
engines hold native code and run only when the manifest ``fastcgan-export`` wrote beside them
verifies, or with ``--trust-artifact``. Outputs are written atomically.

``--html`` also writes ``OUTPUT/index.html`` (the official ``test.py`` results page): each input
(linked where it is, not copied) beside its translation; it is an output like the images.

``--pairs``: the inputs are A|B pair images (a pix2pix test split, as the official ``test.py
--model pix2pix`` reads them): the input half -- ``--direction``, by default the run's own (or the
one an exported pix2pix generator records) -- is translated, and the page shows each whole pair
(input and target) beside the translation. Odd-width pairs are skipped like unreadable files.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterator

import numpy as np

from fastcgan._cli import Parser, interruptible
from fastcgan.data.images import DEFAULT_MAX_IMAGE_PIXELS, IMG_EXTENSIONS, MAX_LOAD_SIZE, WINDOW_PIXELS
from fastcgan.deploy._common import DIRECTIONS, ArtifactError
from fastcgan.deploy.runtime import ENGINES, InferenceMemoryError
from fastcgan.fileio import file_identity, output_folder_problem, path_inside

HTML_NAME = "index.html"
MAX_BATCH_SIZE = 1024  # images per run; a bound so that a typo cannot ask for unbounded memory


# Official test.py flags whose name changed (those only hyphenated are found by Parser itself).
OFFICIAL_TEST_FLAGS = {
    "--results_dir": "--output",
    "--num_test": "--max-images",
    "--dataroot": "--input (a folder or an image)",
    "--epoch": "--checkpoint RUN/checkpoints/step_....ckpt",
    "--name": "--checkpoint RUN (the run folder)",
    "--checkpoints_dir": "--checkpoint RUN (the run folder)",
    "--aspect_ratio": "nothing (outputs keep the input's size without --load-size)",
    "--model": "nothing (the run knows its model; --direction picks the generator)",
    "--gpu_ids": "--device",
    "--no_dropout": "nothing (dropout is off at inference here)",
}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(official=OFFICIAL_TEST_FLAGS, prog="fastcgan-translate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="run directory, generator .safetensors, training checkpoint .ckpt (the generator at that "
                   "step), .onnx, TensorRT .engine or AOTInductor .pt2 "
                   "(the last two hold native code: see --trust-artifact)")
    p.add_argument("--input", required=True, help="an image file or a directory of images (searched recursively)")
    p.add_argument("--output", required=True,
                   help="output directory (created); never the --input directory itself, never over an input file")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist (never inputs)")
    p.add_argument("--direction", choices=DIRECTIONS, default=None,
                   help="generator of a run directory (default AtoB, or its only one); with --pairs: which half is "
                   "the input (default: the run's --direction, else the one an exported pix2pix generator records, "
                   "else AtoB)")
    p.add_argument("--pairs", action="store_true",
                   help="inputs are A|B pair images (pix2pix test splits): translate the input half")
    p.add_argument("--engine", choices=ENGINES, default=None, help="default: the artifact's own")
    p.add_argument("--batch-size", type=int, default=8, help=f"images run at a time (1 to {MAX_BATCH_SIZE})")
    p.add_argument("--max-images", type=int, default=None, metavar="N",
                   help="only the first N images of a folder, sorted by path (the official test.py --num_test)")
    p.add_argument("--load-size", type=int, default=None, metavar="N",
                   help="resize every input (with --pairs: each half) to N x N first, as the official test.py "
                        "does (PIL bicubic, load_size = crop_size, e.g. 256); outputs are N x N. Default: each "
                        "image at its own size")
    p.add_argument("--tile", type=int, default=None, help="translate images larger than this in overlapping tiles")
    p.add_argument("--tile-overlap", type=int, default=None,
                   help="pixels shared by neighbouring tiles, < tile/2 (default 32, less for smaller tiles)")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                   help=f"refuse images with more than N pixels, checked on the file header before decoding "
                   f"(default {DEFAULT_MAX_IMAGE_PIXELS:,}, Pillow's threshold; 0 = no limit)")
    p.add_argument("--trust-artifact", action="store_true",
                   help="run a .pt2 / .engine (native code) even without a manifest that verifies; only for "
                   "files from a source you trust")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--fp16", action="store_true", help="half precision where the engine supports it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--html", action="store_true",
                   help=f"also write OUTPUT/{HTML_NAME}: every input beside its translation (as the official "
                   "test.py's results page; the inputs are linked where they are, not copied)")
    return p


# Every PNG written carries this text chunk: in an --output folder inside --input it tells the
# translations of an earlier run (not inputs) from the user's own images there (inputs: never
# overwritten, even with --overwrite).
OUTPUT_MARK = ("Software", "fastcgan-translate")


def _is_output_of_ours(path: str) -> bool:
    from PIL import Image

    from fastcgan.data.images import metadata_problem

    try:
        if metadata_problem(path):  # millions of tiny chunks: refused unread, as every image reader here does
            return False
        # open() reads the chunks before the pixel data into .info (ours are written there);
        # .text would decode the whole image to find chunks after it.
        with Image.open(path, formats=("PNG",)) as im:
            return im.format == "PNG" and im.info.get(OUTPUT_MARK[0]) == OUTPUT_MARK[1]
    except Exception:  # noqa: BLE001 - unreadable: not one of ours
        return False


def _output_names(files: list[str], root: str | None) -> list[str]:
    """Relative output paths ``<name>.png``, distinct: a clash (``a.jpg`` and ``a.png``) keeps the
    full name (``a.jpg.png``), and a name still taken (``a.png`` vs an input called ``a.png.png``)
    gets a counter (``a.png.1.png``), so no translation is written over another."""
    rel = [os.path.relpath(f, root) if root else os.path.basename(f) for f in files]
    stems = [os.path.splitext(r)[0] + ".png" for r in rel]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    wanted = [s if counts[s] == 1 else r + ".png" for s, r in zip(stems, rel)]
    taken, out = set(), []
    for w in wanted:
        name, k = w, 0
        while os.path.normcase(name) in taken:
            k += 1
            name = f"{w[:-4]}.{k}.png"
        taken.add(os.path.normcase(name))
        out.append(name)
    return out


def _url(path: str, start: str) -> str:
    """``path`` relative to the folder ``start`` as a URL (spaces, ``#``, ``?``, quotes escaped;
    a name that is not UTF-8 keeps its own bytes, percent-encoded)."""
    from urllib.parse import quote

    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(start)).replace(os.sep, "/")
    return quote(rel, errors="surrogateescape")


def _shown(name: str) -> str:
    """A file name as page text: escaped, undecodable bytes shown as U+FFFD."""
    from html import escape

    return escape(name.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


def _results_page(title: str, rows: list[tuple[str, str]], skipped: list[str], folder: str,
                  first: str = "input") -> Iterator[bytes]:
    """The results page, in pieces (a folder of 200 k images made a 470 MB page, built whole at
    3x that): one row per image (input | translation, each linking to itself). File names are
    escaped: a name is text, never markup."""
    def cell(path: str, name: str) -> str:
        url = _url(path, folder)
        return f'<td><a href="{url}"><img src="{url}"></a><br>{_shown(name)}</td>'

    yield (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>" + _shown(title) + "</title><style>"
        "img{max-width:256px;max-height:256px}td{vertical-align:top;padding:4px;font:12px sans-serif}</style>"
        "</head><body><h3>" + _shown(title) + f"</h3>\n<table><tr><th>{first}</th><th>translation</th></tr>"
    ).encode()
    for src, dst in rows:
        yield f"\n<tr>{cell(src, os.path.basename(src))}{cell(dst, os.path.relpath(dst, folder))}</tr>".encode()
    yield b"\n</table>"
    if skipped:
        yield b"<p>Skipped (unreadable):</p><ul>"
        yield from (f"<li>{_shown(s)}</li>".encode() for s in skipped)
        yield b"</ul>"
    yield b"</body></html>\n"


def _error(msg: str) -> int:
    print(f"fastcgan-translate: error: {msg}", file=sys.stderr)
    return 2


def _check_outputs(args, files: list[str], dests: list[str]) -> str | None:
    """Why writing ``dests`` would lose data (an input overwritten, an output replaced without
    --overwrite), or None. Symlinks are resolved and hard links compared by inode."""
    out = args.output
    if not out:  # an unset shell variable: the current folder is never meant
        return "--output is empty: give an output directory"
    in_real = os.path.realpath(args.input)
    out_real = os.path.realpath(out)
    if os.path.isfile(args.input) and (out_real == in_real or file_identity(out) == file_identity(args.input)):
        return f"--output {out} is the input file {args.input}: give an output directory"
    if os.path.isdir(args.input) and out_real == in_real:
        return (f"--output {out} is the input directory {args.input}: the translated images would be written "
                "among (and possibly over) the inputs; choose another output directory")
    if os.path.lexists(out) and not os.path.isdir(out):
        return f"--output {out} exists and is not a directory" + (" (a link to nowhere)" if os.path.islink(out) else "")
    if not os.path.isdir(out) and os.path.splitext(out)[1].lower() in IMG_EXTENSIONS:
        return (f"--output {out} names an image file, but --output is the folder the translations go into (each "
                f"keeps its input's name): give a folder, e.g. --output {os.path.dirname(out) or '.'}")
    why = output_folder_problem(out, f"--output {out}", {os.path.basename(d) for d in dests})
    if why:
        return why
    reals = {os.path.realpath(f): f for f in files}
    ids = {i: f for f in files if (i := file_identity(f)) is not None}
    clashes = []
    for d in dests:
        src = reals.get(os.path.realpath(d)) or (ids.get(file_identity(d)) if os.path.lexists(d) else None)
        if src is not None:
            clashes.append((d, src))
    if clashes:
        d, src = clashes[0]
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        return (f"writing {d} would overwrite the input file {src}{more}; inputs are never overwritten, "
                "choose an output directory outside the inputs")
    odd = [d for d in dests if os.path.lexists(d) and not os.path.isfile(d)]
    if odd:
        return f"{odd[0]} exists and is not a regular file (a folder, device, FIFO or dangling link): never replaced"
    why = _folder_clash(out, dests)
    if why:
        return why
    existing = [d for d in dests if os.path.lexists(d)]
    if existing and not args.overwrite:
        shown = ", ".join(existing[:3]) + (" ..." if len(existing) > 3 else "")
        return f"--output {out} already holds {len(existing)} of the outputs ({shown}); pass --overwrite to replace them"
    return None


def _folder_clash(out: str, dests: list[str]) -> str | None:
    """An output whose folder is a file (existing, or another output: ``a.png`` beside an input
    folder ``a.png/``), found before the first write rather than as an error half-way."""
    wanted = {os.path.normpath(d): d for d in dests}
    top = os.path.normpath(out)
    for d in dests:
        parent = os.path.dirname(os.path.normpath(d))
        while parent and parent != top and len(parent) > len(top):
            if parent in wanted:
                return (f"{wanted[parent]} and {d}: one output would be a file and a folder (rename the input "
                        f"folder {os.path.basename(parent)!r} or move it out of the input)")
            if os.path.lexists(parent) and not os.path.isdir(parent):
                return f"{parent} exists and is not a folder, so {d} cannot be written there; never replaced"
            parent = os.path.dirname(parent)
    return None


def _directions(args) -> tuple[str | None, str | None]:
    """(the direction translated, the generator asked of the artifact). A run directory or
    checkpoint gives the generator of that direction (default AtoB, or the run's only one); a
    one-generator file is labelled with its recorded direction. With --pairs the direction
    is which half is the input (default: the run's own, else what the artifact records, else
    AtoB); a pix2pix run (or a released model's folder) has one generator, ``AtoB``, whichever
    half it reads."""
    from fastcgan.evaluate import is_run, run_generators
    from fastcgan.evaluate_paired import run_direction

    run = is_run(args.checkpoint)
    if not args.pairs:
        return args.direction, args.direction  # None: a run's AtoB generator, or its only one

    direction = args.direction or run_direction(args.checkpoint)  # else the artifact's (after loading)
    if not run:
        return direction, None
    return direction, direction if direction in run_generators(args.checkpoint) else None


def _why_unreadable(path: str) -> str:
    """Why a file whose header cannot be read is no image, as the decoder says it (the header fails
    there first, and a limit of one pixel stops anything from being decoded)."""
    from fastcgan.data import BadImageError
    from fastcgan.data.images import open_image

    try:
        open_image(path, max_pixels=1)
    except BadImageError as e:
        return e.reason
    return "not a readable image file"


def _read(path: str, channels: int, max_pixels: int, half: str | None, load_size: int | None):
    """``path`` as a uint8 (C, H, W) tensor; ``half``: of an A|B pair, the A (``AtoB``) or B half;
    ``load_size``: resized to that square."""
    from fastcgan.data import load_image, split_pair
    from fastcgan.data.images import open_image, pil_to_tensor, resize_square

    if half is None:
        return resize_square(load_image(path, channels=channels, max_pixels=max_pixels), load_size)
    a, b = split_pair(open_image(path, 3, max_pixels), path)
    img = a if half == "AtoB" else b
    return resize_square(pil_to_tensor(img.convert("L") if channels == 1 else img), load_size)


@interruptible("fastcgan-translate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fastcgan.data import images as _images

    saved_limit = _images.get_max_image_pixels()
    try:
        return _main(args)
    finally:
        _images.set_max_image_pixels(saved_limit)


def _main(args) -> int:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from fastcgan.data import BadImageError, is_image_file, make_dataset
    from fastcgan.data.images import oriented_size, pixel_limit_problem, set_max_image_pixels
    from fastcgan.deploy import load
    from fastcgan.deploy.tiling import check_tile_args, default_overlap
    from fastcgan.devices import DeviceUnavailableError, resolve_device
    from fastcgan.fileio import WriteError, atomic_write, atomic_writer

    try:
        resolve_device(args.device)
    except DeviceUnavailableError as e:
        return _error(f"--device {args.device}: {e.reason}")
    except ValueError as e:
        return _error(f"--device {args.device}: {e}")
    if not 1 <= args.batch_size <= MAX_BATCH_SIZE:
        return _error(f"--batch-size must be in [1, {MAX_BATCH_SIZE}], got {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        return _error(f"--max-images must be >= 1, got {args.max_images}")
    if args.max_image_pixels < 0:
        return _error(f"--max-image-pixels must be >= 0 (0 = no limit), got {args.max_image_pixels}")
    if args.load_size is not None and not 1 <= args.load_size <= MAX_LOAD_SIZE:
        return _error(f"--load-size must be in [1, {MAX_LOAD_SIZE}], got {args.load_size}")
    try:
        if args.tile is not None:
            check_tile_args(args.tile, default_overlap(args.tile) if args.tile_overlap is None else args.tile_overlap,
                            names=("--tile", "--tile-overlap"))
        elif args.tile_overlap is not None and args.tile_overlap < 0:
            raise ValueError(f"--tile-overlap must be >= 0, got {args.tile_overlap}")
    except ValueError as e:
        return _error(str(e))
    from fastcgan.evaluate import is_run

    if args.direction and not args.pairs and os.path.exists(args.checkpoint) and not is_run(args.checkpoint):
        return _error(f"--direction picks a generator of a run directory or training checkpoint (with --pairs: the "
                      f"input half); {args.checkpoint} is one generator")
    if not os.path.exists(args.input):
        return _error(f"--input {args.input}: no such file or directory")
    if not (os.path.isdir(args.input) or os.path.isfile(args.input)):  # a FIFO would block the reader forever
        return _error(f"--input {args.input}: not a regular file or a directory")
    if os.path.isdir(args.input):
        try:
            files, root = make_dataset(args.input), args.input
        except OSError as e:  # an unreadable sub-folder: not silently left out
            return _error(f"--input {args.input}: cannot list {e.filename or args.input}: {e.strerror or e}")
        # An output folder inside the input folder: our translations from an earlier run there are
        # outputs, not inputs; any other image there is an input like the rest.
        out_real = os.path.realpath(args.output)
        if out_real != os.path.realpath(args.input):
            files = [f for f in files if not (path_inside(f, out_real) and _is_output_of_ours(f))]
        if not files:
            return _error(f"--input {args.input}: no image files found")
        inputs = files  # all of them: --max-images never lets an output replace one left out
        files = files[: args.max_images]
    else:
        if args.max_images is not None:
            return _error(f"--max-images {args.max_images}: --input {args.input} is one file (the flag takes the "
                          "first N images of a folder)")
        if oriented_size(args.input) is None:  # one unreadable file: nothing to translate
            return _error(f"--input {args.input}: {_why_unreadable(args.input)}")
        if not is_image_file(args.input):
            warnings.warn(f"{args.input}: extension is not a known image type; trying to decode it anyway")
        files, root = [args.input], None
        inputs = files
    names = _output_names(files, root)
    dests = [os.path.join(args.output, n) for n in names]
    page = os.path.join(args.output, HTML_NAME) if args.html else None  # checked like an output
    why = _check_outputs(args, inputs, dests + ([page] if page else []))
    if why:
        return _error(why)

    # Image sizes from the headers (nothing decoded): the pixel limit and the tile count are
    # checked for every file before anything is written.
    limit = args.max_image_pixels
    set_max_image_pixels(limit)  # also lifts Pillow's own backstop above a raised limit
    headers = [oriented_size(f) for f in files]  # as decoded: a portrait photo stored landscape tiles as a portrait
    why = pixel_limit_problem(zip(files, headers), limit)  # the whole file is decoded, whatever --load-size
    if why:
        return _error(why)
    sizes: dict[int, tuple[int, int]] = {  # of what is translated: a pair's half; unreadable: skipped when decoded
        i: (args.load_size,) * 2 if args.load_size else (wh[0] // 2, wh[1]) if args.pairs else wh
        for i, wh in enumerate(headers) if wh is not None}

    try:
        direction, generator = _directions(args)
        translator = load(args.checkpoint, device=args.device, engine=args.engine, fp16=args.fp16,
                          tile=args.tile, tile_overlap=args.tile_overlap, direction=generator,
                          batch_size=args.batch_size, trust_artifact=args.trust_artifact)
    except DeviceUnavailableError as e:
        return _error(f"--device {args.device}: {e.reason}")
    except ArtifactError as e:
        return _error(f"--checkpoint {e}")
    except (ValueError, RuntimeError) as e:
        return _error(str(e))
    if translator.input_nc not in (1, 3) or translator.output_nc not in (1, 3):
        return _error(f"image files need 1- or 3-channel generators, this one is "
                      f"{translator.input_nc}->{translator.output_nc}")
    # Unpaired: a file's label (the HTML page's title); pairs: the half an exported pix2pix generator reads.
    direction = direction or (translator.spec.pairs_direction if args.pairs else translator.spec.direction) or "AtoB"
    if translator.trust != "data artifact (no code)":
        print(f"{args.checkpoint}: {translator.trust}", file=sys.stderr)
    try:  # tile counts, and whether the largest image fits in memory
        translator.check_images((files[i], h, w) for i, (w, h) in sizes.items())
    except (ValueError, InferenceMemoryError) as e:
        return _error(str(e))

    try:
        from tqdm import tqdm

        bar = tqdm(total=len(files), unit="img", disable=args.no_progress, desc="translate")
    except ImportError:  # pragma: no cover - tqdm is a dependency
        bar = None
    skipped: list[str] = []
    done = 0
    # Files are read in windows of a few batches (and at most WINDOW_PIXELS pixels, one large
    # image at least); each window is grouped by size so same-size images share a forward pass,
    # and memory stays bounded for large folders and large images.
    window = max(args.batch_size * 4, 16)
    start = 0
    while start < len(files):
        stop, pixels = start, 0
        while stop < len(files) and stop - start < window and (stop == start or pixels < WINDOW_PIXELS):
            w, h = sizes.get(stop, (0, 0))
            pixels += w * h
            stop += 1
        loaded = []
        for i in range(start, stop):
            try:
                loaded.append((i, _read(files[i], translator.input_nc, limit, direction if args.pairs else None,
                                        args.load_size)))
            except BadImageError as e:
                warnings.warn(f"skipping unreadable image {e.path}: {e.reason}")
                skipped.append(files[i])
                if bar is not None:
                    bar.update(1)
        start = stop
        if not loaded:
            continue
        try:
            outs = translator.translate_batch([t for _, t in loaded], batch_size=args.batch_size)
        except (ArtifactError, RuntimeError) as e:  # an engine that fails on these inputs (or memory)
            if bar is not None:
                bar.close()
            print(f"fastcgan-translate: error: translating {files[loaded[0][0]]}: {e}", file=sys.stderr)
            return 1
        for (i, _), y in zip(loaded, outs):
            arr = y[0].permute(1, 2, 0).numpy() if y.dim() == 4 else y.permute(1, 2, 0).numpy()
            arr = np.ascontiguousarray(arr)
            img = Image.fromarray(arr[:, :, 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")
            mark = PngInfo()
            mark.add_text(*OUTPUT_MARK)
            try:
                # The folders are made here, by the first output: a run that translates nothing
                # leaves none. Atomic: a crash leaves the previous file or the complete new one; a symlink at the
                # destination is replaced, never written through.
                with atomic_writer(dests[i], replace=args.overwrite) as f:
                    img.save(f, format="PNG", pnginfo=mark)
            except WriteError as e:
                if bar is not None:
                    bar.close()
                print(f"fastcgan-translate: error: {e}", file=sys.stderr)
                return 1
            done += 1
            if bar is not None:
                bar.update(1)
        del loaded, outs
    if bar is not None:
        bar.close()
    if page is not None and done:
        unread = set(skipped)
        rows = [(f, d) for f, d in zip(files, dests) if f not in unread]
        title = f"{args.checkpoint} ({direction}{', pairs' if args.pairs else ''}, {translator.engine}): {args.input}"
        first = ("pair: input | target" if direction == "AtoB" else "pair: target | input") if args.pairs else "input"
        try:
            atomic_write(page, _results_page(title, rows, skipped, args.output, first), replace=args.overwrite)
        except WriteError as e:
            print(f"fastcgan-translate: error: {e}", file=sys.stderr)
            return 1
    msg = (f"translated {done} image(s) into {args.output} with the {direction} generator of {args.checkpoint} "
           f"({translator.engine} on {translator.device})")
    if skipped:
        msg += f"; skipped {len(skipped)} unreadable: " + ", ".join(os.path.basename(s) for s in skipped[:5])
        msg += " ..." if len(skipped) > 5 else ""
    print(msg)
    if not done and root is None:  # the one input file cannot be decoded: bad input, nothing written
        return 2
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
