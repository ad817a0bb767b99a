"""The released CycleGAN, pix2pix and CUT generators: ``fastcgan-download --pretrained horse2zebra``.

The official repository publishes trained generators (``scripts/download_cyclegan_model.sh``,
``download_pix2pix_model.sh``) as plain ``.pth`` state dicts; the CUT repository publishes its six
(CUT and FastCUT on horse2zebra, cat2dog, cityscapes) in one ``pretrained_models.tar`` as
``checkpoints/<name>_pretrained/latest_net_G.pth``. This downloads one (resumable, checksummed when
a checksum is given or published: see :mod:`fastcgan.data.download`; from the tar only the named
model's file is read, bounded, and the tar is deleted), loads it as tensors only
(``torch.load(weights_only=True)``: never code), checks it is the official generator the collection
says (CycleGAN: ``resnet_9blocks``, InstanceNorm, strided; CUT: the same with its resampling, the
anti-aliased default or strided, read from the file; pix2pix: ``unet_256``, BatchNorm) with finite
weights, and leaves, with one atomic rename::

    <root>/<name>_pretrained/latest_net_G.pth             the official file, where the official script puts it
    <root>/<name>_pretrained/generator_AtoB.safetensors   the same weights as a fastcgan generator

so ``fastcgan-translate --checkpoint <root>/<name>_pretrained``, ``fastcgan-export`` and
``fastcgan-eval`` take the folder as they take a run directory. ``AtoB`` is the model's own
direction (``horse2zebra`` translates horses into zebras; ``cityscapes_cut``, trained with
``--direction BtoA``, labels into photos). pix2pix's BatchNorm runs as the official ``test.py`` does
(``bn_inference="per_image"``: each image's own statistics).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tarfile
import tempfile
import zlib

import torch

from fastcgan.data.download import (
    BoundedTarInfo,
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
    "CUT_MODEL_URL",
    "CYCLEGAN_MODEL_URL",
    "PIX2PIX_MODEL_URL",
    "PRETRAINED_CUT",
    "PRETRAINED_CYCLEGAN",
    "PRETRAINED_PIX2PIX",
    "download_pretrained",
    "pretrained_collection",
    "pretrained_url",
]

CYCLEGAN_MODEL_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/pretrained_models"
PIX2PIX_MODEL_URL = "http://efrosgans.eecs.berkeley.edu/pix2pix/models-pytorch"
CUT_MODEL_URL = "http://efrosgans.eecs.berkeley.edu/CUT"  # + /pretrained_models.tar
CUT_ARCHIVE = "pretrained_models.tar"
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
# The folders in the CUT archive, less "_pretrained" (its experiments/pretrained_launcher.py).
PRETRAINED_CUT = (
    "horse2zebra_cut",
    "horse2zebra_fastcut",
    "cat2dog_cut",
    "cat2dog_fastcut",
    "cityscapes_cut",
    "cityscapes_fastcut",
)
COLLECTIONS = ("cyclegan", "pix2pix", "cut")
# How the official scripts trained them (their defaults: the models' own flags are not published).
# CUT: antialias None = either resampling, as the file's layout says (the CUT default is anti-aliased).
PRETRAINED_ARCH = {
    "cyclegan": {"arch": "resnet_9blocks", "norm": "instance", "antialias": False, "antialias_up": False},
    "pix2pix": {"arch": "unet_256", "norm": "batch", "bn_inference": "per_image"},
    "cut": {"arch": "resnet_9blocks", "norm": "instance"},
}
# A released ResNet-9 is 45 MB, a U-Net-256 218 MB (fp32): a larger file is not one of them. The CUT
# archive holds six generators (and perhaps their discriminators and heads).
MAX_MODEL_BYTES = 1 << 30
MAX_ARCHIVE_BYTES = 4 << 30
MAX_ARCHIVE_MEMBERS = 10_000  # entries read before giving up (the official archive holds six models' files)
OFFICIAL_FILE = "latest_net_G.pth"
logger = logging.getLogger("fastcgan.data")


def pretrained_collection(name: str, collection: str | None = None) -> str:
    """``collection`` if given, else ``cut`` for the CUT archive's names, ``pix2pix`` for the names
    only pix2pix has, else ``cyclegan`` (``sat2map``, ``map2sat`` and ``facades_label2photo`` exist in
    CycleGAN and pix2pix)."""
    if collection is not None:
        if collection not in COLLECTIONS:
            raise ValueError(f"collection must be one of {COLLECTIONS}, got {collection!r}")
        return collection
    if name in PRETRAINED_CUT:
        return "cut"
    return "pix2pix" if name in PRETRAINED_PIX2PIX and name not in PRETRAINED_CYCLEGAN else "cyclegan"


def pretrained_url(name: str, url: str | None = None, collection: str | None = None) -> str:
    """``url`` if it is a full URL of the collection's file (``.pth``; CUT: ``.tar``), else
    ``<base>/<name>.pth`` (CUT: ``<base>/pretrained_models.tar``) with ``base`` = ``url`` or the
    collection's server."""
    collection = pretrained_collection(name, collection)
    if url and _is_full_url(url, collection):
        return url
    if collection == "cut":
        return f"{(url or CUT_MODEL_URL).rstrip('/')}/{CUT_ARCHIVE}"
    base = url or (PIX2PIX_MODEL_URL if collection == "pix2pix" else CYCLEGAN_MODEL_URL)
    return f"{base.rstrip('/')}/{name}.pth"


def _is_full_url(url: str, collection: str) -> bool:
    return url.lower().split("?")[0].endswith((".tar",) if collection == "cut" else (".pth", ".pt"))


def _check_name(name: str, full_url: bool, collection: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name or ""):
        raise ValueError(f"invalid model name {name!r}")
    names = {"pix2pix": PRETRAINED_PIX2PIX, "cut": PRETRAINED_CUT}.get(collection, PRETRAINED_CYCLEGAN)
    if collection == "cut" and name not in names:  # the name picks the file inside the archive
        raise ValueError(f"unknown pretrained CUT model {name!r}; valid names: {', '.join(names)}")
    if not full_url and name not in names:
        raise ValueError(
            f"unknown pretrained {collection} model {name!r}; valid names: {', '.join(names)}"
            + ("" if collection == "pix2pix" else f" (pix2pix: {', '.join(PRETRAINED_PIX2PIX)}; "
               f"CUT: {', '.join(PRETRAINED_CUT)})")
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
    ``collection``: ``"cyclegan"``, ``"pix2pix"`` or ``"cut"`` (which architecture the file must
    hold; ``cut`` reads the named model's file out of the archive)."""
    collection = pretrained_collection(name, collection)
    pth_url = pretrained_url(name, url, collection)
    _check_name(name, full_url=pth_url == url, collection=collection)
    check_sha256_arg(sha256)
    folder = f"{name}_pretrained"

    def fetch_and_convert(root: str) -> None:
        part = os.path.join(root, f"{folder}.pth.part")
        if collection == "cut":  # per model (a folder's lock guards it): never shared by two downloads
            tar_part = os.path.join(root, f"{folder}.tar.part")
            fetch_verified(pth_url, tar_part, sha256, progress, retries, timeout, backoff,
                           max_bytes=MAX_ARCHIVE_BYTES)
            try:
                _extract_model(tar_part, f"{folder}/{OFFICIAL_FILE}", part, pth_url)
            finally:
                discard_download(tar_part)  # extracted or not: a bad archive is not worth resuming
        else:
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


def _extract_model(tar_path: str, member: str, dest: str, url: str) -> None:
    """Copy the archive's ``.../<member>`` (a regular file of at most MAX_MODEL_BYTES, there once)
    to ``dest``, reading the tar's headers one at a time (a bounded number; the archive is a plain
    tar, as the official one: other members' data is seeked over, never read). Errors name ``url``
    (the file the user asked for), and delete ``dest``."""
    found = None
    with open(tar_path, "rb") as fh:
        if fh.read(2) == b"\x1f\x8b":
            discard_download(dest)
            raise DownloadError(f"{url} is gzip-compressed: the official archive is a plain (uncompressed) tar")
    try:
        with tarfile.open(tar_path, "r:", tarinfo=BoundedTarInfo) as tf:
            for count, m in enumerate(iter(tf.next, None)):
                tf.members = []  # tarfile keeps every header it has read: only this one is needed
                if count >= MAX_ARCHIVE_MEMBERS:
                    raise DownloadError(f"{url}: more than {MAX_ARCHIVE_MEMBERS:,} entries")
                parts = [p for p in m.name.replace("\\", "/").split("/") if p not in ("", ".")]
                if parts[-2:] != member.split("/"):
                    continue
                if found is not None:  # tar -x would keep the last one, we the first: neither is sure
                    raise DownloadError(f"{url}: {member!r} is there twice ({found!r}, {m.name!r})")
                found = m.name
                if not m.isfile():
                    raise DownloadError(f"{url}: {m.name!r} is not a regular file")
                if m.size > MAX_MODEL_BYTES:
                    raise DownloadError(f"{url}: {m.name!r} is {m.size:,} bytes, more than a generator")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(dest)
                # O_EXCL: never written through a link planted at the name.
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                with tf.extractfile(m) as src, os.fdopen(fd, "wb") as fh:
                    shutil.copyfileobj(src, fh, 1 << 20)
                if os.path.getsize(dest) != m.size:
                    raise DownloadError(f"{url}: {m.name!r} is truncated")
        if found is not None:
            return
    except (tarfile.TarError, EOFError, zlib.error) as e:
        discard_download(dest)
        raise DownloadError(f"{url} is not a valid tar archive: {e}") from None
    except BaseException:  # a refused member, a full disk, Ctrl-C: no partial file left
        discard_download(dest)
        raise
    raise DownloadError(f"{url} holds no {member!r}: not the official CUT archive, or not this model")


def _load_checked(part: str, url: str, collection: str) -> torch.nn.Module:
    """The downloaded file as the collection's official generator; anything else deletes it."""
    spec = PRETRAINED_ARCH[collection]
    try:
        model = load_official_generator(part, **spec)
    except Exception as e:  # noqa: BLE001 -- whatever the file makes the loader raise, it is deleted
        discard_download(part)
        kind = f"{collection} {spec['arch']} ({spec['norm']} norm)"
        raise DownloadError(f"{url} is not an official {kind} generator: {e}; download deleted") from None
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        discard_download(part)
        raise DownloadError(f"{url}: non-finite weights in {bad[:4]}; download deleted")
    return model
