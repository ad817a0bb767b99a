"""The run's data: dataset folder (or built-in synthetic data), the training batch stream, the
fixed images of the sample grids. Raises ``DatasetError`` naming the folder for a bad layout."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from typing import Optional

import torch

from fastcgan.data import AlignedDataset, DatasetError, preload_to_device
from fastcgan.data.sampler import TrainBatches
from fastcgan.data.synthetic import MANIFEST
from fastcgan.train.config import TrainConfig

__all__ = ["build_batches", "build_dataset", "dataset_nbytes", "prepare_dataroot", "sample_images"]


def synthetic_root(cfg: TrainConfig, recipe) -> str:
    """Where ``dataset="synthetic"`` keeps the recipe's built-in data."""
    return cfg.data.dataroot or os.path.join(cfg.run.output_dir, f"{recipe.synthetic_folder}_{cfg.data.load_size}")


def prepare_dataroot(cfg: TrainConfig, recipe) -> str:
    """The dataset folder; for ``dataset="synthetic"`` the recipe's built-in data, generated
    (once) at ``load_size``."""
    if cfg.data.dataset == "synthetic":
        root = synthetic_root(cfg, recipe)

        def stamp():
            try:
                return os.stat(os.path.join(root, MANIFEST)).st_mtime_ns
            except OSError:
                return None

        before, t0 = stamp(), time.perf_counter()
        root = recipe.make_synthetic(cfg, root)
        if stamp() != before:  # generated now (else a complete one with these settings was there)
            print(f"fastcgan: generated the built-in synthetic data into {root} in {time.perf_counter() - t0:.1f} s "
                  "(kept: later runs with these settings reuse it)", file=sys.stderr)
        return root
    root = cfg.data.dataroot
    if not os.path.isdir(root):
        raise DatasetError(f"--dataroot {root}: {'not a directory' if os.path.exists(root) else 'no such directory'}")
    return root


def build_dataset(cfg: TrainConfig, root: str, phase: str = "train", recipe=None):
    from fastcgan.recipes import get_recipe

    return (recipe or get_recipe(cfg.model.recipe)).build_dataset(cfg, root, phase)


def dataset_nbytes(cfg: TrainConfig, ds, read_headers: bool = False) -> Optional[int]:
    """Bytes of the decoded uint8 training set that ``--data-on-gpu`` holds: counted for
    ``resize_and_crop`` (every image comes out at ``load_size``²); in the modes that keep each
    image's own size, read from every file's header when ``read_headers`` (an explicit request),
    else ``None``."""
    if cfg.data.preprocess != "resize_and_crop":
        return ds.decoded_nbytes() if read_headers else None
    s = cfg.data.load_size
    if isinstance(ds, AlignedDataset):  # one pair image holds one A and one B (colorization: A only)
        return len(ds) * (3 if ds.target_from_input else cfg.model.input_nc + cfg.model.output_nc) * s * s
    return (ds.A_size * cfg.model.input_nc + ds.B_size * cfg.model.output_nc) * s * s


def data_fingerprint(ds) -> tuple[str, str]:
    """(what the dataset holds in words, a digest of its file list relative to its root): equal
    on every process of a distributed run, or the processes draw different images."""
    lists = {k: getattr(ds, k) for k in ("A_paths", "B_paths", "AB_paths") if hasattr(ds, k)}
    h = hashlib.sha256()
    for key, paths in lists.items():
        h.update(key.encode() + b"\0")
        for p in paths:
            h.update(os.path.relpath(p, ds.root).encode("utf-8", "surrogateescape") + b"\0")
    words = " + ".join(f"{len(v):,} {k[:-6] or 'AB'}" for k, v in lists.items())
    return words, h.hexdigest()


def build_batches(cfg: TrainConfig, ds, device: torch.device, shard=(0, 1)) -> TrainBatches:
    bank = preload_to_device(ds, device) if cfg.data.data_on_gpu else None
    workers = cfg.data.num_workers
    if workers is None:  # on the CPU workers would compete with the step for the cores
        workers = 0 if device.type == "cpu" else min(4, max(0, (os.cpu_count() or 1) - 1))
    batches = TrainBatches(
        ds, bank, cfg.data.batch_size, cfg.run.seed, shuffle=not cfg.data.serial_batches, workers=workers,
        shard=shard, pin_memory=device.type == "cuda",
    )
    if len(batches) == 0:
        n = len(bank) if bank is not None else len(ds)
        raise DatasetError(f"{ds.root}: {n} training items is fewer than --batch-size {cfg.data.batch_size}")
    return batches


def _center(img, size: int) -> torch.Tensor:
    from PIL import Image

    from fastcgan.data.images import pil_to_tensor

    w, h = img.size
    if w < size or h < size:
        img = img.resize((max(w, size), max(h, size)), Image.BICUBIC)
        w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return pil_to_tensor(img.crop((left, top, left + size, top + size)))


def sample_images(cfg: TrainConfig, root: str, recipe=None) -> dict[str, torch.Tensor]:
    """Fixed uint8 images for the sample grids: the first ``n_samples`` of each domain of the test
    split when there is one, else of the training split (paired data: the first pairs, ``B[i]``
    the target of ``A[i]``); center crops of ``crop_size``."""
    try:
        ds = build_dataset(cfg, root, "test", recipe)
    except DatasetError:
        ds = build_dataset(cfg, root, "train", recipe)
    if isinstance(ds, AlignedDataset):  # pairs: B[i] is the target of A[i] (same center crop)
        pairs = [ds.load_resized(i)[:2] for i in range(min(cfg.run.n_samples, len(ds)))]
        s = _sample_side(cfg, [p[0] for p in pairs])
        return {d: torch.stack([_center(p[k], s) for p in pairs]) for k, d in enumerate("AB")}
    imgs = {d: [ds.load_resized(d, i)[0] for i in range(min(cfg.run.n_samples, n))]
            for d, n in (("A", ds.A_size), ("B", ds.B_size))}
    s = _sample_side(cfg, imgs["A"] + imgs["B"])
    return {d: torch.stack([_center(im, s) for im in ims]) for d, ims in imgs.items()}


def _sample_side(cfg: TrainConfig, imgs) -> int:
    """Side of the square sample crops: the training crop, or without one (``--preprocess none``
    / ``scale_width``) the largest side every sample image holds that the generator takes."""
    from fastcgan.models import generator_size_multiple

    if "crop" in cfg.data.preprocess:
        return cfg.data.crop_size
    m = generator_size_multiple(cfg.model.netG)
    return max(m, min(min(im.size) for im in imgs) // m * m)
