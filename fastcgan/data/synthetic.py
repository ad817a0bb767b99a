"""Built-in unpaired dataset with known ground truth: random shape scenes in two renderings.

A *scene* is a label map: a background (label 0) overlaid with 3-6 random circles, rectangles and
full-width stripes, each carrying one of four classes (labels 1-4). A scene renders

* in domain A ("day"): light background, flat fills from palette A;
* in domain B ("night"): dark background, fills from palette B (a permutation of the classes with
  different colours), and every shape drawn with a dark 1-px outline (``size // 64`` px) on the
  inside of its boundary.

So A -> B is a per-pixel colour map plus an edge texture, B -> A a colour map that fills the
outline back in from the neighbouring interior: local, deterministic and learnable by a small
ResNet generator in minutes at 64x64. Train A and train B scenes are drawn independently (truly
unpaired); the evaluation-only folders ``testA_truth_B`` / ``testB_truth_A`` hold each test scene
rendered in the other domain, under the same file name.

The paired form (:func:`make_synthetic_aligned_dataset`, ``--aligned``) writes the official pix2pix
layout instead: ``train/`` and ``test/`` of images holding a scene's A and B renderings side by side;
the colorization form (:func:`make_synthetic_color_dataset`, ``--color``) ``train/`` and ``test/`` of
B renderings, whose colours follow from their lightness.

``python -m fastcgan.data.synthetic OUT [--size 64 --n-train 200 --n-test 50 --seed 0] [--aligned | --color]``
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator

import numpy as np
from PIL import Image

from fastcgan._cli import Parser
from fastcgan.fileio import WriteError, describe_os_error, read_json, remove_stale_temporaries

__all__ = [
    "MANIFEST",
    "ensure_synthetic_aligned_dataset",
    "ensure_synthetic_color_dataset",
    "ensure_synthetic_dataset",
    "make_synthetic_aligned_dataset",
    "make_synthetic_color_dataset",
    "make_synthetic_dataset",
    "random_scene",
    "render_scene",
]

MANIFEST = "fastcgan_synthetic.json"
WRITING = ".fastcgan_synthetic.writing"  # present while folders are replaced (the manifest is not)
GENERATED_NAME = re.compile(r"[a-z]+_[0-9]{5,}\.png")  # what the generator writes: a_00000.png, pair_00012.png
_VERSION = 1
_FOLDERS = ("trainA", "trainB", "testA", "testB", "testA_truth_B", "testB_truth_A")
_ALIGNED_FOLDERS = ("train", "test")

# Label 0 is the background, 1-4 the shape classes.
PALETTE_A = np.array(
    [[236, 228, 206], [205, 45, 40], [40, 110, 205], [242, 190, 35], [55, 160, 75]], dtype=np.uint8
)
PALETTE_B = np.array(
    [[28, 34, 62], [120, 235, 225], [250, 140, 60], [175, 95, 215], [235, 235, 240]], dtype=np.uint8
)
OUTLINE_B = np.array([8, 8, 12], dtype=np.uint8)

# Independent random streams per (split, domain) so no train A scene is a train B scene.
_STREAMS = {("train", "A"): 0, ("train", "B"): 1, ("test", "A"): 2, ("test", "B"): 3}


def random_scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random (size, size) uint8 label map."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    labels = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(3, 7))):
        cls = int(rng.integers(1, len(PALETTE_A)))
        kind = int(rng.integers(0, 3))
        if kind == 0:  # disc
            r = rng.uniform(0.08, 0.22) * size
            cy, cx = rng.uniform(0, size, 2)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif kind == 1:  # axis-aligned rectangle
            h, w = rng.uniform(0.15, 0.45, 2) * size
            y0, x0 = rng.uniform(-0.1 * size, size * 0.9, 2)
            mask = (yy >= y0) & (yy < y0 + h) & (xx >= x0) & (xx < x0 + w)
        else:  # stripe across the whole image at a random angle
            theta = rng.uniform(0, np.pi)
            half = rng.uniform(0.05, 0.1) * size
            d = rng.uniform(-0.3, 0.3) * size
            c = size / 2
            mask = np.abs((xx - c) * np.cos(theta) + (yy - c) * np.sin(theta) - d) < half
        labels[mask] = cls
    return labels


def _shift(a: np.ndarray, axis: int, step: int, fill) -> np.ndarray:
    """``a`` moved by ``step`` (+-1) along ``axis``, the vacated border filled with ``fill``."""
    out = np.full_like(a, fill)
    if axis == 0:
        out[max(step, 0) : a.shape[0] + min(step, 0)] = a[max(-step, 0) : a.shape[0] + min(-step, 0)]
    else:
        out[:, max(step, 0) : a.shape[1] + min(step, 0)] = a[:, max(-step, 0) : a.shape[1] + min(-step, 0)]
    return out


_NEIGHBOURS = ((0, 1), (0, -1), (1, 1), (1, -1))


def _outline(labels: np.ndarray, width: int) -> np.ndarray:
    """Shape pixels within ``width`` 4-neighbour steps of a pixel with another label (the image
    border is not an edge)."""
    edge = np.zeros(labels.shape, dtype=bool)
    for axis, step in _NEIGHBOURS:
        nb = _shift(labels, axis, step, 0)
        valid = _shift(np.ones_like(edge), axis, step, False)
        edge |= valid & (nb != labels)
    for _ in range(width - 1):  # grow inwards, staying inside the same shape
        grown = edge.copy()
        for axis, step in _NEIGHBOURS:
            grown |= _shift(edge, axis, step, False) & (_shift(labels, axis, step, 255) == labels)
        edge = grown
    return edge & (labels != 0)


def render_scene(labels: np.ndarray, domain: str) -> np.ndarray:
    """Render a label map as an (H, W, 3) uint8 image of ``domain`` "A" or "B"."""
    if domain == "A":
        return PALETTE_A[labels]
    if domain == "B":
        img = PALETTE_B[labels]
        img[_outline(labels, max(1, labels.shape[0] // 64))] = OUTLINE_B
        return img
    raise ValueError(f"domain must be 'A' or 'B', got {domain!r}")


def _scene(seed: int, split: str, domain: str, index: int, size: int) -> np.ndarray:
    rng = np.random.default_rng((int(seed), _STREAMS[(split, domain)], int(index)))
    return random_scene(rng, size)


def _params(size, n_train, n_test, seed, layout="unaligned") -> dict:
    params = {
        "version": _VERSION,
        "size": int(size),
        "n_train": int(n_train),
        "n_test": int(n_test),
        "seed": int(seed),
    }
    if layout != "unaligned":  # manifests of the unpaired layout predate the key
        params["layout"] = layout
    return params


def _save(img: np.ndarray, path: str) -> None:
    Image.fromarray(img).save(path, compress_level=1)  # fast; PNG is lossless at any level


# A built-in set for tests and demos, bounded so that a typo cannot ask for 149 GB of arrays
# (--size 100000) or run for days writing a billion files.
MAX_SIZE = 2048
MAX_IMAGES = 100_000


def _check_args(size, n_train, n_test):
    if not (isinstance(size, int) and 8 <= size <= MAX_SIZE):
        raise ValueError(f"size must be an int in [8, {MAX_SIZE}], got {size!r}")
    for name, v in (("n_train", n_train), ("n_test", n_test)):
        if not (isinstance(v, int) and 1 <= v <= MAX_IMAGES):
            raise ValueError(f"{name} must be an int in [1, {MAX_IMAGES:,}], got {v!r}")


STALE_PATTERN = r"\.synthetic-(\d+)-.+"


@contextlib.contextmanager
def _generating(root: str) -> Iterator[None]:
    """Held while one process checks and (re)writes a dataset in ``root``'s parent folder: runs
    started at once into a fresh --output-dir each generated the same synthetic_N/ and replaced
    each other's folders under them (a FileNotFoundError traceback in one of them). An OS lock on
    the parent folder itself (released when the process ends, however it ends; nothing is left)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits for the process generating there
        yield
    finally:
        os.close(fd)


def _write_dataset(out_dir: str, folders: tuple[str, ...], params: dict, fill) -> str:
    """Write a dataset into ``out_dir`` through a temporary sibling folder: ``fill(tmp)`` writes
    ``folders`` and returns the image counts; the folders are moved in and the manifest last."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.isdir(out_dir):
        present = set(os.listdir(out_dir))
        foreign = sorted(present - set(folders) - {MANIFEST, WRITING})
        if foreign:
            raise FileExistsError(
                f"{out_dir!r} already holds other files ({', '.join(foreign[:5])}); refusing to write the "
                "synthetic dataset there"
            )
        # trainA/ ... with neither the manifest nor the being-written mark are somebody's own images
        # (e.g. --dataset synthetic --dataroot on a real dataset): never replaced.
        theirs = sorted(present & set(folders)) if not present & {MANIFEST, WRITING} else []
        if theirs:
            raise FileExistsError(
                f"{out_dir!r} holds {', '.join(f + '/' for f in theirs[:4])} that fastcgan did not generate (no "
                f"{MANIFEST}); refusing to replace them with the synthetic dataset: choose another folder"
            )
        # Folders of ours are replaced whole: anything in them the generator does not write (a
        # user's notes, photos, a results/ folder) would go with them.
        added = []
        for f in sorted(present & set(folders)):
            for e in sorted(os.listdir(os.path.join(out_dir, f))):
                if not (GENERATED_NAME.fullmatch(e) and os.path.isfile(os.path.join(out_dir, f, e))):
                    added.append(os.path.join(f, e))
        if added:
            raise FileExistsError(
                f"{out_dir!r}: {', '.join(added[:3])}{' ...' if len(added) > 3 else ''} "
                "were not written by the synthetic generator, and regenerating replaces those folders whole; move "
                "them out (or use another folder)"
            )
    elif os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir!r} exists and is not a directory")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    # A generator killed by a signal (SIGTERM, SIGKILL: no finally runs) left its folder: the pid
    # in the name tells whether its writer still runs.
    remove_stale_temporaries(parent, STALE_PATTERN)
    tmp = tempfile.mkdtemp(prefix=f".synthetic-{os.getpid()}-", dir=parent)
    try:
        try:
            counts = fill(tmp)
        except OSError as e:  # a full disk, a quota: nothing of the new dataset is left
            raise WriteError(e.errno, f"could not write the synthetic dataset into {out_dir}: "
                             f"{describe_os_error(e)} (nothing was replaced)") from None
        os.makedirs(out_dir, exist_ok=True)
        manifest_path, writing = os.path.join(out_dir, MANIFEST), os.path.join(out_dir, WRITING)
        with open(writing, "w"):  # ours while incomplete: a run killed below may replace these folders
            pass
        if os.path.exists(manifest_path):
            os.remove(manifest_path)  # incomplete from here until the new manifest lands
        for f in folders:
            dst = os.path.join(out_dir, f)
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            os.replace(os.path.join(tmp, f), dst)
        manifest = dict(params, counts=counts)
        with open(os.path.join(tmp, MANIFEST), "w") as fh:
            json.dump(manifest, fh, indent=2)
        os.replace(os.path.join(tmp, MANIFEST), manifest_path)
        os.remove(writing)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def make_synthetic_dataset(
    out_dir: str, size: int = 64, n_train: int = 200, n_test: int = 50, seed: int = 0
) -> str:
    """Write the dataset into ``out_dir`` (created; existing synthetic folders are replaced).

    Refuses to touch an ``out_dir`` holding anything besides a previous synthetic dataset. Files
    are written into a temporary sibling folder and moved in at the end, manifest last, so an
    interrupted run never looks complete. Returns ``out_dir``.
    """
    _check_args(size, n_train, n_test)

    def fill(tmp: str) -> dict:
        counts = {}
        for split, n in (("train", n_train), ("test", n_test)):
            for domain in ("A", "B"):
                other = "B" if domain == "A" else "A"
                folder = os.path.join(tmp, split + domain)
                truth = os.path.join(tmp, f"test{domain}_truth_{other}") if split == "test" else None
                os.makedirs(folder)
                if truth:
                    os.makedirs(truth)
                for i in range(n):
                    labels = _scene(seed, split, domain, i, size)
                    name = f"{domain.lower()}_{i:05d}.png"
                    _save(render_scene(labels, domain), os.path.join(folder, name))
                    if truth:
                        _save(render_scene(labels, other), os.path.join(truth, name))
                counts[split + domain] = n
                if truth:
                    counts[os.path.basename(truth)] = n
        return counts

    return _write_dataset(out_dir, _FOLDERS, _params(size, n_train, n_test, seed), fill)


def make_synthetic_aligned_dataset(
    out_dir: str, size: int = 64, n_train: int = 200, n_test: int = 50, seed: int = 0
) -> str:
    """The paired form (pix2pix layout): ``train/`` and ``test/`` of ``pair_<i>.png`` images,
    ``2*size`` wide, each holding one scene rendered in domain A (left half) and domain B (right
    half) -- a true pair, so a translator's output can be scored against the target exactly.

    The scenes are those of the unpaired dataset's A side with the same arguments (``test/``
    pair ``i`` is ``testA/a_<i>.png`` beside ``testA_truth_B/a_<i>.png``), so pix2pix and
    CycleGAN runs are scored on the same test scenes. Same safety as :func:`make_synthetic_dataset`.
    """
    def pair(labels: np.ndarray) -> np.ndarray:
        return np.concatenate([render_scene(labels, "A"), render_scene(labels, "B")], axis=1)

    return _write_split_dataset(out_dir, size, n_train, n_test, seed, "aligned", "A", pair, "pair")


def make_synthetic_color_dataset(
    out_dir: str, size: int = 64, n_train: int = 200, n_test: int = 50, seed: int = 0
) -> str:
    """The colorization form: ``train/`` and ``test/`` of ``img_<i>.png``, the unpaired dataset's
    B scenes (``testB/b_<i>.png`` is ``test/img_<i>.png``). Palette B gives every class its own
    lightness (L* 14, 54, 69, 86, 93; outlines 2), so a pixel's colour follows from its grey level: the exact
    answer a colorizer can learn, and the test images are their own ground truth. Same safety as
    :func:`make_synthetic_dataset`."""
    return _write_split_dataset(
        out_dir, size, n_train, n_test, seed, "color", "B", lambda labels: render_scene(labels, "B"), "img"
    )


def _write_split_dataset(out_dir, size, n_train, n_test, seed, layout: str, domain: str, image, name: str) -> str:
    """``train/`` and ``test/`` of ``<name>_<i>.png`` = ``image(labels)`` for the scenes of ``domain``."""
    _check_args(size, n_train, n_test)

    def fill(tmp: str) -> dict:
        counts = {}
        for split, n in (("train", n_train), ("test", n_test)):
            folder = os.path.join(tmp, split)
            os.makedirs(folder)
            for i in range(n):
                _save(image(_scene(seed, split, domain, i, size)), os.path.join(folder, f"{name}_{i:05d}.png"))
            counts[split] = n
        return counts

    return _write_dataset(out_dir, _ALIGNED_FOLDERS, _params(size, n_train, n_test, seed, layout), fill)


def _complete(root: str, params: dict, folders: tuple[str, ...] = _FOLDERS) -> bool:
    try:
        manifest = read_json(os.path.join(root, MANIFEST))
    except (OSError, ValueError):
        return False
    if {k: manifest.get(k) for k in params} != params:
        return False
    for folder, n in manifest.get("counts", {}).items():
        d = os.path.join(root, folder)
        if not os.path.isdir(d) or sum(1 for f in os.listdir(d) if f.endswith(".png")) != n:
            return False
    return set(manifest.get("counts", {})) == set(folders)


def ensure_synthetic_dataset(
    root: str, size: int = 64, n_train: int = 200, n_test: int = 50, seed: int = 0
) -> str:
    """Generate the dataset into ``root`` unless a complete one with these parameters is there."""
    _check_args(size, n_train, n_test)
    root = os.path.abspath(os.fspath(root))
    with _generating(root):  # the check and the write as one: another process may be writing it
        if not _complete(root, _params(size, n_train, n_test, seed)):
            make_synthetic_dataset(root, size=size, n_train=n_train, n_test=n_test, seed=seed)
    return root


def ensure_synthetic_aligned_dataset(
    root: str, size: int = 64, n_train: int = 200, n_test: int = 50, seed: int = 0
) -> str:
    """Generate the paired dataset into ``root`` unless a complete one with these parameters is there."""
    return _ensure_split(root, size, n_train, n_test, seed, "aligned", make_synthetic_aligned_dataset)


def ensure_synthetic_color_dataset(
    root: str, size: int = 64, n_train: int = 200, n_test: int = 50, seed: int = 0
) -> str:
    """Generate the colorization dataset into ``root`` unless a complete one with these parameters is there."""
    return _ensure_split(root, size, n_train, n_test, seed, "color", make_synthetic_color_dataset)


def _ensure_split(root, size, n_train, n_test, seed, layout: str, make) -> str:
    _check_args(size, n_train, n_test)
    root = os.path.abspath(os.fspath(root))
    with _generating(root):
        if not _complete(root, _params(size, n_train, n_test, seed, layout), _ALIGNED_FOLDERS):
            make(root, size=size, n_train=n_train, n_test=n_test, seed=seed)
    return root


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog="python -m fastcgan.data.synthetic", description=__doc__.split("\n")[0])
    ap.add_argument(
        "out", help="output folder (gets trainA/ trainB/ testA/ testB/ and the *_truth_* folders)"
    )
    ap.add_argument("--size", type=int, default=64, help=f"image side in pixels (8 to {MAX_SIZE}; default 64)")
    ap.add_argument("--n-train", type=int, default=200, help=f"training images per domain (at most {MAX_IMAGES:,})")
    ap.add_argument("--n-test", type=int, default=50, help="test images per domain")
    ap.add_argument("--seed", type=int, default=0, help="the same seed and sizes give the same images")
    ap.add_argument("--force", action="store_true", help="regenerate even if a matching dataset exists")
    ap.add_argument(
        "--aligned", action="store_true", help="the paired (pix2pix) layout: train/ test/ of A|B images"
    )
    ap.add_argument(
        "--color", action="store_true", help="the colorization layout: train/ test/ of colour images"
    )
    a = ap.parse_args(argv)
    if a.aligned and a.color:
        ap.error("--aligned and --color are two layouts: pick one")
    make, ensure = (
        (make_synthetic_aligned_dataset, ensure_synthetic_aligned_dataset) if a.aligned
        else (make_synthetic_color_dataset, ensure_synthetic_color_dataset) if a.color
        else (make_synthetic_dataset, ensure_synthetic_dataset)
    )
    try:
        if a.force:
            with _generating(a.out):
                path = make(a.out, a.size, a.n_train, a.n_test, a.seed)
        else:
            path = ensure(a.out, a.size, a.n_train, a.n_test, a.seed)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
