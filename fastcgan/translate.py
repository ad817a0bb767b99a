"""``fastcgan-translate``: run a trained generator (any artifact) over images of any size.

    fastcgan-translate --checkpoint runs/h2z --input photos/ --output out/
    fastcgan-translate --checkpoint g.onnx --input photo.jpg --output out/ --tile 512

Outputs are PNG files with the input's size and file name (``a.jpg`` -> ``a.png``; sub-folders
of an input directory are kept). Images of the same size are batched together. Unreadable
images are skipped with a warning and counted, like the data loader does.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import numpy as np

from fastcgan.deploy._common import DIRECTIONS, ArtifactError
from fastcgan.deploy.runtime import ENGINES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastcgan-translate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="run directory, generator .safetensors, .onnx, TensorRT .engine or AOTInductor .pt2")
    p.add_argument("--input", required=True, help="an image file or a directory of images (searched recursively)")
    p.add_argument("--output", required=True, help="output directory (created)")
    p.add_argument("--direction", choices=DIRECTIONS, default="AtoB", help="generator of a run directory")
    p.add_argument("--engine", choices=ENGINES, default=None, help="default: the artifact's own")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tile", type=int, default=None, help="translate images larger than this in overlapping tiles")
    p.add_argument("--tile-overlap", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--fp16", action="store_true", help="half precision where the engine supports it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _output_names(files: list[str], root: str | None) -> list[str]:
    """Relative output paths ``<name>.png``; a clash (``a.jpg`` and ``a.png``) keeps the full name."""
    rel = [os.path.relpath(f, root) if root else os.path.basename(f) for f in files]
    stems = [os.path.splitext(r)[0] + ".png" for r in rel]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [s if counts[s] == 1 else r + ".png" for s, r in zip(stems, rel)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from PIL import Image

    from fastcgan.data import BadImageError, is_image_file, load_image, make_dataset
    from fastcgan.deploy import load

    if args.batch_size < 1:
        print("fastcgan-translate: error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    if not os.path.exists(args.input):
        print(f"fastcgan-translate: error: --input {args.input}: no such file or directory", file=sys.stderr)
        return 2
    if os.path.isdir(args.input):
        files, root = make_dataset(args.input), args.input
        if not files:
            print(f"fastcgan-translate: error: --input {args.input}: no image files found", file=sys.stderr)
            return 2
    else:
        if not is_image_file(args.input):
            warnings.warn(f"{args.input}: extension is not a known image type; trying to decode it anyway")
        files, root = [args.input], None
    try:
        translator = load(args.checkpoint, device=args.device, engine=args.engine, fp16=args.fp16,
                          tile=args.tile, tile_overlap=args.tile_overlap, direction=args.direction,
                          batch_size=args.batch_size)
    except (ArtifactError, ValueError, RuntimeError) as e:
        print(f"fastcgan-translate: error: --checkpoint {e}", file=sys.stderr)
        return 2
    if translator.input_nc not in (1, 3) or translator.output_nc not in (1, 3):
        print(f"fastcgan-translate: error: image files need 1- or 3-channel generators, this one is "
              f"{translator.input_nc}->{translator.output_nc}", file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    names = _output_names(files, root)

    try:
        from tqdm import tqdm

        bar = tqdm(total=len(files), unit="img", disable=args.no_progress, desc="translate")
    except ImportError:  # pragma: no cover - tqdm is a dependency
        bar = None
    skipped: list[str] = []
    done = 0
    # Files are read in windows of a few batches; each window is grouped by size so same-size
    # images share a forward pass (memory stays bounded for large folders).
    window = max(args.batch_size * 4, 16)
    for start in range(0, len(files), window):
        loaded = []
        for i in range(start, min(start + window, len(files))):
            try:
                loaded.append((i, load_image(files[i], channels=translator.input_nc)))
            except BadImageError as e:
                warnings.warn(f"skipping unreadable image {e.path}: {e.reason}")
                skipped.append(files[i])
                if bar is not None:
                    bar.update(1)
        if not loaded:
            continue
        outs = translator.translate_batch([t for _, t in loaded], batch_size=args.batch_size)
        for (i, _), y in zip(loaded, outs):
            arr = y[0].permute(1, 2, 0).numpy() if y.dim() == 4 else y.permute(1, 2, 0).numpy()
            arr = np.ascontiguousarray(arr)
            img = Image.fromarray(arr[:, :, 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")
            dst = os.path.join(args.output, names[i])
            os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
            img.save(dst)
            done += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    msg = f"translated {done} image(s) into {args.output} with {translator.engine} on {translator.device}"
    if skipped:
        msg += f"; skipped {len(skipped)} unreadable: " + ", ".join(os.path.basename(s) for s in skipped[:5])
        msg += " ..." if len(skipped) > 5 else ""
    print(msg)
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
