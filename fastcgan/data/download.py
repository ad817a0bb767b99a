"""Download and unpack the official CycleGAN datasets: ``fastcgan-download horse2zebra``.

* Source: ``<base>/<name>.zip`` with ``<base>`` the official server (:data:`DEFAULT_BASE_URL`),
  overridden by the environment variable ``FASTCGAN_DATASET_URL``, overridden by ``--url``
  (``--url`` may also be a complete ``.zip`` URL, then NAME can be any folder name).
* Resume: bytes go to ``<root>/<name>.zip.part``; an interrupted transfer (dropped connection, or
  a ``.part`` left by an earlier run) continues with an HTTP ``Range`` request.
* Integrity: the official server publishes no checksums, so none can be built in here. The zip is
  verified against ``--sha256 HEX`` when given, else against ``<url>.sha256`` when the server has
  one; otherwise a warning says the download is **unverified** (zip CRCs still catch corruption).
  A mismatch deletes the download and extracts nothing.
* Extraction refuses absolute paths, ``..`` components and symlinks, unpacks into a temporary
  folder inside ``<root>`` and moves the dataset into ``<root>/<name>`` with one atomic rename.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile

__all__ = [
    "CYCLEGAN_DATASETS",
    "DEFAULT_BASE_URL",
    "ChecksumError",
    "DownloadError",
    "dataset_url",
    "download_dataset",
    "main",
]

DEFAULT_BASE_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/datasets"
ENV_URL = "FASTCGAN_DATASET_URL"

# The names the official download script accepts (cityscapes excepted, see below).
CYCLEGAN_DATASETS = (
    "apple2orange",
    "summer2winter_yosemite",
    "horse2zebra",
    "monet2photo",
    "cezanne2photo",
    "ukiyoe2photo",
    "vangogh2photo",
    "maps",
    "facades",
    "iphone2dslr_flower",
    "ae_photos",
    "mini",
    "mini_pix2pix",
    "mini_colorization",
)
_CITYSCAPES_NOTE = (
    "cityscapes is not redistributed (license): download gtFine_trainvaltest.zip and "
    "leftImg8bit_trainvaltest.zip from https://www.cityscapes-dataset.com and arrange them as "
    "<root>/cityscapes/{trainA,trainB,testA,testB}"
)
_CHUNK = 1 << 20
logger = logging.getLogger("fastcgan.data")


class DownloadError(RuntimeError):
    """The download failed; the message names the URL."""


class ChecksumError(DownloadError):
    """The downloaded file's SHA-256 differs from the expected one."""


def dataset_url(name: str, url: str | None = None) -> str:
    """The zip URL for ``name``: ``url`` if it is a full ``.zip`` URL, else ``<base>/<name>.zip``."""
    if url and url.lower().split("?")[0].endswith(".zip"):
        return url
    base = url or os.environ.get(ENV_URL) or DEFAULT_BASE_URL
    return f"{base.rstrip('/')}/{name}.zip"


def _check_name(name: str, full_url: bool) -> None:
    if name == "cityscapes":
        raise ValueError(_CITYSCAPES_NOTE)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name or ""):
        raise ValueError(f"invalid dataset name {name!r}")
    if not full_url and name not in CYCLEGAN_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(CYCLEGAN_DATASETS)}")


def _open(url: str, start: int = 0, timeout: float = 60.0):
    headers = {"User-Agent": "fastcgan-download"}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _fetch(url: str, part: str, progress: bool, retries: int, timeout: float, backoff: float = 1.0) -> None:
    """Download ``url`` into ``part``, resuming whatever ``part`` already holds."""
    from tqdm import tqdm

    attempt, bar, total = 0, None, None
    try:
        while True:
            have = os.path.getsize(part) if os.path.exists(part) else 0
            try:
                resp = _open(url, have, timeout)
            except urllib.error.HTTPError as e:
                if e.code == 416 and have:
                    # Range not satisfiable: the .part is already complete (or garbage) — check length.
                    m = re.search(r"/(\d+)", e.headers.get("Content-Range", "") or "")
                    if m and int(m.group(1)) == have:
                        return
                    os.remove(part)
                    continue
                raise DownloadError(f"HTTP {e.code} {e.reason} for {url}") from None
            except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
                reason = getattr(e, "reason", e)
                if attempt < retries:
                    attempt += 1
                    time.sleep(min(backoff * 2 ** (attempt - 1), 30.0))
                    continue
                raise DownloadError(f"cannot reach {url}: {reason}") from None
            with resp:
                if have and resp.status == 206:
                    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
                    if not m or int(m.group(1)) != have:
                        raise DownloadError(
                            f"bad Content-Range {resp.headers.get('Content-Range')!r} from {url}"
                        )
                    total = int(m.group(2)) if m.group(2) != "*" else None
                    mode = "ab"
                else:  # 200: the server ignored the range (or this is a fresh start): from byte 0
                    have, mode = 0, "wb"
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                if bar is None:
                    bar = tqdm(
                        total=total,
                        initial=have,
                        unit="B",
                        unit_scale=True,
                        unit_divisor=1024,
                        desc=os.path.basename(url),
                        disable=not progress,
                    )
                else:
                    bar.reset(total=total)
                    bar.update(have)
                try:
                    with open(part, mode) as fh:
                        while True:
                            chunk = resp.read(_CHUNK)
                            if not chunk:
                                break
                            fh.write(chunk)
                            bar.update(len(chunk))
                except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                    if attempt < retries:
                        attempt += 1
                        logger.warning("connection to %s dropped (%s); resuming", url, e)
                        time.sleep(min(backoff * 2 ** (attempt - 1), 30.0))
                        continue
                    raise DownloadError(f"download of {url} interrupted: {e!r}") from None
            size = os.path.getsize(part)
            if total is not None and size < total:
                if attempt < retries:
                    attempt += 1
                    logger.warning(
                        "connection to %s closed early (%d of %d bytes); resuming", url, size, total
                    )
                    continue
                raise DownloadError(f"download of {url} incomplete: {size} of {total} bytes")
            if total is not None and size > total:
                raise DownloadError(f"download of {url} is larger than announced ({size} > {total} bytes)")
            return
    finally:
        if bar is not None:
            bar.close()


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _published_sha256(url: str, timeout: float) -> str | None:
    """The hex digest in ``<url>.sha256`` (``sha256sum`` format or bare), or None if absent."""
    try:
        with _open(url + ".sha256", timeout=timeout) as resp:
            text = resp.read(4096).decode("ascii", "replace")
    except (urllib.error.URLError, OSError):
        return None
    m = re.search(r"\b([0-9a-fA-F]{64})\b", text)
    return m.group(1).lower() if m else None


def _safe_members(zf: zipfile.ZipFile, zip_path: str) -> list[zipfile.ZipInfo]:
    for info in zf.infolist():
        name = info.filename.replace("\\", "/")
        parts = name.split("/")
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            raise DownloadError(f"{zip_path}: refusing unsafe path {info.filename!r} in the archive")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise DownloadError(f"{zip_path}: refusing symlink {info.filename!r} in the archive")
    return zf.infolist()


def _extract(zip_path: str, root: str, name: str) -> str:
    target = os.path.join(root, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}.extract-", dir=root)
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                for info in _safe_members(zf, zip_path):
                    # Ignore macOS metadata that would become fake (corrupt) images.
                    if info.filename.startswith("__MACOSX/"):
                        continue
                    zf.extract(info, tmp)
        except zipfile.BadZipFile as e:
            raise DownloadError(f"{zip_path} is not a valid zip file: {e}") from None
        entries = [e for e in os.listdir(tmp) if e != "__MACOSX"]
        # The official zips hold one top-level folder <name>/; accept any single folder, or a flat zip.
        src = (
            os.path.join(tmp, entries[0])
            if len(entries) == 1 and os.path.isdir(os.path.join(tmp, entries[0]))
            else tmp
        )
        if os.path.isdir(target):
            os.rmdir(target)  # only ever an empty folder here (checked by the caller)
        if src == tmp:
            os.replace(tmp, target)
        else:
            os.replace(src, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def download_dataset(
    name: str,
    root: str = "datasets",
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    force: bool = False,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 1.0,
) -> str:
    """Download, verify and unpack dataset ``name`` into ``<root>/<name>``; returns that path.

    An existing non-empty ``<root>/<name>`` is kept as is unless ``force``. ``url``: base URL or a
    full zip URL (see module docstring); ``sha256``: expected hex digest of the zip. A failed or
    dropped connection is retried ``retries`` times (waiting ``backoff * 2**k`` s), resuming.
    """
    zip_url = dataset_url(name, url)
    _check_name(name, full_url=zip_url == url)
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"--sha256 must be 64 hex digits, got {sha256!r}")
    root = os.path.abspath(os.fspath(root))
    target = os.path.join(root, name)
    if os.path.isdir(target) and os.listdir(target):
        if not force:
            logger.info("%s already exists; skipping download", target)
            return target
        shutil.rmtree(target)
    elif os.path.exists(target) and not os.path.isdir(target):
        raise FileExistsError(f"{target!r} exists and is not a directory")
    os.makedirs(root, exist_ok=True)
    part = os.path.join(root, f"{name}.zip.part")

    _fetch(zip_url, part, progress, retries, timeout, backoff)

    expected = sha256.lower() if sha256 else _published_sha256(zip_url, timeout)
    if expected is None:
        msg = (
            f"{zip_url}: no checksum given (--sha256) or published ({zip_url}.sha256); download is unverified"
        )
        logger.warning(msg)
        warnings.warn(msg, stacklevel=2)
    else:
        actual = _sha256(part)
        if actual != expected:
            os.remove(part)
            raise ChecksumError(
                f"{zip_url}: SHA-256 mismatch (expected {expected}, got {actual}); download deleted"
            )
    try:
        _extract(part, root, name)
    except DownloadError:
        os.remove(part)  # a corrupt or hostile archive is not worth resuming
        raise
    os.remove(part)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="fastcgan-download",
        description="Download an official CycleGAN dataset into <root>/<name>.",
        epilog="datasets: " + ", ".join(CYCLEGAN_DATASETS),
    )
    ap.add_argument("name", nargs="?", help="dataset name (see below)")
    ap.add_argument("--root", default="datasets", help="parent folder (default: datasets)")
    ap.add_argument(
        "--url", default=None, help=f"base URL or full .zip URL (default: ${ENV_URL} or {DEFAULT_BASE_URL})"
    )
    ap.add_argument("--sha256", default=None, help="expected SHA-256 of the zip")
    ap.add_argument("--force", action="store_true", help="replace an existing dataset folder")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--list", action="store_true", help="print the dataset names and exit")
    a = ap.parse_args(argv)
    if a.list:
        print("\n".join(CYCLEGAN_DATASETS))
        return 0
    if not a.name:
        ap.error("NAME is required (or --list)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = download_dataset(
            a.name, a.root, url=a.url, sha256=a.sha256, progress=not a.no_progress, force=a.force
        )
    except (ValueError, OSError, DownloadError) as e:
        print(f"fastcgan-download: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
