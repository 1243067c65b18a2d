"""What the suite says: messages through the `gnp` logger (the console of the main process, and a run's
train.log while a run holds its directory), and errors said in one line."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("gnp")


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (test runners and Hydra replace it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_console(is_main: bool = True) -> None:
    """Plain messages on stdout; processes other than the main one print only errors."""
    if not any(isinstance(h, _Stdout) for h in log.handlers):
        log.addHandler(_Stdout())
        log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.ERROR)


def first_line(error: BaseException) -> str:
    """An error's message in one line (its first non-empty one), or its type when it has none."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def error_line(error: BaseException) -> str:
    """An error's type and first line, for records that outlive the traceback."""
    return f"{type(error).__name__}: {first_line(error)}"
