"""A run directory: the one owner of its files, their names and formats, a run's status, and the hold
one run has on the directory while it trains.

    <run dir>/          outputs/<dataset>/<model>/<method>/<time>/, or hydra.run.dir
        config.yaml     the fully resolved config the run trains with
        train.log       its console output
        metrics.jsonl   one row per finished epoch
        checkpoint.pt   the latest state (gnp.training.checkpointing writes and reads its content)
        summary.json    how it ended, and what it trained (`Summary`)
        analysis.json   its flatness (`python -m gnp.analysis`), added to a finished run
        analysis.partial.json   what an analysis in progress has computed (it continues from there)
        .lock           the PID of the process that holds it, while one does
        launcher.log    a job's console output, under the parallel launcher (hydra/launcher=parallel)
        .hydra/         Hydra's record of the job's config

Everything that reads or writes these goes through here: the training records, W&B tracking, the
command line's record of a job that failed before it trained, the sweep summary, the parallel
launcher, the tables and the analysis. Every write is atomic (`gnp.io`) and a failed one is the line
`cannot write <path>: <reason>` (io.OutputError); every read of a damaged file is `Damaged`, naming
the file and the damage.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Iterable

from gnp import io
from gnp.console import first_line, log
from gnp.paths import OUTPUTS_DIR

CONFIG = "config.yaml"
LOG = "train.log"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
ANALYSIS = "analysis.json"
ANALYSIS_PARTIAL = "analysis.partial.json"
LOCK = ".lock"
LAUNCHER_LOG = "launcher.log"
HYDRA_RECORD = ".hydra"
RUN_MARKERS = (SUMMARY, CHECKPOINT, METRICS)  # a folder holding any of them holds a run
ANALYSIS_FORMAT = "gnp-analysis/1"


class Status(str, Enum):
    """How a run ended, as summary.json says it."""
    FINISHED = "finished"
    DIVERGED = "diverged"  # a NaN or inf anywhere
    STOPPED = "stopped"    # by a signal, after a checkpoint (or a second Ctrl-C, without one)
    FAILED = "failed"      # anything else, named in the summary's error

    def __str__(self) -> str:
        return self.value


@dataclass
class Summary:
    """summary.json: how a run ended, and what it trained. A run that failed before it trained records its
    status and error alone; a reader of a file written before a field existed gets None for it."""
    status: Status
    error: str | None = None
    dataset: str | None = None
    model: str | None = None
    method: str | None = None
    aug: str | None = None
    aug_style: str | None = None
    method_settings: dict = field(default_factory=dict)  # the method's config keys but _target_ and name
    seed: int | None = None
    init_seed: int | None = None
    epochs: int | None = None
    epochs_completed: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    batch_size: int | None = None
    shards: int | None = None  # train.shards, as the run resolved it
    precision: str | None = None
    num_parameters: int | None = None
    test_error: float | None = None  # %, at the end of training; None unless finished
    test_loss: float | None = None
    test_top5_error: float | None = None
    ema_test_error: float | None = None
    best_test_error: float | None = None
    first_pass_loss: float | None = None
    first_pass_error: float | None = None
    perturbed_loss: float | None = None
    perturbed_error: float | None = None
    wall_seconds: float | None = None
    images_per_second: float | None = None
    data_verified: bool | None = None
    git_commit: str | None = None
    torch_version: str | None = None
    device: str | None = None
    world_size: int | None = None

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def as_dict(self) -> dict:
        return {**asdict(self), "status": self.status.value}

    @classmethod
    def from_dict(cls, data: dict) -> Summary:
        """A summary read back: its known fields (others are ignored); raises ValueError without a valid status."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known and k != "status"}, status=Status(data["status"]))


class Damaged(ValueError):
    """A run's file cannot be read or is not what gnp writes: `path` is the file, `what` the damage."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"{path}: {what}")
        self.path, self.what = Path(path), what


class RunDir:
    """The files of the run directory `path`, read and written in their formats."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def holds_run(self) -> bool:
        """Whether any file of a run (summary, checkpoint or metrics) is here."""
        return any((self.path / name).exists() for name in RUN_MARKERS)

    # --- config.yaml ----------------------------------------------------------------------------------

    def write_config(self, config: dict) -> None:
        from omegaconf import OmegaConf

        io.write_text(self.path / CONFIG, OmegaConf.to_yaml(OmegaConf.create(config)))

    def read_config(self) -> dict | None:
        """The recorded config (nested), or None when there is none."""
        import yaml

        path = self.path / CONFIG
        if not path.exists():
            return None
        try:
            config = yaml.safe_load(_read_text(path))
        except yaml.YAMLError as e:
            raise Damaged(path, f"does not parse ({first_line(e)})") from None
        if not isinstance(config, dict):
            raise Damaged(path, "holds no mapping of settings")
        return config

    # --- summary.json ---------------------------------------------------------------------------------

    def write_summary(self, summary: Summary) -> None:
        io.write_json(self.path / SUMMARY, summary.as_dict())

    def read_summary(self) -> Summary | None:
        """How the run ended, or None when it has not recorded it (it is training, or was killed first)."""
        path = self.path / SUMMARY
        if not path.exists():
            return None
        text = _read_text(path)
        if not text.strip():
            raise Damaged(path, "empty")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise Damaged(path, f"not valid JSON, cut short? ({first_line(e)})") from None
        if not isinstance(data, dict):
            raise Damaged(path, f"holds a {type(data).__name__}, not an object")
        if not isinstance(data.get("status"), str) or data["status"] not in {s.value for s in Status}:
            raise Damaged(path, f"has no status ({', '.join(s.value for s in Status)})")
        return Summary.from_dict(data)

    # --- metrics.jsonl --------------------------------------------------------------------------------

    def write_metrics(self, rows: list[dict]) -> None:
        io.write_jsonl(self.path / METRICS, rows)

    def read_metrics(self) -> list[dict]:
        """One row per finished epoch ([] before the first)."""
        path = self.path / METRICS
        if not path.exists():
            return []
        rows = []
        for number, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise Damaged(path, f"line {number} is cut short or not JSON") from None
            if not isinstance(row, dict):
                raise Damaged(path, f"line {number} is not an object")
            rows.append(row)
        return rows

    # --- analysis.json --------------------------------------------------------------------------------

    def write_analysis(self, content: dict) -> None:
        """analysis.json: `content` holds "quantities" (name -> value), "settings" and any details."""
        io.write_json(self.path / ANALYSIS, {"format": ANALYSIS_FORMAT, **content})

    def read_analysis(self) -> dict | None:
        """analysis.json's content (with "quantities" and "settings", None when not recorded), or None
        when there is none."""
        path = self.path / ANALYSIS
        if not path.exists():
            return None
        try:
            analysis = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise Damaged(path, f"not valid JSON, cut short? ({first_line(e)})") from None
        if not isinstance(analysis, dict) or analysis.get("format") != ANALYSIS_FORMAT:
            raise Damaged(path, f"not a {ANALYSIS_FORMAT} file")
        if not isinstance(analysis.get("quantities"), dict):
            raise Damaged(path, "has no quantities")
        if not isinstance(analysis.get("settings"), dict):
            analysis["settings"] = None
        return analysis


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise Damaged(path, f"cannot be read ({first_line(e)})") from None


def find_runs(folder: str | Path, marked_by: Iterable[str] = RUN_MARKERS) -> list[Path]:
    """Every run directory under `folder` (itself included): those holding any of the files `marked_by`."""
    folder = Path(folder)
    return sorted({p.parent for name in marked_by for p in folder.rglob(name)})


# --- holding a run directory --------------------------------------------------------------------------

class RunDirectoryBusy(RuntimeError):
    """Another live process is training in the same run directory."""


class _RunLog(logging.FileHandler):
    """train.log. A write that fails (a full disk) is said once on the console, and the file is given up."""

    def handleError(self, record: logging.LogRecord) -> None:
        log.removeHandler(self)
        error = sys.exc_info()[1]
        log.warning(f"cannot write {self.baseFilename}: {getattr(error, 'strerror', None) or error}; the run's "
                    f"messages go on to the console only")


def check_usable(path: str | Path, option: str = "hydra.run.dir", whole_tree: bool = False) -> None:
    """Raise what holding `path` as a run directory would raise, before anything is written: RunDirectoryBusy
    when a live run holds it (with `whole_tree`, any run directory under it: a sweep's), io.OutputError when
    it cannot be created or written. Leaves nothing behind. `option` is the setting that chooses the folder."""
    path = Path(path).absolute()
    what = "the sweep directory" if whole_tree else "the run directory"
    locks = [path / LOCK] if not whole_tree else sorted(path.rglob(LOCK)) if path.is_dir() else []
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


class Hold:
    """Hold the run directory `path` for the life of a run: a lock file that the kernel releases when the
    process dies (so a killed run never blocks its own resume) and that the run removes when it ends, the
    temporaries of interrupted writes removed, and a handler that copies the console output into train.log."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._log_handler: logging.Handler | None = None

    def __enter__(self) -> Hold:
        lock = self.path / LOCK
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
        handler = _RunLog(self.path / LOG, encoding="utf-8")
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
        if self._lock_fd is None:
            return
        lock = self.path / LOCK
        try:
            lock.unlink(missing_ok=True)  # while still held: no other run holds this file
        except OSError as e:
            failed = io.OutputError(f"cannot write {lock}: {e.strerror or e}. The run directory stopped being "
                                    f"writable; its files are as the last write left them")
            if exc is None:
                raise failed from e
            log.warning(str(failed))  # the error that ended the run is the one to report
        finally:
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
_STUB_FILES = {SUMMARY, CONFIG, LOG, LOCK}


def remove_stub(path: str | Path) -> None:
    """Remove a run directory that holds nothing but what a failed start wrote (the error is on the
    console); a directory with anything else in it is left as it is."""
    path = Path(path).absolute()
    if not path.is_dir() or any(p.name not in _STUB_FILES | {HYDRA_RECORD} for p in path.iterdir()):
        return
    shutil.rmtree(path, ignore_errors=True)
    # The default layout's folders (outputs/<dataset>/<model>/<method>/) go too when nothing else is in them.
    root = Path.cwd() / OUTPUTS_DIR
    for parent in path.parents:
        if parent == root or not parent.is_relative_to(root):
            break
        try:
            parent.rmdir()  # refused, and the climb ends, where the folder holds anything else
        except OSError:
            break
