"""Ctrl-C / SIGTERM: finish the current step, save a checkpoint, exit with 128 + signal number."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Optional

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

__all__ = ["EXIT_CODES", "StopFlag"]


class StopFlag:
    """SIGINT/SIGTERM -> finish the step, checkpoint, exit. Installed only in the main thread."""

    def __init__(self, say=None, install: bool = True):
        self.install = install  # False: embedders (tests, notebooks) keep their own handlers
        self.signum: Optional[int] = None
        self._old: dict = {}
        self._say = say or (lambda m: print(m, file=sys.stderr))

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abort now, no checkpoint
        self.signum = signum
        self._say(
            f"\nfastcgan: received {signal.Signals(signum).name}: finishing the current step and "
            "saving a checkpoint (Ctrl-C again aborts without saving)"
        )

    def __enter__(self):
        if self.install and threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()
        return False
