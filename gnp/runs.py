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
import tempfile
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


class _RunLog(logging.FileHandler):
    """train.log. A write that fails (a full disk) is said once on the console, and the file is given up."""

    def handleError(self, record: logging.LogRecord) -> None:
        log.removeHandler(self)
        error = sys.exc_info()[1]
        log.warning(f"cannot write {self.baseFilename}: {getattr(error, 'strerror', None) or error}; the run's "
                    f"messages go on to the console only")


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


def check_usable(path: str | Path, option: str = "hydra.run.dir", whole_tree: bool = False) -> None:
    """Raise what holding `path` as a run directory would raise, before anything is written: RunDirectoryBusy
    when a live run holds it (with `whole_tree`, any run directory under it: a sweep's), io.OutputError when
    it cannot be created or written. Leaves nothing behind. `option` is the setting that chooses the folder."""
    path = Path(path).absolute()
    what = "the sweep directory" if whole_tree else "the run directory"
    locks = [path / LOCK_FILE] if not whole_tree else sorted(path.rglob(LOCK_FILE)) if path.is_dir() else []
    for lock in locks:
        holder = _lock_holder(lock)
        if holder:
            raise RunDirectoryBusy(_busy_message(lock.parent, holder, option))
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise io.OutputError(f"cannot use {path} as {what}: {existing} is a file, not a folder. Choose another "
                             f"directory with {option}=...")
    try:  # the only sure test of a folder that may not exist yet: make one beside it, and remove it
        os.rmdir(tempfile.mkdtemp(prefix=".gnp-check-", dir=existing))
    except OSError as e:
        raise io.OutputError(f"cannot use {path} as {what}: making a folder in {existing} fails ({e.strerror}). "
                             f"Choose a writable directory with {option}=...") from None


def _lock_holder(lock: Path) -> str | None:
    """The PID written in the lock file of a live run that holds it, or None where no run holds it."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released at once, by the close below
    except BlockingIOError:
        return os.read(fd, 64).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)
    return None


def _busy_message(path: Path, holder: str, option: str) -> str:
    return (f"{path} is in use by another run (PID {holder}); wait for it to end, or start this one in another "
            f"directory ({option}=...)")


class RunDirectory:
    """Hold `path` for the life of a run: a lock file that the kernel releases when the process dies
    (so a killed run never blocks its own resume) and that the run removes when it ends, the
    temporaries of interrupted writes removed, and a handler that copies the console output into
    train.log."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._log_handler: logging.Handler | None = None

    def __enter__(self) -> RunDirectory:
        lock = self.path / LOCK_FILE
        while True:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise io.OutputError(f"cannot use {self.path} as the run directory: {e.strerror}. Choose a writable "
                                     f"directory with hydra.run.dir=...") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirectoryBusy(_busy_message(self.path, holder, "hydra.run.dir")) from None
            if _same_file(fd, lock):
                break
            os.close(fd)  # a run that ended meanwhile removed the file this lock is on: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        for stale in io.remove_stale_temporaries(self.path):
            log.info(f"removed {stale.name}, left by an interrupted write")
        handler = _RunLog(self.path / LOG_FILE, encoding="utf-8")
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
            (self.path / LOCK_FILE).unlink(missing_ok=True)  # while still held: no other run holds this file
            os.close(self._lock_fd)  # closing releases the lock
            self._lock_fd = None


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


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
