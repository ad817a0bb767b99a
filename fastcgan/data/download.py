"""Download and unpack the official CycleGAN and pix2pix datasets: ``fastcgan-download horse2zebra``,
``fastcgan-download edges2shoes``, ``fastcgan-download facades --pix2pix``. The released generators
(``fastcgan-download horse2zebra --pretrained``) go through the same fetch: :mod:`fastcgan.models.pretrained`.

* Source: CycleGAN sets are ``<base>/<name>.zip`` with ``<base>`` the official server
  (:data:`DEFAULT_BASE_URL`), overridden by the environment variable ``FASTCGAN_DATASET_URL``;
  pix2pix sets (:data:`PIX2PIX_DATASETS`: paired ``train/ val/ test/`` folders of A|B images)
  are ``<base>/<name>.tar.gz`` from :data:`PIX2PIX_BASE_URL`, overridden by
  ``FASTCGAN_PIX2PIX_URL``. ``--url`` overrides either (it may also be a complete ``.zip`` /
  ``.tar.gz`` / ``.tgz`` URL, then NAME can be any folder name). ``facades`` and ``maps`` exist in
  both collections (different layouts): the CycleGAN one unless ``--pix2pix``; the names only
  pix2pix has (edges2shoes, edges2handbags, night2day) need no flag.
* Resume: bytes go to ``<root>/<name>.zip.part`` (``.tar.gz.part``); an interrupted transfer
  (dropped connection, or a ``.part`` left by an earlier run) continues with an HTTP ``Range``
  request -- only from the URL the ``.part`` came from (recorded in ``.part.source``) and, when
  the server gave a validator (ETag / Last-Modified), with ``If-Range``, so a file changed on
  the server is fetched whole rather than spliced. A full disk is an error naming the file (a
  known size is checked against the free space first), not a retried "dropped connection". One
  download of a dataset into a root at a time (a lock file beside the ``.part``).
* Integrity: the official server publishes no checksums for either collection, so none can be
  built in here. The archive is verified against ``--sha256 HEX`` when given, else against
  ``<url>.sha256`` when the server has one; otherwise a warning says the download is
  **unverified** (zip member CRCs and the gzip stream's CRC-32 still catch corruption). A mismatch
  deletes the download and extracts nothing.
* Extraction refuses absolute paths, ``..`` components, links and device files, archives that
  would expand to more than 50x their size (decompression bombs; images barely compress), hold
  over 2 M entries or not fit on the disk -- all judged on the headers first -- unpacks into a
  temporary folder inside ``<root>`` and moves the dataset into ``<root>/<name>`` with one atomic
  rename. An existing ``<root>/<name>`` of the other collection's layout is an error, not a skip;
  ``--force`` replaces an existing dataset only once the new one is unpacked.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib

from fastcgan._cli import Parser, interruptible
from fastcgan.fileio import parse_json

__all__ = [
    "CYCLEGAN_DATASETS",
    "DEFAULT_BASE_URL",
    "PIX2PIX_BASE_URL",
    "PIX2PIX_DATASETS",
    "ChecksumError",
    "DownloadError",
    "dataset_collection",
    "dataset_url",
    "download_dataset",
    "main",
]

DEFAULT_BASE_URL = "http://efrosgans.eecs.berkeley.edu/cyclegan/datasets"
ENV_URL = "FASTCGAN_DATASET_URL"
PIX2PIX_BASE_URL = "http://efrosgans.eecs.berkeley.edu/pix2pix/datasets"
ENV_PIX2PIX_URL = "FASTCGAN_PIX2PIX_URL"
COLLECTIONS = ("cyclegan", "pix2pix")

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
# The names the official download_pix2pix_dataset.sh accepts (cityscapes is refused there too, for
# its license: it is built from the Cityscapes release with the official prepare_cityscapes_dataset.py).
PIX2PIX_DATASETS = ("facades", "cityscapes", "maps", "edges2shoes", "edges2handbags", "night2day")
_ARCHIVE_EXTS = (".zip", ".tar.gz", ".tgz")
_CITYSCAPES_NOTE = (
    "cityscapes is not redistributed (license): download gtFine_trainvaltest.zip and "
    "leftImg8bit_trainvaltest.zip from https://www.cityscapes-dataset.com and arrange them as "
    "<root>/cityscapes/{trainA,trainB,testA,testB}"
)
_CITYSCAPES_PIX2PIX_NOTE = (
    "cityscapes is not redistributed (license): download gtFine_trainvaltest.zip and "
    "leftImg8bit_trainvaltest.zip from https://www.cityscapes-dataset.com, build the A|B pairs (photo | "
    "label colours, e.g. with `python -m fastcgan.data.combine`) into <root>/cityscapes/{train,val}, or "
    "pass --url with a full .tar.gz URL you are licensed to use"
)
_CHUNK = 1 << 20
logger = logging.getLogger("fastcgan.data")


class DownloadError(RuntimeError):
    """The download failed; the message names the URL."""


class ChecksumError(DownloadError):
    """The downloaded file's SHA-256 differs from the expected one."""


def _archive_ext(url: str) -> str | None:
    path = url.lower().split("?")[0]
    return next((e for e in _ARCHIVE_EXTS if path.endswith(e)), None)


def dataset_collection(name: str, collection: str | None = None) -> str:
    """``collection`` if given, else ``pix2pix`` for the names only pix2pix has, else ``cyclegan``."""
    if collection is not None:
        if collection not in COLLECTIONS:
            raise ValueError(f"collection must be one of {COLLECTIONS}, got {collection!r}")
        return collection
    return "pix2pix" if name in PIX2PIX_DATASETS and name not in CYCLEGAN_DATASETS else "cyclegan"


def dataset_url(name: str, url: str | None = None, collection: str | None = None) -> str:
    """The archive URL for ``name``: ``url`` if it is a full ``.zip``/``.tar.gz``/``.tgz`` URL, else
    ``<base>/<name>.zip`` (CycleGAN) or ``<base>/<name>.tar.gz`` (pix2pix)."""
    if url and _archive_ext(url):
        return url
    if dataset_collection(name, collection) == "pix2pix":
        base = url or os.environ.get(ENV_PIX2PIX_URL) or PIX2PIX_BASE_URL
        return f"{base.rstrip('/')}/{name}.tar.gz"
    base = url or os.environ.get(ENV_URL) or DEFAULT_BASE_URL
    return f"{base.rstrip('/')}/{name}.zip"


def _check_name(name: str, full_url: bool, collection: str = "cyclegan") -> None:
    if name == "cityscapes" and not full_url:
        raise ValueError(_CITYSCAPES_NOTE if collection == "cyclegan" else _CITYSCAPES_PIX2PIX_NOTE)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name or ""):
        raise ValueError(f"invalid dataset name {name!r}")
    names = PIX2PIX_DATASETS if collection == "pix2pix" else CYCLEGAN_DATASETS
    if not full_url and name not in names:
        raise ValueError(
            f"unknown {collection} dataset {name!r}; valid names: {', '.join(names)}"
            + ("" if collection == "pix2pix" else f" (pix2pix, paired: {', '.join(PIX2PIX_DATASETS)})")
        )


def _open(url: str, start: int = 0, timeout: float = 60.0, validator: str | None = None):
    headers = {"User-Agent": "fastcgan-download"}
    if start:
        headers["Range"] = f"bytes={start}-"
        if validator:  # the server sends the whole file (200) if it changed since the .part began
            headers["If-Range"] = validator
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _strong_validator(headers) -> str | None:
    """What ``If-Range`` may carry: a strong ETag, else Last-Modified (RFC 9110 13.1.5)."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def _source_path(part: str) -> str:
    return part + ".source"


def _read_source(part: str) -> dict | None:
    """What the ``.part`` was downloaded from (URL, validator), or None (none recorded)."""
    try:
        with open(_source_path(part), "rb") as fh:
            doc = parse_json(fh.read(1 << 16))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _write_source(part: str, url: str, validator: str | None) -> None:
    from fastcgan.fileio import atomic_write

    atomic_write(_source_path(part), json.dumps({"url": url, "validator": validator}).encode())


def discard_download(part: str) -> None:
    for path in (part, _source_path(part)):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _check_free_space(part: str, need: int) -> None:
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(part))).free
    if need > free:
        raise DownloadError(f"{part}: {need / 1e9:.1f} GB still to download, its folder has {free / 1e9:.1f} GB free")


# A download of unannounced length is checked as it arrives: every this many bytes its folder must
# keep this much free (a server streaming without end filled the disk; the archive is unpacked there too).
FREE_SPACE_CHECK_EVERY = 64 << 20
MIN_FREE_BYTES = 256 << 20
# The largest dataset archive accepted: twice the largest official one (pix2pix edges2handbags, 8 GB).
MAX_DATASET_BYTES = 16 << 30


class DiskFullError(DownloadError):
    """The download's folder is (nearly) full: the partial download is deleted."""


class TooLargeError(DownloadError):
    """The file is larger than the caller allows (``max_bytes``)."""


def _check_size(url: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise TooLargeError(f"{url} is larger than {max_bytes:,} bytes ({size:,}); refusing it")


def _fetch(
    url: str, part: str, progress: bool, retries: int, timeout: float, backoff: float = 1.0,
    max_bytes: int | None = None,
) -> None:
    """Download ``url`` into ``part``, resuming whatever ``part`` already holds when it came from
    the same URL (``part.source``) and the file has not changed since (``If-Range``). ``max_bytes``:
    a larger file is refused, on its announced size before it is fetched, else as it arrives."""
    from tqdm import tqdm

    source = _read_source(part)
    if os.path.exists(part) and source is not None and source.get("url") != url:
        logger.warning("%s was downloaded from %s, not %s: starting over", part, source.get("url"), url)
        discard_download(part)
        source = None
    validator = source.get("validator") if source else None
    attempt, bar, total = 0, None, None
    try:
        while True:
            have = os.path.getsize(part) if os.path.exists(part) else 0
            try:
                resp = _open(url, have, timeout, validator)
            except urllib.error.HTTPError as e:
                if e.code == 416 and have:
                    # Range not satisfiable: the .part is already complete (or garbage) — check length.
                    m = re.search(r"/(\d+)", e.headers.get("Content-Range", "") or "")
                    if m and int(m.group(1)) == have:
                        return
                    discard_download(part)
                    continue
                raise DownloadError(f"HTTP {e.code} {e.reason} for {url}") from None
            except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
                reason = getattr(e, "reason", e)
                if attempt < retries:
                    attempt += 1
                    time.sleep(min(backoff * 2 ** (attempt - 1), 30.0))
                    continue
                raise DownloadError(f"cannot reach {url}: {reason}") from None
            dropped = None
            with resp:
                if have and resp.status == 206:
                    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
                    if not m or int(m.group(1)) != have:
                        raise DownloadError(
                            f"bad Content-Range {resp.headers.get('Content-Range')!r} from {url}"
                        )
                    total = int(m.group(2)) if m.group(2) != "*" else None
                    if total is not None:
                        _check_size(url, total, max_bytes)
                    mode = "ab"
                else:  # 200: the server ignored the range, the file changed, or a fresh start: from byte 0
                    have, mode = 0, "wb"
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    if total is not None:
                        _check_size(url, total, max_bytes)  # before anything is written
                    validator = _strong_validator(resp.headers)
                    _write_source(part, url, validator)
                if total is not None:
                    _check_free_space(part, total - have)
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
                # O_NOFOLLOW: a link planted at the .part name would have the download written through it.
                flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "ab" else os.O_TRUNC)
                try:
                    fd = os.open(part, flags | getattr(os, "O_NOFOLLOW", 0), 0o644)
                except OSError as e:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(_source_path(part))  # the record of a download that never started
                    raise DownloadError(f"cannot write {part}: {e.strerror or e}"
                                        + (" (a symbolic link?)" if os.path.islink(part) else "")) from None
                with open(fd, mode) as fh:
                    while True:
                        try:
                            chunk = resp.read(_CHUNK)
                        except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                            dropped = e
                            break
                        if not chunk:
                            break
                        _check_size(url, fh.tell() + len(chunk), max_bytes)
                        if total is None and fh.tell() // FREE_SPACE_CHECK_EVERY != \
                                (fh.tell() + len(chunk)) // FREE_SPACE_CHECK_EVERY:
                            free = shutil.disk_usage(os.path.dirname(os.path.abspath(part))).free
                            if free < MIN_FREE_BYTES:
                                raise DiskFullError(f"{part}: stopped at {fh.tell():,} bytes of a download of "
                                                    f"unannounced size, its folder has {free / 1e6:.0f} MB free")
                        try:  # a local failure (disk full) is not a dropped connection: no retry
                            fh.write(chunk)
                        except OSError as e:
                            raise DownloadError(
                                f"cannot write {part} ({fh.tell():,} bytes so far): {e.strerror or e}"
                            ) from None
                        bar.update(len(chunk))
            if dropped is not None:
                if attempt < retries:
                    attempt += 1
                    logger.warning("connection to %s dropped (%s); resuming", url, dropped)
                    time.sleep(min(backoff * 2 ** (attempt - 1), 30.0))
                    continue
                raise DownloadError(f"download of {url} interrupted: {dropped!r}") from None
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


# Decompression bombs: a dataset of JPEG/PNG images barely compresses (the official archives are
# ~1:1), a bomb of zeros ~1000:1; the largest official archive (edges2handbags) has ~140 k files.
MAX_EXPANSION = 50  # bytes written per archive byte (archives under 1 MiB count as 1 MiB)
MAX_MEMBERS = 500_000  # 3.5x the largest; a tar's headers are kept while it is checked (~350 B each)
# tarfile reads a pax / GNU long-name header's payload into memory whole, at the size the header
# claims, and keeps it with the member; real ones hold a path and a few attributes.
MAX_TAR_HEADER = 1 << 20  # one extended header
MAX_TAR_HEADERS = 64 << 20  # all of an archive's
# A global pax header is copied into every member that follows it (git archive writes one of ~60
# bytes; 880 KB of them made a 185 KB archive of 1,000 members take 2.6 GB).
MAX_TAR_GLOBAL_HEADER = 64 << 10


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses an extended header larger than MAX_TAR_HEADER, or one that takes an
    archive's extended headers past MAX_TAR_HEADERS, before tarfile reads it
    (``tarfile.open(..., tarinfo=BoundedTarInfo)``): a few KB of gzip could otherwise claim, and
    make it decompress into memory, gigabytes of "header". Sparse members (GNU ``S`` and the pax
    ``GNU.sparse.*`` forms) are refused too: their block maps are read into memory unbounded (a
    3.5 MB archive grew past 6 GB in ``next()``), and no dataset archive holds a sparse image."""

    def _refuse_sparse(self, member=None, *_):
        # Called on the member itself (GNU "S"), or on its pax header with the member (pax forms).
        name = (member if isinstance(member, tarfile.TarInfo) else self).name
        raise tarfile.TarError(f"sparse member {name!r} (a dataset archive holds none)")

    _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _refuse_sparse

    def _proc_member(self, tarfile_):
        if self.type == tarfile.GNUTYPE_SPARSE:
            self._refuse_sparse()
        extended = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                    tarfile.SOLARIS_XHDTYPE)
        if self.type == tarfile.XGLTYPE and self.size > MAX_TAR_GLOBAL_HEADER:
            raise tarfile.TarError(f"a global header of {self.size:,} bytes (at most {MAX_TAR_GLOBAL_HEADER:,})")
        # Every member carries a copy of the global headers met so far: charged to the budget too.
        charge = self.size if self.type in extended else 0
        charge += getattr(tarfile_, "_fastcgan_global_bytes", 0)
        if charge:
            total = getattr(tarfile_, "_fastcgan_header_bytes", 0) + charge
            if self.type in extended and self.size > MAX_TAR_HEADER:  # a TarError: callers name the archive
                raise tarfile.TarError(f"an extended header of {self.size:,} bytes (at most {MAX_TAR_HEADER:,})")
            if total > MAX_TAR_HEADERS:
                raise tarfile.TarError(f"extended headers of more than {MAX_TAR_HEADERS:,} bytes in all "
                                       "(a global header counts once per member)")
            tarfile_._fastcgan_header_bytes = total
        if self.type == tarfile.XGLTYPE:
            tarfile_._fastcgan_global_bytes = getattr(tarfile_, "_fastcgan_global_bytes", 0) + self.size
        return super()._proc_member(tarfile_)


def _check_expansion(archive: str, total: int, count: int, root: str) -> None:
    """Refuse, before anything is written, an archive that would expand far beyond its size,
    hold absurdly many entries, or not fit on the disk. The sizes are the headers' and the
    readers write no more than them (zipfile and tarfile stop at the declared size)."""
    size = max(os.path.getsize(archive), 1 << 20)
    if count > MAX_MEMBERS:
        raise DownloadError(f"{archive}: {count:,} entries, more than {MAX_MEMBERS:,}; refusing to extract it")
    if total > MAX_EXPANSION * size:
        raise DownloadError(
            f"{archive} would expand to {total:,} bytes, {total / size:.0f}x its size; refusing to extract it "
            f"(images barely compress: this looks like a decompression bomb)"
        )
    free = shutil.disk_usage(root).free
    if total > free:
        raise DownloadError(f"{archive} needs {total / 1e9:.1f} GB to extract, {root} has {free / 1e9:.1f} GB free")


def _zip_entry_count(path: str, limit: int) -> int:
    """Entries in the zip's central directory, counted by walking its 46-byte headers, stopping
    past ``limit``: ``zipfile.ZipFile`` builds a Python object per entry before anything can be
    checked (~1 KB each: 1.2 GB of memory for a 100 MB zip of empty entries). Returns 0 when the
    layout is not recognised (then zipfile reports what is wrong)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        tail_len = min(size, 22 + 65535)  # the end record and its longest comment
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + 22 > len(tail):
            return 0
        eocd = size - tail_len + at
        cd_size = int.from_bytes(tail[at + 12 : at + 16], "little")
        cd_end = eocd
        loc = tail[at - 20 : at] if at >= 20 else b""
        # zip64: zipfile follows a locator right before the end record whatever that record says
        # (a plain record with small counts in front of a zip64 one of 2 M entries passed here).
        if loc[:4] == b"PK\x06\x07" or cd_size == 0xFFFFFFFF or tail[at + 10 : at + 12] == b"\xff\xff":
            if loc[:4] != b"PK\x06\x07":
                return 0
            z64 = int.from_bytes(loc[8:16], "little")
            f.seek(z64)
            rec = f.read(56)
            if rec[:4] != b"PK\x06\x06":
                return 0
            cd_size, cd_end = int.from_bytes(rec[40:48], "little"), z64
        pos, count = cd_end - cd_size, 0  # the directory ends where the end record starts
        if pos < 0:
            return 0
        f.seek(pos)
        while pos < cd_end and count <= limit:
            head = f.read(46)
            if len(head) < 46 or head[:4] != b"PK\x01\x02":
                break
            skip = sum(int.from_bytes(head[i : i + 2], "little") for i in (28, 30, 32))
            pos = f.seek(skip, os.SEEK_CUR)
            count += 1
        return count


def _safe_members(zf: zipfile.ZipFile, zip_path: str) -> list[zipfile.ZipInfo]:
    infos = zf.infolist()
    _check_expansion(zip_path, sum(i.file_size for i in infos), len(infos), os.path.dirname(os.path.abspath(zip_path)))
    for info in infos:
        name = info.filename.replace("\\", "/")
        parts = name.split("/")
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            raise DownloadError(f"{zip_path}: refusing unsafe path {info.filename!r} in the archive")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise DownloadError(f"{zip_path}: refusing symlink {info.filename!r} in the archive")
    return zf.infolist()


def _unsafe_name(name: str) -> bool:
    name = name.replace("\\", "/")
    return name.startswith("/") or bool(re.match(r"^[A-Za-z]:", name)) or ".." in name.split("/")


def _extract_tar(tar_path: str, tmp: str) -> None:
    """Unpack a (gzipped) tar into ``tmp``: regular files and folders only, every path checked
    first. A truncated or corrupt stream (gzip CRC-32, tar headers) raises DownloadError."""
    try:
        with tarfile.open(tar_path, "r:*", tarinfo=BoundedTarInfo) as tf:
            members = []  # reads the whole stream (corruption surfaces here), counted as it goes
            declared, bomb = 0, MAX_EXPANSION * max(os.path.getsize(tar_path), 1 << 20)  # as _check_expansion
            while (m := tf.next()) is not None:
                members.append(m)
                declared += m.size if m.isfile() else 0
                # Judged as each header arrives: the next header is reached by decompressing this
                # member's data, so a bomb's 1 GiB member would be inflated before a check at the end.
                if len(members) > MAX_MEMBERS or declared > bomb:
                    _check_expansion(tar_path, declared, len(members), tmp)
            _check_expansion(tar_path, declared, len(members), tmp)
            # The tar's end-of-archive block comes before the gzip trailer: read on to the end of the
            # stream, where gzip checks its CRC-32 and length (a corrupt or cut download fails here).
            while tf.fileobj.read(_CHUNK):
                pass
            for m in members:
                if _unsafe_name(m.name):
                    raise DownloadError(f"{tar_path}: refusing unsafe path {m.name!r} in the archive")
                if not (m.isfile() or m.isdir()):
                    kind = "link" if m.issym() or m.islnk() else "special file"
                    raise DownloadError(f"{tar_path}: refusing {kind} {m.name!r} in the archive")
            for m in members:
                if m.name.startswith("__MACOSX/") or os.path.basename(m.name).startswith("._"):
                    continue  # macOS metadata that would become fake (corrupt) images
                dest = os.path.join(tmp, *m.name.replace("\\", "/").split("/"))
                try:
                    if m.isdir():
                        os.makedirs(dest, exist_ok=True)
                        continue
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    src = tf.extractfile(m)
                    with src, open(dest, "wb") as fh:
                        shutil.copyfileobj(src, fh, _CHUNK)
                except OSError as e:
                    raise _extraction_error(tar_path, m.name, e) from None
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise DownloadError(f"{tar_path} is not a valid tar.gz archive: {e}") from None
    except OSError as e:
        if isinstance(e, gzip.BadGzipFile) or "crc" in str(e).lower():
            raise DownloadError(f"{tar_path} is not a valid tar.gz archive: {e}") from None
        raise


# Folders an unpacked dataset must have (the official archives all do): an archive without them
# (an empty zip, the wrong file behind a mirror URL) would otherwise replace a good dataset (--force).
REQUIRED_FOLDERS = {"cyclegan": ("trainA", "trainB"), "pix2pix": ("train",)}


def _check_unpacked_layout(folder: str, archive: str, collection: str) -> None:
    missing = [d for d in REQUIRED_FOLDERS[collection] if not os.path.isdir(os.path.join(folder, d))]
    if missing:
        have = sorted(os.listdir(folder))
        listing = ", ".join(have[:5]) + (", ..." if len(have) > 5 else "") if have else "nothing"
        raise DownloadError(f"{archive} holds no {collection} dataset: no {' or '.join(d + '/' for d in missing)} "
                            f"folder (it has {listing}); nothing was installed")


def _extraction_error(archive: str, member: str, e: OSError) -> Exception:
    """An archive whose entries cannot be files here (a file and a folder of one name, an empty or
    over-long name) is the archive's fault: said with its entry, not the temporary path."""
    if e.errno in (errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EEXIST, errno.EINVAL, errno.ENOENT):
        return DownloadError(f"{archive}: cannot unpack entry {member!r}: {e.strerror}")
    return e


def _extract(zip_path: str, root: str, name: str, collection: str = "cyclegan") -> str:
    target = os.path.join(root, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}.extract-", dir=root)
    try:
        if zip_path.endswith(".tar.gz.part"):
            _extract_tar(zip_path, tmp)
        else:
            if _zip_entry_count(zip_path, MAX_MEMBERS) > MAX_MEMBERS:  # before zipfile holds an object per entry
                raise DownloadError(f"{zip_path}: more than {MAX_MEMBERS:,} entries; refusing to extract it")
            try:
                with zipfile.ZipFile(zip_path) as zf:
                    for info in _safe_members(zf, zip_path):
                        # Ignore macOS metadata that would become fake (corrupt) images.
                        if info.filename.startswith("__MACOSX/"):
                            continue
                        try:
                            zf.extract(info, tmp)
                        except OSError as e:
                            raise _extraction_error(zip_path, info.filename, e) from None
            except zipfile.BadZipFile as e:
                raise DownloadError(f"{zip_path} is not a valid zip file: {e}") from None
        entries = [e for e in os.listdir(tmp) if e != "__MACOSX"]
        # The official zips hold one top-level folder <name>/; accept any single folder, or a flat zip.
        src = (
            os.path.join(tmp, entries[0])
            if len(entries) == 1 and os.path.isdir(os.path.join(tmp, entries[0]))
            else tmp
        )
        _check_unpacked_layout(src, zip_path, collection)
        replace_dir(src, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def replace_dir(src: str, target: str) -> None:
    """Move folder ``src`` to ``target`` (same file system); an existing ``target`` (``--force``)
    goes only once ``src`` is complete, so a failure before this point loses nothing."""
    root, name = os.path.split(target)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(src, 0o777 & ~mask)  # a mkdtemp folder is 0700: the folder gets the mode any other would
    old = None
    if os.path.isdir(target):
        if os.listdir(target):
            old = tempfile.mkdtemp(prefix=f".{name}.replaced-", dir=root)
            os.replace(target, os.path.join(old, name))
        else:
            os.rmdir(target)
    os.replace(src, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_existing_layout(target: str, collection: str) -> None:
    """Skipping an existing folder is only right when it holds this collection's layout
    (``facades`` and ``maps`` exist as both an unpaired and a paired dataset)."""
    have = set(os.listdir(target))
    unpaired, paired = bool(have & {"trainA", "trainB"}), "train" in have
    if collection == "pix2pix" and unpaired and not paired:
        raise FileExistsError(
            f"{target!r} holds the unpaired CycleGAN layout (trainA/ trainB/), not pix2pix pairs (train/): "
            "use another --root, or --force to replace it"
        )
    if collection == "cyclegan" and paired and not unpaired:
        raise FileExistsError(
            f"{target!r} holds the paired pix2pix layout (train/), not the CycleGAN one (trainA/ trainB/): "
            "use another --root, or --force to replace it"
        )


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
    collection: str | None = None,
) -> str:
    """Download, verify and unpack dataset ``name`` into ``<root>/<name>``; returns that path.

    An existing non-empty ``<root>/<name>`` is kept as is unless ``force`` (an error when it has
    the other collection's layout); ``force`` replaces it only once the new one is unpacked. ``url``: base URL or a full archive URL (see module
    docstring); ``sha256``: expected hex digest of the archive; ``collection``: ``"cyclegan"``
    (zip, ``trainA/ trainB/ ...``) or ``"pix2pix"`` (tar.gz, ``train/ val/ ...`` of A|B pairs),
    default ``pix2pix`` only for the names only pix2pix has. A failed or dropped connection is
    retried ``retries`` times (waiting ``backoff * 2**k`` s), resuming.
    """
    collection = dataset_collection(name, collection)
    zip_url = dataset_url(name, url, collection)
    _check_name(name, full_url=zip_url == url, collection=collection)
    check_sha256_arg(sha256)
    return download_folder(
        root, name, lambda target: _existing_dataset(target, collection, force),
        lambda root: _download_and_extract(zip_url, root, name, sha256, progress, retries, timeout, backoff,
                                           collection),
    )


def check_sha256_arg(sha256: str | None) -> None:
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise ValueError(f"--sha256 must be 64 hex digits, got {sha256!r}")


def download_folder(root: str, folder: str, existing, make) -> str:
    """``<root>/<folder>``: kept when ``existing(target)`` says it is already there (asked again
    under the download lock: another download may have finished meanwhile), else made by
    ``make(root)``. Returns the folder's absolute path."""
    root = os.path.abspath(os.fspath(root))
    target = os.path.join(root, folder)
    if existing(target):
        return target
    created = []  # the folders makedirs is about to create, deepest first
    d = root
    while not os.path.lexists(d) and os.path.dirname(d) != d:
        created.append(d)
        d = os.path.dirname(d)
    os.makedirs(root, exist_ok=True)
    try:
        with download_lock(root, folder):
            if not existing(target):
                make(root)
    except BaseException:
        # A failed first download (no server, a bad file) leaves no empty folders behind; a
        # resumable .part keeps its folder (rmdir removes only empty ones).
        for d in created:
            try:
                os.rmdir(d)
            except OSError:
                break
        raise
    return target


def _existing_dataset(target: str, collection: str, force: bool) -> bool:
    """Whether ``target`` already holds the dataset (kept unless ``force``: replaced only once
    the new one is unpacked, so a failed download loses nothing)."""
    if os.path.exists(target) and not os.path.isdir(target):
        raise FileExistsError(f"{target!r} exists and is not a directory")
    if force or not (os.path.isdir(target) and os.listdir(target)):
        return False
    _check_existing_layout(target, collection)
    logger.info("%s already exists; skipping download", target)
    return True


@contextlib.contextmanager
def download_lock(root: str, name: str):
    """One download of ``name`` into ``root`` at a time: two would append to one ``.part``."""
    import fcntl

    path = os.path.join(root, f".{name}.download.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DownloadError(f"another fastcgan-download is writing {name} into {root} ({path} is locked)") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino  # not a lock file unlinked by its last holder
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        os.close(fd)


class UnverifiedDownloadWarning(UserWarning):
    """A download that no checksum could verify (logged too; the CLI shows the log line only)."""


def fetch_verified(
    url: str, part: str, sha256: str | None, progress: bool, retries: int, timeout: float, backoff: float,
    max_bytes: int | None = None,
) -> None:
    """Download ``url`` into ``part`` (resumable, see :func:`_fetch`) and check it against
    ``sha256``, else ``<url>.sha256`` when published, else warn that it is unverified. A mismatch
    deletes the download."""
    try:
        _fetch(url, part, progress, retries, timeout, backoff, max_bytes)
    except (TooLargeError, DiskFullError):
        discard_download(part)  # whatever arrived is not worth resuming (or keeping on a full disk)
        raise
    expected = sha256.lower() if sha256 else _published_sha256(url, timeout)
    if expected is None:
        msg = f"{url}: no checksum given (--sha256) or published ({url}.sha256); download is unverified"
        logger.warning(msg)
        warnings.warn(msg, UnverifiedDownloadWarning, stacklevel=3)
    else:
        actual = _sha256(part)
        if actual != expected:
            discard_download(part)
            raise ChecksumError(f"{url}: SHA-256 mismatch (expected {expected}, got {actual}); download deleted")


def _download_and_extract(zip_url, root, name, sha256, progress, retries, timeout, backoff, collection) -> None:
    ext = _archive_ext(zip_url)
    part = os.path.join(root, f"{name}{'.zip' if ext == '.zip' else '.tar.gz'}.part")
    fetch_verified(zip_url, part, sha256, progress, retries, timeout, backoff, max_bytes=MAX_DATASET_BYTES)
    try:
        _extract(part, root, name, collection)
    except DownloadError:
        discard_download(part)  # a corrupt or hostile archive is not worth resuming
        raise
    discard_download(part)


@interruptible("fastcgan-download")
def main(argv: list[str] | None = None) -> int:
    from fastcgan.models import pretrained

    ap = Parser(
        prog="fastcgan-download",
        description="Download an official CycleGAN or pix2pix dataset into <root>/<name>, or (--pretrained) "
        "a released generator into <root>/<name>_pretrained, ready for fastcgan-translate / -export / -eval.",
        epilog="CycleGAN datasets: " + ", ".join(CYCLEGAN_DATASETS) + "; pix2pix datasets (paired, "
        "--pix2pix for facades and maps): " + ", ".join(PIX2PIX_DATASETS) + ". Pretrained CycleGAN generators: "
        + ", ".join(pretrained.PRETRAINED_CYCLEGAN) + "; pix2pix (--pix2pix for sat2map, map2sat, "
        "facades_label2photo): " + ", ".join(pretrained.PRETRAINED_PIX2PIX) + "; CUT (one archive, read for "
        "the named model): " + ", ".join(pretrained.PRETRAINED_CUT) + ".",
    )
    ap.add_argument("name", nargs="?", help="dataset (or with --pretrained, model) name (see below)")
    ap.add_argument(
        "--pretrained",
        action="store_true",
        help="NAME is a released generator: <root>/<name>_pretrained/ gets the official latest_net_G.pth "
        "and generator_AtoB.safetensors (default root: checkpoints, as the official script)",
    )
    ap.add_argument("--root", default=None, help="parent folder (default: datasets; checkpoints with --pretrained)")
    ap.add_argument(
        "--url",
        default=None,
        help=f"base URL, or a full .zip / .tar.gz (--pretrained: .pth; CUT models: .tar) URL "
        f"(default: ${ENV_URL} or {DEFAULT_BASE_URL})",
    )
    ap.add_argument("--sha256", default=None, help="expected SHA-256 of the archive (or .pth; CUT: the .tar)")
    ap.add_argument(
        "--pix2pix",
        action="store_true",
        help="the paired pix2pix dataset (or pix2pix model) of this name (implied for the names only pix2pix has)",
    )
    ap.add_argument("--force", action="store_true", help="replace an existing dataset (or model) folder")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--list", action="store_true", help="print the dataset (--pretrained: model) names and exit")
    a = ap.parse_args(argv)
    if a.list:
        cyclegan, pix2pix = (
            (pretrained.PRETRAINED_CYCLEGAN, pretrained.PRETRAINED_PIX2PIX)
            if a.pretrained
            else (CYCLEGAN_DATASETS, PIX2PIX_DATASETS)
        )
        print("\n".join(cyclegan))
        print("\n".join(f"{n} (pix2pix)" for n in pix2pix))
        if a.pretrained:
            print("\n".join(f"{n} (CUT)" for n in pretrained.PRETRAINED_CUT))
        return 0
    if not a.name:
        ap.error("NAME is required (or --list)")
    if a.root is not None and not a.root:  # an unset shell variable: never the default folder instead
        ap.error("--root '': name a folder")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    warnings.filterwarnings("ignore", category=UnverifiedDownloadWarning)  # its log line says it once
    fetch = pretrained.download_pretrained if a.pretrained else download_dataset
    from fastcgan.fileio import output_folder_problem

    root = a.root or ("checkpoints" if a.pretrained else "datasets")
    why = output_folder_problem(root, f"--root {root}")
    if why:  # before anything is downloaded
        print(f"fastcgan-download: error: {why}", file=sys.stderr)
        return 2
    both = (set(pretrained.PRETRAINED_CYCLEGAN) & set(pretrained.PRETRAINED_PIX2PIX) if a.pretrained
            else set(CYCLEGAN_DATASETS) & set(PIX2PIX_DATASETS))
    if a.name in both and not a.pix2pix:  # the official scripts are per collection: say which one this is
        print(f"fastcgan-download: {a.name} is a CycleGAN and a pix2pix {'model' if a.pretrained else 'dataset'}: "
              "fetching the CycleGAN one (--pix2pix for the other)", file=sys.stderr)
    try:
        path = fetch(
            a.name,
            root,
            url=a.url,
            sha256=a.sha256,
            progress=not a.no_progress,
            force=a.force,
            collection="pix2pix" if a.pix2pix else None,
        )
    except (ValueError, OSError, DownloadError) as e:
        print(f"fastcgan-download: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    # Run as the package's module: ``python -m`` makes this file ``__main__``, a second copy whose
    # DownloadError is not the class fastcgan.models.pretrained raises (a traceback, not exit 2).
    from fastcgan.data.download import main as _package_main

    sys.exit(_package_main())
