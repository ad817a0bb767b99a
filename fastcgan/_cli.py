"""What every fastcgan command does alike at its edge."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator


def _from_fastcgan(filename: str) -> bool:
    """Whether ``filename`` is a module of fastcgan's (``fastcgan.deploy`` and ``fastcgan.kernels``
    live in their own top-level folders in a source checkout)."""
    folders = {os.path.dirname(m.__file__) for name, m in list(sys.modules.items())
               if name.split(".")[0] == "fastcgan" and getattr(m, "__file__", None)}
    return any(os.path.dirname(os.path.abspath(filename)) == f for f in folders)


@contextlib.contextmanager
def one_line_warnings(prog: str) -> Iterator[None]:
    """A command's warnings as ``PROG: warning: MESSAGE``, one line each (Python's format added the
    fastcgan source line that raised it, a second line); another library's keep their category
    and origin. At the console script, not in ``main``: a caller of ``main`` (a test, a notebook)
    gets the warnings themselves."""
    def show(message, category, filename, lineno, file=None, line=None):
        origin = "" if _from_fastcgan(filename) else f"{category.__name__} from {filename}:{lineno}: "
        print(f"{prog}: warning: {origin}{message}", file=sys.stderr if file is None else file)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


_SIGINT_SEEN = threading.Event()


def interrupt_seen() -> bool:
    """Whether Ctrl-C reached the running command (:func:`interruptible`), also where the library
    it interrupted turned the KeyboardInterrupt into another error (torch does, inside an import
    or a trace: an AttributeError of a half-imported module): a fallback must not take that for a
    failure of its own and carry on."""
    return _SIGINT_SEEN.is_set()


@contextlib.contextmanager
def _watching_sigint() -> Iterator[None]:
    """Python's Ctrl-C handler, which also records that it ran (main thread, default handler only)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def on_sigint(signum, frame):
        _SIGINT_SEEN.set()
        signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def interruptible(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Ctrl-C in a command's ``main`` is exit 130 with one line, not a traceback -- also when the
    interrupted code swallowed it or turned it into another error (:func:`interrupt_seen`). Outputs
    are written atomically (a temporary renamed into place), so what exists is complete. Running
    out of memory where no check foresaw it (Python's or torch's allocator) is one line too, exit 1."""

    def interrupted() -> int:
        print(f"{prog}: interrupted; every file already written is complete", file=sys.stderr)
        return 130

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            _SIGINT_SEEN.clear()
            with _watching_sigint():
                try:
                    rc = main(*args, **kwargs)
                except KeyboardInterrupt:
                    return interrupted()
                except BaseException as e:
                    if _SIGINT_SEEN.is_set():  # the interrupt, in another error's clothes
                        return interrupted()
                    from fastcgan.devices import is_out_of_memory

                    if not isinstance(e, (MemoryError, RuntimeError)) or not is_out_of_memory(e):
                        raise
                    why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                    print(f"{prog}: error: out of memory ({why}); every file already written is complete: try "
                          "smaller inputs or fewer at a time", file=sys.stderr)
                    return 1
            return interrupted() if _SIGINT_SEEN.is_set() else rc  # swallowed on the way

        return run

    return wrap


def _run_command(module: str, attr: str, prog: str) -> int:
    """A console script's body: the command's module is imported inside the Ctrl-C guard too
    (importing torch and the command takes 1-3 s; Ctrl-C there was a 30-line traceback)."""
    try:
        main = getattr(importlib.import_module(module), attr)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted before it started", file=sys.stderr)
        return 130
    with one_line_warnings(prog):
        return main()


# The console scripts (pyproject.toml [project.scripts]); ``python -m fastcgan.train`` is train_command.
def train_command() -> int:
    return _run_command("fastcgan.train.cli", "console_main", "fastcgan-train")


def translate_command() -> int:
    return _run_command("fastcgan.translate", "main", "fastcgan-translate")


def eval_command() -> int:
    return _run_command("fastcgan.evaluate", "main", "fastcgan-eval")


def export_command() -> int:
    return _run_command("fastcgan.deploy.cli", "main", "fastcgan-export")


def download_command() -> int:
    return _run_command("fastcgan.data.download", "main", "fastcgan-download")


class Parser(argparse.ArgumentParser):
    """argparse whose errors a person can act on: the error and where the options are listed,
    not the whole usage (training's is ~50 lines that bury the one line that matters), and an
    official-repository spelling (``--load_size``, ``--n_epochs``, ``--model cycle_gan``) answered
    with this command's own (``official``: official flag -> what to write here)."""

    def __init__(self, *args, official: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.official = official or {}
        self._argv: list[str] = []

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        hints = self._official_hints(message)
        docs = "; docs/from-official.md maps the official ones" if hints else ""
        self.exit(2, f"{self.prog}: error: {message}\n" + "".join(f"  {h}\n" for h in hints)
                  + f"  ({self.prog} --help lists every option{docs})\n")

    def _official_hints(self, message: str) -> list[str]:
        """Hints for the official spellings among the arguments (whatever the error argparse
        met first: a missing required flag is reported before an unknown one)."""
        hints = []
        for token in self._argv:
            flag = token.split("=", 1)[0]
            if not flag.startswith("--") or flag in self._option_string_actions:
                continue
            ours = "--" + flag[2:].replace("_", "-")
            if flag in self.official:
                hints.append(f"{flag} (official) is {self.official[flag]} here")
            elif ours != flag and ours in self._option_string_actions:
                hints.append(f"{flag} is spelled {ours} here (official flags keep their meaning, hyphenated)")
        m = re.search(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            flag, value, choices = m.groups()
            names = re.findall(r"'?([\w.-]+)'?", choices)
            close = [c for c in names if c.replace("_", "") == value.replace("_", "").lower()]
            if close:
                hints.append(f"{flag.split('/')[0]} {value} (official) is {flag.split('/')[0]} {close[0]} here")
        return hints
