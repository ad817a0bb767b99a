"""Reading files made by ``torch.save`` -- training checkpoints, official ``.pth`` networks --
without trusting them. ``torch.load(weights_only=True)`` runs no code, but it still builds whatever
the file describes: deflated zip members are inflated in memory, and its unpickler builds ~230
bytes of objects per byte of pickle, and its list of allowed globals builds more than tensors.
:func:`load_torch_file` first checks the file's layout and walks its pickles (size, the globals
they name, what they hold), on the same open file it then reads; the checks on what was loaded
(:func:`foreign_tensors`, :func:`unbacked_tensor_bytes`) come after.
"""

from __future__ import annotations

import io
import os
import pickletools
import re
import struct
from typing import Any, BinaryIO, Optional, Union

import torch

__all__ = ["ALLOWED_GLOBALS", "MAX_PICKLE_BYTES", "PLAIN_DTYPES", "TorchFileRefused", "describe_load_error",
           "foreign_tensors", "load_torch_file", "torch_file_problem", "unbacked_tensor_bytes"]

_ZIP_LOCAL, _ZIP_CENTRAL, _ZIP_END, _ZIP64_END, _ZIP64_LOCATOR = (
    b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07")


# The pickles of a torch.save file hold the structure, not the tensor data: 82 KB for a training
# checkpoint, 3 KB for an official generator. The weights_only unpickler still builds whatever
# containers they describe, ~230 bytes of memory per byte of pickle (a 20 MB one took 5 GB).
MAX_PICKLE_BYTES = 4 << 20


class TorchFileRefused(ValueError):
    """A file ``torch.load`` is not allowed to read; the message names it and why."""


def load_torch_file(path: str, *, mmap: bool = False) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` of a file that passed
    :func:`torch_file_problem` (else :class:`TorchFileRefused`). The check and the load read one
    open file, so a file swapped in between is never read unchecked; with ``mmap`` torch maps a
    path, which on Linux is ``/proc/self/fd/N``: that same open file."""
    with open(path, "rb") as fh:
        why = torch_file_problem(fh)
        if why:
            raise TorchFileRefused(f"{path}: {why}: refused before torch.load reads it")
        fh.seek(0)
        legacy = fh.read(4) != _ZIP_LOCAL
        fh.seek(0)
        if legacy and mmap:
            raise TorchFileRefused(f"{path}: a legacy-format (pre-1.6) file; only the zip format torch.save "
                                   "writes since 1.6 can be memory-mapped")
        if not mmap:
            return torch.load(_Stream(fh) if legacy else fh, map_location="cpu", weights_only=True)
        same_file = f"/proc/self/fd/{fh.fileno()}"
        return torch.load(same_file if os.path.exists(same_file) else path, map_location="cpu",
                          weights_only=True, mmap=True)


class _Stream:
    """An open file without ``fileno``: ``torch.load`` then reads a legacy-format file as the stream
    it is and skips its probe for the pre-0.4 tar format first (which weights_only refuses anyway):
    tarfile's header parser is quadratic before Python 3.11.10 (CVE-2024-6232), and a file can be
    both a tar header and five valid pickles (160 KB took 15 s)."""

    def __init__(self, fh: BinaryIO):
        self._fh = fh

    def read(self, n: int = -1) -> bytes:
        return self._fh.read(n)

    def readline(self, n: int = -1) -> bytes:
        return self._fh.readline(n)

    def readinto(self, buf) -> int:
        return self._fh.readinto(buf)

    def seek(self, *args) -> int:
        return self._fh.seek(*args)

    def tell(self) -> int:
        return self._fh.tell()


def torch_file_problem(fh: Union[str, os.PathLike, BinaryIO]) -> Optional[str]:
    """Why ``torch.load`` must not read the file ``fh`` (a path or an open binary file), or None:
    a zip archive (:func:`_zip_problem`) or the legacy (pre-1.6) format (:func:`_legacy_problem`)."""
    if isinstance(fh, (str, os.PathLike)):
        try:
            with open(fh, "rb") as opened:
                return torch_file_problem(opened)
        except OSError as e:
            return f"cannot be read: {e}"
    try:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size == 0:
            return "an empty file"
        fh.seek(0)
        return _zip_problem(fh, size) if fh.read(4) == _ZIP_LOCAL else _legacy_problem(fh)
    except OSError as e:
        return f"cannot be read: {e}"


def _zip_problem(fh: BinaryIO, size: int) -> Optional[str]:
    """Why ``torch.load`` must not read the zip archive ``fh``, or None. A ``torch.save`` file is a
    zip archive of stored (uncompressed) members, but ``torch.load`` also inflates deflated ones, in
    memory, as it reads: a 5 KB member can claim 4 MB, so a checkpoint of a few MB could ask for GBs
    before any shape or digest is checked. This reads the central directory as torch's zip reader
    (miniz) finds it -- the last end record, the ZIP64 record its locator points to, the directory
    that record points to -- and asks of every member, there and in its local header, that it be
    stored. Anything torch.save never writes (a gap before the directory, a second directory, a
    comment, multi-disk records) is refused rather than interpreted: zip readers disagree about
    such files."""

    def bad(why: str) -> str:
        return f"not an archive torch.save writes ({why})"

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
        is_pickle = name.lower().endswith("data.pkl")  # miniz finds names case-insensitively
        if is_pickle and stored_size > MAX_PICKLE_BYTES:
            return bad(f"its structure {name!r} is {stored_size:,} bytes, over {MAX_PICKLE_BYTES:,} (a "
                       "checkpoint's is ~100 KB); its objects would be built unchecked")
        locals_.append((local_off, name, stored_size if is_pickle else None))
        pos += 46 + name_len + extra_len + note_len
    if pos != cd_size:
        return bad("its central directory holds more than its members")
    if len({name.lower() for _, name, _ in locals_}) != len(locals_):
        return bad("two members whose names differ only in case (torch's reader does not tell them apart)")
    for local_off, name, pickle_size in locals_:  # (ZIP64 local offsets live in the extra field:
        if local_off == 0xFFFFFFFF:  # torch writes them only past 4 GiB; their headers go unchecked)
            if pickle_size is not None:  # torch.save writes the structure first
                return bad(f"its structure {name!r} lies past 4 GiB")
            continue
        fh.seek(local_off)
        head = fh.read(30)
        if len(head) < 30 or head[:4] != _ZIP_LOCAL or struct.unpack("<H", head[8:10])[0] != 0:
            return bad(f"member {name!r} has no stored local header")
        if pickle_size is not None:  # the structure torch will unpickle: walked, nothing built
            fh.seek(local_off + 30 + sum(struct.unpack("<2H", head[26:30])))
            why = _pickle_problem(io.BytesIO(fh.read(pickle_size)))
            if why:
                return bad(why)
    return None


# The legacy format's first two pickles: torch.serialization's MAGIC_NUMBER and PROTOCOL_VERSION.
_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001
_INT_OPS = {"INT", "LONG", "BININT", "BININT1", "BININT2", "LONG1", "LONG4"}


def _legacy_problem(fh: BinaryIO) -> Optional[str]:
    """Why ``torch.load`` must not read ``fh`` as the legacy format, or None. That format is five
    pickles in a row -- the magic number, the protocol version, system info, the structure, the
    storage keys -- then the raw tensor data (whose sizes torch checks as it reads). Official
    releases from before PyTorch 1.6 are in it. The pickles are walked (:func:`_pickle_problem`)
    within the first MAX_PICKLE_BYTES of the file: a file whose first pickle is not the magic
    number is no torch file (torch would unpickle all of it before finding that out)."""
    fh.seek(0)
    head = io.BytesIO(fh.read(MAX_PICKLE_BYTES + 1))
    for i, expected in enumerate((_LEGACY_MAGIC, _LEGACY_PROTOCOL)):
        try:
            ints = [arg if op.name in _INT_OPS else None for op, arg, _ in pickletools.genops(head)
                    if op.name not in ("PROTO", "FRAME", "STOP")]
        except ValueError:  # an unknown opcode, or the bytes ran out before its STOP
            ints = None
        if ints != [expected]:
            return ("not a file torch.save writes (neither a zip archive nor a torch pickle)" if i == 0
                    else "not a file torch.save writes (an unknown legacy protocol version)")
    why = _pickle_problem(head, pickles=3)
    return f"not a file torch.save writes ({why})" if why else None


# The globals (GLOBAL opcodes) torch.save writes for a state dict, an optimizer state or a fastcgan
# checkpoint. torch's weights_only unpickler allows more, none of which these files hold:
# bytearray(N) (a 62-byte file asked for 2 GiB), a rebuild that converts a stride-0 view into a
# full tensor (1.8 KB -> 2 GiB), sets, bytes, complex, sparse, quantized, nested, subclasses.
_PLAIN_STORAGES = ("Float", "Double", "Half", "BFloat16", "Byte", "Char", "Short", "Int", "Long", "Bool")
ALLOWED_GLOBALS = frozenset(
    {"collections OrderedDict", "torch._utils _rebuild_tensor", "torch._utils _rebuild_tensor_v2",
     "torch._utils _rebuild_parameter"}
    | {f"{module} {kind}Storage" for module in ("torch", "torch.cuda") for kind in _PLAIN_STORAGES})
# Dict keys that all hash alike make every insert compare with every earlier key: 300k of them
# (3.9 MB) took 454 s. Such keys need ints of 2**32 and more, or floats (alone or inside tuples);
# a checkpoint holds ~300 ints below 2**32 (the Python RNG state), none above, and ~30 floats.
MAX_BIG_INTS, MAX_FLOATS = 1024, 10_000


def _pickle_problem(stream: BinaryIO, pickles: int = 1) -> Optional[str]:
    """Why the next ``pickles`` pickles of ``stream`` (a buffer of at most MAX_PICKLE_BYTES + 1
    bytes) must not be unpickled, or None. Walked opcode by opcode with ``pickletools.genops``
    (nothing is built): they must end within MAX_PICKLE_BYTES, name only ALLOWED_GLOBALS and hold
    at most MAX_BIG_INTS ints of 2**32 or more and MAX_FLOATS floats."""
    big = floats = 0
    try:
        for _ in range(pickles):
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "GLOBAL" and arg not in ALLOWED_GLOBALS:
                    return (f"its structure names {arg.replace(' ', '.')}, which no state dict or checkpoint "
                            "holds")
                big += op.name in _INT_OPS and abs(arg) >= 1 << 32
                floats += op.name in ("BINFLOAT", "FLOAT")
    except ValueError as e:  # an unknown opcode, or the bytes ran out before its STOP
        if stream.tell() > MAX_PICKLE_BYTES:
            return (f"its structure is over {MAX_PICKLE_BYTES:,} bytes (a checkpoint's is ~100 KB): its objects "
                    "would be built unchecked")
        return f"a malformed or truncated structure: {e}"
    if big > MAX_BIG_INTS or floats > MAX_FLOATS:
        return (f"its structure holds {big:,} integers of 2**32 or more and {floats:,} floats (at most "
                f"{MAX_BIG_INTS:,} and {MAX_FLOATS:,}: dict keys that hash alike would take minutes to insert)")
    return None


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


