"""The released CycleGAN and pix2pix generators: ``fastcgan-download --pretrained horse2zebra``.

The official repository publishes trained generators (``scripts/download_cyclegan_model.sh``,
``download_pix2pix_model.sh``) as plain ``.pth`` state dicts. This downloads one (resumable,
checksummed when a checksum is given or published: see :mod:`fastcgan.data.download`), loads
it as tensors only (``torch.load(weights_only=True)``: never code), checks it is the official
generator the collection says (CycleGAN: ``resnet_9blocks``, InstanceNorm; pix2pix: ``unet_256``,
BatchNorm) with finite weights, and leaves, with one atomic rename::

    <root>/<name>_pretrained/latest_net_G.pth             the official file, where the official script puts it
    <root>/<name>_pretrained/generator_AtoB.safetensors   the same weights as a fastcgan generator

so ``fastcgan-translate --checkpoint <root>/<name>_pretrained``, ``fastcgan-export`` and
``fastcgan-eval`` take the folder as they take a run directory. ``AtoB`` is the model's own
direction (``horse2zebra`` translates horses into zebras). pix2pix's BatchNorm runs as the
official ``test.py`` does (``bn_inference="per_image"``: each image's own statistics).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile

import torch

from fastcgan.data.download import (
    COLLECTIONS,
    DownloadError,
    check_sha256_arg,
    discard_download,
    download_folder,
    fetch_verified,
    replace_dir,
)
from fastcgan.models.io import generator_filename, save_generator
from fastcgan.models.official import load_official_generator

__all__ = [
    "CYCLEGAN_MODEL_URL",
    "PIX2PIX_MODEL_URL",
    "PRETRAINED_CYCLEGAN",
    "PRETRAINED_PIX2PIX",
    "download_pretrained",
    "pretrained_collection",
    "pretrained_url",
]

CYCLEGAN_MODEL_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/pretrained_models"
PIX2PIX_MODEL_URL = "http://efrosgans.eecs.berkeley.edu/pix2pix/models-pytorch"
# The names the official download scripts accept.
PRETRAINED_CYCLEGAN = (
    "apple2orange",
    "orange2apple",
    "summer2winter_yosemite",
    "winter2summer_yosemite",
    "horse2zebra",
    "zebra2horse",
    "monet2photo",
    "style_monet",
    "style_cezanne",
    "style_ukiyoe",
    "style_vangogh",
    "sat2map",
    "map2sat",
    "cityscapes_photo2label",
    "cityscapes_label2photo",
    "facades_photo2label",
    "facades_label2photo",
    "iphone2dslr_flower",
)
PRETRAINED_PIX2PIX = ("edges2shoes", "sat2map", "map2sat", "facades_label2photo", "day2night")
# How the official scripts trained them (their defaults: the models' own flags are not published).
PRETRAINED_ARCH = {
    "cyclegan": {"arch": "resnet_9blocks", "norm": "instance"},
    "pix2pix": {"arch": "unet_256", "norm": "batch", "bn_inference": "per_image"},
}
# A released ResNet-9 is 45 MB, a U-Net-256 218 MB (fp32): a larger file is not one of them.
MAX_MODEL_BYTES = 1 << 30
OFFICIAL_FILE = "latest_net_G.pth"
logger = logging.getLogger("fastcgan.data")


def pretrained_collection(name: str, collection: str | None = None) -> str:
    """``collection`` if given, else ``pix2pix`` for the names only pix2pix has, else ``cyclegan``
    (``sat2map``, ``map2sat`` and ``facades_label2photo`` exist in both)."""
    if collection is not None:
        if collection not in COLLECTIONS:
            raise ValueError(f"collection must be one of {COLLECTIONS}, got {collection!r}")
        return collection
    return "pix2pix" if name in PRETRAINED_PIX2PIX and name not in PRETRAINED_CYCLEGAN else "cyclegan"


def pretrained_url(name: str, url: str | None = None, collection: str | None = None) -> str:
    """``url`` if it is a full ``.pth`` URL, else ``<base>/<name>.pth`` with ``base`` = ``url`` or
    the collection's server."""
    if url and _is_pth_url(url):
        return url
    base = url or (PIX2PIX_MODEL_URL if pretrained_collection(name, collection) == "pix2pix" else CYCLEGAN_MODEL_URL)
    return f"{base.rstrip('/')}/{name}.pth"


def _is_pth_url(url: str) -> bool:
    return url.lower().split("?")[0].endswith((".pth", ".pt"))


def _check_name(name: str, full_url: bool, collection: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name or ""):
        raise ValueError(f"invalid model name {name!r}")
    names = PRETRAINED_PIX2PIX if collection == "pix2pix" else PRETRAINED_CYCLEGAN
    if not full_url and name not in names:
        raise ValueError(
            f"unknown pretrained {collection} model {name!r}; valid names: {', '.join(names)}"
            + ("" if collection == "pix2pix" else f" (pix2pix: {', '.join(PRETRAINED_PIX2PIX)})")
        )


def _existing_model(target: str, force: bool) -> bool:
    """Whether ``target`` already holds the converted model (kept unless ``force``)."""
    if os.path.lexists(target) and not os.path.isdir(target):
        raise FileExistsError(f"{target!r} exists and is not a directory")
    if force or not (os.path.isdir(target) and os.listdir(target)):
        return False
    if not os.path.isfile(os.path.join(target, generator_filename("AtoB"))):
        raise FileExistsError(
            f"{target!r} holds other files, not a downloaded model ({generator_filename('AtoB')}): "
            "use another --root, or --force to replace it"
        )
    logger.info("%s already exists; skipping download", target)
    return True


def download_pretrained(
    name: str,
    root: str = "checkpoints",
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    force: bool = False,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 1.0,
    collection: str | None = None,
) -> str:
    """Download the released generator ``name`` and convert it into ``<root>/<name>_pretrained``
    (see the module docstring); returns that folder. An existing one is kept unless ``force``,
    which replaces it only once the new one is complete. ``url``: base URL or full ``.pth`` URL
    (then ``name`` only names the folder); ``sha256``: the file's expected digest;
    ``collection``: ``"cyclegan"`` or ``"pix2pix"`` (which architecture the file must hold)."""
    collection = pretrained_collection(name, collection)
    pth_url = pretrained_url(name, url, collection)
    _check_name(name, full_url=pth_url == url, collection=collection)
    check_sha256_arg(sha256)
    folder = f"{name}_pretrained"

    def fetch_and_convert(root: str) -> None:
        part = os.path.join(root, f"{folder}.pth.part")
        fetch_verified(pth_url, part, sha256, progress, retries, timeout, backoff, max_bytes=MAX_MODEL_BYTES)
        model = _load_checked(part, pth_url, collection)
        tmp = tempfile.mkdtemp(prefix=f".{folder}.convert-", dir=root)
        try:
            save_generator(model, os.path.join(tmp, generator_filename("AtoB")))
            os.replace(part, os.path.join(tmp, OFFICIAL_FILE))
            replace_dir(tmp, os.path.join(root, folder))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        discard_download(part)  # the .part.source record

    return download_folder(root, folder, lambda target: _existing_model(target, force), fetch_and_convert)


def _load_checked(part: str, url: str, collection: str) -> torch.nn.Module:
    """The downloaded file as the collection's official generator; anything else deletes it."""
    spec = PRETRAINED_ARCH[collection]
    try:
        model = load_official_generator(part, **spec)
    except (ValueError, FileNotFoundError) as e:
        discard_download(part)
        raise DownloadError(
            f"{url} is not an official {spec['arch']} ({spec['norm']} norm) generator: {e}; download deleted"
        ) from None
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        discard_download(part)
        raise DownloadError(f"{url}: non-finite weights in {bad[:4]}; download deleted")
    return model
