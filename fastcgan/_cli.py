"""What every fastcgan command does alike at its edge."""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections.abc import Callable


def interruptible(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Ctrl-C in a command's ``main`` is exit 130 with one line, not a traceback. Outputs are
    written atomically (a temporary renamed into place), so what exists is complete."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted; every file already written is complete", file=sys.stderr)
                return 130

        return run

    return wrap


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
