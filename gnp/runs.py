"""A run's directory: one run at a time holds it, and its console output is kept in train.log.

Messages go through the `gnp` logger: to the console (the main process only) and, while a run holds
its directory, to `<run dir>/train.log`.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import sys
from pathlib import Path

from gnp import io

log = logging.getLogger("gnp")
LOG_FILE = "train.log"
LOCK_FILE = ".lock"


class RunDirectoryBusy(RuntimeError):
    """Another live process is training in the same run directory."""


class _Stdout(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (test runners and Hydra replace it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def first_line(error: BaseException) -> str:
    """An error's message in one line (its first non-empty one), or its type when it has none."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def error_line(error: BaseException) -> str:
    """An error's type and first line, for records that outlive the traceback."""
    return f"{type(error).__name__}: {first_line(error)}"


def setup_console(is_main: bool = True) -> None:
    """Plain messages on stdout; processes other than the main one print only errors."""
    if not any(isinstance(h, _Stdout) for h in log.handlers):
        log.addHandler(_Stdout())
        log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.ERROR)


class RunDirectory:
    """Hold `path` for the life of a run: a lock file that the kernel releases when the process dies
    (so a killed run never blocks its own resume), the temporaries of interrupted writes removed,
    and a handler that copies the console output into train.log."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._log_handler: logging.Handler | None = None

    def __enter__(self) -> RunDirectory:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise io.OutputError(f"cannot use {self.path} as the run directory: {e.strerror}. Choose a writable "
                                 f"directory with hydra.run.dir=...") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirectoryBusy(f"{self.path} is in use by another run (PID {holder}); wait for it to end, "
                                   f"or start this one in another directory (hydra.run.dir=...)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        for stale in io.remove_stale_temporaries(self.path):
            log.info(f"removed {stale.name}, left by an interrupted write")
        handler = logging.FileHandler(self.path / LOG_FILE, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)
        self._log_handler = handler
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._log_handler is not None:
            if exc is not None:  # the file keeps the reason a run ended early (the console already has it)
                self._log_handler.emit(log.makeRecord(log.name, logging.ERROR, __file__, 0,
                                                      f"{exc_type.__name__}: {exc}", None, None))
            log.removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the lock
            self._lock_fd = None


# What a run that stopped before training leaves: nothing worth keeping.
_STUB_FILES = {"summary.json", "config.yaml", LOG_FILE, LOCK_FILE}
_HYDRA_FOLDER = ".hydra"  # Hydra's record of the job's config, written before the run starts
DEFAULT_OUTPUTS = "outputs"  # where conf/config.yaml's hydra.run.dir puts single runs


def remove_stub(path: str | Path) -> None:
    """Remove a run directory that holds nothing but what a failed start wrote (the error is on the
    console); a directory with anything else in it is left as it is."""
    path = Path(path).absolute()
    if not path.is_dir() or any(p.name not in _STUB_FILES | {_HYDRA_FOLDER} for p in path.iterdir()):
        return
    shutil.rmtree(path, ignore_errors=True)
    # The default layout's folders (outputs/<dataset>/<model>/<method>/) go too when nothing else is in them.
    root = Path.cwd() / DEFAULT_OUTPUTS
    for parent in path.parents:
        if parent == root or not parent.is_relative_to(root):
            break
        try:
            parent.rmdir()  # refused, and the climb ends, where the folder holds anything else
        except OSError:
            break
