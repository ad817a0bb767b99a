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

from fastcgan.fileio import atomic_write, remove_stale_temporaries
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


class GeneratorIntegrityError(ValueError):
    """A generator file whose tensors do not match the digests stored in it (corrupted or modified)."""


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 (hex) of a tensor's raw bytes in row-major order, as safetensors stores them."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return hashlib.sha256(b"").hexdigest()
    return hashlib.sha256(t.view(torch.uint8).numpy().data).hexdigest()


_ZIP_LOCAL, _ZIP_CENTRAL, _ZIP_END, _ZIP64_END, _ZIP64_LOCATOR = (
    b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07")


# The pickle of a torch.save archive holds the structure, not the tensor data: 82 KB for a training
# checkpoint, 3 KB for an official generator. The weights_only unpickler still builds whatever
# containers it describes, ~230 bytes of memory per byte of pickle (a 20 MB one took 5 GB).
MAX_PICKLE_BYTES = 4 << 20


def torch_archive_problem(path: str) -> Optional[str]:
    """Why ``torch.load`` must not read ``path``, or None. A ``torch.save`` file is a zip archive of
    stored (uncompressed) members, but ``torch.load`` also inflates deflated ones, in memory, as it
    reads: a 5 KB member can claim 4 MB, so a checkpoint of a few MB could ask for GBs before any
    shape or digest is checked. This reads the central directory as torch's zip reader (miniz) finds
    it -- the last end record, the ZIP64 record its locator points to, the directory that record
    points to -- and asks of every member, there and in its local header, that it be stored. Anything
    torch.save never writes (a gap before the directory, a second directory, a comment, multi-disk
    records) is refused rather than interpreted: zip readers disagree about such files. A file that
    does not start as a zip is the legacy format (read as it is)."""
    import struct

    def bad(why: str) -> str:
        return f"not an archive torch.save writes ({why})"

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            if fh.read(4) != _ZIP_LOCAL:
                return None
            if size < 22 + 20 + 56:
                return bad("truncated")
            fh.seek(size - 22)
            end = fh.read(22)
            if end[:4] != _ZIP_END:
                return bad("no end record at its end (trailing bytes or a comment)")
            disk, cd_disk, n_here, n_total, cd_size, cd_off, comment = struct.unpack("<4x4H2LH", end)
            if disk or cd_disk or comment or n_here != n_total:
                return bad("multi-disk or commented end record")
            zip64_at = None
            fh.seek(size - 22 - 20)
            loc = fh.read(20)
            if loc[:4] == _ZIP64_LOCATOR:
                loc_disk, zip64_at, disks = struct.unpack("<4xLQL", loc)
                if loc_disk or disks != 1 or zip64_at != size - 22 - 20 - 56:
                    return bad("its ZIP64 locator points elsewhere than the record before it")
                fh.seek(zip64_at)
                rec = fh.read(56)
                if rec[:4] != _ZIP64_END:
                    return bad("no ZIP64 end record where its locator points")
                rec_size, _, _, disk, cd_disk, n_here, n_total, cd_size, cd_off = struct.unpack("<4xQ2H2L4Q", rec)
                if rec_size != 44 or disk or cd_disk or n_here != n_total:
                    return bad("multi-disk or extended ZIP64 end record")
            cd_end = zip64_at if zip64_at is not None else size - 22
            if cd_off + cd_size != cd_end:
                return bad("its central directory does not end where its end record begins")
            if n_total > (cd_size // 46):
                return bad("more members than its central directory holds")
            fh.seek(cd_off)
            directory = fh.read(cd_size)
            pos, locals_ = 0, []
            for _ in range(n_total):
                entry = directory[pos:pos + 46]
                if len(entry) < 46 or entry[:4] != _ZIP_CENTRAL:
                    return bad("a malformed central directory")
                method, = struct.unpack("<H", entry[10:12])
                stored_size, = struct.unpack("<L", entry[24:28])
                name_len, extra_len, note_len = struct.unpack("<3H", entry[28:34])
                local_off, = struct.unpack("<L", entry[42:46])
                name = directory[pos + 46:pos + 46 + name_len].decode("utf-8", "replace")
                if method != 0:
                    return bad(f"compressed member {name!r}, which torch.load would inflate in memory")
                if name.endswith("/data.pkl") and stored_size > MAX_PICKLE_BYTES:
                    return bad(f"its structure {name!r} is {stored_size:,} bytes, over {MAX_PICKLE_BYTES:,} (a "
                               "checkpoint's is ~100 KB); its objects would be built unchecked")
                locals_.append((local_off, name))
                pos += 46 + name_len + extra_len + note_len
            if pos != cd_size:
                return bad("its central directory holds more than its members")
            for local_off, name in locals_:  # (ZIP64 local offsets live in the extra field: torch
                if local_off == 0xFFFFFFFF:  # writes them only past 4 GiB; their headers go unchecked)
                    continue
                fh.seek(local_off)
                head = fh.read(30)
                if len(head) < 30 or head[:4] != _ZIP_LOCAL or struct.unpack("<H", head[8:10])[0] != 0:
                    return bad(f"member {name!r} has no stored local header")
    except OSError as e:
        return f"cannot be read: {e}"
    return None


def check_torch_file(path: str) -> None:
    """ValueError naming ``path`` when ``torch.load`` must not read it (:func:`torch_archive_problem`)."""
    why = torch_archive_problem(path)
    if why:
        raise ValueError(f"{path}: {why}: refused before torch.load reads it")


# What a saved network, optimizer or RNG state holds; anything else (complex, quantized, float8,
# sparse, nested or meta tensors) no fastcgan or official file has, and the checks below assume dense.
PLAIN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
                torch.int16, torch.int32, torch.int64, torch.bool)


def foreign_tensors(tensors) -> list[str]:
    """Descriptions of the tensors in ``tensors`` that are not dense, strided CPU tensors of a
    PLAIN_DTYPES dtype."""
    out = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and not (t.layout == torch.strided and t.device.type == "cpu"
                                                and not t.is_quantized and not t.is_nested
                                                and t.dtype in PLAIN_DTYPES):
            out.append(f"{t.dtype} {str(t.layout).replace('torch.', '')} on {t.device.type}")
    return out


def unbacked_tensor_bytes(tensors) -> int:
    """How many bytes ``tensors`` claim beyond the storage that holds them (0 for any saved state
    dict). ``torch.save`` keeps views as they are: a tensor expanded with stride 0 from one element
    costs bytes in the file but claims its full shape, and the network built to receive it would be
    allocated at that size; checked before anything is built from the shapes."""
    claimed, held = 0, {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            claimed += t.numel() * t.element_size()
            st = t.untyped_storage()
            held[st.data_ptr(), st.device.type] = st.nbytes()
    return max(0, claimed - sum(held.values()))


def describe_load_error(e: BaseException) -> str:
    """The cause of a failed ``torch.load(..., weights_only=True)``, without PyTorch's advice to
    retry with ``weights_only=False`` or to allow-list globals (both would run code from the file)."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n\s*\nCheck the documentation|$)", text, re.S)
    m = m or re.search(r"(Trying to load unsupported GLOBAL .*?)(?:\n\s*\nCheck the documentation|$)", text, re.S)
    if m:
        core = m.group(1)
        core = re.sub(r"\s*Please use `torch\.serialization\..*", "", core, flags=re.S)
        core = " ".join(core.split()) or "unsupported content"
        return (f"not a plain weights file: {core} (fastcgan loads tensors only and never unpickles "
                "code from a checkpoint)")
    if "weights_only" in text:
        keep = [ln for ln in re.split(r"(?<=[.!?])\s+|\n", text)
                if ln.strip() and "weights_only" not in ln and "trusted source" not in ln]
        text = " ".join(keep) or "not a plain weights file"
    if isinstance(e, (KeyError, EOFError)) or "magic number" in text:  # the legacy reader on another file
        return f"not a file torch.save writes ({type(e).__name__}: {text})"
    return f"{type(e).__name__}: {text}"


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


def save_generator(model: nn.Module, path: Union[str, os.PathLike], config: Optional[dict] = None) -> None:
    """Write ``model``'s state dict to ``path`` (``.safetensors``) with ``config`` (the
    ``build_generator`` arguments: arch, input_nc, output_nc, ngf, norm, use_dropout) in its
    metadata. ``config=None`` uses ``model.config``, set by :func:`build_generator`. The metadata
    also carries the sha256 of every tensor (``tensors_sha256``), verified by :func:`load_generator`.
    The file is written atomically (:func:`fastcgan.fileio.atomic_write`), so a crash never leaves
    a half-written generator; temporaries that killed writers left beside it are removed."""
    path = os.fspath(path)
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper saves its module's keys
    if config is None:
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError(f"save_generator({path}): pass config= (model was not built by build_generator)")
    config = _check_config(config, f"save_generator({path})")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    digests = {k: tensor_sha256(v) for k, v in state.items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(config, sort_keys=True),
            DIGEST_KEY: json.dumps(digests, sort_keys=True)}
    remove_stale_generator_temporaries(os.path.dirname(os.path.abspath(path)))
    atomic_write(path, save_bytes(state, metadata=meta))


def remove_stale_generator_temporaries(folder: Union[str, os.PathLike]) -> list[str]:
    """Delete temporaries that killed writers left in ``folder``: the current
    ``.<name>.<pid>.tmp`` files (:func:`fastcgan.fileio.remove_stale_temporaries`) and the
    ``<name>.safetensors.tmp.<pid>`` files of the writer before it -- those of processes that no
    longer run. Returns the paths removed."""
    folder = os.fspath(folder)
    return remove_stale_temporaries(folder) + remove_stale_temporaries(folder, r".+\.safetensors\.tmp\.(\d+)")


def read_generator_config(path: Union[str, os.PathLike]) -> dict:
    """The ``build_generator`` arguments stored in a fastcgan generator file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"generator file not found: {path}")
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
        config = json.loads(meta["config"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: generator config metadata is not valid JSON: {e}") from e
    return _check_config(config, path)


def verify_tensor_digests(path: str, state: dict, meta: dict) -> bool:
    """Check ``state`` against the ``tensors_sha256`` metadata of ``path``. False when the file
    has no digests (written before they existed); :class:`GeneratorIntegrityError` naming the file
    and the first differing tensor on a mismatch."""
    raw = meta.get(DIGEST_KEY)
    if raw is None:
        return False
    try:
        digests = json.loads(raw)
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
        if not os.path.isfile(f):
            present = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
            raise FileNotFoundError(
                f"run directory {path} has no {generator_filename(direction)} (found {present})"
            )
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
