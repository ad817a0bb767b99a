"""FID and KID on torchmetrics from FID-Inception features.

Features are extracted once by :class:`~fastcgan.metrics.inception.InceptionFeatures` (batched,
on the device, inference mode); the statistics are torchmetrics' own
(``FrechetInceptionDistance`` / ``KernelInceptionDistance``), given the precomputed features
through a pass-through "feature extractor" so that real-image features are computed once and
reused, and each image goes through the network once for both metrics. No statistics are
written here.

KID: unbiased MMD^2 with the polynomial kernel ``(x.y / 2048 + 1)^3`` averaged over
``kid_subsets`` random subsets of ``min(kid_subset_size, n_fake, n_real)`` images (the common
settings are 100 subsets of 1000). When that subset size equals both set sizes every subset is
the whole set, so one subset is computed and ``kid_std`` is 0. The subsets are drawn from a
private, seeded generator state: KID is reproducible and the global RNG is left untouched.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from fastcgan.metrics.inception import NETWORK, NUM_FEATURES, InceptionFeatures


class PrecomputedFeatures(nn.Module):
    """torchmetrics' feature extractor for features already computed: returns them as float64."""

    num_features = NUM_FEATURES

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected (N, {self.num_features}) features, got {tuple(features.shape)}")
        return features.double()


@contextlib.contextmanager
def private_rng(seed: int, device: torch.device | None = None):
    """Run a block on a seeded RNG state and restore the caller's state afterwards (CPU, plus
    ``device`` when it is a CUDA device)."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if (
        device is not None and device.type == "cuda"
    ) else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _single_thread():
    """One intra-op thread for the block. torchmetrics' FID solves a dense 2048x2048 non-symmetric
    eigenvalue problem (LAPACK ``geev``), which gains nothing from threads; on a busy machine extra
    threads only spin: measured 3.5 s of CPU with one thread vs 26-31 s with two on a shared
    2-core AMD EPYC (MKL)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def fid_kid_from_features(
    fake: Tensor,
    real: Tensor,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    fid: bool = True,
    kid: bool = True,
) -> dict[str, float]:
    """``{"fid", "kid_mean", "kid_std"}`` of fake against real Inception features, (N, 2048) each
    (N >= 2 on both sides), computed by torchmetrics in float64 on the CPU. ``fid=False`` /
    ``kid=False`` leave one out (FID's 2048x2048 eigenvalue problem is the expensive part: ~3.5 s
    of CPU on the 2-core development machine, run on one thread)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n_fake, n_real = int(fake.shape[0]), int(real.shape[0])
    if n_fake < 2 or n_real < 2:
        raise ValueError(f"FID/KID need at least 2 images on each side, got {n_fake} generated and {n_real} real")
    fake = fake.detach().to("cpu", torch.float64)
    real = real.detach().to("cpu", torch.float64)
    subset = min(int(kid_subset_size), n_fake, n_real)
    subsets = 1 if subset == n_fake == n_real else int(kid_subsets)
    out: dict[str, float] = {}
    # The features are all here: no cross-process sync. torchmetrics all-gathers its states in
    # compute() whenever a process group exists, and under torchrun only process 0 evaluates, so
    # that collective waited forever for the others (a DDP run with --eval-every hung at its first
    # evaluation).
    local = dict(sync_on_compute=False, distributed_available_fn=lambda: False)
    if fid:
        fid_metric = FrechetInceptionDistance(feature=PrecomputedFeatures(), **local)
        fid_metric.update(real, real=True)
        fid_metric.update(fake, real=False)
        with _single_thread():
            out["fid"] = float(fid_metric.compute())
    if kid:
        with warnings.catch_warnings():
            # "will save all extracted features in buffer": they are 2048 floats an image here.
            warnings.filterwarnings("ignore", message=".*save all extracted features.*")
            kid_metric = KernelInceptionDistance(feature=PrecomputedFeatures(), subsets=subsets, subset_size=subset,
                                                 **local)
        kid_metric.update(real, real=True)
        kid_metric.update(fake, real=False)
        with private_rng(seed):
            kid_mean, kid_std = kid_metric.compute()
        out["kid_mean"], out["kid_std"] = float(kid_mean), float(kid_std)
    return out


def fid_kid(
    fake_images: Tensor | Iterable[Tensor],
    real_images: Tensor | Iterable[Tensor] | None = None,
    *,
    inception: InceptionFeatures,
    real_features: Tensor | None = None,
    **kw,
) -> dict:
    """FID/KID of uint8 generated images against uint8 real images (or their cached
    ``real_features``), plus the number of images on each side and the network used."""
    fake_f = inception.extract(fake_images)
    if real_features is None:
        if real_images is None:
            raise ValueError("pass real_images or real_features")
        real_features = inception.extract(real_images)
    out: dict = fid_kid_from_features(fake_f, real_features, **kw)
    out["fid_n_fake"] = int(fake_f.shape[0])
    out["fid_n_real"] = int(real_features.shape[0])
    out["fid_network"] = NETWORK
    return out


__all__ = ["NETWORK", "PrecomputedFeatures", "fid_kid", "fid_kid_from_features", "private_rng"]
