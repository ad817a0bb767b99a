"""Manifests for artifacts that hold code, and the check every loader makes before running one.

An AOTInductor package (``.pt2``) contains a compiled shared library, and a TensorRT engine
(``.engine``/``.trt``/``.plan``) is deserialized by native code (and may carry plugins): loading
either runs native code from the file. ONNX models and ``.safetensors`` generators are data only
and always load.

``fastcgan-export`` (through :func:`fastcgan.deploy.export_aoti` / :func:`build_engine`) writes
``<artifact>.manifest.json`` beside each code artifact: the artifact's sha256 and size, the
fastcgan and torch versions, the generator's arch, channels, shapes and dtype. A loader runs the
file only when

* its manifest is present and the file's sha256 matches (``verified``), or
* the caller said so explicitly: ``trust_artifact=True`` / ``--trust-artifact`` (``trusted``; a
  warning names what was not verified).

Otherwise :class:`UntrustedArtifactError` (an :class:`ArtifactError`) is raised before a single
byte of the file reaches a loader. The bytes that were hashed are the bytes that are loaded: an
AOTInductor package is copied into a private folder while it is hashed and loaded from there,
and a TensorRT engine is deserialized from the in-memory bytes that were hashed.

A manifest proves that the file is the one fastcgan-export wrote beside it (a file swapped,
edited, truncated or copied without its manifest is refused); it is not a signature. Whoever can
rewrite both files can make them agree: take code artifacts only from sources you trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from typing import Any

from fastcgan.deploy._common import ArtifactError, GeneratorSpec
from fastcgan.fileio import read_json

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "fastcgan.artifact-manifest"
MANIFEST_VERSION = 1
CODE_KINDS = ("aoti", "engine")
_CHUNK = 1 << 20


class UntrustedArtifactError(ArtifactError):
    """An artifact that holds code and has no manifest that verifies; it was not loaded."""


def manifest_path(path: str) -> str:
    return os.fspath(path) + MANIFEST_SUFFIX


def sha256_file(path: str) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a file."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def write_manifest(path: str, kind: str, spec: GeneratorSpec | None = None, **extra: Any) -> str:
    """Write ``<path>.manifest.json`` for the artifact at ``path`` (atomically); returns its path."""
    import torch

    import fastcgan
    from fastcgan.fileio import atomic_write

    digest, size = sha256_file(path)
    m: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "artifact": os.path.basename(path),
        "kind": kind,
        "holds_code": kind in CODE_KINDS,
        "sha256": digest,
        "bytes": size,
        "fastcgan_version": getattr(fastcgan, "__version__", "unknown"),
        "torch_version": torch.__version__,
    }
    if spec is not None:
        m.update(arch=spec.arch, direction=spec.direction, input_nc=spec.input_nc, output_nc=spec.output_nc,
                 size_multiple=spec.size_multiple, min_size=spec.min_size, dtype=spec.dtype,
                 static_hw=list(spec.static_hw) if spec.static_hw else None,
                 shapes=("static" if spec.static_hw else "dynamic batch/H/W"))
    m.update(extra)
    out = manifest_path(path)
    atomic_write(out, (json.dumps(m, indent=1, sort_keys=True) + "\n").encode())
    return out


_KIND_NAMES = {"aoti": "an AOTInductor package", "engine": "a TensorRT engine"}


def read_manifest(path: str, kind: str) -> dict:
    """The manifest of ``path``, an artifact of ``kind``; :class:`UntrustedArtifactError` when
    absent, unreadable, of a format version this fastcgan does not know, or of another kind."""
    mp = manifest_path(path)
    if not os.path.isfile(mp):
        raise UntrustedArtifactError(path, _no_manifest(path))
    try:
        m = read_json(mp)
    except (OSError, ValueError) as e:
        raise UntrustedArtifactError(path, f"unreadable manifest {os.path.basename(mp)} ({e})") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("sha256"), str):
        raise UntrustedArtifactError(path, f"{os.path.basename(mp)} is not a fastcgan artifact manifest")
    version = m.get("format_version")
    if type(version) is not int or not 1 <= version <= MANIFEST_VERSION:
        newer = " (written by a newer fastcgan?)" if type(version) is int and version > MANIFEST_VERSION else ""
        raise UntrustedArtifactError(path, f"{os.path.basename(mp)} has format version {version!r}, not one this "
                                     f"fastcgan reads (1 to {MANIFEST_VERSION}){newer}")
    found = m.get("kind")
    if found != kind:  # a manifest vouches for the file as what it was exported as, nothing else
        what = _KIND_NAMES[found] if isinstance(found, str) and found in _KIND_NAMES else f"kind {found!r}"
        raise UntrustedArtifactError(path, f"{os.path.basename(mp)} describes {what}, not {_KIND_NAMES[kind]}")
    return m


def _no_manifest(path: str) -> str:
    """Why ``path`` has no manifest to read: missing, or not a regular file (a FIFO, a folder)."""
    mp = manifest_path(path)
    if os.path.lexists(mp):
        return f"no manifest ({os.path.basename(mp)} is not a regular file)"
    return f"no manifest ({os.path.basename(mp)} is missing)"


def _trust_flag(trust) -> bool:
    """``trust_artifact`` as given: a bool, nothing else -- a string such as ``"false"`` (an
    environment variable passed straight in) is truthy and would run the file's code."""
    if not isinstance(trust, bool):
        raise TypeError(f"trust_artifact must be True or False, got {trust!r} ({type(trust).__name__})")
    return trust


def _refusal(path: str, kind: str, why: str) -> UntrustedArtifactError:
    what = "an AOTInductor package (.pt2) holds a compiled shared library" if kind == "aoti" else \
        "a TensorRT engine is deserialized by native code (and may carry plugins)"
    return UntrustedArtifactError(
        path, f"refused to load: {why}. {what[0].upper() + what[1:]} that would run on loading. "
        "Re-export it with fastcgan-export (which writes the manifest), or, if you trust where the file "
        "came from, pass --trust-artifact (trust_artifact=True)"
    )


def _decide(path: str, kind: str, digest: str, size: int, trust: bool) -> str:
    """'verified ...' or 'trusted ...' for a file whose bytes hash to ``digest``; raises otherwise."""
    try:
        m = read_manifest(path, kind)
        if m.get("bytes") not in (None, size):
            raise UntrustedArtifactError(path, f"its size ({size} bytes) differs from the manifest's "
                                         f"({m.get('bytes')}): the file was modified or replaced after export")
        if m["sha256"].lower() != digest:
            raise UntrustedArtifactError(
                path, f"sha256 {digest[:16]}... differs from the manifest's {m['sha256'][:16]}... (the file "
                "was modified or replaced after export)"
            )
    except UntrustedArtifactError as e:
        if not trust:
            raise _refusal(path, kind, e.reason) from None
        note = f"trusted explicitly (trust_artifact / --trust-artifact) although {e.reason}"
        warnings.warn(f"{path}: loading a code artifact without a verified manifest: {e.reason} "
                      "(--trust-artifact given)", stacklevel=3)
        return note
    return f"verified: sha256 matches {os.path.basename(manifest_path(path))}"


def check_artifact(path: str, kind: str, trust: bool = False) -> str:
    """The trust note for ``path`` (hashing it in place), or :class:`UntrustedArtifactError`.
    A first gate for callers that fail early; the loaders themselves check again the bytes they
    load (:func:`verified_copy`, :func:`verified_bytes`)."""
    trust = _trust_flag(trust)
    if not os.path.isfile(path):
        raise ArtifactError(path, "no such file")
    if not trust and not os.path.isfile(manifest_path(path)):
        raise _refusal(path, kind, _no_manifest(path))
    digest, size = sha256_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loader warns once, when it loads
        return _decide(path, kind, digest, size, trust)


def verified_copy(path: str, kind: str, trust: bool = False) -> tuple[str, str, tempfile.TemporaryDirectory]:
    """(private copy of ``path``, trust note, the folder holding it): the file is copied into a
    new private folder while it is hashed, and the hash of the copy is checked, so what is then
    loaded from the copy is exactly what was verified. Raises :class:`UntrustedArtifactError`
    (nothing loaded) unless the manifest verifies or ``trust``."""
    trust = _trust_flag(trust)
    if not os.path.isfile(path):
        raise ArtifactError(path, "no such file")
    if not trust and not os.path.isfile(manifest_path(path)):
        raise _refusal(path, kind, _no_manifest(path))
    tmp = tempfile.TemporaryDirectory(prefix="fastcgan-verified-")
    os.chmod(tmp.name, 0o700)
    dst = os.path.join(tmp.name, os.path.basename(path))
    h = hashlib.sha256()
    n = 0
    try:
        with open(path, "rb") as src, open(dst, "wb") as out:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
                n += len(chunk)
        note = _decide(path, kind, h.hexdigest(), n, trust)
    except BaseException:
        tmp.cleanup()
        raise
    return dst, note, tmp


def verified_bytes(path: str, kind: str, trust: bool = False) -> tuple[bytes, str]:
    """(content of ``path``, trust note), checked against its manifest as in :func:`verified_copy`."""
    trust = _trust_flag(trust)
    if not os.path.isfile(path):
        raise ArtifactError(path, "no such file")
    if not trust and not os.path.isfile(manifest_path(path)):
        raise _refusal(path, kind, _no_manifest(path))
    with open(path, "rb") as f:
        blob = f.read()
    return blob, _decide(path, kind, hashlib.sha256(blob).hexdigest(), len(blob), trust)


def install(src: str, dst: str, replace: bool = True) -> None:
    """Move a freshly built artifact into place atomically (same folder: rename; else copy + rename).
    ``replace=False`` never replaces an existing ``dst`` (:class:`fastcgan.fileio.OutputExistsError`)."""
    from fastcgan.fileio import OutputExistsError, atomic_writer, move_into_place

    try:
        move_into_place(src, dst, replace)
        return
    except OutputExistsError:
        raise
    except OSError:
        pass
    with atomic_writer(dst, replace) as out, open(src, "rb") as f:
        shutil.copyfileobj(f, out, _CHUNK)
