"""The one way fastcgan writes a file: atomically, durably, and with errors that name the file.

    atomic_write("RUN/summary.json", json.dumps(s).encode())       # bytes or an iterable of bytes
    with atomic_writer("RUN/checkpoints/step_000000100.ckpt") as f:  # a binary file object
        torch.save(payload, f)

The data goes to a hidden temporary file in the destination folder (``.<name>.<pid>.tmp``),
is flushed and fsynced, renamed over the destination with ``os.replace`` (atomic on POSIX), and
the folder is fsynced so the rename itself survives a power cut. A crash at any point -- even
SIGKILL -- leaves either the old file or the complete new one, plus at most a temporary file
that :func:`remove_stale_temporaries` deletes later. A failed write (disk full, read-only
folder, quota) raises :class:`WriteError` naming the file and the cause; the previous file is
untouched and the partial temporary is removed.

Read back, JSON someone else may have written goes through :func:`parse_json` (text) or
:func:`read_json` (a file, at most :data:`MAX_JSON_BYTES`), whose every failure on bad content is a
``ValueError``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO, Union

__all__ = ["OutputExistsError", "WriteError", "atomic_write", "atomic_writer", "move_into_place",
           "output_folder_problem", "parse_json", "read_json", "remove_stale_temporaries", "temporary_name"]


def parse_json(text: Union[str, bytes]):
    """``json.loads`` whose failures on bad content are all ``ValueError``: a document nested deeper
    than Python's recursion limit (``'[' * 100000``: a manifest, a config, safetensors metadata)
    raised ``RecursionError``, which no caller's handler took, so its message named no file."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply to read") from None


# A manifest, a run's config.json, an engine's sidecar: a few KiB. A larger file is no such file,
# and reading it whole would take as much memory as it has bytes.
MAX_JSON_BYTES = 1 << 20


def read_json(path: str, limit: int = MAX_JSON_BYTES):
    """The JSON document in the file ``path``: :func:`parse_json` of at most ``limit`` bytes (a
    larger file is a ``ValueError`` before it is read; so is a FIFO or device, which ``open`` would
    wait on or read forever); ``OSError`` when it cannot be read."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"{path} is not a regular file")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit:,} bytes: not one of the small JSON files read here")
    return parse_json(data)


class WriteError(OSError):
    """A file could not be written; the message names it and the cause. The previous version of
    the file (if any) is intact."""

    def __str__(self) -> str:  # the message alone: no "[Errno 28] " (or "[Errno None] ") before it
        return self.strerror if len(self.args) == 2 and isinstance(self.strerror, str) else super().__str__()


class OutputExistsError(WriteError):
    """A write that must not replace (no ``--overwrite``) found its destination taken: another
    process wrote it after the command checked. The file there is left as it is."""


# link() fails with these where the file system has no hard links (FAT, some FUSE mounts).
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def move_into_place(src: str, dst: str, replace: bool = True) -> None:
    """Rename ``src`` to ``dst`` (same folder). ``replace=False`` never replaces an existing
    ``dst``, atomically: a hard link is refused by the kernel when the name exists, so two
    commands racing for one output cannot silently replace each other's file
    (:class:`OutputExistsError`). Without hard links, a check just before the rename."""
    if replace:
        os.replace(src, dst)
        return
    taken = OutputExistsError(errno.EEXIST, f"could not write {dst}: another process wrote it while this "
                              "command ran; left as it is (--overwrite replaces outputs)")
    try:
        os.link(src, dst)
    except FileExistsError:
        raise taken from None
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        if os.path.lexists(dst):
            raise taken from None
        os.replace(src, dst)
        return
    os.remove(src)


def temporary_name(path: str) -> str:
    """The hidden temporary beside ``path`` -- in the folder the kernel resolves (``link/..`` is the
    link target's parent, not the folder the text names), so the rename stays in one folder."""
    d, base = os.path.split(path)
    return os.path.join(os.path.realpath(d or os.curdir), f".{base}.{os.getpid()}.tmp")


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # platforms that cannot open folders; the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def describe_os_error(e: OSError) -> str:
    """A failed write's cause in words (a full disk, a quota), else the system's message."""
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return e.strerror or str(e)


def _free_space_hint(folder: str) -> str:
    """The likely cause of a write that failed without an errno: the disk is (nearly) full."""
    try:
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize
    except OSError:
        return "the write failed"
    if free < 64 * 2**20:
        return f"no space left on the device ({free / 2**20:.1f} MiB free)"
    return f"the write failed ({free / 2**30:.1f} GiB free)"


class _WriteRecorder:
    """A binary file that remembers the first ``OSError`` its ``write`` raised: torch.save's C++
    writer turns that error into a RuntimeError ("unexpected pos") that has lost the errno."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.error: OSError | None = None

    def write(self, b) -> int:
        try:
            return self._f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextlib.contextmanager
def atomic_writer(path: str, replace: bool = True) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces ``path`` atomically when the block exits
    without an exception (on an exception nothing changes and the exception propagates; an
    ``OSError`` from writing becomes :class:`WriteError`). ``replace=False``: an existing
    ``path`` is never replaced (:func:`move_into_place`)."""
    tmp = temporary_name(path)
    d = os.path.dirname(tmp)
    f = None
    try:
        os.makedirs(d, exist_ok=True)
        with open(tmp, "wb") as raw:
            f = _WriteRecorder(raw)
            yield f
            f.flush()
            os.fsync(f.fileno())
        move_into_place(tmp, path, replace)
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(e.errno, f"could not write {path}: {describe_os_error(e)} (previous file unchanged)") from e
    except RuntimeError as e:
        # torch.save's C++ writer reports a failed write (e.g. ENOSPC) as a RuntimeError
        # ("PytorchStreamWriter failed writing file ...: unexpected pos ...") with no errno.
        if "failed writing" not in str(e) and "unexpected pos" not in str(e):
            raise
        cause = f.error if f is not None else None
        why = describe_os_error(cause) if cause is not None else _free_space_hint(d)
        code = cause.errno if cause is not None else errno.EIO
        raise WriteError(code, f"could not write {path}: {why} (previous file unchanged)") from e
    finally:
        with contextlib.suppress(OSError):
            if os.path.exists(tmp):
                os.remove(tmp)
    _fsync_dir(d)


def atomic_write(path: str, data: Union[bytes, bytearray, memoryview, Iterable[bytes]], replace: bool = True) -> None:
    """Write ``data`` (bytes, or an iterable of byte chunks) to ``path`` atomically (``replace=False``:
    never over an existing file, :class:`OutputExistsError`)."""
    with atomic_writer(path, replace) as f:
        if isinstance(data, (bytes, bytearray, memoryview)):
            f.write(data)
        else:
            f.writelines(data)


# A temporary of this module: ``.<name>.<pid>.tmp`` (the pid is the group).
TEMPORARY_PATTERN = r"\..+\.(\d+)\.tmp"


def remove_stale_temporaries(folder: str, pattern: str = TEMPORARY_PATTERN, *, folders: bool = True) -> list[str]:
    """Delete the temporary files (or, with ``folders``, folders) that killed writers left in
    ``folder``: names matching ``pattern`` (a regex whose one group is the writer's pid) whose
    process no longer runs. Returns the paths removed. The default pattern takes any hidden
    ``.NAME.<pid>.tmp``: only for folders fastcgan owns (a run's ``checkpoints/``)."""
    import re

    if not os.path.isdir(folder):
        return []
    removed = []
    for n in os.listdir(folder):
        m = re.fullmatch(pattern, n)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        p = os.path.join(folder, n)
        if not folders and os.path.isdir(p):
            continue
        with contextlib.suppress(OSError):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.remove(p)
            removed.append(p)
    return removed


# What fastcgan adds to a file name it writes: a temporary's ".NAME.<pid>.tmp", a manifest's
# ".manifest.json", and both.
_NAME_HEADROOM = 32


def output_folder_problem(folder: str, what: str, names: Iterable[str] = ()) -> str | None:
    """Why the files ``names`` cannot be written in ``folder`` (made, with its missing parents,
    when absent), or None; ``what`` names the flag and path in the message. Every name to be made
    must fit the file system's limits (file names with room for a temporary's and a manifest's
    suffixes), and the nearest existing folder is tried by writing, syncing and removing a 4 KiB
    file in it: permission bits do not show a read-only mount, a full disk, /proc or /sys, and the
    write that found out would come only after all the work. The path is checked as written and
    as the kernel resolves it (``link/..`` is the link target's parent)."""
    names = list(names)
    for path in dict.fromkeys((os.path.abspath(folder), os.path.realpath(folder))):
        why = _folder_problem(path, what, names)
        if why:
            return why
    return None


def _folder_problem(folder: str, what: str, names: list[str]) -> str | None:
    parent, missing = folder, []
    while not os.path.lexists(parent):  # the folders makedirs would create: each under this one
        parent, name = os.path.split(parent)
        missing.append(name)
    if not os.path.isdir(parent):
        return f"{what}: {parent} is not a folder"
    name_max, path_max = 255, 4096
    with contextlib.suppress(OSError, ValueError, AttributeError):  # no pathconf (Windows), no limit
        name_max, path_max = os.pathconf(parent, "PC_NAME_MAX"), os.pathconf(parent, "PC_PATH_MAX")
    for name, room in [(n, 0) for n in missing] + [(n, _NAME_HEADROOM) for n in names]:
        if len(os.fsencode(name)) + room > name_max:
            return (f"{what}: the name {name[:24]}... is {len(os.fsencode(name))} bytes; this file system "
                    f"takes {name_max - room}" + (" (room is kept for a temporary's suffix)" if room else ""))
    longest = max([len(os.fsencode(os.path.join(folder, n))) + _NAME_HEADROOM for n in names]
                  + [len(os.fsencode(folder))])
    if longest > path_max:
        return f"{what}: the path is {longest} bytes with its files' names; this system takes {path_max}"
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastcgan-write-test-", dir=parent)
    except OSError as e:
        return f"{what}: cannot write in {parent} ({describe_os_error(e)})"
    try:
        os.write(fd, bytes(4096))
        os.fsync(fd)
        failed = None
    except OSError as e:
        failed = e
    finally:
        os.close(fd)
    try:
        os.unlink(probe)
    except OSError as e:
        return f"{what}: cannot remove files in {parent} ({describe_os_error(e)}; {probe} is left behind)"
    if failed is not None:
        return f"{what}: cannot write in {parent} ({describe_os_error(failed)})"
    return None


def path_inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or below it, symlinks resolved."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def file_identity(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file ``path`` names (links followed), or None when there is
    none: two paths with one identity are one file (hard links, symlinks, other spellings)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
