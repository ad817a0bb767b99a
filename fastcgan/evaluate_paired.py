"""Paired evaluation (pix2pix): a generator's outputs on ``dataroot/<phase>/`` pair images scored
against their targets.

    fastcgan-eval --checkpoint runs/facades --dataroot datasets/facades     # a pix2pix run

:func:`fastcgan.evaluate.evaluate` comes here when ``dataroot`` has the paired layout (a
``<phase>/`` folder and no ``<phase>A/``). The generator runs through the deploy runtime
(:func:`fastcgan.deploy.load`, the code that ships: padding to the size multiple, batching,
BatchNorm as the artifact records it). Which half is the input: ``direction`` when given, else the
run's own ``--direction`` (its ``config.json``), else AtoB (left half = input). A pix2pix run's
generator is always ``generator_AtoB.safetensors`` (input -> target, whatever the direction).

Metrics, under ``"AtoB"`` (the one generator), on [0, 1] intensities, averaged over images:

* ``l1``: mean absolute error to the target; ``psnr``: torchmetrics ``peak_signal_noise_ratio``
  (data range 1) per image; ``ssim``: torchmetrics ``structural_similarity_index_measure``
  (Gaussian 11x11, sigma 1.5, data range 1) per image;
* ``identity_l1`` / ``identity_psnr`` / ``identity_ssim``: the same for the untranslated input
  (the score of doing nothing), when input and target have the same shape;
* ``fid``, ``kid_mean`` / ``kid_std`` of the outputs against the targets, with ``fid=True`` and the
  metrics extra installed (:mod:`fastcgan.metrics`; skipped with the reason otherwise).

Images are evaluated at their own size, or resized to a square ``load_size`` first (bicubic,
rounded to uint8), inputs and targets alike.

Colorization generators (``color_space="lab"`` in the artifact's config): ``<phase>/`` holds plain
colour images, each its own target; the generator sees the image (and keeps only its lightness),
and the baseline is ``grey_l1`` / ``grey_psnr`` / ``grey_ssim``: the image with its colour removed
(a* = b* = 0), the score of not colorizing at all.
"""

from __future__ import annotations

import os

import torch

from fastcgan.fileio import read_json

__all__ = ["evaluate_paired", "is_paired_root", "iter_pairs", "paired_scores"]


def is_paired_root(dataroot: str, phase: str = "test") -> bool:
    """Whether ``dataroot`` holds pix2pix pairs for ``phase`` (``<phase>/``, no ``<phase>A/``)."""
    pairs = os.path.isdir(os.path.join(dataroot, phase))
    return pairs and not os.path.isdir(os.path.join(dataroot, phase + "A"))


def run_direction(checkpoint: str) -> str | None:
    """The ``--direction`` a (pix2pix) run directory or training checkpoint was trained with, or None."""
    return _run_settings(checkpoint)[1]


def run_pairs_direction(checkpoint: str) -> str | None:
    """A pix2pix run's (or checkpoint's) ``--direction``: which half of a pair its generator reads;
    None for other recipes and for what is not a readable run."""
    recipe, direction = _run_settings(checkpoint)
    return direction if recipe == "pix2pix" else None


def _run_settings(checkpoint: str) -> tuple[str | None, str | None]:
    """(recipe, data direction) from a run directory's config.json or a checkpoint's config."""
    if checkpoint.lower().endswith(".ckpt") and os.path.isfile(checkpoint):
        from fastcgan.train.checkpoint import CheckpointError, checkpoint_config

        try:
            cfg = checkpoint_config(checkpoint)
            return cfg.model.recipe, cfg.data.direction
        except CheckpointError:
            return None, None  # loading it says what is wrong
    try:
        d = read_json(os.path.join(checkpoint, "config.json"))
        return d.get("model", {}).get("recipe"), d["data"].get("direction")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, None


def iter_pairs(
    paths: list[str],
    direction: str = "AtoB",
    input_nc: int = 3,
    output_nc: int = 3,
    size: int | None = None,
    chunk: int = 8,
    skipped: list | None = None,
    self_paired: bool = False,
):
    """(uint8 inputs, uint8 targets), a chunk of pairs at a time (:func:`fastcgan.evaluate.in_chunks`):
    evaluation never holds the test set.
    Unreadable and odd-width files are skipped (as by :class:`fastcgan.data.AlignedDataset`) and
    added to ``skipped``. ``self_paired`` (colorization): every image is its own pair."""
    from fastcgan.data import split_pair
    from fastcgan.data.datasets import warn_skipped_image
    from fastcgan.data.images import BadImageError, open_image, pil_to_tensor, resize_square
    from fastcgan.evaluate import in_chunks

    def loaded():
        for p in paths:
            try:
                img = open_image(p, 3)
                left, right = (img, img) if self_paired else split_pair(img, p)
            except BadImageError as e:
                warn_skipped_image(e)  # named, not only counted
                if skipped is not None:
                    skipped.append(p)
                continue
            a, b = (left, right) if direction == "AtoB" else (right, left)
            a, b = (a.convert("L") if input_nc == 1 else a), (b.convert("L") if output_nc == 1 else b)
            x = resize_square(pil_to_tensor(a), size)
            yield (x, resize_square(pil_to_tensor(b), size)), x.shape[-2] * x.shape[-1]

    for batch in in_chunks(loaded(), chunk):
        yield [x for x, _ in batch], [t for _, t in batch]


def _grey(x: torch.Tensor) -> torch.Tensor:
    """An RGB image in [-1, 1] with its colour removed (a* = b* = 0, L* kept), rounded to 8 bits as
    a saved output would be."""
    from fastcgan.color import decolorize

    return decolorize(x).add(1).mul(127.5).round().div(127.5).sub(1.0)


def paired_scores(pred: list[torch.Tensor], target: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-image L1, PSNR and SSIM (torchmetrics) of float [-1, 1] images ``pred`` against
    ``target``, as 1-D tensors in the order of the images; images of one size are scored together."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    out = {k: torch.empty(len(target), dtype=torch.float64) for k in ("l1", "psnr", "ssim")}
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(target):
        groups.setdefault(tuple(t.shape), []).append(i)
    for idx in groups.values():
        p = torch.stack([pred[i].float().cpu() for i in idx]).add(1).div(2).clamp(0, 1)
        t = torch.stack([target[i].float().cpu() for i in idx]).add(1).div(2).clamp(0, 1)
        at = torch.tensor(idx)
        out["l1"][at] = (p - t).abs().mean(dim=(1, 2, 3)).double()
        out["psnr"][at] = peak_signal_noise_ratio(p, t, data_range=1.0, reduction="none", dim=(1, 2, 3)).double()
        out["ssim"][at] = structural_similarity_index_measure(p, t, data_range=1.0, reduction="none").double()
    return out


def evaluate_paired(
    checkpoint,
    dataroot: str,
    phase: str = "test",
    device="cpu",
    direction: str | None = None,
    engine: str | None = None,
    trust_artifact: bool = False,
    batch_size: int = 8,
    max_images: int | None = None,
    load_size: int | None = None,
    fid: bool = False,
    inception_weights_path: str | None = None,
    amp_dtype: torch.dtype | None = None,
    inception_dtype: torch.dtype | None = None,
    tile: int | None = None,
    tile_overlap: int | None = None,
) -> dict:
    """``{"AtoB": {n, skipped, direction, l1, psnr, ssim, identity_*, [fid, kid_*]}}`` for the
    generator of ``checkpoint`` (a pix2pix run directory, any artifact :func:`fastcgan.deploy.load`
    accepts, or a loaded :class:`fastcgan.deploy.Translator`) on ``dataroot/<phase>/``; ``tile`` /
    ``tile_overlap`` run large inputs in tiles (as :func:`fastcgan.deploy.load`)."""
    from fastcgan.data.images import oriented_size, pixel_limit_problem
    from fastcgan.deploy import Translator, load
    from fastcgan.devices import resolve_device
    from fastcgan.evaluate import (
        check_eval_args,
        check_image_sizes,
        domain_paths,
        fid_inception,
        translate_images,
    )

    check_eval_args(batch_size, max_images, load_size, amp_dtype, inception_dtype)
    dev = resolve_device(str(device))
    if isinstance(checkpoint, Translator):
        given = [name for name, v, default in (("tile", tile, None), ("tile_overlap", tile_overlap, None),
                                               ("engine", engine, None), ("trust_artifact", trust_artifact, False),
                                               ("amp_dtype", amp_dtype, None)) if v != default]
        if given:
            raise ValueError(f"{' / '.join(given)}: load() options; give them to fastcgan.deploy.load, not with a "
                             "loaded Translator (it runs as it was loaded)")
        tr = checkpoint
    else:
        if direction is None:
            direction = run_direction(checkpoint)
        from fastcgan.evaluate import is_run, run_generators

        # A run's generator of that direction (a CycleGAN's G_BA for B inputs, as translate --pairs);
        # a pix2pix run's one generator is its AtoB file; an artifact runs its own.
        generator = (direction if direction in run_generators(checkpoint) else None) if is_run(checkpoint) else None
        tr = load(
            checkpoint, direction=generator, device=str(dev), engine=engine, batch_size=batch_size,
            bf16=amp_dtype == torch.bfloat16, fp16=amp_dtype == torch.float16, trust_artifact=trust_artifact,
            tile=tile, tile_overlap=tile_overlap,
        )
    direction = direction or tr.spec.pairs_direction or "AtoB"  # an exported pix2pix generator records it
    if direction not in ("AtoB", "BtoA"):
        raise ValueError(f"direction must be AtoB or BtoA, got {direction!r}")
    colorizer = (tr.spec.config or {}).get("color_space") == "lab"
    _, paths = domain_paths(dataroot, phase, "", max_images)

    def input_size(p: str):  # what the generator sees: the image's half (a colorizer: all of it)
        if load_size:
            return load_size, load_size
        wh = oriented_size(p)
        return wh if wh is None or colorizer else (wh[0] // 2, wh[1])

    why = pixel_limit_problem((p, oriented_size(p)) for p in paths)  # each pair is decoded whole, then split
    if why:
        raise ValueError(why)
    check_image_sizes((tr,), paths, input_size)
    results: dict = {}
    inception = fid_inception(dev, inception_weights_path, inception_dtype, results) if fid else None

    # A chunk of pairs at a time: translated, scored (per-image numbers kept), its translations
    # and targets handed to Inception as they come; memory holds one chunk, never the test set.
    skipped: list[str] = []
    scores: dict[str, list] = {}
    baseline: dict[str, list] = {}
    identity_ok = True
    fake_stream = inception.stream() if inception is not None else None
    real_stream = inception.stream() if inception is not None else None

    from fastcgan.metrics import to_uint8

    for inputs, targets in iter_pairs(paths, direction, tr.input_nc, tr.output_nc or tr.input_nc, load_size,
                                      chunk=max(1, int(batch_size)), skipped=skipped, self_paired=colorizer):
        fake = translate_images(tr, inputs)
        real_in = [x.float().div(127.5).sub(1.0) for x in inputs]
        real_out = [x.float().div(127.5).sub(1.0) for x in targets]
        for k, v in paired_scores(fake, real_out).items():
            scores.setdefault(k, []).append(v)
        if colorizer:  # the baseline: the input without its colour
            base = paired_scores([_grey(x) for x in real_in], real_out)
        else:  # the baseline: the input itself, when it has the target's size
            identity_ok = identity_ok and all(x.shape == t.shape for x, t in zip(real_in, real_out))
            base = paired_scores(real_in, real_out) if identity_ok else {}
        for k, v in base.items():
            baseline.setdefault(k, []).append(v)
        if inception is not None:
            fake_stream.add([to_uint8(f) for f in fake])
            real_stream.add(targets)

    n = len(paths) - len(skipped)
    if n == 0:
        raise FileNotFoundError(f"{os.path.join(dataroot, phase)}: no readable pair images")
    r: dict = {"n": n, "skipped": len(skipped), "direction": direction}
    r.update({k: torch.cat(v).mean().item() for k, v in scores.items()})
    if colorizer or identity_ok:
        prefix = "grey_" if colorizer else "identity_"
        r.update({prefix + k: torch.cat(v).mean().item() for k, v in baseline.items()})
    if inception is not None:
        from fastcgan.metrics import fid_kid_from_features

        fake_f, real_f = fake_stream.features(), real_stream.features()
        r.update(fid_kid_from_features(fake_f, real_f))
        r["fid_n_fake"], r["fid_n_real"] = int(fake_f.shape[0]), int(real_f.shape[0])
    results["AtoB"] = r
    return results
