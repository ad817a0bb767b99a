"""Data layer: image loading, unaligned datasets, batched device augmentation, built-in data.

API summary (the trainer builds on this)::

    # images.py
    class BadImageError(OSError): path: str, reason: str
    IMG_EXTENSIONS: frozenset[str]                      # lower-case, with dot
    is_image_file(name: str) -> bool
    make_dataset(directory, max_size=inf) -> list[str]  # recursive, sorted, skips hidden files
    open_image(path, channels=3, max_pixels=None) -> PIL.Image  # "RGB" or "L"; raises BadImageError
    load_image(path, channels=3, max_pixels=None) -> torch.uint8 (C,H,W) # C = channels (3 or 1)
    DEFAULT_MAX_IMAGE_PIXELS = 89_478_485               # checked on the header, before decoding
    set_max_image_pixels(n) / get_max_image_pixels()    # process default (0 = no limit)
    image_size(path) -> (w, h) | None                   # header only

    # datasets.py
    class DatasetError(ValueError)                      # bad layout/arguments, names the folder
    class SkippedImageWarning(UserWarning)              # emitted (and logged) per skipped file
    PREPROCESS_MODES = ("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none")
    UnalignedDataset(root, phase="train", preprocess="resize_and_crop", load_size=286,
                     crop_size=256, flip=True, input_nc=3, output_nc=3, serial_batches=False,
                     seed=0, max_size=inf, validate=False)
        ds[i] -> {"A": uint8 (input_nc,h,w), "B": uint8 (output_nc,h,w), "A_path": str,
                  "B_path": str, "skipped": tuple[str, ...]}
        len(ds) == max(len(A), len(B)); A = A_paths[i % len(A)]; B random (per (seed, epoch, i))
        ds.batch_augment -> {"crop_size": int|None, "flip": bool}   # pass to augment_batch
        ds.set_epoch(epoch)      # new B pairing / CPU crops per epoch (like DistributedSampler);
                                 # needs persistent_workers=False to reach the workers
        ds.skipped: list[str]    # bad files seen in this process; with DataLoader workers call
        ds.record_skipped(batch) # on each collated batch to merge the workers' reports
        ds.A_paths, ds.B_paths, ds.A_size, ds.B_size, ds.dir_A, ds.dir_B
        ds.load_resized(domain, i) -> (PIL image, path, skipped)   # deterministic part only
    SingleImageDataset(path_or_dir, channels=3, max_size=inf)
        ds[i] -> {"image": uint8 (C,H,W), "path": str, "size": (h, w), "skipped": tuple}
    collate(items: list[dict]) -> dict   # stacks tensors, lists strings, flattens "skipped"

    Typical trainer loop (CPU loader path):
        loader = DataLoader(ds, batch_size, shuffle=not serial_batches, num_workers=k,
                            collate_fn=collate, pin_memory=True, drop_last=True)
        for batch in loader:
            ds.record_skipped(batch)
            real_A = augment_batch(batch["A"].to(dev, non_blocking=True), **ds.batch_augment)

    # augment.py
    augment_batch(images_uint8 (B,C,H,W), crop_size: int|None, flip: bool,
                  generator: torch.Generator|None = None, channels_last=False,
                  return_params=False) -> float32 (B,C,crop,crop) in [-1, 1]
                  (with return_params: (out, {"top": (B,), "left": (B,), "flip": (B,) bool}))
    to_model_range(uint8) -> float32 in [-1, 1];  to_uint8(float in [-1, 1]) -> uint8

    # device.py  (--data-on-gpu)
    preload_to_device(dataset: UnalignedDataset, device, shuffle=None) -> DeviceImageBank
        # shuffle None -> not dataset.serial_batches; raises DatasetError if sizes differ
    DeviceImageBank.sample_batch(batch_size, step, generator=None) -> {"A": uint8, "B": uint8}
    DeviceImageBank.batch_augment -> {"crop_size": int|None, "flip": bool}
    DeviceImageBank.A (NA,C,H,W) uint8, .B, .nbytes, .skipped, .generator (device, seeded)
    (same step -> same A batch: resume-safe; B uses bank.generator unless one is passed)

    # aligned.py  (pix2pix: root/{train,val,test}/ images holding A|B side by side)
    AlignedDataset(root, phase="train", direction="AtoB"|"BtoA", preprocess, load_size, crop_size,
                   flip, input_nc, output_nc, serial_batches, seed, max_size, validate)
        ds[i] -> {"A": uint8 input half, "B": uint8 target half, "A_path", "B_path", "skipped"}
        (BtoA swaps the halves; odd-width / unreadable files skipped, warned and recorded)
        ds.batch_augment, ds.set_epoch, ds.record_skipped, ds.validate, ds.skipped, ds.AB_paths
    augment_pair(A_uint8, B_uint8, crop_size, flip, generator=None, channels_last=False,
                 return_params=False, shard=(0, 1)) -> (A float32, B float32)   # same crop/flip
    preload_aligned_to_device(ds, device, shuffle=None) -> DeviceImageBank   # A[i] pairs B[i]
    split_pair(pil_image, path) -> (left, right)
    ColorizationDataset(root, phase, preprocess, ...)   # root/<phase>/ colour images, each its
        ds[i] -> {"A": uint8 RGB, "B": uint8 (0,h,w), ...}  # own pair (target_from_input)

    # synthetic.py   (python -m fastcgan.data.synthetic OUT [--size --n-train --n-test --seed])
    make_synthetic_dataset(out_dir, size=64, n_train=200, n_test=50, seed=0) -> str
    ensure_synthetic_dataset(root, size=64, n_train=200, n_test=50, seed=0) -> str  # idempotent
    make_synthetic_aligned_dataset / ensure_synthetic_aligned_dataset(same args) -> str
    make_synthetic_color_dataset / ensure_synthetic_color_dataset(same args) -> str  # colorization
        # pairs: train/ test/ of A|B images (A = domain A rendering, B = its domain B rendering)

    # download.py   (fastcgan-download NAME [--root datasets] [--url URL] [--sha256 HEX])
    CYCLEGAN_DATASETS: tuple[str, ...]
    class DownloadError(RuntimeError); class ChecksumError(DownloadError)
    download_dataset(name, root="datasets", url=None, sha256=None, progress=True, force=False,
                     retries=5, timeout=60.0, backoff=1.0) -> str     # returns <root>/<name>
    main(argv=None) -> int
"""

from fastcgan.data.aligned import (
    AlignedDataset,
    ColorizationDataset,
    augment_pair,
    preload_aligned_to_device,
    split_pair,
)
from fastcgan.data.augment import augment_batch, to_model_range, to_uint8
from fastcgan.data.datasets import (
    PREPROCESS_MODES,
    DatasetError,
    SingleImageDataset,
    UnalignedDataset,
    collate,
)
from fastcgan.data.device import DeviceImageBank, preload_to_device
from fastcgan.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMG_EXTENSIONS,
    BadImageError,
    get_max_image_pixels,
    image_size,
    is_image_file,
    load_image,
    make_dataset,
    open_image,
    set_max_image_pixels,
)


def __getattr__(name):
    # synthetic.py is also run as ``python -m fastcgan.data.synthetic``; importing it lazily keeps
    # runpy from warning that the module was already imported by its package.
    if name in (
        "ensure_synthetic_dataset",
        "make_synthetic_dataset",
        "ensure_synthetic_aligned_dataset",
        "ensure_synthetic_color_dataset",
        "make_synthetic_aligned_dataset",
    ):
        from fastcgan.data import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AlignedDataset",
    "ColorizationDataset",
    "augment_pair",
    "ensure_synthetic_aligned_dataset",
    "ensure_synthetic_color_dataset",
    "make_synthetic_aligned_dataset",
    "preload_aligned_to_device",
    "split_pair",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMG_EXTENSIONS",
    "PREPROCESS_MODES",
    "get_max_image_pixels",
    "image_size",
    "set_max_image_pixels",
    "BadImageError",
    "DatasetError",
    "DeviceImageBank",
    "SingleImageDataset",
    "UnalignedDataset",
    "augment_batch",
    "collate",
    "ensure_synthetic_dataset",
    "is_image_file",
    "load_image",
    "make_dataset",
    "make_synthetic_dataset",
    "open_image",
    "preload_to_device",
    "to_model_range",
    "to_uint8",
]
