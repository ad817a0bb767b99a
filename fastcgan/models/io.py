"""Self-describing generator files: a ``.safetensors`` state dict whose metadata holds the
``build_generator`` arguments, so ``load_generator(path)`` needs nothing else.

Integrity: the metadata also holds ``tensors_sha256``, a JSON map from each tensor's name to the
sha256 of its raw bytes (the bytes safetensors stores, little-endian, row-major). Loading checks
every tensor against it, so one flipped bit in the weights is a :class:`GeneratorIntegrityError`
naming the file and the tensor, never a silently different model. Files written before digests
existed (no ``tensors_sha256``) still load. Writes are atomic (:mod:`fastcgan.fileio`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes
from torch import nn

from fastcgan.fileio import atomic_write, parse_json, remove_stale_temporaries
from fastcgan.models.generators import GENERATOR_ARCHS, build_generator

FORMAT = "fastcgan.generator"
FORMAT_VERSION = "1"
# Widest generator fastcgan builds (--ngf; the trainer's --ndf too): ResNet-9 at 512 has 0.7 G
# parameters, far above any published setting (64).
MAX_WIDTH = 512
CONFIG_KEYS = ("arch", "input_nc", "output_nc", "ngf", "norm", "use_dropout")
# Keys a config may hold besides CONFIG_KEYS (absent in older files: build_generator's default).
# bn_inference: eval-mode BatchNorm statistics, "running" or "per_image" (BN_INFERENCE_MODES);
# color_space: "lab" for a colorization generator (an L -> ab network inside a LabColorizer).
# antialias, antialias_up: the official CUT's anti-aliased resampling (ResNet generators).
OPTIONAL_CONFIG_KEYS = ("bn_inference", "color_space", "antialias", "antialias_up")
DIRECTIONS = ("AtoB", "BtoA")
DIGEST_KEY = "tensors_sha256"
# The file names a run directory gives its generators (the best-FID copy too): a file written
# before the metadata recorded its direction is still known by its name.
RUN_GENERATOR_NAME = re.compile(r"generator_(AtoB|BtoA)(?:_best)?\.safetensors")


class GeneratorIntegrityError(ValueError):
    """A generator file whose tensors do not match the digests stored in it (corrupted or modified)."""


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's raw bytes in row-major order, as safetensors stores them."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.view(torch.uint8).numpy().data).hexdigest()


def generator_filename(direction: str) -> str:
    """The file name a run directory uses for the generator of ``direction`` (AtoB / BtoA)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return f"generator_{direction}.safetensors"


def _check_config(config: Any, where: str) -> dict:
    if not isinstance(config, dict):
        raise ValueError(f"{where}: generator config must be a dict, got {type(config).__name__}")
    missing = [k for k in CONFIG_KEYS if k not in config]
    extra = [k for k in config if k not in CONFIG_KEYS and k not in OPTIONAL_CONFIG_KEYS]
    if missing or extra:
        raise ValueError(
            f"{where}: generator config needs exactly {CONFIG_KEYS} (optional: {OPTIONAL_CONFIG_KEYS}); "
            f"missing {missing}, unknown {extra}"
        )
    if config["arch"] not in GENERATOR_ARCHS:
        raise ValueError(f"{where}: unknown generator arch {config['arch']!r}; choose from {GENERATOR_ARCHS}")
    # The network is built from these numbers before any tensor is compared with it: a 216-byte
    # file claiming ngf 600 made the loader allocate 4.4 GB (ngf 3000: ~100 GB) before refusing it.
    for k, lo, hi in (("input_nc", 1, 4), ("output_nc", 1, 4), ("ngf", 1, MAX_WIDTH)):
        v = config[k]
        if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
            raise ValueError(f"{where}: generator config {k} must be an integer in [{lo}, {hi}], got {v!r}")
    for k in ("antialias", "antialias_up"):
        if k in config and not isinstance(config[k], bool):
            raise ValueError(f"{where}: generator config {k} must be true or false, got {config[k]!r}")
    return dict(config)


def save_generator(model: nn.Module, path: Union[str, os.PathLike], config: Optional[dict] = None,
                   direction: Optional[str] = None, pairs_direction: Optional[str] = None) -> None:
    """Write ``model``'s state dict to ``path`` (``.safetensors``) with ``config`` (the
    ``build_generator`` arguments: arch, input_nc, output_nc, ngf, norm, use_dropout) in its
    metadata. ``config=None`` uses ``model.config``, set by :func:`build_generator`. The metadata
    also carries the sha256 of every tensor (``tensors_sha256``), verified by :func:`load_generator`,
    and ``direction`` when given: which generator of its run this is (AtoB: ``G_AB``, A into B; a
    one-generator recipe's, pix2pix or CUT, is AtoB whichever way its data was read), and
    ``pairs_direction``: a pix2pix generator's ``--direction`` (BtoA: the right half of a pair is
    its input), so evaluating pairs with the file alone reads the right half.
    The file is written atomically (:func:`fastcgan.fileio.atomic_write`), so a crash never leaves
    a half-written generator; temporaries that killed writers left beside it are removed."""
    path = os.fspath(path)
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper saves its module's keys
    if config is None:
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError(f"save_generator({path}): pass config= (model was not built by build_generator)")
    config = _check_config(config, f"save_generator({path})")
    for name, value in (("direction", direction), ("pairs_direction", pairs_direction)):
        if value is not None and value not in DIRECTIONS:
            raise ValueError(f"save_generator({path}): {name} must be one of {DIRECTIONS}, got {value!r}")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    digests = {k: tensor_sha256(v) for k, v in state.items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(config, sort_keys=True),
            DIGEST_KEY: json.dumps(digests, sort_keys=True)}
    for name, value in (("direction", direction), ("pairs_direction", pairs_direction)):
        if value is not None:
            meta[name] = value
    remove_stale_generator_temporaries(path)
    atomic_write(path, save_bytes(state, metadata=meta))


def remove_stale_generator_temporaries(path: Union[str, os.PathLike]) -> list[str]:
    """Delete the temporaries that killed writers of ``path`` left beside it: its
    ``.<name>.<pid>.tmp`` (:func:`fastcgan.fileio.atomic_write`'s) and ``<name>.tmp.<pid>`` (the
    writer before it) files whose process no longer runs -- nothing else in that folder, which
    may be anyone's (a ``.notes.123.tmp`` of another program, or a folder, is not ours). Returns
    the paths removed."""
    import re

    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    own = re.escape(name)
    return (remove_stale_temporaries(folder, rf"\.{own}\.(\d+)\.tmp", folders=False)
            + remove_stale_temporaries(folder, rf"{own}\.tmp\.(\d+)", folders=False))


def read_generator_config(path: Union[str, os.PathLike]) -> dict:
    """The ``build_generator`` arguments stored in a fastcgan generator file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not a regular file" if os.path.exists(path)
                                else f"generator file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ValueError(f"{path} is not a readable .safetensors file: {e}") from e
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(
            f"{path} is a .safetensors file but not a fastcgan generator (no '{FORMAT}' metadata); "
            "official .pth checkpoints load with fastcgan.models.load_official_generator"
        )
    try:
        config = parse_json(meta["config"])
    except ValueError as e:
        raise ValueError(f"{path}: generator config metadata is not valid JSON: {e}") from e
    return _check_config(config, path)


def read_generator_direction(path: Union[str, os.PathLike]) -> Optional[str]:
    """Which generator of its run ``path`` holds (AtoB / BtoA, as :func:`save_generator`): its
    metadata's ``direction``, else its run-directory file name (``generator_BtoA.safetensors``),
    else None (unknown)."""
    path = os.fspath(path)
    direction = _direction_metadata(path, "direction")
    if direction is not None:
        return direction
    named = RUN_GENERATOR_NAME.fullmatch(os.path.basename(path))
    return named.group(1) if named else None


def read_pairs_direction(path: Union[str, os.PathLike]) -> Optional[str]:
    """A pix2pix generator file's ``--direction`` (which half of an A|B pair is its input), or None
    (another recipe's, or a file written before generators recorded it)."""
    return _direction_metadata(os.fspath(path), "pairs_direction")


def _direction_metadata(path: str, key: str) -> Optional[str]:
    read_generator_config(path)  # a fastcgan generator file, or a clear error
    with safe_open(path, framework="pt") as f:
        value = (f.metadata() or {}).get(key)
    if value is not None and value not in DIRECTIONS:
        raise ValueError(f"{path}: generator {key} metadata must be one of {DIRECTIONS}, got {value!r}")
    return value


def verify_tensor_digests(path: str, state: dict, meta: dict) -> bool:
    """Check ``state`` against the ``tensors_sha256`` metadata of ``path``. False when the file
    has no digests (written before they existed); :class:`GeneratorIntegrityError` naming the file
    and the first differing tensor on a mismatch."""
    raw = meta.get(DIGEST_KEY)
    if raw is None:
        return False
    try:
        digests = parse_json(raw)
        if not isinstance(digests, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise GeneratorIntegrityError(f"{path}: the {DIGEST_KEY} metadata is unreadable ({e})") from e
    missing = sorted(set(state) - set(digests))
    extra = sorted(set(digests) - set(state))
    if missing or extra:
        raise GeneratorIntegrityError(
            f"{path}: tensors and stored digests disagree (no digest for {missing[:4]}, digests without a "
            f"tensor {extra[:4]}): the file was modified after it was written"
        )
    for k in sorted(state):
        got = tensor_sha256(state[k])
        if got != digests[k]:
            raise GeneratorIntegrityError(
                f"{path}: tensor {k!r} does not match its stored sha256 (stored {str(digests[k])[:16]}..., "
                f"read {got[:16]}...): the file is corrupted or was modified; use another copy"
            )
    return True


def resolve_generator_path(path: Union[str, os.PathLike], direction: str = "AtoB") -> str:
    """``path`` itself if it is a file, else ``path/generator_<direction>.safetensors``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        f = os.path.join(path, generator_filename(direction))
        if os.path.lexists(f) and not os.path.isfile(f):  # a FIFO, a folder, a link to a device or to nowhere
            raise FileNotFoundError(f"run directory {path}: its {generator_filename(direction)} is not a regular file")
        if not os.path.isfile(f):
            present = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
            name = generator_filename(direction)
            runs = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n, name)))
            if present:
                hint = f"found {', '.join(present)}"
            elif os.path.basename(os.path.normpath(path)) == "checkpoints":
                run = os.path.dirname(os.path.normpath(path))
                hint = f"this is a run's checkpoints folder: give the run ({run}) or a .ckpt in it"
            elif runs:
                hint = f"it holds runs: give one of {', '.join(os.path.join(path, r) for r in runs[:5])}"
            else:
                hint = "no generator files in it"
            raise FileNotFoundError(f"run directory {path} has no {generator_filename(direction)} ({hint})")
        return f
    if not os.path.exists(path):
        raise FileNotFoundError(f"generator file or run directory not found: {path}")
    return path


def load_generator(
    path: Union[str, os.PathLike],
    direction: str = "AtoB",
    backend: str = "auto",
    map_location: Union[str, torch.device] = "cpu",
) -> nn.Module:
    """Build and load a generator from a fastcgan ``.safetensors`` file or a run directory
    (``generator_AtoB.safetensors`` / ``generator_BtoA.safetensors``), on ``map_location``, in
    eval mode."""
    file = resolve_generator_path(path, direction)
    config = read_generator_config(file)
    try:
        model = build_generator(**config, init_type=None, backend=backend)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: cannot build the stored generator config {config}: {e}") from e
    device = torch.device(map_location)
    state = {}
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                state[k] = f.get_tensor(k)
    except Exception as e:
        raise ValueError(f"{file}: cannot read the tensors ({type(e).__name__}: {e})") from e
    verify_tensor_digests(file, state, meta)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{file}: weights do not match the stored config {config}; missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}, shape mismatches {wrong[:6]}"
        )
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
