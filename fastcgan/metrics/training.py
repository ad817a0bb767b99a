"""FID/KID during training: real-image features computed once per run, generated ones per call.

    ev = TrainingEvaluator("datasets/horse2zebra", phase="test", device=device, image_size=256)
    metrics = ev(state.nets["G_AB"], state.nets["G_BA"])   # {"fid_AtoB": ..., "kid_AtoB_mean": ...}

A call puts the generators in eval mode and restores every submodule's previous mode, runs
under ``torch.inference_mode`` (no autograd state, no gradients touched), draws no random number
from the global generators (KID's subsets come from a private seeded state), and leaves the
networks' parameters, buffers, devices and dtypes as they were -- so it cannot change what is
trained. The generators run through the deploy runtime's :class:`~fastcgan.deploy.Translator`
(padding, batching, uint8 output), eagerly (a ``torch.compile``/DDP wrapper is looked through),
under ``torch.autocast(amp_dtype)`` when given.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from fastcgan.metrics.fid import fid_kid_from_features, private_rng
from fastcgan.metrics.inception import NETWORK, load_inception


class EvaluationInterrupted(Exception):
    """``should_stop`` said so between two chunks of an evaluation: its result is dropped."""


class TrainingEvaluator:
    """FID/KID of a pair of generators on ``dataroot/{phase}A|B``.

    Args:
        dataroot: dataset folder with ``{phase}A/`` and ``{phase}B/``.
        phase: the split (``"test"``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ... or a ``torch.device`` (where the
            generators live; Inception and the images go there too).
        image_size: resize every image to this square size (bicubic, uint8) before translating
            and before Inception -- use the size the generators are trained at; None keeps each
            image's own size.
        max_images: at most this many images per domain (first ones in sorted order).
        amp_dtype: autocast dtype for the generators (the run's, e.g. ``torch.bfloat16``) or None.
        batch_size: generator batch size (Inception uses ``max(batch_size, 16)``).
        inception_dtype: None = float32 on CPUs, bfloat16 on CUDA GPUs.
        weights: Inception weights file (default: the packaged one); checksum-verified.
        input_nc, output_nc: image channels of domain A and B.
        kid_subsets, kid_subset_size: KID subsets (see :mod:`fastcgan.metrics.fid`).

    Raises ``InceptionWeightsError`` when the weights are missing or corrupt and
    ``FileNotFoundError`` when a folder has no readable image (use
    :func:`fastcgan.metrics.metrics_available` first to decide whether to build one)."""

    stop_check_images = 64  # about how many images between two should_stop questions
    # The decoded test images are kept (on the device) between evaluations up to this many bytes
    # for both domains (the default 200 + 200 at 256²: 79 MB); a larger --eval-max-images reads
    # them from disk again at each evaluation, so memory does not grow with the test set.
    held_bytes = 1 << 30

    def __init__(
        self,
        dataroot: str,
        phase: str = "test",
        device: str | torch.device = "auto",
        image_size: int | None = None,
        max_images: int | None = None,
        amp_dtype: torch.dtype | None = None,
        batch_size: int = 8,
        inception_dtype: torch.dtype | None = None,
        weights: str | None = None,
        input_nc: int = 3,
        output_nc: int = 3,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
    ):
        from fastcgan.devices import resolve_device
        from fastcgan.evaluate import domain_paths, iter_images

        t0 = time.perf_counter()
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.amp_dtype = amp_dtype
        self.batch_size = max(1, int(batch_size))
        self.kid = {"kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size}
        self.inception = load_inception(weights, self.device, inception_dtype, batch_size=max(16, self.batch_size))
        self.network = NETWORK
        self.channels = {"A": input_nc, "B": output_nc}
        self.image_size = image_size
        self.paths: dict[str, list[str]] = {}  # the readable test images of each domain
        self.images: dict[str, list[torch.Tensor]] = {}  # and, within held_bytes, their pixels
        self.real_features: dict[str, torch.Tensor] = {}
        held = 0
        for d in ("A", "B"):
            _, paths = domain_paths(dataroot, phase, d, max_images)
            skipped: list[str] = []
            stream, kept = self.inception.stream(), []
            for chunk in iter_images(paths, self.channels[d], image_size, self.stop_check_images, skipped):
                for _, x in chunk:
                    held += x.numel()
                    if held <= self.held_bytes:
                        kept.append(x.to(self.device))
                stream.add([x for _, x in chunk])
            unread = set(skipped)
            self.paths[d] = [p for p in paths if p not in unread]
            if len(self.paths[d]) < 2:
                raise FileNotFoundError(f"{dataroot}/{phase}{d}: FID/KID need at least 2 images, "
                                        f"found {len(self.paths[d])}")
            self.real_features[d] = stream.features()
            if held <= self.held_bytes:
                self.images[d] = kept
        if held > self.held_bytes:
            self.images = {}  # over the budget: both domains are read from disk at each call
        self.setup_seconds = time.perf_counter() - t0

    def _chunks(self, domain: str, chunk: int):
        """The domain's images, ``chunk`` at a time (uint8 (C, H, W) on the device): held, or
        decoded again (the same pixels: a deterministic decode and resize)."""
        from fastcgan.data import load_image
        from fastcgan.data.images import resize_square

        held = self.images.get(domain)
        paths = self.paths[domain]
        for i in range(0, len(paths), chunk):
            if held is not None:
                yield i, held[i:i + chunk]
            else:
                yield i, [resize_square(load_image(p, self.channels[domain]), self.image_size).to(self.device)
                          for p in paths[i:i + chunk]]

    @property
    def num_images(self) -> dict[str, int]:
        return {d: len(v) for d, v in self.paths.items()}

    def __call__(self, G_AB: nn.Module | None, G_BA: nn.Module | None,
                 should_stop: Callable[[], bool] | None = None) -> dict[str, float]:
        """``fid_AtoB, kid_AtoB_mean, kid_AtoB_std, fid_BtoA, kid_BtoA_mean, kid_BtoA_std`` (A->B
        against the real B images, B->A against the real A images) and ``eval_seconds``. A
        direction whose generator is ``None`` (one-way recipes: CUT, pix2pix) is left out.

        ``should_stop`` is asked before each chunk of images (a few generator batches): True
        raises :class:`EvaluationInterrupted` (a stop signal must not wait for a whole test set:
        torchrun kills its workers 30 s after forwarding one)."""
        from fastcgan.evaluate import eval_mode, module_translator

        t0 = time.perf_counter()
        out: dict[str, float] = {}
        # Whole generator batches per chunk, so the batches (and their numerics) are those of
        # one call on every image; Inception's stream runs its own full batches across chunks.
        chunk = self.batch_size * max(1, self.stop_check_images // self.batch_size)
        with private_rng(0, self.device), eval_mode(G_AB, G_BA), torch.inference_mode():
            for name, g, src, dst in (("AtoB", G_AB, "A", "B"), ("BtoA", G_BA, "B", "A")):
                if g is None:
                    continue
                tr = module_translator(g, self.device, self.amp_dtype, self.batch_size)
                stream = self.inception.stream()
                for i, images in self._chunks(src, chunk):
                    if should_stop is not None and should_stop():
                        raise EvaluationInterrupted(f"stopped after {i} of {len(self.paths[src])} {name} images")
                    # uint8 in, uint8 out: the deploy runtime's own conversion and rounding.
                    stream.add(tr.translate_batch(images))
                feats = stream.features()
                r = fid_kid_from_features(feats, self.real_features[dst], **self.kid)
                out[f"fid_{name}"] = r["fid"]
                out[f"kid_{name}_mean"] = r["kid_mean"]
                out[f"kid_{name}_std"] = r["kid_std"]
        out["eval_seconds"] = time.perf_counter() - t0
        return out

    evaluate = __call__
