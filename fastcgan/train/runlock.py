"""One trainer per run directory: an OS lock held for the trainer's lifetime.

``RUN/.lock`` is locked with ``fcntl.flock`` (exclusive, non-blocking) and holds the owner's PID
for the error message. The kernel releases the lock when the process dies, however it dies, so
a killed trainer never blocks the next one (the stale PID in the file is just text). Under DDP
process 0 holds it: the other processes never write the run directory. The lock is taken before
anything else is written (even the built-in synthetic data); a run that then fails before writing
anything removes the folder it created for the lock.
"""

from __future__ import annotations

import os
import re
from typing import Optional

from fastcgan.fileio import output_folder_problem, path_inside

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, as before
    fcntl = None

LOCK_NAME = ".lock"


class RunInUseError(RuntimeError):
    """Another live process trains this run directory."""


class RunDirError(OSError):
    """The run directory cannot be created or locked (a file in its path, no permission)."""


# A dataset's image folders: train/ test/ val/ (pairs), trainA/ ... (unpaired), testA_truth_B/ ...
_IMAGE_FOLDER = re.compile(r"(train|test|val)([AB](_truth_[AB])?)?")


def check_run_dir(run_dir: str, data_root: Optional[str], *, has_checkpoints: bool) -> None:
    """Where a run may write, judged before anything is written (:class:`RunDirError`): never
    in its dataset's root or image folders (its samples and checkpoints would be read as training
    images by the next run), and, without checkpoints there to continue, never into a folder that holds files
    of something else (a downloaded pretrained model, the user's own files): a new run would
    replace its ``config.json`` and ``generator_*.safetensors``; nor into a trained run whose
    checkpoints were deleted. An empty folder, or one a fastcgan trainer locked before (``.lock``:
    a run that stopped before its first checkpoint), is fine."""
    where = f"run directory {run_dir} (--output-dir / --name)"
    if data_root and path_inside(run_dir, data_root):
        # The image folders (trainA/, test/, testA_truth_B/ ...) and the dataset root itself; a run
        # beside them (--dataroot . --output-dir runs) is fine.
        rel = os.path.relpath(os.path.realpath(run_dir), os.path.realpath(data_root))
        if rel == "." or _IMAGE_FOLDER.fullmatch(rel.split(os.sep)[0]):
            raise RunDirError(f"{where} is inside the training data {data_root}: its samples and checkpoints "
                              "would become training images; choose an --output-dir outside it")
    for name in ("metrics.jsonl", "summary.json", "config.json"):  # read (on resume) or replaced by the run
        p = os.path.join(run_dir, name)
        if os.path.lexists(p) and not os.path.isfile(p):
            raise RunDirError(f"{p} exists and is not a regular file (a folder, FIFO, device or dangling link): "
                              "never read or replaced; move it away or choose another --name / --output-dir")
    for name in ("checkpoints", "samples"):  # written all along: a problem there is found now, not at a save
        p = os.path.join(run_dir, name)
        if os.path.lexists(p) and not os.path.isdir(p):
            raise RunDirError(f"{p} exists and is not a folder; move it away or choose another --name / --output-dir")
        if os.path.isdir(p) and (why := output_folder_problem(p, f"run folder {p}")):
            raise RunDirError(why)
    if has_checkpoints or not os.path.isdir(run_dir):
        return
    entries = sorted(os.listdir(run_dir))
    if entries and LOCK_NAME not in entries:
        raise RunDirError(f"{where} holds files that are not a fastcgan run's ({', '.join(entries[:4])}"
                          f"{', ...' if len(entries) > 4 else ''}), which a new run would overwrite; choose another "
                          "--name / --output-dir (or an empty folder)")
    # A run writes its generators with each checkpoint: generators without checkpoints are a run
    # whose checkpoints were deleted (to save space), not one that stopped before its first.
    trained = [e for e in entries if e.startswith("generator_") and e.endswith(".safetensors")]
    if trained:
        raise RunDirError(f"{where} holds a trained run ({', '.join(trained[:2])}) without a checkpoint to "
                          "continue from (its checkpoints/ is empty or gone), which a new run would overwrite; "
                          "choose another --name / --output-dir")


class RunLock:
    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd: Optional[int] = None
        self._created: list[str] = []  # directories acquire() made, deepest first

    def acquire(self) -> "RunLock":
        if fcntl is None:
            return self
        d = os.path.abspath(self.run_dir)
        while not os.path.isdir(d) and os.path.dirname(d) != d:
            self._created.append(d)
            d = os.path.dirname(d)
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            self._remove_created()
            raise RunDirError(
                f"run directory {self.run_dir} (--output-dir / --name): cannot create it: "
                f"{e.strerror or e} ({e.filename or self.run_dir})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunInUseError(
                f"run {self.run_dir} is being trained by another process (pid {holder}); wait for it, "
                "stop it, or choose another --name / --output-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type, *exc) -> bool:
        self.release()
        if exc_type is not None and self._created:
            # A run that failed before writing anything (bad data, config) leaves no trace: not its
            # directory, nor the --output-dir folders made for it (rmdir only removes empty ones).
            try:
                if os.listdir(self.run_dir) == [LOCK_NAME]:
                    os.remove(self.path)
                    self._remove_created()
            except OSError:
                pass
        return False

    def _remove_created(self) -> None:
        for d in self._created:
            try:
                os.rmdir(d)
            except OSError:
                return
