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
        from fastcgan.evaluate import load_domain

        t0 = time.perf_counter()
        self.device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        self.amp_dtype = amp_dtype
        self.batch_size = max(1, int(batch_size))
        self.kid = {"kid_subsets": kid_subsets, "kid_subset_size": kid_subset_size}
        self.inception = load_inception(weights, self.device, inception_dtype, batch_size=max(16, self.batch_size))
        self.network = NETWORK
        channels = {"A": input_nc, "B": output_nc}
        self.images: dict[str, list[torch.Tensor]] = {}
        self.real_features: dict[str, torch.Tensor] = {}
        for d in ("A", "B"):
            imgs = load_domain(dataroot, phase, d, channels[d], image_size, max_images)[0]
            if len(imgs) < 2:
                raise FileNotFoundError(f"{dataroot}/{phase}{d}: FID/KID need at least 2 images, found {len(imgs)}")
            self.images[d] = [x.to(self.device) for x in imgs]
            self.real_features[d] = self.inception.extract(self.images[d])
        self.setup_seconds = time.perf_counter() - t0

    @property
    def num_images(self) -> dict[str, int]:
        return {d: len(v) for d, v in self.images.items()}

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
                for i in range(0, len(self.images[src]), chunk):
                    if should_stop is not None and should_stop():
                        raise EvaluationInterrupted(f"stopped after {i} of {len(self.images[src])} {name} images")
                    # uint8 in, uint8 out: the deploy runtime's own conversion and rounding.
                    stream.add(tr.translate_batch(self.images[src][i:i + chunk]))
                feats = stream.features()
                r = fid_kid_from_features(feats, self.real_features[dst], **self.kid)
                out[f"fid_{name}"] = r["fid"]
                out[f"kid_{name}_mean"] = r["kid_mean"]
                out[f"kid_{name}_std"] = r["kid_std"]
        out["eval_seconds"] = time.perf_counter() - t0
        return out

    evaluate = __call__
