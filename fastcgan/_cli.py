"""What every fastcgan command does alike at its edge."""

from __future__ import annotations

import functools
import sys
from typing import Callable


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
